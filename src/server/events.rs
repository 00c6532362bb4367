//! Revoked sessions and cache invalidations, shared across replicas.
//!
//! A webhook (or `RevokeSession`) reaches one replica. [`Events::publish`] applies the event
//! locally at once and, when Redis is configured, stores revocations as keys with a TTL (so a
//! replica that starts later still knows) and publishes every event on a channel that every
//! replica applies at once. Without Redis: single-replica behaviour. After a reconnection the
//! stored revocations are loaded again: the ids not yet known are added to the set directly and
//! `WatchRevocations` subscribers are told once to walk them ([`FeedEvent::Resync`]), so a
//! replay larger than the feed ([`FEED_CAPACITY`]) lags no one.
//!
//! What comes from Redis is hostile input: channel messages larger than [`MAX_EVENT_BYTES`]
//! are refused before parsing, stored keys are read as bytes, and anything not UTF-8, not
//! JSON or carrying an id Clerk would not issue ([`Event::is_well_formed`]) is skipped and
//! counted ([`SharingStatus::malformed`]) — never a reason to drop the subscription. An event
//! made while Redis is down waits (bounded, [`MAX_PENDING_EVENTS`]) and is stored and
//! published when Redis answers again.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    clerk::directory::Directory,
    verify::revocations::{
        is_plausible_session_id, sweep_interval, RevocationCursor, Revocations, MAX_SESSION_ID_LEN,
    },
};

/// The largest event accepted from the Redis channel, checked before it is parsed (an event
/// with the longest plausible id is under 200 bytes).
pub const MAX_EVENT_BYTES: usize = 512;

/// The most events kept for re-publishing while Redis cannot be reached; past that the oldest
/// is dropped (counted in [`SharingStatus::pending_dropped`]).
pub const MAX_PENDING_EVENTS: usize = 10_000;

/// How often events waiting for Redis are retried while the subscription is up.
const PENDING_RETRY: Duration = Duration::from_secs(1);

/// Something that changed at Clerk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The session was revoked, ended or removed: refuse its tokens.
    SessionRevoked {
        /// `sess_…`.
        id: String,
    },
    /// The user changed or was deleted: drop the cached profile and memberships.
    UserChanged {
        /// `user_…`.
        id: String,
    },
    /// A membership of the user changed.
    MembershipsChanged {
        /// `user_…`.
        user_id: String,
    },
    /// One of the user's sessions was created or changed: drop the pages of its sessions.
    SessionsChanged {
        /// `user_…`.
        user_id: String,
    },
    /// The organization, or one of its memberships, changed or was deleted: drop its profile
    /// and the pages of its members.
    OrganizationChanged {
        /// `org_…`.
        id: String,
    },
}

impl Event {
    /// Whether every id of the event has the shape Clerk gives it: a plausible session id
    /// ([`is_plausible_session_id`]) or a `user_…` (`org_…`) id of at most
    /// [`MAX_SESSION_ID_LEN`] bytes.
    /// Events from Redis that are not are skipped and counted.
    pub fn is_well_formed(&self) -> bool {
        match self {
            Event::SessionRevoked { id } => is_plausible_session_id(id),
            Event::UserChanged { id }
            | Event::MembershipsChanged { user_id: id }
            | Event::SessionsChanged { user_id: id } => {
                crate::clerk::api::is_clerk_id(id, "user_") && id.len() <= MAX_SESSION_ID_LEN
            }
            Event::OrganizationChanged { id } => {
                crate::clerk::api::is_clerk_id(id, "org_") && id.len() <= MAX_SESSION_ID_LEN
            }
        }
    }

    /// Decodes an event from the Redis channel: at most [`MAX_EVENT_BYTES`], JSON, well
    /// formed ([`Event::is_well_formed`]); `None` otherwise.
    pub fn decode(payload: &[u8]) -> Option<Event> {
        if payload.len() > MAX_EVENT_BYTES {
            return None;
        }
        serde_json::from_slice::<Event>(payload)
            .ok()
            .filter(Event::is_well_formed)
    }
}

/// Redis settings. `Debug` hides the URL (it may hold a password).
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://…` (`CLERK_AUTH_REDIS_URL`).
    pub url: String,
    /// Key and channel prefix (default `clerk-auth`), so several deployments can share a
    /// Redis.
    pub prefix: String,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"…")
            .field("prefix", &self.prefix)
            .finish()
    }
}

struct Redis {
    client: redis::Client,
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

struct EventsInner {
    revocations: Revocations,
    directory: Option<Directory>,
    redis: Option<Redis>,
    subscribed: watch::Sender<bool>,
    applied: watch::Sender<u64>,
    reloads: watch::Sender<u64>,
    revoked_feed: broadcast::Sender<FeedEvent>,
    /// Messages and stored keys from Redis skipped as malformed.
    malformed: AtomicU64,
    /// Events that could not be shared yet (Redis down), oldest first; re-published when
    /// Redis answers again.
    pending: Mutex<VecDeque<Event>>,
    pending_dropped: AtomicU64,
}

impl EventsInner {
    fn new(revocations: Revocations, directory: Option<Directory>, redis: Option<Redis>) -> Self {
        Self {
            revocations,
            directory,
            subscribed: watch::Sender::new(redis.is_none()),
            redis,
            applied: watch::Sender::new(0),
            reloads: watch::Sender::new(0),
            revoked_feed: broadcast::channel(FEED_CAPACITY).0,
            malformed: AtomicU64::new(0),
            pending: Mutex::new(VecDeque::new()),
            pending_dropped: AtomicU64::new(0),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How revocation sharing through Redis is doing (for `/readyz` and `/metrics`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SharingStatus {
    /// Whether Redis is configured at all (without it, each replica knows what reached it).
    pub configured: bool,
    /// Whether this replica is subscribed now (receives other replicas' events); always
    /// `true` without Redis.
    pub subscribed: bool,
    /// Messages and stored keys from Redis skipped as malformed (not UTF-8, too large, not
    /// JSON, or an id Clerk would not issue).
    pub malformed: u64,
    /// Events made here that wait for Redis to be shared.
    pub pending: u64,
    /// Waiting events dropped (oldest first) because [`MAX_PENDING_EVENTS`] were waiting.
    pub pending_dropped: u64,
}

/// How many feed events ([`Events::subscribe_revocations`]) a subscriber may be behind before
/// it is told it lagged. A replay of stored revocations takes one event whatever its size.
pub const FEED_CAPACITY: usize = 4096;

/// What a revocation subscriber (`WatchRevocations`) is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// This session was revoked.
    Revoked(Arc<str>),
    /// Revocations were added to the set without an event each (a replay of the ids stored in
    /// Redis after a reconnection): walk the set ([`Revocations::page`]) from `after` to the
    /// end to see them.
    Resync {
        /// Where the added ids start (exclusive; `None`: from the oldest).
        after: Option<RevocationCursor>,
    },
}

/// Applies and shares events. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    inner: Arc<EventsInner>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("revocations", &self.inner.revocations)
            .field("redis", &self.inner.redis.as_ref().map(|r| &r.prefix))
            .finish()
    }
}

/// Redis could not be reached at startup.
#[derive(Debug, thiserror::Error)]
#[error("CLERK_AUTH_REDIS_URL: cannot connect to Redis: {0}")]
pub struct RedisError(String);

impl Events {
    /// Events applied to this replica only.
    pub fn local(revocations: Revocations, directory: Option<Directory>) -> Self {
        Self {
            inner: Arc::new(EventsInner::new(revocations, directory, None)),
        }
    }

    /// Events shared through Redis. Connects now (a bad URL or an unreachable Redis is a
    /// startup error); run [`Events::run`] to receive other replicas' events.
    pub async fn with_redis(
        revocations: Revocations,
        directory: Option<Directory>,
        config: RedisConfig,
    ) -> Result<Self, RedisError> {
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| RedisError(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_secs(5), client.get_connection_manager())
            .await
            .map_err(|_| RedisError("timed out".into()))?
            .map_err(|e| RedisError(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(EventsInner::new(
                revocations,
                directory,
                Some(Redis {
                    client,
                    conn,
                    prefix: config.prefix,
                }),
            )),
        })
    }

    /// How sharing through Redis is doing.
    pub fn sharing(&self) -> SharingStatus {
        let i = &self.inner;
        SharingStatus {
            configured: i.redis.is_some(),
            subscribed: *i.subscribed.borrow(),
            malformed: i.malformed.load(Ordering::Relaxed),
            pending: i.pending().len() as u64,
            pending_dropped: i.pending_dropped.load(Ordering::Relaxed),
        }
    }

    /// Waits until this replica is not subscribed to Redis (tests, health probes).
    pub async fn unsubscribed(&self) {
        let mut rx = self.inner.subscribed.subscribe();
        let _ = rx.wait_for(|s| !*s).await;
    }

    /// The revoked-session set.
    pub fn revocations(&self) -> &Revocations {
        &self.inner.revocations
    }

    /// Events applied so far (local and from other replicas).
    pub fn applied(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// New revocations as they are applied, and replays to walk (for `WatchRevocations`).
    /// Subscribe **before** walking the set, so nothing falls between the walk and the feed.
    pub fn subscribe_revocations(&self) -> broadcast::Receiver<FeedEvent> {
        self.inner.revoked_feed.subscribe()
    }

    /// How many times the stored revocations were loaded from Redis (at each (re)connection).
    pub fn reloads(&self) -> u64 {
        *self.inner.reloads.borrow()
    }

    /// Waits until the stored revocations have been loaded from Redis at least `n` times.
    pub async fn wait_reloaded(&self, n: u64) {
        let mut rx = self.inner.reloads.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Waits until at least `n` events have been applied.
    pub async fn wait_applied(&self, n: u64) {
        let mut rx = self.inner.applied.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Waits until this replica receives other replicas' events (at once without Redis).
    pub async fn subscribed(&self) {
        let mut rx = self.inner.subscribed.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Applies an event here and shares it with every replica. When Redis cannot take it, the
    /// event is still applied here and waits (at most [`MAX_PENDING_EVENTS`], oldest dropped
    /// first) to be stored and published when Redis answers again.
    /// A revocation of an implausible session id ([`is_plausible_session_id`]) is counted as
    /// refused and neither applied nor shared; any other event naming an id Clerk would not
    /// issue ([`Event::is_well_formed`]) is ignored.
    pub async fn publish(&self, event: Event) {
        if let Event::SessionRevoked { id } = &event {
            if !is_plausible_session_id(id) {
                self.inner.revocations.mark(id);
                tracing::debug!(
                    len = id.len(),
                    "ignoring a revocation of an implausible session id"
                );
                return;
            }
        } else if !event.is_well_formed() {
            // An id Clerk would not issue names nothing cached here, and other replicas
            // would refuse it from Redis: neither applied nor shared.
            tracing::debug!("ignoring an event whose id Clerk would not issue");
            return;
        }
        self.apply(&event).await;
        let Some(r) = &self.inner.redis else { return };
        let earlier = !self.inner.pending().is_empty();
        if earlier {
            // Keep the order: this one goes after those still waiting.
            self.queue(vec![event]);
            self.flush_pending(r).await;
            return;
        }
        if let Err(e) = self.share(r, std::slice::from_ref(&event)).await {
            tracing::error!(error = %e, "could not share an event through Redis; it is kept and re-published when Redis answers");
            self.queue(vec![event]);
        }
    }

    /// Stores (revocations) and publishes `events` in one pipeline.
    async fn share(&self, r: &Redis, events: &[Event]) -> Result<(), redis::RedisError> {
        let mut conn = r.conn.clone();
        let mut pipe = redis::pipe();
        for event in events {
            if let Event::SessionRevoked { id } = event {
                pipe.cmd("SET")
                    .arg(format!("{}:revoked:{id}", r.prefix))
                    .arg(1)
                    .arg("EX")
                    .arg(self.inner.revocations.ttl().as_secs().max(1))
                    .ignore();
            }
            let payload = serde_json::to_string(event).unwrap_or_default();
            pipe.cmd("PUBLISH")
                .arg(format!("{}:events", r.prefix))
                .arg(payload)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await
    }

    /// Appends to the events waiting for Redis, dropping the oldest past
    /// [`MAX_PENDING_EVENTS`].
    fn queue(&self, events: Vec<Event>) {
        let mut q = self.inner.pending();
        q.extend(events);
        let over = q.len().saturating_sub(MAX_PENDING_EVENTS);
        if over > 0 {
            q.drain(..over);
            drop(q);
            self.inner
                .pending_dropped
                .fetch_add(over as u64, Ordering::Relaxed);
            tracing::warn!(
                dropped = over,
                "too many events wait for Redis: the oldest were dropped (their stored keys \
                 are not written; other replicas will not see them)"
            );
        }
    }

    /// Re-publishes the events waiting for Redis, a bounded batch at a time; on failure they
    /// wait again (in front). The lock is not held across the `.await`.
    async fn flush_pending(&self, r: &Redis) {
        loop {
            let batch: Vec<Event> = {
                let mut q = self.inner.pending();
                let n = q.len().min(500);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let n = batch.len();
            if let Err(e) = self.share(r, &batch).await {
                tracing::warn!(error = %e, waiting = n, "Redis still cannot take the waiting events");
                let mut q = self.inner.pending();
                for event in batch.into_iter().rev() {
                    q.push_front(event);
                }
                let over = q.len().saturating_sub(MAX_PENDING_EVENTS);
                if over > 0 {
                    q.drain(..over);
                    self.inner
                        .pending_dropped
                        .fetch_add(over as u64, Ordering::Relaxed);
                }
                return;
            }
            tracing::info!(events = n, "events that waited for Redis were shared");
        }
    }

    async fn apply(&self, event: &Event) {
        match event {
            Event::SessionRevoked { id } => {
                if self.inner.revocations.mark(id) {
                    let _ = self
                        .inner
                        .revoked_feed
                        .send(FeedEvent::Revoked(id.as_str().into()));
                    if let Some(d) = &self.inner.directory {
                        d.invalidate_session(id).await;
                    }
                }
            }
            Event::UserChanged { id } => {
                if let Some(d) = &self.inner.directory {
                    d.invalidate_user(id).await;
                }
            }
            Event::MembershipsChanged { user_id } => {
                if let Some(d) = &self.inner.directory {
                    d.invalidate_memberships(user_id).await;
                }
            }
            Event::SessionsChanged { user_id } => {
                if let Some(d) = &self.inner.directory {
                    d.invalidate_sessions_of(user_id);
                }
            }
            Event::OrganizationChanged { id } => {
                if let Some(d) = &self.inner.directory {
                    d.invalidate_organization(id).await;
                }
            }
        }
        self.inner.applied.send_modify(|c| *c += 1);
    }

    /// Until `shutdown`: purges expired revocations periodically (and writes the eviction
    /// summary when one is due), and, with Redis, receives other replicas' events: subscribes,
    /// then loads every stored revocation (so nothing published before the subscription is
    /// missed), then applies messages as they come; reconnects with back-off.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::join!(self.sweep(&shutdown), self.follow_redis(&shutdown));
    }

    /// Purges expired revocations every [`sweep_interval`] of the TTL until `shutdown`.
    async fn sweep(&self, shutdown: &CancellationToken) {
        let every = sweep_interval(self.inner.revocations.ttl());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.inner.revocations.purge_expired();
        }
    }

    async fn follow_redis(&self, shutdown: &CancellationToken) {
        let Some(r) = &self.inner.redis else { return };
        let channel = format!("{}:events", r.prefix);
        let mut failures = 0u32;
        loop {
            let session = async {
                let mut pubsub = r.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                self.load_revoked(r).await?;
                self.inner.subscribed.send_replace(true);
                failures = 0;
                let mut messages = pubsub.on_message();
                // Events made here while Redis was down go out now, then are retried.
                let mut retry = tokio::time::interval(PENDING_RETRY);
                retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        msg = messages.next() => {
                            let Some(msg) = msg else { break };
                            match Event::decode(msg.get_payload_bytes()) {
                                Some(event) => self.apply(&event).await,
                                None => self.skip_malformed(
                                    "message",
                                    msg.get_payload_bytes().len(),
                                ),
                            }
                        }
                        _ = retry.tick() => {
                            if !self.inner.pending().is_empty() {
                                self.flush_pending(r).await;
                            }
                        }
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = session => {
                    self.inner.subscribed.send_replace(false);
                    match result {
                        Ok(()) => tracing::warn!("Redis subscription ended; reconnecting"),
                        Err(e) => tracing::warn!(error = %e, "Redis subscription failed; reconnecting"),
                    }
                }
            }
            failures = failures.saturating_add(1);
            let wait = crate::retry::retry_delay(
                failures,
                Duration::from_millis(200),
                Duration::from_secs(10),
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Loads every stored revocation. The ids are added to the set directly — one that is
    /// already held keeps its place — and subscribers get one [`FeedEvent::Resync`] from the
    /// set's tail before the load, whatever the number of ids: a replay larger than
    /// [`FEED_CAPACITY`] lags no one.
    async fn load_revoked(&self, r: &Redis) -> Result<(), redis::RedisError> {
        let revocations = &self.inner.revocations;
        let after = revocations.tail();
        let mut added = 0u64;
        let result = self.scan_revoked(r, &mut added).await;
        if added > 0 {
            let _ = self.inner.revoked_feed.send(FeedEvent::Resync { after });
            tracing::info!(added, "revocations stored in Redis replayed");
        }
        if result.is_ok() {
            self.inner.reloads.send_modify(|n| *n += 1);
        }
        result
    }

    /// Counts something malformed from Redis and logs it (rate-limited; only its length).
    fn skip_malformed(&self, what: &'static str, len: usize) {
        let total = self.inner.malformed.fetch_add(1, Ordering::Relaxed) + 1;
        // The 1st, 2nd, 4th, 8th… are warned about; the count is in `/metrics`.
        if total.is_power_of_two() {
            tracing::warn!(
                what,
                len,
                total,
                "skipped something malformed from Redis (too large, not UTF-8 or JSON, or not \
                 a Clerk id)"
            );
        }
    }

    async fn scan_revoked(&self, r: &Redis, added: &mut u64) -> Result<(), redis::RedisError> {
        let mut conn = r.conn.clone();
        let pattern = format!("{}:revoked:*", r.prefix);
        let skip = format!("{}:revoked:", r.prefix).len();
        let mut cursor: u64 = 0;
        loop {
            // Keys as bytes: one that is not UTF-8 is skipped, not a failure of the whole load.
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            for k in keys {
                let id = k
                    .get(skip..)
                    .filter(|id| id.len() <= MAX_SESSION_ID_LEN)
                    .and_then(|id| std::str::from_utf8(id).ok())
                    .filter(|id| is_plausible_session_id(id));
                match id {
                    Some(id) => {
                        if self.inner.revocations.mark_new(id) {
                            *added += 1;
                        }
                    }
                    None => self.skip_malformed("stored key", k.len()),
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
