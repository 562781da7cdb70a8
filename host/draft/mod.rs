//! Stage 1, draft: propose k tokens that the target will verify in one forward.
//!
//! Three drafters behind one trait: a separate draft model sharing the target's tokenizer
//! ([`ModelDrafter`]), the target's own first layers (self-draft / layer skip: the same type over a
//! layer-limited session), and prompt lookup ([`PromptLookup`], n-gram copy, no model).
//! [`AutoDrafter`] picks among them per step.

mod auto;
mod model;
pub mod prompt_lookup;

use anyhow::{Result, bail};

use crate::sample::{Rng64, SamplingParams};
pub use auto::AutoDrafter;
pub use model::ModelDrafter;

/// A drafter's proposal for one step.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    /// The drafted tokens x_1..x_n (n <= k; may be empty when the drafter has nothing to offer).
    pub tokens: Vec<u32>,
    /// q_i(x_i) for each drafted token under the drafter's distribution (1 for deterministic
    /// drafters).
    pub q_token: Vec<f32>,
    /// The drafter's whole distribution q_i per drafted position, kept only when sampling
    /// (T > 0) needs it for the residual norm(max(0, p - q)). Empty means "one-hot on x_i".
    pub q_rows: Vec<Vec<f32>>,
}

/// Proposes continuations. One instance per request (it owns per-sequence state such as a KV
/// cache).
pub trait Drafter: Send {
    /// `model`, `prompt-lookup` or `self:N`.
    fn name(&self) -> String;

    /// Propose up to `k` tokens continuing `context` (prompt + everything emitted so far).
    /// Drafters that sample draw from `rng`, so a seeded request is reproducible.
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        rng: &mut Rng64,
    ) -> Result<Draft>;

    /// Reads the prompt before the first proposal, so that a draft model's prefill happens
    /// with the target's (in the request's prefill, not in its first decode step). Default:
    /// nothing to read.
    fn prefill(&mut self, _prompt: &[u32]) -> Result<()> {
        Ok(())
    }

    /// Whether the drafter picks k itself (up to the `k` it is given) instead of the engine's
    /// adaptive k.
    fn chooses_k(&self) -> bool {
        false
    }

    /// The outcome of the last proposal: `drafted` tokens verified, `accepted` of them kept, and
    /// what drafting and verifying took.
    fn observe(&mut self, _drafted: usize, _accepted: usize, _draft_s: f64, _verify_s: f64) {}

    /// Which drafter made the last proposal (for a drafter that delegates; `None`: itself).
    fn last_choice(&self) -> Option<String> {
        None
    }
}

/// Which drafter a request or the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrafterSpec {
    /// The server's loaded draft model (`--draft PATH` on the command line).
    Model,
    /// N-gram prompt lookup.
    PromptLookup,
    /// The target's first N layers.
    SelfDraft(usize),
    /// Per step, prompt lookup or the draft model, whichever is expected to be faster.
    Auto,
}

impl DrafterSpec {
    /// Parses `model`, `prompt-lookup` or `self:N`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "model" | "draft" => Ok(DrafterSpec::Model),
            "prompt-lookup" | "prompt_lookup" => Ok(DrafterSpec::PromptLookup),
            "auto" => Ok(DrafterSpec::Auto),
            _ => {
                if let Some(n) = s.strip_prefix("self:") {
                    match n.parse::<usize>() {
                        Ok(n) if n >= 1 => Ok(DrafterSpec::SelfDraft(n)),
                        _ => bail!("`{s}`: self:N needs a layer count N >= 1"),
                    }
                } else {
                    bail!("unknown drafter `{s}` (expected model, prompt-lookup, self:N or auto)")
                }
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            DrafterSpec::Model => "model".into(),
            DrafterSpec::PromptLookup => "prompt-lookup".into(),
            DrafterSpec::SelfDraft(n) => format!("self:{n}"),
            DrafterSpec::Auto => "auto".into(),
        }
    }
}

/// Prompt lookup as a [`Drafter`].
#[derive(Debug, Clone)]
pub struct PromptLookup {
    pub min_ngram: usize,
    pub max_ngram: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        PromptLookup {
            min_ngram: 1,
            max_ngram: 4,
        }
    }
}

impl Drafter for PromptLookup {
    fn name(&self) -> String {
        "prompt-lookup".into()
    }

    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        _sampling: &SamplingParams,
        _rng: &mut Rng64,
    ) -> Result<Draft> {
        let tokens = prompt_lookup::lookup(context, k, self.min_ngram, self.max_ngram);
        let q_token = vec![1.0; tokens.len()];
        Ok(Draft {
            tokens,
            q_token,
            q_rows: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DrafterSpec;

    #[test]
    fn parses_drafter_specs_and_names_bad_ones() {
        assert_eq!(DrafterSpec::parse("model").unwrap(), DrafterSpec::Model);
        assert_eq!(
            DrafterSpec::parse("prompt-lookup").unwrap(),
            DrafterSpec::PromptLookup
        );
        assert_eq!(
            DrafterSpec::parse("self:6").unwrap(),
            DrafterSpec::SelfDraft(6)
        );
        assert!(
            DrafterSpec::parse("self:0")
                .unwrap_err()
                .to_string()
                .contains("N >= 1")
        );
        assert!(
            DrafterSpec::parse("ngram")
                .unwrap_err()
                .to_string()
                .contains("unknown drafter `ngram`")
        );
    }
}
