//! Structured outputs: a request's output constrained to a JSON schema, a regex, a list of
//! choices or a Lark grammar. `llguidance` turns the grammar and the parser state into the set of
//! tokens that may come next; every disallowed token's logit becomes -inf.
//!
//! Like the penalties, the mask is part of the target's distribution for that request, so strict
//! speculation stays lossless against plain decoding with the same grammar. A verified row is
//! masked as the position after the output and the drafts before it: the parser consumes the
//! drafts in turn and rolls them back afterwards. A draft model drafts from its q masked by a
//! copy of the parser ([`crate::draft::Drafter::constrain`]); prompt lookup copies unconstrained,
//! and the first draft the grammar refuses ends what a step can accept, whatever the policy says
//! (a lossy policy may accept tokens the target would not choose, never tokens outside the
//! grammar). Text the grammar forces is drafted by it ([`Constraint::forced`]).
//!
//! Grammar end: when the parser may stop, the request's end tokens (its stop tokens, or the
//! tokenizer's end-of-generation tokens) are allowed, and choosing one ends the generation.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::models::tokenizer::Tokenizer;

/// The most lexer states one request's grammar may build.
const MAX_LEXER_STATES: usize = 50_000;

/// The whitespace allowed between two JSON tokens.
const JSON_WHITESPACE: &str = r"( |\n{1,2}[ \t]{0,20})";

/// The request's grammar itself failed while the output was being generated: llguidance hit
/// one of its limits (lexer states, expressions built) or cannot go on from the text so far. The
/// request is at fault, not the server, so the server answers it as a bad request.
#[derive(Debug, thiserror::Error)]
#[error("the grammar failed: {0}")]
pub struct GrammarError(pub String);

fn grammar_error(e: impl std::fmt::Display) -> anyhow::Error {
    GrammarError(plain(e)).into()
}

/// llguidance's message without the marker it appends when verbose errors are off.
fn plain(e: impl std::fmt::Display) -> String {
    let s = format!("{e:#}");
    s.trim_end()
        .trim_end_matches("<non-verbose/>")
        .trim_end()
        .to_string()
}

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON value matching this JSON Schema (`{"type": "object"}`: any object).
    JsonSchema(serde_json::Value),
    /// Text matching this regex, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect: `start: ...`, `%json {...}` for embedded schemas).
    Lark(String),
}

impl GrammarSpec {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    pub fn json_object() -> Self {
        GrammarSpec::JsonSchema(serde_json::json!({"type": "object"}))
    }

    fn top_level(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            GrammarSpec::JsonSchema(s) => TopLevelGrammar::from_json_schema(bounded_json(s)),
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Choice(c) => {
                if c.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                // Lark string literals take JSON's escapes.
                let alts: Vec<String> = c
                    .iter()
                    .map(|s| serde_json::to_string(s).expect("a string serializes"))
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
        })
    }
}

/// `schema` with the whitespace between JSON tokens bounded, as llama.cpp's JSON grammars bound
/// it: a space, or line breaks and an indent. llguidance's default (any run of whitespace) lets
/// a model pad forever. A schema's own `x-guidance` options stand. (Also for a schema embedded
/// in a Lark grammar, `%json {...}`.)
pub fn bounded_json(schema: &serde_json::Value) -> serde_json::Value {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut()
        && !o.contains_key("x-guidance")
    {
        o.insert(
            "x-guidance".into(),
            serde_json::json!({ "whitespace_pattern": JSON_WHITESPACE }),
        );
    }
    s
}

/// The token trie and parser factory of one tokenizer: built once (about 0.4 s for Qwen's
/// 152k-token vocabulary on the build VM), shared by every constrained request.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// The tokenizer's end-of-generation tokens (the trie's EOS set).
    eog: Vec<u32>,
    vocab: usize,
}

/// llguidance's view of our tokenizer: the bytes of every token (special tokens behind the
/// 0xFF marker, so no text matches them) and our own BPE for the text the grammar forces.
struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode_continuation(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            // Part of a character: only the trie can split it.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl Grammars {
    pub fn new(tokenizer: &Tokenizer) -> Result<Grammars> {
        let vocab = tokenizer.vocab_size();
        let mut words = Vec::with_capacity(vocab);
        for id in 0..vocab as u32 {
            let piece = tokenizer.piece(id, false)?;
            let special = tokenizer.token_kind(id).is_some_and(|k| k.is_special());
            let mut w = Vec::with_capacity(piece.len() + 1);
            if special {
                w.push(TokTrie::SPECIAL_TOKEN_MARKER);
            }
            w.extend_from_slice(piece);
            words.push(w);
        }
        let eog = tokenizer.eos_ids().to_vec();
        let eos = *eog
            .first()
            .or(tokenizer.eos_id().as_ref())
            .context("the tokenizer has no end-of-generation token to end a grammar with")?;
        let mut trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &words);
        if eog.len() > 1 {
            trie = trie.with_eos_tokens(&eog);
        }
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env)?;
        // Grammar errors go back to the client, not to stderr, and without the parser's
        // internals.
        factory.quiet();
        let limits = factory.limits_mut();
        limits.verbose_errors = false;
        // A grammar's lexer may hold this many states (1-2 kB each): a request cannot take
        // more than ~100 MB this way (llguidance's default allows 250k).
        limits.max_lexer_states = MAX_LEXER_STATES;
        Ok(Grammars {
            factory: Arc::new(factory),
            eog,
            vocab,
        })
    }

    /// Compiles `spec` for one request; `stops` are the request's stop tokens (empty: the
    /// tokenizer's end-of-generation tokens end the grammar). An error says what is wrong with
    /// the grammar.
    pub fn compile(&self, spec: &GrammarSpec, stops: &[u32]) -> Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(spec.top_level()?)
            .map_err(|e| format!("{e:#}"))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        // Some grammars compile but cannot produce a first token (a schema that only refers to
        // itself): computing the first mask now makes that the request's error, not a failure
        // at its first step.
        matcher
            .compute_mask()
            .map_err(|e| format!("the grammar allows no first token ({})", plain(e)))?;
        let ends = if stops.is_empty() {
            self.eog.clone()
        } else {
            stops.to_vec()
        };
        Ok(Constraint {
            matcher,
            ends,
            eog: self.eog.clone(),
            vocab: self.vocab,
        })
    }
}

/// One request's grammar and where its output is in it. Clone it for another choice of the
/// same request (the parser state is copied, the grammar shared).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// Tokens that end the output when the grammar may stop.
    ends: Vec<u32>,
    /// The trie's EOS set: allowed by llguidance at the grammar's end, but only `ends` end this
    /// request.
    eog: Vec<u32>,
    vocab: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("ends", &self.ends)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Whether `t` ends the output (it is then not emitted).
    pub fn ends(&self, t: u32) -> bool {
        self.ends.contains(&t)
    }

    /// Masks `rows` in place: row i as the position after the output so far and `drafts[..i]`.
    /// Returns how many drafts the grammar allows in a row; rows after the first refused draft
    /// are left unmasked (no step can reach them). The parser's state is left as it was.
    pub fn mask_rows(&mut self, rows: &mut [Vec<f32>], drafts: &[u32]) -> Result<usize> {
        let mut consumed = 0;
        let mut allowed = 0;
        for (i, row) in rows.iter_mut().enumerate() {
            self.mask(row)?;
            let Some(&d) = drafts.get(i) else { break };
            if !row.get(d as usize).is_some_and(|x| *x > f32::NEG_INFINITY) {
                break;
            }
            allowed += 1;
            if self.ends(d) {
                // The output ends at d: nothing after it is emitted.
                break;
            }
            self.consume(d)?;
            consumed += 1;
        }
        if consumed > 0 {
            self.matcher
                .rollback(consumed)
                .map_err(|e| anyhow::anyhow!("grammar: cannot roll back the drafts: {e}"))?;
        }
        Ok(allowed)
    }

    /// How many of `drafts` the grammar allows in a row, as [`Constraint::mask_rows`] finds
    /// them but without computing a mask: a drafter that copies text (prompt lookup) has its
    /// copy cut here, before the target verifies rows no step could accept. The parser's state
    /// is left as it was.
    pub fn fitting(&mut self, drafts: &[u32]) -> Result<usize> {
        let j = drafts
            .iter()
            .position(|d| self.ends(*d) || self.eog.contains(d))
            .unwrap_or(drafts.len());
        let n = self
            .matcher
            .validate_tokens(&drafts[..j])
            .map_err(grammar_error)?;
        if n < j || j == drafts.len() || !self.ends(drafts[j]) {
            return Ok(n);
        }
        // drafts[j] ends the output: allowed when the grammar may stop after the ones before.
        for &d in &drafts[..j] {
            self.consume(d)?;
        }
        let accepting =
            self.matcher.is_stopped() || self.matcher.is_accepting().map_err(grammar_error)?;
        if j > 0 {
            self.matcher
                .rollback(j)
                .map_err(|e| anyhow::anyhow!("grammar: cannot roll back the drafts: {e}"))?;
        }
        Ok(j + usize::from(accepting))
    }

    /// The tokens of the text the grammar forces next (a JSON key, punctuation), in the
    /// tokenizer's own split of it; empty when the next token is a choice.
    pub fn forced(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// Records an emitted token (never an end token: the output stops there).
    pub fn push(&mut self, t: u32) -> Result<()> {
        self.consume(t)
    }

    fn consume(&mut self, t: u32) -> Result<()> {
        self.matcher
            .consume_token(t)
            .map_err(|e| grammar_error(format_args!("token {t} does not fit: {e}")))
    }

    /// Sets every token the grammar does not allow next to -inf.
    fn mask(&mut self, row: &mut [f32]) -> Result<()> {
        if row.len() < self.vocab {
            bail!(
                "grammar: a logit row has {} entries, the vocabulary {}",
                row.len(),
                self.vocab
            );
        }
        let mask = self.matcher.compute_mask_or_eos().map_err(grammar_error)?;
        let accepting =
            self.matcher.is_stopped() || self.matcher.is_accepting().map_err(grammar_error)?;
        // The end tokens' logits, for when the grammar may stop.
        let saved: Vec<f32> = self
            .ends
            .iter()
            .map(|&e| row.get(e as usize).copied().unwrap_or(0.0))
            .collect();
        let words = mask.as_slice();
        for (w, chunk) in row.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, x) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        for &e in &self.eog {
            if let Some(x) = row.get_mut(e as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        if accepting {
            for (&e, &v) in self.ends.iter().zip(&saved) {
                if let Some(x) = row.get_mut(e as usize) {
                    *x = v;
                }
            }
            // The grammar is done and something else (min_tokens) barred the end tokens: the
            // grammar wins, the output ends.
            if row.iter().all(|x| *x == f32::NEG_INFINITY) {
                for &e in &self.ends {
                    if let Some(x) = row.get_mut(e as usize) {
                        *x = 0.0;
                    }
                }
            }
        }
        Ok(())
    }
}
