//! TokenWindows: windows against the token file, u16 and u32, the length
//! rule, seeded epoch offsets (pure, in range, moving), loader order with
//! workers and resume, and typed errors.

use std::path::{Path, PathBuf};

use minibatch_data::{DataError, DataLoader, Dataset, TokenDType, TokenWindows};
use proptest::prelude::*;

/// Token `k` of the test files: a value that needs all 16 bits sometimes.
fn token(k: usize) -> u32 {
    ((k * 7919) % 65_536) as u32
}

fn write_tokens(dir: &Path, n: usize, dtype: TokenDType) -> PathBuf {
    let path = dir.join(format!("t{n}_{dtype:?}.bin"));
    let bytes: Vec<u8> = (0..n)
        .flat_map(|k| match dtype {
            TokenDType::U16 => (token(k) as u16).to_le_bytes().to_vec(),
            TokenDType::U32 => (token(k) + 70_000).to_le_bytes().to_vec(),
        })
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn expected(k: usize, dtype: TokenDType) -> u32 {
    match dtype {
        TokenDType::U16 => token(k),
        TokenDType::U32 => token(k) + 70_000,
    }
}

#[test]
fn windows_match_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [TokenDType::U16, TokenDType::U32] {
        let path = write_tokens(dir.path(), 1001, dtype);
        let lm = TokenWindows::open(&path, dtype, 64).unwrap();
        assert_eq!(lm.len(), 1000 / 64);
        assert_eq!(lm.n_tokens(), 1001);
        let b = lm.get_batch(&[3, 0, 14]).unwrap();
        let (x, y) = b.into_pair().unwrap();
        assert_eq!(x.dtype(), candle_core::DType::U32);
        assert_eq!(x.dims(), &[3, 64]);
        let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
        for (row, i) in [3usize, 0, 14].into_iter().enumerate() {
            let want_x: Vec<u32> = (i * 64..i * 64 + 64).map(|k| expected(k, dtype)).collect();
            let want_y: Vec<u32> = (i * 64 + 1..i * 64 + 65)
                .map(|k| expected(k, dtype))
                .collect();
            assert_eq!(x[row], want_x);
            assert_eq!(y[row], want_y);
        }
        let (sx, sy) = lm.get(14).unwrap().into_pair().unwrap();
        assert_eq!(sx.dims(), &[64]);
        assert_eq!(sx.to_vec1::<u32>().unwrap(), x[2]);
        assert_eq!(sy.to_vec1::<u32>().unwrap(), y[2]);
        assert!(matches!(lm.get(15), Err(DataError::IndexOutOfRange { .. })));
        // The last window ends exactly at the last token when (n - 1) is a multiple of b.
        let exact = TokenWindows::open(&path, dtype, 100).unwrap();
        assert_eq!(exact.len(), 10);
        let (_, y) = exact.get(9).unwrap().into_pair().unwrap();
        assert_eq!(
            *y.to_vec1::<u32>().unwrap().last().unwrap(),
            expected(1000, dtype)
        );
    }
}

#[test]
fn epoch_offsets_are_pure_in_range_and_move() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tokens(dir.path(), 2000, TokenDType::U16);
    let b = 32;
    let lm = TokenWindows::open(&path, TokenDType::U16, b)
        .unwrap()
        .epoch_offsets(9)
        .unwrap();
    assert_eq!(lm.len(), (2000 - b) / b);
    let offsets: Vec<usize> = (0..20).map(|e| lm.offset(e)).collect();
    assert!(offsets.iter().all(|&o| o < b));
    assert!(
        offsets
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 5,
        "{offsets:?}"
    );
    let again = TokenWindows::open(&path, TokenDType::U16, b)
        .unwrap()
        .epoch_offsets(9)
        .unwrap();
    assert_eq!(
        offsets,
        (0..20).map(|e| again.offset(e)).collect::<Vec<_>>()
    );
    let other_seed = TokenWindows::open(&path, TokenDType::U16, b)
        .unwrap()
        .epoch_offsets(10)
        .unwrap();
    assert_ne!(
        offsets,
        (0..20).map(|e| other_seed.offset(e)).collect::<Vec<_>>()
    );
    for epoch in 0..20 {
        let o = lm.offset(epoch);
        let last = lm.len() - 1;
        let (x, y) = lm
            .get_batch_in_epoch(&[0, last], epoch)
            .unwrap()
            .into_pair()
            .unwrap();
        let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
        assert_eq!(x[0][0], token(o));
        assert_eq!(x[1][0], token(o + last * b));
        assert_eq!(y[1][b - 1], token(o + last * b + b));
    }
    // Without offsets, every epoch is the same.
    let plain = TokenWindows::open(&path, TokenDType::U16, b).unwrap();
    assert_eq!(plain.offset(5), 0);
}

#[test]
fn loader_order_with_workers_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tokens(dir.path(), 5000, TokenDType::U16);
    let make = |workers| {
        let lm = TokenWindows::open(&path, TokenDType::U16, 16)
            .unwrap()
            .epoch_offsets(3)
            .unwrap();
        DataLoader::builder(lm)
            .batch_size(8)
            .shuffle(4)
            .num_workers(workers)
            .build()
            .unwrap()
    };
    let rows = |l: &DataLoader, e, skip| -> Vec<Vec<Vec<u32>>> {
        l.epoch(e)
            .skip_to(skip)
            .map(|b| b.unwrap().into_pair().unwrap().0.to_vec2().unwrap())
            .collect()
    };
    let base = make(0);
    for workers in [1, 2] {
        let l = make(workers);
        assert!(l.uses_workers());
        for e in 0..2 {
            assert_eq!(rows(&l, e, 0), rows(&base, e, 0));
            assert_eq!(rows(&l, e, 11), rows(&base, e, 11));
        }
    }
    assert_ne!(rows(&base, 0, 0), rows(&base, 1, 0));
}

#[test]
fn bad_files_and_arguments_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.bin");
    std::fs::write(&odd, [1u8, 2, 3, 4, 5]).unwrap();
    let err = TokenWindows::open(&odd, TokenDType::U16, 1).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::InvalidFile {
                format: "token",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("odd.bin"));
    assert!(matches!(
        TokenWindows::open(&odd, TokenDType::U32, 1),
        Err(DataError::InvalidFile { .. })
    ));
    let path = write_tokens(dir.path(), 10, TokenDType::U16);
    assert!(matches!(
        TokenWindows::open(&path, TokenDType::U16, 0),
        Err(DataError::InvalidConfig(_))
    ));
    assert!(matches!(
        TokenWindows::open(&path, TokenDType::U16, 10),
        Err(DataError::EmptyDataset(_))
    ));
    assert_eq!(
        TokenWindows::open(&path, TokenDType::U16, 9).unwrap().len(),
        1
    );
    assert!(matches!(
        TokenWindows::open(&path, TokenDType::U16, 6)
            .unwrap()
            .epoch_offsets(0),
        Err(DataError::EmptyDataset(_))
    ));
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, []).unwrap();
    assert!(matches!(
        TokenWindows::open(&empty, TokenDType::U16, 4),
        Err(DataError::EmptyDataset(_))
    ));
    assert!(matches!(
        TokenWindows::open(dir.path().join("missing.bin"), TokenDType::U16, 4),
        Err(DataError::Io { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every window of every epoch lies inside the file, for any size and block.
    #[test]
    fn every_window_fits(n in 2usize..300, b in 1usize..40, seed in any::<u64>(), offsets in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = write_tokens(dir.path(), n, TokenDType::U16);
        let Ok(lm) = TokenWindows::open(&path, TokenDType::U16, b) else {
            prop_assert!(n < b + 1);
            return Ok(());
        };
        let lm = if offsets {
            match lm.epoch_offsets(seed) {
                Ok(lm) => lm,
                Err(_) => { prop_assert!(n < 2 * b); return Ok(()); }
            }
        } else {
            lm
        };
        let all: Vec<usize> = (0..lm.len()).collect();
        for epoch in 0..3 {
            let (x, y) = lm.get_batch_in_epoch(&all, epoch).unwrap().into_pair().unwrap();
            let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
            let o = lm.offset(epoch);
            for i in 0..lm.len() {
                prop_assert_eq!(x[i][0], token(o + i * b));
                prop_assert_eq!(y[i][b - 1], token(o + i * b + b));
            }
        }
    }
}
