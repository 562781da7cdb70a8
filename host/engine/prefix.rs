//! The prompt cache: the KV caches of finished requests, kept by their tokens, so that a request
//! starting with the same tokens (a shared system prompt, the earlier turns of a chat, a file sent
//! again with a new question) skips the prefill of what they share.
//!
//! A request ends: its target sequence (prompt and output, as far as the target's cache holds
//! them) and its draft model's move in (no copy), and leave the batcher. A request
//! starts: the entry sharing the longest prefix with its prompt hands out a copy of that prefix
//! (never all of the prompt: the last prompt token is fed again for the first logits), and the
//! prefill runs only on the rest. Forwards are row-wise, so the logits after a prefill in two
//! pieces are those of one piece (bit for bit with quantized weights; F32 weights round by the
//! row count, around 1e-6).
//!
//! Salts: an entry keeps the `cache_salt` of the request that stored it and is found only by
//! requests with the same salt (or none by none), so that tenants who salt their requests
//! apart cannot learn from a fast first token what another sent (vLLM's `cache_salt`).
//!
//! Memory: the budget counts cached positions of the target and the draft model together
//! (positions cost `2 x layers x kv_heads x head_dim x 4` bytes each, 2 with an f16 / bf16 cache:
//! ~56 KiB for Qwen2.5-Coder-1.5B in f32; a moved-in buffer may have room for up to twice its positions, as it grew
//! by doubling). The least recently used entries go first; an entry whose tokens another one
//! extends is dropped for it.

use std::sync::Mutex;

use anyhow::Result;

use crate::models::Session;

/// One cached sequence: a session holding exactly `tokens`.
struct Stored {
    tokens: Vec<u32>,
    session: Session,
}

impl Stored {
    /// Takes a finished request's sequence: `session` holds `tokens` and perhaps more.
    fn keep((mut session, tokens): (Session, Vec<u32>)) -> Result<Stored> {
        session.truncate(tokens.len())?;
        session.leave_batch();
        Ok(Stored { tokens, session })
    }
}

struct Entry {
    salt: Option<String>,
    target: Stored,
    draft: Option<Stored>,
    /// The cache's clock when the entry was last stored or hit.
    used: u64,
}

impl Entry {
    fn positions(&self) -> usize {
        self.target.tokens.len() + self.draft.as_ref().map_or(0, |d| d.tokens.len())
    }

    /// Whether this entry holds all that `other` holds: each of its sequences starts with
    /// `other`'s.
    fn covers(&self, other: &Entry) -> bool {
        self.salt == other.salt
            && self.target.tokens.starts_with(&other.target.tokens)
            && other.draft.as_ref().is_none_or(|od| {
                self.draft
                    .as_ref()
                    .is_some_and(|d| d.tokens.starts_with(&od.tokens))
            })
    }
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    clock: u64,
}

/// What a hit hands out: copies of the cached prefixes, for a new request's sessions.
pub struct Hit {
    /// The target's first `len` positions: the prompt's first `len` tokens.
    pub target: Session,
    pub len: usize,
    /// The draft model's sequence (a session and the tokens it holds), when the entry has one.
    pub draft: Option<(Session, Vec<u32>)>,
}

/// The engine's prompt cache (shared by every request; see the module docs).
pub struct PrefixCache {
    budget: usize,
    state: Mutex<State>,
}

/// What the prompt cache holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub entries: usize,
    /// Cached positions (target and draft model) now held.
    pub positions: usize,
}

/// How many leading tokens `a` and `b` share.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache holding at most `budget` positions over all entries.
    pub fn new(budget: usize) -> PrefixCache {
        PrefixCache {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves whole entries (each insert or removal is one
        // Vec operation), so the state stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> PrefixStats {
        let s = self.lock();
        PrefixStats {
            entries: s.entries.len(),
            positions: s.entries.iter().map(Entry::positions).sum(),
        }
    }

    /// Copies of the longest cached prefix of `prompt` (at most all but its last token) among
    /// the entries stored with `salt`, or `None` when none shares a token with it. The copies
    /// are made under the lock (other requests' lookups wait a copy's time: milliseconds,
    /// against seconds of prefill saved).
    pub fn lookup(&self, prompt: &[u32], salt: Option<&str>) -> Result<Option<Hit>> {
        let cap = prompt.len().saturating_sub(1);
        let mut s = self.lock();
        // A sequence whose sliding-window layers dropped the keys a prefix needs cannot give
        // that prefix.
        let best = s
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.salt.as_deref() == salt)
            .map(|(i, e)| (common_prefix(&e.target.tokens, prompt).min(cap), i))
            .filter(|&(len, i)| s.entries[i].target.session.can_resume_at(len))
            .max();
        let Some((len, i)) = best.filter(|&(len, _)| len > 0) else {
            return Ok(None);
        };
        s.clock += 1;
        let clock = s.clock;
        let e = &mut s.entries[i];
        e.used = clock;
        let target = e.target.session.copy_prefix(len)?;
        let draft = match &e.draft {
            Some(d) => {
                let n = common_prefix(&d.tokens, prompt).min(cap);
                match d.session.can_resume_at(n) {
                    true => Some((d.session.copy_prefix(n)?, d.tokens[..n].to_vec())),
                    false => None,
                }
            }
            None => None,
        };
        Ok(Some(Hit { target, len, draft }))
    }

    /// Keeps a finished request's sequences (moved in, not copied): the target session and the
    /// tokens it holds (a session may hold more positions; they are dropped), and the draft
    /// model's, found again only with `salt`. Sequences that an entry with the same salt
    /// already holds (its tokens extend these) are dropped.
    pub fn store(
        &self,
        target: (Session, Vec<u32>),
        draft: Option<(Session, Vec<u32>)>,
        salt: Option<&str>,
    ) -> Result<()> {
        // Sequences that cannot go back to their tokens (a sliding window dropped them) stay
        // out.
        let draft = draft.filter(|d| d.0.can_resume_at(d.1.len()));
        let draft_len = draft.as_ref().map_or(0, |d| d.1.len());
        if target.1.is_empty()
            || target.1.len() + draft_len > self.budget
            || !target.0.can_resume_at(target.1.len())
        {
            return Ok(());
        }
        let entry = Entry {
            salt: salt.map(str::to_string),
            target: Stored::keep(target)?,
            draft: draft.map(Stored::keep).transpose()?,
            used: 0,
        };
        let mut s = self.lock();
        if s.entries.iter().any(|e| e.covers(&entry)) {
            return Ok(());
        }
        // Entries this one extends are superseded.
        s.entries.retain(|e| !entry.covers(e));
        let mut held: usize = s.entries.iter().map(Entry::positions).sum();
        while held + entry.positions() > self.budget {
            let Some((oldest, _)) = s.entries.iter().enumerate().min_by_key(|(_, e)| e.used) else {
                break;
            };
            held -= s.entries.swap_remove(oldest).positions();
        }
        s.clock += 1;
        let clock = s.clock;
        s.entries.push(Entry {
            used: clock,
            ..entry
        });
        Ok(())
    }
}
