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
/// SHA-256 ([`TokenDigest`]). Never log the token itself.
pub fn token_fingerprint(token: &str) -> String {
    TokenDigest::of(token).fingerprint().as_str().to_owned()
}

/// The SHA-256 of a token: computed once per request, it gives the log's [`Fingerprint`] and
/// (for a token without trailing `=`, i.e. every JWT Clerk issues) the verdict cache's key.
/// `Debug` shows the fingerprint only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

/// The first 12 hex digits of a [`TokenDigest`], without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 12]);

// === impl TokenDigest ===

impl TokenDigest {
    /// The digest of `token`.
    pub fn of(token: &str) -> Self {
        use sha2::{Digest, Sha256};
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// What logs show.
    pub fn fingerprint(&self) -> Fingerprint {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 12];
        for (i, b) in self.0[..6].iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        Fingerprint(out)
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TokenDigest")
            .field(&self.fingerprint().as_str())
            .finish()
    }
}

// === impl Fingerprint ===

impl Fingerprint {
    /// The 12 hex digits.
    pub fn as_str(&self) -> &str {
        // Hex digits only: always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_short_and_stable() {
        let f = token_fingerprint("abc");
        assert_eq!(f, "ba7816bf8f01");
        assert_ne!(token_fingerprint("abc=="), f);
        assert_eq!(
            format!("{:?}", TokenDigest::of("abc")),
            "TokenDigest(\"ba7816bf8f01\")"
        );
        assert_ne!(token_fingerprint("abd"), f);
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("sk_test_supersecret");
        assert!(!format!("{s:?}").contains("supersecret"));
    }
}
