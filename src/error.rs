//! Errors that cross module boundaries, and the **one** mapping from them to gRPC [`Status`].
//!
//! | error | gRPC code |
//! | --- | --- |
//! | [`AuthError::InvalidRequest`] (empty or oversized token) | `INVALID_ARGUMENT` |
//! | [`AuthError::NotCanonical`] (a path, host or method with no single safe reading) | `INVALID_ARGUMENT` |
//! | [`AuthError::Rejected`] (the token is not valid) | `UNAUTHENTICATED` |
//! | [`AuthError::Unavailable`] (no usable key material, AuthService unreachable) | `UNAVAILABLE` |
//! | [`MalformedAnswer`] (a delegated layer got a "valid" it cannot use) | `UNAVAILABLE` (`AUTH_SERVICE_UNAVAILABLE`) |
//! | [`AuthError::Denied`] (authenticated, but the policy does not allow the call) | `PERMISSION_DENIED` |
//! | [`AuthError::RateLimited`], [`AuthError::LimitReached`] (too many calls or streams) | `RESOURCE_EXHAUSTED` |
//!
//! Every status carries a `google.rpc.ErrorInfo` detail with domain [`ERROR_DOMAIN`] and the
//! [`Reason`] in `UPPER_SNAKE_CASE`. Messages are fixed texts: they never echo the token.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `google.rpc.ErrorInfo.domain` of every error this crate returns.
pub const ERROR_DOMAIN: &str = "clerk.auth.v1";

/// Why a token was refused: Clerk's `TokenVerificationErrorReason`, plus our own additions.
///
/// [`Reason::as_str`] gives the `UPPER_SNAKE_CASE` form used in `ErrorInfo.reason`;
/// [`Reason::clerk_reason`] gives Clerk's own kebab-case string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Not a well-formed JWT, bad `typ`, or an M2M category presented as a session token.
    TokenInvalid,
    /// `alg` is not RS256, RS384 or RS512.
    TokenInvalidAlgorithm,
    /// The signature does not verify.
    TokenInvalidSignature,
    /// The key could not verify this token (e.g. `alg` not the key's), or a claim has the
    /// wrong type (`sub` not a string, `exp` not a number…), or `aud` does not match.
    TokenVerificationFailed,
    /// `azp` missing or not one of the authorized parties.
    TokenInvalidAuthorizedParties,
    /// `iss` differs from the pinned issuer (only when issuer pinning is on).
    TokenInvalidIssuer,
    /// Expired (`exp` plus clock skew is in the past).
    TokenExpired,
    /// `nbf` is in the future (beyond the clock skew).
    TokenNotActiveYet,
    /// `iat` is in the future (beyond the clock skew).
    TokenIatInTheFuture,
    /// No key with the token's `kid`, even after a refetch.
    JwkKidMismatch,
    /// The JWKS could not be loaded from Clerk.
    JwkRemoteFailedToLoad,
    /// Clerk refused the configured secret key.
    SecretKeyInvalid,
    /// No key source is configured.
    JwkFailedToResolve,
    /// The token is of a type the caller does not accept (machine token, JWT template…).
    TokenTypeMismatch,
    /// The session is `pending` and the caller did not accept pending sessions.
    SessionPending,
    /// The request itself is malformed (empty or oversized token).
    InvalidRequest,
    /// The call carries no token (no `authorization`, `__session` cookie or configured key).
    TokenMissing,
    /// The AuthService a delegated layer relies on did not answer (down, deadline, error), or
    /// answered with an identity that cannot be used ([`MalformedAnswer`]).
    AuthServiceUnavailable,
    /// The machine token (opaque M2M token, API key, OAuth token) was revoked.
    TokenRevoked,
    /// Clerk's Backend API could not verify a machine token (network, 5xx, timeout).
    BackendApiUnavailable,
    /// Too many machine-token verifications: our per-source limit, or Clerk's 429.
    RateLimited,
    /// Machine tokens need `CLERK_SECRET_KEY` or `CLERK_MACHINE_SECRET_KEY`, and none is set.
    SecretKeyMissing,
    /// The session was revoked or ended (webhook, `RevokeSession`, or an online check).
    SessionRevoked,
    /// The user, session or membership asked for does not exist at Clerk.
    ResourceNotFound,
    /// The request path cannot be read one way only (`Check`: encoded `/`, `;`, dot segments
    /// above the root, readings that select different rules…; the layer: not exactly
    /// `/pkg.Service/Method`). See [`crate::canonical`].
    PathNotCanonical,
    /// The request's host (`Check`: `http.host` / `:authority`) is not a valid host name, IP
    /// literal or numeric port. See [`crate::canonical::host`].
    HostInvalid,
    /// The HTTP method (`Check`) is not a token, or selects a different rule once upper-cased.
    MethodInvalid,
    /// Too many `WatchRevocations` streams are open (in all, or on the caller's connection).
    StreamLimitReached,
    /// A `WatchRevocations` subscriber did not keep up (it lagged behind the live revocations,
    /// or nothing could be written to it for the write timeout): it was dropped and should
    /// resubscribe (the snapshot is sent again).
    SubscriberTooSlow,
    /// The proxy's route names a rule (Envoy `context_extensions`, `clerk_rule`) the route
    /// policy does not define, or a value that is not a rule name: the server cannot decide,
    /// so the request is refused (`FAILED_PRECONDITION`; HTTP 503 from `Check`).
    RouteRuleUnknown,
    /// A cookie-borne token came with an `Origin` header that is malformed, `null` or repeated
    /// (see [`crate::canonical::origin`]). Ours: Clerk does not read `Origin`.
    OriginInvalid,
    /// A cookie-borne token came from a page whose `Origin` is not one of the authorized
    /// parties (or, with none configured, not the token's `azp`), or from a cross-site request
    /// without an `Origin`. Ours: Clerk does not read `Origin`.
    OriginNotAuthorized,
    /// A `__session` cookie without a `__client_uat` cookie (or with `__client_uat=0`: signed
    /// out), as Clerk's `authenticateRequest` (`session-token-but-no-client-uat`).
    SessionTokenButNoClientUat,
    /// The `__session` token was issued before the client's last sign-in or sign-out
    /// (`iat` < `__client_uat`), as Clerk's `authenticateRequest`.
    SessionTokenIatBeforeClientUat,
}

/// A token was refused. Carries a [`Reason`] and a fixed, token-free message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (reason={})", reason.clerk_reason())]
pub struct VerifyError {
    /// Why.
    pub reason: Reason,
    /// A short human-readable explanation. Never contains the token or claim values.
    pub message: &'static str,
    /// The underlying check, when Clerk reports a coarser reason (a machine JWT that failed
    /// any claim check is `TOKEN_VERIFICATION_FAILED`, as in Clerk's SDK; `cause` says
    /// `TOKEN_EXPIRED`). Sent as `ErrorInfo.metadata["cause"]`.
    pub cause: Option<Reason>,
}

/// Failures while loading Clerk keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The HTTP request failed (connect, timeout, body).
    #[error("request to {url} failed")]
    Http {
        /// The JWKS URL (never contains a secret).
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// Clerk answered with a non-success status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The JWKS URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// Clerk answered 401 with `clerk_key_invalid`: the secret key is wrong.
    #[error("Clerk refused the secret key ({url} answered HTTP {status} clerk_key_invalid)")]
    SecretKeyInvalid {
        /// The JWKS URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The body is not a usable JWKS.
    #[error("{url} returned an unusable JWKS: {detail}")]
    InvalidJwks {
        /// The JWKS URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// A PEM / base64 SPKI key could not be parsed.
    #[error("not a usable RSA public key: {0}")]
    InvalidPem(String),
}

/// Every outcome of a verification other than success. Converted to [`Status`] by `From`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The request is malformed: `INVALID_ARGUMENT`.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// The token is not valid: `UNAUTHENTICATED`.
    #[error(transparent)]
    Rejected(#[from] VerifyError),
    /// No usable key material (never loaded, past the stale bound, Clerk down), or the
    /// AuthService a delegated layer relies on cannot answer: `UNAVAILABLE`.
    #[error("authentication unavailable (reason={})", .0.clerk_reason())]
    Unavailable(Reason),
    /// Authenticated, but the policy does not allow the call: `PERMISSION_DENIED`.
    #[error("permission denied (reason={})", .0.unmet.as_str())]
    Denied(Denial),
    /// Our own configuration is wrong (Clerk refused our secret key, or none is set for
    /// machine tokens): `FAILED_PRECONDITION`. Retrying will not help.
    #[error("misconfigured (reason={})", .0.clerk_reason())]
    Misconfigured(Reason),
    /// The user, session or membership does not exist at Clerk: `NOT_FOUND`.
    #[error("not found")]
    NotFound,
    /// The request's target (path, host, HTTP method) has no single safe reading, so no rule
    /// can be chosen for it (see [`crate::canonical`]): `INVALID_ARGUMENT` (HTTP 400 from
    /// `Check`), reason `PATH_NOT_CANONICAL`, `HOST_INVALID` or `METHOD_INVALID`.
    #[error("request target refused: {message} (reason={})", .reason.as_str())]
    NotCanonical {
        /// Which part of the target.
        reason: Reason,
        /// What is wrong (fixed text, never the target itself).
        message: &'static str,
    },
    /// Machine-token verification is rate limited (our per-source limit, or Clerk's 429):
    /// `RESOURCE_EXHAUSTED` with a `google.rpc.RetryInfo`.
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited {
        /// When a retry may succeed.
        retry_after: std::time::Duration,
    },
    /// A server-side limit on what one caller may hold open is reached (`WatchRevocations`
    /// streams: [`Reason::StreamLimitReached`]): `RESOURCE_EXHAUSTED`, with
    /// `ErrorInfo.metadata["limit"]` naming the limit (`total`, `per_connection`).
    #[error("limit reached: {limit} (reason={})", .reason.as_str())]
    LimitReached {
        /// Why.
        reason: Reason,
        /// Which limit.
        limit: &'static str,
    },
}

/// AuthService answered `VerifyToken` with "valid", but the answer cannot be used: it is
/// incomplete, or contradicts the request it answers (checked by
/// [`DelegatedVerifier`](crate::layer::DelegatedVerifier) before anything is cached or handed
/// to a handler).
///
/// It says nothing about the token and everything about AuthService (or whatever sits between
/// it and the layer): it is not doing its job. So it becomes [`AuthError::Unavailable`] /
/// `AUTH_SERVICE_UNAVAILABLE` — retry later, alert the operator — rather than `UNAUTHENTICATED`,
/// which would tell a caller with a good token to get a new one. Never a pass, never cached.
/// A token that an otherwise sound answer shows to be expired (or not yet valid) by the layer's
/// own clock is a plain rejection instead (`TOKEN_EXPIRED` / `TOKEN_NOT_ACTIVE_YET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedAnswer {
    /// The response holds no identity.
    #[error("the answer holds no identity")]
    NoIdentity,
    /// The token type is unspecified, or a value this build does not know.
    #[error("the token type is unspecified or unknown")]
    UnknownTokenType,
    /// The token type is not one the request accepts (e.g. an M2M token for a rule taking
    /// session tokens only).
    #[error("the token type is not one the request accepts")]
    TokenTypeNotAccepted,
    /// No subject: a session token without `user_id`, a machine token without
    /// `machine.subject`.
    #[error("the identity has no subject")]
    NoSubject,
    /// Fields that contradict the token type: machine details on a session token; on a machine
    /// token, session fields, or a `user_id` / organization its subject does not give.
    #[error("the identity's fields contradict its token type")]
    Inconsistent,
    /// The session status is a value this build does not know.
    #[error("the session status is unknown")]
    UnknownSessionStatus,
    /// A `pending` session, for a request that does not accept pending sessions.
    #[error("a pending session, which the request does not accept")]
    PendingSession,
    /// The `azp` is not one of the request's authorized parties.
    #[error("the authorized party is not one the request names")]
    AuthorizedParty,
    /// No `expires_at`, for a token type that always expires (session and OAuth tokens).
    #[error("the identity has no expiry")]
    NoExpiry,
}

/// Why an authenticated caller was refused by policy: the requirement not met and what it
/// asked for (reported in `ErrorInfo.metadata`, e.g. `permission: org:orders:delete`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The requirement not met.
    pub unmet: Unmet,
    /// What was required, as `ErrorInfo` metadata pairs. Never holds token contents.
    pub required: Vec<(&'static str, String)>,
}

// === impl Reason ===

impl Reason {
    /// The `UPPER_SNAKE_CASE` reason used in `google.rpc.ErrorInfo.reason`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::TokenInvalid => "TOKEN_INVALID",
            Reason::TokenInvalidAlgorithm => "TOKEN_INVALID_ALGORITHM",
            Reason::TokenInvalidSignature => "TOKEN_INVALID_SIGNATURE",
            Reason::TokenVerificationFailed => "TOKEN_VERIFICATION_FAILED",
            Reason::TokenInvalidAuthorizedParties => "TOKEN_INVALID_AUTHORIZED_PARTIES",
            Reason::TokenInvalidIssuer => "TOKEN_INVALID_ISSUER",
            Reason::TokenExpired => "TOKEN_EXPIRED",
            Reason::TokenNotActiveYet => "TOKEN_NOT_ACTIVE_YET",
            Reason::TokenIatInTheFuture => "TOKEN_IAT_IN_THE_FUTURE",
            Reason::JwkKidMismatch => "JWK_KID_MISMATCH",
            Reason::JwkRemoteFailedToLoad => "JWK_REMOTE_FAILED_TO_LOAD",
            Reason::SecretKeyInvalid => "SECRET_KEY_INVALID",
            Reason::JwkFailedToResolve => "JWK_FAILED_TO_RESOLVE",
            Reason::TokenTypeMismatch => "TOKEN_TYPE_MISMATCH",
            Reason::SessionPending => "SESSION_PENDING",
            Reason::InvalidRequest => "INVALID_REQUEST",
            Reason::TokenMissing => "TOKEN_MISSING",
            Reason::AuthServiceUnavailable => "AUTH_SERVICE_UNAVAILABLE",
            Reason::TokenRevoked => "TOKEN_REVOKED",
            Reason::BackendApiUnavailable => "BACKEND_API_UNAVAILABLE",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::SecretKeyMissing => "SECRET_KEY_MISSING",
            Reason::SessionRevoked => "SESSION_REVOKED",
            Reason::ResourceNotFound => "RESOURCE_NOT_FOUND",
            Reason::PathNotCanonical => "PATH_NOT_CANONICAL",
            Reason::HostInvalid => "HOST_INVALID",
            Reason::MethodInvalid => "METHOD_INVALID",
            Reason::StreamLimitReached => "STREAM_LIMIT_REACHED",
            Reason::SubscriberTooSlow => "SUBSCRIBER_TOO_SLOW",
            Reason::RouteRuleUnknown => "ROUTE_RULE_UNKNOWN",
            Reason::OriginInvalid => "ORIGIN_INVALID",
            Reason::OriginNotAuthorized => "ORIGIN_NOT_AUTHORIZED",
            Reason::SessionTokenButNoClientUat => "SESSION_TOKEN_BUT_NO_CLIENT_UAT",
            Reason::SessionTokenIatBeforeClientUat => "SESSION_TOKEN_IAT_BEFORE_CLIENT_UAT",
        }
    }

    /// Clerk's own kebab-case reason string (`token-expired`, …).
    pub const fn clerk_reason(self) -> &'static str {
        match self {
            Reason::TokenInvalid => "token-invalid",
            Reason::TokenInvalidAlgorithm => "token-invalid-algorithm",
            Reason::TokenInvalidSignature => "token-invalid-signature",
            Reason::TokenVerificationFailed => "token-verification-failed",
            Reason::TokenInvalidAuthorizedParties => "token-invalid-authorized-parties",
            Reason::TokenInvalidIssuer => "token-invalid-issuer",
            Reason::TokenExpired => "token-expired",
            Reason::TokenNotActiveYet => "token-not-active-yet",
            Reason::TokenIatInTheFuture => "token-iat-in-the-future",
            Reason::JwkKidMismatch => "jwk-kid-mismatch",
            Reason::JwkRemoteFailedToLoad => "jwk-remote-failed-to-load",
            Reason::SecretKeyInvalid => "secret-key-invalid",
            Reason::JwkFailedToResolve => "jwk-failed-to-resolve",
            Reason::TokenTypeMismatch => "token-type-mismatch",
            Reason::SessionPending => "session-pending",
            Reason::InvalidRequest => "invalid-request",
            Reason::TokenMissing => "token-missing",
            Reason::AuthServiceUnavailable => "auth-service-unavailable",
            Reason::TokenRevoked => "token-revoked",
            Reason::BackendApiUnavailable => "backend-api-unavailable",
            Reason::RateLimited => "rate-limited",
            Reason::SecretKeyMissing => "secret-key-missing",
            Reason::SessionRevoked => "session-revoked",
            Reason::ResourceNotFound => "resource-not-found",
            Reason::PathNotCanonical => "path-not-canonical",
            Reason::HostInvalid => "host-invalid",
            Reason::MethodInvalid => "method-invalid",
            Reason::StreamLimitReached => "stream-limit-reached",
            Reason::SubscriberTooSlow => "subscriber-too-slow",
            Reason::RouteRuleUnknown => "route-rule-unknown",
            Reason::OriginInvalid => "origin-invalid",
            Reason::OriginNotAuthorized => "origin-not-authorized",
            Reason::SessionTokenButNoClientUat => "session-token-but-no-client-uat",
            Reason::SessionTokenIatBeforeClientUat => "session-token-iat-before-client-uat",
        }
    }

    /// Every reason, for tables and tests.
    pub const ALL: [Reason; 34] = [
        Reason::TokenInvalid,
        Reason::TokenInvalidAlgorithm,
        Reason::TokenInvalidSignature,
        Reason::TokenVerificationFailed,
        Reason::TokenInvalidAuthorizedParties,
        Reason::TokenInvalidIssuer,
        Reason::TokenExpired,
        Reason::TokenNotActiveYet,
        Reason::TokenIatInTheFuture,
        Reason::JwkKidMismatch,
        Reason::JwkRemoteFailedToLoad,
        Reason::SecretKeyInvalid,
        Reason::JwkFailedToResolve,
        Reason::TokenTypeMismatch,
        Reason::SessionPending,
        Reason::InvalidRequest,
        Reason::TokenMissing,
        Reason::AuthServiceUnavailable,
        Reason::TokenRevoked,
        Reason::BackendApiUnavailable,
        Reason::RateLimited,
        Reason::SecretKeyMissing,
        Reason::SessionRevoked,
        Reason::ResourceNotFound,
        Reason::PathNotCanonical,
        Reason::HostInvalid,
        Reason::MethodInvalid,
        Reason::StreamLimitReached,
        Reason::SubscriberTooSlow,
        Reason::RouteRuleUnknown,
        Reason::OriginInvalid,
        Reason::OriginNotAuthorized,
        Reason::SessionTokenButNoClientUat,
        Reason::SessionTokenIatBeforeClientUat,
    ];

    /// Parses [`Reason::as_str`] back (used by the delegated layer to keep AuthService's reason).
    pub fn from_upper_snake(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl VerifyError ===

impl VerifyError {
    /// A rejection with a fixed message.
    pub const fn new(reason: Reason, message: &'static str) -> Self {
        Self {
            reason,
            message,
            cause: None,
        }
    }

    /// Reports this error as `reason`, keeping its own reason as the cause.
    pub const fn reported_as(self, reason: Reason) -> Self {
        Self {
            reason,
            message: self.message,
            cause: Some(self.reason),
        }
    }
}

// === impl KeyError ===

impl KeyError {
    /// The Clerk reason this load failure corresponds to.
    pub fn reason(&self) -> Reason {
        match self {
            KeyError::SecretKeyInvalid { .. } => Reason::SecretKeyInvalid,
            _ => Reason::JwkRemoteFailedToLoad,
        }
    }
}

// === impl AuthError ===

impl AuthError {
    /// The reason carried in `ErrorInfo` (`UPPER_SNAKE_CASE`).
    pub fn reason_str(&self) -> &'static str {
        match self {
            AuthError::InvalidRequest(_) => Reason::InvalidRequest.as_str(),
            AuthError::Rejected(e) => e.reason.as_str(),
            AuthError::Unavailable(r) => r.as_str(),
            AuthError::Denied(d) => d.unmet.as_str(),
            AuthError::Misconfigured(r) => r.as_str(),
            AuthError::RateLimited { .. } => Reason::RateLimited.as_str(),
            AuthError::LimitReached { reason, .. } => reason.as_str(),
            AuthError::NotFound => Reason::ResourceNotFound.as_str(),
            AuthError::NotCanonical { reason, .. } => reason.as_str(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            AuthError::InvalidRequest(_) => Code::InvalidArgument,
            AuthError::Rejected(_) => Code::Unauthenticated,
            AuthError::Unavailable(_) => Code::Unavailable,
            AuthError::Denied(_) => Code::PermissionDenied,
            AuthError::Misconfigured(_) => Code::FailedPrecondition,
            AuthError::RateLimited { .. } | AuthError::LimitReached { .. } => {
                Code::ResourceExhausted
            }
            AuthError::NotFound => Code::NotFound,
            AuthError::NotCanonical { .. } => Code::InvalidArgument,
        }
    }

    /// The client-visible message: fixed text, never the token.
    pub fn message(&self) -> &'static str {
        match self {
            AuthError::InvalidRequest(m) => m,
            AuthError::Rejected(e) => e.message,
            AuthError::Unavailable(Reason::JwkRemoteFailedToLoad | Reason::JwkFailedToResolve) => {
                "authentication keys are unavailable; retry later"
            }
            AuthError::Unavailable(Reason::JwkKidMismatch) => {
                "the token's signing key is being fetched; retry shortly"
            }
            AuthError::Unavailable(Reason::BackendApiUnavailable) => {
                "Clerk's Backend API is unavailable; retry later"
            }
            AuthError::Unavailable(Reason::SubscriberTooSlow) => {
                "the subscriber fell behind and was dropped; resubscribe"
            }
            AuthError::Unavailable(_) => "authentication is unavailable; retry later",
            AuthError::Denied(d) => match d.unmet {
                Unmet::Reverification => {
                    "a more recent factor verification is required (ErrorInfo metadata: level, after_minutes)"
                }
                Unmet::Permission => {
                    "an organization permission is required (ErrorInfo metadata: permission)"
                }
                Unmet::Role => "an organization role is required (ErrorInfo metadata: role)",
                _ => "the caller is not allowed to call this method",
            },
            AuthError::Misconfigured(Reason::SecretKeyMissing) => {
                "the server has no Clerk secret key for this (CLERK_SECRET_KEY, or CLERK_MACHINE_SECRET_KEY for M2M tokens)"
            }
            AuthError::Misconfigured(Reason::RouteRuleUnknown) => {
                "the proxy's route names no rule of the route policy (context_extensions clerk_rule); the server is misconfigured"
            }
            AuthError::Misconfigured(_) => {
                "Clerk refused the server's secret key; the server is misconfigured"
            }
            AuthError::RateLimited { .. } => "rate limited; retry later",
            AuthError::LimitReached { .. } => "too many streams are open; retry later",
            AuthError::NotFound => "not found at Clerk",
            AuthError::NotCanonical { message, .. } => message,
        }
    }
}

// === impl MalformedAnswer ===

impl From<MalformedAnswer> for AuthError {
    fn from(_: MalformedAnswer) -> Self {
        AuthError::Unavailable(Reason::AuthServiceUnavailable)
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Status {
        let metadata: std::collections::HashMap<String, String> = match &err {
            AuthError::Denied(d) => d
                .required
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            AuthError::Rejected(VerifyError {
                cause: Some(cause), ..
            }) => [("cause".to_owned(), cause.as_str().to_owned())].into(),
            AuthError::LimitReached { limit, .. } => {
                [("limit".to_owned(), (*limit).to_owned())].into()
            }
            _ => std::collections::HashMap::new(),
        };
        let mut details = ErrorDetails::with_error_info(err.reason_str(), ERROR_DOMAIN, metadata);
        if let AuthError::RateLimited { retry_after } = &err {
            details.set_retry_info(Some(*retry_after));
        }
        Status::with_error_details(err.code(), err.message(), details)
    }
}

/// Which requirement of a [`Check`](crate::authz::Check) was not met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unmet {
    /// The caller is not a user (machine token, or no user id), or nothing was asked.
    NotAUser,
    /// Nothing was asked: Clerk's `has({})` is `false`.
    NothingAsked,
    /// The organization role.
    Role,
    /// The organization permission.
    Permission,
    /// The feature.
    Feature,
    /// The plan.
    Plan,
    /// A more recent factor verification is needed.
    Reverification,
    /// A scope the rule requires is not among the machine token's scopes.
    Scope,
    /// An M2M token that does not list this service's machine id in its scopes.
    MachineNotAllowed,
    /// An API key owned by the wrong kind of subject (user vs organization).
    ApiKeyOwner,
    /// An identity query for someone else, by a caller not on the allowlist.
    CallerNotAllowed,
    /// The caller's mTLS identity (SPIFFE ID) is not one the rule names.
    PeerNotAllowed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_upper_snake_of_clerk_reasons() {
        for r in Reason::ALL {
            assert_eq!(
                r.as_str(),
                r.clerk_reason().replace('-', "_").to_uppercase()
            );
        }
    }

    #[test]
    fn status_mapping_table() {
        let cases = [
            (
                AuthError::InvalidRequest("empty token"),
                Code::InvalidArgument,
                "INVALID_REQUEST",
            ),
            (
                AuthError::Rejected(VerifyError::new(Reason::TokenExpired, "expired")),
                Code::Unauthenticated,
                "TOKEN_EXPIRED",
            ),
            (
                AuthError::Unavailable(Reason::JwkRemoteFailedToLoad),
                Code::Unavailable,
                "JWK_REMOTE_FAILED_TO_LOAD",
            ),
            (
                AuthError::Denied(Denial {
                    unmet: Unmet::Permission,
                    required: vec![("permission", "org:orders:delete".into())],
                }),
                Code::PermissionDenied,
                "ORG_PERMISSION_REQUIRED",
            ),
            (
                AuthError::NotCanonical {
                    reason: Reason::PathNotCanonical,
                    message: "the path holds a ; (path parameters)",
                },
                Code::InvalidArgument,
                "PATH_NOT_CANONICAL",
            ),
            (
                AuthError::LimitReached {
                    reason: Reason::StreamLimitReached,
                    limit: "per_connection",
                },
                Code::ResourceExhausted,
                "STREAM_LIMIT_REACHED",
            ),
            (
                AuthError::Unavailable(Reason::SubscriberTooSlow),
                Code::Unavailable,
                "SUBSCRIBER_TOO_SLOW",
            ),
            (
                AuthError::Misconfigured(Reason::RouteRuleUnknown),
                Code::FailedPrecondition,
                "ROUTE_RULE_UNKNOWN",
            ),
            (
                AuthError::NotCanonical {
                    reason: Reason::HostInvalid,
                    message: "the port is not a number from 1 to 65535",
                },
                Code::InvalidArgument,
                "HOST_INVALID",
            ),
        ];
        for (err, code, reason) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            let info = status.get_details_error_info().expect("ErrorInfo present");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, ERROR_DOMAIN);
            if code == Code::PermissionDenied {
                assert_eq!(info.metadata["permission"], "org:orders:delete");
            }
            if code == Code::ResourceExhausted {
                assert_eq!(info.metadata["limit"], "per_connection");
            }
        }
        let status = Status::from(AuthError::from(MalformedAnswer::NoSubject));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "AUTH_SERVICE_UNAVAILABLE"
        );
        for r in Reason::ALL {
            assert_eq!(Reason::from_upper_snake(r.as_str()), Some(r));
        }
        assert_eq!(Reason::from_upper_snake("NOPE"), None);
    }
}
