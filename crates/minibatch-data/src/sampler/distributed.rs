use super::Sampler;
use crate::error::{DataError, Result};
use crate::rng::permutation;

/// One rank's share of the dataset in data-parallel training (PyTorch's
/// `DistributedSampler`).
///
/// Each epoch the full order (a permutation from `(seed, epoch)` when shuffling,
/// else `0..n`) is either padded by repeating its head (`drop_last = false`) or
/// truncated (`drop_last = true`) to a multiple of `world_size`; rank `r` takes
/// positions `r, r + world_size, r + 2 * world_size, ...`. So every rank gets the
/// same count, and with `drop_last` the shards are disjoint. All ranks must use
/// the same seed.
///
/// ```
/// use minibatch_data::{DistributedSampler, Sampler};
/// let r0 = DistributedSampler::new(10, 0, 3, None, false).unwrap();
/// assert_eq!(r0.indices(0), vec![0, 3, 6, 9]);
/// let r2 = DistributedSampler::new(10, 2, 3, None, false).unwrap();
/// assert_eq!(r2.indices(0), vec![2, 5, 8, 1]); // padded with the head
/// assert!(DistributedSampler::new(10, 3, 3, None, false).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct DistributedSampler {
    n: usize,
    rank: usize,
    world_size: usize,
    seed: Option<u64>,
    drop_last: bool,
    /// Neither pad nor drop: rank `r` takes the positions `r, r + world_size, ...`
    /// below `n` (see [`DistributedSampler::uneven`]).
    uneven: bool,
    num_samples: usize,
}

impl DistributedSampler {
    /// Rank `rank` of `world_size` over a dataset of `n` samples; `seed = Some(s)`
    /// shuffles with `s`, `None` keeps `0..n` order.
    /// `world_size == 0` or `rank >= world_size` is [`DataError::InvalidRank`].
    pub fn new(
        n: usize,
        rank: usize,
        world_size: usize,
        seed: Option<u64>,
        drop_last: bool,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(DataError::InvalidRank { rank, world_size });
        }
        let num_samples = if drop_last {
            n / world_size
        } else {
            n.div_ceil(world_size)
        };
        Ok(Self {
            n,
            rank,
            world_size,
            seed,
            drop_last,
            uneven: false,
            num_samples,
        })
    }
    /// Rank `rank`'s share with neither padding nor dropping: the positions
    /// `rank, rank + world_size, ...` of the order that are below `n`, so
    /// the ranks together see every sample exactly once and their counts
    /// differ by at most one. For evaluation, where each rank sums its
    /// share and the sums are reduced; training needs the equal counts of
    /// [`new`](Self::new). A rank with no sample (`n < world_size`) has an
    /// empty sampler.
    ///
    /// ```
    /// use minibatch_data::{DistributedSampler, Sampler};
    /// let r2 = DistributedSampler::uneven(10, 2, 3, None).unwrap();
    /// assert_eq!(r2.indices(0), vec![2, 5, 8]);
    /// assert_eq!(DistributedSampler::uneven(10, 0, 3, None).unwrap().len(), 4);
    /// ```
    pub fn uneven(n: usize, rank: usize, world_size: usize, seed: Option<u64>) -> Result<Self> {
        let mut s = Self::new(n, rank, world_size, seed, true)?;
        s.uneven = true;
        s.num_samples = n.saturating_sub(rank).div_ceil(world_size);
        Ok(s)
    }
    /// This sampler's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// The shuffle seed (`None`: the order `0..n`).
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }
}

impl Sampler for DistributedSampler {
    fn len(&self) -> usize {
        self.num_samples
    }
    fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut order = match self.seed {
            Some(s) => permutation(self.n, s, epoch),
            None => (0..self.n).collect(),
        };
        if self.uneven {
            return order
                .into_iter()
                .skip(self.rank)
                .step_by(self.world_size)
                .collect();
        }
        let total = self.num_samples * self.world_size;
        if self.drop_last || order.is_empty() {
            order.truncate(total);
        } else {
            let base = order.len();
            let mut k = 0;
            while order.len() < total {
                order.push(order[k % base]);
                k += 1;
            }
        }
        order
            .into_iter()
            .skip(self.rank)
            .step_by(self.world_size)
            .take(self.num_samples)
            .collect()
    }
}
