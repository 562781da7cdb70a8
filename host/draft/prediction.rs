//! Predicted outputs (OpenAI's `prediction`): the client sends the text it expects most of the
//! answer to be (the file it asks to edit, say), and the drafts are copied from it. Where the
//! output follows the prediction, each step drafts the prediction's next tokens; where the
//! output leaves it (the edit), it first guesses that one token replaced another (a renamed
//! identifier, a changed number) and drafts a few tokens from right after it; failing that, the
//! request's own drafter proposes, if it has one, until the output's last tokens are found in
//! the prediction again (nearest to where the output would be in it had the edit kept the
//! prediction's length).
//!
//! The prediction is only a draft: the target verifies every token, so with `strict` the output
//! is what it would have been without one (at T = 0 the same tokens; at T > 0 the same
//! distribution, as a draft with q = 1 per token).

use anyhow::Result;

use super::{Draft, Drafter};
use crate::models::Session;
use crate::sample::{Rng64, SamplingParams};

/// The longest run of the output's last tokens looked for when the output comes back to the
/// prediction, and the shortest that counts (one token re-joins at too many wrong places).
const MAX_ANCHOR: usize = 8;
const MIN_ANCHOR: usize = 2;

/// The most tokens drafted on the guess that one token replaced another: a wrong guess costs
/// their verification.
const GUESS_K: usize = 4;

/// The name of the proposals copied from the prediction (in statistics and traces).
pub const NAME: &str = "prediction";

pub struct Predicted {
    prediction: Vec<u32>,
    /// Where the output starts in the contexts the engine proposes for.
    prompt_len: usize,
    /// The prediction's index of the output's next token while the output follows it.
    at: Option<usize>,
    /// Where the output left the prediction: the prediction's index and the output's length
    /// then.
    left: (usize, usize),
    /// The context length `at` was last brought up to.
    seen: usize,
    /// The request's own drafter, for where the output is off the prediction.
    inner: Option<Box<dyn Drafter>>,
    /// Whether the last proposal was copied from the prediction.
    last_copied: bool,
    /// `at` is a guess (one token replaced another) that no output token has confirmed yet.
    guessing: bool,
}

impl Predicted {
    /// A drafter over `prediction` for a request whose prompt is `prompt_len` tokens long.
    pub fn new(prediction: Vec<u32>, prompt_len: usize, inner: Option<Box<dyn Drafter>>) -> Self {
        Predicted {
            prediction,
            prompt_len,
            at: Some(0),
            left: (0, 0),
            seen: prompt_len,
            inner,
            last_copied: false,
            guessing: false,
        }
    }

    /// Follows the output to `context`'s end: on along the prediction while it agrees, else
    /// re-anchored where the output's last tokens are found in the prediction (the longest run
    /// of them that is), at the place nearest to where the output would be had the edit kept
    /// the prediction's length.
    fn follow(&mut self, context: &[u32]) {
        let start = self.prompt_len.min(context.len());
        if context.len() < self.seen {
            // The context went back (it never does in the engine): start over.
            self.at = None;
            self.seen = start;
        }
        let new = &context[self.seen..];
        self.seen = context.len();
        if let Some(p) = self.at {
            let ahead = &self.prediction[p.min(self.prediction.len())..];
            if ahead.starts_with(new) {
                self.guessing &= new.is_empty();
                self.at = Some(p + new.len());
                return;
            }
            // Where it parted: after the part of `new` the prediction agrees with.
            let common = ahead.iter().zip(new).take_while(|(a, b)| a == b).count();
            self.left = (p + common, context.len() - new.len() + common - start);
            self.at = None;
            let guess_failed = std::mem::take(&mut self.guessing) && common == 0;
            // The output's last token stands where the prediction has another: guess that it
            // replaced it, and go on right after (not again straight after a wrong guess).
            if !guess_failed && common + 1 == new.len() && p + common < self.prediction.len() {
                self.at = Some(p + common + 1);
                self.guessing = true;
                return;
            }
        }
        let output = &context[start..];
        let (left_at, left_out) = self.left;
        let expected = left_at + output.len().saturating_sub(left_out);
        let longest = MAX_ANCHOR.min(output.len()).min(self.prediction.len());
        for n in (MIN_ANCHOR..=longest).rev() {
            let tail = &output[output.len() - n..];
            let best = (0..=self.prediction.len() - n)
                .filter(|&i| &self.prediction[i..i + n] == tail)
                .min_by_key(|&i| (i + n).abs_diff(expected));
            if let Some(i) = best {
                self.at = Some(i + n);
                return;
            }
        }
    }
}

impl Drafter for Predicted {
    fn name(&self) -> String {
        match &self.inner {
            Some(d) => format!("{NAME}+{}", d.name()),
            None => NAME.into(),
        }
    }

    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        rng: &mut Rng64,
    ) -> Result<Draft> {
        self.follow(context);
        if let Some(p) = self.at.filter(|&p| p < self.prediction.len()) {
            self.last_copied = true;
            let k = if self.guessing { k.min(GUESS_K) } else { k };
            let end = (p + k).min(self.prediction.len());
            return Ok(Draft::certain(self.prediction[p..end].to_vec()));
        }
        self.last_copied = false;
        match &mut self.inner {
            Some(d) => d.propose(context, k, sampling, rng),
            None => Ok(Draft::default()),
        }
    }

    fn last_choice(&self) -> Option<String> {
        match (&self.inner, self.last_copied) {
            (_, true) => Some(NAME.into()),
            (Some(d), false) => Some(d.last_choice().unwrap_or_else(|| d.name())),
            (None, false) => None,
        }
    }

    // The request's own drafter learns from its own proposals (and the plain steps'
    // timings), not from the prediction's.
    fn observe(&mut self, drafted: usize, accepted: usize, draft_s: f64, verify_s: f64) {
        if let Some(d) = self
            .inner
            .as_mut()
            .filter(|_| drafted == 0 || !self.last_copied)
        {
            d.observe(drafted, accepted, draft_s, verify_s);
        }
    }

    fn constrain(&mut self, grammar: &crate::sample::Constraint) {
        if let Some(d) = &mut self.inner {
            d.constrain(grammar);
        }
    }

    fn take_sequence(&mut self) -> Option<(Session, Vec<u32>)> {
        self.inner.as_mut()?.take_sequence()
    }

    fn copy_sequence(&self) -> Option<Result<(Session, Vec<u32>)>> {
        self.inner.as_ref()?.copy_sequence()
    }

    fn resume(&mut self, session: Session, tokens: Vec<u32>) {
        if let Some(d) = &mut self.inner {
            d.resume(session, tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::draft::PromptLookup;

    fn propose(d: &mut Predicted, context: &[u32], k: usize) -> Vec<u32> {
        let mut rng = Rng64::new(1);
        d.propose(context, k, &SamplingParams::greedy(), &mut rng)
            .unwrap()
            .tokens
    }

    #[test]
    fn drafts_follow_the_prediction_and_come_back_after_an_edit() {
        let prompt = [100, 101];
        // Predicted: 1..=12; the output replaces 5 6 by 50 and goes on as predicted.
        let prediction: Vec<u32> = (1..=12).collect();
        let mut d = Predicted::new(prediction, prompt.len(), None);
        let mut ctx = prompt.to_vec();
        assert_eq!(propose(&mut d, &ctx, 3), [1, 2, 3]);
        assert_eq!(d.last_choice().as_deref(), Some(NAME));
        ctx.extend([1, 2, 3, 4]);
        assert_eq!(propose(&mut d, &ctx, 3), [5, 6, 7]);
        // The edit: 50 where 5 6 were. First guessed as 50 for 5 alone: on after 5.
        ctx.push(50);
        assert_eq!(
            propose(&mut d, &ctx, 8),
            [6, 7, 8, 9],
            "a guess drafts a few"
        );
        // It was not: no second guess; off the prediction, no drafter of its own: nothing.
        ctx.push(7);
        assert!(
            propose(&mut d, &ctx, 3).is_empty(),
            "one token does not re-anchor"
        );
        assert_eq!(d.last_choice(), None);
        ctx.push(8);
        // "7 8" is in the prediction, past where the output left it: on from there.
        assert_eq!(propose(&mut d, &ctx, 3), [9, 10, 11]);
        ctx.extend([9, 10, 11, 12]);
        // The prediction is used up.
        assert!(propose(&mut d, &ctx, 3).is_empty());
    }

    #[test]
    fn one_token_replaced_is_guessed_at_once() {
        let prediction: Vec<u32> = (1..=12).collect();
        let mut d = Predicted::new(prediction, 0, None);
        let mut ctx = vec![1, 2, 3];
        assert_eq!(propose(&mut d, &ctx, 8), [4, 5, 6, 7, 8, 9, 10, 11]);
        // 40 where 4 was: drafts go on from 5, a few at first...
        ctx.push(40);
        assert_eq!(propose(&mut d, &ctx, 8), [5, 6, 7, 8]);
        // ...and in full once the output confirms the guess.
        ctx.extend([5, 6]);
        assert_eq!(propose(&mut d, &ctx, 8), [7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn re_anchors_nearest_to_where_the_output_would_be() {
        // "1 2" occurs twice; leaving in the middle, the later one is nearer.
        let prediction = vec![1, 2, 3, 9, 9, 1, 2, 4, 5];
        let mut d = Predicted::new(prediction, 0, None);
        let mut ctx = vec![1, 2, 3, 9, 9, 7];
        // 7 for 1 is guessed first...
        assert_eq!(propose(&mut d, &ctx, 2), [2, 4]);
        // ...wrongly: 1 2 follow, found nearest to where the output would be.
        ctx.extend([1, 2]);
        assert_eq!(propose(&mut d, &ctx, 2), [4, 5]);
        // A match behind where the output left is taken too.
        let mut d = Predicted::new(vec![1, 2, 3, 4], 0, None);
        assert_eq!(propose(&mut d, &[1, 2, 3, 4, 8, 2, 3], 2), [4]);
    }

    #[test]
    fn off_the_prediction_the_requests_own_drafter_proposes() {
        let prediction = vec![1, 2, 3];
        let inner: Box<dyn Drafter> = Box::new(PromptLookup::default());
        let mut d = Predicted::new(prediction, 0, Some(inner));
        assert_eq!(d.name(), "prediction+prompt-lookup");
        // Off the prediction: prompt lookup copies what followed "5 6" earlier.
        let ctx = [7, 5, 6, 8, 8, 5, 6];
        assert_eq!(propose(&mut d, &ctx, 2), [8, 8]);
        assert_eq!(d.last_choice().as_deref(), Some("prompt-lookup"));
    }
}
