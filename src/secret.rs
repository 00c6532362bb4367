//! Secrets that never print: [`Secret`] (a Clerk secret key or webhook secret) and
//! [`token_fingerprint`], the short hash that logs show instead of a token.

use std::fmt;

/// A secret (Clerk secret key): never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

// === impl Secret ===

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"…\")")
    }
}

/// A short, non-reversible fingerprint of a token for logs: the first 12 hex digits of its
/// SHA-256. Never log the token itself.
pub fn token_fingerprint(token: &str) -> String {
    use sha2::{Digest, Sha256};
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = Sha256::digest(token.as_bytes());
    let mut s = String::with_capacity(12);
    for b in &d[..6] {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_short_and_stable() {
        let f = token_fingerprint("abc");
        assert_eq!(f, "ba7816bf8f01");
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("sk_test_supersecret");
        assert!(!format!("{s:?}").contains("supersecret"));
    }
}
