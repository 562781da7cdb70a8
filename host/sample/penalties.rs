//! What a request changes in the target's logits before sampling: OpenAI's `logit_bias`,
//! `frequency_penalty` and `presence_penalty`, and vLLM's `repetition_penalty`.
//!
//! The adjusted logits *are* the target's distribution for that request: the greedy argmax,
//! the sampling distribution p, the features a policy sees and the residual norm(max(0, p - q))
//! are all computed from them, so strict speculation stays exactly lossless against plain
//! decoding with the same penalties. The draft proposes from its own, unadjusted distribution;
//! speculative sampling corrects for any q. A verified row sees the generated tokens plus the
//! drafted tokens before it, as plain decoding would have. Reported logprobs stay the model's
//! own (the raw logits, as vLLM reports them by default).

use std::collections::{HashMap, HashSet};

/// The largest |bias| OpenAI accepts; +-100 effectively forces or bans a token.
pub const MAX_LOGIT_BIAS: f32 = 100.0;
/// OpenAI's range for the frequency and presence penalties.
pub const MAX_PENALTY: f32 = 2.0;

/// A request's logit adjustments. Applied in this order, per position:
/// 1. `logit_bias`: `logit[t] += bias`;
/// 2. `repetition` (r): for each token in the prompt or the output so far, a positive logit is
///    divided by r, a negative one multiplied by r (r > 1 discourages repeats);
/// 3. `frequency` (f) and `presence` (s): `logit[t] -= c_t * f + (c_t > 0) * s`, where `c_t`
///    counts `t` in the output so far;
/// 4. `min_tokens` (vLLM's): until that many tokens are generated, the request's stop tokens
///    get -inf (they cannot end it early).
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    pub frequency: f32,
    pub presence: f32,
    /// 1 = off.
    pub repetition: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub min_tokens: usize,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties {
            frequency: 0.0,
            presence: 0.0,
            repetition: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
        }
    }
}

impl Penalties {
    /// Whether these change no logit with `stops` as the request's stop tokens.
    pub fn is_off(&self, stops: &[u32]) -> bool {
        self.frequency == 0.0
            && self.presence == 0.0
            && self.repetition == 1.0
            && self.logit_bias.iter().all(|&(_, b)| b == 0.0)
            && (self.min_tokens == 0 || stops.is_empty())
    }

    /// Checks the ranges; an error names the API field (`frequency_penalty`, ...) and says
    /// what is wrong.
    pub fn validate(&self, vocab: usize) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("frequency_penalty", self.frequency),
            ("presence_penalty", self.presence),
        ] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&v) {
                return Err((
                    field,
                    format!("{field} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {v}"),
                ));
            }
        }
        if !(self.repetition.is_finite() && self.repetition > 0.0) {
            return Err((
                "repetition_penalty",
                format!(
                    "repetition_penalty must be a finite number > 0 (1 = off), got {}",
                    self.repetition
                ),
            ));
        }
        for &(t, b) in &self.logit_bias {
            if t as usize >= vocab {
                return Err((
                    "logit_bias",
                    format!("logit_bias names token {t}, outside the vocabulary (size {vocab})"),
                ));
            }
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b) {
                return Err((
                    "logit_bias",
                    format!(
                        "logit_bias for token {t} must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {b}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A request's [`Penalties`] with the tokens they read: how often each token was generated,
/// and (only for a repetition penalty) the prompt's tokens.
#[derive(Debug, Clone)]
pub struct Penalizer {
    p: Penalties,
    counts: HashMap<u32, u32>,
    prompt: HashSet<u32>,
    /// Tokens generated so far.
    generated: usize,
    /// The stop tokens `min_tokens` holds back.
    stops: Vec<u32>,
}

impl Penalizer {
    /// `None` when the penalties change nothing (the request then skips this stage).
    /// `stops`: the request's stop tokens (what `min_tokens` holds back).
    pub fn new(p: Penalties, prompt: &[u32], stops: &[u32]) -> Option<Penalizer> {
        if p.is_off(stops) {
            return None;
        }
        let prompt = if p.repetition != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Some(Penalizer {
            p,
            counts: HashMap::new(),
            prompt,
            generated: 0,
            stops: stops.to_vec(),
        })
    }

    /// Records a generated (committed) token.
    pub fn push(&mut self, t: u32) {
        *self.counts.entry(t).or_default() += 1;
        self.generated += 1;
    }

    /// Adjusts `row`, the logits of the position after the generated tokens followed by
    /// `pending` (drafted tokens under verification, not committed). Token ids outside the row
    /// are ignored.
    pub fn apply(&self, row: &mut [f32], pending: &[u32]) {
        for &(t, b) in &self.p.logit_bias {
            if let Some(x) = row.get_mut(t as usize) {
                *x += b;
            }
        }
        // The output's counts with the pending tokens added (a verified row is few of them).
        let mut extra: Vec<(u32, u32)> = Vec::new();
        for &t in pending {
            match extra.iter_mut().find(|(u, _)| *u == t) {
                Some((_, c)) => *c += 1,
                None => extra.push((t, 1)),
            }
        }
        let count = |t: u32| {
            self.counts.get(&t).copied().unwrap_or(0)
                + extra.iter().find(|(u, _)| *u == t).map_or(0, |&(_, c)| c)
        };
        let mut adjust = |t: u32, c: u32| {
            let Some(x) = row.get_mut(t as usize) else {
                return;
            };
            let r = self.p.repetition;
            if r != 1.0 {
                *x = if *x > 0.0 { *x / r } else { *x * r };
            }
            if c > 0 {
                *x -= c as f32 * self.p.frequency + self.p.presence;
            }
        };
        // Each token once: the output's, the pending ones new to it, then (repetition only)
        // the prompt's not generated.
        for &t in self.counts.keys() {
            adjust(t, count(t));
        }
        for &(t, c) in &extra {
            if !self.counts.contains_key(&t) {
                adjust(t, c);
            }
        }
        for &t in &self.prompt {
            if count(t) == 0 {
                adjust(t, 0);
            }
        }
        if self.generated + pending.len() < self.p.min_tokens {
            for &t in &self.stops {
                if let Some(x) = row.get_mut(t as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn penalizer(p: Penalties, prompt: &[u32], out: &[u32]) -> Penalizer {
        let mut z = Penalizer::new(p, prompt, &[]).expect("penalties on");
        out.iter().for_each(|&t| z.push(t));
        z
    }

    #[test]
    fn frequency_and_presence_follow_the_counts_of_output_and_pending_tokens() {
        let p = Penalties {
            frequency: 0.5,
            presence: 0.25,
            ..Penalties::default()
        };
        // Token 1 generated twice, 2 once; the prompt does not count.
        let z = penalizer(p, &[3, 3], &[1, 2, 1]);
        let mut row = vec![1.0f32; 5];
        z.apply(&mut row, &[]);
        assert_eq!(row, [1.0, 1.0 - 1.0 - 0.25, 1.0 - 0.5 - 0.25, 1.0, 1.0]);
        // Pending (drafted) tokens count as generated ones.
        let mut row = vec![1.0f32; 5];
        z.apply(&mut row, &[2, 4, 4]);
        assert_eq!(row, [1.0, -0.25, 1.0 - 1.0 - 0.25, 1.0, 1.0 - 1.0 - 0.25]);
    }

    #[test]
    fn repetition_shrinks_logits_of_prompt_and_output_tokens_once() {
        let p = Penalties {
            repetition: 2.0,
            ..Penalties::default()
        };
        let z = penalizer(p, &[0, 1, 1], &[2, 2]);
        let mut row = vec![4.0f32, -4.0, 4.0, 4.0, -4.0];
        z.apply(&mut row, &[4]);
        assert_eq!(row, [2.0, -8.0, 2.0, 4.0, -8.0]);
    }

    #[test]
    fn min_tokens_hold_back_the_stop_tokens_counting_pending_ones() {
        let p = Penalties {
            min_tokens: 3,
            ..Penalties::default()
        };
        let mut z = Penalizer::new(p, &[], &[0, 4]).unwrap();
        z.push(1);
        let mut row = vec![1.0f32; 5];
        z.apply(&mut row, &[2]);
        assert_eq!(row, [f32::NEG_INFINITY, 1.0, 1.0, 1.0, f32::NEG_INFINITY]);
        // The third token's row may stop.
        let mut row = vec![1.0f32; 5];
        z.apply(&mut row, &[2, 3]);
        assert_eq!(row, [1.0; 5]);
    }

    #[test]
    fn bias_comes_first_and_ids_outside_the_row_are_ignored() {
        let p = Penalties {
            repetition: 2.0,
            logit_bias: vec![(1, 3.0), (9, 5.0)],
            ..Penalties::default()
        };
        let z = penalizer(p, &[], &[1]);
        let mut row = vec![1.0f32; 3];
        z.apply(&mut row, &[7]);
        assert_eq!(row, [1.0, 2.0, 1.0]);
    }

    #[test]
    fn off_is_none_and_ranges_are_checked_by_field() {
        assert!(Penalizer::new(Penalties::default(), &[1], &[2]).is_none());
        let zero_bias = Penalties {
            logit_bias: vec![(3, 0.0)],
            ..Penalties::default()
        };
        assert!(Penalizer::new(zero_bias, &[1], &[2]).is_none());
        // min_tokens with no stop token to hold back changes nothing.
        let min_only = Penalties {
            min_tokens: 3,
            ..Penalties::default()
        };
        assert!(Penalizer::new(min_only.clone(), &[1], &[]).is_none());
        assert!(Penalizer::new(min_only, &[1], &[2]).is_some());
        let bad = [
            (
                Penalties {
                    frequency: 2.5,
                    ..Penalties::default()
                },
                "frequency_penalty",
            ),
            (
                Penalties {
                    presence: f32::NAN,
                    ..Penalties::default()
                },
                "presence_penalty",
            ),
            (
                Penalties {
                    repetition: 0.0,
                    ..Penalties::default()
                },
                "repetition_penalty",
            ),
            (
                Penalties {
                    logit_bias: vec![(10, 1.0)],
                    ..Penalties::default()
                },
                "logit_bias",
            ),
            (
                Penalties {
                    logit_bias: vec![(1, -101.0)],
                    ..Penalties::default()
                },
                "logit_bias",
            ),
        ];
        for (p, field) in bad {
            let (f, msg) = p.validate(10).unwrap_err();
            assert_eq!(f, field, "{msg}");
            assert!(msg.contains(field), "{msg}");
        }
        Penalties {
            frequency: -2.0,
            presence: 2.0,
            repetition: 1.3,
            logit_bias: vec![(9, 100.0)],
            min_tokens: 4,
        }
        .validate(10)
        .unwrap();
    }
}
