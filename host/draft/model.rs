//! Drafting with a model: a separate small model, or the target's first N layers (self-draft).
//! Both are a [`Session`] with its own KV cache that follows the sequence: before drafting, the
//! cache is rolled back to the longest prefix it shares with the context, then fed the rest.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::{Draft, Drafter};
use crate::engine::prefix::common_prefix;
use crate::models::transformer::KeptVocab;
use crate::models::{Rows, Session};
use crate::sample::{self, Constraint, Rng64, SamplingParams};
use crate::verify::{self, StepDevice};

pub struct ModelDrafter {
    name: String,
    session: Session,
    /// Whether the prompt cache may keep this drafter's sequence (the server's draft model; a
    /// self-draft's layer-limited session is not kept).
    cacheable: bool,
    /// The tokens whose keys/values are in `session`'s cache, in order.
    cached: Vec<u32>,
    /// Greedy drafts on a GPU: the argmax and q(x) computed where the logits are, so that only
    /// two numbers per drafted token come back (`None`: the row is copied to the host).
    on_device: Option<StepDevice>,
    /// The request's grammar where its output is ([`Drafter::constrain`]): drafts come from q
    /// masked by it, so the grammar refuses none of them.
    grammar: Option<Constraint>,
    /// A draft model with a cut vocabulary scores the ids this request has used, too.
    extra: Option<ExtraVocab>,
}

/// The ids of a request's context (prompt and output) that its draft model's cut head leaves
/// out ([`crate::models::Model::with_draft_vocab`]), scored from the whole head's rows: a
/// prompt's identifiers are the rare tokens its answer most likely repeats (on HumanEval, 56%
/// of the answers' tokens cut at 32k ids are in the prompt or earlier in the answer).
struct ExtraVocab {
    kept: Arc<KeptVocab>,
    ids: Vec<u32>,
    known: HashSet<u32>,
    /// `[ids.len() * hidden]`: their rows of the whole head.
    rows: Vec<f32>,
    /// How much of the context has been looked at.
    seen: usize,
}

/// A request adds back at most this many ids (each costs a dot product per drafted token).
const MAX_EXTRA: usize = 4096;

impl ExtraVocab {
    /// Adds the ids of `context[self.seen..]` that the cut head leaves out.
    fn admit(&mut self, context: &[u32]) -> Result<()> {
        if self.seen > context.len() {
            // The context was rolled back and rewritten: what it held stays admitted.
            self.seen = context.len();
        }
        let new: Vec<u32> = context[self.seen..]
            .iter()
            .copied()
            .filter(|&t| !self.kept.keeps(t))
            .filter(|t| self.known.len() < MAX_EXTRA && self.known.insert(*t))
            .collect();
        self.seen = context.len();
        if !new.is_empty() {
            self.rows.extend(self.kept.rows(&new)?);
            self.ids.extend(new);
        }
        Ok(())
    }

    /// Scores the added ids on the hidden state `h` into `logits` (one row).
    fn score(&self, h: &[f32], logits: &mut [f32]) {
        for (&id, w) in self.ids.iter().zip(self.rows.chunks_exact(h.len())) {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = w.iter().zip(h).map(|(a, b)| a * b).sum();
            }
        }
    }
}

impl ModelDrafter {
    pub fn new(name: impl Into<String>, session: Session) -> Self {
        let extra = session.kept_vocab().map(|kept| ExtraVocab {
            kept,
            ids: Vec::new(),
            known: HashSet::new(),
            rows: Vec::new(),
            seen: 0,
        });
        ModelDrafter {
            name: name.into(),
            session,
            cacheable: false,
            cached: Vec::new(),
            on_device: None,
            grammar: None,
            extra,
        }
    }

    /// Offers this drafter's sequence to the prompt cache ([`Drafter::take_sequence`]).
    pub fn cacheable(mut self) -> Self {
        self.cacheable = true;
        self
    }

    /// Greedy drafting scores each row with these step kernels (when they serve this device).
    pub fn on_device(mut self, device: &StepDevice) -> Self {
        if device.serves(&SamplingParams::greedy(), false) {
            self.on_device = Some(device.clone());
        }
        self
    }

    /// How many context tokens the draft's KV cache holds.
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    /// Rolls the cache back to the longest prefix it shares with `context`, at most `cap`
    /// tokens; returns that length.
    fn rewind(&mut self, context: &[u32], cap: usize) -> Result<usize> {
        let mut common = common_prefix(&self.cached, context).min(cap);
        // Sliding-window layers keep only so much: from further back, start over.
        if !self.session.can_resume_at(common) {
            common = 0;
        }
        self.session.truncate(common)?;
        self.cached.truncate(common);
        Ok(common)
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<candle_core::Tensor> {
        let out = self.session.forward(tokens, Rows::Last)?;
        self.cached.extend_from_slice(tokens);
        match &self.extra {
            Some(e) if !e.ids.is_empty() => {
                let mut row = out.logits.flatten_all()?.to_vec1::<f32>()?;
                e.score(&out.hidden.flatten_all()?.to_vec1::<f32>()?, &mut row);
                let n = row.len();
                Ok(candle_core::Tensor::from_vec(
                    row,
                    (1, n),
                    out.logits.device(),
                )?)
            }
            _ => Ok(out.logits),
        }
    }

    /// Lets the cut head score the ids of `context` it leaves out.
    fn admit(&mut self, context: &[u32]) -> Result<()> {
        match self.extra.as_mut() {
            Some(e) => e
                .admit(context)
                .with_context(|| format!("drafter {}: the vocabulary's added rows", self.name)),
            None => Ok(()),
        }
    }

    /// The greedy draft token of a `[1, V]` logit row and its q(x) (softmax at T = 1), computed
    /// where the row is.
    fn greedy(&self, logits: &candle_core::Tensor) -> Result<(u32, f32)> {
        let v = verify::score_row(
            logits,
            &SamplingParams::greedy(),
            None,
            self.on_device.as_ref(),
        )?;
        let x = v.argmax(0)?;
        Ok((x, v.logprob(0, x, 0)?.0.exp() as f32))
    }
}

impl Drafter for ModelDrafter {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn constrain(&mut self, grammar: &Constraint) {
        self.grammar = Some(grammar.clone());
    }

    fn prefill(&mut self, prompt: &[u32]) -> Result<()> {
        // Leave room for one fed token, as `propose` needs; a prompt that fills the draft's
        // context is left to `propose`, which then drafts nothing. A resumed cache keeps what
        // it shares with the prompt.
        if prompt.len() >= self.session.max_len() {
            return Ok(());
        }
        self.admit(prompt)?;
        let common = self.rewind(prompt, prompt.len())?;
        if common < prompt.len() {
            self.feed(&prompt[common..])
                .with_context(|| format!("drafter {} failed", self.name))?;
        }
        Ok(())
    }

    fn has_sequence(&self) -> bool {
        self.cacheable
    }

    fn take_sequence(&mut self) -> Option<(Session, Vec<u32>)> {
        self.cacheable
            .then(|| (self.session.take(), std::mem::take(&mut self.cached)))
    }

    fn copy_sequence(&self) -> Option<Result<(Session, Vec<u32>)>> {
        self.cacheable.then(|| {
            let n = self.cached.len();
            Ok((self.session.copy_prefix(n)?, self.cached.clone()))
        })
    }

    fn resume(&mut self, session: Session, tokens: Vec<u32>) {
        if self.cacheable && session.len() == tokens.len() {
            self.session = session;
            self.cached = tokens;
        }
    }

    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        rng: &mut Rng64,
    ) -> Result<Draft> {
        let mut draft = Draft::default();
        if k == 0 || context.is_empty() {
            return Ok(draft);
        }
        self.admit(context)?;
        // Keep the shared prefix, but always feed at least one token to get logits.
        let common = self.rewind(context, context.len() - 1)?;
        // Leave room in the draft's context; a draft that cannot continue just proposes less.
        let room = self.session.max_len().saturating_sub(context.len());
        let k = k.min(room);
        if k == 0 {
            return Ok(draft);
        }
        let mut logits = self
            .feed(&context[common..])
            .with_context(|| format!("drafter {} failed", self.name))?;
        for i in 0..k {
            let (x, qx) = if sampling.is_greedy() && self.grammar.is_none() {
                // Greedy drafting proposes the argmax; q(x) is still the model's own softmax so
                // that lossy policies see a meaningful draft confidence.
                self.greedy(&logits)?
            } else {
                let mut rows = vec![logits.squeeze(0)?.to_vec1::<f32>()?];
                if let Some(g) = self.grammar.as_mut() {
                    // q masked by the grammar: the distribution the token is drawn from, as
                    // speculative sampling needs.
                    g.mask_rows(&mut rows, &[])?;
                }
                let row = &rows[0];
                if sampling.is_greedy() {
                    let x = sample::argmax(row);
                    let q = sample::probabilities(row, &verify::feature_params(sampling));
                    (x, q[x as usize])
                } else {
                    let q = sample::probabilities(row, sampling);
                    let x = sample::sample(&q, rng.uniform());
                    let qx = q[x as usize];
                    draft.q_rows.push(q);
                    (x, qx)
                }
            };
            draft.tokens.push(x);
            draft.q_token.push(qx);
            if let Some(g) = self.grammar.as_mut() {
                if g.ends(x) {
                    break;
                }
                g.push(x)?;
            }
            if i + 1 < k {
                logits = self.feed(&[x])?;
            }
        }
        Ok(draft)
    }
}
