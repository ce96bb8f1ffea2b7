//! The user-facing data path through the root crate: MNIST from data/mnist,
//! a shuffled DataLoader, a full epoch and a resumed one.

mod common;

use minibatch::data::{available_devices, mnist, DataLoader};

#[test]
fn mnist_epoch_through_root_reexports() -> anyhow::Result<()> {
    for device in available_devices() {
        let (train, test) = mnist::load(common::mnist_dir(), &device)?;
        assert_eq!(test.tensors()[0].dims(), &[10_000, 784]);
        let loader = DataLoader::builder(train)
            .batch_size(64)
            .shuffle(42)
            .drop_last(false)
            .build()?;
        assert_eq!(loader.len(), 938); // ceil(60000 / 64)
        assert_eq!(loader.num_samples(), 60_000);
        let mut counts = [0usize; 10];
        let mut batches = 0;
        for batch in loader.epoch(3) {
            let (x, y) = batch?.into_pair()?;
            let rows = if batches == 937 {
                60_000 - 937 * 64
            } else {
                64
            };
            assert_eq!(x.dims(), &[rows, 784]);
            assert_eq!(y.dims(), &[rows]);
            assert!(x.device().same_device(&device));
            for l in y.to_vec1::<u32>()? {
                counts[l as usize] += 1;
            }
            batches += 1;
        }
        assert_eq!(batches, 938);
        assert_eq!(
            counts,
            [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        );

        // Resuming at batch 900 yields the same labels as the uninterrupted epoch's tail.
        let full: Vec<Vec<u32>> = loader
            .epoch(3)
            .skip(900)
            .map(|b| b.unwrap().tensors()[1].to_vec1().unwrap())
            .collect();
        let resumed: Vec<Vec<u32>> = loader
            .epoch(3)
            .skip_to(900)
            .map(|b| b.unwrap().tensors()[1].to_vec1().unwrap())
            .collect();
        assert_eq!(full, resumed);
    }
    Ok(())
}
