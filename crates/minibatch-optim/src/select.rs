//! Training a subset of a model's parameters: pick a `VarMap`'s variables by
//! name (PyTorch's `requires_grad_(False)` on the rest).

use candle_core::Var;
use candle_nn::VarMap;

use crate::{varmap_vars, GenericOptimizer, OptimError, Result, UpdateRule};

/// The variables of `varmap` whose names match one of `patterns`, sorted by
/// name: the parameters to train, for an optimizer
/// ([`GenericOptimizer::named`], or [`GenericOptimizer::from_varmap_matching`]
/// in one call), clipping ([`vars_of`]) and the trainer. Everything else in
/// the `VarMap` is frozen: it still takes part in the forward pass, but no
/// optimizer updates it. (Tensors that are not `Var`s, such as a model loaded
/// with `VarBuilder::from_mmaped_safetensors`, are constants anyway.)
///
/// A pattern is either
/// * a **name prefix** at a `.` boundary: `encoder.layer.11` selects
///   `encoder.layer.11` itself and everything under `encoder.layer.11.`, but
///   not `encoder.layer.110.weight`; or
/// * a **glob** over the whole name when it contains `*` (any run of
///   characters, dots included) or `?` (one character):
///   `*.lora_?.weight`, `classifier.*`, `*bias`.
///
/// Errors, naming the problem: a pattern that matches no variable (a typo
/// would otherwise freeze the whole model silently), an empty pattern list,
/// or an empty selection ("nothing left to train").
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use minibatch_optim::{select, vars_of, Sgd, SgdConfig};
/// # fn main() -> minibatch_optim::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let _body = candle_nn::linear(4, 4, vb.pp("body"))?;
/// let _head = candle_nn::linear(4, 2, vb.pp("head"))?;
/// let trained = select(&varmap, &["head"])?;
/// let names: Vec<&str> = trained.iter().map(|(n, _)| n.as_str()).collect();
/// assert_eq!(names, ["head.bias", "head.weight"]);
/// let clip_these = vars_of(&trained); // for clip_grad_norm
/// let opt = Sgd::named(trained, SgdConfig { lr: 0.1, ..Default::default() })?;
/// # let _ = (clip_these, opt);
/// assert!(select(&varmap, &["haed"]).unwrap_err().to_string().contains("`haed` matches no parameter"));
/// # Ok(()) }
/// ```
pub fn select(varmap: &VarMap, patterns: &[&str]) -> Result<Vec<(String, Var)>> {
    if patterns.is_empty() {
        return Err(OptimError::InvalidSetup(
            "select: no pattern given, so nothing would be trained".into(),
        ));
    }
    let all = varmap_vars(varmap)?;
    check_each_matches(&all, patterns, "select")?;
    let chosen: Vec<(String, Var)> = all
        .into_iter()
        .filter(|(name, _)| patterns.iter().any(|p| matches(p, name)))
        .collect();
    Ok(chosen)
}

/// The variables of `varmap` that match **none** of `frozen`, sorted by
/// name: the complement of [`select`] (freeze a backbone, train the rest).
/// Patterns are [`select`]'s. Errors: a pattern matching nothing, or a
/// selection left empty ("nothing left to train").
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> minibatch_optim::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let _ = candle_nn::linear(4, 4, vb.pp("body"))?;
/// let _ = candle_nn::linear(4, 2, vb.pp("head"))?;
/// let trained = minibatch_optim::select_except(&varmap, &["body", "*.bias"])?;
/// assert_eq!(trained.len(), 1);
/// assert_eq!(trained[0].0, "head.weight");
/// let e = minibatch_optim::select_except(&varmap, &["*"]).unwrap_err();
/// assert!(e.to_string().contains("nothing left to train"));
/// # Ok(()) }
/// ```
pub fn select_except(varmap: &VarMap, frozen: &[&str]) -> Result<Vec<(String, Var)>> {
    let all = varmap_vars(varmap)?;
    if all.is_empty() {
        return Err(OptimError::InvalidSetup(
            "select_except: the VarMap holds no parameter, so there is nothing to train".into(),
        ));
    }
    check_each_matches(&all, frozen, "select_except")?;
    let chosen: Vec<(String, Var)> = all
        .into_iter()
        .filter(|(name, _)| !frozen.iter().any(|p| matches(p, name)))
        .collect();
    if chosen.is_empty() {
        return Err(OptimError::InvalidSetup(format!(
            "select_except: every parameter matches one of the frozen patterns {frozen:?}: \
             nothing left to train"
        )));
    }
    Ok(chosen)
}

/// The variables of a selection, for [`clip_grad_norm`](crate::clip_grad_norm)
/// and [`clip_grad_value`](crate::clip_grad_value) (which then clip, and
/// compute the norm over, the trained parameters only).
pub fn vars_of(params: &[(String, Var)]) -> Vec<Var> {
    params.iter().map(|(_, v)| v.clone()).collect()
}

/// Whether `name` matches `pattern` (see [`select`]): a glob over the whole
/// name when the pattern holds `*` or `?`, otherwise a prefix at a `.`
/// boundary (or the name itself).
///
/// ```
/// use minibatch_optim::name_matches;
/// assert!(name_matches("encoder.layer.1", "encoder.layer.1.attn.weight"));
/// assert!(!name_matches("encoder.layer.1", "encoder.layer.10.attn.weight"));
/// assert!(name_matches("encoder.layer.1*", "encoder.layer.10.attn.weight"));
/// assert!(name_matches("*.lora_?.weight", "q_proj.lora_A.weight"));
/// assert!(!name_matches("*.bias", "fc.weight"));
/// ```
pub fn name_matches(pattern: &str, name: &str) -> bool {
    matches(pattern, name)
}

fn matches(pattern: &str, name: &str) -> bool {
    if pattern.contains(['*', '?']) {
        glob(pattern.as_bytes(), name.as_bytes())
    } else if pattern.is_empty() {
        false
    } else {
        name == pattern
            || (name.starts_with(pattern)
                && (pattern.ends_with('.') || name.as_bytes()[pattern.len()] == b'.'))
    }
}

/// Iterative glob with `*` (any run) and `?` (one byte); linear backtracking
/// to the last star, so no pattern can take exponential time.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

fn check_each_matches(all: &[(String, Var)], patterns: &[&str], what: &str) -> Result<()> {
    for p in patterns {
        if !all.iter().any(|(name, _)| matches(p, name)) {
            let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
            let shown = if names.len() > 8 {
                format!("{}, ... ({} in all)", names[..8].join(", "), names.len())
            } else {
                names.join(", ")
            };
            return Err(OptimError::InvalidSetup(format!(
                "{what}: pattern `{p}` matches no parameter of the VarMap (which holds: {shown})"
            )));
        }
    }
    Ok(())
}

impl<R: UpdateRule> GenericOptimizer<R> {
    /// An optimizer over the variables of `varmap` that match `patterns`
    /// ([`select`]); the rest of the `VarMap` stays frozen. The same as
    /// `GenericOptimizer::named(select(varmap, patterns)?, config)`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use minibatch_optim::{AdamW, AdamWConfig, Optimizer};
    /// # fn main() -> minibatch_optim::Result<()> {
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let _ = candle_nn::linear(4, 4, vb.pp("backbone"))?;
    /// let _ = candle_nn::linear(4, 2, vb.pp("classifier"))?;
    /// let opt = AdamW::from_varmap_matching(&varmap, &["classifier"], AdamWConfig::default())?;
    /// assert_eq!(opt.param_groups()[0].names(), ["classifier.bias", "classifier.weight"]);
    /// # Ok(()) }
    /// ```
    pub fn from_varmap_matching(varmap: &VarMap, patterns: &[&str], config: R) -> Result<Self> {
        Self::named(select(varmap, patterns)?, config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, s, want) in [
            ("*", "", true),
            ("*", "a.b", true),
            ("a*", "a", true),
            ("a*b", "ab", true),
            ("a*b", "axxb", true),
            ("a*b", "axxbc", false),
            ("*.weight", "x.weight", true),
            ("*.weight", "weight", false),
            ("?", "", false),
            ("a?c", "abc", true),
            ("a**c", "abbc", true),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ] {
            assert_eq!(glob(p.as_bytes(), s.as_bytes()), want, "{p} vs {s}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(matches("fc", "fc"));
        assert!(matches("fc", "fc.weight"));
        assert!(!matches("fc", "fc2.weight"));
        assert!(matches("fc.", "fc.weight"));
        assert!(!matches("fc.", "fc"));
        assert!(!matches("", "fc"));
        assert!(!matches("fc.weight.x", "fc.weight"));
    }
}
