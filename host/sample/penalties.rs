//! What a request changes in the target's logits before sampling: OpenAI's `logit_bias`,
//! `frequency_penalty` and `presence_penalty`, and vLLM's `repetition_penalty`, `min_tokens`,
//! `allowed_token_ids` and `bad_words`.
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
///    get -inf (they cannot end it early);
/// 5. `bad_words` (vLLM's): a word's last token gets -inf where the output so far ends with the
///    word's other tokens (a one-token word: everywhere);
/// 6. `allowed` (vLLM's `allowed_token_ids`): every other token gets -inf.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    pub frequency: f32,
    pub presence: f32,
    /// 1 = off.
    pub repetition: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub min_tokens: usize,
    /// The only tokens the output may hold; empty: any.
    pub allowed: Vec<u32>,
    /// Token sequences the output must not hold ([`bad_words_ids`] makes them from words).
    pub bad_words: Vec<Vec<u32>>,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties {
            frequency: 0.0,
            presence: 0.0,
            repetition: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            allowed: Vec::new(),
            bad_words: Vec::new(),
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
            && self.allowed.is_empty()
            && self.bad_words.is_empty()
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
        if let Some(&t) = self.allowed.iter().find(|&&t| t as usize >= vocab) {
            return Err((
                "allowed_token_ids",
                format!("allowed_token_ids names token {t}, outside the vocabulary (size {vocab})"),
            ));
        }
        for (i, w) in self.bad_words.iter().enumerate() {
            if w.is_empty() {
                return Err(("bad_words", format!("bad_words[{i}] has no tokens")));
            }
            if let Some(&t) = w.iter().find(|&&t| t as usize >= vocab) {
                return Err((
                    "bad_words",
                    format!(
                        "bad_words[{i}] holds token {t}, outside the vocabulary (size {vocab})"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The token sequences `bad_words` bans, as vLLM makes them: each word (leading spaces
/// trimmed) as tokenized at the start of a text, and with a space before it where that is a
/// different token sequence of the same length (the word in the middle of a text). Each is
/// banned only in that tokenization, as in vLLM. An error gives the index of the word at fault
/// (one without tokens) and says why.
pub fn bad_words_ids(
    words: &[String],
    mut encode: impl FnMut(&str) -> anyhow::Result<Vec<u32>>,
) -> Result<Vec<Vec<u32>>, (usize, String)> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let bare = w.trim_start();
        let fail = |e: anyhow::Error| (i, format!("cannot tokenize bad_words[{i}]: {e:#}"));
        let ids = encode(bare).map_err(fail)?;
        if ids.is_empty() {
            return Err((i, format!("bad_words[{i}] ({w:?}) has no tokens")));
        }
        let spaced = encode(&format!(" {bare}")).map_err(fail)?;
        let new_word = spaced.len() == ids.len() && spaced.first() != ids.first();
        out.push(ids);
        if new_word && !out.contains(&spaced) {
            out.push(spaced);
        }
    }
    Ok(out)
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
    /// The last generated tokens, as many as the longest bad word's prefix.
    recent: Vec<u32>,
    recent_cap: usize,
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
        let recent_cap = p.bad_words.iter().map(|w| w.len() - 1).max().unwrap_or(0);
        Some(Penalizer {
            p,
            counts: HashMap::new(),
            prompt,
            generated: 0,
            stops: stops.to_vec(),
            recent: Vec::new(),
            recent_cap,
        })
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Records a generated (committed) token.
    pub fn push(&mut self, t: u32) {
        *self.counts.entry(t).or_default() += 1;
        self.generated += 1;
        if self.recent_cap > 0 {
            if self.recent.len() == self.recent_cap {
                self.recent.remove(0);
            }
            self.recent.push(t);
        }
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
        for w in &self.p.bad_words {
            let (last, before) = w.split_last().expect("validated: no empty word");
            if ends_with(&self.recent, pending, before)
                && let Some(x) = row.get_mut(*last as usize)
            {
                *x = f32::NEG_INFINITY;
            }
        }
        if !self.p.allowed.is_empty() {
            let kept: Vec<Option<f32>> = self
                .p
                .allowed
                .iter()
                .map(|&t| row.get(t as usize).copied())
                .collect();
            row.fill(f32::NEG_INFINITY);
            for (&t, x) in self.p.allowed.iter().zip(kept) {
                if let Some(x) = x {
                    row[t as usize] = x;
                }
            }
        }
    }
}

/// Whether `recent` followed by `pending` ends with `tail`.
fn ends_with(recent: &[u32], pending: &[u32], tail: &[u32]) -> bool {
    if tail.len() > recent.len() + pending.len() {
        return false;
    }
    let from_pending = tail.len().min(pending.len());
    let (head, own) = tail.split_at(tail.len() - from_pending);
    pending.ends_with(own) && recent.ends_with(head)
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
    fn a_bad_word_bars_its_last_token_after_its_others_across_output_and_pending() {
        let p = Penalties {
            bad_words: vec![vec![4], vec![1, 2, 3]],
            ..Penalties::default()
        };
        let barred = |out: &[u32], pending: &[u32]| {
            let z = penalizer(p.clone(), &[], out);
            let mut row = vec![0.0f32; 6];
            z.apply(&mut row, pending);
            (0..6u32)
                .filter(|&t| row[t as usize] == f32::NEG_INFINITY)
                .collect::<Vec<_>>()
        };
        // The one-token word everywhere; the three-token one after "1 2", wherever those are.
        assert_eq!(barred(&[], &[]), [4]);
        assert_eq!(barred(&[5, 1, 2], &[]), [3, 4]);
        assert_eq!(barred(&[5, 1], &[2]), [3, 4]);
        assert_eq!(barred(&[], &[1, 2]), [3, 4]);
        assert_eq!(barred(&[1, 2], &[5]), [4]);
        assert_eq!(barred(&[2, 1], &[]), [4]);
        // The output kept is only as long as the longest word's prefix.
        let mut z = penalizer(p.clone(), &[], &[1, 2, 9, 9, 9, 1]);
        assert_eq!(z.recent, [9, 1]);
        z.push(2);
        let mut row = vec![0.0f32; 6];
        z.apply(&mut row, &[]);
        assert_eq!(row[3], f32::NEG_INFINITY);
    }

    #[test]
    fn allowed_tokens_keep_their_adjusted_logits_and_bar_the_rest() {
        let p = Penalties {
            allowed: vec![1, 3, 40],
            logit_bias: vec![(3, 2.0), (2, 5.0)],
            ..Penalties::default()
        };
        let z = penalizer(p, &[], &[]);
        let mut row = vec![1.0f32; 5];
        z.apply(&mut row, &[]);
        let inf = f32::NEG_INFINITY;
        assert_eq!(row, [inf, 1.0, inf, 3.0, inf]);
    }

    #[test]
    fn bad_words_are_tokenized_bare_and_after_a_space_as_vllm_does() {
        // A toy tokenizer: a leading space joins the word into one token (id 100 + len),
        // otherwise each character is its own token.
        let encode = |w: &str| -> anyhow::Result<Vec<u32>> {
            Ok(match w.strip_prefix(' ') {
                Some(rest) if rest.len() == 2 => vec![100 + rest.len() as u32],
                Some(rest) => std::iter::once(32)
                    .chain(rest.bytes().map(u32::from))
                    .collect(),
                None => w.bytes().map(u32::from).collect(),
            })
        };
        let words = ["  ab".to_string(), "x".to_string()];
        // "ab" bare: [97, 98]; " ab": [102], a different length, so not added; "x": [120],
        // " x": [32, 120], longer, not added either.
        assert_eq!(
            bad_words_ids(&words, encode).unwrap(),
            vec![vec![97, 98], vec![120]]
        );
        // A tokenizer where the spaced word is a different sequence of the same length.
        let same_len = |w: &str| -> anyhow::Result<Vec<u32>> {
            Ok(match w.strip_prefix(' ') {
                Some(rest) => rest.bytes().map(|b| u32::from(b) + 1000).collect(),
                None => w.bytes().map(u32::from).collect(),
            })
        };
        assert_eq!(
            bad_words_ids(&["hi".to_string()], same_len).unwrap(),
            vec![vec![104, 105], vec![1104, 1105]]
        );
        let none = |_: &str| -> anyhow::Result<Vec<u32>> { Ok(vec![]) };
        let (i, e) = bad_words_ids(&["a".into(), "zz".into()], none).unwrap_err();
        assert_eq!(i, 0);
        assert!(e.contains("bad_words[0]"), "{e}");
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
        for masks in [
            Penalties {
                allowed: vec![1],
                ..Penalties::default()
            },
            Penalties {
                bad_words: vec![vec![1]],
                ..Penalties::default()
            },
        ] {
            assert!(Penalizer::new(masks, &[], &[]).is_some());
        }
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
            (
                Penalties {
                    allowed: vec![3, 10],
                    ..Penalties::default()
                },
                "allowed_token_ids",
            ),
            (
                Penalties {
                    bad_words: vec![vec![1], vec![]],
                    ..Penalties::default()
                },
                "bad_words",
            ),
            (
                Penalties {
                    bad_words: vec![vec![1, 12]],
                    ..Penalties::default()
                },
                "bad_words",
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
            allowed: vec![0, 9],
            bad_words: vec![vec![9], vec![1, 2]],
        }
        .validate(10)
        .unwrap();
    }
}
