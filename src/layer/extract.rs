//! Where the layer finds the token: `authorization: Bearer …`, a configured metadata key, or the
//! `__session` cookie (gRPC-web from browsers), and what a cookie-borne token must also show
//! ([`CookieContext`]).

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::{
    canonical,
    error::{AuthError, Reason, VerifyError},
    token::identity::{Identity, TokenType},
};

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `authorization` or the configured metadata key.
    Header,
    /// The `__session` cookie: only session tokens are taken from it.
    Cookie,
}

impl Origin {
    /// The token types a token from here may be: the caller's `accepted` as they are from a
    /// header; from the cookie only session tokens, as Clerk's `authenticateRequest` reads
    /// machine tokens from `Authorization` only (a cookie set on a parent domain must not turn
    /// a victim's browser into the bearer of someone's API key). A rule that takes no
    /// session tokens refuses a cookie outright.
    pub fn accepted(self, accepted: &[TokenType]) -> Result<&[TokenType], AuthError> {
        const SESSION_ONLY: &[TokenType] = &[TokenType::SessionToken];
        match self {
            Origin::Header => Ok(accepted),
            Origin::Cookie
                if accepted.is_empty() || accepted.contains(&TokenType::SessionToken) =>
            {
                Ok(SESSION_ONLY)
            }
            Origin::Cookie => Err(AuthError::Rejected(VerifyError::new(
                Reason::TokenTypeMismatch,
                "Machine tokens are read from the authorization header only.",
            ))),
        }
    }
}

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

/// The `__client_uat` cookie Clerk's frontend SDKs set beside `__session`: when the client last
/// signed in or out (seconds since the epoch; `0` once signed out).
pub const CLIENT_UAT_COOKIE: &str = "__client_uat";

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

    /// Finds the token. `Err` when none is present or a present value is malformed. Callers
    /// that verify what a cookie carried must narrow the accepted types with
    /// [`TokenSources::extract_with_origin`] / [`Origin::accepted`].
    pub fn extract<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, AuthError> {
        self.extract_with_header(headers).map(|(t, _, _)| t)
    }

    /// Finds the token and where it was found.
    pub fn extract_with_origin<'h>(
        &self,
        headers: &'h HeaderMap,
    ) -> Result<(&'h str, Origin), AuthError> {
        self.extract_with_header(headers).map(|(t, _, o)| (t, o))
    }

    /// Finds the token, the header value holding it (kept, without a copy, for forwarding)
    /// and where it was found.
    pub(crate) fn extract_with_header<'h>(
        &self,
        headers: &'h HeaderMap,
    ) -> Result<(&'h str, &'h HeaderValue, Origin), AuthError> {
        if let Some(key) = &self.metadata_key {
            if let Some(v) = single(headers, key)? {
                return bearer_or_raw(v.as_bytes()).map(|t| (t, v, Origin::Header));
            }
        }
        if self.authorization {
            if let Some(v) = single(headers, &header::AUTHORIZATION)? {
                return bearer(v.as_bytes()).map(|t| (t, v, Origin::Header));
            }
        }
        if self.session_cookie {
            if let Some((t, v)) = session_cookie(headers)? {
                return Ok((t, v, Origin::Cookie));
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

/// The first cookie named `name` across every `cookie` header (HTTP/2 may split them), the
/// first one winning as in Clerk's cookie parser, with the header value holding it. Read pair
/// by pair as bytes: another cookie's value may hold anything (`theme=café`) without affecting
/// this one. The value is trimmed and unquoted (one pair of double quotes).
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<(&'h [u8], &'h HeaderValue)> {
    for value in headers.get_all(header::COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = memchr::memchr(b'=', pair) else {
                continue;
            };
            if pair[..eq].trim_ascii() != name.as_bytes() {
                continue;
            }
            let mut v = pair[eq + 1..].trim_ascii();
            if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' {
                v = &v[1..v.len() - 1];
            }
            return Some((v, value));
        }
    }
    None
}

/// The `__session` cookie; its value must be a visible-ASCII token.
fn session_cookie(headers: &HeaderMap) -> Result<Option<(&str, &HeaderValue)>, AuthError> {
    match cookie(headers, SESSION_COOKIE) {
        None => Ok(None),
        Some(([], _)) => Ok(None),
        Some((v, value)) => token_value(v).map(|t| Some((t, value))),
    }
}

/// The authorized parties as the layer compares them with a browser's `Origin`: each entry
/// canonicalised by [`canonical::origin`]; an entry that is not an origin is left out (it can
/// still match an `azp`, compared as configured, but never an `Origin`).
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthorizedOrigins {
    /// As configured (for the `azp` check, exact as in Clerk's SDK).
    pub(crate) parties: Vec<String>,
    /// Canonical origins, in the configured order, without duplicates.
    pub(crate) origins: Vec<String>,
}

impl AuthorizedOrigins {
    pub(crate) fn new(parties: Vec<String>) -> Self {
        let mut origins: Vec<String> = Vec::new();
        for p in &parties {
            match canonical::origin(p.as_bytes()) {
                Ok(o) if !origins.contains(&o) => origins.push(o),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    party = %p.escape_debug(),
                    problem = e.message(),
                    "an authorized party is not an origin (scheme://host[:port]): it never \
                     matches a browser's Origin"
                ),
            }
        }
        Self { parties, origins }
    }
}

fn origin_refused(reason: Reason, message: &'static str) -> AuthError {
    AuthError::Rejected(VerifyError::new(reason, message))
}

/// What a request carrying its token in the `__session` cookie must also show, read from its
/// headers before the token is verified ([`CookieContext::read`]) and checked against the
/// verified token after ([`CookieContext::check`]).
///
/// As Clerk's `authenticateRequest` (cookie path):
///
/// * a `__client_uat` cookie (when the client last signed in or out) must come with it and be
///   non-zero, else `SESSION_TOKEN_BUT_NO_CLIENT_UAT` (Clerk: `session-token-but-no-client-uat`;
///   `__client_uat=0` means signed out). We read it as decimal digits only (Clerk's
///   `parseInt` also takes `12abc` as 12; we take it as absent);
/// * the token must not predate it: `iat` < `__client_uat` is
///   `SESSION_TOKEN_IAT_BEFORE_CLIENT_UAT` (a token from before the last sign-out or sign-in);
/// * session tokens only, and `azp` against the authorized parties (done by the verifier, as
///   for a header token).
///
/// Further than Clerk (which does not read `Origin`, and relies on `azp` and `SameSite`):
///
/// * several `Origin` headers, or one that is not a canonicalisable origin (`null`, a path,
///   userinfo, non-ASCII, whitespace — [`canonical::origin`]), are `ORIGIN_INVALID`;
/// * an `Origin` must be one of the authorized parties (compared canonically), or — with none
///   configured — the token's own `azp` (the page Clerk minted it for), else
///   `ORIGIN_NOT_AUTHORIZED`: a page on another site cannot spend the cookie even where the
///   browser sends it (`SameSite=None`, a sibling subdomain);
/// * without an `Origin`, a `Sec-Fetch-Site` other than `same-origin` or `none` (so
///   `same-site` and `cross-site`) is `ORIGIN_NOT_AUTHORIZED` (browsers send `Origin` on
///   every gRPC-web `POST`; a client that sends neither header is not a browser and is taken
///   as Clerk takes it).
///
/// These defend browsers, which send `Origin` and `Sec-Fetch-*` themselves: a client holding
/// stolen cookies can leave both out, as it could with Clerk.
#[derive(Debug, Clone)]
pub(crate) struct CookieContext {
    client_uat: u64,
    origin: Option<String>,
}

impl CookieContext {
    /// Reads and checks what the headers say (everything but the token's own claims).
    pub(crate) fn read(
        headers: &HeaderMap,
        authorized: &AuthorizedOrigins,
    ) -> Result<Self, AuthError> {
        Self::read_for(headers, authorized, false)
    }

    /// As [`CookieContext::read`], for an HTTP request that may be a page load
    /// (`Check`, forward auth): with `navigation` (a `GET` or `HEAD` naming no method
    /// override), a top-level page load (`Sec-Fetch-Mode: navigate` and `Sec-Fetch-Dest:
    /// document`) is not refused for coming from another site without an `Origin` — a link
    /// from another site to the app is an ordinary visit, and a `SameSite=Lax` cookie is sent
    /// for it by design. Frames, embeds and sub-resources are not page loads.
    pub(crate) fn read_for(
        headers: &HeaderMap,
        authorized: &AuthorizedOrigins,
        navigation: bool,
    ) -> Result<Self, AuthError> {
        let client_uat = cookie(headers, CLIENT_UAT_COOKIE)
            .map(|(v, _)| v)
            .filter(|v| !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        if client_uat == 0 {
            return Err(origin_refused(
                Reason::SessionTokenButNoClientUat,
                "a __session cookie without a __client_uat cookie (or signed out: __client_uat=0)",
            ));
        }
        let mut values = headers.get_all(header::ORIGIN).iter();
        let origin = match (values.next(), values.next()) {
            (None, _) => None,
            (Some(_), Some(_)) => {
                return Err(origin_refused(
                    Reason::OriginInvalid,
                    "the request has several Origin headers",
                ))
            }
            (Some(v), None) => Some(
                canonical::origin(v.as_bytes())
                    .map_err(|e| origin_refused(Reason::OriginInvalid, e.message()))?,
            ),
        };
        match &origin {
            Some(o) if !authorized.parties.is_empty() && !authorized.origins.contains(o) => {
                return Err(origin_refused(
                    Reason::OriginNotAuthorized,
                    "the page's Origin is not one of the authorized parties",
                ));
            }
            Some(_) => {}
            None => {
                let mut sites = headers.get_all("sec-fetch-site").iter();
                match (sites.next(), sites.next()) {
                    (None, _) => {}
                    // A sibling subdomain is another page's request: `same-site` is treated as
                    // `cross-site` (its `<img>` and `<script>` GETs carry the cookie and no
                    // Origin).
                    (Some(v), None) if matches!(v.as_bytes(), b"same-origin" | b"none") => {}
                    (Some(v), None)
                        if navigation
                            && matches!(v.as_bytes(), b"cross-site" | b"same-site")
                            && headers
                                .get("sec-fetch-mode")
                                .is_some_and(|m| m.as_bytes() == b"navigate")
                            && headers
                                .get("sec-fetch-dest")
                                .is_some_and(|d| d.as_bytes() == b"document") => {}
                    _ => {
                        return Err(origin_refused(
                            Reason::OriginNotAuthorized,
                            "a cross-site request without an Origin header",
                        ))
                    }
                }
            }
        }
        Ok(Self { client_uat, origin })
    }

    /// Checks the verified token against the request: `iat` not before `__client_uat`, and,
    /// with no authorized parties configured, the `Origin` (when sent) equal to the token's
    /// `azp`.
    pub(crate) fn check(
        &self,
        identity: &Identity,
        authorized: &AuthorizedOrigins,
    ) -> Result<(), AuthError> {
        if identity
            .issued_at
            .is_some_and(|iat| iat < self.client_uat as f64)
        {
            return Err(origin_refused(
                Reason::SessionTokenIatBeforeClientUat,
                "the session token was issued before the client's last sign-in or sign-out",
            ));
        }
        if let (Some(origin), true) = (&self.origin, authorized.parties.is_empty()) {
            let azp = identity
                .authorized_party
                .as_deref()
                .and_then(|a| canonical::origin(a.as_bytes()).ok());
            if azp.as_deref() != Some(origin.as_str()) {
                return Err(origin_refused(
                    Reason::OriginNotAuthorized,
                    "the page's Origin is not the token's authorized party (azp)",
                ));
            }
        }
        Ok(())
    }
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
    fn cookies_are_read_pair_by_pair_and_carry_session_tokens_only() {
        let s = TokenSources::default();
        let found = |cookie: &[u8]| {
            s.extract_with_origin(&headers(&[("cookie", cookie)]))
                .map(|(t, o)| (t.to_owned(), o))
        };
        // A neighbour cookie with non-ASCII bytes does not break the session cookie.
        for c in [
            "theme=caf\u{e9}; __session=c.o.o".as_bytes(),
            b"theme=caf\xc3\xa9; __session=c.o.o",
            b"x=\xff\xfe;__session=c.o.o;y=\x80",
            b"__session=\"c.o.o\"",
            b" __session = c.o.o ",
        ] {
            assert_eq!(found(c).unwrap(), ("c.o.o".into(), Origin::Cookie), "{c:?}");
        }
        // The first __session wins (Clerk's parser); a non-ASCII session value is refused.
        assert_eq!(
            found(b"__session=first.a.b; __session=second.a.b")
                .unwrap()
                .0,
            "first.a.b"
        );
        assert_eq!(
            found(b"__session=c.o.o\xff").unwrap_err().reason_str(),
            "TOKEN_INVALID"
        );
        assert_eq!(
            found(b"__session_x=c.o.o").unwrap_err().reason_str(),
            "TOKEN_MISSING"
        );
        // From a cookie, only session tokens.
        let all = [TokenType::SessionToken, TokenType::ApiKey];
        assert_eq!(
            Origin::Cookie.accepted(&all).unwrap(),
            [TokenType::SessionToken]
        );
        assert_eq!(
            Origin::Cookie.accepted(&[]).unwrap(),
            [TokenType::SessionToken]
        );
        assert_eq!(
            Origin::Cookie
                .accepted(&[TokenType::ApiKey, TokenType::M2mToken])
                .unwrap_err()
                .reason_str(),
            "TOKEN_TYPE_MISMATCH"
        );
        assert_eq!(Origin::Header.accepted(&all).unwrap(), all);
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
