//! The row primitives of the fused CPU kernels: lane-parallel sums and
//! maxima, and a switch that runs a kernel compiled for AVX2 when the
//! processor has it.
//!
//! Every reduction keeps [`LANES`] independent partial results in a fixed
//! order, so a kernel gives the same bits whatever the vector width it was
//! compiled for (SSE2 or AVX2) and however many threads run it: rows are
//! never split between threads, and column sums over rows add fixed blocks of
//! rows in a fixed order.

use crate::float::Float;

/// How many partial sums a row reduction keeps (two AVX registers of `f32`).
pub(crate) const LANES: usize = 16;

/// `Σ xs` with [`LANES`] (16) partial sums, `acc[i]` taking the elements
/// `i mod 16` of the whole chunks; the lanes are then added pairwise
/// ([`fold`]) and the remainder in order.
#[inline(always)]
pub(crate) fn sum_16_pairwise<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    fold(acc, chunks.remainder().iter().copied())
}

/// `Σ xs` with eight independent partial sums (so the compiler can keep them
/// in vector registers), `acc[i]` taking the elements `i mod 8` of the whole
/// chunks, combined as `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`,
/// plus the remainder summed in order on its own.
#[inline]
pub(crate) fn sum_8_pairwise<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    let mut tail = T::ZERO;
    for v in it.remainder() {
        tail += *v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `Σ a ⊙ b` with [`LANES`] partial sums (`a` and `b` of one length).
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let rest = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| *x * *y);
    fold(acc, rest)
}

/// `max xs` (`-inf` for an empty slice; NaNs are skipped, the callers'
/// following arithmetic propagates them).
#[inline(always)]
pub(crate) fn max<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = T::NEG_INFINITY;
    for v in acc.into_iter().chain(chunks.remainder().iter().copied()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// Adds the lanes pairwise, then the remainder in order.
#[inline(always)]
pub(crate) fn fold<T: Float>(acc: [T; LANES], rest: impl Iterator<Item = T>) -> T {
    let mut w = acc;
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            w[i] += w[i + half];
        }
        half /= 2;
    }
    let mut s = w[0];
    for v in rest {
        s += v;
    }
    s
}

/// Whether the processor runs AVX2 (checked once, cached by `std`).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `fn $name<T: Float>(args) -> R` that calls the `#[inline(always)]`
/// generic body `$body::<T>(args)` compiled for AVX2 when the processor has
/// it, and for the build's baseline otherwise. The body uses no fused
/// multiply-adds, so both versions give the same bits.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$meta])*
        $vis fn $name<T: $crate::float::Float>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<T: $crate::float::Float>($($arg: $ty),*) $(-> $ret)? {
                    $body::<T>($($arg),*)
                }
                if $crate::ops::simd::has_avx2() {
                    // SAFETY: the processor supports AVX2 (checked just above).
                    return unsafe { avx2::<T>($($arg),*) };
                }
            }
            $body::<T>($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_plain_loops() {
        let xs: Vec<f64> = (0..37).map(|i| ((i * 7919) % 101) as f64 - 50.0).collect();
        let ys: Vec<f64> = (0..37).map(|i| (i % 5) as f64 * 0.5).collect();
        assert_eq!(sum_16_pairwise(&xs), xs.iter().sum::<f64>());
        assert_eq!(sum_8_pairwise(&xs), xs.iter().sum::<f64>());
        assert_eq!(
            dot(&xs, &ys),
            xs.iter().zip(&ys).map(|(a, b)| a * b).sum::<f64>()
        );
        assert_eq!(max(&xs), 50.0);
        assert_eq!(max::<f64>(&[]), f64::NEG_INFINITY);
        assert_eq!(sum_16_pairwise::<f32>(&[]), 0.0);
        assert_eq!(sum_8_pairwise::<f32>(&[]), 0.0);
    }
}
