//! Plain Rust mirrors of the WIT types in `wit/policy.wit`.
//!
//! They are lowered into / lifted from the component directly (no conversion per call) and are
//! also the trace format: one [`Step`] serialised as JSON per line (see [`super::trace`]).

use serde::{Deserialize, Serialize};
use wasmtime::component::{ComponentType, Lift, Lower};

/// One drafted position as the target saw it (`position` in the WIT).
#[derive(Clone, Debug, PartialEq, ComponentType, Lower, Lift, Serialize, Deserialize)]
#[component(record)]
pub struct Position {
    /// The drafted token x_i.
    pub token: u32,
    /// q_i(x_i): the drafter's probability of its own token (1.0 for deterministic drafters).
    #[component(name = "draft-prob")]
    pub draft_prob: f32,
    /// p_i(x_i): the target's probability of the drafted token.
    #[component(name = "target-prob")]
    pub target_prob: f32,
    /// The target's top-K (id, probability), most likely first; K = max(1, info.top_k).
    #[component(name = "target-top")]
    pub target_top: Vec<(u32, f32)>,
    /// Entropy H(p_i) in nats.
    pub entropy: f32,
    /// The judge head's logit, when the policy asked for it and the target has a head.
    #[serde(default)]
    pub judge: Option<f32>,
    /// A uniform draw in [0, 1) from the request's seeded generator.
    pub uniform: f32,
}

/// Everything a policy sees for one speculation step (`step` in the WIT).
#[derive(Clone, Debug, PartialEq, ComponentType, Lower, Lift, Serialize, Deserialize)]
#[component(record)]
pub struct Step {
    /// The k drafted positions, in order (k >= 1).
    pub positions: Vec<Position>,
    /// Sampling temperature; 0 means greedy.
    pub temperature: f32,
    /// Vocabulary size: a `Correction::Token` must be below it.
    #[component(name = "vocab-size")]
    pub vocab_size: u32,
    /// Every declared parameter with the request's overrides applied, in declaration order
    /// (from [`super::PolicyHandle::resolve_params`]). In JSON an object `{"name": value}`.
    #[serde(with = "params_as_object", default)]
    pub params: Vec<(String, f64)>,
}

/// How the host picks the token after the accepted prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ComponentType, Lower, Lift, Serialize, Deserialize)]
#[component(variant)]
#[serde(rename_all = "snake_case")]
pub enum Correction {
    /// Sample from norm(max(0, p - q)) (exact speculative sampling); argmax p at T = 0.
    #[component(name = "residual")]
    Residual,
    /// Sample from p.
    #[component(name = "sample")]
    Sample,
    /// Take argmax p.
    #[component(name = "argmax")]
    Argmax,
    /// Emit this token id.
    #[component(name = "token")]
    Token(u32),
}

/// A policy's answer for one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ComponentType, Lower, Lift, Serialize, Deserialize)]
#[component(record)]
pub struct Verdict {
    /// Drafted tokens accepted, 0..=k. At k the host appends a bonus token from the target's
    /// next distribution and ignores `correction`.
    pub accepted: u32,
    pub correction: Correction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ComponentType, Lower, Lift, Serialize, Deserialize)]
#[component(enum)]
#[repr(u8)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    #[component(name = "real")]
    Real,
    #[component(name = "integer")]
    Integer,
    #[component(name = "boolean")]
    Boolean,
}

/// A parameter a policy accepts; requests may override it within [min, max].
#[derive(Clone, Debug, PartialEq, ComponentType, Lower, Lift, Serialize, Deserialize)]
#[component(record)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    pub default: f64,
    pub min: f64,
    pub max: f64,
    pub description: String,
}

/// What a policy says about itself (called once, when the component is loaded).
#[derive(Clone, Debug, PartialEq, ComponentType, Lower, Lift, Serialize, Deserialize)]
#[component(record)]
pub struct Info {
    pub name: String,
    pub version: String,
    /// The policy reads `Position::judge`: the engine computes judge logits only for these.
    #[component(name = "needs-judge")]
    pub needs_judge: bool,
    /// How many top target entries each position must carry (0 means the top-1 only).
    #[component(name = "top-k")]
    pub top_k: u32,
    pub params: Vec<ParamSpec>,
}

impl Info {
    /// The number of `target_top` entries the engine must send per position: max(1, top_k).
    pub fn top_k_to_send(&self) -> usize {
        self.top_k.max(1) as usize
    }
}

/// Why a policy's own verdict was not used for a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The guest trapped (panic, unreachable, a call to an import it was not given, ...).
    Trap,
    /// The per-call fuel budget ran out (a loop that does not end).
    OutOfFuel,
    /// The per-call wall-clock (epoch) deadline passed.
    Timeout,
    /// The guest tried to grow its memory past the cap.
    Memory,
    /// A fresh instance could not be created (e.g. the instance pool is exhausted).
    Instantiate,
    /// The verdict was out of range (accepted > k, token >= vocab size).
    BadVerdict,
    /// The step itself was unusable (no positions, a NaN parameter); the host did not call the
    /// guest.
    BadStep,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Trap,
        FaultKind::OutOfFuel,
        FaultKind::Timeout,
        FaultKind::Memory,
        FaultKind::Instantiate,
        FaultKind::BadVerdict,
        FaultKind::BadStep,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Trap => "trap",
            FaultKind::OutOfFuel => "out_of_fuel",
            FaultKind::Timeout => "timeout",
            FaultKind::Memory => "memory",
            FaultKind::Instantiate => "instantiate",
            FaultKind::BadVerdict => "bad_verdict",
            FaultKind::BadStep => "bad_step",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fault: the step was decided by the strict fallback instead of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub detail: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// The result of one `verify`: always a usable verdict; `fault` says when it came from the
/// strict fallback rather than the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    pub fault: Option<Fault>,
}

/// `params` as a JSON object in declaration order (`{"eps": 0.09, "delta": 0.3}`).
mod params_as_object {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(params: &[(String, f64)], s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(params.len()))?;
        for (name, value) in params {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, f64)>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, f64)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of parameter name -> number")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, f64>()? {
                    out.push((k, v));
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}
