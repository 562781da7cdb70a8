//! The SDK for verdict acceptance policies.
//!
//! A policy is a WebAssembly component (built with plain `cargo build --target wasm32-wasip2`)
//! that implements the world `acceptance-policy` of `wit/policy.wit`. With this crate an author
//! writes one trait impl and one macro call:
//!
//! ```ignore
//! use verdict_policy_sdk::*;
//!
//! struct Mine;
//! impl Policy for Mine {
//!     fn info() -> Info {
//!         info("mine", "0.1.0").top_k(4).param(real("bound", 2.0, 0.0, 20.0, "entropy bound")).build()
//!     }
//!     fn verify(step: Step) -> Verdict {
//!         let bound = param_or(&step, "bound", 2.0) as f32;
//!         let n = accept_prefix(&step, |_, pos| pos.entropy < bound);
//!         verdict(n, fallback_correction(&step))
//!     }
//! }
//! export_policy!(Mine);
//! ```
//!
//! The helpers below are the pieces every rule needs: a per-position view of the step, the
//! strict (lossless) acceptance test, the accepted-prefix count, parameter lookup and the usual
//! corrections. They are plain functions of the step, so they behave the same in every policy
//! and in tests.
//!
//! The step arrives as flat lists, one per feature (see `wit/policy.wit`: that layout is what
//! makes a call cheap). [`position`] / [`positions`] give position i back as a [`Position`]
//! view, and [`param`] finds a parameter's value by the name the policy declared in its `info`
//! (the step carries the values in declaration order; the SDK remembers the order).

/// The generated guest bindings of `wit/policy.wit` (exposed for the export macro).
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "acceptance-policy",
        pub_export_macro: true,
        export_macro_name: "__export_bindings",
        default_bindings_module: "$crate::bindings",
    });
}

pub use bindings::verdict::policy::types::{Correction, Info, ParamKind, ParamSpec, Step, Verdict};

/// What a policy author implements. `info` is called once when the host loads the component;
/// `verify` once per speculation step.
pub trait Policy {
    fn info() -> Info;
    fn verify(step: Step) -> Verdict;
}

/// Exports a type implementing [`Policy`] as the component's `info` and `verify`.
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        const _: () = {
            struct __VerdictPolicyExport;
            impl $crate::bindings::Guest for __VerdictPolicyExport {
                fn info() -> $crate::Info {
                    <$ty as $crate::Policy>::info()
                }
                fn verify(step: $crate::Step) -> $crate::Verdict {
                    $crate::__remember_param_names(<$ty as $crate::Policy>::info);
                    <$ty as $crate::Policy>::verify(step)
                }
            }
            $crate::bindings::__export_bindings!(
                __VerdictPolicyExport with_types_in $crate::bindings
            );
        };
    };
}

/// Starts an [`Info`] with no parameters, no judge and top-K 0 (the host always sends top-1).
pub fn info(name: &str, version: &str) -> InfoBuilder {
    InfoBuilder(Info {
        name: name.to_string(),
        version: version.to_string(),
        needs_judge: false,
        top_k: 0,
        params: Vec::new(),
    })
}

/// Builder returned by [`info`].
pub struct InfoBuilder(Info);

impl InfoBuilder {
    /// The policy reads the judge logits (`Position::judge`).
    pub fn needs_judge(mut self) -> Self {
        self.0.needs_judge = true;
        self
    }
    /// Every position must carry the target's top `k` entries.
    pub fn top_k(mut self, k: u32) -> Self {
        self.0.top_k = k;
        self
    }
    pub fn param(mut self, spec: ParamSpec) -> Self {
        self.0.params.push(spec);
        self
    }
    pub fn build(self) -> Info {
        self.0
    }
}

fn spec(
    name: &str,
    kind: ParamKind,
    default: f64,
    min: f64,
    max: f64,
    description: &str,
) -> ParamSpec {
    ParamSpec {
        name: name.to_string(),
        kind,
        default,
        min,
        max,
        description: description.to_string(),
    }
}

/// A real-valued parameter in [min, max].
pub fn real(name: &str, default: f64, min: f64, max: f64, description: &str) -> ParamSpec {
    spec(name, ParamKind::Real, default, min, max, description)
}

/// An integer parameter in [min, max] (the host rejects fractional overrides).
pub fn integer(name: &str, default: i64, min: i64, max: i64, description: &str) -> ParamSpec {
    spec(
        name,
        ParamKind::Integer,
        default as f64,
        min as f64,
        max as f64,
        description,
    )
}

/// A boolean parameter (0 or 1).
pub fn boolean(name: &str, default: bool, description: &str) -> ParamSpec {
    spec(
        name,
        ParamKind::Boolean,
        if default { 1.0 } else { 0.0 },
        0.0,
        1.0,
        description,
    )
}

/// The declared parameter names, in order, taken from the policy's own `info` the first time
/// `verify` runs in an instance.
static PARAM_NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

#[doc(hidden)]
pub fn __remember_param_names(info: fn() -> Info) {
    PARAM_NAMES.get_or_init(|| info().params.into_iter().map(|p| p.name).collect());
}

/// The value of the parameter declared (in `info`) as `name` (the host sends every declared
/// parameter; `None` for a name the policy did not declare).
pub fn param(step: &Step, name: &str) -> Option<f64> {
    let index = PARAM_NAMES.get()?.iter().position(|n| n == name)?;
    param_at(step, index)
}

/// [`param`] with a default for a name the policy did not declare.
pub fn param_or(step: &Step, name: &str, default: f64) -> f64 {
    param(step, name).unwrap_or(default)
}

/// The value of the `index`-th declared parameter (declaration order of `info`).
pub fn param_at(step: &Step, index: usize) -> Option<f64> {
    step.params.get(index).copied()
}

/// Greedy decoding (T = 0): acceptance compares against the target's argmax.
pub fn is_greedy(step: &Step) -> bool {
    step.temperature <= 0.0
}

/// One drafted position of a step (entry `index` of the step's per-position lists).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Position<'a> {
    pub index: usize,
    /// The drafted token x_i.
    pub token: u32,
    /// q_i(x_i): the drafter's probability of its own token.
    pub draft_prob: f32,
    /// p_i(x_i): the target's probability of the drafted token.
    pub target_prob: f32,
    /// H(p_i) in nats.
    pub entropy: f32,
    /// The host's uniform draw u_i in [0, 1).
    pub uniform: f32,
    /// The judge logit, when the policy declared `needs_judge` and the target has a head.
    pub judge: Option<f32>,
    /// The target's top-K token ids, most likely first (K = `step.top_k`, at least 1).
    pub top_ids: &'a [u32],
    /// Their probabilities, parallel to `top_ids`.
    pub top_probs: &'a [f32],
}

impl Position<'_> {
    /// The target's most likely token and its probability.
    pub fn top1(&self) -> Option<(u32, f32)> {
        Some((*self.top_ids.first()?, *self.top_probs.first()?))
    }

    /// The top-K as (id, probability) pairs, most likely first.
    pub fn top(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.top_ids
            .iter()
            .copied()
            .zip(self.top_probs.iter().copied())
    }
}

/// The number of drafted positions k.
pub fn k(step: &Step) -> usize {
    step.tokens.len()
}

/// Position `i`'s top-K entries (ids, probabilities): entries [i*K, (i+1)*K) of the step's
/// flat top lists. Empty slices if `i` is out of range.
pub fn top(step: &Step, i: usize) -> (&[u32], &[f32]) {
    let kk = step.top_k as usize;
    let range = i * kk..(i + 1) * kk;
    (
        step.top_ids.get(range.clone()).unwrap_or(&[]),
        step.top_probs.get(range).unwrap_or(&[]),
    )
}

/// Position `i` of the step. Panics (a trap: the host falls back to strict for the step) if
/// `i >= k(step)`.
pub fn position(step: &Step, i: usize) -> Position<'_> {
    let (top_ids, top_probs) = top(step, i);
    Position {
        index: i,
        token: step.tokens[i],
        draft_prob: step.draft_probs[i],
        target_prob: step.target_probs[i],
        entropy: step.entropies[i],
        uniform: step.uniforms[i],
        judge: step.judge.as_ref().and_then(|j| j.get(i).copied()),
        top_ids,
        top_probs,
    }
}

/// Every position of the step, in order.
pub fn positions(step: &Step) -> impl Iterator<Item = Position<'_>> {
    (0..k(step)).map(move |i| position(step, i))
}

/// The target's most likely token at this position (the host always sends top-1).
pub fn top1(pos: &Position) -> Option<(u32, f32)> {
    pos.top1()
}

/// Whether `pos.token` is among the first `k` entries of the target's top list.
pub fn in_top_k(pos: &Position, k: usize) -> bool {
    pos.top_ids.iter().take(k).any(|&id| id == pos.token)
}

/// min(1, p(x) / q(x)), the speculative-sampling acceptance probability. A token the drafter
/// gave probability 0 (or a deterministic drafter's q = 1) is handled without dividing by 0.
pub fn acceptance_probability(target_prob: f32, draft_prob: f32) -> f32 {
    if draft_prob.is_nan() || draft_prob <= 0.0 {
        return if target_prob > 0.0 { 1.0 } else { 0.0 };
    }
    (target_prob / draft_prob).min(1.0)
}

/// The strict (lossless) test for one position: at T = 0 the token must be the target's argmax;
/// at T > 0 accept when the host's uniform u < min(1, p(x) / q(x)).
pub fn strict_accepts(pos: &Position, temperature: f32) -> bool {
    if temperature <= 0.0 {
        top1(pos).is_some_and(|(id, _)| id == pos.token)
    } else {
        pos.uniform < acceptance_probability(pos.target_prob, pos.draft_prob)
    }
}

/// Number of leading positions for which `accept(index, position)` holds.
pub fn accept_prefix(step: &Step, mut accept: impl FnMut(usize, &Position) -> bool) -> u32 {
    positions(step)
        .take_while(|pos| accept(pos.index, pos))
        .count() as u32
}

/// The correction that keeps strict sampling exact: the residual norm(max(0, p - q)) at T > 0,
/// the argmax at T = 0.
pub fn residual_correction(step: &Step) -> Correction {
    if is_greedy(step) {
        Correction::Argmax
    } else {
        Correction::Residual
    }
}

/// The correction for lossy rules: sample from p at T > 0, the argmax at T = 0.
pub fn fallback_correction(step: &Step) -> Correction {
    if is_greedy(step) {
        Correction::Argmax
    } else {
        Correction::Sample
    }
}

/// The complete strict verdict (what the `strict` built-in returns).
pub fn strict_verdict(step: &Step) -> Verdict {
    let t = step.temperature;
    let n = accept_prefix(step, |_, pos| strict_accepts(pos, t));
    verdict(n, residual_correction(step))
}

pub fn verdict(accepted: u32, correction: Correction) -> Verdict {
    Verdict {
        accepted,
        correction,
    }
}

/// The logistic function, for judge logits.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
