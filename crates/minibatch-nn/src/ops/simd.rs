//! The element types of the fused CPU kernels (`f32`, `f64`) and the row
//! primitives they are built from: lane-parallel sums and maxima, a
//! vectorisable `exp`, and a switch that runs a kernel compiled for AVX2 when
//! the processor has it.
//!
//! Every reduction keeps [`LANES`] independent partial results in a fixed
//! order, so a kernel gives the same bits whatever the vector width it was
//! compiled for (SSE2 or AVX2) and however many threads run it: rows are
//! never split between threads, and column sums over rows add fixed blocks of
//! rows in a fixed order.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use candle_core::WithDType;

/// How many partial sums a row reduction keeps (two AVX registers of `f32`).
pub(crate) const LANES: usize = 16;

/// `f32` or `f64`: what the fused kernels compute in.
pub(crate) trait Float:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    /// `e^x`, written without branches so that a loop of it vectorises. For
    /// `f32` a Cody-Waite reduction and Cephes' degree-6 polynomial (within 2
    /// ulp of the correctly rounded value over the normal range, `0` below
    /// `-103.98`, `inf` above `88.73`, NaN for NaN); `f64` uses `std`'s `exp`.
    fn exp_fast(self) -> Self;
    fn from_usize(n: usize) -> Self {
        Self::from_f64(n as f64)
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        f64::exp(self)
    }
}

/// `e^x` for `f32` without branches or table look-ups (see [`Float::exp_fast`]).
///
/// `x = n ln2 + f` with `n = round(x / ln2)` (rounded by the 1.5·2²³ shifter)
/// and `|f| <= ln2 / 2` from a two-constant Cody-Waite reduction; `e^f` is
/// Cephes' `expf` polynomial; `2^n` is applied as two exponent-field
/// multiplications so that results in the subnormal range round correctly.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P0: f32 = 1.987_569_1e-4;
    const P1: f32 = 1.398_199_9e-3;
    const P2: f32 = 8.333_452e-3;
    const P3: f32 = 4.166_579_6e-2;
    const P4: f32 = 1.666_666_5e-1;
    const P5: f32 = 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32

    // Outside [-104, 89] the answer is 0 or inf; clamp so the integer maths
    // below stays in range (NaN passes through the clamp's comparisons).
    let xc = if x < -104.0 { -104.0 } else { x };
    let xc = if xc > 89.0 { 89.0 } else { xc };
    let r = xc * LOG2E + SHIFTER;
    let n = r - SHIFTER;
    let k = (r.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let f = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((P0 * f + P1) * f + P2) * f + P3) * f + P4) * f + P5;
    let e = p * (f * f) + f + 1.0;
    // 2^k = 2^k1 * 2^k2 with both factors normal for |k| <= 252.
    let k1 = k >> 1;
    let k2 = k - k1;
    let s1 = f32::from_bits(((k1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((k2 + 127) as u32) << 23);
    let y = e * s1 * s2;
    let y = if x < -103.972_08 { 0.0 } else { y };
    if x > 88.722_84 {
        f32::INFINITY
    } else {
        y
    }
}

/// `Σ xs` with [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    fold(acc, chunks.remainder().iter().copied())
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
        $vis fn $name<T: $crate::ops::simd::Float>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<T: $crate::ops::simd::Float>($($arg: $ty),*) $(-> $ret)? {
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

    fn ulps(a: f32, b: f32) -> u32 {
        if a == b {
            return 0;
        }
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm_and_handles_the_edges() {
        let mut worst = 0;
        let mut x = -103.0f32;
        while x < 88.7 {
            let (a, b) = (exp_f32(x), (x as f64).exp() as f32);
            if b >= f32::MIN_POSITIVE {
                worst = worst.max(ulps(a, b));
            } else {
                assert!((a - b).abs() <= 2.0 * f32::from_bits(1), "{x}: {a} vs {b}");
            }
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.7).is_finite());
    }

    #[test]
    fn reductions_match_plain_loops() {
        let xs: Vec<f64> = (0..37).map(|i| ((i * 7919) % 101) as f64 - 50.0).collect();
        let ys: Vec<f64> = (0..37).map(|i| (i % 5) as f64 * 0.5).collect();
        assert_eq!(sum(&xs), xs.iter().sum::<f64>());
        assert_eq!(
            dot(&xs, &ys),
            xs.iter().zip(&ys).map(|(a, b)| a * b).sum::<f64>()
        );
        assert_eq!(max(&xs), 50.0);
        assert_eq!(max::<f64>(&[]), f64::NEG_INFINITY);
        assert_eq!(sum::<f32>(&[]), 0.0);
    }
}
