//! The verifier core: Clerk's decision procedure for session tokens, pure and free of I/O.
//!
//! The order of checks is Clerk's (`authenticateRequest` header path, then `verifyToken` /
//! `verifyJwt`), first failure wins:
//!
//! 1. decode: three base64url segments, JSON header and payload → `TOKEN_INVALID`;
//! 2. token type: machine JWTs (`sub` `mch_…`, `typ` `at+jwt`) and foreign `cat` categories
//!    (JWT templates, M2M) → `TOKEN_TYPE_MISMATCH`;
//! 3. key lookup by `kid` → `JWK_KID_MISMATCH` (done by the caller, see [`crate::TokenVerifier`]);
//! 4. `typ` (absent or exactly `JWT`) → `TOKEN_INVALID`;
//! 5. `alg` ∈ {RS256, RS384, RS512} → `TOKEN_INVALID_ALGORITHM`;
//! 6. signature, before any claim → `TOKEN_INVALID_SIGNATURE` (or `TOKEN_VERIFICATION_FAILED`
//!    when the key cannot verify that `alg`);
//! 7. `sub`, `aud`, `azp`, `iss` (only when pinned), `exp`, `nbf`, `iat`;
//! 8. pending session (`sts: pending`) unless accepted → `SESSION_PENDING`;
//! 9. claim decoding (malformed `fea`/`pla` → `TOKEN_INVALID`).

use serde_json::Value;

use crate::{
    error::{Reason, VerifyError},
    token::{
        claims::{
            parse_header, parse_payload, text_decode, text_decode_slice, Cat, Lenient, Payload,
            RawClaims, RawHeader, Typ,
        },
        identity::{Identity, TokenType},
        keys::{KeySet, SigError, VerifyingKey},
    },
};

/// Clerk's session-token category (`cat` header).
pub(crate) const CAT_SESSION: &str = "cl_B7d4PD111AAA";
/// Clerk's JWT-template category (never accepted: listed for reference and tests).
#[allow(dead_code)]
pub(crate) const CAT_TEMPLATE: &str = "cl_B7d4PD222AAA";
/// Clerk's M2M JWT category.
pub(crate) const CAT_M2M: &str = "cl_B7d4PD333AAA";
/// Clerk's "ignore" marker, stamped on every class for instances with a legacy opt-out.
pub(crate) const CAT_IGNORE: &str = "cl_I7d4PD111III";

/// The default clock skew, as Clerk's SDK: 5 seconds.
pub const DEFAULT_CLOCK_SKEW_MS: u64 = 5_000;

/// Verification settings that apply to every token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// Allowed clock skew for `exp`, `nbf` and `iat`. Defaults to 5 000 ms (Clerk's default).
    pub clock_skew_ms: u64,
    /// Authorized parties (`azp` allow-list, exact match). Defaults to empty: no `azp` check,
    /// as in Clerk's SDK. When non-empty, a token without `azp` is rejected.
    pub authorized_parties: Vec<String>,
    /// Issuer pinning: when set, `iss` must equal it exactly. Defaults to off (Clerk's SDK does
    /// not check `iss`).
    pub issuer: Option<String>,
    /// Accepted audiences. Defaults to empty: no check. As in Clerk's SDK, a session token
    /// without `aud` passes even when audiences are configured; an OAuth JWT access token
    /// must then carry a non-empty `aud` naming one of them (`assertOAuthAudienceClaim`).
    pub audience: Vec<String>,
}

/// Per-call options that change the verdict.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions<'a> {
    /// Replaces [`Validation::authorized_parties`] for this call when non-empty.
    pub authorized_parties: &'a [String],
    /// Accept `sts: pending` sessions.
    pub accept_pending: bool,
    /// Accepted token types; empty means session tokens only.
    pub accepted_types: &'a [TokenType],
}

/// A decoded, not yet verified, JWT. Its `Debug` shows the token's fingerprint, never the
/// token, its signature or its payload.
pub struct Decoded<'t> {
    header: RawHeader,
    claims: RawClaims,
    /// The payload as Clerk's `TextDecoder` reads it (BOM stripped, invalid UTF-8 replaced).
    payload_json: String,
    /// The whole token; the signing input is `token[..signing_len]`.
    token: &'t str,
    signing_len: usize,
    signature: Vec<u8>,
    token_type: TokenType,
}

/// The verifier core. Cheap to clone; holds only settings.
#[derive(Debug, Clone)]
pub struct Verifier {
    validation: Validation,
}

const INVALID_FORM: VerifyError = VerifyError::new(
    Reason::TokenInvalid,
    "Invalid JWT form. A JWT consists of three parts separated by dots.",
);

/// No key with the token's `kid` (after any refetch).
pub const KID_MISMATCH: VerifyError = VerifyError::new(
    Reason::JwkKidMismatch,
    "Unable to find a signing key that matches the token's kid.",
);

// === impl Validation ===

impl Default for Validation {
    fn default() -> Self {
        Self {
            clock_skew_ms: DEFAULT_CLOCK_SKEW_MS,
            authorized_parties: Vec::new(),
            issuer: None,
            audience: Vec::new(),
        }
    }
}

// === impl Decoded ===

impl<'t> Decoded<'t> {
    /// Splits and decodes a compact JWT. Every failure is `TOKEN_INVALID`.
    pub fn parse(token: &'t str) -> Result<Self, VerifyError> {
        // Exactly two dots (SIMD search; `.` is ASCII, so the slices are char boundaries).
        let mut dots = memchr::memchr_iter(b'.', token.as_bytes());
        let (Some(d1), Some(d2), None) = (dots.next(), dots.next(), dots.next()) else {
            return Err(INVALID_FORM);
        };
        let (h, p, s) = (&token[..d1], &token[d1 + 1..d2], &token[d2 + 1..]);
        let bad = |m| VerifyError::new(Reason::TokenInvalid, m);
        let mut header_buf = [0u8; 512];
        let header_bytes =
            b64url_clerk_in(h, &mut header_buf).ok_or(bad("The JWT header is not base64url."))?;
        let payload_bytes = b64url_clerk(p).ok_or(bad("The JWT payload is not base64url."))?;
        let signature = b64url_clerk(s).ok_or(bad("The JWT signature is not base64url."))?;
        let header = parse_header(&text_decode_slice(&header_bytes))
            .ok_or(bad("The JWT header is not a JSON object."))?;
        let payload_json = text_decode(payload_bytes);
        let claims = match parse_payload(&payload_json) {
            Ok(Payload(Some(c))) => c,
            Ok(Payload(None)) => return Err(bad("The JWT payload is null.")),
            Err(_) => return Err(bad("The JWT payload is not JSON.")),
        };
        let token_type = classify(&header, &claims);
        Ok(Self {
            header,
            claims,
            payload_json,
            token,
            signing_len: d2,
            signature,
            token_type,
        })
    }

    /// The header `kid`, when it is a string.
    pub fn kid(&self) -> Option<&str> {
        self.header.kid.as_deref()
    }

    /// The token type this JWT presents as (session, M2M JWT, OAuth JWT).
    pub fn token_type(&self) -> TokenType {
        self.token_type
    }
}

impl std::fmt::Debug for Decoded<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoded")
            .field("token", &crate::secret::token_fingerprint(self.token))
            .field("token_type", &self.token_type)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// The value of a base64url character (`0xFF` for any other byte).
#[inline]
const fn b64url_value(c: u8) -> u8 {
    match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => 0xFF,
    }
}

/// What Clerk's `base64url.parse(s, { loose: true })` accepts, checked without decoding:
/// any number of trailing `=` is dropped (and `=` anywhere else is an invalid character); a
/// remainder of one character mod 4 is refused, and so are non-zero unused bits in the last
/// character ("Unexpected end of data"). Returns the unpadded input, which the SIMD decoder
/// then decodes exactly as Clerk does (it refuses any character outside the alphabet).
#[inline]
fn b64url_clerk_body(s: &str) -> Option<&[u8]> {
    let b = s.as_bytes();
    let end = b.iter().rposition(|&c| c != b'=').map_or(0, |i| i + 1);
    let body = &b[..end];
    let unused = match end % 4 {
        0 => return Some(body),
        2 => 0x0F,
        3 => 0x03,
        _ => return None,
    };
    (b64url_value(body[end - 1]) & unused == 0).then_some(body)
}

/// Decodes a token segment exactly as Clerk's SDK does (see [`b64url_clerk_body`]).
#[inline]
pub(crate) fn b64url_clerk(s: &str) -> Option<Vec<u8>> {
    base64_simd::URL_SAFE_NO_PAD
        .decode_to_vec(b64url_clerk_body(s)?)
        .ok()
}

/// As [`b64url_clerk`], decoding into `buf` when the result fits (no allocation).
#[inline]
fn b64url_clerk_in<'a>(s: &str, buf: &'a mut [u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
    let body = b64url_clerk_body(s)?;
    let simd = base64_simd::URL_SAFE_NO_PAD;
    let n = simd.decoded_length(body).ok()?;
    if n <= buf.len() {
        let out = simd
            .decode(body, base64_simd::Out::from_slice(&mut buf[..n]))
            .ok()?;
        return Some(std::borrow::Cow::Borrowed(out));
    }
    simd.decode_to_vec(body).ok().map(std::borrow::Cow::Owned)
}

/// A NumericDate (seconds) as Clerk reads it, `new Date(0).setUTCSeconds(secs)`, in
/// milliseconds: truncated toward zero to whole seconds (ToIntegerOrInfinity), and `None`
/// for an Invalid Date (not finite, or beyond ±8.64e15 ms after the time clip). Every
/// comparison with an Invalid Date is false in JS, so Clerk then never finds the token
/// expired, not yet valid or issued in the future.
pub(crate) fn js_date_ms(secs: f64) -> Option<f64> {
    if !secs.is_finite() {
        return None;
    }
    let ms = secs.trunc() * 1000.0;
    // `+ 0.0` turns -0 into +0, as MakeTime's additions do.
    (ms.abs() <= 8.64e15).then_some(ms + 0.0)
}

/// Clerk's `getMachineTokenType` for JWTs: M2M by `sub` prefix `mch_`, then OAuth by `typ`.
fn classify(header: &RawHeader, claims: &RawClaims) -> TokenType {
    if claims.sub.as_str().is_some_and(|s| s.starts_with("mch_")) {
        return TokenType::M2mToken;
    }
    if header.typ == Typ::AccessToken {
        return TokenType::OauthToken;
    }
    TokenType::SessionToken
}

// === impl Verifier ===

impl Verifier {
    /// A verifier with these settings.
    pub fn new(validation: Validation) -> Self {
        Self { validation }
    }

    /// The settings.
    pub fn validation(&self) -> &Validation {
        &self.validation
    }

    /// Step 2: is this token of a type the caller accepts?
    pub fn check_type(&self, d: &Decoded<'_>, opts: &VerifyOptions<'_>) -> Result<(), VerifyError> {
        let accepts = |t: TokenType| {
            if opts.accepted_types.is_empty() {
                t == TokenType::SessionToken
            } else {
                opts.accepted_types.contains(&t)
            }
        };
        match d.token_type {
            TokenType::SessionToken => {
                if !accepts(TokenType::SessionToken) {
                    return Err(VerifyError::new(
                        Reason::TokenTypeMismatch,
                        "Session tokens are not accepted here.",
                    ));
                }
                match d.header.cat {
                    Cat::Absent | Cat::Session => Ok(()),
                    Cat::M2m | Cat::Other => Err(VerifyError::new(
                        Reason::TokenTypeMismatch,
                        "The token's category is not a session token (JWT template or machine token).",
                    )),
                }
            }
            TokenType::M2mToken => {
                if !accepts(TokenType::M2mToken) {
                    return Err(VerifyError::new(
                        Reason::TokenTypeMismatch,
                        "M2M tokens are not accepted here.",
                    ));
                }
                match d.header.cat {
                    Cat::Absent | Cat::M2m => Ok(()),
                    Cat::Session | Cat::Other => Err(VerifyError::new(
                        Reason::TokenInvalid,
                        "Invalid M2M JWT category.",
                    )),
                }
            }
            TokenType::OauthToken => {
                if accepts(TokenType::OauthToken) {
                    Ok(())
                } else {
                    Err(VerifyError::new(
                        Reason::TokenTypeMismatch,
                        "OAuth access tokens are not accepted here.",
                    ))
                }
            }
            TokenType::ApiKey | TokenType::Unspecified => Err(VerifyError::new(
                Reason::TokenTypeMismatch,
                "This token type is not accepted here.",
            )),
        }
    }

    /// Convenience for a key set already at hand: steps 1–9 with the key chosen by `kid`.
    pub fn verify(
        &self,
        token: &str,
        keys: &KeySet,
        opts: &VerifyOptions<'_>,
        now_ms: i64,
    ) -> Result<Identity, VerifyError> {
        let d = Decoded::parse(token)?;
        self.check_type(&d, opts)?;
        let key = keys.get(d.kid()).ok_or(KID_MISMATCH)?;
        self.verify_with_key(d, key, opts, now_ms)
    }

    /// Steps 4–9 for a decoded token and the key its `kid` selected.
    ///
    /// Step 2 is enforced here too, so that no caller can verify a machine or template token
    /// as a session token by skipping [`Verifier::check_type`]; callers still call it first
    /// to keep Clerk's order (type before key lookup).
    pub fn verify_with_key(
        &self,
        d: Decoded<'_>,
        key: &VerifyingKey,
        opts: &VerifyOptions<'_>,
        now_ms: i64,
    ) -> Result<Identity, VerifyError> {
        self.check_type(&d, opts)?;
        if d.token_type == TokenType::SessionToken {
            return self.verify_session(d, key, opts, now_ms);
        }
        // Machine JWTs (§4.2): any failure past the type check is reported as Clerk does,
        // `token-verification-failed`, with the underlying reason kept as the cause.
        self.verify_machine_jwt(d, key, opts, now_ms)
            .map_err(|e| e.reported_as(Reason::TokenVerificationFailed))
    }

    fn verify_session(
        &self,
        d: Decoded<'_>,
        key: &VerifyingKey,
        opts: &VerifyOptions<'_>,
        now_ms: i64,
    ) -> Result<Identity, VerifyError> {
        // typ: absent, or exactly "JWT".
        match d.header.typ {
            Typ::Absent | Typ::Jwt => {}
            Typ::AccessToken | Typ::Other => {
                return Err(VerifyError::new(
                    Reason::TokenInvalid,
                    "Invalid JWT type. Expected \"JWT\".",
                ))
            }
        }
        check_signature(&d, key)?;
        let Decoded {
            claims,
            payload_json,
            token_type,
            ..
        } = d;
        self.check_claims(&claims, opts, now_ms, token_type)?;
        if claims.sts.as_str() == Some("pending") && !opts.accept_pending {
            return Err(VerifyError::new(
                Reason::SessionPending,
                "The session is pending (unfinished session tasks) and pending sessions are not accepted.",
            ));
        }
        Identity::from_session_claims(token_type, claims, payload_json).map_err(|_| {
            VerifyError::new(
                Reason::TokenInvalid,
                "Malformed fea/pla claim: every entry must be scope:value.",
            )
        })
    }

    fn verify_machine_jwt(
        &self,
        d: Decoded<'_>,
        key: &VerifyingKey,
        opts: &VerifyOptions<'_>,
        now_ms: i64,
    ) -> Result<Identity, VerifyError> {
        let typ_ok = match d.token_type {
            // M2M JWTs use the default header type: absent or "JWT".
            TokenType::M2mToken => matches!(d.header.typ, Typ::Absent | Typ::Jwt),
            // OAuth JWTs: "at+jwt" or "application/at+jwt" (how they were recognised).
            _ => d.header.typ == Typ::AccessToken,
        };
        if !typ_ok {
            return Err(VerifyError::new(Reason::TokenInvalid, "Invalid JWT type."));
        }
        check_signature(&d, key)?;
        self.check_claims(&d.claims, opts, now_ms, d.token_type)?;
        Ok(crate::token::machine::identity_from_jwt(
            d.token_type,
            &d.claims,
            &d.payload_json,
        ))
    }

    /// `sub`, `aud`, `azp`, `iss`, `exp`, `nbf`, `iat` for a token of type `ty`. Clerk's
    /// audience rule and authorized parties are session-token checks: an M2M JWT's `aud` lists
    /// machine ids and it has no `azp` (see the README on where we differ from Clerk). OAuth
    /// JWTs get Clerk's stricter OAuth audience rule instead, last.
    fn check_claims(
        &self,
        c: &RawClaims,
        opts: &VerifyOptions<'_>,
        now_ms: i64,
        ty: TokenType,
    ) -> Result<(), VerifyError> {
        let session = ty == TokenType::SessionToken;
        let oauth = ty == TokenType::OauthToken;
        let failed = |m| VerifyError::new(Reason::TokenVerificationFailed, m);
        let v = &self.validation;
        let skew = v.clock_skew_ms as f64;
        let now = now_ms as f64;

        // sub
        if c.sub.as_str().is_none() {
            return Err(failed(
                "Subject claim (sub) is required and must be a string.",
            ));
        }

        // aud
        if session && !audience_ok(c.aud.as_ref(), &v.audience) {
            return Err(failed("Invalid JWT audience claim (aud)."));
        }

        // azp
        let parties = if !session {
            &[][..]
        } else if opts.authorized_parties.is_empty() {
            &v.authorized_parties[..]
        } else {
            opts.authorized_parties
        };
        if !parties.is_empty() {
            let ok = match c.azp.as_str() {
                Some(azp) if !azp.is_empty() => parties.iter().any(|p| p == azp),
                _ => false,
            };
            if !ok {
                return Err(VerifyError::new(
                    Reason::TokenInvalidAuthorizedParties,
                    "Invalid JWT Authorized party claim (azp).",
                ));
            }
        }

        // iss (issuer pinning; off by default as in Clerk's SDK)
        if let Some(iss) = &v.issuer {
            if c.iss.as_str() != Some(iss.as_str()) {
                return Err(VerifyError::new(
                    Reason::TokenInvalidIssuer,
                    "Invalid JWT issuer claim (iss).",
                ));
            }
        }

        // exp, nbf, iat: whole seconds, as `Date#setUTCSeconds` makes them (`js_date_ms`); an
        // Invalid Date (infinite or huge) compares false, so it neither expires nor starts.
        let exp = match c.exp {
            Lenient::Num(n) => n,
            _ => return Err(failed("Invalid JWT expiry date claim (exp): not a number.")),
        };
        if js_date_ms(exp).is_some_and(|ms| ms <= now - skew) {
            return Err(VerifyError::new(Reason::TokenExpired, "JWT is expired."));
        }

        // nbf, then iat: optional, numbers, not beyond now + skew.
        let not_future = |l: &Lenient, early: VerifyError, not_number: &'static str| match l {
            Lenient::Absent => Ok(()),
            Lenient::Num(n) if js_date_ms(*n).is_some_and(|ms| ms > now + skew) => Err(early),
            Lenient::Num(_) => Ok(()),
            _ => Err(failed(not_number)),
        };
        not_future(
            &c.nbf,
            VerifyError::new(
                Reason::TokenNotActiveYet,
                "JWT cannot be used prior to not before date claim (nbf).",
            ),
            "Invalid JWT not before date claim (nbf): not a number.",
        )?;
        not_future(
            &c.iat,
            VerifyError::new(
                Reason::TokenIatInTheFuture,
                "JWT issued at date claim (iat) is in the future.",
            ),
            "Invalid JWT issued at date claim (iat): not a number.",
        )?;

        // OAuth JWTs: `verifyOAuthJwt` → `assertOAuthAudienceClaim`, after the JWT checks.
        if oauth && !oauth_audience_ok(c.aud.as_ref(), &v.audience) {
            return Err(failed(
                "Invalid OAuth audience claim (aud): expected a non-empty string or array of non-empty strings naming a configured audience.",
            ));
        }
        Ok(())
    }
}

fn check_signature(d: &Decoded<'_>, key: &VerifyingKey) -> Result<(), VerifyError> {
    let alg = d.header.alg.ok_or(VerifyError::new(
        Reason::TokenInvalidAlgorithm,
        "Invalid JWT algorithm. Supported: RS256, RS384, RS512.",
    ))?;
    let signing_input = &d.token.as_bytes()[..d.signing_len];
    match key.verify(alg, signing_input, &d.signature) {
        Ok(()) => Ok(()),
        Err(SigError::Invalid) => Err(VerifyError::new(
            Reason::TokenInvalidSignature,
            "JWT signature is invalid.",
        )),
        Err(SigError::Mismatch) => Err(VerifyError::new(
            Reason::TokenVerificationFailed,
            "Error verifying JWT signature: the key does not accept this algorithm.",
        )),
    }
}

/// Clerk's audience rule: normalise both sides to lists without empty entries; either empty
/// → pass; a string claim must be allowed; an array of strings needs one allowed element; any
/// other shape is not checked.
fn audience_ok(claim: Option<&Value>, allowed: &[String]) -> bool {
    let allowed: Vec<&str> = allowed
        .iter()
        .map(String::as_str)
        .filter(|a| !a.is_empty())
        .collect();
    if allowed.is_empty() {
        return true;
    }
    match claim {
        Some(Value::String(s)) if !s.is_empty() => allowed.contains(&s.as_str()),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {
            let list: Vec<&str> = a
                .iter()
                .filter_map(Value::as_str)
                .filter(|s| !s.is_empty())
                .collect();
            list.is_empty() || list.iter().any(|s| allowed.contains(s))
        }
        _ => true,
    }
}

/// Clerk's `assertOAuthAudienceClaim`: with no (non-empty) audience configured, pass.
/// Otherwise `aud` must be a non-empty string, or a non-empty array whose members are all
/// non-empty strings, and one of them must be configured. A missing, `null`, empty or
/// otherwise falsy `aud` fails, and so does any other shape.
fn oauth_audience_ok(claim: Option<&Value>, allowed: &[String]) -> bool {
    if allowed.iter().all(String::is_empty) {
        return true;
    }
    let ok = |a: &str| !a.is_empty() && allowed.iter().any(|x| x == a);
    match claim {
        Some(Value::String(s)) => ok(s),
        Some(Value::Array(a)) if !a.is_empty() => {
            let mut any = false;
            for m in a {
                match m.as_str() {
                    Some(s) if !s.is_empty() => any |= ok(s),
                    _ => return false,
                }
            }
            any
        }
        _ => false,
    }
}

// The conformance tests sign tokens with the emulator's keys.
#[cfg(all(test, feature = "emulator"))]
mod tests;
