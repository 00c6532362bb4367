//! Outgoing M2M tokens: created through the Backend API with the machine secret key, cached,
//! refreshed before they expire (one creation in flight at a time), and handed to the client
//! credentials layer ([`crate::client::CredentialsLayer`]).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use serde::Deserialize;
use tonic::Status;

use crate::{client::TokenSource, jwks::Secret, jwks::CLERK_API_VERSION};

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

#[derive(Clone)]
struct Current {
    token: Arc<str>,
    /// Seconds since the epoch; infinite when the token does not expire.
    expires_at: f64,
    /// When to start replacing it (seconds since the epoch).
    refresh_at: f64,
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
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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
        let now = now_secs();
        let cached = self.inner.current.lock().expect("token lock").clone();
        if let Some(c) = &cached {
            if now < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        match self.creation().await {
            Ok(c) => Ok(c.token),
            Err(e) => match cached {
                Some(c) if now_secs() < c.expires_at => {
                    tracing::warn!(error = %e.message(), "M2M token refresh failed; using the current token");
                    Ok(c.token)
                }
                _ => Err(e),
            },
        }
    }

    fn creation(&self) -> Creation {
        let mut inflight = self.inner.inflight.lock().expect("inflight lock");
        if let Some(f) = inflight.clone() {
            return f;
        }
        let this = self.clone();
        let fut = async move {
            let result = this.create().await;
            if let Ok(c) = &result {
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
        let now = now_secs();
        let expires_at = created.expiration.map_or(f64::INFINITY, |ms| ms / 1000.0);
        // Replace it ahead of expiry: 20 % of its lifetime before, at most a minute before.
        let lifetime = (expires_at - now).max(0.0);
        let refresh_at = if expires_at.is_finite() {
            expires_at - (lifetime * 0.2).min(60.0)
        } else {
            f64::INFINITY
        };
        Ok(Current {
            token: created.token.into(),
            expires_at,
            refresh_at,
        })
    }
}

impl TokenSource for M2mTokenSource {
    fn token(&self) -> BoxFuture<'_, Result<String, Status>> {
        Box::pin(async move { self.get().await.map(|t| t.to_string()) })
    }
}
