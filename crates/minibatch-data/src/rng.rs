//! The version-stable random generator behind every sampler and split.
//!
//! All randomness in this crate comes from [`rand_chacha::ChaCha8Rng`], whose
//! output stream is fixed by the ChaCha specification and does not change
//! between `rand` releases. The 32-byte key is derived from `(seed, epoch,
//! stream)` as follows (all little-endian):
//!
//! | bytes  | content                                    |
//! |--------|--------------------------------------------|
//! | 0..8   | `seed`                                     |
//! | 8..16  | `epoch`                                    |
//! | 16..24 | `stream` (0 for samplers, the sample index for per-sample augmentation) |
//! | 24..32 | the ASCII tag `b"minibtch"`                |
//!
//! Integers in `[0, n)` are drawn with Lemire's multiply-shift reduction of a
//! `u64` with rejection (unbiased), floats in `[0, 1)` as the top 53 bits of a
//! `u64` times 2^-53, and permutations with a hand-written Fisher-Yates
//! shuffle (`for i in (1..n).rev() { swap(i, below(i + 1)) }`), so the order
//! never depends on `rand`'s own shuffle algorithm.

use rand_chacha::rand_core::{RngCore, SeedableRng};
pub use rand_chacha::ChaCha8Rng;

/// Builds the generator for `(seed, epoch, stream)` as documented in the module.
///
/// ```
/// use minibatch_data::rng::{derive_rng, below};
/// let mut a = derive_rng(42, 0, 0);
/// let mut b = derive_rng(42, 0, 0);
/// assert_eq!(below(&mut a, 10), below(&mut b, 10));
/// ```
pub fn derive_rng(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&stream.to_le_bytes());
    key[24..32].copy_from_slice(b"minibtch");
    ChaCha8Rng::from_seed(key)
}

/// An unbiased integer in `[0, n)` (Lemire's method with rejection). `n` must be > 0.
pub fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    debug_assert!(n > 0);
    let mut m = (rng.next_u64() as u128) * (n as u128);
    let mut low = m as u64;
    if low < n {
        let threshold = n.wrapping_neg() % n;
        while low < threshold {
            m = (rng.next_u64() as u128) * (n as u128);
            low = m as u64;
        }
    }
    (m >> 64) as u64
}

/// A float in `[0, 1)` from the top 53 bits of one `u64`.
pub fn unit_f64(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Shuffles `v` in place with Fisher-Yates driven by [`below`].
pub fn fisher_yates<T>(rng: &mut ChaCha8Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = below(rng, (i + 1) as u64) as usize;
        v.swap(i, j);
    }
}

/// The permutation of `0..n` for `(seed, epoch)`: identical to what
/// [`RandomSampler`](crate::RandomSampler) yields.
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    fisher_yates(&mut derive_rng(seed, epoch, 0), &mut v);
    v
}
