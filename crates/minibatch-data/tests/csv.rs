//! csv::load: the diabetes file read back value by value, column selection,
//! row filters, dtypes, and typed errors naming line and column; fuzzed input.

use std::path::{Path, PathBuf};

use candle_core::DType;
use minibatch_data::csv::{self, CsvOptions};
use minibatch_data::{DataError, Dataset};
use proptest::prelude::*;

fn diabetes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes/diabetes.csv")
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("t.csv");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn diabetes_reads_back_value_by_value() {
    let opts = CsvOptions::default().target("target").drop(&["split"]);
    let ds = csv::load(diabetes(), &opts).unwrap();
    assert_eq!(ds.len(), 442);
    let [x, y] = ds.tensors() else { panic!() };
    assert_eq!(x.dims(), &[442, 10]);
    assert_eq!((x.dtype(), y.dtype()), (DType::F32, DType::F32));
    // Compare every cell with an independent parse of the text.
    let text = std::fs::read_to_string(diabetes()).unwrap();
    let x = x.to_vec2::<f32>().unwrap();
    let y = y.to_vec1::<f32>().unwrap();
    for (i, line) in text.lines().skip(1).enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        for j in 0..10 {
            assert_eq!(x[i][j], cells[j].parse::<f32>().unwrap());
        }
        assert_eq!(y[i], cells[10].parse::<f32>().unwrap());
    }
    // Features are centred with unit sum of squares (README), a check of the columns' order.
    let col0: f64 = x.iter().map(|r| (r[0] as f64).powi(2)).sum();
    assert!((col0 - 1.0).abs() < 1e-4, "{col0}");

    let train = csv::load(diabetes(), &opts.clone().rows_where("split", "train")).unwrap();
    let test = csv::load(diabetes(), &opts.clone().rows_where("split", "test")).unwrap();
    assert_eq!((train.len(), test.len()), (353, 89));
    let f64s = csv::load(
        diabetes(),
        &opts.feature_dtype(DType::F64).target_dtype(DType::F64),
    )
    .unwrap();
    assert_eq!(f64s.tensors()[0].dtype(), DType::F64);
    assert_eq!(f64s.tensors()[1].dtype(), DType::F64);
    assert_eq!(
        f64s.tensors()[0].to_vec2::<f64>().unwrap()[0][0],
        0.038075906433423026
    );
}

#[test]
fn columns_rows_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a, b ,label,note\n1, 2.5 ,3,x\n-4e2,5,0,y\n 6 ,7,1,x\n",
    );
    let ds = csv::load(
        &p,
        &CsvOptions::default()
            .features(&["b", "a"])
            .target("label")
            .target_dtype(DType::U32),
    )
    .unwrap();
    let [x, y] = ds.tensors() else { panic!() };
    assert_eq!(
        x.to_vec2::<f32>().unwrap(),
        [[2.5, 1.0], [5.0, -400.0], [7.0, 6.0]]
    );
    assert_eq!(y.to_vec1::<u32>().unwrap(), [3, 0, 1]);
    let only_x = csv::load(&p, &CsvOptions::default().drop(&["note"])).unwrap();
    assert_eq!(only_x.tensors().len(), 1);
    assert_eq!(only_x.tensors()[0].dims(), &[3, 3]);
    let filtered = csv::load(
        &p,
        &CsvOptions::default()
            .features(&["a"])
            .rows_where("note", "x"),
    )
    .unwrap();
    assert_eq!(
        filtered.tensors()[0].to_vec2::<f32>().unwrap(),
        [[1.0], [6.0]]
    );
    let half = csv::load(
        &p,
        &CsvOptions::default()
            .features(&["a"])
            .feature_dtype(DType::BF16),
    )
    .unwrap();
    assert_eq!(half.tensors()[0].dtype(), DType::BF16);
    let tsv = write(dir.path(), "a\tb\n1\t2\n");
    let ds = csv::load(&tsv, &CsvOptions::default().delimiter(b'\t').target("b")).unwrap();
    assert_eq!(ds.tensors()[1].to_vec1::<f32>().unwrap(), [2.0]);
}

fn bad_value(r: minibatch_data::Result<minibatch_data::TensorDataset>) -> (u64, String, String) {
    match r {
        Err(DataError::BadValue {
            row_kind: "line",
            row,
            column,
            problem,
            ..
        }) => (row, column, problem),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("accepted bad input"),
    }
}

#[test]
fn bad_cells_name_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CsvOptions::default().target("y");
    let (line, col, problem) = bad_value(csv::load(write(dir.path(), "x,y\n1,2\n3,\n"), &opts));
    assert_eq!(
        (line, col.as_str(), problem.as_str()),
        (3, "y", "missing value")
    );
    let (line, col, problem) = bad_value(csv::load(
        write(dir.path(), "x,y\n1,2\n\n4,5\nabc,6\n"),
        &opts,
    ));
    assert_eq!((line, col.as_str()), (5, "x"));
    assert!(problem.contains("`abc` is not a number"), "{problem}");
    let (_, _, problem) = bad_value(csv::load(write(dir.path(), "x,y\nnan,2\n"), &opts));
    assert!(problem.contains("finite"), "{problem}");
    let (_, _, problem) = bad_value(csv::load(write(dir.path(), "x,y\n1,inf\n"), &opts));
    assert!(problem.contains("finite"), "{problem}");
    let ids = opts.clone().target_dtype(DType::U32);
    for bad in ["1.5", "-1", "5e10"] {
        let (_, col, problem) = bad_value(csv::load(
            write(dir.path(), &format!("x,y\n1,{bad}\n")),
            &ids,
        ));
        assert_eq!(col, "y");
        assert!(problem.contains("class id"), "{problem}");
    }
    assert!(csv::load(write(dir.path(), "x,y\n1,2.0\n"), &ids).is_ok());
    // A cell in a column that is not selected is not checked.
    assert!(csv::load(
        write(dir.path(), "x,y,z\n1,2,oops\n"),
        &opts.clone().drop(&["z"])
    )
    .is_ok());
    let msg = csv::load(write(dir.path(), "x,y\n1,2\n3,\n"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("line 3") && msg.contains("`y`") && msg.contains("t.csv"),
        "{msg}"
    );
}

#[test]
fn structural_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x,y\n1,2\n");
    for opts in [
        CsvOptions::default().target("z"),
        CsvOptions::default().features(&["x", "w"]),
        CsvOptions::default().drop(&["w"]),
        CsvOptions::default().rows_where("split", "train"),
    ] {
        match csv::load(&p, &opts) {
            Err(DataError::MissingColumn {
                name, available, ..
            }) => {
                assert!(name == "z" || name == "w" || name == "split");
                assert_eq!(available, "x, y");
            }
            other => panic!("{other:?}"),
        }
    }
    for opts in [
        CsvOptions::default().features(&["x"]).drop(&["y"]),
        CsvOptions::default().features(&["x", "y"]).target("y"),
        CsvOptions::default().feature_dtype(DType::U32),
        CsvOptions::default().target("y").target_dtype(DType::U8),
    ] {
        assert!(
            matches!(csv::load(&p, &opts), Err(DataError::InvalidConfig(_))),
            "{opts:?}"
        );
    }
    let ragged = write(dir.path(), "x,y\n1,2\n3\n");
    match csv::load(&ragged, &CsvOptions::default()) {
        Err(DataError::InvalidFile {
            format: "CSV",
            problem,
            ..
        }) => {
            let m = problem.to_string();
            assert!(m.contains("line 3") && m.contains("1 fields"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        csv::load(write(dir.path(), "x,y\n"), &CsvOptions::default()),
        Err(DataError::EmptyDataset(_))
    ));
    assert!(matches!(
        csv::load(&p, &CsvOptions::default().rows_where("x", "7")),
        Err(DataError::EmptyDataset(_))
    ));
    assert!(matches!(
        csv::load(dir.path().join("nope.csv"), &CsvOptions::default()),
        Err(DataError::Io { .. })
    ));
    let bad_utf8 = dir.path().join("b.csv");
    std::fs::write(&bad_utf8, b"x,y\n1,\xff\n").unwrap();
    assert!(csv::load(&bad_utf8, &CsvOptions::default().target("y")).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_text_never_panics(
        cells in proptest::collection::vec(
            prop::sample::select(vec!["1", "-2.5", "", "a", "nan", "3e2", "\"4\"", "\"5,6\"", "\n", ",", "\r\n", "1e999"]),
            0..40),
        target in any::<bool>(),
    ) {
        let text = format!("x,y\n{}", cells.concat());
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &text);
        let opts = if target { CsvOptions::default().target("y").target_dtype(DType::U32) } else { CsvOptions::default() };
        if let Ok(ds) = csv::load(&p, &opts) {
            prop_assert!(ds.len() > 0);
        }
    }
}
