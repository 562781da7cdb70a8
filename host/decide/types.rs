//! Plain Rust mirrors of the WIT types in `wit/policy.wit`.
//!
//! They are lowered into / lifted from the component directly (no conversion per call) and are
//! also the trace format: one [`Step`] serialised as JSON per line (see [`super::trace`]).

use serde::{Deserialize, Serialize};
use wasmtime::component::{ComponentType, Lift, Lower};

/// Everything a policy sees for one speculation step (`step` in the WIT): one flat list per
/// feature ("structure of arrays"), so that lowering it into the guest is a handful of
/// allocations and copies whatever k is. Position i is entry i of each per-position list; its
/// top-K is `top_ids` / `top_probs` [i*K, (i+1)*K) with K = `top_k`. [`Step::position`] gives a
/// per-position view. Build one with [`Step::new`] and [`Step::push`]; [`Step::check`] is the
/// shape check the host applies before every call.
#[derive(Clone, Debug, Default, PartialEq, ComponentType, Lower, Lift, Serialize, Deserialize)]
#[component(record)]
pub struct Step {
    /// k entries: the drafted tokens x_i.
    pub tokens: Vec<u32>,
    /// k entries: q_i(x_i) (1.0 for deterministic drafters).
    #[component(name = "draft-probs")]
    pub draft_probs: Vec<f32>,
    /// k entries: p_i(x_i).
    #[component(name = "target-probs")]
    pub target_probs: Vec<f32>,
    /// k entries: H(p_i) in nats.
    pub entropies: Vec<f32>,
    /// k entries: a uniform draw in [0, 1) from the request's seeded generator.
    pub uniforms: Vec<f32>,
    /// k judge logits when the policy asked for them and the target has a head. (An option
    /// rather than an empty list: `none` costs the guest no allocation.)
    #[serde(default)]
    pub judge: Option<Vec<f32>>,
    /// K, the top entries per position (>= 1).
    #[component(name = "top-k")]
    pub top_k: u32,
    /// k * K token ids: position i's top-K at [i*K, (i+1)*K), most likely first.
    #[component(name = "top-ids")]
    pub top_ids: Vec<u32>,
    /// k * K probabilities, parallel to `top_ids`.
    #[component(name = "top-probs")]
    pub top_probs: Vec<f32>,
    /// Sampling temperature; 0 means greedy.
    pub temperature: f32,
    /// Vocabulary size: a `Correction::Token` must be below it.
    #[component(name = "vocab-size")]
    pub vocab_size: u32,
    /// One value per declared parameter, in `Info::params` order, with the request's overrides
    /// applied (from [`super::PolicyHandle::resolve_params`]).
    #[serde(default)]
    pub params: Vec<f64>,
}

/// One drafted position of a [`Step`], as a view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Position<'a> {
    pub token: u32,
    pub draft_prob: f32,
    pub target_prob: f32,
    pub entropy: f32,
    pub uniform: f32,
    pub judge: Option<f32>,
    /// The target's top-K ids, most likely first (K >= 1 in a checked step).
    pub top_ids: &'a [u32],
    /// Their probabilities.
    pub top_probs: &'a [f32],
}

impl Position<'_> {
    /// The target's most likely token and its probability.
    pub fn top1(&self) -> Option<(u32, f32)> {
        Some((*self.top_ids.first()?, *self.top_probs.first()?))
    }
}

/// A position's features, for [`Step::push`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Features {
    pub token: u32,
    pub draft_prob: f32,
    pub target_prob: f32,
    pub entropy: f32,
    pub uniform: f32,
    pub judge: Option<f32>,
}

impl Step {
    /// An empty step (no positions yet) whose positions will carry `top_k` entries (at least 1).
    pub fn new(top_k: usize, temperature: f32, vocab_size: u32, params: Vec<f64>) -> Step {
        Step {
            top_k: top_k.max(1) as u32,
            temperature,
            vocab_size,
            params,
            ..Step::default()
        }
    }

    /// The number of drafted positions.
    pub fn k(&self) -> usize {
        self.tokens.len()
    }

    /// Removes every position, keeping the buffers, `top_k`, temperature, vocabulary size and
    /// parameters (the engine reuses one step per request).
    pub fn clear_positions(&mut self) {
        self.tokens.clear();
        self.draft_probs.clear();
        self.target_probs.clear();
        self.entropies.clear();
        self.uniforms.clear();
        if let Some(j) = self.judge.as_mut() {
            j.clear();
        }
        self.top_ids.clear();
        self.top_probs.clear();
    }

    /// Appends a position. `top` should hold exactly `top_k` (id, p) entries, most likely first
    /// (a shorter or longer one makes the step fail [`Step::check`]). A judge logit is kept only
    /// when every position has one.
    pub fn push(&mut self, f: Features, top: &[(u32, f32)]) {
        let first = self.tokens.is_empty();
        self.tokens.push(f.token);
        self.draft_probs.push(f.draft_prob);
        self.target_probs.push(f.target_prob);
        self.entropies.push(f.entropy);
        self.uniforms.push(f.uniform);
        match (f.judge, self.judge.as_mut()) {
            (Some(j), Some(all)) if first || !all.is_empty() => all.push(j),
            (Some(j), None) if first => self.judge = Some(vec![j]),
            _ => self.judge = None,
        }
        self.top_ids.extend(top.iter().map(|&(id, _)| id));
        self.top_probs.extend(top.iter().map(|&(_, p)| p));
    }

    /// Position `i`'s view. Panics if `i >= k()` or the step fails [`Step::check_shape`].
    pub fn position(&self, i: usize) -> Position<'_> {
        let kk = self.top_k as usize;
        Position {
            token: self.tokens[i],
            draft_prob: self.draft_probs[i],
            target_prob: self.target_probs[i],
            entropy: self.entropies[i],
            uniform: self.uniforms[i],
            judge: self.judge.as_ref().and_then(|j| j.get(i).copied()),
            top_ids: &self.top_ids[i * kk..(i + 1) * kk],
            top_probs: &self.top_probs[i * kk..(i + 1) * kk],
        }
    }

    /// Every position's view, in order (the step must pass [`Step::check_shape`]).
    pub fn positions(&self) -> impl Iterator<Item = Position<'_>> {
        (0..self.k()).map(|i| self.position(i))
    }

    /// What the WIT promises a policy: [`Step::check_shape`] and finite parameters. Errors
    /// name the field.
    pub fn check(&self) -> Result<(), String> {
        self.check_shape()?;
        if let Some((i, v)) = self.params.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(format!("parameter #{i} is {v}"));
        }
        Ok(())
    }

    /// The positions' shape: k >= 1, every per-position list of length k, judge none or k,
    /// top-k >= 1, k * top-k top entries (what [`Step::position`] needs).
    pub fn check_shape(&self) -> Result<(), String> {
        let k = self.tokens.len();
        if k == 0 {
            return Err("the step has no drafted positions (`tokens` is empty)".into());
        }
        for (name, len) in [
            ("draft_probs", self.draft_probs.len()),
            ("target_probs", self.target_probs.len()),
            ("entropies", self.entropies.len()),
            ("uniforms", self.uniforms.len()),
        ] {
            if len != k {
                return Err(format!("`{name}` has {len} entries but k = {k}"));
            }
        }
        if let Some(j) = &self.judge
            && j.len() != k
        {
            return Err(format!(
                "`judge` has {} entries: it must be absent or k = {k}",
                j.len()
            ));
        }
        if self.top_k == 0 {
            return Err("`top_k` is 0: every position carries at least its top-1".into());
        }
        let want = k.saturating_mul(self.top_k as usize);
        for (name, len) in [
            ("top_ids", self.top_ids.len()),
            ("top_probs", self.top_probs.len()),
        ] {
            if len != want {
                return Err(format!(
                    "`{name}` has {len} entries but k * top_k = {k} * {} = {want}",
                    self.top_k
                ));
            }
        }
        Ok(())
    }
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
    /// The policy reads `Step::judge`: the engine computes judge logits only for these.
    #[component(name = "needs-judge")]
    pub needs_judge: bool,
    /// How many top target entries each position must carry (0 means the top-1 only).
    /// `Step::top_k` is max(1, this).
    #[component(name = "top-k")]
    pub top_k: u32,
    pub params: Vec<ParamSpec>,
}

impl Info {
    /// The number of top entries the engine must send per position (`Step::top_k`): max(1, top_k).
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
