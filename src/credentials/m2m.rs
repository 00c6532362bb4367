//! Outgoing M2M tokens: created through the Backend API (`POST /m2m_tokens`) with the machine
//! secret key, cached, refreshed before they expire (one creation in flight at a time), and
//! handed to the client credentials layer ([`crate::credentials::CredentialsLayer`]).
//!
//! Creation goes through the shared [`ClerkApi`]: its HTTP client, its bounded reader, its
//! error classification (into [`AuthError`], then `Status`), and the `Retry-After` gate of the
//! Clerk at `api_url` — after a 429 on any path of that client (identity queries, machine-token
//! verification, this source), no token is asked for before it has passed; the call answers
//! `RESOURCE_EXHAUSTED` / `RATE_LIMITED` at once (or the current token, while it is valid).
//! Only the credential differs: this path authenticates with the machine secret key.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use serde::Deserialize;
use tonic::Status;

use crate::{
    clerk::api::{ApiError, ApiRequest, ClerkApi, Endpoint},
    credentials::TokenSource,
    error::{AuthError, Reason},
    secret::Secret,
};

/// Largest creation answer read (one token object, well under 4 KiB).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Settings of an [`M2mTokenSource`].
#[derive(Debug, Clone)]
pub struct M2mTokenSourceConfig {
    /// The Backend API base URL (`https://api.clerk.com`).
    pub api_url: url::Url,
    /// This service's machine secret key (`ak_…`).
    pub machine_secret_key: Secret,
    /// Lifetime asked for each token (default 1 h). `None`: tokens that do not expire (then
    /// one token is kept for the process's life).
    pub lifetime: Option<Duration>,
    /// Ask for JWT-format tokens (verified by the callee without a Backend API call) instead
    /// of opaque ones (revocable).
    pub jwt: bool,
    /// Timeout of one creation call (default 5 s).
    pub timeout: Duration,
}

impl M2mTokenSourceConfig {
    /// Defaults: one-hour opaque tokens.
    pub fn new(api_url: url::Url, machine_secret_key: Secret) -> Self {
        Self {
            api_url,
            machine_secret_key,
            lifetime: Some(Duration::from_secs(3600)),
            jwt: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The cached token. Its times are on this process's monotonic clock, anchored when Clerk's
/// answer arrived, from the lifetime Clerk reports (`expiration − created_at`): the local wall
/// clock being off by an hour changes nothing.
#[derive(Clone)]
struct Current {
    token: Arc<str>,
    /// `None`: the token does not expire.
    expires_at: Option<Instant>,
    /// When to start replacing it.
    refresh_at: Option<Instant>,
    /// Already replaced once because a callee refused its predecessor: a refusal of this one
    /// waits for the normal refresh (no creation storm when the callee refuses every token).
    after_rejection: bool,
}

impl Current {
    fn due(&self, now: Instant) -> bool {
        self.refresh_at.is_some_and(|r| now >= r)
    }

    fn valid(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }
}

type Creation = Shared<BoxFuture<'static, Result<Current, AuthError>>>;

struct Inner {
    endpoint: Endpoint,
    config: M2mTokenSourceConfig,
    current: Mutex<Option<Current>>,
    inflight: Mutex<Option<Creation>>,
    created: AtomicU64,
}

/// Creates and caches this service's M2M token. Cheap to clone.
#[derive(Clone)]
pub struct M2mTokenSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for M2mTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("M2mTokenSource")
            .field("api_url", &self.inner.config.api_url.as_str())
            .field("created", &self.created())
            .finish()
    }
}

#[derive(Deserialize)]
struct Created {
    token: String,
    /// Milliseconds since the epoch, or null.
    #[serde(default)]
    expiration: Option<f64>,
    /// Milliseconds since the epoch (Clerk's clock, like `expiration`).
    #[serde(default)]
    created_at: Option<f64>,
}

/// The token's lifetime as Clerk states it, both ends on Clerk's clock: `expiration −
/// created_at`, else the lifetime asked for. `None`: it does not expire. Never longer than
/// asked for (or 30 days when none was), never negative.
fn lifetime(c: &Created, asked: Option<Duration>) -> Option<Duration> {
    let expiration = c.expiration?;
    let cap = asked.unwrap_or(Duration::from_secs(30 * 86_400));
    let secs = match c.created_at {
        Some(created) if created.is_finite() && expiration.is_finite() => {
            (expiration - created) / 1000.0
        }
        _ => cap.as_secs_f64(),
    };
    Some(Duration::from_secs_f64(secs.clamp(0.0, cap.as_secs_f64())))
}

impl M2mTokenSource {
    /// A source creating tokens through `api` (its HTTP client and the `Retry-After` of the
    /// Clerk at `config.api_url` are shared with every other path of `api`). Build `api` with
    /// [`ClerkApi::new`] when nothing else calls Clerk; nothing is sent before the first
    /// [`M2mTokenSource::get`].
    pub fn new(config: M2mTokenSourceConfig, api: &ClerkApi) -> Self {
        Self {
            inner: Arc::new(Inner {
                endpoint: api.endpoint(&config.api_url),
                config,
                current: Mutex::new(None),
                inflight: Mutex::new(None),
                created: AtomicU64::new(0),
            }),
        }
    }

    /// Tokens created so far.
    pub fn created(&self) -> u64 {
        self.inner.created.load(Ordering::Relaxed)
    }

    /// The token to send now: the cached one while it is not due for refresh; otherwise a new
    /// one (one creation at a time, shared by every caller). If creating fails while the
    /// cached token is still valid, the cached token is used. Errors are the crate's one
    /// mapping ([`crate::error`]): `UNAVAILABLE` / `BACKEND_API_UNAVAILABLE` (network, 5xx,
    /// another 4xx, an unusable answer), `FAILED_PRECONDITION` / `SECRET_KEY_INVALID` (Clerk
    /// refused the machine secret key), `RESOURCE_EXHAUSTED` / `RATE_LIMITED` with a
    /// `RetryInfo` (a 429, or another path's `Retry-After` still running).
    pub async fn get(&self) -> Result<Arc<str>, Status> {
        let cached = self.inner.current.lock().expect("token lock").clone();
        if let Some(c) = &cached {
            if !c.due(Instant::now()) {
                return Ok(c.token.clone());
            }
        }
        match self.creation().await {
            Ok(c) => Ok(c.token),
            Err(e) => match cached {
                Some(c) if c.valid(Instant::now()) => {
                    tracing::warn!(error = %e, "M2M token refresh failed; using the current token");
                    Ok(c.token)
                }
                _ => Err(e.into()),
            },
        }
    }

    /// A callee refused `token`: the next [`M2mTokenSource::get`] creates a new one — once;
    /// if the new one is refused too, it is kept until its normal refresh.
    pub fn rejected(&self, token: &str) {
        let mut current = self.inner.current.lock().expect("token lock");
        if let Some(c) = current.as_mut() {
            if &*c.token == token && !c.after_rejection {
                tracing::info!("a callee refused the M2M token; creating a new one");
                c.refresh_at = Some(Instant::now());
                c.after_rejection = true;
            }
        }
    }

    fn creation(&self) -> Creation {
        let mut inflight = self.inner.inflight.lock().expect("inflight lock");
        if let Some(f) = inflight.clone() {
            return f;
        }
        let this = self.clone();
        let after_rejection = self
            .inner
            .current
            .lock()
            .expect("token lock")
            .as_ref()
            .is_some_and(|c| c.after_rejection);
        let fut = async move {
            let mut result = this.create().await;
            if let Ok(c) = &mut result {
                c.after_rejection = after_rejection;
                *this.inner.current.lock().expect("token lock") = Some(c.clone());
            }
            *this.inner.inflight.lock().expect("inflight lock") = None;
            result
        }
        .boxed()
        .shared();
        *inflight = Some(fut.clone());
        fut
    }

    async fn create(&self) -> Result<Current, AuthError> {
        let cfg = &self.inner.config;
        let mut body = serde_json::json!({
            "seconds_until_expiration": cfg.lifetime.map(|d| d.as_secs()),
        });
        if cfg.jwt {
            body["token_format"] = "jwt".into();
        }
        let sent = Instant::now();
        let created: Created = self
            .inner
            .endpoint
            .send(ApiRequest {
                method: reqwest::Method::POST,
                path: "m2m_tokens",
                key: &cfg.machine_secret_key,
                timeout: cfg.timeout,
                body: Some(&body),
                max_body: MAX_BODY_BYTES,
            })
            .await
            .map_err(|e| {
                let api_url = self.inner.endpoint.base();
                match &e {
                    ApiError::KeyRefused(status) => tracing::error!(
                        %api_url,
                        status,
                        "Clerk refused the machine secret key (CLERK_MACHINE_SECRET_KEY)"
                    ),
                    e => tracing::warn!(%api_url, error = %e, "creating an M2M token failed"),
                }
                match e {
                    // No such resource is not an answer about us: Clerk is unusable for now.
                    ApiError::NotFound => AuthError::Unavailable(Reason::BackendApiUnavailable),
                    e => e.into(),
                }
            })?;
        if created.token.is_empty() {
            tracing::warn!("Clerk's answer creating an M2M token holds no token");
            return Err(AuthError::Unavailable(Reason::BackendApiUnavailable));
        }
        self.inner.created.fetch_add(1, Ordering::Relaxed);
        // Anchored when the request was sent (the earliest the token can have been created),
        // on the monotonic clock; replaced ahead of expiry: 20 % of its lifetime before, at
        // most a minute before.
        let lifetime = lifetime(&created, cfg.lifetime);
        let expires_at = lifetime.map(|l| sent + l);
        let refresh_at = lifetime.map(|l| sent + l - (l / 5).min(Duration::from_secs(60)));
        Ok(Current {
            token: created.token.into(),
            expires_at,
            refresh_at,
            after_rejection: false,
        })
    }
}

impl TokenSource for M2mTokenSource {
    fn token(&self) -> BoxFuture<'_, Result<String, Status>> {
        Box::pin(async move { self.get().await.map(|t| t.to_string()) })
    }

    fn rejected(&self, token: &str) {
        M2mTokenSource::rejected(self, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(expiration: Option<f64>, created_at: Option<f64>) -> Created {
        Created {
            token: "mt_x".into(),
            expiration,
            created_at,
        }
    }

    #[test]
    fn the_lifetime_is_clerks_difference_not_the_local_clock() {
        let hour = Some(Duration::from_secs(3600));
        // Clerk's clock anywhere (here: 1970 + a bit): only the difference counts.
        let c = created(Some(3_600_000.0 + 5_000.0), Some(5_000.0));
        assert_eq!(lifetime(&c, hour), Some(Duration::from_secs(3600)));
        // No created_at: the lifetime asked for.
        assert_eq!(lifetime(&created(Some(1.0), None), hour), hour);
        // Never longer than asked, never negative; no expiration: never expires.
        let long = created(Some(1e15), Some(0.0));
        assert_eq!(lifetime(&long, hour), hour);
        assert_eq!(
            lifetime(&created(Some(0.0), Some(10_000.0)), hour),
            Some(Duration::ZERO)
        );
        assert_eq!(lifetime(&created(None, Some(0.0)), hour), None);
        assert_eq!(lifetime(&created(Some(f64::NAN), Some(0.0)), hour), hour);
    }
}
