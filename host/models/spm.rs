//! SentencePiece-style tokenization (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral 7B,
//! TinyLlama), as llama.cpp does it: the text's spaces become `▁`, its characters are merged
//! pairwise, always the adjacent pair whose merged text is the best-scoring token (the leftmost
//! of equals), and a character with no token of its own falls back to its bytes' `<0xXX>` tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// What SentencePiece writes for a space.
pub const SPACE: char = '\u{2581}';

#[derive(Debug, Clone)]
pub struct Spm {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// The `<0xXX>` token of each byte.
    bytes: [Option<u32>; 256],
    unk: Option<u32>,
}

/// A candidate merge of the symbols starting at `left` (and the one after it) into a token of
/// `score` spanning `len` bytes.
struct Bigram {
    score: f32,
    left: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The heap's top: the highest score, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

/// A run of the text: bytes `start..start + len`, and its neighbours (`usize::MAX`: none).
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

impl Spm {
    /// `tokens` with their `scores`; `byte_tokens[b]` is the id of `<0xbb>`, `unk` the unknown
    /// token's (when the vocabulary has one).
    pub fn new(tokens: &[&str], scores: Vec<f32>, unk: Option<u32>) -> Spm {
        let mut ids = HashMap::with_capacity(tokens.len());
        let mut bytes = [None; 256];
        for (id, t) in tokens.iter().enumerate() {
            ids.entry(t.to_string()).or_insert(id as u32);
            if let Some(b) = byte_token(t) {
                bytes[b as usize].get_or_insert(id as u32);
            }
        }
        Spm {
            ids,
            scores,
            bytes,
            unk,
        }
    }

    /// Appends the ids of `text` (spaces already written as `▁`) to `out`.
    pub fn tokenize(&self, text: &str, out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: if i == 0 { NONE } else { i - 1 },
                next: NONE,
            });
            if i > 0 {
                symbols[i - 1].next = i;
            }
        }
        let mut heap = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: usize, heap: &mut BinaryHeap<Bigram>| {
            if left == NONE || symbols[left].next == NONE {
                return;
            }
            let (l, r) = (symbols[left], symbols[symbols[left].next]);
            let len = l.len + r.len;
            if let Some(&id) = self.ids.get(&text[l.start..l.start + len]) {
                let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
                heap.push(Bigram { score, left, len });
            }
        };
        for i in 0..symbols.len() {
            bigram(&symbols, i, &mut heap);
        }
        while let Some(b) = heap.pop() {
            let l = symbols[b.left];
            // Stale: a side was merged away since this pair was queued.
            if l.len == 0 || l.next == NONE || l.len + symbols[l.next].len != b.len {
                continue;
            }
            let r = l.next;
            symbols[b.left].len = b.len;
            symbols[b.left].next = symbols[r].next;
            symbols[r].len = 0;
            if symbols[r].next != NONE {
                let after = symbols[r].next;
                symbols[after].prev = b.left;
            }
            bigram(&symbols, symbols[b.left].prev, &mut heap);
            bigram(&symbols, b.left, &mut heap);
        }
        let mut i = if symbols.is_empty() { NONE } else { 0 };
        while i != NONE {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        out.extend(self.bytes[b as usize].or(self.unk));
                    }
                }
            }
            i = s.next;
        }
    }
}

/// The byte a `<0xXX>` token stands for.
pub fn byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The bytes a normal SentencePiece token stands for (`▁` is a space).
pub fn piece_bytes(t: &str) -> Vec<u8> {
    t.replace(SPACE, " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm(tokens: &[&str]) -> Spm {
        // Earlier tokens score higher, as in a trained vocabulary.
        let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
        Spm::new(tokens, scores, Some(0))
    }

    #[test]
    fn merges_take_the_best_scoring_pair_first() {
        let v = [
            "<unk>", "<0x41>", "▁", "t", "h", "e", "he", "th", "▁t", "▁the", "▁th", "a", "aa",
        ];
        let s = spm(&v);
        let ids = |text: &str| {
            let mut out = Vec::new();
            s.tokenize(text, &mut out);
            out.iter().map(|&i| v[i as usize]).collect::<Vec<_>>()
        };
        // "he" (6) outscores "th" (7) and "▁t" (8): ▁ t he -> ▁t he -> ▁the.
        assert_eq!(ids("▁the"), ["▁the"]);
        assert_eq!(ids("the"), ["t", "he"]);
        // Equal scores: the leftmost pair first.
        assert_eq!(ids("aaa"), ["aa", "a"]);
        // No token for "A": its byte; none for "B" either, and no byte token: unknown.
        assert_eq!(ids("▁A"), ["▁", "<0x41>"]);
        assert_eq!(ids("B"), ["<unk>"]);
        assert!(ids("").is_empty());
    }

    #[test]
    fn byte_tokens_and_pieces() {
        assert_eq!(byte_token("<0x0A>"), Some(10));
        assert_eq!(byte_token("<0xff>"), Some(255));
        assert_eq!(byte_token("<0x1>"), None);
        assert_eq!(byte_token("0x0A"), None);
        assert_eq!(piece_bytes("▁the"), b" the");
    }
}
