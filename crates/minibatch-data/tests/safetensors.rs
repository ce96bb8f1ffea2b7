//! SafetensorsDataset: values, shapes and dtypes against the file candle
//! wrote; loader order with workers and resume; typed errors for every kind of
//! bad header; fuzzed headers; and a 2 GiB (sparse) file iterated shuffled
//! within a bounded anonymous-memory budget.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use minibatch_data::{
    DataError, DataLoader, Dataset, FileProblem, SafetensorsDataset, TensorDataset,
};
use proptest::prelude::*;

fn dev() -> Device {
    Device::Cpu
}

/// Tensors of every supported dtype, 5 rows each.
fn sample_tensors() -> Vec<(&'static str, Tensor)> {
    let d = dev();
    let f = Tensor::arange(0f32, 30., &d)
        .unwrap()
        .reshape((5, 2, 3))
        .unwrap();
    vec![
        ("f32", f.clone()),
        ("f64", f.to_dtype(DType::F64).unwrap()),
        ("f16", f.to_dtype(DType::F16).unwrap()),
        ("bf16", f.to_dtype(DType::BF16).unwrap()),
        ("u8", Tensor::arange(0u8, 5, &d).unwrap()),
        (
            "u32",
            Tensor::arange(10u32, 20, &d)
                .unwrap()
                .reshape((5, 2))
                .unwrap(),
        ),
        ("i64", Tensor::new(&[-3i64, -1, 0, 7, 1 << 40], &d).unwrap()),
        ("i32", Tensor::new(&[-3i32, -1, 0, 7, 1 << 30], &d).unwrap()),
        ("i16", Tensor::new(&[-3i16, -1, 0, 7, 300], &d).unwrap()),
        ("empty_rows", Tensor::zeros((5, 0), DType::F32, &d).unwrap()),
        ("other", Tensor::zeros((3, 3), DType::F32, &d).unwrap()),
    ]
}

fn write_sample(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("s.safetensors");
    let map: HashMap<String, Tensor> = sample_tensors()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

fn same(a: &Tensor, b: &Tensor) {
    assert_eq!(a.dtype(), b.dtype());
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
    let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
    assert_eq!(a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
}

#[test]
fn rows_values_shapes_and_dtypes_match_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path());
    let names = [
        "f32",
        "f64",
        "f16",
        "bf16",
        "u8",
        "u32",
        "i64",
        "i32",
        "i16",
        "empty_rows",
    ];
    let ds = SafetensorsDataset::open(&path, &names).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.names(), names);
    let originals: HashMap<_, _> = sample_tensors().into_iter().collect();
    for (name, dt) in names.iter().zip(ds.dtypes()) {
        assert_eq!(dt, originals[name].dtype(), "{name}");
    }
    let idx = [4usize, 0, 2, 2];
    let ids = Tensor::new(&[4u32, 0, 2, 2], &dev()).unwrap();
    let batch = ds.get_batch(&idx).unwrap();
    assert_eq!(batch.len(), 4);
    for (name, t) in names.iter().zip(batch.tensors()) {
        same(t, &originals[name].index_select(&ids, 0).unwrap());
    }
    let one = ds.get(3).unwrap();
    for (name, t) in names.iter().zip(one.tensors()) {
        same(t, &originals[name].get(3).unwrap());
    }
    assert!(matches!(
        ds.get(5),
        Err(DataError::IndexOutOfRange { index: 5, len: 5 })
    ));
    assert!(ds.get_batch(&[0, 9]).is_err());
    assert!(!ds.is_in_memory());
}

#[test]
fn loader_order_with_workers_and_resume_equals_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let n = 103;
    let x = Tensor::arange(0f32, (n * 3) as f32, &dev())
        .unwrap()
        .reshape((n, 3))
        .unwrap();
    let y = Tensor::arange(0u32, n as u32, &dev()).unwrap();
    let path = dir.path().join("xy.safetensors");
    let map: HashMap<String, Tensor> = [("x".to_string(), x.clone()), ("y".to_string(), y.clone())]
        .into_iter()
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    let collect = |loader: &DataLoader, epoch, skip| -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
        loader
            .epoch(epoch)
            .skip_to(skip)
            .map(|b| {
                let (x, y) = b.unwrap().into_pair().unwrap();
                (x.to_vec2().unwrap(), y.to_vec1().unwrap())
            })
            .collect()
    };
    let memory = DataLoader::builder(TensorDataset::new(vec![x, y]).unwrap())
        .batch_size(10)
        .shuffle(5)
        .build()
        .unwrap();
    for workers in [0, 1, 3] {
        let mapped = DataLoader::builder(SafetensorsDataset::open(&path, &["x", "y"]).unwrap())
            .batch_size(10)
            .shuffle(5)
            .num_workers(workers)
            .build()
            .unwrap();
        assert_eq!(mapped.uses_workers(), workers > 0);
        for epoch in 0..2 {
            assert_eq!(collect(&mapped, epoch, 0), collect(&memory, epoch, 0));
            assert_eq!(collect(&mapped, epoch, 7), collect(&memory, epoch, 7));
        }
    }
}

#[test]
fn selection_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path());
    let err = SafetensorsDataset::open(&path, &["f32", "nope"]).unwrap_err();
    match &err {
        DataError::MissingColumn {
            name, available, ..
        } => {
            assert_eq!(name, "nope");
            assert!(available.contains("f32"), "{available}");
        }
        e => panic!("{e}"),
    }
    assert!(matches!(
        SafetensorsDataset::open(&path, &["f32", "other"]),
        Err(DataError::ShapeMismatch(_))
    ));
    assert!(matches!(
        SafetensorsDataset::open(&path, &[]),
        Err(DataError::EmptyDataset(_))
    ));
    assert!(matches!(
        SafetensorsDataset::open(dir.path().join("missing"), &["x"]),
        Err(DataError::Io { .. })
    ));
}

/// A safetensors file from `(name, dtype, shape, [begin, end])` entries and a data section.
fn st_file(entries: &[(&str, &str, &[usize], [u64; 2])], data: &[u8]) -> Vec<u8> {
    let body: Vec<String> = entries
        .iter()
        .map(|(n, d, s, o)| {
            format!(
                "\"{n}\":{{\"dtype\":\"{d}\",\"shape\":{s:?},\"data_offsets\":[{},{}]}}",
                o[0], o[1]
            )
        })
        .collect();
    let header = format!(
        "{{\"__metadata__\":{{\"format\":\"pt\"}},{}}}",
        body.join(",")
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn open_bytes(bytes: &[u8], names: &[&str]) -> minibatch_data::Result<SafetensorsDataset> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    std::fs::write(&path, bytes).unwrap();
    SafetensorsDataset::open(&path, names)
}

fn problem(r: minibatch_data::Result<SafetensorsDataset>) -> FileProblem {
    match r {
        Err(DataError::InvalidFile {
            format: "safetensors",
            problem,
            ..
        }) => *problem,
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("accepted a bad file"),
    }
}

#[test]
fn bad_headers_are_typed_errors() {
    let data = [0u8; 24];
    let good = st_file(
        &[("a", "F32", &[2, 2], [0, 16]), ("b", "U8", &[2], [16, 18])],
        &data,
    );
    let ds = open_bytes(&good, &["a", "b"]).unwrap();
    assert_eq!(ds.len(), 2);

    assert!(matches!(
        problem(open_bytes(&good[..5], &["a"])),
        FileProblem::Truncated {
            needed: 8,
            actual: 5
        }
    ));
    assert!(matches!(
        problem(open_bytes(&good[..20], &["a"])),
        FileProblem::Truncated { actual: 20, .. }
    ));
    // Data cut short: the header promises 18 data bytes.
    let cut = st_file(
        &[("a", "F32", &[2, 2], [0, 16]), ("b", "U8", &[2], [16, 18])],
        &data[..17],
    );
    assert!(matches!(
        problem(open_bytes(&cut, &["a"])),
        FileProblem::Truncated { .. }
    ));
    let reversed = st_file(&[("a", "F32", &[0], [16, 0])], &data);
    assert!(matches!(
        problem(open_bytes(&reversed, &["a"])),
        FileProblem::OffsetsOutOfRange {
            begin: 16,
            end: 0,
            ..
        }
    ));
    let overlap = st_file(
        &[("a", "F32", &[2, 2], [0, 16]), ("b", "U8", &[2], [15, 17])],
        &data,
    );
    assert_eq!(
        problem(open_bytes(&overlap, &["a"])),
        FileProblem::Overlap {
            first: "a".into(),
            second: "b".into()
        }
    );
    let size = st_file(&[("a", "F32", &[2, 3], [0, 16])], &data);
    assert!(matches!(
        problem(open_bytes(&size, &["a"])),
        FileProblem::SizeMismatch {
            expected: 24,
            actual: 16,
            ..
        }
    ));
    let unknown = st_file(&[("a", "F33", &[4], [0, 16])], &data);
    assert!(matches!(
        problem(open_bytes(&unknown, &["a"])),
        FileProblem::Header(_)
    ));
    // A dtype the file format has but candle lacks: fine unless selected.
    let u16s = st_file(
        &[("a", "U16", &[4], [0, 8]), ("b", "U8", &[2], [8, 10])],
        &data,
    );
    assert!(open_bytes(&u16s, &["b"]).is_ok());
    assert!(matches!(
        problem(open_bytes(&u16s, &["a"])),
        FileProblem::UnsupportedDtype { .. }
    ));
    let mut not_json = good.clone();
    not_json[8] = b'[';
    assert!(matches!(
        problem(open_bytes(&not_json, &["a"])),
        FileProblem::Header(_)
    ));
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        problem(open_bytes(&huge, &["a"])),
        FileProblem::Header(_)
    ));
    let huge_shape = st_file(
        &[("a", "F64", &[1 << 40, 1 << 40, 1 << 40], [0, 16])],
        &data,
    );
    assert!(matches!(
        problem(open_bytes(&huge_shape, &["a"])),
        FileProblem::SizeMismatch {
            expected: u64::MAX,
            ..
        }
    ));
    let overflow = st_file(
        &[("a", "F64", &[1 << 40, 1 << 40, 1 << 40, 1 << 40], [0, 16])],
        &data,
    );
    assert!(matches!(
        problem(open_bytes(&overflow, &["a"])),
        FileProblem::Header(_)
    ));
    // A scalar cannot be a dataset column.
    let scalar = st_file(&[("a", "F32", &[], [0, 4])], &data);
    assert!(matches!(
        open_bytes(&scalar, &["a"]),
        Err(DataError::ShapeMismatch(_))
    ));
    // Error messages name the file and the problem.
    let msg = open_bytes(&overlap, &["a"]).unwrap_err().to_string();
    assert!(
        msg.contains("t.safetensors") && msg.contains("overlap"),
        "{msg}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let _ = open_bytes(&bytes, &["a"]);
    }

    /// Random dtypes, shapes and offsets: open either rejects the header or
    /// every row of every tensor can be read.
    #[test]
    fn fuzzed_headers_never_panic_and_accepted_ones_read(
        entries in proptest::collection::vec(
            (prop::sample::select(vec!["F32", "U8", "F16", "I64", "BOOL", "U16", "F64"]),
             proptest::collection::vec(0usize..4, 1..3),
             0u64..40, 0u64..40),
            1..4),
        data_len in 0usize..80,
    ) {
        let named: Vec<(String, &str, Vec<usize>, [u64; 2])> = entries
            .iter()
            .enumerate()
            .map(|(i, (d, s, b, e))| (format!("t{i}"), *d, s.clone(), [*b, *e]))
            .collect();
        let refs: Vec<(&str, &str, &[usize], [u64; 2])> =
            named.iter().map(|(n, d, s, o)| (n.as_str(), *d, &s[..], *o)).collect();
        let bytes = st_file(&refs, &vec![7u8; data_len]);
        for (n, ..) in &named {
            if let Ok(ds) = open_bytes(&bytes, &[n.as_str()]) {
                let all: Vec<usize> = (0..ds.len()).collect();
                if !all.is_empty() {
                    prop_assert_eq!(ds.get_batch(&all).unwrap().len(), all.len());
                }
            }
        }
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error(cut in any::<prop::sample::Index>()) {
        let good = st_file(&[("a", "F32", &[2, 2], [0, 16]), ("b", "U8", &[2], [16, 18])], &[1u8; 18]);
        prop_assert!(open_bytes(&good, &["a", "b"]).is_ok());
        let at = cut.index(good.len());
        let is_invalid = matches!(open_bytes(&good[..at], &["a", "b"]), Err(DataError::InvalidFile { .. }));
        prop_assert!(is_invalid);
    }
}

/// `RssAnon` of this process in bytes (Linux).
#[cfg(target_os = "linux")]
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A 2 GiB file (sparse: only the header is written, the rest reads as
/// zeros) iterated in one shuffled epoch through the loader: the process's
/// anonymous memory must stay within 256 MB of where it started, because
/// rows are read through the page cache into per-batch tensors that are
/// dropped as the epoch advances.
#[cfg(target_os = "linux")]
#[test]
fn a_2_gib_file_iterates_shuffled_in_bounded_anonymous_memory() {
    use std::io::Write;
    const ROW: usize = 4096; // bytes per row: 1024 f32
    const ROWS: usize = (2 << 30) / ROW; // 524,288 rows = 2 GiB of data
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let header = format!(
        "{{\"x\":{{\"dtype\":\"F32\",\"shape\":[{ROWS},{}],\"data_offsets\":[0,{}]}}}}",
        ROW / 4,
        ROWS * ROW
    );
    // Pad the header so the data starts on a page boundary (like safetensors' 8-byte alignment, rounded up).
    let padded = format!("{header:<4088}");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&(padded.len() as u64).to_le_bytes()).unwrap();
    f.write_all(padded.as_bytes()).unwrap();
    f.set_len((8 + padded.len() + ROWS * ROW) as u64).unwrap();
    drop(f);

    let before = rss_anon();
    let ds = SafetensorsDataset::open(&path, &["x"]).unwrap();
    assert_eq!(ds.len(), ROWS);
    let loader = DataLoader::builder(ds)
        .batch_size(1024)
        .shuffle(1)
        .build()
        .unwrap();
    let mut peak = 0;
    let mut rows = 0;
    for (b, batch) in loader.epoch(0).enumerate() {
        let batch = batch.unwrap();
        rows += batch.len();
        if b % 16 == 0 {
            peak = peak.max(rss_anon().saturating_sub(before));
        }
    }
    peak = peak.max(rss_anon().saturating_sub(before));
    assert_eq!(rows, ROWS);
    eprintln!(
        "RssAnon growth over a shuffled 2 GiB epoch: {:.1} MB",
        peak as f64 / 1e6
    );
    assert!(
        peak < 256 << 20,
        "anonymous memory grew by {} MB iterating a 2 GiB file",
        peak >> 20
    );
    drop(loader);
    std::fs::remove_file(&path).unwrap();
}
