//! Stage 1, draft: propose k tokens that the target will verify in one forward.
//!
//! Three drafters behind one trait: a separate draft model sharing the target's tokenizer
//! ([`ModelDrafter`]), the target's own first layers (self-draft / layer skip: the same type over a
//! layer-limited session), and prompt lookup ([`PromptLookup`], n-gram copy, no model).
//! [`AutoDrafter`] picks among them per step; [`Predicted`] copies a request's predicted output
//! (OpenAI's `prediction`) and hands the steps off it to the request's own drafter.

mod auto;
mod model;
pub mod prediction;
pub mod prompt_lookup;

use anyhow::{Result, bail};

use crate::models::Session;
use crate::sample::{Rng64, SamplingParams};
pub use auto::AutoDrafter;
pub use model::ModelDrafter;
pub use prediction::Predicted;

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

impl Draft {
    /// Tokens proposed with certainty (q = 1 each, one-hot rows): prompt lookup's copies, or
    /// the text a request's grammar forces.
    pub fn certain(tokens: Vec<u32>) -> Draft {
        Draft {
            q_token: vec![1.0; tokens.len()],
            tokens,
            q_rows: Vec::new(),
        }
    }

    /// Keeps the first `n` drafted tokens.
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.q_token.truncate(n);
        self.q_rows.truncate(n);
    }
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

    /// Whether [`Drafter::take_sequence`] has a draft model's sequence to give.
    fn has_sequence(&self) -> bool {
        false
    }

    /// The draft model's sequence when the request ends, moved out: its session and the tokens
    /// in its cache, in order (the prompt cache keeps it for the next request with that
    /// prefix). Default: none (no model, or one that is not the server's draft model).
    fn take_sequence(&mut self) -> Option<(Session, Vec<u32>)> {
        None
    }

    /// A copy of the draft model's sequence as it stands (for the prompt cache while the
    /// request goes on). Default: none.
    fn copy_sequence(&self) -> Option<Result<(Session, Vec<u32>)>> {
        None
    }

    /// Starts the draft model from a cached sequence (`session` holds `tokens`) instead of an
    /// empty one: the prefill then feeds only what follows. Called before `prefill`. Default:
    /// dropped.
    fn resume(&mut self, _session: Session, _tokens: Vec<u32>) {}

    /// Whether the drafter picks k itself (up to the `k` it is given) instead of the engine's
    /// adaptive k.
    fn chooses_k(&self) -> bool {
        false
    }

    /// The outcome of the last proposal: `drafted` tokens verified, `accepted` of them kept, and
    /// what drafting and verifying took. `drafted` = 0: a plain step (no proposal, or k = 0)
    /// whose forward took `verify_s`.
    fn observe(&mut self, _drafted: usize, _accepted: usize, _draft_s: f64, _verify_s: f64) {}

    /// The request's grammar where its output is now, before each proposal of a request that
    /// has one. A drafter with a distribution drafts from it masked by the grammar; the others
    /// ignore it (the engine accepts no draft the grammar refuses).
    fn constrain(&mut self, _grammar: &crate::sample::Constraint) {}

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
    /// N-gram prompt lookup: the default rule, or (`prompt-lookup:N`) one that drafts only
    /// after a match of at least N tokens.
    PromptLookup(Option<usize>),
    /// The target's first N layers.
    SelfDraft(usize),
    /// Per step, prompt lookup or the draft model, whichever is expected to be faster.
    Auto,
}

impl DrafterSpec {
    /// Parses `model`, `prompt-lookup`, `prompt-lookup:N`, `self:N` or `auto`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "model" | "draft" => Ok(DrafterSpec::Model),
            "prompt-lookup" | "prompt_lookup" => Ok(DrafterSpec::PromptLookup(None)),
            "auto" => Ok(DrafterSpec::Auto),
            _ => {
                if let Some(n) = s.strip_prefix("prompt-lookup:") {
                    match n.parse::<usize>() {
                        Ok(n) if (1..=PromptLookup::MAX_NGRAM).contains(&n) => {
                            Ok(DrafterSpec::PromptLookup(Some(n)))
                        }
                        _ => bail!(
                            "`{s}`: prompt-lookup:N needs a match length N in 1..={}",
                            PromptLookup::MAX_NGRAM
                        ),
                    }
                } else if let Some(n) = s.strip_prefix("self:") {
                    match n.parse::<usize>() {
                        Ok(n) if n >= 1 => Ok(DrafterSpec::SelfDraft(n)),
                        _ => bail!("`{s}`: self:N needs a layer count N >= 1"),
                    }
                } else {
                    bail!(
                        "unknown drafter `{s}` (expected model, prompt-lookup, prompt-lookup:N, self:N or auto)"
                    )
                }
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            DrafterSpec::Model => "model".into(),
            DrafterSpec::PromptLookup(None) => "prompt-lookup".into(),
            DrafterSpec::PromptLookup(Some(n)) => format!("prompt-lookup:{n}"),
            DrafterSpec::SelfDraft(n) => format!("self:{n}"),
            DrafterSpec::Auto => "auto".into(),
        }
    }
}

/// Prompt lookup as a [`Drafter`].
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLookup {
    /// The shortest suffix that may match.
    pub min_ngram: usize,
    /// The longest suffix tried (longer matches are tried first).
    pub max_ngram: usize,
    /// When > 0, a match of n tokens drafts at most `per_match * n` tokens: a short match
    /// predicts a short copy, and every drafted token costs a verification row.
    pub per_match: usize,
}

impl Default for PromptLookup {
    /// At least a 2-token match: a single matching token drafts copies the target rarely keeps,
    /// and each drafted token costs a verification row. Measured (BENCHMARKS.md, session 10):
    /// `bench lookup` predicts 1.21x against 0.99x for 1-token matches on the code-editing
    /// prompts and 1.5-1.6x against 1.24x on HumanEval; `bench spec` measured 1.19-1.40x
    /// against 1.18-1.22x (adaptive k) on the editing prompts.
    fn default() -> Self {
        PromptLookup {
            min_ngram: 2,
            max_ngram: 4,
            per_match: 0,
        }
    }
}

impl PromptLookup {
    /// The longest match `prompt-lookup:N` may ask for.
    pub const MAX_NGRAM: usize = 16;

    /// `prompt-lookup:N`: the default rule, drafting only after a match of at least `n` tokens.
    pub fn with_min(n: usize) -> Self {
        let d = PromptLookup::default();
        PromptLookup {
            min_ngram: n,
            max_ngram: d.max_ngram.max(n),
            ..d
        }
    }

    /// The draft for `context`: at most `k` tokens.
    pub fn draft(&self, context: &[u32], k: usize) -> Vec<u32> {
        let (mut tokens, n) = prompt_lookup::lookup(context, k, self.min_ngram, self.max_ngram);
        if self.per_match > 0 {
            tokens.truncate(n * self.per_match);
        }
        tokens
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
        Ok(Draft::certain(self.draft(context, k)))
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
            DrafterSpec::PromptLookup(None)
        );
        assert_eq!(
            DrafterSpec::parse("self:6").unwrap(),
            DrafterSpec::SelfDraft(6)
        );
        assert_eq!(
            DrafterSpec::parse("prompt-lookup:3").unwrap(),
            DrafterSpec::PromptLookup(Some(3))
        );
        assert_eq!(DrafterSpec::PromptLookup(Some(3)).name(), "prompt-lookup:3");
        for bad in ["prompt-lookup:0", "prompt-lookup:17", "prompt-lookup:x"] {
            assert!(
                DrafterSpec::parse(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("match length N in 1..=16"),
                "{bad}"
            );
        }
        assert_eq!(super::PromptLookup::with_min(6).max_ngram, 6);
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
