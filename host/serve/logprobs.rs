//! Per-token logprobs on the HTTP side: which tokens' logprobs go with which piece of emitted
//! text, and OpenAI's two JSON shapes for them.
//!
//! Text reaches the client later than its tokens: the detokenizer waits for the rest of a
//! character cut between tokens, and the stop matcher holds back text that could start a stop
//! string. Positions are counted in characters of the decoded output. A token *starts* where
//! the decoded text stood when it was pushed (its `text_offset`) and *ends* where it stands once
//! no bytes of it wait for a following token. A token's logprobs are sent with the chunk whose
//! text reaches its end, so every chunk carries the tokens it completes (a token cut between
//! chunks goes with the later one). When a stop string ends the output, the tokens that
//! contributed at least one emitted character are kept (the last of them may also hold the
//! start of the stop string); those entirely inside or after the stop string are dropped. At a
//! normal end (EOS or length) every token's logprobs are sent.

use std::collections::VecDeque;

use serde_json::{Map, Value, json};

use crate::engine::TokenLogprob;
use crate::models::tokenizer::Tokenizer;

/// OpenAI's stand-in for a log-probability of minus infinity (JSON has no infinities).
const NEG_INF_LOGPROB: f64 = -9999.0;

/// One emitted token's logprobs, ready for the client.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEntry {
    /// The token's bytes (special tokens by their vocabulary text).
    pub bytes: Vec<u8>,
    /// `None` for an echoed prompt's first token (nothing before it to score it on).
    pub logprob: Option<f64>,
    /// Alternatives, most likely first.
    pub top: Vec<(Vec<u8>, f64)>,
    /// Where the token starts in the completion text (after the echoed prompt, if any), in
    /// characters.
    pub offset: usize,
}

/// How a token is named in logprobs: its text, or (vLLM's `return_tokens_as_token_ids`)
/// `token_id:N`, which stays unambiguous where a token's bytes are no character on their own.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    #[default]
    Text,
    Ids,
}

impl Naming {
    fn bytes(self, tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
        match self {
            // An id past the tokenizer's table (a padded vocabulary) has no text: empty bytes.
            Naming::Text => tokenizer.piece(id, false).unwrap_or_default().to_vec(),
            Naming::Ids => format!("token_id:{id}").into_bytes(),
        }
    }
}

impl TokenEntry {
    fn new(tokenizer: &Tokenizer, lp: &TokenLogprob, offset: usize, naming: Naming) -> Self {
        let bytes = |id: u32| naming.bytes(tokenizer, id);
        TokenEntry {
            bytes: bytes(lp.token),
            logprob: Some(lp.logprob),
            top: lp.top.iter().map(|&(id, l)| (bytes(id), l)).collect(),
            offset,
        }
    }
}

#[derive(Debug)]
struct Pending {
    entry: TokenEntry,
    /// Set once none of the token's bytes wait in the detokenizer.
    end: Option<usize>,
}

/// Lines up tokens' logprobs with the text sent to the client (see the module comment).
#[derive(Debug, Default)]
pub struct Aligner {
    pending: VecDeque<Pending>,
    /// Characters the detokenizer has produced.
    decoded: usize,
    /// Characters sent to the client.
    emitted: usize,
    naming: Naming,
}

impl Aligner {
    pub fn new(naming: Naming) -> Self {
        Aligner {
            naming,
            ..Aligner::default()
        }
    }

    /// The text starts `chars` characters in (after an echoed prompt).
    pub fn start_after(&mut self, chars: usize) {
        self.decoded = chars;
        self.emitted = chars;
    }

    /// A token went through the detokenizer and produced `text`; `waiting` says whether bytes
    /// of an incomplete character are still held.
    pub fn pushed(&mut self, tokenizer: &Tokenizer, lp: &TokenLogprob, text: &str, waiting: bool) {
        let entry = TokenEntry::new(tokenizer, lp, self.decoded, self.naming);
        self.add(entry, text, waiting);
    }

    fn add(&mut self, entry: TokenEntry, text: &str, waiting: bool) {
        self.decoded += text.chars().count();
        self.pending.push_back(Pending { entry, end: None });
        if !waiting {
            for p in self.pending.iter_mut().rev() {
                if p.end.is_some() {
                    break;
                }
                p.end = Some(self.decoded);
            }
        }
    }

    /// `text` was sent to the client.
    pub fn emitted(&mut self, text: &str) {
        self.emitted += text.chars().count();
    }

    /// The tokens whose text has been sent in full.
    pub fn release(&mut self) -> Vec<TokenEntry> {
        let mut out = Vec::new();
        while let Some(p) = self.pending.front() {
            match p.end {
                Some(end) if end <= self.emitted => {}
                _ => break,
            }
            if let Some(p) = self.pending.pop_front() {
                out.push(p.entry);
            }
        }
        out
    }

    /// The output ended normally and all its text was sent: every token.
    pub fn release_all(&mut self) -> Vec<TokenEntry> {
        self.pending.drain(..).map(|p| p.entry).collect()
    }

    /// A stop string ended the output: the tokens that contributed to the sent text.
    pub fn release_stopped(&mut self) -> Vec<TokenEntry> {
        let emitted = self.emitted;
        let mut out = self.release();
        out.extend(
            self.pending
                .drain(..)
                .filter(|p| p.entry.offset < emitted)
                .map(|p| p.entry),
        );
        out
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { NEG_INF_LOGPROB }
}

/// An echoed prompt (`echo` on `/v1/completions`): its text, special tokens included as
/// written, and one entry per token, each scored by the prefill on the tokens before it
/// (`scored[j]` is token j + 1's; the first token has none).
pub fn echo_entries(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    scored: &[TokenLogprob],
    top_n: usize,
    naming: Naming,
) -> anyhow::Result<(String, Vec<TokenEntry>)> {
    let mut stream = tokenizer.stream(false);
    let mut text = String::new();
    let mut chars = 0;
    let mut entries = Vec::with_capacity(prompt.len());
    for (j, &id) in prompt.iter().enumerate() {
        let e = match j.checked_sub(1).and_then(|i| scored.get(i)) {
            Some(lp) => {
                let mut e = TokenEntry::new(tokenizer, lp, chars, naming);
                // The prompt may be scored with more alternatives, for `prompt_logprobs`.
                e.top.truncate(top_n);
                e
            }
            None => TokenEntry {
                bytes: naming.bytes(tokenizer, id),
                logprob: None,
                top: Vec::new(),
                offset: chars,
            },
        };
        let piece = stream.push(tokenizer, id)?;
        chars += piece.chars().count();
        text.push_str(&piece);
        entries.push(e);
    }
    text.push_str(&stream.finish());
    Ok((text, entries))
}

/// vLLM's `prompt_logprobs`: null for the first token (nothing before it to score it on),
/// then per token an object keyed by token id holding the token and its `top_n` most likely
/// alternatives, each with its log-probability, rank (1: the most likely) and text.
pub fn prompt_json(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    scored: &[TokenLogprob],
    top_n: usize,
    naming: Naming,
) -> Value {
    let entry = |id: u32, logprob: f64, rank: Option<u32>| {
        json!({
            "logprob": finite(logprob),
            "rank": rank,
            "decoded_token": lossy(&naming.bytes(tokenizer, id)),
        })
    };
    let rows = prompt.iter().enumerate().map(|(j, _)| {
        let lp = j.checked_sub(1).and_then(|i| scored.get(i))?;
        let mut m = Map::new();
        for (r, &(id, l)) in lp.top.iter().take(top_n).enumerate() {
            m.insert(id.to_string(), entry(id, l, Some(r as u32 + 1)));
        }
        // The prompt's own token, where it is not among the alternatives.
        m.entry(lp.token.to_string())
            .or_insert_with(|| entry(lp.token, lp.logprob, lp.rank));
        Some(Value::Object(m))
    });
    Value::Array(rows.map(|r| r.unwrap_or(Value::Null)).collect())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `/v1/completions`' `logprobs` object. `top_n` = the request's `logprobs: N`; with N = 0
/// `top_logprobs` is null. Two alternatives with the same text (bytes that are not UTF-8 on
/// their own) share a key: the likelier one is kept.
pub fn completions_json(entries: &[TokenEntry], top_n: usize) -> Value {
    let top = if top_n == 0 {
        Value::Null
    } else {
        entries
            .iter()
            .map(|e| {
                if e.logprob.is_none() {
                    return Value::Null;
                }
                let mut m = Map::new();
                for (b, l) in &e.top {
                    m.entry(lossy(b)).or_insert_with(|| json!(finite(*l)));
                }
                Value::Object(m)
            })
            .collect()
    };
    json!({
        "tokens": entries.iter().map(|e| lossy(&e.bytes)).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob.map(finite)).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
    })
}

/// `/v1/chat/completions`' `logprobs` object.
pub fn chat_json(entries: &[TokenEntry]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "token": lossy(&e.bytes),
                "logprob": e.logprob.map(finite),
                "bytes": e.bytes,
                "top_logprobs": e.top.iter().map(|(b, l)| json!({
                    "token": lossy(b), "logprob": finite(*l), "bytes": b,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: usize) -> TokenEntry {
        TokenEntry {
            bytes: vec![],
            logprob: Some(-1.0),
            top: vec![],
            offset,
        }
    }

    /// Pushes tokens by hand: (decoded text, waiting) per token.
    fn aligner(tokens: &[(&str, bool)]) -> Aligner {
        let mut a = Aligner::default();
        for &(text, waiting) in tokens {
            a.add(entry(a.decoded), text, waiting);
        }
        a
    }

    fn offsets(v: Vec<TokenEntry>) -> Vec<usize> {
        v.into_iter().map(|e| e.offset).collect()
    }

    #[test]
    fn held_back_text_holds_its_tokens() {
        // "ab", a token waiting for the rest of a character, then "é!" completing it.
        let mut a = aligner(&[("ab", false), ("", true), ("é!", false)]);
        a.emitted("a");
        assert!(a.release().is_empty());
        a.emitted("b");
        assert_eq!(offsets(a.release()), [0]);
        a.emitted("é");
        assert!(
            a.release().is_empty(),
            "the cut character's tokens end after `!`"
        );
        a.emitted("!");
        assert_eq!(offsets(a.release()), [2, 2]);
        assert!(a.release_all().is_empty());
    }

    #[test]
    fn a_stop_string_keeps_the_tokens_that_reached_the_text() {
        // Tokens "ab", "c E", "ND"; stop "END": the text is "abc ".
        let mut a = aligner(&[("ab", false), ("c E", false), ("ND", false)]);
        a.emitted("abc ");
        assert_eq!(offsets(a.release()), [0]);
        assert_eq!(offsets(a.release_stopped()), [2]);
        // A stop string at a token boundary drops the token that starts it.
        let mut a = aligner(&[("ab", false), ("END", false)]);
        a.emitted("ab");
        assert_eq!(offsets(a.release_stopped()), [0]);
    }

    #[test]
    fn shapes() {
        let e = TokenEntry {
            bytes: b"hi".to_vec(),
            logprob: Some(-0.5),
            top: vec![
                (b"hi".to_vec(), -0.5),
                (vec![0xE2], -1.0),
                (vec![0xE3], -2.0),
                (b"x".to_vec(), f64::NEG_INFINITY),
            ],
            offset: 3,
        };
        let c = completions_json(std::slice::from_ref(&e), 4);
        assert_eq!(c["tokens"], json!(["hi"]));
        assert_eq!(c["token_logprobs"], json!([-0.5]));
        assert_eq!(c["text_offset"], json!([3]));
        // The two lone bytes share U+FFFD: the likelier stays.
        assert_eq!(
            c["top_logprobs"],
            json!([{"hi": -0.5, "\u{FFFD}": -1.0, "x": -9999.0}])
        );
        assert!(completions_json(std::slice::from_ref(&e), 0)["top_logprobs"].is_null());
        // An echoed prompt's first token has nothing to be scored on: nulls.
        let first = TokenEntry {
            logprob: None,
            top: vec![],
            ..e.clone()
        };
        let c = completions_json(&[first, e.clone()], 2);
        assert_eq!(c["token_logprobs"], json!([null, -0.5]));
        assert!(c["top_logprobs"][0].is_null() && c["top_logprobs"][1].is_object());
        let ch = chat_json(&[e]);
        let t = &ch["content"][0];
        assert_eq!(t["token"], "hi");
        assert_eq!(t["bytes"], json!([104, 105]));
        assert_eq!(t["top_logprobs"][1]["bytes"], json!([0xE2]));
        assert_eq!(t["top_logprobs"].as_array().map(Vec::len), Some(4));
    }
}
