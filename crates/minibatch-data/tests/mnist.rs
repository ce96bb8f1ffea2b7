//! Loads the real MNIST shipped in the repository's data/mnist.

use std::path::PathBuf;

use candle_core::Device;
use minibatch_data::mnist::{self, MnistOptions};
use minibatch_data::{available_devices, DataError, Dataset};

fn mnist_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist")
}

fn label_counts(ds: &minibatch_data::TensorDataset) -> Vec<usize> {
    let mut c = vec![0; 10];
    for l in ds.tensors()[1].to_vec1::<u32>().unwrap() {
        c[l as usize] += 1;
    }
    c
}

/// Pixel sums (sum of the raw u8 values of the 784 pixels) of a few images,
/// computed independently with python3 from the raw files:
/// `d = gzip.open(f).read(); sum(d[16 + i*784 : 16 + (i+1)*784])`
/// (and labels `gzip.open(l).read()[8 + i]`).
const TRAIN_KNOWN: [(usize, u32, u32); 4] = [
    (0, 5, 27525),
    (1, 0, 31095),
    (2, 4, 19443),
    (59999, 8, 20920),
];
const TEST_KNOWN: [(usize, u32, u32); 4] =
    [(0, 7, 18454), (1, 2, 28850), (2, 1, 9871), (9999, 6, 41833)];

#[test]
fn real_mnist_counts_and_known_images() {
    for device in available_devices() {
        let (train, test) = mnist::load(mnist_dir(), &device).unwrap();
        assert_eq!((train.len(), test.len()), (60_000, 10_000));
        assert_eq!(train.tensors()[0].dims(), &[60_000, 784]);
        assert_eq!(train.tensors()[0].dtype(), candle_core::DType::F32);
        assert_eq!(train.tensors()[1].dtype(), candle_core::DType::U32);
        assert_eq!(
            label_counts(&train),
            vec![5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        );
        assert_eq!(
            label_counts(&test),
            vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
        );
        for (ds, known) in [(&train, &TRAIN_KNOWN), (&test, &TEST_KNOWN)] {
            let idx: Vec<usize> = known.iter().map(|k| k.0).collect();
            let (x, y) = ds.get_batch(&idx).unwrap().into_pair().unwrap();
            let y = y.to_vec1::<u32>().unwrap();
            for (row, (k, yk)) in x.to_vec2::<f32>().unwrap().iter().zip(known.iter().zip(y)) {
                assert_eq!(yk, k.1);
                assert!(row.iter().all(|p| (0.0..=1.0).contains(p)));
                let sum: f64 = row.iter().map(|&p| (p * 255.0).round() as f64).sum();
                assert_eq!(sum as u32, k.2, "image {}", k.0);
            }
        }
    }
}

#[test]
fn normalised_and_unflattened_options() {
    let (_, test) = mnist::load_with(
        mnist_dir(),
        &MnistOptions::default().normalized(true).flattened(false),
        &Device::Cpu,
    )
    .unwrap();
    let x = test.tensors()[0].get(0).unwrap();
    assert_eq!(x.dims(), &[1, 28, 28]);
    let min = x
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((min - (-mnist::MEAN / mnist::STD)).abs() < 1e-6, "{min}");
}

#[test]
fn missing_data_says_where_it_looked() {
    let err = mnist::load("/definitely/not/here", &Device::Cpu).unwrap_err();
    assert!(matches!(err, DataError::MissingData { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("/definitely/not/here") && msg.contains("data/mnist"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    let err = mnist::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("train-images-idx3-ubyte.gz"),
        "{err}"
    );

    // Raw (un-gzipped) files are found too, and a corrupt one is a typed error.
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        std::fs::write(dir.path().join(name), [0u8, 0, 8, 1, 0, 0, 0, 5, 1]).unwrap();
    }
    let err = mnist::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, DataError::InvalidIdx(_)), "{err}");
}
