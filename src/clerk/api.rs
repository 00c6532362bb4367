//! The Backend API client for identity queries: one shared `reqwest::Client`, timeouts,
//! retries with jittered back-off on 5xx and on 429 (honouring `Retry-After`), and errors
//! mapped once (`404` → NOT_FOUND, `401`/`403` → FAILED_PRECONDITION logged once, `429` past
//! retries → RESOURCE_EXHAUSTED, network → UNAVAILABLE).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use serde::de::DeserializeOwned;

use crate::{
    clerk::budget::{ClerkBudget, Spender},
    error::{AuthError, Reason},
    secret::Secret,
};

/// Largest Backend API answer read.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The Backend API version header Clerk's SDK sends.
pub const CLERK_API_VERSION: &str = "2026-05-12";

/// Settings of a [`BackendApi`].
#[derive(Debug, Clone)]
pub struct BackendApiConfig {
    /// Base URL (`https://api.clerk.com`); requests go to `{base}/v1/…`.
    pub api_url: url::Url,
    /// The instance secret key.
    pub secret_key: Secret,
    /// Timeout of one attempt (default 3 s).
    pub timeout: Duration,
    /// Retries after the first attempt, on 5xx, network errors and 429 (default 2).
    pub max_retries: u32,
    /// Longest total time spent waiting between attempts (default 3 s): a `Retry-After` beyond
    /// it is not waited for — the call answers RESOURCE_EXHAUSTED at once.
    pub retry_budget: Duration,
}

impl BackendApiConfig {
    /// Defaults for everything but the URL and key.
    pub fn new(api_url: url::Url, secret_key: Secret) -> Self {
        Self {
            api_url,
            secret_key,
            timeout: Duration::from_secs(3),
            max_retries: 2,
            retry_budget: Duration::from_secs(3),
        }
    }
}

/// A Backend API call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 404.
    #[error("not found")]
    NotFound,
    /// 401 / 403: our secret key is wrong.
    #[error("Clerk refused the secret key")]
    KeyRefused,
    /// 429 past the retries.
    #[error("rate limited by Clerk; retry after {0:?}")]
    RateLimited(Duration),
    /// Network, timeout, 5xx past the retries, or an unreadable answer.
    #[error("Backend API unavailable: {0}")]
    Unavailable(String),
    /// Any other 4xx (a request Clerk considers malformed).
    #[error("Backend API refused the request (HTTP {0})")]
    Refused(u16),
    /// An id that is not a Clerk id, or a path that is not plain segments: never sent.
    #[error("not a Clerk id: refused before any request")]
    InvalidId,
}

impl From<ApiError> for AuthError {
    fn from(e: ApiError) -> AuthError {
        match e {
            ApiError::NotFound => AuthError::NotFound,
            ApiError::KeyRefused => AuthError::Misconfigured(Reason::SecretKeyInvalid),
            ApiError::RateLimited(retry_after) => AuthError::RateLimited { retry_after },
            ApiError::Unavailable(_) | ApiError::Refused(_) => {
                AuthError::Unavailable(Reason::BackendApiUnavailable)
            }
            ApiError::InvalidId => AuthError::InvalidRequest("not a Clerk id"),
        }
    }
}

/// Counters kept by a [`BackendApi`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendApiStats {
    /// HTTP requests sent (retries included).
    pub requests: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// Calls answered RESOURCE_EXHAUSTED without a request, because an earlier 429's
    /// Retry-After had not passed.
    pub suspended: u64,
    /// Errors returned to callers.
    pub errors: u64,
}

struct Inner {
    http: reqwest::Client,
    config: BackendApiConfig,
    warned_key: AtomicBool,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    suspended: AtomicU64,
    errors: AtomicU64,
    budget: ClerkBudget,
}

/// The Backend API client. Cheap to clone.
#[derive(Clone)]
pub struct BackendApi {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BackendApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendApi")
            .field("api_url", &self.inner.config.api_url.as_str())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Whether a Backend API path is plain: segments of ASCII letters, digits and `_` (no empty,
/// `.` or `..` segment, no escape), then an optional query of `name=value` pairs of the same
/// characters. Every path the client sends is checked here, whatever built it, so that an id
/// can never climb to another resource (`user_x/../../sessions/…`).
fn is_plain_path(path: &str) -> bool {
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    p.split('/').all(word)
        && (q.is_empty()
            || q.split('&')
                .all(|kv| kv.split_once('=').is_some_and(|(k, v)| word(k) && word(v))))
}

/// Whether `id` is safe in a URL path: Clerk ids are `prefix_` + alphanumerics.
pub fn is_clerk_id(id: &str, prefix: &str) -> bool {
    id.len() <= 128
        && id.starts_with(prefix)
        && id.len() > prefix.len()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl BackendApi {
    /// A client sharing the service's HTTP client, with a budget of its own.
    pub fn new(config: BackendApiConfig, http: reqwest::Client) -> Self {
        Self::with_budget(config, http, ClerkBudget::default())
    }

    /// A client sharing the service's HTTP client and the replica's Backend API budget
    /// (Clerk's `Retry-After` and the replica-wide call rate, shared with machine-token
    /// verification).
    pub fn with_budget(
        config: BackendApiConfig,
        http: reqwest::Client,
        budget: ClerkBudget,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                http,
                config,
                warned_key: AtomicBool::new(false),
                requests: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
                suspended: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                budget,
            }),
        }
    }

    /// The Backend API budget this client spends (shared with machine-token verification
    /// when built by the server).
    pub fn budget(&self) -> &ClerkBudget {
        &self.inner.budget
    }

    /// Counters.
    pub fn stats(&self) -> BackendApiStats {
        BackendApiStats {
            requests: self.inner.requests.load(Ordering::Relaxed),
            rate_limited: self.inner.rate_limited.load(Ordering::Relaxed),
            suspended: self.inner.suspended.load(Ordering::Relaxed),
            errors: self.inner.errors.load(Ordering::Relaxed),
        }
    }

    /// `GET {base}/v1/{path}`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// `POST {base}/v1/{path}` with a JSON body.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, ApiError> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ApiError> {
        let result = self.send_inner(method, path, body).await;
        if result.is_err() {
            self.inner.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn send_inner<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ApiError> {
        let inner = &self.inner;
        let cfg = &inner.config;
        if !is_plain_path(path) {
            return Err(ApiError::InvalidId);
        }
        let url = format!("{}/v1/{path}", cfg.api_url.as_str().trim_end_matches('/'));
        let mut auth = http::HeaderValue::from_str(&format!("Bearer {}", cfg.secret_key.expose()))
            .map_err(|_| ApiError::KeyRefused)?;
        auth.set_sensitive(true);
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            // A 429 (on any path) is not answered with more requests, and the replica-wide
            // budget is respected: wait when the retry budget allows, otherwise refuse
            // without asking Clerk. Identity queries may spend the reserve.
            while let Err(wait) = inner.budget.try_spend(Spender::Known) {
                if started.elapsed() + wait > cfg.retry_budget {
                    inner.suspended.fetch_add(1, Ordering::Relaxed);
                    return Err(ApiError::RateLimited(wait));
                }
                tokio::time::sleep(wait).await;
            }
            inner.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = inner
                .http
                .request(method.clone(), &url)
                .timeout(cfg.timeout)
                .header(http::header::AUTHORIZATION, auth.clone())
                .header("Clerk-API-Version", CLERK_API_VERSION);
            if let Some(b) = &body {
                req = req.json(b);
            }
            let outcome = match req.send().await {
                Err(e) => Err((ApiError::Unavailable(e.to_string()), None)),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(crate::clerk::budget::retry_after_header);
                    match status {
                        200..=299 => {
                            let bytes = read_bounded(resp, MAX_BODY_BYTES)
                                .await
                                .map_err(ApiError::Unavailable)?;
                            return serde_json::from_slice(&bytes).map_err(|e| {
                                ApiError::Unavailable(format!("unreadable answer: {e}"))
                            });
                        }
                        404 => return Err(ApiError::NotFound),
                        401 | 403 => {
                            if !inner.warned_key.swap(true, Ordering::Relaxed) {
                                tracing::error!(
                                    %url,
                                    status,
                                    "Clerk refused the secret key (CLERK_SECRET_KEY) for identity queries"
                                );
                            }
                            return Err(ApiError::KeyRefused);
                        }
                        429 => {
                            inner.rate_limited.fetch_add(1, Ordering::Relaxed);
                            let wait = retry_after.unwrap_or(Duration::from_secs(1));
                            inner.budget.gate().suspend(wait);
                            Err((ApiError::RateLimited(wait), Some(wait)))
                        }
                        500..=599 => Err((ApiError::Unavailable(format!("HTTP {status}")), None)),
                        _ => return Err(ApiError::Refused(status)),
                    }
                }
            };
            let (err, wait) = match outcome {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if attempt >= cfg.max_retries {
                return Err(err);
            }
            let wait = wait.unwrap_or_else(|| backoff(attempt));
            if started.elapsed() + wait > cfg.retry_budget {
                return Err(err);
            }
            tracing::debug!(%url, attempt, ?wait, error = %err, "retrying Backend API call");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// 100 ms · 2^attempt, ±50 % jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 100.0 * f64::from(1u32 << attempt.min(6));
    let jitter = rand::rng().random_range(0.5..1.5);
    Duration::from_millis((base * jitter) as u64)
}

/// Reads a Backend API answer of at most `max` bytes (shared with machine-token verification).
pub(crate) async fn read_bounded(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|l| l as usize > max) {
        return Err(format!("answer over {max} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("answer over {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_path_safe() {
        assert!(is_clerk_id("user_2abcDEF", "user_"));
        for bad in [
            "user_",
            "user_../x",
            "user_a/b",
            "sess_1",
            "user_a?b",
            "user_é",
        ] {
            assert!(!is_clerk_id(bad, "user_"), "{bad}");
        }
        assert!(!is_clerk_id(&format!("user_{}", "a".repeat(200)), "user_"));
    }

    #[test]
    fn only_plain_paths_are_sent() {
        for ok in [
            "users/user_1",
            "sessions/sess_1/revoke",
            "users/user_1/organization_memberships?limit=100&offset=0",
        ] {
            assert!(is_plain_path(ok), "{ok}");
        }
        for bad in [
            "users/user_x/../../sessions/sess_1",
            "users/user_x%2F..",
            "users//x",
            "users/./x",
            "users/",
            "users/user_é",
            "users/x?limit=1&offset=../",
            "users/x?limit",
            "users/x y",
        ] {
            assert!(!is_plain_path(bad), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter() {
        for a in 0..4 {
            let d = backoff(a).as_millis() as f64;
            let base = 100.0 * f64::from(1u32 << a);
            assert!(d >= base * 0.5 && d <= base * 1.5, "{a}: {d}");
        }
    }
}
