//! `Float`, the one element-type trait of the fused CPU kernels (`f32`,
//! `f64`): candle's `WithDType` plus the constants and scalar functions the
//! kernels need, and the branch-free `f32` exponential behind
//! [`Float::exp_fast`].

use std::ops::Neg;

use candle_core::WithDType;

use crate::split::{with_slot, SCRATCH_F32, SCRATCH_F64};

/// `f32` or `f64`: what the fused kernels compute in. candle's `WithDType`
/// brings the arithmetic (`NumAssign`), comparisons, `Send + Sync +
/// 'static` and candle's `VecOps` reductions.
pub(crate) trait Float: WithDType + Neg<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    /// `std`'s `e^x`.
    fn exp(self) -> Self;
    /// `e^x`, written without branches so that a loop of it vectorises. For
    /// `f32` a Cody-Waite reduction and Cephes' degree-6 polynomial
    /// ([`exp_f32`]: within 2 ulp of the correctly rounded value over the
    /// normal range, `0` below `-103.98`, `inf` above `88.73`, NaN for NaN);
    /// `f64` uses `std`'s `exp`.
    fn exp_fast(self) -> Self;
    fn is_nan(self) -> bool;
    /// `n as Self`.
    fn from_usize(n: usize) -> Self;
    /// `Σ xs` in the order candle's own CPU reductions use (its
    /// `vec_reduce_sum`, SIMD for `f32`), so fused kernels reproduce candle's
    /// results bit for bit.
    fn sum_candle_order(xs: &[Self]) -> Self {
        let mut s = Self::zero();
        if !xs.is_empty() {
            // SAFETY: `xs.len()` elements are readable.
            unsafe { Self::vec_reduce_sum(xs.as_ptr(), &mut s, xs.len()) };
        }
        s
    }
    /// Runs `f` with this thread's scratch buffer of at least `len` elements
    /// (its contents are whatever an earlier call left there). The buffer is
    /// taken out of the thread-local slot while `f` runs, so a nested call
    /// gets a fresh one instead of aliasing it.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! float_impl {
    ($t:ident, $exp_fast:expr, $scratch:ident) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = $t::NEG_INFINITY;
            #[inline(always)]
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                $t::ln(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $t::exp(self)
            }
            #[inline(always)]
            fn exp_fast(self) -> Self {
                $exp_fast(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                $t::is_nan(self)
            }
            #[inline(always)]
            fn from_usize(n: usize) -> Self {
                n as $t
            }
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                with_slot(&$scratch, len, f)
            }
        }
    };
}

float_impl!(f32, exp_f32, SCRATCH_F32);
float_impl!(f64, f64::exp, SCRATCH_F64);

/// `erf(x)` for `f32` without branches, so that a loop of it vectorises:
/// the rational approximation Eigen and XLA use for `f32` (odd degree-13
/// numerator over an even degree-8 denominator in `x`, on `x` clamped to
/// `[-4, 4]`, where `erf` is `±1` in `f32`). Within 4.3e-7 of the exact
/// value (7 ulp at worst, near `|x| = 3.6`; 3.4 ulp for `|x| < 0.5`), checked
/// against `libm` in the tests; NaN gives NaN.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    const A: [f32; 7] = [
        -2.726_142_258_013_06e-10,
        2.770_681_424_959_02e-08,
        -2.101_024_020_825_08e-06,
        -5.692_506_394_623_46e-05,
        -7.349_906_303_268_55e-04,
        -2.954_599_808_540_25e-03,
        -1.609_603_332_624_15e-02,
    ];
    const B: [f32; 5] = [
        -1.456_607_184_649_96e-05,
        -2.133_740_552_789_05e-04,
        -1.682_826_974_382_03e-03,
        -7.373_329_167_204_68e-03,
        -1.426_473_905_141_89e-02,
    ];
    let xc = if x < -4.0 { -4.0 } else { x };
    let xc = if xc > 4.0 { 4.0 } else { xc };
    let x2 = xc * xc;
    let mut p = A[0];
    for a in &A[1..] {
        p = p * x2 + *a;
    }
    let mut q = B[0];
    for b in &B[1..] {
        q = q * x2 + *b;
    }
    xc * p / q
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

#[cfg(test)]
mod tests {
    use candle_core::cpu::kernels::VecOps;

    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        if a == b {
            return 0;
        }
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn erf_f32_is_within_5e_7_and_handles_the_edges() {
        let (mut worst_abs, mut worst_ulp) = (0f64, 0u32);
        let mut x = -6.0f32;
        while x < 6.0 {
            let (a, b) = (erf_f32(x), candle_core::cpu::erf::erf_f64(x as f64));
            worst_abs = worst_abs.max((a as f64 - b).abs());
            worst_ulp = Ord::max(worst_ulp, ulps(a, b as f32));
            x += 0.000_37;
        }
        assert!(worst_abs < 5e-7, "worst error {worst_abs}");
        assert!(worst_ulp <= 8, "worst error {worst_ulp} ulp");
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf_f32(-1e30), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
        // Odd.
        assert_eq!(erf_f32(-0.7), -erf_f32(0.7));
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm_and_handles_the_edges() {
        let mut worst: u32 = 0;
        let mut x = -103.0f32;
        while x < 88.7 {
            let (a, b) = (exp_f32(x), (x as f64).exp() as f32);
            if b >= f32::MIN_POSITIVE {
                worst = Ord::max(worst, ulps(a, b));
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
    fn from_usize_and_the_candle_order_sum() {
        assert_eq!(<f32 as Float>::from_usize(3), 3.0);
        assert_eq!(<f64 as Float>::from_usize(1 << 40), (1u64 << 40) as f64);
        let xs: Vec<f32> = (0..37).map(|i| i as f32 * 0.25).collect();
        let mut want = 0f32;
        // SAFETY: `xs.len()` elements are readable.
        unsafe { f32::vec_reduce_sum(xs.as_ptr(), &mut want, xs.len()) };
        assert_eq!(f32::sum_candle_order(&xs), want);
        assert_eq!(f64::sum_candle_order(&[]), 0.0);
    }
}
