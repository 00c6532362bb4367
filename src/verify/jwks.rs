//! The key store: where verification keys come from, how they stay fresh, and what happens
//! when Clerk is slow, down, or flooded with unknown key ids.
//!
//! - A networkless key (`CLERK_JWT_KEY`) is parsed once and always usable.
//! - A JWKS (Clerk's Backend API `GET /v1/jwks` with the secret key, or any JWKS URL such as
//!   the Frontend API's `/.well-known/jwks.json`) is loaded by the refresher task
//!   ([`KeyStore::run`]) before the server reports SERVING, then refreshed in the background
//!   every [`KeyStoreConfig::refresh_interval`]; the request path never fetches for a known
//!   `kid`.
//! - An unknown `kid` triggers at most one fetch in flight (concurrent misses wait for it),
//!   at most one unknown-kid refetch per [`KeyStoreConfig::unknown_kid_cooldown`], and a
//!   negative cache remembers kids that a fresh fetch did not have, so a flood of random kids
//!   costs Clerk nothing.
//! - A failed refresh keeps the last good keys for [`KeyStoreConfig::max_stale`]; past that the
//!   store is unusable (verification answers UNAVAILABLE and health turns NOT_SERVING).
//! - A `429` (or a `503` with `Retry-After`) is waited out, not turned into a refusal, when its
//!   `Retry-After` ends within the fetch's budget ([`KeyStoreConfig::fetch_timeout`], from the
//!   start of the fetch): the one fetch in flight waits and asks once more, and every caller
//!   waiting on it gets that answer. A longer `Retry-After` fails the fetch at once (an
//!   unknown kid is refused UNAVAILABLE / `JWK_REMOTE_FAILED_TO_LOAD`), and until it has passed
//!   no request leaves — neither unknown-kid refetches nor the background refresher. A
//!   missing or unreadable `Retry-After` on a 429 counts as 1 s; any is capped at
//!   [`MAX_RETRY_AFTER`].
//! - A key set always comes whole from one source: a refresh replaces it, never merges.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    clerk::api::CLERK_API_VERSION,
    error::{KeyError, Reason},
    retry::{parse_retry_after, retry_delay, retry_within},
    secret::Secret,
    token::keys::{KeySet, VerifyingKey},
};

/// The most bytes a JWKS response may have.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// The longest `Retry-After` honoured from the JWKS endpoint; a larger one is capped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What a 429 without a usable `Retry-After` counts as.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Where keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A networkless PEM key (`CLERK_JWT_KEY`): verifies tokens whatever their `kid`.
    Static(Arc<KeySet>),
    /// A JWKS URL, with an optional bearer secret (the Backend API requires the secret key).
    Remote {
        /// The JWKS URL.
        url: url::Url,
        /// Sent as `Authorization: Bearer …` when set.
        bearer: Option<Secret>,
    },
}

/// Timing and limits of the key store.
#[derive(Debug, Clone)]
pub struct KeyStoreConfig {
    /// How often keys are refreshed in the background. Defaults to 5 minutes (the lifetime of
    /// Clerk's SDK JWKS cache).
    pub refresh_interval: Duration,
    /// At most one unknown-`kid` refetch per this interval; kids a fresh fetch lacked are
    /// remembered this long. Defaults to 10 s.
    pub unknown_kid_cooldown: Duration,
    /// How long the last good keys are used after refreshes start failing. Defaults to 1 h.
    pub max_stale: Duration,
    /// Timeout of one JWKS fetch, and its whole budget: a `Retry-After` is waited out (and
    /// the JWKS asked once more) only when it ends within this time from the fetch's start, so
    /// an unknown-kid lookup never waits longer. Defaults to 5 s.
    pub fetch_timeout: Duration,
    /// First retry delay after a failed load; doubles up to [`Self::retry_max`]. Defaults to
    /// 500 ms.
    pub retry_min: Duration,
    /// Largest retry delay. Defaults to 30 s.
    pub retry_max: Duration,
}

/// Keys with the instant they were last confirmed by their source.
#[derive(Debug)]
struct Loaded {
    keys: Arc<KeySet>,
    confirmed_at: Instant,
}

/// Outcome of a synchronous key lookup.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The key for this `kid`.
    Found(Arc<VerifyingKey>),
    /// No key with this `kid` in the current set.
    Unknown,
    /// No usable key material at all.
    Unavailable(Reason),
}

/// Owns a running key refresher ([`KeyStore::spawn_refresher`]); dropping it stops the task.
#[derive(Debug)]
pub struct RefresherGuard {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RefresherGuard {
    /// Stops the refresher and waits until it has stopped.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RefresherGuard {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Outcome of [`KeyStore::lookup_or_refetch`].
#[derive(Debug, Clone)]
pub enum SyncLookup {
    /// The key for this `kid`.
    Found(Arc<VerifyingKey>),
    /// Unknown `kid`; a refetch is in flight — retry shortly.
    Refreshing,
    /// No key, definitively for now.
    Failed(ResolveError),
}

/// Why [`KeyStore::resolve`] found no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    /// No key with this `kid`, even after a (rate-limited) refetch.
    UnknownKid,
    /// No usable key material (never loaded, past the stale bound, or Clerk failing).
    Unavailable(Reason),
}

type SharedFetch = Shared<BoxFuture<'static, Result<(), Arc<KeyError>>>>;

#[derive(Default)]
struct FetchState {
    inflight: Option<SharedFetch>,
    last_kid_refetch: Option<Instant>,
    last_kid_refetch_failed: bool,
    last_error_reason: Option<Reason>,
    /// No JWKS request before this instant (the endpoint's `Retry-After`).
    retry_after_until: Option<Instant>,
}

/// A failed JWKS request, with the endpoint's `Retry-After` when it gave one (or a 429).
#[derive(Debug)]
struct FetchFailure {
    error: KeyError,
    retry_after: Option<Duration>,
}

/// Counters kept by the key store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeyStoreStats {
    /// JWKS requests made.
    pub fetches: u64,
    /// JWKS requests that failed.
    pub fetch_failures: u64,
    /// Fetches triggered by an unknown `kid`.
    pub unknown_kid_refetches: u64,
    /// Unknown-`kid` lookups answered without a fetch (cooldown or negative cache).
    pub unknown_kid_suppressed: u64,
}

struct Inner {
    source: KeySource,
    config: KeyStoreConfig,
    http: reqwest::Client,
    state: ArcSwapOption<Loaded>,
    fetch: Mutex<FetchState>,
    negative: Option<moka::sync::Cache<String, ()>>,
    generation: AtomicU64,
    serving: watch::Sender<bool>,
    fetches: AtomicU64,
    fetch_failures: AtomicU64,
    kid_refetches: AtomicU64,
    kid_suppressed: AtomicU64,
    /// Refreshers ([`KeyStore::run`]) alive, started or not yet polled.
    refreshers: AtomicUsize,
}

/// Holds the current keys of one Clerk instance. Cheap to clone.
#[derive(Clone)]
pub struct KeyStore {
    inner: Arc<Inner>,
}

// === impl KeyStoreConfig ===

impl Default for KeyStoreConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(300),
            unknown_kid_cooldown: Duration::from_secs(10),
            max_stale: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(5),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

// === impl KeyStore ===

impl KeyStore {
    /// A store for `source`, fetching with the shared `http` client. A static source is usable
    /// at once; a remote one becomes usable when [`KeyStore::run`] has loaded it.
    pub fn new(source: KeySource, config: KeyStoreConfig, http: reqwest::Client) -> Self {
        let negative = (!config.unknown_kid_cooldown.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(config.unknown_kid_cooldown)
                .build()
        });
        let initial = match &source {
            KeySource::Static(keys) => Some(Arc::new(Loaded {
                keys: keys.clone(),
                confirmed_at: Instant::now(),
            })),
            KeySource::Remote { .. } => None,
        };
        let serving = initial.is_some();
        Self {
            inner: Arc::new(Inner {
                source,
                config,
                http,
                state: ArcSwapOption::new(initial),
                fetch: Mutex::new(FetchState::default()),
                negative,
                generation: AtomicU64::new(0),
                serving: watch::Sender::new(serving),
                fetches: AtomicU64::new(0),
                fetch_failures: AtomicU64::new(0),
                kid_refetches: AtomicU64::new(0),
                kid_suppressed: AtomicU64::new(0),
                refreshers: AtomicUsize::new(0),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &KeyStoreConfig {
        &self.inner.config
    }

    /// Whether this store loads keys over the network.
    pub fn is_remote(&self) -> bool {
        matches!(self.inner.source, KeySource::Remote { .. })
    }

    /// Changes whenever the key material changes (used to invalidate cached verdicts).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Counters.
    pub fn stats(&self) -> KeyStoreStats {
        let i = &self.inner;
        KeyStoreStats {
            fetches: i.fetches.load(Ordering::Relaxed),
            fetch_failures: i.fetch_failures.load(Ordering::Relaxed),
            unknown_kid_refetches: i.kid_refetches.load(Ordering::Relaxed),
            unknown_kid_suppressed: i.kid_suppressed.load(Ordering::Relaxed),
        }
    }

    /// Time since the key set was last confirmed by a successful fetch (or loaded, for a static
    /// source); `None` before the first load.
    pub fn key_set_age(&self) -> Option<Duration> {
        self.inner
            .state
            .load()
            .as_ref()
            .map(|l| l.confirmed_at.elapsed())
    }

    /// A receiver that is `true` while keys are usable (for health reporting).
    pub fn serving(&self) -> watch::Receiver<bool> {
        self.inner.serving.subscribe()
    }

    /// Waits until keys are usable.
    pub async fn ready(&self) {
        let mut rx = self.serving();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The kids currently held (empty before the first load or for a networkless key).
    pub fn kids(&self) -> Vec<String> {
        self.inner
            .state
            .load()
            .as_ref()
            .map(|l| l.keys.kids().into_iter().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Whether keys are usable now.
    pub fn is_usable(&self) -> bool {
        self.usable_reason(Instant::now()).is_ok()
    }

    fn usable_reason(&self, now: Instant) -> Result<(), Reason> {
        self.usable_keys(self.inner.state.load().as_deref(), now)
            .map(|_| ())
    }

    /// `loaded`'s keys when they are usable at `now`: loaded, and (for a remote source)
    /// confirmed within the stale bound.
    fn usable_keys<'l>(
        &self,
        loaded: Option<&'l Loaded>,
        now: Instant,
    ) -> Result<&'l KeySet, Reason> {
        match loaded {
            Some(l)
                if !self.is_remote()
                    || now.duration_since(l.confirmed_at) <= self.inner.config.max_stale =>
            {
                Ok(&l.keys)
            }
            _ => Err(self.unavailable_reason()),
        }
    }

    /// A remote store that holds no keys, never fetched any and has no refresher running:
    /// nothing will ever load it (the refresher was never started, or its guard was dropped
    /// at once).
    pub(crate) fn never_loading(&self) -> bool {
        self.is_remote()
            && self.inner.refreshers.load(Ordering::Acquire) == 0
            && self.inner.fetches.load(Ordering::Relaxed) == 0
            && self.inner.state.load().is_none()
            && self
                .inner
                .fetch
                .lock()
                .expect("fetch state lock")
                .inflight
                .is_none()
    }

    fn unavailable_reason(&self) -> Reason {
        self.inner
            .fetch
            .lock()
            .expect("fetch state lock")
            .last_error_reason
            .unwrap_or(Reason::JwkRemoteFailedToLoad)
    }

    /// Looks a key up without any I/O.
    #[inline]
    pub fn lookup(&self, kid: Option<&str>) -> Lookup {
        let guard = self.inner.state.load();
        match self.usable_keys(guard.as_deref(), Instant::now()) {
            Err(r) => Lookup::Unavailable(r),
            Ok(keys) => match keys.get(kid) {
                Some(k) => Lookup::Found(k.clone()),
                None => Lookup::Unknown,
            },
        }
    }

    /// Resolves the key for `kid`: from memory when known, otherwise through one rate-limited,
    /// single-flight refetch.
    pub async fn resolve(&self, kid: Option<&str>) -> Result<Arc<VerifyingKey>, ResolveError> {
        match self.lookup(kid) {
            Lookup::Found(k) => return Ok(k),
            Lookup::Unavailable(r) => return Err(ResolveError::Unavailable(r)),
            Lookup::Unknown => {}
        }
        let Some(kid) = kid else {
            // No kid in JWKS mode: no fetch can help.
            return Err(ResolveError::UnknownKid);
        };
        if self.is_negative(kid) {
            return Err(ResolveError::UnknownKid);
        }
        let fetch = self.kid_refetch()?;
        self.finish_kid_refetch(kid, fetch).await
    }

    /// Like [`KeyStore::resolve`] but without waiting: a known key is returned at once; for
    /// an unknown `kid` that may still arrive, the (rate-limited, single-flight) refetch is
    /// started on the current tokio runtime and [`SyncLookup::Refreshing`] is returned — the
    /// caller fails closed now, and a retry after the refetch finds the key or a definitive
    /// answer ([`ResolveError::UnknownKid`], negative-cached).
    pub fn lookup_or_refetch(&self, kid: Option<&str>) -> SyncLookup {
        match self.lookup(kid) {
            Lookup::Found(k) => return SyncLookup::Found(k),
            Lookup::Unavailable(r) => return SyncLookup::Failed(ResolveError::Unavailable(r)),
            Lookup::Unknown => {}
        }
        let Some(kid) = kid else {
            return SyncLookup::Failed(ResolveError::UnknownKid);
        };
        if self.is_negative(kid) {
            return SyncLookup::Failed(ResolveError::UnknownKid);
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return SyncLookup::Failed(ResolveError::Unavailable(Reason::JwkFailedToResolve));
        };
        match self.kid_refetch() {
            Err(e) => SyncLookup::Failed(e),
            Ok(fetch) => {
                let this = self.clone();
                let kid = kid.to_owned();
                handle.spawn(async move {
                    let _ = this.finish_kid_refetch(&kid, fetch).await;
                });
                SyncLookup::Refreshing
            }
        }
    }

    fn is_negative(&self, kid: &str) -> bool {
        let hit = self
            .inner
            .negative
            .as_ref()
            .is_some_and(|n| n.contains_key(kid));
        if hit {
            self.inner.kid_suppressed.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Joins the fetch in flight, or starts one when the cooldown allows; otherwise tells why
    /// not (suppressed → `UnknownKid`; the last refetch failed → `Unavailable`).
    fn kid_refetch(&self) -> Result<SharedFetch, ResolveError> {
        let mut st = self.inner.fetch.lock().expect("fetch state lock");
        if let Some(f) = st.inflight.clone() {
            return Ok(f);
        }
        if st.retry_after_until.is_some_and(|t| t > Instant::now()) {
            // The endpoint asked us to wait: refuse now without asking it again.
            let reason = st
                .last_error_reason
                .unwrap_or(Reason::JwkRemoteFailedToLoad);
            drop(st);
            self.inner.kid_suppressed.fetch_add(1, Ordering::Relaxed);
            return Err(ResolveError::Unavailable(reason));
        }
        let cooled = st
            .last_kid_refetch
            .is_none_or(|t| t.elapsed() >= self.inner.config.unknown_kid_cooldown);
        if cooled {
            st.last_kid_refetch = Some(Instant::now());
            self.inner.kid_refetches.fetch_add(1, Ordering::Relaxed);
            Ok(self.start_fetch(&mut st, true))
        } else if st.last_kid_refetch_failed {
            Err(ResolveError::Unavailable(
                st.last_error_reason
                    .unwrap_or(Reason::JwkRemoteFailedToLoad),
            ))
        } else {
            drop(st);
            self.inner.kid_suppressed.fetch_add(1, Ordering::Relaxed);
            Err(ResolveError::UnknownKid)
        }
    }

    async fn finish_kid_refetch(
        &self,
        kid: &str,
        fetch: SharedFetch,
    ) -> Result<Arc<VerifyingKey>, ResolveError> {
        if let Err(e) = fetch.await {
            return Err(ResolveError::Unavailable(e.reason()));
        }
        match self.lookup(Some(kid)) {
            Lookup::Found(k) => Ok(k),
            Lookup::Unavailable(r) => Err(ResolveError::Unavailable(r)),
            Lookup::Unknown => {
                if let Some(n) = &self.inner.negative {
                    n.insert(kid.to_owned(), ());
                }
                Err(ResolveError::UnknownKid)
            }
        }
    }

    /// Fetches now (joining a fetch already in flight). For the refresher and for tests.
    pub async fn refresh(&self) -> Result<(), Arc<KeyError>> {
        let fetch = {
            let mut st = self.inner.fetch.lock().expect("fetch state lock");
            match st.inflight.clone() {
                Some(f) => f,
                None => self.start_fetch(&mut st, false),
            }
        };
        fetch.await
    }

    fn start_fetch(&self, st: &mut FetchState, for_kid: bool) -> SharedFetch {
        let this = self.clone();
        let fut = async move {
            let budget = this.inner.config.fetch_timeout;
            let started = Instant::now();
            let mut result = this.fetch_and_store(budget).await;
            if let Err(FetchFailure {
                retry_after: Some(wait),
                ..
            }) = &result
            {
                if let Some(timeout) = retry_within(*wait, started.elapsed(), budget) {
                    tracing::info!(
                        ?wait,
                        "the JWKS endpoint asked to retry later; waiting, then asking once more"
                    );
                    tokio::time::sleep(*wait).await;
                    result = this.fetch_and_store(timeout).await;
                }
            }
            let mut st = this.inner.fetch.lock().expect("fetch state lock");
            st.inflight = None;
            if for_kid {
                st.last_kid_refetch_failed = result.is_err();
            }
            st.retry_after_until = result
                .as_ref()
                .err()
                .and_then(|f| f.retry_after)
                .map(|w| Instant::now() + w);
            let result = result.map_err(|f| Arc::new(f.error));
            st.last_error_reason = result.as_ref().err().map(|e| e.reason());
            drop(st);
            this.publish_status();
            result
        }
        .boxed()
        .shared();
        st.inflight = Some(fut.clone());
        fut
    }

    async fn fetch_and_store(&self, timeout: Duration) -> Result<(), FetchFailure> {
        let KeySource::Remote { url, bearer } = &self.inner.source else {
            return Ok(());
        };
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let result = fetch_jwks(&self.inner.http, url, bearer.as_ref(), timeout).await;
        match result {
            Ok((keys, skipped)) => {
                for s in &skipped {
                    tracing::warn!(url = %url, "skipped a JWKS key: {s}");
                }
                let changed = self
                    .inner
                    .state
                    .load()
                    .as_ref()
                    .is_none_or(|old| !old.keys.same_keys(&keys));
                if changed {
                    self.inner.generation.fetch_add(1, Ordering::AcqRel);
                    if let Some(n) = &self.inner.negative {
                        n.invalidate_all();
                    }
                    tracing::info!(url = %url, kids = ?keys.kids(), "loaded Clerk signing keys");
                } else {
                    tracing::debug!(url = %url, "Clerk signing keys unchanged");
                }
                self.inner.state.store(Some(Arc::new(Loaded {
                    keys: Arc::new(keys),
                    confirmed_at: Instant::now(),
                })));
                Ok(())
            }
            Err(e) => {
                self.inner.fetch_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e.error, retry_after = ?e.retry_after, "loading Clerk signing keys failed");
                Err(e)
            }
        }
    }

    /// When the endpoint's last `Retry-After` ends, if it asked for one.
    fn retry_after_until(&self) -> Option<Instant> {
        self.inner
            .fetch
            .lock()
            .expect("fetch state lock")
            .retry_after_until
    }

    fn publish_status(&self) {
        let usable = self.usable_reason(Instant::now()).is_ok();
        self.inner.serving.send_if_modified(|s| {
            let changed = *s != usable;
            *s = usable;
            changed
        });
    }

    /// Spawns [`KeyStore::run`] on the current tokio runtime. The refresher stops when the
    /// returned guard is dropped or [`RefresherGuard::shutdown`] is awaited — for embedding
    /// the key store in a service (the in-process auth layer). [`crate::TokenVerifier::start`]
    /// calls it for you.
    pub fn spawn_refresher(&self) -> RefresherGuard {
        let stop = CancellationToken::new();
        let task = tokio::spawn(self.clone().run(stop.clone()));
        RefresherGuard {
            stop,
            task: Some(task),
        }
    }

    /// The refresher: loads keys, refreshes them every `refresh_interval`, retries failures
    /// with back-off, and keeps the SERVING status current (including when keys pass the
    /// stale bound). Returns when `shutdown` is cancelled. Owned and spawned by the caller.
    ///
    /// The store counts the refresher as running from this call until the future completes
    /// or is dropped (a verification that finds no keys while none runs logs a warning).
    pub fn run(
        self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let alive = RefresherAlive::new(&self);
        async move {
            let _alive = alive;
            self.refresh_loop(shutdown).await
        }
    }

    async fn refresh_loop(self, shutdown: CancellationToken) {
        if !self.is_remote() {
            self.publish_status();
            shutdown.cancelled().await;
            return;
        }
        let cfg = self.inner.config.clone();
        let mut failures: u32 = 0;
        let mut last_attempt: Option<Instant> = None;
        loop {
            let now = Instant::now();
            self.publish_status();
            let loaded = self.inner.state.load_full();
            let next_fetch = match (&loaded, last_attempt) {
                (_, None) => now,
                (Some(l), Some(_)) if failures == 0 => l.confirmed_at + cfg.refresh_interval,
                (_, Some(t)) => t + retry_delay(failures, cfg.retry_min, cfg.retry_max),
            };
            // Not before the endpoint's Retry-After.
            let next_fetch = self
                .retry_after_until()
                .map_or(next_fetch, |t| t.max(next_fetch));
            let stale_at = loaded
                .as_ref()
                .map(|l| l.confirmed_at + cfg.max_stale + Duration::from_millis(1))
                .filter(|t| *t > now);
            let wake = stale_at.map_or(next_fetch, |s| s.min(next_fetch));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= next_fetch {
                last_attempt = Some(Instant::now());
                let fetched = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    r = self.refresh() => r,
                };
                match fetched {
                    Ok(()) => failures = 0,
                    Err(_) => failures = failures.saturating_add(1),
                }
            }
        }
    }
}

/// Counts one refresher as running for as long as it lives.
struct RefresherAlive(Arc<Inner>);

impl RefresherAlive {
    fn new(store: &KeyStore) -> Self {
        store.inner.refreshers.fetch_add(1, Ordering::AcqRel);
        Self(store.inner.clone())
    }
}

impl Drop for RefresherAlive {
    fn drop(&mut self) {
        self.0.refreshers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("source", &self.inner.source)
            .field("kids", &self.kids())
            .field("usable", &self.is_usable())
            .finish()
    }
}

async fn fetch_jwks(
    http: &reqwest::Client,
    url: &url::Url,
    bearer: Option<&Secret>,
    timeout: Duration,
) -> Result<(KeySet, Vec<String>), FetchFailure> {
    let u = url.to_string();
    let fail = |error| FetchFailure {
        error,
        retry_after: None,
    };
    let http_err = |source| {
        fail(KeyError::Http {
            url: u.clone(),
            source,
        })
    };
    let mut req = http
        .get(url.clone())
        .timeout(timeout)
        .header(http::header::ACCEPT, "application/json")
        .header("Clerk-API-Version", CLERK_API_VERSION);
    if let Some(b) = bearer {
        let mut v =
            http::HeaderValue::from_str(&format!("Bearer {}", b.expose())).map_err(|_| {
                fail(KeyError::InvalidJwks {
                    url: u.clone(),
                    detail: "the secret key is not a valid header value".into(),
                })
            })?;
        v.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, v);
    }
    let mut resp = req.send().await.map_err(http_err)?;
    let status = resp.status();
    let retry_after = retry_after_of(status.as_u16(), resp.headers(), SystemTime::now());
    if let Some(len) = resp.content_length() {
        if len as usize > MAX_JWKS_BYTES {
            return Err(fail(KeyError::InvalidJwks {
                url: u,
                detail: format!("body of {len} bytes exceeds {MAX_JWKS_BYTES}"),
            }));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(http_err)? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(fail(KeyError::InvalidJwks {
                url: u,
                detail: format!("body exceeds {MAX_JWKS_BYTES} bytes"),
            }));
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let key_invalid = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("errors").and_then(|e| e.as_array()).cloned())
            .is_some_and(|errs| {
                errs.iter()
                    .any(|e| e.get("code").and_then(|c| c.as_str()) == Some("clerk_key_invalid"))
            });
        let error = if key_invalid {
            KeyError::SecretKeyInvalid {
                url: u,
                status: status.as_u16(),
            }
        } else {
            KeyError::Status {
                url: u,
                status: status.as_u16(),
            }
        };
        return Err(FetchFailure { error, retry_after });
    }
    KeySet::from_jwks_json(&body).map_err(|detail| fail(KeyError::InvalidJwks { url: u, detail }))
}

/// How long the JWKS endpoint asks us to wait: for a 429, its `Retry-After` (1 s when missing
/// or unreadable); for a 503, its `Retry-After` when it gave a readable one; otherwise none.
/// Capped at [`MAX_RETRY_AFTER`].
fn retry_after_of(status: u16, headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let given = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    let wait = match status {
        429 => Some(given.unwrap_or(DEFAULT_RETRY_AFTER)),
        503 => given,
        _ => None,
    };
    wait.map(|w| w.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_by_status_is_capped() {
        let now = SystemTime::now();
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
            h
        };
        let none = http::HeaderMap::new();
        let s = Duration::from_secs;
        assert_eq!(retry_after_of(429, &with("2"), now), Some(s(2)));
        assert_eq!(retry_after_of(429, &none, now), Some(DEFAULT_RETRY_AFTER));
        assert_eq!(
            retry_after_of(429, &with("-5"), now),
            Some(DEFAULT_RETRY_AFTER)
        );
        assert_eq!(
            retry_after_of(429, &with("garbage"), now),
            Some(DEFAULT_RETRY_AFTER)
        );
        assert_eq!(
            retry_after_of(429, &with("999999999999"), now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after_of(503, &with("3"), now), Some(s(3)));
        assert_eq!(retry_after_of(503, &none, now), None);
        assert_eq!(retry_after_of(503, &with("x"), now), None);
        assert_eq!(retry_after_of(500, &with("3"), now), None);
        assert_eq!(retry_after_of(200, &with("3"), now), None);
    }
}
