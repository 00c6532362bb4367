//! Delegated verification: `clerk.auth.v1.AuthService/VerifyToken` over a tonic `Channel`,
//! behind a verdict cache, with coalescing, a per-call deadline, fail-closed errors and an
//! optional in-process fallback (hybrid).

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
    client::TokenSource,
    error::{AuthError, Reason, VerifyError},
    identity::Identity,
    pb::{self, auth_service_client::AuthServiceClient},
    revocation::Revocations,
    token_verifier::verdict_key,
    TokenVerifier, VerifyRequest, MAX_TOKEN_BYTES,
};

/// Settings of a [`DelegatedVerifier`].
#[derive(Debug, Clone)]
pub struct DelegatedConfig {
    /// AuthService endpoints (`http://host:port`); calls are balanced over all of them.
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
    /// Hybrid mode: verify in-process with this verifier when AuthService cannot answer.
    pub fallback: Option<TokenVerifier>,
    /// TLS (and a client certificate for mTLS) towards AuthService (`https://` endpoints).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// This layer's own token (e.g. an [`M2mTokenSource`](crate::machine::M2mTokenSource)),
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
    cache: Option<moka::future::Cache<[u8; 32], Arc<Identity>>>,
    deadline: Duration,
    fallback: Option<TokenVerifier>,
    credentials: Option<CallerCredentials>,
    warned_credentials: AtomicBool,
    rpcs: AtomicU64,
    cache_hits: AtomicU64,
    fallbacks: AtomicU64,
}

/// The configuration cannot make a client (no endpoint, or one that is not a URI).
#[derive(Debug, thiserror::Error)]
#[error("delegated auth: {0}")]
pub struct DelegatedError(String);

struct VerdictExpiry {
    max_age: Duration,
}

impl moka::Expiry<[u8; 32], Arc<Identity>> for VerdictExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        identity: &Arc<Identity>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.max_age.min(until(identity.expires_at)))
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
            fallback: None,
            tls: None,
            credentials: None,
        }
    }
}

impl DelegatedVerifier {
    /// A verifier calling the configured endpoints (connections are made lazily, so the layer
    /// starts even while AuthService is down — and answers `UNAVAILABLE` until it is up).
    pub fn new(config: DelegatedConfig) -> Result<Self, DelegatedError> {
        if config.endpoints.is_empty() {
            return Err(DelegatedError("no AuthService endpoint configured".into()));
        }
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let mut ep = Channel::from_shared(e.clone())
                .map_err(|_| DelegatedError(format!("not a valid endpoint URI: {e:?}")))?
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
                fallback: config.fallback,
                credentials: config.credentials,
                warned_credentials: AtomicBool::new(false),
                rpcs: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
            }),
        }
    }

    /// Counters.
    pub fn stats(&self) -> DelegatedStats {
        DelegatedStats {
            rpcs: self.inner.rpcs.load(Ordering::Relaxed),
            cache_hits: self.inner.cache_hits.load(Ordering::Relaxed),
            fallbacks: self.inner.fallbacks.load(Ordering::Relaxed),
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
    /// with `SESSION_REVOKED` on every path.
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
            None => self.call(req).await,
            Some(cache) => {
                let key = verdict_key(req);
                // The common case, without the coalescing machinery.
                if let Some(identity) = cache.get(&key).await {
                    if identity.expires_at > now_secs() {
                        self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(identity);
                    }
                    cache.invalidate(&key).await;
                }
                let ran = std::sync::atomic::AtomicBool::new(false);
                let got = cache
                    .try_get_with(key, async {
                        ran.store(true, Ordering::Relaxed);
                        self.call(req).await
                    })
                    .await;
                let fresh = ran.load(Ordering::Relaxed);
                match got {
                    // AuthService's own answer stands (it applies its clock skew).
                    Ok(identity) if fresh => Ok(identity),
                    Ok(identity) if identity.expires_at > now_secs() => {
                        self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                        Ok(identity)
                    }
                    Ok(_) => {
                        // A cached verdict past the token's exp is never served.
                        cache.invalidate(&key).await;
                        self.call(req).await
                    }
                    Err(e) => Err((*e).clone()),
                }
            }
        };
        match (result, &self.inner.fallback) {
            (Err(AuthError::Unavailable(_)), Some(fallback)) => {
                self.inner.fallbacks.fetch_add(1, Ordering::Relaxed);
                fallback.verify(req).await
            }
            (r, _) => r,
        }
    }

    async fn call(&self, req: &VerifyRequest<'_>) -> Result<Arc<Identity>, AuthError> {
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
            Ok(Ok(res)) => match res.into_inner().identity {
                Some(identity) => Ok(Arc::new(Identity::from_proto(identity))),
                None => Err(AuthError::Unavailable(Reason::AuthServiceUnavailable)),
            },
        }
    }
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
}

impl std::fmt::Debug for DelegatedVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelegatedVerifier")
            .field("deadline", &self.inner.deadline)
            .field("hybrid", &self.inner.fallback.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}
