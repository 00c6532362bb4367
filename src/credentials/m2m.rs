//! Outgoing M2M tokens: created through the Backend API with the machine secret key, cached,
//! refreshed before they expire (one creation in flight at a time), and handed to the client
//! credentials layer ([`crate::credentials::CredentialsLayer`]).

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

use crate::{clerk::api::CLERK_API_VERSION, credentials::TokenSource, secret::Secret};

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

type Creation = Shared<BoxFuture<'static, Result<Current, Status>>>;

struct Inner {
    http: reqwest::Client,
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
    /// A source sharing the service's HTTP client.
    pub fn new(config: M2mTokenSourceConfig, http: reqwest::Client) -> Self {
        Self {
            inner: Arc::new(Inner {
                http,
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
    /// cached token is still valid, the cached token is used.
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
                    tracing::warn!(error = %e.message(), "M2M token refresh failed; using the current token");
                    Ok(c.token)
                }
                _ => Err(e),
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

    async fn create(&self) -> Result<Current, Status> {
        let cfg = &self.inner.config;
        let url = format!("{}/m2m_tokens", cfg.api_url.as_str().trim_end_matches('/'));
        let mut auth =
            http::HeaderValue::from_str(&format!("Bearer {}", cfg.machine_secret_key.expose()))
                .map_err(|_| {
                    Status::failed_precondition(
                        "the machine secret key is not a valid header value",
                    )
                })?;
        auth.set_sensitive(true);
        let mut body = serde_json::json!({
            "seconds_until_expiration": cfg.lifetime.map(|d| d.as_secs()),
        });
        if cfg.jwt {
            body["token_format"] = "jwt".into();
        }
        let sent = Instant::now();
        let resp = self
            .inner
            .http
            .post(&url)
            .timeout(cfg.timeout)
            .header(http::header::AUTHORIZATION, auth)
            .header("Clerk-API-Version", CLERK_API_VERSION)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(%url, error = %e, "creating an M2M token failed");
                Status::unavailable("cannot reach Clerk to create an M2M token")
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            tracing::error!(%url, %status, "Clerk refused the machine secret key");
            return Err(Status::failed_precondition(
                "Clerk refused the machine secret key (CLERK_MACHINE_SECRET_KEY)",
            ));
        }
        if !status.is_success() {
            return Err(if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                Status::resource_exhausted("Clerk rate-limited M2M token creation")
            } else {
                Status::unavailable(format!(
                    "Clerk answered HTTP {} creating an M2M token",
                    status.as_u16()
                ))
            });
        }
        let created: Created = resp.json().await.map_err(|_| {
            Status::unavailable("Clerk's answer creating an M2M token is unreadable")
        })?;
        if created.token.is_empty() {
            return Err(Status::unavailable("Clerk's answer holds no token"));
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
