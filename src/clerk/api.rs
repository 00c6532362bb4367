//! The one Backend API client, [`ClerkApi`], used by every path that calls Clerk's Backend API:
//! identity queries ([`BackendApi`], under [`crate::clerk::directory`]), opaque machine-token
//! verification ([`crate::clerk::machines`]) and the outgoing M2M token source
//! ([`crate::credentials::m2m`]).
//!
//! What the paths share lives here, once:
//!
//! * **one `reqwest::Client`** (its user agent, connect timeout and pool; [`http_client`]);
//! * **one `Retry-After` gate per Clerk API base URL** (inside that URL's
//!   [`ClerkBudget`]): after a 429 on any path, no path sends a request to that Clerk before
//!   it has passed — Clerk's limit is per instance, so one path's 429 speaks for all;
//! * **one bounded body reader** (an answer over the path's limit is refused, never buffered);
//! * **one typed error**, [`ApiError`] (`#[source]` on transport and parse errors, never a
//!   secret in its text), classified into [`AuthError`] — and so into gRPC `Status` through
//!   [`crate::error`] — in one place (`From<ApiError> for AuthError`).
//!
//! Each request carries its own credential: identity queries and machine-token verification
//! use the instance secret key (`sk_…`), M2M tokens the machine secret key (`ak_…`); the gate
//! is shared whatever the key. What stays with each path is what the answer *means* to it:
//! the identity path's retries and per-caller budget, the machine path's caches, per-source
//! limit and which refusals are remembered, the token source's expiry and coalescing.
//!
//! ```no_run
//! # fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use clerk_grpc_auth::{
//!     clerk::api::ClerkApi,
//!     credentials::m2m::{M2mTokenSource, M2mTokenSourceConfig},
//!     secret::Secret,
//! };
//! let api = ClerkApi::new()?; // share this one value between every path
//! let source = M2mTokenSource::new(
//!     M2mTokenSourceConfig::new("https://api.clerk.com".parse()?, Secret::new("ak_…")),
//!     &api,
//! );
//! # let _ = source; Ok(()) }
//! ```

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use serde::de::DeserializeOwned;

use crate::{
    clerk::budget::{BudgetConfig, ClerkBudget, Spender},
    error::{AuthError, Reason},
    secret::Secret,
};

/// Largest identity-query answer read.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Longest error `code` kept from a refusal's body (Clerk's codes are short snake_case words).
const MAX_CODE_LEN: usize = 64;

/// The Backend API version header Clerk's SDK sends.
pub const CLERK_API_VERSION: &str = "2026-05-12";

/// Builds an HTTP client for calls to Clerk (user agent, 5 s connect timeout, 90 s idle
/// pool). [`ClerkApi::new`] builds one; pass it to [`ClerkApi::with_http`] (and to the JWKS
/// key store) to share it.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("clerk-grpc-auth/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
}

/// A Backend API call failed. Cheap to clone (transport and parse errors are shared); the
/// text never holds a secret key or a token (URLs carry only ids).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 404.
    #[error("not found")]
    NotFound,
    /// 401 / 403: Clerk refused the secret key the request carried.
    #[error("Clerk refused the secret key (HTTP {0})")]
    KeyRefused(u16),
    /// The secret key is not a valid header value: never sent.
    #[error("the secret key is not a valid header value; never sent")]
    KeyUnusable,
    /// Clerk answered 429 (past the retries, on paths that retry), or this replica's budget
    /// refused the call.
    #[error("rate limited by Clerk; retry after {0:?}")]
    RateLimited(Duration),
    /// Not sent: an earlier 429's `Retry-After` (on any path to this Clerk) has not passed.
    #[error("held back by Clerk's Retry-After for {0:?}; not sent")]
    Suspended(Duration),
    /// Network error or timeout (connecting, sending, or reading the answer).
    #[error("Backend API request failed")]
    Transport(#[source] Arc<reqwest::Error>),
    /// 5xx (or another non-4xx failure status).
    #[error("Backend API answered HTTP {0}")]
    ServerError(u16),
    /// The answer is larger than the path reads.
    #[error("Backend API answer over {max} bytes")]
    TooLarge {
        /// The path's limit.
        max: usize,
    },
    /// A success whose body is not what the path expects.
    #[error("unreadable Backend API answer")]
    Unreadable(#[source] Arc<serde_json::Error>),
    /// Any other 4xx (a request Clerk considers malformed, or a token it refuses), or a status
    /// that is no answer at all (1xx, an unfollowed 3xx; empty `code`).
    #[error("Backend API refused the request (HTTP {status})")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// Clerk's error code (`errors[0].code`, e.g. `token_revoked`; empty when none,
        /// at most 64 ASCII characters).
        code: String,
    },
    /// An id that is not a Clerk id, or a path that is not plain segments: never sent.
    #[error("not a Clerk id: refused before any request")]
    InvalidId,
}

impl ApiError {
    /// Whether Clerk (or the way to it) is failing for now — network, timeout, 5xx, an
    /// unusable answer, a 429 — rather than answering about the request itself.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Transport(_)
                | ApiError::ServerError(_)
                | ApiError::TooLarge { .. }
                | ApiError::Unreadable(_)
                | ApiError::RateLimited(_)
                | ApiError::Suspended(_)
        )
    }
}

/// The one classification of Backend API failures (each path may first read a failure that
/// means something to it — a machine path's 404 is a refused token — and hands the rest here).
impl From<ApiError> for AuthError {
    fn from(e: ApiError) -> AuthError {
        match e {
            ApiError::NotFound => AuthError::NotFound,
            ApiError::KeyRefused(_) | ApiError::KeyUnusable => {
                AuthError::Misconfigured(Reason::SecretKeyInvalid)
            }
            ApiError::RateLimited(retry_after) | ApiError::Suspended(retry_after) => {
                AuthError::RateLimited { retry_after }
            }
            ApiError::Transport(_)
            | ApiError::ServerError(_)
            | ApiError::TooLarge { .. }
            | ApiError::Unreadable(_)
            | ApiError::Refused { .. } => AuthError::Unavailable(Reason::BackendApiUnavailable),
            ApiError::InvalidId => AuthError::InvalidRequest("not a Clerk id"),
        }
    }
}

/// Counters kept by a [`ClerkApi`], every path together.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClerkApiStats {
    /// HTTP requests sent.
    pub requests: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// Requests not sent because a `Retry-After` was running.
    pub suspended: u64,
}

struct ClientInner {
    http: reqwest::Client,
    budget_config: BudgetConfig,
    /// One budget (and `Retry-After` gate) per Clerk API base URL.
    budgets: Mutex<HashMap<String, ClerkBudget>>,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    suspended: AtomicU64,
}

/// The Backend API client shared by identity queries, machine-token verification and the
/// M2M token source (see the module docs). Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct ClerkApi {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for ClerkApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClerkApi")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The base URL a budget is kept under: the URL without its trailing `/`.
fn base_of(api_url: &url::Url) -> String {
    api_url.as_str().trim_end_matches('/').to_owned()
}

impl ClerkApi {
    /// A client with its own HTTP client ([`http_client`]) and default budgets
    /// ([`BudgetConfig::default`]).
    pub fn new() -> Result<Self, reqwest::Error> {
        Ok(Self::with_http(http_client()?, BudgetConfig::default()))
    }

    /// A client over `http` (share it with the JWKS key store), with `budget` as the
    /// settings of each Clerk's budget.
    pub fn with_http(http: reqwest::Client, budget: BudgetConfig) -> Self {
        Self {
            inner: Arc::new(ClientInner {
                http,
                budget_config: budget,
                budgets: Mutex::new(HashMap::new()),
                requests: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
                suspended: AtomicU64::new(0),
            }),
        }
    }

    /// The HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// The budget — `Retry-After` gate, replica-wide bucket, per-caller buckets — of the
    /// Clerk at `api_url` (`https://api.clerk.com`), shared by every path calling it through
    /// this client. Made on first use.
    pub fn budget(&self, api_url: &url::Url) -> ClerkBudget {
        self.inner
            .budgets
            .lock()
            .expect("budgets lock")
            .entry(base_of(api_url))
            .or_insert_with(|| ClerkBudget::new(self.inner.budget_config.clone()))
            .clone()
    }

    /// Counters, every path together.
    pub fn stats(&self) -> ClerkApiStats {
        let i = &self.inner;
        ClerkApiStats {
            requests: i.requests.load(Ordering::Relaxed),
            rate_limited: i.rate_limited.load(Ordering::Relaxed),
            suspended: i.suspended.load(Ordering::Relaxed),
        }
    }

    /// The Clerk at `api_url`, as one path calls it.
    pub(crate) fn endpoint(&self, api_url: &url::Url) -> Endpoint {
        Endpoint {
            api: self.clone(),
            base: base_of(api_url).into(),
            budget: self.budget(api_url),
        }
    }
}

/// One request of a path (its own credential, timeout and size limit).
pub(crate) struct ApiRequest<'a> {
    /// `GET`, `POST`.
    pub method: reqwest::Method,
    /// Below the base URL (`v1/users/user_…`, `m2m_tokens/verify`); must be plain.
    pub path: &'a str,
    /// The secret key this request is authenticated with.
    pub key: &'a Secret,
    /// Timeout of the request.
    pub timeout: Duration,
    /// JSON body.
    pub body: Option<&'a serde_json::Value>,
    /// Largest answer read.
    pub max_body: usize,
}

/// A [`ClerkApi`] bound to one Clerk (base URL) and its budget.
#[derive(Clone)]
pub(crate) struct Endpoint {
    api: ClerkApi,
    base: Arc<str>,
    budget: ClerkBudget,
}

impl Endpoint {
    /// The client.
    pub(crate) fn api(&self) -> &ClerkApi {
        &self.api
    }

    /// The base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// This Clerk's budget (and `Retry-After` gate).
    pub(crate) fn budget(&self) -> &ClerkBudget {
        &self.budget
    }

    /// One attempt: refused without a request while a `Retry-After` runs; a 429 starts one
    /// (for every path); the answer read up to `max_body`; the status classified.
    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        req: ApiRequest<'_>,
    ) -> Result<T, ApiError> {
        if !is_plain_path(req.path) {
            return Err(ApiError::InvalidId);
        }
        let inner = &self.api.inner;
        if let Some(left) = self.budget.gate().remaining() {
            inner.suspended.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::Suspended(left));
        }
        let mut auth = http::HeaderValue::from_str(&format!("Bearer {}", req.key.expose()))
            .map_err(|_| ApiError::KeyUnusable)?;
        auth.set_sensitive(true);
        let url = format!("{}/{}", self.base, req.path);
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let mut r = inner
            .http
            .request(req.method, &url)
            .timeout(req.timeout)
            .header(http::header::AUTHORIZATION, auth)
            .header("Clerk-API-Version", CLERK_API_VERSION);
        if let Some(b) = req.body {
            r = r.json(b);
        }
        let resp = r
            .send()
            .await
            .map_err(|e| ApiError::Transport(Arc::new(e)))?;
        let status = resp.status().as_u16();
        if status == 429 {
            let wait = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(crate::clerk::budget::retry_after_header)
                .unwrap_or(Duration::from_secs(1));
            inner.rate_limited.fetch_add(1, Ordering::Relaxed);
            self.budget.gate().suspend(wait);
            tracing::debug!(%url, ?wait, "Clerk rate-limited a Backend API call; every path waits");
            return Err(ApiError::RateLimited(wait));
        }
        let body = read_bounded(resp, req.max_body).await?;
        match status {
            200..=299 => {
                serde_json::from_slice(&body).map_err(|e| ApiError::Unreadable(Arc::new(e)))
            }
            401 | 403 => Err(ApiError::KeyRefused(status)),
            404 => Err(ApiError::NotFound),
            400..=499 => Err(ApiError::Refused {
                status,
                code: error_code(&body),
            }),
            500..=599 => Err(ApiError::ServerError(status)),
            // 1xx and unfollowed 3xx: not an answer, and not a transient server error either.
            _ => Err(ApiError::Refused {
                status,
                code: String::new(),
            }),
        }
    }
}

/// Clerk's `errors[0].code` from a refusal's body: ASCII letters, digits and `_`, at most
/// [`MAX_CODE_LEN`]; anything else is the empty string.
fn error_code(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
    }
    serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| b.errors.into_iter().next())
        .map(|i| i.code)
        .filter(|c| {
            c.len() <= MAX_CODE_LEN && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .unwrap_or_default()
}

/// Reads a Backend API answer of at most `max` bytes.
async fn read_bounded(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ApiError> {
    if resp.content_length().is_some_and(|l| l as usize > max) {
        return Err(ApiError::TooLarge { max });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ApiError::Transport(Arc::new(e)))?
    {
        if body.len() + chunk.len() > max {
            return Err(ApiError::TooLarge { max });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Settings of a [`BackendApi`] (the identity-query path).
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

/// Counters kept by a [`BackendApi`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendApiStats {
    /// HTTP requests sent (retries included).
    pub requests: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// Calls answered RESOURCE_EXHAUSTED without a request, because an earlier 429's
    /// Retry-After (on any path) had not passed.
    pub suspended: u64,
    /// Errors returned to callers.
    pub errors: u64,
}

struct Inner {
    endpoint: Endpoint,
    config: BackendApiConfig,
    warned_key: AtomicBool,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    suspended: AtomicU64,
    errors: AtomicU64,
}

/// The identity-query path of a [`ClerkApi`]: `GET`/`POST {base}/v1/…` with the instance
/// secret key, retried with jittered back-off on 5xx, network errors and 429 (honouring
/// `Retry-After` within the retry budget), spending the Clerk's replica-wide budget. Cheap to
/// clone.
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
/// characters (a value may also hold `:`, as role keys do: `role=org:admin`; RFC 3986 lets
/// it stand unescaped in a query). Every path the client sends is checked here, whatever built it, so that an id
/// can never climb to another resource (`user_x/../../sessions/…`).
fn is_plain_path(path: &str) -> bool {
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let value = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
    };
    p.split('/').all(word)
        && (q.is_empty()
            || q.split('&')
                .all(|kv| kv.split_once('=').is_some_and(|(k, v)| word(k) && value(v))))
}

/// Whether `id` is safe in a URL path: Clerk ids are `prefix_` + alphanumerics.
pub fn is_clerk_id(id: &str, prefix: &str) -> bool {
    id.len() <= 128
        && id.starts_with(prefix)
        && id.len() > prefix.len()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl BackendApi {
    /// The identity-query path over `api` (sharing its HTTP client and the budget and
    /// `Retry-After` of the Clerk at `config.api_url` with every other path).
    pub fn new(config: BackendApiConfig, api: &ClerkApi) -> Self {
        Self {
            inner: Arc::new(Inner {
                endpoint: api.endpoint(&config.api_url),
                config,
                warned_key: AtomicBool::new(false),
                requests: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
                suspended: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
        }
    }

    /// The Backend API budget this path spends (shared with every path to the same Clerk
    /// through the same [`ClerkApi`]).
    pub fn budget(&self) -> &ClerkBudget {
        self.inner.endpoint.budget()
    }

    /// The client this path sends through.
    pub fn client(&self) -> &ClerkApi {
        self.inner.endpoint.api()
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
        let path = format!("v1/{path}");
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            // A 429 (on any path) is not answered with more requests, and the replica-wide
            // budget is respected: wait when the retry budget allows, otherwise refuse
            // without asking Clerk. Identity queries may spend the reserve.
            while let Err(wait) = self.budget().try_spend(Spender::Known) {
                if started.elapsed() + wait > cfg.retry_budget {
                    inner.suspended.fetch_add(1, Ordering::Relaxed);
                    return Err(ApiError::RateLimited(wait));
                }
                tokio::time::sleep(wait).await;
            }
            inner.requests.fetch_add(1, Ordering::Relaxed);
            let sent = inner
                .endpoint
                .send(ApiRequest {
                    method: method.clone(),
                    path: &path,
                    key: &cfg.secret_key,
                    timeout: cfg.timeout,
                    body: body.as_ref(),
                    max_body: MAX_BODY_BYTES,
                })
                .await;
            let (err, wait) = match sent {
                Ok(v) => return Ok(v),
                Err(ApiError::RateLimited(wait)) => {
                    inner.rate_limited.fetch_add(1, Ordering::Relaxed);
                    (ApiError::RateLimited(wait), Some(wait))
                }
                // Another path's 429 arrived between the budget and the send: not sent.
                Err(ApiError::Suspended(wait)) => {
                    inner.requests.fetch_sub(1, Ordering::Relaxed);
                    (ApiError::RateLimited(wait), Some(wait))
                }
                Err(e @ (ApiError::Transport(_) | ApiError::ServerError(_))) => (e, None),
                Err(e @ ApiError::KeyRefused(status)) => {
                    if !inner.warned_key.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            api_url = %inner.endpoint.base(),
                            status,
                            "Clerk refused the secret key (CLERK_SECRET_KEY) for identity queries"
                        );
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if attempt >= cfg.max_retries {
                return Err(err);
            }
            let wait = wait.unwrap_or_else(|| backoff(attempt));
            if started.elapsed() + wait > cfg.retry_budget {
                return Err(err);
            }
            tracing::debug!(%path, attempt, ?wait, error = %err, "retrying Backend API call");
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
            "organizations/org_1/memberships?limit=20&offset=0&role=org:admin&role=org:member",
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
            "users/user_1:x",
            "organizations/org_1/memberships?role=org:admin%26x",
            "organizations/org_1/memberships?role=org:a=b",
            "organizations/org_1/memberships?role:x=org",
            "organizations/org_1/memberships?role=org:a/../b",
        ] {
            assert!(!is_plain_path(bad), "{bad}");
        }
    }

    #[test]
    fn failures_are_classified_once() {
        use tonic::Code;
        let code = |e: ApiError| tonic::Status::from(AuthError::from(e)).code();
        assert_eq!(code(ApiError::NotFound), Code::NotFound);
        assert_eq!(code(ApiError::KeyRefused(401)), Code::FailedPrecondition);
        assert_eq!(code(ApiError::KeyUnusable), Code::FailedPrecondition);
        for e in [
            ApiError::RateLimited(Duration::from_secs(3)),
            ApiError::Suspended(Duration::from_secs(3)),
        ] {
            assert!(e.is_transient());
            assert_eq!(code(e), Code::ResourceExhausted);
        }
        for e in [
            ApiError::ServerError(503),
            ApiError::TooLarge { max: 10 },
            ApiError::Refused {
                status: 422,
                code: "form_param_invalid".into(),
            },
        ] {
            assert_eq!(
                AuthError::from(e),
                AuthError::Unavailable(Reason::BackendApiUnavailable)
            );
        }
        assert!(!ApiError::Refused {
            status: 409,
            code: String::new()
        }
        .is_transient());
        assert_eq!(code(ApiError::InvalidId), Code::InvalidArgument);
    }

    #[test]
    fn only_plain_error_codes_are_kept() {
        let code = |b: &str| error_code(b.as_bytes());
        assert_eq!(
            code(r#"{"errors":[{"code":"token_revoked"}]}"#),
            "token_revoked"
        );
        assert_eq!(code(r#"{"errors":[]}"#), "");
        assert_eq!(code("not json"), "");
        assert_eq!(code(r#"{"errors":[{"code":"a b\nc"}]}"#), "");
        let long = format!(r#"{{"errors":[{{"code":"{}"}}]}}"#, "a".repeat(65));
        assert_eq!(code(&long), "");
    }

    #[tokio::test]
    async fn one_budget_per_clerk_whatever_the_path() {
        let api = ClerkApi::with_http(reqwest::Client::new(), BudgetConfig::default());
        let a: url::Url = "https://api.clerk.com".parse().unwrap();
        let a2: url::Url = "https://api.clerk.com/".parse().unwrap();
        let b: url::Url = "http://127.0.0.1:1".parse().unwrap();
        api.budget(&a).gate().suspend(Duration::from_secs(5));
        assert!(api.budget(&a2).gate().remaining().is_some(), "same Clerk");
        assert!(api.budget(&b).gate().remaining().is_none(), "another Clerk");
        // Held back without a request, whatever the key.
        let key = Secret::new("sk_test_x");
        let sent = api
            .endpoint(&a2)
            .send::<serde_json::Value>(ApiRequest {
                method: reqwest::Method::GET,
                path: "v1/users/user_1",
                key: &key,
                timeout: Duration::from_secs(1),
                body: None,
                max_body: 1024,
            })
            .await;
        assert!(matches!(sent, Err(ApiError::Suspended(_))), "{sent:?}");
        assert_eq!(api.stats().requests, 0);
        assert_eq!(api.stats().suspended, 1);
        assert!(!format!("{:?} {api:?}", sent.unwrap_err()).contains("sk_test_x"));
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
