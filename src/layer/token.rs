//! Where the layer finds the token: `authorization: Bearer …`, a configured metadata key, or the
//! `__session` cookie (gRPC-web from browsers).

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::error::{AuthError, Reason, VerifyError};

/// Where to look for the caller's token, in this order: the configured metadata key (if any),
/// `authorization: Bearer …`, then the `__session` cookie (if enabled).
///
/// A value that is present but malformed (not `Bearer`, not visible ASCII, repeated, empty) is
/// refused with `UNAUTHENTICATED` / `TOKEN_INVALID` — never skipped in favour of a later
/// source, so two sources cannot be played against each other.
#[derive(Debug, Clone)]
pub struct TokenSources {
    metadata_key: Option<HeaderName>,
    authorization: bool,
    session_cookie: bool,
}

/// The `__session` cookie Clerk's frontend SDKs set.
pub const SESSION_COOKIE: &str = "__session";

const MALFORMED: VerifyError = VerifyError::new(
    Reason::TokenInvalid,
    "the credentials metadata is malformed (expected `authorization: Bearer <token>`)",
);
const MISSING: VerifyError = VerifyError::new(
    Reason::TokenMissing,
    "no token: send `authorization: Bearer <token>`",
);

impl Default for TokenSources {
    fn default() -> Self {
        Self {
            metadata_key: None,
            authorization: true,
            session_cookie: true,
        }
    }
}

impl TokenSources {
    /// Also read the token from this metadata key (raw, or `Bearer <token>`), before
    /// `authorization`. Must be a valid lowercase ASCII metadata key.
    pub fn with_metadata_key(mut self, key: &str) -> Result<Self, http::header::InvalidHeaderName> {
        self.metadata_key = Some(HeaderName::from_bytes(key.as_bytes())?);
        Ok(self)
    }

    /// Whether to read `authorization` (default: yes).
    pub fn with_authorization(mut self, yes: bool) -> Self {
        self.authorization = yes;
        self
    }

    /// Whether to read the `__session` cookie (default: yes).
    pub fn with_session_cookie(mut self, yes: bool) -> Self {
        self.session_cookie = yes;
        self
    }

    /// Finds the token. `Err` when none is present or a present value is malformed.
    pub fn extract<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, AuthError> {
        self.extract_with_header(headers).map(|(t, _)| t)
    }

    /// Finds the token and the header value holding it (kept, without a copy, for forwarding).
    pub(crate) fn extract_with_header<'h>(
        &self,
        headers: &'h HeaderMap,
    ) -> Result<(&'h str, &'h HeaderValue), AuthError> {
        if let Some(key) = &self.metadata_key {
            if let Some(v) = single(headers, key)? {
                return bearer_or_raw(v.as_bytes()).map(|t| (t, v));
            }
        }
        if self.authorization {
            if let Some(v) = single(headers, &header::AUTHORIZATION)? {
                return bearer(v.as_bytes()).map(|t| (t, v));
            }
        }
        if self.session_cookie {
            if let Some(found) = session_cookie(headers)? {
                return Ok(found);
            }
        }
        Err(MISSING.into())
    }
}

fn single<'h>(
    headers: &'h HeaderMap,
    key: &HeaderName,
) -> Result<Option<&'h HeaderValue>, AuthError> {
    let mut values = headers.get_all(key).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(MALFORMED.into());
    }
    Ok(Some(first))
}

/// `Bearer <token>`: scheme case-insensitive, one or more spaces, then the token.
fn bearer(v: &[u8]) -> Result<&str, AuthError> {
    let space = memchr::memchr(b' ', v).ok_or(MALFORMED)?;
    if !v[..space].eq_ignore_ascii_case(b"bearer") {
        return Err(MALFORMED.into());
    }
    let rest = &v[space..];
    let start = rest.iter().position(|b| *b != b' ').ok_or(MALFORMED)?;
    token_value(&rest[start..])
}

fn bearer_or_raw(v: &[u8]) -> Result<&str, AuthError> {
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        bearer(v)
    } else {
        token_value(v)
    }
}

/// A token is one or more visible ASCII characters (no space, tab or control). Checked in one
/// branch-free pass the compiler vectorizes: tokens are ~1 KB and this runs on every call.
fn token_value(t: &[u8]) -> Result<&str, AuthError> {
    let visible = t
        .iter()
        .fold(true, |ok, &b| ok & (b.wrapping_sub(0x21) < 0x5e));
    if t.is_empty() || !visible {
        return Err(MALFORMED.into());
    }
    std::str::from_utf8(t).map_err(|_| MALFORMED.into())
}

/// The first `__session` cookie across every `cookie` header (HTTP/2 may split them).
fn session_cookie(headers: &HeaderMap) -> Result<Option<(&str, &HeaderValue)>, AuthError> {
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else {
            return Err(MALFORMED.into());
        };
        for pair in text.split(';') {
            let Some((name, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if name == SESSION_COOKIE {
                let v = v.trim_matches('"');
                if v.is_empty() {
                    return Ok(None);
                }
                return token_value(v.as_bytes()).map(|t| Some((t, value)));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    fn reason(r: Result<&str, AuthError>) -> &'static str {
        r.unwrap_err().reason_str()
    }

    #[test]
    fn sources_in_order() {
        let s = TokenSources::default()
            .with_metadata_key("x-clerk-token")
            .unwrap();
        let h = headers(&[
            ("authorization", b"Bearer a.b.c"),
            ("cookie", b"theme=dark; __session=c.o.o"),
        ]);
        assert_eq!(s.extract(&h).unwrap(), "a.b.c");
        let h = headers(&[
            ("x-clerk-token", b"k.e.y"),
            ("authorization", b"Bearer a.b.c"),
        ]);
        assert_eq!(s.extract(&h).unwrap(), "k.e.y");
        let h = headers(&[("x-clerk-token", b"bearer  k.e.y")]);
        assert_eq!(s.extract(&h).unwrap(), "k.e.y");
        let h = headers(&[("cookie", b"a=1"), ("cookie", b"__session=c.o.o; b=2")]);
        assert_eq!(s.extract(&h).unwrap(), "c.o.o");
        let h = headers(&[("authorization", b"bEaReR a.b.c")]);
        assert_eq!(s.extract(&h).unwrap(), "a.b.c");
    }

    #[test]
    fn missing_and_malformed() {
        let s = TokenSources::default();
        assert_eq!(reason(s.extract(&headers(&[]))), "TOKEN_MISSING");
        assert_eq!(
            reason(s.extract(&headers(&[("cookie", b"__session=")]))),
            "TOKEN_MISSING"
        );
        for bad in [
            &b"Basic dXNlcjpwYXNz"[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer a b",
            b"a.b.c",
            b"Bearer a.b.c\xff",
            b"Bearer\ta.b.c",
        ] {
            let h = headers(&[("authorization", bad)]);
            assert_eq!(reason(s.extract(&h)), "TOKEN_INVALID", "{bad:?}");
        }
        // A malformed authorization is not skipped in favour of the cookie.
        let h = headers(&[
            ("authorization", b"Basic x"),
            ("cookie", b"__session=c.o.o"),
        ]);
        assert_eq!(reason(s.extract(&h)), "TOKEN_INVALID");
        let h = headers(&[
            ("authorization", b"Bearer a"),
            ("authorization", b"Bearer b"),
        ]);
        assert_eq!(reason(s.extract(&h)), "TOKEN_INVALID");
        // Cookie disabled: only the header counts.
        let s = s.with_session_cookie(false);
        assert_eq!(
            reason(s.extract(&headers(&[("cookie", b"__session=c.o.o")]))),
            "TOKEN_MISSING"
        );
    }
}
