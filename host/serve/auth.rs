//! Bearer tokens: the API keys the inference routes accept and the admin token the policy
//! routes require. Compared in constant time (on SHA-256 digests, so neither the content nor
//! the length of a token leaks through timing).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// One or more accepted bearer tokens.
#[derive(Clone)]
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} accepted)", self.digests.len())
    }
}

impl Tokens {
    /// One token; `None` when `token` is blank (surrounding whitespace, such as a file's final
    /// newline, is not part of it).
    pub fn new(token: &str) -> Option<Tokens> {
        Tokens::from_lines(token)
    }

    /// One token per non-blank line (so keys can be rotated: the old and the new one both work
    /// until the old line is removed); `None` when there is none.
    pub fn from_lines(text: &str) -> Option<Tokens> {
        let digests: Vec<[u8; 32]> = text
            .lines()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| Sha256::digest(t.as_bytes()).into())
            .collect();
        (!digests.is_empty()).then_some(Tokens { digests })
    }

    /// Checks an `Authorization` header value (`Bearer <token>`).
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(h) = authorization else {
            return false;
        };
        let Some(presented) = h
            .strip_prefix(b"Bearer ")
            .or_else(|| h.strip_prefix(b"bearer "))
        else {
            return false;
        };
        self.accepts_key(presented)
    }

    /// Checks a bare token (Anthropic's clients send theirs as `x-api-key: <token>`).
    pub fn accepts_key(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.trim_ascii()).into();
        // Every digest is compared, so the time does not say which one matched.
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |any, k| any | d.ct_eq(k))
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_check() {
        let t = Tokens::new("s3cret\n").unwrap();
        assert!(t.accepts(Some(b"Bearer s3cret")));
        assert!(!t.accepts(Some(b"Bearer s3cre")));
        assert!(!t.accepts(Some(b"Bearer s3cret2")));
        assert!(!t.accepts(Some(b"s3cret")));
        assert!(!t.accepts(Some(b"Basic s3cret")));
        assert!(!t.accepts(None));
        assert!(t.accepts_key(b"s3cret"));
        assert!(!t.accepts_key(b"s3cre"));
        assert!(!t.accepts_key(b""));
        assert!(Tokens::new("  \n").is_none());
    }

    #[test]
    fn one_key_per_line() {
        let t = Tokens::from_lines("old-key\n\n  new-key  \n").unwrap();
        assert!(t.accepts(Some(b"Bearer old-key")));
        assert!(t.accepts(Some(b"Bearer new-key")));
        assert!(!t.accepts(Some(b"Bearer old-key\nnew-key")));
        assert!(!t.accepts(Some(b"Bearer ")));
        assert!(Tokens::from_lines("\n \n").is_none());
    }
}
