//! The IDX reader: round trips of every element type and no panics on garbage.

use minibatch_data::idx::{read_idx, read_idx_file, IdxData, IdxType};
use minibatch_data::DataError;
use proptest::prelude::*;

fn header(code: u8, dims: &[u32]) -> Vec<u8> {
    let mut v = vec![0, 0, code, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v
}

#[test]
fn decodes_every_type_big_endian() {
    let mut b = header(0x0B, &[2]);
    b.extend_from_slice(&(-2i16).to_be_bytes());
    b.extend_from_slice(&300i16.to_be_bytes());
    assert_eq!(read_idx(&b).unwrap().data(), &IdxData::I16(vec![-2, 300]));

    let mut b = header(0x0C, &[1, 1]);
    b.extend_from_slice(&(-70000i32).to_be_bytes());
    let a = read_idx(&b).unwrap();
    assert_eq!(a.dims(), &[1, 1]);
    assert_eq!(a.dtype(), IdxType::I32);
    assert_eq!(a.data(), &IdxData::I32(vec![-70000]));

    let mut b = header(0x0D, &[2]);
    b.extend_from_slice(&1.5f32.to_be_bytes());
    b.extend_from_slice(&(-0.25f32).to_be_bytes());
    assert_eq!(read_idx(&b).unwrap().to_f32(), vec![1.5, -0.25]);

    let mut b = header(0x0E, &[1]);
    b.extend_from_slice(&std::f64::consts::PI.to_be_bytes());
    assert_eq!(
        read_idx(&b).unwrap().data(),
        &IdxData::F64(vec![std::f64::consts::PI])
    );

    let mut b = header(0x09, &[3]);
    b.extend_from_slice(&[0xff, 1, 0x80]);
    assert_eq!(
        read_idx(&b).unwrap().data(),
        &IdxData::I8(vec![-1, 1, -128])
    );

    let b = header(0x08, &[0, 5]);
    assert_eq!(read_idx(&b).unwrap().num_elements(), 0);
}

#[test]
fn rejects_corrupt_input_with_typed_errors() {
    let mut good = header(0x08, &[2, 2]);
    good.extend_from_slice(&[1, 2, 3, 4]);
    assert!(read_idx(&good).is_ok());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "too short"),
        (good[..good.len() - 1].to_vec(), "truncated"),
        ([good.clone(), vec![9]].concat(), "trailing"),
        ([vec![1], good[1..].to_vec()].concat(), "wrong magic"),
        (
            [vec![0x1f, 0x8b], good[2..].to_vec()].concat(),
            "wrong magic",
        ),
        (
            [vec![0, 0, 0x07], good[3..].to_vec()].concat(),
            "unknown element type",
        ),
        (header(0x08, &[2])[..6].to_vec(), "truncated header"),
        (header(0x0E, &[u32::MAX, u32::MAX, u32::MAX]), "overflow"),
    ];
    for (bytes, msg) in cases {
        let err = read_idx(&bytes).unwrap_err();
        assert!(matches!(err, DataError::InvalidIdx(_)), "{bytes:?}");
        assert!(err.to_string().contains(msg), "{err} should mention {msg}");
    }
}

#[test]
fn reads_raw_and_gzipped_files() {
    use std::io::Write;
    let mut bytes = header(0x08, &[3]);
    bytes.extend_from_slice(&[7, 8, 9]);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a-idx1-ubyte");
    std::fs::write(&raw, &bytes).unwrap();
    let gz = dir.path().join("a-idx1-ubyte.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&bytes).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    for p in [raw, gz] {
        assert_eq!(
            read_idx_file(&p).unwrap().data(),
            &IdxData::U8(vec![7, 8, 9])
        );
    }
    assert!(matches!(
        read_idx_file(dir.path().join("missing")),
        Err(DataError::Io { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = read_idx(&bytes);
    }

    #[test]
    fn plausible_headers_with_random_bodies_never_panic(
        code in prop::sample::select(vec![0x08u8, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x0A, 0xFF]),
        dims in proptest::collection::vec(0u32..6, 0..4),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut b = header(code, &dims);
        b.extend_from_slice(&body);
        if let Ok(a) = read_idx(&b) {
            prop_assert_eq!(a.num_elements(), dims.iter().map(|&d| d as usize).product::<usize>());
        }
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error(dims in proptest::collection::vec(1u32..5, 1..4), cut in any::<prop::sample::Index>()) {
        let count: u32 = dims.iter().product();
        let mut b = header(0x0D, &dims);
        b.extend((0..count * 4).map(|i| i as u8));
        prop_assert!(read_idx(&b).is_ok());
        let at = cut.index(b.len());
        prop_assert!(matches!(read_idx(&b[..at]), Err(DataError::InvalidIdx(_))));
    }
}
