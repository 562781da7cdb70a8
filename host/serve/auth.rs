//! The admin bearer token. Compared in constant time (on SHA-256 digests, so neither the
//! content nor the length of the token leaks through timing).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// `token` must be non-empty (surrounding whitespace, such as a file's final newline, is
    /// not part of it).
    pub fn new(token: &str) -> Option<AdminToken> {
        let t = token.trim();
        (!t.is_empty()).then(|| AdminToken {
            digest: Sha256::digest(t.as_bytes()).into(),
        })
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
        let d: [u8; 32] = Sha256::digest(presented.trim_ascii()).into();
        d.ct_eq(&self.digest).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_check() {
        let t = AdminToken::new("s3cret\n").unwrap();
        assert!(t.accepts(Some(b"Bearer s3cret")));
        assert!(!t.accepts(Some(b"Bearer s3cre")));
        assert!(!t.accepts(Some(b"Bearer s3cret2")));
        assert!(!t.accepts(Some(b"s3cret")));
        assert!(!t.accepts(Some(b"Basic s3cret")));
        assert!(!t.accepts(None));
        assert!(AdminToken::new("  \n").is_none());
    }
}
