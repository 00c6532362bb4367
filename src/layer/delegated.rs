//! Delegated verification: `clerk.auth.v1.AuthService/VerifyToken` over a tonic `Channel`,
//! behind a verdict cache, with coalescing, a per-call deadline, fail-closed errors and an
//! optional in-process fallback (hybrid).
//!
//! AuthService's "valid" is checked before it is believed, cached or handed to a handler:
//! a known token type the request accepts; a subject fitting the type (`user_id` for session
//! tokens, `machine.subject` for machine tokens, and no field the type cannot carry); no
//! `pending` session unless the request accepts them; the `azp` among the request's authorized
//! parties, when it names some; an `expires_at` (machine tokens that never expire — M2M tokens
//! and API keys — may have none) that, with [`DelegatedConfig::clock_skew`], is not past, and
//! a `not_before` that is not ahead. An answer failing any of these but the clock is a
//! [`MalformedAnswer`]: `UNAVAILABLE` / `AUTH_SERVICE_UNAVAILABLE`, logged at `error`, counted
//! in [`DelegatedStats::malformed_answers`] — AuthService is not doing its job, and the token
//! may well be good. It never triggers the hybrid fallback: the fallback stands in for an
//! AuthService that cannot be reached, not for one that answers wrongly — an AuthService that
//! gets one answer wrong cannot be trusted with the next, and quietly verifying in-process would
//! keep it in service while hiding the fault. A token shown expired (or not yet valid) by this
//! layer's clock is a plain `UNAUTHENTICATED` rejection (`TOKEN_EXPIRED` /
//! `TOKEN_NOT_ACTIVE_YET`), as the in-process verifier would answer.
//!
//! Use TLS towards AuthService (`https://` endpoints with [`DelegatedConfig::tls`]): whoever can
//! change a plaintext answer can make any token valid. Constructing a verifier over a plaintext
//! `http://` endpoint that is not loopback logs a warning.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use tonic::{transport::Channel, Code, Status};
use tonic_types::StatusExt;

use super::{Authenticate, RevocationFeed};
use crate::{
    credentials::TokenSource,
    error::{AuthError, MalformedAnswer, Reason, VerifyError},
    pb::{self, auth_service_client::AuthServiceClient},
    secret::{token_fingerprint, TokenDigest},
    token::identity::{Identity, SessionStatus, TokenType},
    verify::{revocations::Revocations, verdict_key},
    TokenVerifier, VerifyRequest, MAX_TOKEN_BYTES,
};

/// Settings of a [`DelegatedVerifier`].
#[derive(Debug, Clone)]
pub struct DelegatedConfig {
    /// AuthService endpoints: `https://host:port` with [`DelegatedConfig::tls`] (plaintext
    /// `http://` only on loopback, or inside a network you trust with every verdict); calls are
    /// balanced over all of them.
    pub endpoints: Vec<String>,
    /// Deadline of one `VerifyToken` call (default 200 ms). Past it: `UNAVAILABLE`.
    pub deadline: Duration,
    /// Longest time a verdict is reused (default 10 s), so that a revocation at AuthService
    /// reaches this layer quickly. A verdict never outlives the token's `exp` either.
    pub max_age: Duration,
    /// Most verdicts kept (default 10 000; 0 disables the cache).
    pub cache_capacity: u64,
    /// TCP connect timeout (default 1 s).
    pub connect_timeout: Duration,
    /// How far past its `expires_at` (or before its `not_before`) AuthService's answer for a
    /// token may be and still be believed (default 5 s, Clerk's and AuthService's default
    /// `CLERK_CLOCK_SKEW_MS`): AuthService accepts tokens within its own skew, and the answer
    /// takes a moment to arrive. Keep it at AuthService's setting.
    pub clock_skew: Duration,
    /// Hybrid mode: verify in-process with this verifier when AuthService cannot answer.
    pub fallback: Option<TokenVerifier>,
    /// TLS (and a client certificate for mTLS) towards AuthService (`https://` endpoints).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// This layer's own token (e.g. an [`M2mTokenSource`](crate::credentials::m2m::M2mTokenSource)),
    /// sent as `authorization` on every `VerifyToken` call. With it (or with an mTLS
    /// certificate) on AuthService's `CLERK_AUTH_CLIENT_IP_FORWARDERS`, the end user's address
    /// is honoured for AuthService's per-source limits; without, every call counts under this
    /// layer's own address.
    pub credentials: Option<CallerCredentials>,
}

/// The token a delegated layer presents to AuthService as its own identity. Never printed.
#[derive(Clone)]
pub struct CallerCredentials(Arc<dyn TokenSource>);

impl CallerCredentials {
    /// Credentials from a token source (asked before each call; cache inside the source).
    pub fn new(source: impl TokenSource) -> Self {
        Self(Arc::new(source))
    }
}

impl std::fmt::Debug for CallerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerCredentials(…)")
    }
}

/// Counters kept by a [`DelegatedVerifier`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DelegatedStats {
    /// `VerifyToken` calls made.
    pub rpcs: u64,
    /// Verifications answered from the verdict cache (coalesced waiters included).
    pub cache_hits: u64,
    /// Verifications answered by the in-process fallback.
    pub fallbacks: u64,
    /// `VerifyToken` answers refused as unusable ([`MalformedAnswer`]).
    pub malformed_answers: u64,
}

/// Verifies tokens by asking AuthService. Cheap to clone.
#[derive(Clone)]
pub struct DelegatedVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    client: AuthServiceClient<Channel>,
    channel: Channel,
    revocations: Revocations,
    cache: Option<moka::future::Cache<[u8; 32], Verdict>>,
    deadline: Duration,
    clock_skew: f64,
    fallback: Option<TokenVerifier>,
    credentials: Option<CallerCredentials>,
    warned_credentials: AtomicBool,
    rpcs: AtomicU64,
    cache_hits: AtomicU64,
    fallbacks: AtomicU64,
    malformed_answers: AtomicU64,
}

/// Why a `VerifyToken` call gave no identity (what the verdict cache hands every coalesced
/// waiter; never cached).
#[derive(Debug, Clone)]
enum Failure {
    /// AuthService's verdict, or that it could not be reached.
    Auth(AuthError),
    /// An answer that cannot be used: refused, and not a reason to fall back.
    Malformed(MalformedAnswer),
}

/// The configuration cannot make a client (no endpoint, or one that is not a URI).
#[derive(Debug, thiserror::Error)]
#[error("delegated auth: {0}")]
pub struct DelegatedError(String);

/// A verdict of AuthService and how long AuthService says it may be kept
/// (`VerifyTokenResponse.cache_for`: what is left of its own cache entry for an opaque machine
/// token, so the two caches do not add up).
#[derive(Clone)]
struct Verdict {
    identity: Arc<Identity>,
    cache_for: Option<Duration>,
}

struct VerdictExpiry {
    max_age: Duration,
}

impl moka::Expiry<[u8; 32], Verdict> for VerdictExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        v: &Verdict,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let age = self.max_age.min(until(v.identity.expires_at));
        Some(v.cache_for.map_or(age, |c| age.min(c)))
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn until(exp: f64) -> Duration {
    Duration::from_secs_f64((exp - now_secs()).clamp(0.0, 86_400.0))
}

impl Default for DelegatedConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            deadline: Duration::from_millis(200),
            max_age: Duration::from_secs(10),
            cache_capacity: 10_000,
            connect_timeout: Duration::from_secs(1),
            clock_skew: Duration::from_millis(crate::token::check::DEFAULT_CLOCK_SKEW_MS),
            fallback: None,
            tls: None,
            credentials: None,
        }
    }
}

impl DelegatedVerifier {
    /// A verifier calling the configured endpoints (connections are made lazily, so the layer
    /// starts even while AuthService is down — and answers `UNAVAILABLE` until it is up).
    ///
    /// Logs a warning for each plaintext (`http://`) endpoint that is not loopback: its answers
    /// can be changed on the way.
    pub fn new(config: DelegatedConfig) -> Result<Self, DelegatedError> {
        if config.endpoints.is_empty() {
            return Err(DelegatedError("no AuthService endpoint configured".into()));
        }
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let ep = Channel::from_shared(e.clone())
                .map_err(|_| DelegatedError(format!("not a valid endpoint URI: {e:?}")))?;
            if is_plaintext_remote(ep.uri()) {
                tracing::warn!(
                    endpoint = %ep.uri(),
                    "the delegated layer talks plaintext to a non-loopback AuthService: anyone on \
                     the path can change its verdicts; use an https:// endpoint with \
                     DelegatedConfig::tls"
                );
            }
            let mut ep = ep
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true);
            if let Some(tls) = &config.tls {
                ep = ep
                    .tls_config(tls.clone())
                    .map_err(|e| DelegatedError(format!("TLS configuration: {e}")))?;
            }
            endpoints.push(ep);
        }
        let channel = if endpoints.len() == 1 {
            endpoints.pop().expect("one endpoint").connect_lazy()
        } else {
            Channel::balance_list(endpoints.into_iter())
        };
        Ok(Self::from_channel(channel, config))
    }

    /// A verifier over a channel built by the caller (TLS, custom balancing…);
    /// `config.endpoints` is ignored.
    pub fn from_channel(channel: Channel, config: DelegatedConfig) -> Self {
        let cache = (config.cache_capacity > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(config.cache_capacity)
                .expire_after(VerdictExpiry {
                    max_age: config.max_age,
                })
                .build()
        });
        Self {
            inner: Arc::new(Inner {
                client: AuthServiceClient::new(channel.clone()),
                channel,
                revocations: Revocations::new(Duration::from_secs(86_400), 1_000_000),
                cache,
                deadline: config.deadline,
                clock_skew: config.clock_skew.as_secs_f64(),
                fallback: config.fallback,
                credentials: config.credentials,
                warned_credentials: AtomicBool::new(false),
                rpcs: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
                malformed_answers: AtomicU64::new(0),
            }),
        }
    }

    /// Counters.
    pub fn stats(&self) -> DelegatedStats {
        DelegatedStats {
            rpcs: self.inner.rpcs.load(Ordering::Relaxed),
            cache_hits: self.inner.cache_hits.load(Ordering::Relaxed),
            fallbacks: self.inner.fallbacks.load(Ordering::Relaxed),
            malformed_answers: self.inner.malformed_answers.load(Ordering::Relaxed),
        }
    }

    /// The sessions this verifier refuses whatever its cache says (fed by
    /// [`DelegatedVerifier::watch_revocations`]).
    pub fn revocations(&self) -> &Revocations {
        &self.inner.revocations
    }

    /// Follows AuthService's `WatchRevocations` on this verifier's channel: a session revoked at
    /// AuthService (webhook, `RevokeSession`, another replica) is refused here at once, even
    /// for a verdict still in the cache. Keep the returned feed alive. The feed presents
    /// [`DelegatedConfig::credentials`] (or the channel's mTLS certificate): AuthService
    /// streams revocations to allowlisted callers only.
    pub fn watch_revocations(&self) -> RevocationFeed {
        super::feed::follow(
            self.inner.channel.clone(),
            self.inner.revocations.clone(),
            self.inner.credentials.as_ref().map(|c| c.0.clone()),
        )
    }

    /// Verifies a token: from the verdict cache, else by one `VerifyToken` call shared by
    /// every concurrent identical request, else (hybrid, AuthService unable to answer) with
    /// the in-process fallback. A session in [`DelegatedVerifier::revocations`] is refused
    /// with `SESSION_REVOKED` on every path. An answer that cannot be used (see the module
    /// docs) is `UNAVAILABLE` / `AUTH_SERVICE_UNAVAILABLE`, without fallback.
    pub async fn verify(&self, req: &VerifyRequest<'_>) -> Result<Arc<Identity>, AuthError> {
        let identity = self.verify_unrevoked(req).await?;
        if let Some(sid) = &identity.session_id {
            if self.inner.revocations.is_revoked(sid) {
                return Err(AuthError::Rejected(VerifyError::new(
                    Reason::SessionRevoked,
                    "The session was revoked.",
                )));
            }
        }
        Ok(identity)
    }

    async fn verify_unrevoked(&self, req: &VerifyRequest<'_>) -> Result<Arc<Identity>, AuthError> {
        if req.token.is_empty() {
            return Err(AuthError::InvalidRequest("token is empty"));
        }
        if req.token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::InvalidRequest("token exceeds 16 KiB"));
        }
        let result = match &self.inner.cache {
            None => self.call(req).await.map(|v| v.identity),
            Some(cache) => {
                let key = verdict_key(req, &TokenDigest::of(req.token));
                // The common case, without the coalescing machinery.
                if let Some(v) = cache.get(&key).await {
                    if v.identity.expires_at > now_secs() {
                        self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(v.identity);
                    }
                    cache.invalidate(&key).await;
                }
                let ran = std::sync::atomic::AtomicBool::new(false);
                let got = cache
                    .try_get_with(key, async {
                        ran.store(true, Ordering::Relaxed);
                        self.call(req).await
                    })
                    .await
                    .map(|v| v.identity);
                let fresh = ran.load(Ordering::Relaxed);
                match got {
                    // AuthService's own answer, checked by `check_answer` (clock skew included).
                    Ok(identity) if fresh => Ok(identity),
                    Ok(identity) if identity.expires_at > now_secs() => {
                        self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                        Ok(identity)
                    }
                    Ok(_) => {
                        // A cached verdict past the token's exp is never served.
                        cache.invalidate(&key).await;
                        self.call(req).await.map(|v| v.identity)
                    }
                    Err(e) => Err((*e).clone()),
                }
            }
        };
        match (result, &self.inner.fallback) {
            (Ok(identity), _) => Ok(identity),
            (Err(Failure::Auth(AuthError::Unavailable(_))), Some(fallback)) => {
                self.inner.fallbacks.fetch_add(1, Ordering::Relaxed);
                fallback.verify(req).await
            }
            (Err(Failure::Auth(e)), _) => Err(e),
            // Never the fallback: see the module docs.
            (Err(Failure::Malformed(m)), _) => Err(m.into()),
        }
    }

    /// One `VerifyToken` call, its answer checked ([`check_answer`]).
    async fn call(&self, req: &VerifyRequest<'_>) -> Result<Verdict, Failure> {
        let (answer, cache_for) = self.rpc(req).await.map_err(Failure::Auth)?;
        // A negative or out-of-range duration keeps nothing (fail closed: call again).
        let cache_for = cache_for.map(|d| Duration::try_from(d).unwrap_or(Duration::ZERO));
        let checked = match answer {
            None => Err(Failure::Malformed(MalformedAnswer::NoIdentity)),
            Some(p) => check_answer(&p, req, now_secs(), self.inner.clock_skew).map(|()| p),
        };
        match checked {
            Ok(p) => Ok(Verdict {
                identity: Arc::new(Identity::from_proto(p)),
                cache_for,
            }),
            Err(Failure::Malformed(m)) => {
                self.inner.malformed_answers.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    token = %token_fingerprint(req.token),
                    problem = %m,
                    "AuthService answered VerifyToken with an identity that cannot be used; \
                     refused with UNAVAILABLE"
                );
                Err(Failure::Malformed(m))
            }
            Err(e) => Err(e),
        }
    }

    /// The `VerifyToken` RPC: AuthService's identity (if its answer has one) and how long it
    /// may be kept (if AuthService says), or its error.
    #[allow(clippy::type_complexity)]
    async fn rpc(
        &self,
        req: &VerifyRequest<'_>,
    ) -> Result<(Option<pb::Identity>, Option<prost_types::Duration>), AuthError> {
        self.inner.rpcs.fetch_add(1, Ordering::Relaxed);
        let mut request = tonic::Request::new(pb::VerifyTokenRequest {
            token: req.token.to_owned(),
            authorized_parties: req.authorized_parties.to_vec(),
            accept_pending_session: req.accept_pending,
            accepted_token_types: req.accepted_types.iter().map(|t| *t as i32).collect(),
            client_ip: req.source.map(|ip| ip.to_string()).unwrap_or_default(),
            check_session_online: false,
            // `claims_json` carries the claims exactly and cheaply.
            claims_struct: false,
        });
        request.set_timeout(self.inner.deadline);
        if let Some(c) = &self.inner.credentials {
            // Our own identity only lets AuthService honour `client_ip`: without it the
            // verification still happens, counted under this layer's address.
            match c.0.token().await.map(|t| format!("Bearer {t}").parse()) {
                Ok(Ok(mut v)) => {
                    tonic::metadata::MetadataValue::set_sensitive(&mut v, true);
                    request.metadata_mut().insert("authorization", v);
                }
                _ => {
                    if !self.inner.warned_credentials.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "the delegated layer's own token could not be obtained; \
                             VerifyToken calls go without it"
                        );
                    }
                }
            }
        }
        let mut client = self.inner.client.clone();
        let answer = tokio::time::timeout(self.inner.deadline, client.verify_token(request)).await;
        match answer {
            Err(_elapsed) => Err(AuthError::Unavailable(Reason::AuthServiceUnavailable)),
            Ok(Err(status)) => Err(from_status(&status)),
            Ok(Ok(res)) => {
                let res = res.into_inner();
                Ok((res.identity, res.cache_for))
            }
        }
    }
}

/// Whether `uri` is plaintext (`http://`) to a host that is not loopback (`localhost`,
/// `127.0.0.0/8`, `::1`).
fn is_plaintext_remote(uri: &http::Uri) -> bool {
    if uri.scheme_str() != Some("http") {
        return false;
    }
    let host = uri.host().unwrap_or_default();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// Checks AuthService's "valid" against the request it answers and against itself (the list
/// is in the module docs). `now` and `skew` in seconds.
fn check_answer(
    p: &pb::Identity,
    req: &VerifyRequest<'_>,
    now: f64,
    skew: f64,
) -> Result<(), Failure> {
    use MalformedAnswer as M;
    let bad = |m| Err(Failure::Malformed(m));
    let ty = match TokenType::try_from(p.token_type) {
        Ok(TokenType::Unspecified) | Err(_) => return bad(M::UnknownTokenType),
        Ok(t) => t,
    };
    let accepted: &[TokenType] = if req.accepted_types.is_empty() {
        &[TokenType::SessionToken]
    } else {
        req.accepted_types
    };
    if !accepted.contains(&ty) {
        return bad(M::TokenTypeNotAccepted);
    }
    if ty == TokenType::SessionToken {
        if p.user_id.is_empty() {
            return bad(M::NoSubject);
        }
        if p.machine.is_some() {
            return bad(M::Inconsistent);
        }
        match SessionStatus::try_from(p.session_status) {
            Err(_) => return bad(M::UnknownSessionStatus),
            Ok(SessionStatus::Pending) if !req.accept_pending => return bad(M::PendingSession),
            Ok(_) => {}
        }
        if !req.authorized_parties.is_empty()
            && !req.authorized_parties.contains(&p.authorized_party)
        {
            return bad(M::AuthorizedParty);
        }
    } else {
        let subject = match &p.machine {
            Some(m) if !m.subject.is_empty() => m.subject.as_str(),
            _ => return bad(M::NoSubject),
        };
        // What `Identity::for_machine` derives from the subject, and nothing else: a machine
        // token read as a user, or as a member of an organization, would pass user and
        // organization checks it has no claim to.
        let user_id = match ty {
            TokenType::OauthToken => subject,
            TokenType::ApiKey if subject.starts_with("user_") => subject,
            _ => "",
        };
        let organization_ok = match &p.organization {
            None => true,
            Some(o) => {
                ty == TokenType::ApiKey
                    && subject.starts_with("org_")
                    && o.id == subject
                    && o.role.is_empty()
                    && o.permissions.is_empty()
            }
        };
        if p.user_id != user_id
            || !organization_ok
            || !p.session_id.is_empty()
            || p.session_status != SessionStatus::Unspecified as i32
            || p.actor.is_some()
        {
            return bad(M::Inconsistent);
        }
    }
    let secs = |t: &prost_types::Timestamp| t.seconds as f64 + f64::from(t.nanos) / 1e9;
    match &p.expires_at {
        // M2M tokens and API keys may never expire (Clerk's `expiration: null`).
        None if matches!(ty, TokenType::M2mToken | TokenType::ApiKey) => {}
        None => return bad(M::NoExpiry),
        // As Clerk's boundary: expired once `exp + skew <= now`.
        Some(exp) if secs(exp) + skew <= now => {
            return Err(Failure::Auth(AuthError::Rejected(VerifyError::new(
                Reason::TokenExpired,
                "JWT is expired.",
            ))));
        }
        Some(_) => {}
    }
    if p.not_before
        .as_ref()
        .is_some_and(|nbf| secs(nbf) > now + skew)
    {
        return Err(Failure::Auth(AuthError::Rejected(VerifyError::new(
            Reason::TokenNotActiveYet,
            "JWT cannot be used prior to not before date claim (nbf).",
        ))));
    }
    Ok(())
}

/// AuthService's answer, kept: its reason for a rejection, `UNAVAILABLE` for anything that is
/// not a verdict (transport errors, deadlines, internal errors) — never a pass.
fn from_status(status: &Status) -> AuthError {
    let reason = status
        .get_details_error_info()
        .and_then(|i| Reason::from_upper_snake(&i.reason));
    match status.code() {
        Code::Unauthenticated => AuthError::Rejected(VerifyError {
            reason: reason.unwrap_or(Reason::TokenInvalid),
            message: "the token was rejected by AuthService",
            cause: status.get_details_error_info().and_then(|i| {
                i.metadata
                    .get("cause")
                    .and_then(|c| Reason::from_upper_snake(c))
            }),
        }),
        Code::InvalidArgument => AuthError::InvalidRequest("the token was refused as malformed"),
        Code::FailedPrecondition => {
            AuthError::Misconfigured(reason.unwrap_or(Reason::SecretKeyInvalid))
        }
        Code::ResourceExhausted => AuthError::RateLimited {
            retry_after: status
                .get_details_retry_info()
                .and_then(|r| r.retry_delay)
                .unwrap_or(Duration::from_secs(1)),
        },
        Code::Unavailable => {
            AuthError::Unavailable(reason.unwrap_or(Reason::AuthServiceUnavailable))
        }
        _ => AuthError::Unavailable(Reason::AuthServiceUnavailable),
    }
}

impl Authenticate for DelegatedVerifier {
    fn authenticate<'a>(
        &'a self,
        req: VerifyRequest<'a>,
    ) -> BoxFuture<'a, Result<Arc<Identity>, AuthError>> {
        Box::pin(async move { self.verify(&req).await })
    }

    fn revocations(&self) -> Option<&Revocations> {
        Some(&self.inner.revocations)
    }
}

impl std::fmt::Debug for DelegatedVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelegatedVerifier")
            .field("deadline", &self.inner.deadline)
            .field("clock_skew", &self.inner.clock_skew)
            .field("hybrid", &self.inner.fallback.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: f64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs as i64,
            nanos: 0,
        })
    }

    fn session(now: f64) -> pb::Identity {
        pb::Identity {
            token_type: TokenType::SessionToken as i32,
            user_id: "user_1".into(),
            session_id: "sess_1".into(),
            session_status: SessionStatus::Active as i32,
            expires_at: ts(now + 60.0),
            ..pb::Identity::default()
        }
    }

    fn machine(ty: TokenType, subject: &str, user_id: &str) -> pb::Identity {
        pb::Identity {
            token_type: ty as i32,
            user_id: user_id.into(),
            machine: Some(pb::Machine {
                subject: subject.into(),
                ..pb::Machine::default()
            }),
            ..pb::Identity::default()
        }
    }

    fn malformed(r: Result<(), Failure>) -> Option<MalformedAnswer> {
        match r {
            Err(Failure::Malformed(m)) => Some(m),
            _ => None,
        }
    }

    #[test]
    fn answers_are_checked_against_the_request() {
        use MalformedAnswer as M;
        let now = 1_000_000.0;
        let req = VerifyRequest {
            token: "t",
            ..VerifyRequest::default()
        };
        let all = [
            TokenType::SessionToken,
            TokenType::M2mToken,
            TokenType::OauthToken,
            TokenType::ApiKey,
        ];
        let any = VerifyRequest {
            accepted_types: &all,
            ..req
        };
        let parties = ["https://a.example".to_owned()];
        let with_parties = VerifyRequest {
            authorized_parties: &parties,
            ..req
        };
        let check = |p: pb::Identity, r: &VerifyRequest<'_>| check_answer(&p, r, now, 5.0);
        assert!(check(session(now), &req).is_ok());
        let cases: Vec<(&str, pb::Identity, &VerifyRequest<'_>, MalformedAnswer)> = vec![
            ("empty", pb::Identity::default(), &req, M::UnknownTokenType),
            (
                "unknown type",
                pb::Identity {
                    token_type: 99,
                    ..session(now)
                },
                &any,
                M::UnknownTokenType,
            ),
            (
                "m2m for a session-only rule",
                machine(TokenType::M2mToken, "mch_1", ""),
                &req,
                M::TokenTypeNotAccepted,
            ),
            (
                "no user id",
                pb::Identity {
                    user_id: String::new(),
                    ..session(now)
                },
                &req,
                M::NoSubject,
            ),
            (
                "no expiry",
                pb::Identity {
                    expires_at: None,
                    ..session(now)
                },
                &req,
                M::NoExpiry,
            ),
            (
                "pending",
                pb::Identity {
                    session_status: SessionStatus::Pending as i32,
                    ..session(now)
                },
                &req,
                M::PendingSession,
            ),
            (
                "unknown status",
                pb::Identity {
                    session_status: 7,
                    ..session(now)
                },
                &req,
                M::UnknownSessionStatus,
            ),
            (
                "machine fields on a session",
                pb::Identity {
                    machine: Some(pb::Machine::default()),
                    ..session(now)
                },
                &req,
                M::Inconsistent,
            ),
            (
                "azp not asked for",
                session(now),
                &with_parties,
                M::AuthorizedParty,
            ),
            (
                "machine without subject",
                machine(TokenType::M2mToken, "", ""),
                &any,
                M::NoSubject,
            ),
            (
                "m2m read as a user",
                machine(TokenType::M2mToken, "mch_1", "user_1"),
                &any,
                M::Inconsistent,
            ),
            (
                "m2m with a session id",
                pb::Identity {
                    session_id: "sess_1".into(),
                    ..machine(TokenType::M2mToken, "mch_1", "")
                },
                &any,
                M::Inconsistent,
            ),
            (
                "m2m in an organization",
                pb::Identity {
                    organization: Some(pb::Organization {
                        id: "org_1".into(),
                        role: "org:admin".into(),
                        ..pb::Organization::default()
                    }),
                    ..machine(TokenType::M2mToken, "mch_1", "")
                },
                &any,
                M::Inconsistent,
            ),
            (
                "oauth without expiry",
                machine(TokenType::OauthToken, "user_1", "user_1"),
                &any,
                M::NoExpiry,
            ),
        ];
        for (what, p, r, want) in cases {
            assert_eq!(malformed(check(p, r)), Some(want), "{what}");
        }
        // Machine tokens as AuthService builds them pass; M2M tokens and API keys may never
        // expire.
        assert!(check(machine(TokenType::M2mToken, "mch_1", ""), &any).is_ok());
        assert!(check(machine(TokenType::ApiKey, "user_1", "user_1"), &any).is_ok());
        let org_key = pb::Identity {
            organization: Some(pb::Organization {
                id: "org_1".into(),
                ..pb::Organization::default()
            }),
            ..machine(TokenType::ApiKey, "org_1", "")
        };
        assert!(check(org_key, &any).is_ok());
        let oauth = pb::Identity {
            expires_at: ts(now + 60.0),
            ..machine(TokenType::OauthToken, "user_1", "user_1")
        };
        assert!(check(oauth, &any).is_ok());
    }

    #[test]
    fn time_is_checked_with_the_skew() {
        let now = 1_000_000.0;
        let req = VerifyRequest {
            token: "t",
            ..VerifyRequest::default()
        };
        let at = |exp: f64, nbf: Option<f64>| {
            let p = pb::Identity {
                expires_at: ts(exp),
                not_before: nbf.and_then(ts),
                ..session(now)
            };
            match check_answer(&p, &req, now, 5.0) {
                Ok(()) => None,
                Err(Failure::Auth(AuthError::Rejected(e))) => Some(e.reason),
                Err(other) => panic!("{other:?}"),
            }
        };
        assert_eq!(at(now - 2.0, None), None, "within the skew");
        assert_eq!(at(now - 5.0, None), Some(Reason::TokenExpired));
        assert_eq!(at(now - 3600.0, None), Some(Reason::TokenExpired));
        assert_eq!(at(now + 60.0, Some(now + 3.0)), None);
        assert_eq!(
            at(now + 60.0, Some(now + 60.0)),
            Some(Reason::TokenNotActiveYet)
        );
    }

    #[test]
    fn plaintext_is_flagged_off_loopback_only() {
        let flagged = |u: &str| is_plaintext_remote(&u.parse().unwrap());
        for u in [
            "http://auth.internal:50051",
            "http://10.0.0.7:50051",
            "http://[2001:db8::1]:50051",
            "http://127.example.com:50051",
        ] {
            assert!(flagged(u), "{u}");
        }
        for u in [
            "http://127.0.0.1:50051",
            "http://127.1.2.3:50051",
            "http://[::1]:50051",
            "http://localhost:50051",
            "https://auth.internal:50051",
        ] {
            assert!(!flagged(u), "{u}");
        }
    }
}
