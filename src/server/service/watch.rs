//! `WatchRevocations` streams: bounded in number, in memory and in time.
//!
//! - **Numbers**: at most [`WatchConfig::max_streams`] streams open on the replica and
//!   [`WatchConfig::max_streams_per_connection`] on one connection (remote address and port);
//!   past either, `RESOURCE_EXHAUSTED` / `STREAM_LIMIT_REACHED` (metadata `limit`: `total` or
//!   `per_connection`). A slot is held until the stream's response body is dropped (the client
//!   read to the end, reset the stream or went away).
//! - **Memory**: the snapshot is never copied per stream. A stream walks the live set
//!   ([`Revocations::page`]) [`PAGE_SIZE`] ids at a time, and only as fast as its client reads:
//!   each stream holds at most one page and [`STREAM_BUFFER`] encoded messages, whatever the
//!   size of the set (`clerk_auth_watch_buffered_revocations`, and its high-water mark).
//! - **Time**: a subscriber to which nothing could be written for
//!   [`WatchConfig::write_timeout`], or that lagged more than
//!   [`FEED_CAPACITY`](crate::server::events::FEED_CAPACITY) live revocations behind, is dropped
//!   with `UNAVAILABLE` / `SUBSCRIBER_TOO_SLOW` (resubscribe: the snapshot is sent again); a
//!   stream opened with a token ends with `UNAUTHENTICATED` / `TOKEN_EXPIRED` when that token
//!   expires (resubscribe with a fresh one); a draining server ends every stream with
//!   `UNAVAILABLE` / `AUTH_SERVICE_UNAVAILABLE`.
//!
//! A replay of revocations stored in Redis ([`FeedEvent::Resync`]) makes each subscriber walk
//! the added ids from the set itself, so a replay larger than the broadcast lags no one.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt, Stream};
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    error::{AuthError, Reason, VerifyError},
    pb,
    server::events::{Events, FeedEvent},
    verify::revocations::{RevocationCursor, Revocations},
};

/// Revoked ids a stream takes from the set at a time.
pub const PAGE_SIZE: usize = 256;

/// Messages a stream buffers for its client (on top of HTTP/2 flow control).
pub const STREAM_BUFFER: usize = 16;

/// Limits of the revocation feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchConfig {
    /// Most streams open at once on this replica (`CLERK_AUTH_WATCH_MAX_STREAMS`, default
    /// 1024).
    pub max_streams: usize,
    /// Most streams open at once on one connection: remote address and port
    /// (`CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION`, default 8).
    pub max_streams_per_connection: usize,
    /// A subscriber to which nothing could be written for this long is dropped
    /// (`CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS`, default 30 s).
    pub write_timeout: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            max_streams: 1024,
            max_streams_per_connection: 8,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of the revocation feed (for `/metrics` and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WatchStats {
    /// Streams open now.
    pub active: u64,
    /// Streams opened so far.
    pub opened: u64,
    /// Revoked ids held in stream buffers now (pages being sent and encoded messages).
    pub buffered: u64,
    /// The most ids ever held in stream buffers at once.
    pub buffered_peak: u64,
    /// Streams refused because a limit was reached.
    pub refused_limit: u64,
    /// Subscribers dropped because they lagged behind the live revocations.
    pub dropped_lagged: u64,
    /// Subscribers dropped because nothing could be written to them for the write timeout.
    pub dropped_write_timeout: u64,
    /// Streams ended because the caller's token expired.
    pub ended_token_expired: u64,
    /// Replays of stored revocations that subscribers walked.
    pub resyncs: u64,
}

/// The open streams and their limits. Cheap to clone.
#[derive(Clone)]
pub struct WatchHub {
    inner: Arc<Hub>,
}

struct Hub {
    config: WatchConfig,
    open: Mutex<Open>,
    buffered: AtomicI64,
    buffered_peak: AtomicU64,
    opened: AtomicU64,
    refused_limit: AtomicU64,
    dropped_lagged: AtomicU64,
    dropped_write_timeout: AtomicU64,
    ended_token_expired: AtomicU64,
    resyncs: AtomicU64,
    /// Bumped whenever a stream opens, closes, is refused or dropped (tests wait on it).
    changes: watch::Sender<u64>,
    draining: CancellationToken,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_connection: HashMap<Option<SocketAddr>, usize>,
}

/// A slot of the limits, given back when the stream's body is dropped.
struct Slot {
    hub: Arc<Hub>,
    connection: Option<SocketAddr>,
}

/// Ids held by one stream; what is left when the stream and its task are gone is given back.
struct Meter {
    hub: Arc<Hub>,
    held: AtomicI64,
}

/// Why a stream was ended by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Lagged,
    WriteTimeout,
    TokenExpired,
    Draining,
}

/// The body of one `WatchRevocations` response.
pub struct RevocationStream {
    rx: mpsc::Receiver<pb::Revocation>,
    end: Option<oneshot::Receiver<Status>>,
    meter: Arc<Meter>,
    done: bool,
    _slot: Slot,
}

/// What the task that feeds one stream works with.
struct Feeder {
    hub: Arc<Hub>,
    meter: Arc<Meter>,
    revocations: Revocations,
    live: broadcast::Receiver<FeedEvent>,
    tx: mpsc::Sender<pb::Revocation>,
    deadline: Option<Instant>,
    remote: Option<SocketAddr>,
}

// === impl WatchHub ===

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHub")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::new(WatchConfig::default())
    }
}

impl WatchHub {
    /// A hub with these limits.
    pub fn new(config: WatchConfig) -> Self {
        Self {
            inner: Arc::new(Hub {
                config,
                open: Mutex::new(Open::default()),
                buffered: AtomicI64::new(0),
                buffered_peak: AtomicU64::new(0),
                opened: AtomicU64::new(0),
                refused_limit: AtomicU64::new(0),
                dropped_lagged: AtomicU64::new(0),
                dropped_write_timeout: AtomicU64::new(0),
                ended_token_expired: AtomicU64::new(0),
                resyncs: AtomicU64::new(0),
                changes: watch::Sender::new(0),
                draining: CancellationToken::new(),
            }),
        }
    }

    /// The limits.
    pub fn config(&self) -> &WatchConfig {
        &self.inner.config
    }

    /// Counters.
    pub fn stats(&self) -> WatchStats {
        let h = &self.inner;
        let active = h.open.lock().unwrap_or_else(PoisonError::into_inner).total as u64;
        WatchStats {
            active,
            opened: h.opened.load(Ordering::Relaxed),
            buffered: h.buffered.load(Ordering::Relaxed).max(0) as u64,
            buffered_peak: h.buffered_peak.load(Ordering::Relaxed),
            refused_limit: h.refused_limit.load(Ordering::Relaxed),
            dropped_lagged: h.dropped_lagged.load(Ordering::Relaxed),
            dropped_write_timeout: h.dropped_write_timeout.load(Ordering::Relaxed),
            ended_token_expired: h.ended_token_expired.load(Ordering::Relaxed),
            resyncs: h.resyncs.load(Ordering::Relaxed),
        }
    }

    /// Waits until the counters satisfy `done` (checked at every open, close, refusal and
    /// drop).
    pub async fn wait_for(&self, mut done: impl FnMut(&WatchStats) -> bool) {
        let mut rx = self.inner.changes.subscribe();
        loop {
            rx.borrow_and_update();
            if done(&self.stats()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Ends every stream (`UNAVAILABLE`, resubscribe elsewhere) and refuses new ones: the
    /// server is draining.
    pub fn shutdown(&self) {
        self.inner.draining.cancel();
    }

    /// Opens a stream for a caller on `remote`, already authorized; it ends at `expires_at`
    /// (seconds since the epoch; `None` or infinite: never) — the caller's token's expiry.
    /// `RESOURCE_EXHAUSTED` past a limit.
    pub fn open(
        &self,
        events: &Events,
        remote: Option<SocketAddr>,
        expires_at: Option<f64>,
    ) -> Result<RevocationStream, AuthError> {
        if self.inner.draining.is_cancelled() {
            return Err(AuthError::Unavailable(Reason::AuthServiceUnavailable));
        }
        let slot = self.acquire(remote)?;
        // Subscribe before walking the set, so nothing falls between the two.
        let live = events.subscribe_revocations();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (end_tx, end_rx) = oneshot::channel();
        let meter = Arc::new(Meter {
            hub: self.inner.clone(),
            held: AtomicI64::new(0),
        });
        let feeder = Feeder {
            hub: self.inner.clone(),
            meter: meter.clone(),
            revocations: events.revocations().clone(),
            live,
            tx,
            deadline: expires_at.and_then(deadline),
            remote,
        };
        // The task ends with the stream: when its body is dropped, when the server drains,
        // or when it ends the stream itself.
        tokio::spawn(async move {
            if let Some(end) = feeder.run().await {
                let _ = end_tx.send(Status::from(end.error()));
            }
        });
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        self.inner.changed();
        Ok(RevocationStream {
            rx,
            end: Some(end_rx),
            meter,
            done: false,
            _slot: slot,
        })
    }

    fn acquire(&self, connection: Option<SocketAddr>) -> Result<Slot, AuthError> {
        let h = &self.inner;
        let refused = {
            let mut open = h.open.lock().unwrap_or_else(PoisonError::into_inner);
            let here = open.by_connection.get(&connection).copied().unwrap_or(0);
            if open.total >= h.config.max_streams {
                Some("total")
            } else if here >= h.config.max_streams_per_connection {
                Some("per_connection")
            } else {
                open.total += 1;
                *open.by_connection.entry(connection).or_insert(0) += 1;
                None
            }
        };
        if let Some(limit) = refused {
            h.refused_limit.fetch_add(1, Ordering::Relaxed);
            h.changed();
            tracing::info!(
                limit,
                remote = ?connection,
                "WatchRevocations refused: too many streams"
            );
            return Err(AuthError::LimitReached {
                reason: Reason::StreamLimitReached,
                limit,
            });
        }
        Ok(Slot {
            hub: h.clone(),
            connection,
        })
    }
}

/// When a token expiring at `exp` (seconds since the epoch) is no longer valid.
fn deadline(exp: f64) -> Option<Instant> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    // Anything past ten years counts as "never".
    let left = exp - now;
    if left.is_nan() || left > 10.0 * 365.0 * 86_400.0 {
        return None;
    }
    Instant::now().checked_add(Duration::from_secs_f64(left.max(0.0)))
}

// === impl Hub ===

impl Hub {
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut open = self.hub.open.lock().unwrap_or_else(PoisonError::into_inner);
            open.total = open.total.saturating_sub(1);
            if let Some(n) = open.by_connection.get_mut(&self.connection) {
                *n -= 1;
                if *n == 0 {
                    open.by_connection.remove(&self.connection);
                }
            }
        }
        self.hub.changed();
    }
}

// === impl Meter ===

impl Meter {
    fn add(&self, n: usize) {
        let n = n as i64;
        self.held.fetch_add(n, Ordering::Relaxed);
        let now = self.hub.buffered.fetch_add(n, Ordering::Relaxed) + n;
        self.hub
            .buffered_peak
            .fetch_max(now.max(0) as u64, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        let n = n as i64;
        self.held.fetch_sub(n, Ordering::Relaxed);
        self.hub.buffered.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // Messages still in the channel or the page when both ends are gone.
        let left = self.held.load(Ordering::Relaxed);
        self.hub.buffered.fetch_sub(left, Ordering::Relaxed);
    }
}

// === impl End ===

impl End {
    fn error(self) -> AuthError {
        match self {
            End::Lagged | End::WriteTimeout => AuthError::Unavailable(Reason::SubscriberTooSlow),
            End::TokenExpired => AuthError::Rejected(VerifyError::new(
                Reason::TokenExpired,
                "the caller's token expired; resubscribe with a fresh one",
            )),
            End::Draining => AuthError::Unavailable(Reason::AuthServiceUnavailable),
        }
    }
}

// === impl Feeder ===

impl Feeder {
    /// Sends the snapshot page by page, then the live revocations, until the stream ends.
    /// `None`: the client went away.
    async fn run(mut self) -> Option<End> {
        let mut pending: VecDeque<Arc<str>> = VecDeque::new();
        // `Some(after)` while walking the set.
        let mut walk: Option<Option<RevocationCursor>> = Some(None);
        // Every entry up to here has been walked (a replay's ids before it need no new walk).
        let mut covered: Option<RevocationCursor> = None;
        let hub = self.hub.clone();
        let deadline = self.deadline;
        let expiry = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let end = loop {
            if pending.is_empty() {
                if let Some(after) = walk {
                    if hub.draining.is_cancelled() {
                        break Some(End::Draining);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break Some(End::TokenExpired);
                    }
                    // Taken before the page: no entry up to it can appear after the read.
                    let tail = self.revocations.tail();
                    let (ids, next) = self.revocations.page(after, PAGE_SIZE);
                    self.meter.add(ids.len());
                    pending.extend(ids);
                    walk = next.map(Some);
                    if walk.is_none() {
                        covered = covered.max(tail);
                    }
                    continue;
                }
            }
            let Some(id) = pending.front() else {
                // Live: wait for the next revocation (or replay).
                tokio::select! {
                    biased;
                    _ = hub.draining.cancelled() => break Some(End::Draining),
                    _ = &mut expiry => break Some(End::TokenExpired),
                    _ = self.tx.closed() => break None,
                    event = self.live.recv() => match event {
                        Ok(FeedEvent::Revoked(id)) => {
                            self.meter.add(1);
                            pending.push_back(id);
                        }
                        Ok(FeedEvent::Resync { after }) => {
                            hub.resyncs.fetch_add(1, Ordering::Relaxed);
                            walk = Some(after.max(covered));
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => break Some(End::Lagged),
                        Err(broadcast::error::RecvError::Closed) => break Some(End::Draining),
                    },
                }
                continue;
            };
            let message = pb::Revocation {
                session_id: id.to_string(),
            };
            let permit = match self.tx.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Closed(())) => break None,
                Err(mpsc::error::TrySendError::Full(())) => {
                    let write_timeout = hub.config.write_timeout;
                    tokio::select! {
                        biased;
                        _ = hub.draining.cancelled() => break Some(End::Draining),
                        _ = &mut expiry => break Some(End::TokenExpired),
                        r = tokio::time::timeout(write_timeout, self.tx.reserve()) => match r {
                            Ok(Ok(p)) => p,
                            Ok(Err(_closed)) => break None,
                            Err(_elapsed) => break Some(End::WriteTimeout),
                        },
                    }
                }
            };
            // Still counted by the meter until the stream yields it.
            permit.send(message);
            pending.pop_front();
        };
        self.meter.sub(pending.len());
        if let Some(end) = end {
            let counter = match end {
                End::Lagged => Some(&hub.dropped_lagged),
                End::WriteTimeout => Some(&hub.dropped_write_timeout),
                End::TokenExpired => Some(&hub.ended_token_expired),
                End::Draining => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
            hub.changed();
            match end {
                End::Lagged | End::WriteTimeout => tracing::info!(
                    remote = ?self.remote,
                    cause = ?end,
                    "revocation subscriber too slow; dropped"
                ),
                _ => {
                    tracing::debug!(remote = ?self.remote, cause = ?end, "revocation stream ended")
                }
            }
        }
        end
    }
}

// === impl RevocationStream ===

impl std::fmt::Debug for RevocationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationStream")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl RevocationStream {
    /// Ends the stream with `status`, dropping what is still buffered.
    fn finish(&mut self, status: Status) -> Poll<Option<Result<pb::Revocation, Status>>> {
        self.done = true;
        self.rx.close();
        let mut dropped = 0;
        while self.rx.try_recv().is_ok() {
            dropped += 1;
        }
        self.meter.sub(dropped);
        Poll::Ready(Some(Err(status)))
    }
}

impl Stream for RevocationStream {
    type Item = Result<pb::Revocation, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // The server's reason to end comes first: what is buffered is dropped.
        if let Some(end) = &mut this.end {
            if let Poll::Ready(r) = end.poll_unpin(cx) {
                this.end = None;
                if let Ok(status) = r {
                    return this.finish(status);
                }
            }
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(m)) => {
                this.meter.sub(1);
                Poll::Ready(Some(Ok(m)))
            }
            Poll::Ready(None) => {
                // The task sends its reason before it lets go of the channel.
                if let Some(Ok(status)) = this.end.take().map(|mut e| e.try_recv()) {
                    return this.finish(status);
                }
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
