//! Opaque machine tokens (`mt_…`, `ak_…`, `oat_…`) verified by Clerk's Backend API
//! (`POST …/verify`) through the shared [`ClerkApi`], behind a verdict cache, a short negative
//! cache, coalescing of identical verifications, a per-source rate limit, the Clerk's
//! replica-wide budget and its `Retry-After` (shared with every other path of the same
//! [`ClerkApi`]).
//!
//! What an answer means is decided here: Clerk's explicit refusals (404, or a 4xx whose code
//! says revoked, expired or not found) are `UNAUTHENTICATED` and remembered in the negative
//! cache; any other 4xx says nothing about the token and is `UNAVAILABLE`, never cached; the
//! rest (key refused, 429, network, 5xx) is the shared classification of [`ApiError`].

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::{
    clerk::{
        api::{ApiError, ApiRequest, ClerkApi, Endpoint},
        budget::{source_key, ClerkBudget},
    },
    error::{AuthError, Reason, VerifyError},
    secret::Secret,
    token::identity::{Identity, MachineInfo, TokenType},
};

/// Largest Backend API answer read (a verify response is well under 4 KiB).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Settings of a [`MachineVerifier`].
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// The Backend API base URL (`https://api.clerk.com`); verify paths are un-versioned, as in
    /// Clerk's JS SDK (`/m2m_tokens/verify`, `/api_keys/verify`,
    /// `/oauth_applications/access_tokens/verify`).
    pub api_url: url::Url,
    /// The instance secret key (`sk_…`): API keys, OAuth tokens, and M2M tokens when no
    /// machine secret key is set.
    pub secret_key: Option<Secret>,
    /// The machine secret key (`ak_…`, `CLERK_MACHINE_SECRET_KEY`): M2M tokens.
    pub machine_secret_key: Option<Secret>,
    /// Timeout of one Backend API call (default 3 s).
    pub timeout: Duration,
    /// Longest time a positive verdict is reused (default 10 s): a revocation at Clerk is seen
    /// within it. A verdict never outlives the token's expiration either.
    pub max_age: Duration,
    /// Most verdicts kept (default 10 000).
    pub cache_capacity: u64,
    /// How long a refusal (unknown, revoked, expired token) is remembered (default 10 s).
    pub negative_ttl: Duration,
    /// Per-source token bucket (a source is an IPv4 address or an IPv6 `/64`): burst
    /// (default 20) …
    pub per_source_burst: u32,
    /// … and refill per second (default 10), as Clerk's SDK.
    pub per_source_per_sec: f64,
    /// Most sources tracked (default 10 000; the least recently seen are dropped).
    pub max_sources: u64,
}

impl MachineConfig {
    /// Defaults for everything but the URL and keys.
    pub fn new(
        api_url: url::Url,
        secret_key: Option<Secret>,
        machine_secret_key: Option<Secret>,
    ) -> Self {
        Self {
            api_url,
            secret_key,
            machine_secret_key,
            timeout: Duration::from_secs(3),
            max_age: Duration::from_secs(10),
            cache_capacity: 10_000,
            negative_ttl: Duration::from_secs(10),
            per_source_burst: 20,
            per_source_per_sec: 10.0,
            max_sources: 10_000,
        }
    }
}

/// Counters kept by a [`MachineVerifier`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MachineStats {
    /// Backend API verify calls made.
    pub api_calls: u64,
    /// Answered from the verdict cache.
    pub cache_hits: u64,
    /// Answered from the negative cache.
    pub negative_hits: u64,
    /// Refused by the per-source limit, the replica-wide budget, or while Clerk's
    /// `Retry-After` runs.
    pub rate_limited: u64,
    /// 429 answers from Clerk.
    pub clerk_429s: u64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Inner {
    endpoint: Endpoint,
    config: MachineConfig,
    cache: moka::future::Cache<[u8; 32], Cached>,
    negative: moka::future::Cache<[u8; 32], VerifyError>,
    buckets: moka::sync::Cache<IpAddr, Arc<Mutex<Bucket>>>,
    warned_key: AtomicBool,
    api_calls: AtomicU64,
    cache_hits: AtomicU64,
    negative_hits: AtomicU64,
    rate_limited: AtomicU64,
    clerk_429s: AtomicU64,
}

/// Verifies opaque machine tokens through the Backend API. Cheap to clone.
#[derive(Clone)]
pub struct MachineVerifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MachineVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineVerifier")
            .field("api_url", &self.inner.config.api_url.as_str())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A verdict and when its cache entry ends (so what is left of it can be told to a delegated
/// layer: `VerifyTokenResponse.cache_for`).
#[derive(Clone)]
struct Cached {
    identity: Arc<Identity>,
    until: Instant,
}

impl Cached {
    /// The verdict, kept for `max_age` but never past the token's `exp`.
    fn new(identity: Arc<Identity>, max_age: Duration) -> Self {
        let left = (identity.expires_at - now_secs()).clamp(0.0, 86_400.0);
        Self {
            until: Instant::now() + max_age.min(Duration::from_secs_f64(left)),
            identity,
        }
    }
}

struct VerdictExpiry;

impl moka::Expiry<[u8; 32], Cached> for VerdictExpiry {
    fn expire_after_create(&self, _: &[u8; 32], c: &Cached, now: Instant) -> Option<Duration> {
        Some(c.until.saturating_duration_since(now))
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The object a verify endpoint answers (fields we use; unknown fields ignored).
#[derive(Debug, Deserialize)]
struct MachineObject {
    #[serde(default)]
    id: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    claims: Option<Map<String, Value>>,
    #[serde(default)]
    revoked: bool,
    #[serde(default)]
    expired: bool,
    /// Milliseconds since the epoch, or null for no expiry.
    #[serde(default)]
    expiration: Option<f64>,
    #[serde(default)]
    created_at: Option<f64>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    /// `{"active": false}`: an expired JWT access token (OAuth endpoint).
    #[serde(default)]
    active: Option<bool>,
}

const NOT_FOUND: VerifyError = VerifyError::new(Reason::TokenInvalid, "Machine token not found.");
const REVOKED: VerifyError =
    VerifyError::new(Reason::TokenRevoked, "The machine token has been revoked.");
const EXPIRED: VerifyError =
    VerifyError::new(Reason::TokenExpired, "The machine token has expired.");
const REFUSED: VerifyError =
    VerifyError::new(Reason::TokenInvalid, "Clerk refused the machine token.");

impl MachineVerifier {
    /// A verifier calling Clerk through `api`: its HTTP client, and the budget and
    /// `Retry-After` of the Clerk at `config.api_url`, are shared with every other path of
    /// `api` (identity queries, the M2M token source).
    pub fn new(config: MachineConfig, api: &ClerkApi) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(config.cache_capacity)
            .expire_after(VerdictExpiry)
            .build();
        let negative = moka::future::Cache::builder()
            .max_capacity(config.cache_capacity)
            .time_to_live(config.negative_ttl)
            .build();
        let buckets = moka::sync::Cache::builder()
            .max_capacity(config.max_sources)
            .time_to_idle(Duration::from_secs(120))
            .build();
        Self {
            inner: Arc::new(Inner {
                endpoint: api.endpoint(&config.api_url),
                config,
                cache,
                negative,
                buckets,
                warned_key: AtomicBool::new(false),
                api_calls: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                negative_hits: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
                clerk_429s: AtomicU64::new(0),
            }),
        }
    }

    /// The Backend API budget this verifier spends (shared with every path to the same Clerk
    /// through the same [`ClerkApi`]).
    pub fn budget(&self) -> &ClerkBudget {
        self.inner.endpoint.budget()
    }

    /// The client this verifier sends through.
    pub fn client(&self) -> &ClerkApi {
        self.inner.endpoint.api()
    }

    /// Counters.
    pub fn stats(&self) -> MachineStats {
        let i = &self.inner;
        MachineStats {
            api_calls: i.api_calls.load(Ordering::Relaxed),
            cache_hits: i.cache_hits.load(Ordering::Relaxed),
            negative_hits: i.negative_hits.load(Ordering::Relaxed),
            rate_limited: i.rate_limited.load(Ordering::Relaxed),
            clerk_429s: i.clerk_429s.load(Ordering::Relaxed),
        }
    }

    /// How much longer the verdict for `token` stays in this verifier's cache (`None`: not
    /// cached). A delegated layer is told to keep it no longer (`VerifyTokenResponse.cache_for`),
    /// so a revoked machine token is refused within this verifier's `max_age`.
    pub async fn cache_left(&self, token: &str) -> Option<Duration> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let c = self.inner.cache.get(&key).await?;
        Some(c.until.saturating_duration_since(Instant::now()))
    }

    /// The longest a verdict is cached (`max_age`).
    pub fn max_age(&self) -> Duration {
        self.inner.config.max_age
    }

    /// Verifies an opaque token of `token_type` (from its prefix) for a caller at `source`.
    pub async fn verify(
        &self,
        token: &str,
        token_type: TokenType,
        source: Option<IpAddr>,
    ) -> Result<Arc<Identity>, AuthError> {
        let inner = &self.inner;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = inner.cache.get(&key).await {
            if c.identity.expires_at > now_secs() {
                inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(c.identity);
            }
            inner.cache.invalidate(&key).await;
        }
        if let Some(e) = inner.negative.get(&key).await {
            inner.negative_hits.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::Rejected(e));
        }
        // Only the call that actually goes to Clerk is admitted by the limits: identical
        // verifications waiting for it cost nothing.
        let result = inner
            .cache
            .try_get_with(key, async {
                self.admit(source)?;
                let identity = self.call(token, token_type).await?;
                Ok::<_, AuthError>(Cached::new(identity, inner.config.max_age))
            })
            .await
            .map(|c| c.identity)
            .map_err(|e| (*e).clone());
        match result {
            Ok(id) => {
                // Verified by Clerk (not a cache hit): the source may spend the reserve.
                if let Some(source) = source {
                    self.budget().mark_known(source);
                }
                Ok(id)
            }
            Err(AuthError::Rejected(e)) => {
                inner.negative.insert(key, e.clone()).await;
                Err(AuthError::Rejected(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Clerk's `Retry-After`, the per-source bucket, then the replica-wide budget (strangers
    /// may not spend its reserve): a refusal costs Clerk nothing.
    fn admit(&self, source: Option<IpAddr>) -> Result<(), AuthError> {
        let inner = &self.inner;
        let refuse = |retry_after: Duration| {
            inner.rate_limited.fetch_add(1, Ordering::Relaxed);
            Err(AuthError::RateLimited { retry_after })
        };
        if let Some(left) = self.budget().gate().remaining() {
            return refuse(left);
        }
        let now = Instant::now();
        let cfg = &inner.config;
        let key = source_key(source.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        let bucket = inner.buckets.get_with(key, || {
            Arc::new(Mutex::new(Bucket {
                tokens: f64::from(cfg.per_source_burst),
                at: now,
            }))
        });
        {
            let mut b = bucket.lock().expect("bucket lock");
            let refill = now.duration_since(b.at).as_secs_f64() * cfg.per_source_per_sec;
            b.tokens = (b.tokens + refill).min(f64::from(cfg.per_source_burst));
            b.at = now;
            if b.tokens < 1.0 {
                let wait = (1.0 - b.tokens) / cfg.per_source_per_sec.max(f64::MIN_POSITIVE);
                drop(b);
                return refuse(Duration::from_secs_f64(wait.min(60.0)));
            }
            b.tokens -= 1.0;
        }
        if let Err(wait) = self.budget().try_spend(self.budget().spender_for(source)) {
            // Not spent at Clerk: the source's token goes back.
            let mut b = bucket.lock().expect("bucket lock");
            b.tokens = (b.tokens + 1.0).min(f64::from(cfg.per_source_burst));
            drop(b);
            return refuse(wait);
        }
        Ok(())
    }

    async fn call(&self, token: &str, token_type: TokenType) -> Result<Arc<Identity>, AuthError> {
        let inner = &self.inner;
        let cfg = &inner.config;
        let (path, body_key, secret) = match token_type {
            TokenType::M2mToken => (
                "m2m_tokens/verify",
                "token",
                cfg.machine_secret_key.as_ref().or(cfg.secret_key.as_ref()),
            ),
            TokenType::OauthToken => (
                "oauth_applications/access_tokens/verify",
                "access_token",
                cfg.secret_key.as_ref(),
            ),
            _ => ("api_keys/verify", "secret", cfg.secret_key.as_ref()),
        };
        let secret = secret.ok_or(AuthError::Misconfigured(Reason::SecretKeyMissing))?;
        inner.api_calls.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::json!({ body_key: token });
        let sent = inner
            .endpoint
            .send::<MachineObject>(ApiRequest {
                method: reqwest::Method::POST,
                path,
                key: secret,
                timeout: cfg.timeout,
                body: Some(&body),
                max_body: MAX_BODY_BYTES,
            })
            .await;
        let e = match sent {
            Ok(obj) => return to_identity(obj, token_type).map(Arc::new),
            // Only Clerk's explicit word is a refusal (and remembered): a revoked or expired
            // token, or one it does not know. Any other 4xx (408, 409, 422 …) says nothing
            // about the token — it is Clerk being unusable for now, never cached.
            Err(ApiError::NotFound) => return Err(AuthError::Rejected(NOT_FOUND)),
            Err(ApiError::Refused { code, .. }) if code.contains("revoked") => {
                return Err(AuthError::Rejected(REVOKED))
            }
            Err(ApiError::Refused { code, .. }) if code.contains("expired") => {
                return Err(AuthError::Rejected(EXPIRED))
            }
            Err(ApiError::Refused { code, .. }) if code.contains("not_found") => {
                return Err(AuthError::Rejected(NOT_FOUND))
            }
            Err(e) => e,
        };
        match &e {
            ApiError::KeyRefused(status) => {
                if !inner.warned_key.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        api_url = %inner.endpoint.base(),
                        status,
                        "Clerk refused the secret key used for machine tokens; check \
                         CLERK_SECRET_KEY / CLERK_MACHINE_SECRET_KEY"
                    );
                }
            }
            ApiError::RateLimited(wait) => {
                inner.clerk_429s.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(?wait, "Clerk rate-limited machine-token verification");
            }
            ApiError::Suspended(_) => {}
            e => {
                tracing::warn!(api_url = %inner.endpoint.base(), error = %e, "Backend API machine-token verification failed");
            }
        }
        Err(e.into())
    }
}

fn to_identity(o: MachineObject, token_type: TokenType) -> Result<Identity, AuthError> {
    if o.active == Some(false) {
        return Err(AuthError::Rejected(EXPIRED));
    }
    if o.revoked {
        return Err(AuthError::Rejected(REVOKED));
    }
    let expires_at = o.expiration.map_or(f64::INFINITY, |ms| ms / 1000.0);
    if o.expired || expires_at <= now_secs() {
        return Err(AuthError::Rejected(EXPIRED));
    }
    if o.subject.is_empty() {
        return Err(AuthError::Rejected(REFUSED));
    }
    let info = MachineInfo {
        machine_id: (token_type == TokenType::M2mToken).then(|| o.subject.clone()),
        subject: o.subject,
        scopes: o.scopes,
        client_id: o.client_id.filter(|c| !c.is_empty()),
        name: o.name.filter(|n| !n.is_empty()),
    };
    Ok(Identity::for_machine(
        token_type,
        o.id,
        info,
        o.claims.unwrap_or_default(),
        None,
        o.created_at.map(|ms| ms / 1000.0),
        expires_at,
        None,
    ))
}
