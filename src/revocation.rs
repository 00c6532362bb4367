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
//!
//! The revoked-session set ([`Revocations`]) never refuses a new revocation: each one is kept
//! for the TTL (the longest lifetime a token of the session can have, after which no token of
//! it can still be valid), and only if the hard cap is reached is the **oldest** one evicted
//! — counted in `/metrics` (`clerk_auth_revocations_evicted`) and logged (at most one warning
//! a minute, with the number evicted since the last one).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
    time::Duration,
};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{broadcast, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;

/// The longest session id accepted into the revoked set (Clerk's are `sess_` + 27).
pub const MAX_SESSION_ID_LEN: usize = 128;

/// The largest event accepted from the Redis channel, checked before it is parsed (an event
/// with the longest plausible id is under 200 bytes).
pub const MAX_EVENT_BYTES: usize = 512;

/// The most events kept for re-publishing while Redis cannot be reached; past that the oldest
/// is dropped (counted in [`SharingStatus::pending_dropped`]).
pub const MAX_PENDING_EVENTS: usize = 10_000;

/// How often events waiting for Redis are retried while the subscription is up.
const PENDING_RETRY: Duration = Duration::from_secs(1);

/// At most one eviction warning per this interval (the rest are summed into the next one).
const EVICTION_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
}

impl Event {
    /// Whether every id of the event has the shape Clerk gives it: a plausible session id
    /// ([`is_plausible_session_id`]) or a `user_…` id of at most [`MAX_SESSION_ID_LEN`] bytes.
    /// Events from Redis that are not are skipped and counted.
    pub fn is_well_formed(&self) -> bool {
        match self {
            Event::SessionRevoked { id } => is_plausible_session_id(id),
            Event::UserChanged { id } | Event::MembershipsChanged { user_id: id } => {
                crate::bapi::is_clerk_id(id, "user_") && id.len() <= MAX_SESSION_ID_LEN
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

/// The set of revoked sessions. Cheap to clone; checked on every session-token verification.
///
/// - **Always admits** a new revocation; revoking an id again refreshes it (one entry).
/// - **Expires** each entry [`Revocations::ttl`] after it was (last) revoked.
/// - **Evicts the oldest** entries first when [`Revocations::capacity`] is reached, counted in
///   [`RevocationStats::evicted`] and logged (rate-limited).
/// - **Refuses** ids that are not plausible Clerk session ids ([`is_plausible_session_id`]),
///   counted in [`RevocationStats::refused`]: no token can carry them as `sid` — Clerk's do
///   not look like that — and they would only take room.
///
/// [`Revocations::is_revoked`] is one atomic load while the set is empty, else a hash lookup
/// under a read lock (never held across an `.await`). Inserts take the write lock and purge
/// expired entries from the oldest end; [`Revocations::purge_expired`] (run periodically by
/// [`Events::run`]) does the same without an insert.
#[derive(Clone)]
pub struct Revocations {
    inner: Arc<RevInner>,
}

/// Where a paged walk over the set ([`Revocations::page`]) goes on from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RevocationCursor(u64);

/// Counters of the revoked-session set.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RevocationStats {
    /// Revocations held now (expired ones not yet purged included).
    pub entries: u64,
    /// Revocations evicted, oldest first, because the cap was reached.
    pub evicted: u64,
    /// Revocations dropped because their TTL had passed.
    pub expired: u64,
    /// Ids refused because they are not plausible Clerk session ids.
    pub refused: u64,
}

struct RevInner {
    ttl: Duration,
    capacity: usize,
    table: RwLock<Table>,
    /// `table.by_id.len()`, readable without the lock (the empty-set fast path).
    len: AtomicUsize,
    evicted: AtomicU64,
    expired: AtomicU64,
    refused: AtomicU64,
    report: Mutex<EvictionReport>,
    /// Sessions with open streams ([`Revocations::watch`]): told at once when revoked.
    watchers: Arc<WatchMap>,
}

/// Entries by id and in revocation order. `seq` increases with every (re-)revocation, and the
/// instants are taken under the write lock, so the first entry of `order` is the oldest.
#[derive(Default)]
struct Table {
    by_id: HashMap<Arc<str>, Stamp>,
    order: BTreeMap<u64, (Instant, Arc<str>)>,
    next_seq: u64,
}

#[derive(Clone, Copy)]
struct Stamp {
    seq: u64,
    at: Instant,
}

/// Evictions not yet logged, and when the last warning was written.
#[derive(Default)]
struct EvictionReport {
    last_warn: Option<Instant>,
    unreported: u64,
}

/// Whether `id` may be a Clerk session id: `sess_` followed by 1 to 123 ASCII letters, digits
/// or `_` (at most [`MAX_SESSION_ID_LEN`] bytes in all) — the shape `RevokeSession` and the
/// identity RPCs already require.
pub fn is_plausible_session_id(id: &str) -> bool {
    crate::bapi::is_clerk_id(id, "sess_") && id.len() <= MAX_SESSION_ID_LEN
}

/// How often [`Events::run`] purges expired revocations: a tenth of the TTL, between 1 s and
/// 60 s (the eviction summary is written on the same beat).
pub fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_secs(1), EVICTION_LOG_INTERVAL)
}

// === impl Revocations ===

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("entries", &self.len())
            .field("ttl", &self.inner.ttl)
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

impl Revocations {
    /// Revocations remembered for `ttl` after they are made (the longest lifetime a session
    /// token can have; default 24 h), at most `capacity` of them (at least 1) — past that the
    /// oldest is evicted.
    pub fn new(ttl: Duration, capacity: u64) -> Self {
        Self {
            inner: Arc::new(RevInner {
                ttl,
                capacity: usize::try_from(capacity.max(1)).unwrap_or(usize::MAX),
                table: RwLock::new(Table::default()),
                len: AtomicUsize::new(0),
                evicted: AtomicU64::new(0),
                expired: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                report: Mutex::new(EvictionReport::default()),
                watchers: Arc::default(),
            }),
        }
    }

    /// How long a revocation is remembered.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The most revocations held at once.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity as u64
    }

    /// Revocations held now (expired ones not yet purged included).
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// Whether no revocation is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters (for `/metrics`).
    pub fn stats(&self) -> RevocationStats {
        let i = &self.inner;
        RevocationStats {
            entries: self.len() as u64,
            evicted: i.evicted.load(Ordering::Relaxed),
            expired: i.expired.load(Ordering::Relaxed),
            refused: i.refused.load(Ordering::Relaxed),
        }
    }

    /// Whether the session was revoked (within the TTL). One atomic load while the set is
    /// empty; otherwise one hash lookup under a read lock.
    #[inline]
    pub fn is_revoked(&self, session_id: &str) -> bool {
        if self.inner.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.is_revoked_at(session_id, Instant::now())
    }

    fn is_revoked_at(&self, session_id: &str, now: Instant) -> bool {
        let stamp = self.read().by_id.get(session_id).copied();
        stamp.is_some_and(|s| !self.is_expired(s.at, now))
    }

    fn is_expired(&self, at: Instant, now: Instant) -> bool {
        now.saturating_duration_since(at) >= self.inner.ttl
    }

    /// Marks a session revoked (locally), from now for the TTL; an id already held is
    /// refreshed. Returns `false` (and counts a refusal) when `session_id` is not a plausible
    /// Clerk session id ([`is_plausible_session_id`]); a new revocation is otherwise always
    /// admitted, evicting the oldest if the set is full.
    pub fn mark(&self, session_id: &str) -> bool {
        self.mark_at(session_id, Instant::now())
    }

    fn mark_at(&self, session_id: &str, now: Instant) -> bool {
        self.mark_with(session_id, now, true)
    }

    /// Marks a session revoked only if it is not already (a live entry is left as it is, its
    /// place in the order and its TTL unchanged). Returns whether it was added. For replays of
    /// stored revocations ([`Events`] reloading Redis): ids already known keep their place, so
    /// a walk from [`Revocations::tail`] taken before the replay yields the new ones only.
    pub fn mark_new(&self, session_id: &str) -> bool {
        self.mark_with(session_id, Instant::now(), false)
    }

    /// The cursor of the newest entry ever added (`None` before the first): every id marked
    /// after this call is found by a walk ([`Revocations::page`]) from it.
    pub fn tail(&self) -> Option<RevocationCursor> {
        let next = self.read().next_seq;
        next.checked_sub(1).map(RevocationCursor)
    }

    fn mark_with(&self, session_id: &str, now: Instant, refresh: bool) -> bool {
        if !is_plausible_session_id(session_id) {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !refresh && self.is_revoked_at(session_id, now) {
            return false;
        }
        let evicted = {
            let mut t = self.write();
            if !refresh
                && t.by_id
                    .get(session_id)
                    .is_some_and(|s| !self.is_expired(s.at, now))
            {
                return false;
            }
            let seq = t.next_seq;
            t.next_seq += 1;
            let stamp = Stamp { seq, at: now };
            let id: Arc<str> = match t.by_id.get_key_value(session_id) {
                Some((id, old)) => {
                    let (id, old_seq) = (id.clone(), old.seq);
                    t.order.remove(&old_seq);
                    id
                }
                None => session_id.into(),
            };
            t.by_id.insert(id.clone(), stamp);
            t.order.insert(seq, (now, id));
            let expired = self.purge_locked(&mut t, now);
            let mut evicted = 0u64;
            while t.by_id.len() > self.inner.capacity {
                let Some((_, (_, oldest))) = t.order.pop_first() else {
                    break;
                };
                t.by_id.remove(&oldest);
                evicted += 1;
            }
            self.inner.len.store(t.by_id.len(), Ordering::Relaxed);
            if expired > 0 {
                self.inner.expired.fetch_add(expired, Ordering::Relaxed);
            }
            evicted
        };
        if evicted > 0 {
            self.inner.evicted.fetch_add(evicted, Ordering::Relaxed);
            self.report_evictions(evicted, now);
        }
        self.inner.watchers.revoked(session_id);
        true
    }

    /// Drops the entries whose TTL has passed (oldest first; stops at the first live one).
    fn purge_locked(&self, t: &mut Table, now: Instant) -> u64 {
        let mut n = 0;
        while let Some(entry) = t.order.first_entry() {
            if !self.is_expired(entry.get().0, now) {
                break;
            }
            let (_, id) = entry.remove();
            t.by_id.remove(&id);
            n += 1;
        }
        n
    }

    /// Drops every revocation whose TTL has passed; returns how many. Also logs evictions not
    /// yet reported when the log interval has passed. Run periodically by [`Events::run`].
    pub fn purge_expired(&self) -> usize {
        self.purge_expired_at(Instant::now())
    }

    fn purge_expired_at(&self, now: Instant) -> usize {
        let expired = {
            let oldest = self.read().order.first_key_value().map(|(_, (at, _))| *at);
            if oldest.is_some_and(|at| self.is_expired(at, now)) {
                let mut t = self.write();
                let n = self.purge_locked(&mut t, now);
                self.inner.len.store(t.by_id.len(), Ordering::Relaxed);
                n
            } else {
                0
            }
        };
        if expired > 0 {
            self.inner.expired.fetch_add(expired, Ordering::Relaxed);
        }
        self.report_evictions(0, now);
        expired as usize
    }

    /// Adds `n` evictions to the report and writes the warning when one is due: at the first
    /// eviction, then at most once per [`EVICTION_LOG_INTERVAL`] with the sum since the last.
    fn report_evictions(&self, n: u64, now: Instant) {
        let due = {
            let mut r = self
                .inner
                .report
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            r.unreported += n;
            let due = r.unreported > 0
                && r.last_warn
                    .is_none_or(|t| now.saturating_duration_since(t) >= EVICTION_LOG_INTERVAL);
            if due {
                r.last_warn = Some(now);
                Some(std::mem::take(&mut r.unreported))
            } else {
                None
            }
        };
        if let Some(evicted) = due {
            tracing::warn!(
                evicted,
                capacity = self.inner.capacity,
                total = self.inner.evicted.load(Ordering::Relaxed),
                "the revoked-session set is full: the oldest revocations were evicted and their \
                 sessions' tokens are accepted again; raise CLERK_AUTH_REVOCATION_CAPACITY"
            );
        }
    }

    /// Every session id currently revoked (within the TTL), oldest first. Copies the set; to
    /// walk a large set a bounded piece at a time, use [`Revocations::page`].
    pub fn snapshot(&self) -> Vec<Arc<str>> {
        let now = Instant::now();
        self.read()
            .order
            .values()
            .filter(|(at, _)| !self.is_expired(*at, now))
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Up to `limit` revoked ids after `after` (from the oldest when `None`), oldest first,
    /// with the cursor to go on from (`None` when the walk is done). The read lock is held
    /// only while one page is copied, so a stream can send the whole set page by page without
    /// copying it at once; an id revoked again during the walk moves to the end and may be
    /// seen twice (marking it again is harmless).
    pub fn page(
        &self,
        after: Option<RevocationCursor>,
        limit: usize,
    ) -> (Vec<Arc<str>>, Option<RevocationCursor>) {
        let now = Instant::now();
        let limit = limit.max(1);
        let start = after.map_or(0, |c| c.0.saturating_add(1));
        let t = self.read();
        let mut out = Vec::with_capacity(limit.min(t.order.len()));
        let mut last = None;
        for (seq, (at, id)) in t.order.range(start..) {
            if out.len() >= limit {
                return (out, last);
            }
            last = Some(RevocationCursor(*seq));
            if !self.is_expired(*at, now) {
                out.push(id.clone());
            }
        }
        (out, None)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.inner
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.inner
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sessions that open streams follow, by id (entries live while a [`SessionWatch`] does).
#[derive(Default)]
struct WatchMap {
    by_id: Mutex<HashMap<Arc<str>, std::sync::Weak<WatchEntry>>>,
}

impl WatchMap {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, std::sync::Weak<WatchEntry>>> {
        self.by_id.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the watchers of `session_id`, if any, and forgets them (a later watch starts anew).
    fn revoked(&self, session_id: &str) {
        let entry = self.lock().remove(session_id);
        if let Some(e) = entry.and_then(|w| w.upgrade()) {
            e.token.cancel();
        }
    }
}

/// One watched session: its token is cancelled when the session is revoked.
struct WatchEntry {
    id: Arc<str>,
    token: CancellationToken,
    map: std::sync::Weak<WatchMap>,
}

impl Drop for WatchEntry {
    fn drop(&mut self) {
        if let Some(map) = self.map.upgrade() {
            let mut m = map.lock();
            // Only a dead entry is removed (a newer watch of the same id may have replaced it).
            if m.get(&self.id).is_some_and(|w| w.strong_count() == 0) {
                m.remove(&self.id);
            }
        }
    }
}

/// Follows one session's revocation (see [`Revocations::watch`]). Cheap to clone; the session
/// is followed while a clone lives.
#[derive(Clone)]
pub struct SessionWatch {
    _entry: Option<Arc<WatchEntry>>,
    token: CancellationToken,
}

impl std::fmt::Debug for SessionWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionWatch")
            .field("revoked", &self.is_revoked())
            .finish()
    }
}

impl SessionWatch {
    /// Whether the session was revoked since the watch began (or before).
    pub fn is_revoked(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the session is revoked.
    pub async fn revoked(&self) {
        self.token.cancelled().await
    }

    /// A token cancelled when the session is revoked (a child: cancelling it touches no one
    /// else). It does not keep the watch alive: hold the [`SessionWatch`] too.
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }
}

impl Revocations {
    /// Follows `session_id`: the returned watch fires as soon as the session is marked revoked
    /// ([`Revocations::mark`], [`Revocations::mark_new`] — webhooks, `RevokeSession`, Redis,
    /// a `WatchRevocations` feed), or at once if it already is. No task and no lock held
    /// while waiting: one map entry per watched session, dropped with its last watch. An id
    /// that cannot be a session id ([`is_plausible_session_id`]) is never revoked, and its
    /// watch never fires.
    pub fn watch(&self, session_id: &str) -> SessionWatch {
        if !is_plausible_session_id(session_id) {
            return SessionWatch {
                _entry: None,
                token: CancellationToken::new(),
            };
        }
        let map = &self.inner.watchers;
        let entry = {
            let mut m = map.lock();
            match m.get(session_id).and_then(std::sync::Weak::upgrade) {
                Some(e) => e,
                None => {
                    let id: Arc<str> = session_id.into();
                    let e = Arc::new(WatchEntry {
                        id: id.clone(),
                        token: CancellationToken::new(),
                        map: Arc::downgrade(map),
                    });
                    m.insert(id, Arc::downgrade(&e));
                    e
                }
            }
        };
        // Registered first, checked second: a revocation marked before the registration is
        // seen here, one marked after it cancels the entry.
        if self.is_revoked(session_id) {
            entry.token.cancel();
        }
        SessionWatch {
            token: entry.token.clone(),
            _entry: Some(entry),
        }
    }

    /// Sessions followed now by at least one [`SessionWatch`].
    pub fn watched(&self) -> usize {
        self.inner.watchers.lock().len()
    }
}

impl Default for Revocations {
    fn default() -> Self {
        Self::new(Duration::from_secs(86_400), 1_000_000)
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
    /// refused and neither applied nor shared.
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
            let wait = crate::jwks::retry_delay(
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

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(100);

    fn sid(i: usize) -> String {
        format!("sess_{i:027}")
    }

    #[test]
    fn at_capacity_every_new_revocation_is_honoured_and_the_oldest_are_evicted() {
        let r = Revocations::new(TTL, 10);
        let t0 = Instant::now();
        for i in 0..100 {
            let now = t0 + Duration::from_millis(i as u64);
            assert!(r.mark_at(&sid(i), now));
            assert!(
                r.is_revoked_at(&sid(i), now),
                "revocation {i} honoured at once"
            );
            assert_eq!(r.len(), (i + 1).min(10));
        }
        let now = t0 + Duration::from_secs(1);
        for i in 0..90 {
            assert!(!r.is_revoked_at(&sid(i), now), "{i} was among the oldest");
        }
        for i in 90..100 {
            assert!(r.is_revoked_at(&sid(i), now), "{i} is among the newest");
        }
        let s = r.stats();
        assert_eq!((s.entries, s.evicted, s.expired, s.refused), (10, 90, 0, 0));
    }

    #[test]
    fn revoking_again_refreshes_without_duplicating() {
        let r = Revocations::new(TTL, 3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        r.mark_at(&sid(1), at(0));
        r.mark_at(&sid(2), at(1));
        r.mark_at(&sid(3), at(2));
        // sid 1 again: now the newest, one entry.
        r.mark_at(&sid(1), at(50));
        assert_eq!(r.len(), 3);
        assert_eq!(r.read().order.len(), 3);
        // Full: the next one evicts sid 2 (now the oldest), not sid 1.
        r.mark_at(&sid(4), at(51));
        assert!(!r.is_revoked_at(&sid(2), at(51)));
        for i in [1, 3, 4] {
            assert!(r.is_revoked_at(&sid(i), at(51)), "{i}");
        }
        // Its TTL runs from the second revocation.
        assert!(r.is_revoked_at(&sid(1), at(149)));
        assert!(!r.is_revoked_at(&sid(1), at(150)));
        assert_eq!(r.stats().evicted, 1);
    }

    #[test]
    fn entries_expire_after_the_ttl_and_are_purged() {
        let r = Revocations::new(TTL, 1_000);
        let t0 = Instant::now();
        r.mark_at(&sid(1), t0);
        r.mark_at(&sid(2), t0 + Duration::from_secs(10));
        assert!(r.is_revoked_at(&sid(1), t0 + TTL - Duration::from_millis(1)));
        assert!(!r.is_revoked_at(&sid(1), t0 + TTL));
        assert!(r.is_revoked_at(&sid(2), t0 + TTL));
        // Still held until purged (an insert or the sweep), but no longer revoked.
        assert_eq!(r.len(), 2);
        assert_eq!(r.purge_expired_at(t0 + TTL), 1);
        assert_eq!(r.len(), 1);
        // An insert purges lazily too.
        r.mark_at(&sid(3), t0 + TTL + Duration::from_secs(10));
        assert_eq!(r.len(), 1);
        let s = r.stats();
        assert_eq!((s.expired, s.evicted), (2, 0));
        assert_eq!(r.purge_expired_at(t0 + TTL * 3), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn implausible_ids_are_refused_and_counted() {
        let r = Revocations::new(TTL, 10);
        let long = format!("sess_{}", "a".repeat(MAX_SESSION_ID_LEN));
        for bad in [
            "",
            "sess_",
            "sess",
            "user_2abc",
            "SESS_abc",
            "sess_a b",
            "sess_a-b",
            "sess_é",
            "sess_a\0",
            "sess_a\n",
            long.as_str(),
        ] {
            assert!(!r.mark(bad), "{bad:?}");
            assert!(!r.is_revoked(bad));
        }
        assert_eq!(r.stats().refused, 11);
        assert!(r.is_empty());
        // What Clerk issues (and the emulator mints) is accepted.
        for good in ["sess_2abcDEF0123456789abcdefghi", "sess_1", "sess_a_b"] {
            assert!(r.mark(good), "{good}");
            assert!(r.is_revoked(good));
        }
        assert!(r.mark(&format!("sess_{}", "a".repeat(MAX_SESSION_ID_LEN - 5))));
    }

    #[test]
    fn pages_walk_the_whole_set_oldest_first() {
        let r = Revocations::new(TTL, 100);
        for i in 0..25 {
            r.mark(&sid(i));
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = r.page(cursor, 10);
            assert!(page.len() <= 10);
            seen.extend(page.iter().map(|s| s.to_string()));
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, (0..25).map(sid).collect::<Vec<_>>());
        let snap: Vec<String> = r.snapshot().iter().map(|s| s.to_string()).collect();
        assert_eq!(snap, seen);
    }

    #[test]
    fn a_replay_adds_only_new_ids_and_a_walk_from_the_tail_finds_them() {
        let r = Revocations::new(TTL, 100);
        assert_eq!(r.tail(), None);
        for i in 0..5 {
            r.mark(&sid(i));
        }
        let tail = r.tail();
        // Known ids keep their place; new ones are added after the tail.
        for i in 3..8 {
            assert_eq!(r.mark_new(&sid(i)), i >= 5, "{i}");
        }
        assert!(!r.mark_new("not a session"));
        assert_eq!(r.len(), 8);
        let (page, next) = r.page(tail, 100);
        assert_eq!(next, None);
        let page: Vec<String> = page.iter().map(|s| s.to_string()).collect();
        assert_eq!(page, [sid(5), sid(6), sid(7)]);
        // From the start: every id once, in order.
        let (all, _) = r.page(None, 100);
        assert_eq!(all.len(), 8);
        assert_eq!(&*all[0], sid(0));
    }

    #[test]
    fn watches_fire_on_revocation_and_are_forgotten_with_their_last_holder() {
        let r = Revocations::new(TTL, 10);
        let a = r.watch(&sid(1));
        let a2 = a.clone();
        let b = r.watch(&sid(2));
        assert_eq!(r.watched(), 2);
        assert!(!a.is_revoked() && !b.is_revoked());
        let child = a.child_token();
        assert!(r.mark(&sid(1)));
        assert!(a.is_revoked() && a2.is_revoked() && child.is_cancelled());
        assert!(!b.is_revoked(), "only that session's watches fire");
        // Revoked before the watch: fires at once (replays too).
        assert!(r.watch(&sid(1)).is_revoked());
        assert!(r.mark_new(&sid(3)));
        assert!(r.watch(&sid(3)).is_revoked());
        drop(b);
        drop((a, a2));
        assert_eq!(r.watched(), 0, "entries live only while watched");
        // An id no token can carry is never revoked, and takes no entry.
        let bogus = r.watch("not a session");
        assert!(!r.mark("not a session"));
        assert!(!bogus.is_revoked());
        assert_eq!(r.watched(), 0);
    }

    #[test]
    fn sweep_interval_is_bounded() {
        assert_eq!(
            sweep_interval(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(100)),
            Duration::from_secs(10)
        );
        assert_eq!(
            sweep_interval(Duration::from_millis(50)),
            Duration::from_secs(1)
        );
    }
}
