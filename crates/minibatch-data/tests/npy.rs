//! NpyDataset against files numpy wrote (tests/fixtures/npy, made by
//! make_npy.py there): values, shapes, dtypes, both byte orders and format
//! versions; typed errors for bad files; fuzzed headers.

use std::path::PathBuf;

use candle_core::DType;
use minibatch_data::{DataError, DataLoader, Dataset, FileProblem, NpyDataset};
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/npy")
        .join(name)
}

/// The 4x3 base array of make_npy.py: -5 .. 6.
fn base() -> Vec<Vec<f64>> {
    (0..4)
        .map(|r| (0..3).map(|c| (r * 3 + c) as f64 - 5.0).collect())
        .collect()
}

fn as_f64(t: &candle_core::Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn numpy_files_read_with_their_dtypes_and_values() {
    let files = [
        ("f4.npy", DType::F32),
        ("f8_big_endian.npy", DType::F64),
        ("f2.npy", DType::F16),
        ("f4_v2.npy", DType::F32),
    ];
    let paths: Vec<PathBuf> = files.iter().map(|(f, _)| fixture(f)).collect();
    let ds = NpyDataset::open(&paths).unwrap();
    assert_eq!(ds.len(), 4);
    assert_eq!(
        ds.dtypes(),
        files.iter().map(|(_, d)| *d).collect::<Vec<_>>()
    );
    assert!(ds.shapes().iter().all(|s| *s == [4, 3]));
    let b = ds.get_batch(&[3, 1]).unwrap();
    let want: Vec<f64> = [base()[3].clone(), base()[1].clone()].concat();
    for t in b.tensors() {
        assert_eq!(t.dims(), &[2, 3]);
        assert_eq!(as_f64(t), want);
    }

    let ints = NpyDataset::open(&[
        fixture("i8.npy"),
        fixture("i4.npy"),
        fixture("i2_big_endian.npy"),
        fixture("u4.npy"),
        fixture("u1_3d.npy"),
        fixture("bool.npy"),
    ])
    .unwrap();
    assert_eq!(
        ints.dtypes(),
        [
            DType::I64,
            DType::I32,
            DType::I16,
            DType::U32,
            DType::U8,
            DType::U8
        ]
    );
    let all = ints.get_batch(&[0, 1, 2, 3]).unwrap();
    let t = all.tensors();
    assert_eq!(t[0].to_vec1::<i64>().unwrap(), [-2, 0, 7, 1 << 40]);
    assert_eq!(t[1].to_vec1::<i32>().unwrap(), [-2, 0, 7, 1 << 30]);
    assert_eq!(as_f64(&t[2]), [-2.0, 0.0, 7.0, 300.0]);
    assert_eq!(
        t[3].to_vec2::<u32>().unwrap(),
        [[0, 1], [2, 3], [4, 5], [6, 4_000_000_000]]
    );
    assert_eq!(t[4].dims(), &[4, 2, 2]);
    assert_eq!(
        t[4].flatten_all().unwrap().to_vec1::<u8>().unwrap(),
        (0..16).collect::<Vec<u8>>()
    );
    assert_eq!(t[5].to_vec1::<u8>().unwrap(), [1, 0, 1, 1]);
    let s = ints.get(2).unwrap();
    assert_eq!(s.tensors()[0].dims(), &[] as &[usize]);
    assert_eq!(s.tensors()[4].dims(), &[2, 2]);

    // Through the loader, with workers: rows stay aligned across files.
    let loader = DataLoader::builder(ints)
        .batch_size(3)
        .shuffle(2)
        .num_workers(2)
        .build()
        .unwrap();
    for batch in loader.epoch(0) {
        let t = batch.unwrap().into_tensors();
        let i8s = t[0].to_vec1::<i64>().unwrap();
        let i4s = t[1].to_vec1::<i32>().unwrap();
        assert!(i8s
            .iter()
            .zip(&i4s)
            .all(|(a, b)| *a == *b as i64 || *a == 1 << 40));
    }
}

fn problem(r: minibatch_data::Result<NpyDataset>) -> FileProblem {
    match r {
        Err(DataError::InvalidFile {
            format: "npy",
            problem,
            ..
        }) => *problem,
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("accepted a bad file"),
    }
}

fn open_bytes(bytes: &[u8]) -> minibatch_data::Result<NpyDataset> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    std::fs::write(&p, bytes).unwrap();
    NpyDataset::open(&[p])
}

/// A version-1 npy file with the given header dict text and body.
fn npy(dict: &str, body: &[u8]) -> Vec<u8> {
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend_from_slice(body);
    out
}

#[test]
fn bad_files_are_typed_errors() {
    let good = std::fs::read(fixture("f4.npy")).unwrap();
    assert!(open_bytes(&good).is_ok());
    assert!(matches!(
        problem(open_bytes(&good[..good.len() - 1])),
        FileProblem::Truncated { .. }
    ));
    assert!(matches!(
        problem(open_bytes(&good[..7])),
        FileProblem::Truncated {
            needed: 10,
            actual: 7
        }
    ));
    assert!(matches!(
        problem(open_bytes(&good[..40])),
        FileProblem::Truncated { .. }
    ));
    assert!(matches!(
        problem(open_bytes(&[good.clone(), vec![0; 3]].concat())),
        FileProblem::TrailingBytes { extra: 3 }
    ));
    let mut magic = good.clone();
    magic[1] = b'X';
    assert!(matches!(
        problem(open_bytes(&magic)),
        FileProblem::BadMagic { .. }
    ));
    let mut version = good.clone();
    version[6] = 9;
    assert!(matches!(
        problem(open_bytes(&version)),
        FileProblem::Header(_)
    ));
    match problem(NpyDataset::open(&[fixture("u2_unsupported.npy")])) {
        FileProblem::UnsupportedDtype { dtype, .. } => assert_eq!(dtype, "<u2"),
        p => panic!("{p}"),
    }
    assert!(matches!(
        problem(NpyDataset::open(&[fixture("fortran.npy")])),
        FileProblem::Header(m) if m.contains("Fortran")
    ));
    // Hand-made headers: missing keys, bad syntax, structured dtypes.
    let body = [0u8; 8];
    for dict in [
        "{'descr': '<f4', 'shape': (2,), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)",
        "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (x,), }",
        "{'descr': '\u{e9}f4', 'fortran_order': False, 'shape': (2,), }",
        "not a dict",
    ] {
        assert!(
            matches!(
                problem(open_bytes(&npy(dict, &body))),
                FileProblem::Header(_)
            ),
            "{dict}"
        );
    }
    // The same header, well formed, reads.
    let ok = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
        &body,
    );
    assert_eq!(open_bytes(&ok).unwrap().len(), 2);
    // A 0-d array cannot be a dataset column; mismatched row counts are rejected.
    assert!(matches!(
        NpyDataset::open(&[fixture("scalar.npy")]),
        Err(DataError::ShapeMismatch(_))
    ));
    assert!(matches!(
        NpyDataset::open(&[fixture("f4.npy"), fixture("u2_unsupported.npy")]),
        Err(DataError::InvalidFile { .. })
    ));
    let two = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
        &body,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("two.npy");
    std::fs::write(&p, two).unwrap();
    assert!(matches!(
        NpyDataset::open(&[fixture("f4.npy"), p]),
        Err(DataError::ShapeMismatch(_))
    ));
    let msg = open_bytes(&magic).unwrap_err().to_string();
    assert!(msg.contains("a.npy") && msg.contains("magic"), "{msg}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
        let _ = open_bytes(&bytes);
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&bytes);
        let _ = open_bytes(&b);
    }

    #[test]
    fn fuzzed_dicts_never_panic_and_accepted_ones_read(
        descr in prop::sample::select(vec!["<f4", ">f8", "|u1", "<i8", "|b1", "<u2", "f4", "", "<f4x"]),
        fortran in any::<bool>(),
        dims in proptest::collection::vec(0u64..5, 0..4),
        body_len in 0usize..200,
        junk in proptest::collection::vec(prop::sample::select(vec![' ', ',', '(', ')', '\'', '{', '}', ':', 'L']), 0..3),
    ) {
        let shape = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        };
        let junk: String = junk.into_iter().collect();
        let dict = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}{junk}, }}",
            if fortran { "True" } else { "False" }
        );
        if let Ok(ds) = open_bytes(&npy(&dict, &vec![1u8; body_len])) {
            let all: Vec<usize> = (0..ds.len()).collect();
            if !all.is_empty() {
                prop_assert_eq!(ds.get_batch(&all).unwrap().len(), all.len());
            }
        }
    }

    #[test]
    fn every_truncation_of_a_numpy_file_is_an_error(cut in any::<prop::sample::Index>()) {
        let good = std::fs::read(fixture("u4.npy")).unwrap();
        let at = cut.index(good.len());
        let invalid = matches!(open_bytes(&good[..at]), Err(DataError::InvalidFile { .. }));
        prop_assert!(invalid);
    }
}
