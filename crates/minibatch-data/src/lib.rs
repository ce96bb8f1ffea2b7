//! Datasets, samplers and a seeded, resumable `DataLoader` for candle.
//!
//! The pieces mirror PyTorch's `torch.utils.data`: a [`Dataset`] is indexed by
//! a [`Sampler`] whose order is a pure function of `(seed, epoch)`, and a
//! [`DataLoader`] cuts that order into batches, gathering each batch of a
//! [`TensorDataset`] with one `index_select` per tensor.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use minibatch_data::{DataLoader, TensorDataset};
//! # fn main() -> minibatch_data::Result<()> {
//! let device = Device::Cpu;
//! let x = Tensor::randn(0f32, 1., (100, 8), &device)?;
//! let y = Tensor::arange(0u32, 100, &device)?;
//! let loader = DataLoader::builder(TensorDataset::new(vec![x, y])?)
//!     .batch_size(32)
//!     .shuffle(42)
//!     .drop_last(false)
//!     .build()?;
//! for epoch in 0..2 {
//!     for batch in loader.epoch(epoch) {
//!         let (x, y) = batch?.into_pair()?;
//!         assert_eq!(x.dims()[0], y.dims()[0]);
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod batch;
mod collate;
mod concat;
pub mod csv;
mod dataset;
mod device;
mod epoch;
mod error;
mod fn_dataset;
mod gather;
pub mod idx;
mod image_folder;
mod loader;
mod map;
mod map_batch;
mod mmap;
pub mod mnist;
mod npy;
#[cfg(feature = "parquet")]
#[cfg_attr(docsrs, doc(cfg(feature = "parquet")))]
pub mod parquet;
pub mod rng;
mod safetensors_dataset;
pub mod sampler;
mod split;
mod stream;
mod stream_epoch;
mod stream_order;
mod subset;
mod tensor_dataset;
mod token_windows;
mod workers;

pub use batch::{Batch, Sample};
pub use collate::collate;
pub use concat::ConcatDataset;
pub use dataset::Dataset;
pub use device::{available_devices, parse_device};
pub use epoch::Epoch;
pub use error::{DataError, FileProblem, Result};
pub use fn_dataset::FnDataset;
pub use image_folder::{ImageErrorPolicy, ImageFolder, ImageOptions};
pub use loader::{DataLoader, DataLoaderBuilder, Shard};
pub use map::{Map, TransformContext};
pub use map_batch::MapBatch;
pub use npy::NpyDataset;
pub use safetensors_dataset::SafetensorsDataset;
pub use sampler::{
    BatchSampler, DistributedSampler, FixedOrderSampler, RandomSampler, Sampler, SequentialSampler,
    SubsetRandomSampler, WeightedRandomSampler,
};
pub use split::{random_split, split_lengths, SplitSizes};
pub use stream::{ShardIter, StreamDataset};
pub use subset::Subset;
pub use tensor_dataset::TensorDataset;
pub use token_windows::{TokenDType, TokenWindows, OFFSET_STREAM};
