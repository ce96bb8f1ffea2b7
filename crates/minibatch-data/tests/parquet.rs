//! Parquet (feature `parquet`): files written here with the parquet crate's
//! own writer (plain and snappy) read back value by value, row group by row
//! group; nulls, ragged lists, unsupported types and missing columns are typed
//! errors; truncated and bit-flipped files never panic.
#![cfg(feature = "parquet")]

use std::path::Path;
use std::sync::Arc;

use ::parquet::basic::Compression;
use ::parquet::data_type::{
    BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type,
};
use ::parquet::file::properties::WriterProperties;
use ::parquet::file::writer::SerializedFileWriter;
use ::parquet::schema::parser::parse_message_type;
use candle_core::DType;
use minibatch_data::parquet::{self, ParquetFile};
use minibatch_data::{DataError, Dataset, FileProblem};
use proptest::prelude::*;

const SCHEMA: &str = "message m {
    REQUIRED FLOAT x;
    OPTIONAL DOUBLE d;
    REQUIRED INT32 i;
    REQUIRED INT32 u (UINT_32);
    REQUIRED INT64 label;
    REQUIRED BOOLEAN flag;
    OPTIONAL group emb (LIST) { repeated group list { optional float element; } }
    OPTIONAL BYTE_ARRAY name (UTF8);
}";

/// Rows `first .. first + n` of the test table.
struct Group {
    first: usize,
    n: usize,
    null_d_at: Option<usize>,
    ragged_at: Option<usize>,
}

fn write(path: &Path, groups: &[Group], compression: Compression) {
    let schema = Arc::new(parse_message_type(SCHEMA).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for g in groups {
        let rows: Vec<usize> = (g.first..g.first + g.n).collect();
        let mut rg = w.next_row_group().unwrap();
        let mut col =
            |f: &mut dyn FnMut(&mut ::parquet::file::writer::SerializedColumnWriter<'_>)| {
                let mut c = rg.next_column().unwrap().unwrap();
                f(&mut c);
                c.close().unwrap();
            };
        col(&mut |c| {
            let v: Vec<f32> = rows.iter().map(|&r| r as f32 * 0.5).collect();
            c.typed::<FloatType>().write_batch(&v, None, None).unwrap();
        });
        col(&mut |c| {
            let defs: Vec<i16> = rows
                .iter()
                .map(|&r| (Some(r) != g.null_d_at) as i16)
                .collect();
            let v: Vec<f64> = rows
                .iter()
                .filter(|&&r| Some(r) != g.null_d_at)
                .map(|&r| r as f64 / 3.0)
                .collect();
            c.typed::<DoubleType>()
                .write_batch(&v, Some(&defs), None)
                .unwrap();
        });
        col(&mut |c| {
            let v: Vec<i32> = rows.iter().map(|&r| -(r as i32)).collect();
            c.typed::<Int32Type>().write_batch(&v, None, None).unwrap();
        });
        col(&mut |c| {
            let v: Vec<i32> = rows
                .iter()
                .map(|&r| (3_000_000_000u32 + r as u32) as i32)
                .collect();
            c.typed::<Int32Type>().write_batch(&v, None, None).unwrap();
        });
        col(&mut |c| {
            let v: Vec<i64> = rows.iter().map(|&r| (r % 3) as i64).collect();
            c.typed::<Int64Type>().write_batch(&v, None, None).unwrap();
        });
        col(&mut |c| {
            let v: Vec<bool> = rows.iter().map(|&r| r % 2 == 0).collect();
            c.typed::<BoolType>().write_batch(&v, None, None).unwrap();
        });
        col(&mut |c| {
            // Row r is the list [r, r + 0.25] (three elements in the ragged row).
            let (mut v, mut defs, mut reps) = (Vec::new(), Vec::new(), Vec::new());
            for &r in &rows {
                let k = if Some(r) == g.ragged_at { 3 } else { 2 };
                for e in 0..k {
                    v.push(r as f32 + 0.25 * e as f32);
                    defs.push(3);
                    reps.push(if e == 0 { 0 } else { 1 });
                }
            }
            c.typed::<FloatType>()
                .write_batch(&v, Some(&defs), Some(&reps))
                .unwrap();
        });
        col(&mut |c| {
            let v: Vec<ByteArray> = rows
                .iter()
                .map(|r| ByteArray::from(format!("row{r}").as_str()))
                .collect();
            let defs = vec![1i16; rows.len()];
            c.typed::<ByteArrayType>()
                .write_batch(&v, Some(&defs), None)
                .unwrap();
        });
        rg.close().unwrap();
    }
    w.close().unwrap();
}

fn groups(null_d_at: Option<usize>, ragged_at: Option<usize>) -> Vec<Group> {
    vec![
        Group {
            first: 0,
            n: 5,
            null_d_at,
            ragged_at,
        },
        Group {
            first: 5,
            n: 7,
            null_d_at,
            ragged_at,
        },
    ]
}

#[test]
fn columns_read_back_with_their_values_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    for (name, codec) in [
        ("plain", Compression::UNCOMPRESSED),
        ("snappy", Compression::SNAPPY),
    ] {
        let path = dir.path().join(format!("{name}.parquet"));
        write(&path, &groups(None, None), codec);
        let f = ParquetFile::open(&path).unwrap();
        assert_eq!((f.num_rows(), f.num_row_groups()), (12, 2));
        assert!(
            f.columns().contains(&"emb.list.element".to_string()),
            "{:?}",
            f.columns()
        );
        let cols = ["x", "d", "i", "u", "label", "flag", "emb"];
        let sizes: Vec<usize> = f
            .row_groups(&cols)
            .map(|g| g.unwrap()[0].dims()[0])
            .collect();
        assert_eq!(sizes, [5, 7]);
        let ds = parquet::load(&path, &cols).unwrap();
        assert_eq!(ds.len(), 12);
        let t = ds.tensors();
        let dtypes: Vec<DType> = t.iter().map(|t| t.dtype()).collect();
        assert_eq!(
            dtypes,
            [
                DType::F32,
                DType::F64,
                DType::I32,
                DType::U32,
                DType::I64,
                DType::U8,
                DType::F32
            ]
        );
        let r: Vec<usize> = (0..12).collect();
        assert_eq!(
            t[0].to_vec1::<f32>().unwrap(),
            r.iter().map(|&r| r as f32 * 0.5).collect::<Vec<_>>()
        );
        assert_eq!(
            t[1].to_vec1::<f64>().unwrap(),
            r.iter().map(|&r| r as f64 / 3.0).collect::<Vec<_>>()
        );
        assert_eq!(
            t[2].to_vec1::<i32>().unwrap(),
            r.iter().map(|&r| -(r as i32)).collect::<Vec<_>>()
        );
        assert_eq!(
            t[3].to_vec1::<u32>().unwrap(),
            r.iter()
                .map(|&r| 3_000_000_000 + r as u32)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            t[4].to_vec1::<i64>().unwrap(),
            r.iter().map(|&r| (r % 3) as i64).collect::<Vec<_>>()
        );
        assert_eq!(
            t[5].to_vec1::<u8>().unwrap(),
            r.iter().map(|&r| (r % 2 == 0) as u8).collect::<Vec<_>>()
        );
        assert_eq!(t[6].dims(), &[12, 2]);
        assert_eq!(t[6].get(7).unwrap().to_vec1::<f32>().unwrap(), [7.0, 7.25]);
        // The full path names the same column as the top-level name.
        let by_path = f.read_row_group(1, &["emb.list.element"]).unwrap();
        assert_eq!(by_path[0].to_vec2::<f32>().unwrap()[0], [5.0, 5.25]);
        assert!(matches!(
            f.read_row_group(2, &["x"]),
            Err(DataError::IndexOutOfRange { index: 2, len: 2 })
        ));
    }
}

#[test]
fn bad_columns_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let nulls = dir.path().join("nulls.parquet");
    write(&nulls, &groups(Some(8), None), Compression::SNAPPY);
    match parquet::load(&nulls, &["x", "d"]) {
        Err(DataError::BadValue {
            row_kind: "row",
            row,
            column,
            ..
        }) => {
            assert_eq!((row, column.as_str()), (8, "d"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(parquet::load(&nulls, &["x"]).unwrap().len(), 12);
    let ragged = dir.path().join("ragged.parquet");
    write(&ragged, &groups(None, Some(9)), Compression::UNCOMPRESSED);
    match parquet::load(&ragged, &["emb"]) {
        Err(DataError::ShapeMismatch(m)) => assert!(m.contains("row 9"), "{m}"),
        other => panic!("{other:?}"),
    }
    let good = dir.path().join("good.parquet");
    write(&good, &groups(None, None), Compression::UNCOMPRESSED);
    assert!(matches!(
        parquet::load(&good, &["name"]),
        Err(DataError::InvalidFile { problem, .. }) if matches!(*problem, FileProblem::UnsupportedDtype { .. })
    ));
    match parquet::load(&good, &["nope"]) {
        Err(DataError::MissingColumn {
            name, available, ..
        }) => {
            assert_eq!(name, "nope");
            assert!(available.contains("label"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parquet::load(&good, &[]),
        Err(DataError::EmptyDataset(_))
    ));
    assert!(matches!(
        ParquetFile::open(dir.path().join("missing")),
        Err(DataError::Io { .. })
    ));
    let text = dir.path().join("text.parquet");
    std::fs::write(&text, "a,b\n1,2\n").unwrap();
    assert!(matches!(
        ParquetFile::open(&text),
        Err(DataError::InvalidFile {
            format: "parquet",
            ..
        })
    ));
}

fn try_read(bytes: &[u8]) -> minibatch_data::Result<usize> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.parquet");
    std::fs::write(&p, bytes).unwrap();
    Ok(parquet::load(&p, &["x", "d", "label", "emb"])?.len())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn truncated_and_corrupted_files_never_panic(cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("good.parquet");
        write(&path, &groups(None, None), Compression::SNAPPY);
        let good = std::fs::read(&path).unwrap();
        prop_assert_eq!(try_read(&good).unwrap(), 12);
        let at = cut.index(good.len());
        let truncated_is_invalid = matches!(try_read(&good[..at]), Err(DataError::InvalidFile { .. }));
        prop_assert!(truncated_is_invalid);
        let mut flipped = good.clone();
        flipped[flip.index(good.len())] ^= 1 << bit;
        let _ = try_read(&flipped);
    }
}
