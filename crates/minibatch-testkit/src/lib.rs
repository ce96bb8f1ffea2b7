//! Test-only helpers of the minibatch workspace (`publish = false`).
//!
//! [`check_close`] / [`assert_close`] (candle tensors) and
//! [`check_close_slice`] / [`assert_close_slice`] (f64 slices) are *the* one
//! comparison of computed values against a reference that every test of the
//! workspace uses. Arguments always come in the order **actual, expected**,
//! and the tolerance ([`Tol`]) is measured against the expected values.
//!
//! The comparison fails when
//! - the shapes (tensors) or the lengths (slices) differ;
//! - an element is NaN or ±inf where the reference is not the same thing: an
//!   expected NaN needs an actual NaN, an expected +inf an actual +inf (so
//!   +inf against −inf fails), and a finite expected value a finite actual one;
//! - the error `|actual − expected|` of a finite element exceeds the bound
//!   [`Tol`] gives it.
//!
//! The message names `what`, how many elements failed, and the worst element:
//! its index, actual and expected values, error and bound.
//!
//! [`check_rel_l2_slice`] / [`assert_rel_l2_slice`] are the norm-wise
//! variant (`|actual − expected|₂ ≤ rel · |expected|₂`) with the same length
//! and non-finite rules.
//!
//! ```
//! use minibatch_testkit::{check_close_slice, Tol};
//! assert!(check_close_slice(&[1.0, 2.0], &[1.0, 2.0 + 1e-13], Tol::abs(1e-12), "v").is_ok());
//! assert!(check_close_slice(&[f64::INFINITY], &[f64::NEG_INFINITY], Tol::abs(1.0), "v").is_err());
//! assert!(check_close_slice(&[], &[1.0], Tol::abs(1.0), "v").is_err());
//! ```

use candle_core::{DType, Tensor};

/// What the relative part of a [`Tol`] is relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scale {
    /// `|expected[i]|`, element by element.
    Element,
    /// `max_j |expected[j]|`, the largest finite reference value.
    Max,
}

/// A tolerance: the bound on `|actual[i] − expected[i]|` is
/// `abs + rel · max(s, floor)`, where `s` is `|expected[i]|` (the per-element
/// rules) or the largest `|expected[j]|` ([`Tol::rel_to_max`]), and `floor`
/// is `0` unless [`Tol::floor`] sets it. [`Tol::strict`] turns `≤` into `<`.
///
/// The bound is computed in exactly that order (`abs + rel * scale`), so a
/// check written before as `|a − e| <= atol + rtol * |e|` accepts the same
/// values bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    abs: f64,
    rel: f64,
    floor: f64,
    scale: Scale,
    strict: bool,
    bits: bool,
}

impl Tol {
    /// `|a − e| ≤ abs + rel · |e|`, element by element.
    pub const fn new(abs: f64, rel: f64) -> Self {
        Self {
            abs,
            rel,
            floor: 0.0,
            scale: Scale::Element,
            strict: false,
            bits: false,
        }
    }

    /// `|a − e| ≤ abs`. `Tol::abs(0.0)` asks for equality.
    pub const fn abs(abs: f64) -> Self {
        Self::new(abs, 0.0)
    }

    /// Equality: `Tol::abs(0.0)` (NaN still matches NaN, inf the same inf).
    pub const fn exact() -> Self {
        Self::abs(0.0)
    }

    /// Bit-for-bit identity of the f64 values: unlike [`Tol::exact`], `−0`
    /// differs from `+0` (and NaNs must carry the same bits).
    pub const fn bits() -> Self {
        Self {
            bits: true,
            ..Self::exact()
        }
    }

    /// `|a − e| ≤ rel · |e|`, element by element.
    pub const fn rel(rel: f64) -> Self {
        Self::new(0.0, rel)
    }

    /// `|a − e| ≤ rel · max_j |e_j|`: relative to the largest reference value
    /// (its finite elements), for outputs with values near zero next to large ones.
    pub const fn rel_to_max(rel: f64) -> Self {
        Self {
            scale: Scale::Max,
            ..Self::rel(rel)
        }
    }

    /// The relative part uses `max(scale, floor)` instead of `scale`: with
    /// `Tol::rel(r).floor(1.0)` the bound is `r · max(|e|, 1)`, relative for
    /// large values and absolute (`r`) near zero.
    pub const fn floor(self, floor: f64) -> Self {
        Self { floor, ..self }
    }

    /// Accepts only errors strictly below the bound (`<` instead of `≤`).
    pub const fn strict(self) -> Self {
        Self {
            strict: true,
            ..self
        }
    }

    /// Whether the single value `actual` is close enough to `expected`
    /// (the rules of [`check_close_slice`] for one element).
    pub fn accepts(&self, actual: f64, expected: f64) -> bool {
        check_close_slice(&[actual], &[expected], *self, "").is_ok()
    }

    fn bound(&self, scale: f64) -> f64 {
        self.abs + self.rel * scale.max(self.floor)
    }

    fn within(&self, err: f64, bound: f64) -> bool {
        if self.strict {
            err < bound
        } else {
            err <= bound
        }
    }
}

impl std::fmt::Display for Tol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rel_of = match self.scale {
            Scale::Element => "|e|",
            Scale::Max => "max|e|",
        };
        if self.bits {
            return write!(f, "bit-for-bit");
        }
        let op = if self.strict { "<" } else { "<=" };
        write!(f, "|a-e| {op} {:e} + {:e}*", self.abs, self.rel)?;
        if self.floor != 0.0 {
            write!(f, "max({rel_of}, {:e})", self.floor)
        } else {
            write!(f, "{rel_of}")
        }
    }
}

/// Whether `actual` is the same non-finite value as `expected` (both NaN, or
/// the same infinity).
fn same_non_finite(actual: f64, expected: f64) -> bool {
    if expected.is_nan() {
        actual.is_nan()
    } else {
        actual == expected
    }
}

/// The failing element that tops the report.
struct Worst {
    index: usize,
    actual: f64,
    expected: f64,
    err: f64,
    bound: f64,
    /// A NaN/inf mismatch (reported before any finite excess).
    non_finite: bool,
    /// `err − bound`, ranks finite failures.
    excess: f64,
}

/// Compares the slices; `Err((failed, worst))` when some element fails.
fn compare(actual: &[f64], expected: &[f64], tol: Tol) -> Result<(), (usize, Worst)> {
    let scale_max = match tol.scale {
        Scale::Element => 0.0,
        Scale::Max => expected
            .iter()
            .filter(|e| e.is_finite())
            .fold(0.0f64, |m, e| m.max(e.abs())),
    };
    let mut failed = 0usize;
    let mut worst: Option<Worst> = None;
    for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        let scale = match tol.scale {
            Scale::Element => e.abs(),
            Scale::Max => scale_max,
        };
        let bound = tol.bound(scale);
        let (ok, non_finite) = if tol.bits {
            (a.to_bits() == e.to_bits(), !e.is_finite() || !a.is_finite())
        } else if !e.is_finite() || !a.is_finite() {
            (same_non_finite(a, e), true)
        } else {
            (tol.within(err, bound), false)
        };
        if ok {
            continue;
        }
        failed += 1;
        let excess = if non_finite {
            f64::INFINITY
        } else {
            err - bound
        };
        let replace = match &worst {
            None => true,
            // The first non-finite mismatch stays on top; among finite ones, the
            // largest excess wins.
            Some(w) => !w.non_finite && (non_finite || excess > w.excess),
        };
        if replace {
            worst = Some(Worst {
                index,
                actual: a,
                expected: e,
                err,
                bound,
                non_finite,
                excess,
            });
        }
    }
    match worst {
        None => Ok(()),
        Some(w) => Err((failed, w)),
    }
}

fn report(what: &str, n: usize, tol: Tol, failed: usize, w: &Worst, at: &str) -> String {
    let kind = if w.non_finite {
        "non-finite mismatch"
    } else {
        "out of tolerance"
    };
    format!(
        "{what}: {failed} of {n} elements fail ({tol}); worst element {at}: actual {:e}, expected {:e}, error {:e}, bound {:e} ({kind})",
        w.actual, w.expected, w.err, w.bound
    )
}

/// Compares `actual` with `expected` element by element under `tol` (see the
/// crate docs for the rules); the error names `what` and the worst element.
pub fn check_close_slice(
    actual: &[f64],
    expected: &[f64],
    tol: Tol,
    what: &str,
) -> Result<(), String> {
    if actual.len() != expected.len() {
        return Err(format!(
            "{what}: length {} but expected length {}",
            actual.len(),
            expected.len()
        ));
    }
    compare(actual, expected, tol)
        .map_err(|(failed, w)| report(what, expected.len(), tol, failed, &w, &w.index.to_string()))
}

/// [`check_close_slice`], panicking with its message.
#[track_caller]
pub fn assert_close_slice(actual: &[f64], expected: &[f64], tol: Tol, what: &str) {
    if let Err(msg) = check_close_slice(actual, expected, tol, what) {
        panic!("{msg}");
    }
}

/// The elements of `t` (any dtype, any device), flattened, as f64.
pub fn to_f64_vec(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The multi-index of flat (row-major) index `i` in `dims`.
fn coords(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut c = vec![0; dims.len()];
    for (k, &d) in dims.iter().enumerate().rev() {
        if d > 0 {
            c[k] = i % d;
            i /= d;
        }
    }
    c
}

/// Compares two candle tensors of equal shape (any dtypes, converted to f64)
/// with the rules of [`check_close_slice`]; the error names `what`, the
/// shapes when they differ, and the worst element by flat and multi-index.
pub fn check_close(actual: &Tensor, expected: &Tensor, tol: Tol, what: &str) -> Result<(), String> {
    if actual.dims() != expected.dims() {
        return Err(format!(
            "{what}: shape {:?} but expected shape {:?}",
            actual.dims(),
            expected.dims()
        ));
    }
    let read = |t: &Tensor, which: &str| {
        to_f64_vec(t).map_err(|e| format!("{what}: cannot read the {which} tensor: {e}"))
    };
    let (a, e) = (read(actual, "actual")?, read(expected, "expected")?);
    compare(&a, &e, tol).map_err(|(failed, w)| {
        let at = format!("{} {:?}", w.index, coords(w.index, expected.dims()));
        report(what, e.len(), tol, failed, &w, &at)
    })
}

/// [`check_close`], panicking with its message.
#[track_caller]
pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: Tol, what: &str) {
    if let Err(msg) = check_close(actual, expected, tol, what) {
        panic!("{msg}");
    }
}

/// The norm-wise comparison: `|actual − expected|₂ ≤ rel · |expected|₂`,
/// for whole parameter vectors where single elements may move (the
/// data-parallel tests, whose summation order differs across ranks). Returns
/// the distance `|actual − expected|₂`.
///
/// It fails on a length mismatch and on any NaN or ±inf in either vector
/// (a norm of a non-finite vector says nothing), naming `what` and the first
/// non-finite index.
///
/// ```
/// use minibatch_testkit::check_rel_l2_slice;
/// assert!(check_rel_l2_slice(&[3.0, 4.0], &[3.0, 4.0 + 1e-6], 1e-6, "w").is_ok());
/// assert!(check_rel_l2_slice(&[3.0, 4.1], &[3.0, 4.0], 1e-6, "w").is_err());
/// ```
pub fn check_rel_l2_slice(
    actual: &[f64],
    expected: &[f64],
    rel: f64,
    what: &str,
) -> Result<f64, String> {
    if actual.len() != expected.len() {
        return Err(format!(
            "{what}: length {} but expected length {}",
            actual.len(),
            expected.len()
        ));
    }
    for (which, v) in [("actual", actual), ("expected", expected)] {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(format!(
                "{what}: {which} element {i} is {} (non-finite)",
                v[i]
            ));
        }
    }
    let dist = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e) * (a - e))
        .sum::<f64>()
        .sqrt();
    let norm = expected.iter().map(|e| e * e).sum::<f64>().sqrt();
    if dist <= rel * norm {
        Ok(dist)
    } else {
        Err(format!(
            "{what}: |actual - expected|₂ = {dist:e} > {rel:e} · |expected|₂ = {:e} (|expected|₂ = {norm:e}, {} elements)",
            rel * norm,
            expected.len()
        ))
    }
}

/// [`check_rel_l2_slice`], panicking with its message; returns the distance.
#[track_caller]
pub fn assert_rel_l2_slice(actual: &[f64], expected: &[f64], rel: f64, what: &str) -> f64 {
    check_rel_l2_slice(actual, expected, rel, what).unwrap_or_else(|msg| panic!("{msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const INF: f64 = f64::INFINITY;
    const NAN: f64 = f64::NAN;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn equal_and_near_values_pass() {
        assert_close_slice(&[1.0, -2.0, 0.0], &[1.0, -2.0, 0.0], Tol::exact(), "exact");
        assert_close_slice(&[1.0 + 1e-9], &[1.0], Tol::abs(1e-8), "abs");
        assert_close_slice(&[], &[], Tol::exact(), "empty vs empty");
    }

    #[test]
    fn infinities_pass_only_against_the_same_infinity() {
        assert_close_slice(&[INF, -INF], &[INF, -INF], Tol::exact(), "same infs");
        let err = check_close_slice(&[INF], &[-INF], Tol::abs(1e300), "v").unwrap_err();
        assert!(err.contains("non-finite"), "{err}");
        assert!(check_close_slice(&[-INF], &[INF], Tol::rel(1e300), "v").is_err());
        // inf where the reference is finite, and a finite value where it is inf.
        assert!(check_close_slice(&[INF], &[1.0], Tol::abs(1e300), "v").is_err());
        assert!(check_close_slice(&[1.0], &[INF], Tol::rel(1e300), "v").is_err());
        // inf - inf is NaN, which is never above any bound: must still fail.
        assert!(check_close_slice(&[1.0, INF], &[1.0, -INF], Tol::new(1.0, 1.0), "v").is_err());
    }

    #[test]
    fn nan_fails_unless_the_reference_is_nan() {
        assert!(check_close_slice(&[NAN], &[1.0], Tol::abs(1e300), "v").is_err());
        assert!(check_close_slice(&[1.0], &[NAN], Tol::abs(1e300), "v").is_err());
        assert!(check_close_slice(&[INF], &[NAN], Tol::abs(1e300), "v").is_err());
        assert!(check_close_slice(&[NAN], &[INF], Tol::abs(1e300), "v").is_err());
        assert_close_slice(&[NAN, 1.0], &[NAN, 1.0], Tol::exact(), "nan vs nan");
        // Under rel_to_max a NaN in the reference must not poison the scale.
        assert_close_slice(&[NAN, 1.0], &[NAN, 1.0], Tol::rel_to_max(0.0), "nan scale");
        assert!(check_close_slice(&[NAN, 2.0], &[NAN, 1.0], Tol::rel_to_max(0.5), "v").is_err());
    }

    #[test]
    fn lengths_must_match() {
        let err = check_close_slice(&[], &[1.0], Tol::abs(1.0), "grads").unwrap_err();
        assert!(err.contains("grads") && err.contains("length 0"), "{err}");
        assert!(check_close_slice(&[1.0, 2.0], &[1.0], Tol::abs(1.0), "v").is_err());
    }

    #[test]
    fn rel_l2_bounds_the_norm_and_fails_on_non_finite_and_length() {
        let d = assert_rel_l2_slice(&[3.0, 4.0], &[3.0, 4.0], 0.0, "same");
        assert_eq!(d, 0.0);
        // |(0, 1e-5)| = 1e-5 ≤ 1e-5 · 5 but not ≤ 1e-6 · 5.
        assert!(check_rel_l2_slice(&[3.0, 4.00001], &[3.0, 4.0], 1e-5, "w").is_ok());
        let err = check_rel_l2_slice(&[3.0, 4.00001], &[3.0, 4.0], 1e-6, "w").unwrap_err();
        assert!(err.starts_with("w: |actual - expected|"), "{err}");
        for bad in [NAN, INF, -INF] {
            let err = check_rel_l2_slice(&[1.0, bad], &[1.0, 1.0], 1e300, "w").unwrap_err();
            assert!(
                err.contains("actual element 1") && err.contains("non-finite"),
                "{err}"
            );
            assert!(check_rel_l2_slice(&[1.0, 1.0], &[bad, 1.0], 1e300, "w").is_err());
        }
        let err = check_rel_l2_slice(&[], &[1.0], 1e300, "w").unwrap_err();
        assert!(err.contains("length 0"), "{err}");
        assert!(check_rel_l2_slice(&[1.0, 2.0], &[1.0], 1e300, "w").is_err());
    }

    #[test]
    fn shapes_must_match() {
        let (a, e) = (t(&[1.0; 6], &[2, 3]), t(&[1.0; 6], &[3, 2]));
        let err = check_close(&a, &e, Tol::abs(1.0), "y").unwrap_err();
        assert!(
            err.contains("shape [2, 3]") && err.contains("[3, 2]"),
            "{err}"
        );
        assert!(check_close(&t(&[1.0; 6], &[6]), &a, Tol::abs(1.0), "flat").is_err());
        assert_close(&a, &a.clone(), Tol::exact(), "same");
    }

    #[test]
    fn tensors_of_any_float_dtype_compare_in_f64() {
        let e = t(&[1.0, 2.5, -3.0], &[3]);
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let a = e.to_dtype(dtype).unwrap();
            assert_close(&a, &e, Tol::exact(), "representable values");
        }
        let third = t(&[1.0 / 3.0], &[1]);
        let a = third.to_dtype(DType::F32).unwrap();
        assert!(check_close(&a, &third, Tol::exact(), "f32 rounding").is_err());
        assert_close(&a, &third, Tol::rel(1e-7), "f32 rounding");
        let inf = t(&[INF], &[1]).to_dtype(DType::F32).unwrap();
        assert!(check_close(&inf, &t(&[-INF], &[1]), Tol::abs(1.0), "v").is_err());
    }

    #[test]
    fn the_message_names_the_worst_element() {
        let a = t(&[1.0, 2.1, 3.0, 4.5], &[2, 2]);
        let e = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let err = check_close(&a, &e, Tol::abs(0.01), "dx").unwrap_err();
        assert!(err.starts_with("dx: 2 of 4 elements fail"), "{err}");
        assert!(err.contains("worst element 3 [1, 1]"), "{err}");
        assert!(
            err.contains("actual 4.5e0, expected 4e0, error 5e-1, bound 1e-2"),
            "{err}"
        );
        // A non-finite mismatch outranks any finite error.
        let err = check_close_slice(&[9.0, NAN], &[1.0, 1.0], Tol::abs(0.1), "v").unwrap_err();
        assert!(
            err.contains("worst element 1:") && err.contains("non-finite"),
            "{err}"
        );
    }

    #[test]
    fn the_rules_bound_what_they_say() {
        // rel: per element, relative to |e|.
        assert!(Tol::rel(0.1).accepts(10.5, 10.0));
        assert!(!Tol::rel(0.1).accepts(0.15, 0.1));
        // rel_to_max: relative to the largest |e|, so small elements get room.
        assert_close_slice(&[0.5, 10.0], &[0.0, 10.0], Tol::rel_to_max(0.1), "max");
        assert!(check_close_slice(&[0.5, 10.0], &[0.0, 10.0], Tol::rel(0.1), "el").is_err());
        assert!(check_close_slice(&[1.5, 10.0], &[0.0, 10.0], Tol::rel_to_max(0.1), "m").is_err());
        // new: abs + rel * |e|.
        assert!(Tol::new(1.0, 0.1).accepts(12.0, 10.0));
        assert!(!Tol::new(1.0, 0.1).accepts(12.01, 10.0));
        // floor: rel * max(|e|, floor).
        assert!(Tol::rel(1e-3).floor(1.0).accepts(1e-3, 0.0));
        assert!(!Tol::rel(1e-3).accepts(1e-3, 0.0));
        assert!(Tol::rel(1e-3).floor(1.0).accepts(1001.0, 1000.0));
        // strict: the bound itself is rejected.
        assert!(Tol::abs(0.5).accepts(1.5, 1.0));
        assert!(!Tol::abs(0.5).strict().accepts(1.5, 1.0));
        // exact: a difference of one ulp fails.
        assert!(!Tol::exact().accepts(1.0 + f64::EPSILON, 1.0));
        // bits: also tells the zeros apart, which exact does not.
        assert!(Tol::exact().accepts(-0.0, 0.0));
        assert!(!Tol::bits().accepts(-0.0, 0.0));
        assert!(Tol::bits().accepts(1.5, 1.5));
        assert!(Tol::bits().accepts(f64::NAN, f64::NAN));
        assert!(!Tol::bits().accepts(f64::INFINITY, f64::NEG_INFINITY));
        assert!(!Tol::bits().accepts(f64::NAN, 1.0));
    }

    #[test]
    #[should_panic(expected = "v: 1 of 1 elements fail")]
    fn assert_close_slice_panics() {
        assert_close_slice(&[2.0], &[1.0], Tol::abs(0.5), "v");
    }

    #[test]
    #[should_panic(expected = "v: shape [1] but expected shape [2]")]
    fn assert_close_panics() {
        assert_close(&t(&[1.0], &[1]), &t(&[1.0, 1.0], &[2]), Tol::abs(0.5), "v");
    }
}
