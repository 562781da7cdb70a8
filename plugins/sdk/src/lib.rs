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
//! The helpers below are the pieces every rule needs: the strict (lossless) acceptance test, the
//! accepted-prefix count, parameter lookup and the usual corrections. They are plain functions
//! of the step, so they behave the same in every policy and in tests.

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

pub use bindings::verdict::policy::types::{
    Correction, Info, ParamKind, ParamSpec, Position, Step, Verdict,
};

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
    /// The policy reads `Position::judge`.
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

/// The value of parameter `name` in this step (the host sends every declared parameter).
pub fn param(step: &Step, name: &str) -> Option<f64> {
    step.params.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

/// [`param`] with a default for a parameter the host did not send.
pub fn param_or(step: &Step, name: &str, default: f64) -> f64 {
    param(step, name).unwrap_or(default)
}

/// Greedy decoding (T = 0): acceptance compares against the target's argmax.
pub fn is_greedy(step: &Step) -> bool {
    step.temperature <= 0.0
}

/// The target's most likely token at this position (the host always sends top-1).
pub fn top1(pos: &Position) -> Option<(u32, f32)> {
    pos.target_top.first().copied()
}

/// Whether `pos.token` is among the first `k` entries of the target's top list.
pub fn in_top_k(pos: &Position, k: usize) -> bool {
    pos.target_top
        .iter()
        .take(k)
        .any(|&(id, _)| id == pos.token)
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
    step.positions
        .iter()
        .enumerate()
        .take_while(|(i, pos)| accept(*i, pos))
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
