//! The revoked-session set ([`Revocations`]): what the verifier and the auth layer consult on
//! every request, in memory (no I/O). Sessions get in through `server::events` (webhooks,
//! `RevokeSession`, Redis from other replicas) or a layer's revocation feed.
//!
//! The revoked-session set ([`Revocations`]) never refuses a new revocation: each one is kept
//! for the TTL (the longest lifetime a token of the session can have, after which no token of
//! it can still be valid), and only if the hard cap is reached is the **oldest** one evicted
//! — counted in `/metrics` (`clerk_auth_revocations_evicted`) and logged (at most one warning
//! a minute, with the number evicted since the last one).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest session id accepted into the revoked set (Clerk's are `sess_` + 27).
pub const MAX_SESSION_ID_LEN: usize = 128;

/// At most one eviction warning per this interval (the rest are summed into the next one).
const EVICTION_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
/// `server::events::Events::run`) does the same without an insert.
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
    crate::clerk::api::is_clerk_id(id, "sess_") && id.len() <= MAX_SESSION_ID_LEN
}

/// How often `server::events::Events::run` purges expired revocations: a tenth of the TTL, between 1 s and
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
    /// stored revocations (the server's `Events` reloading Redis): ids already known keep their
    /// place, so a walk from [`Revocations::tail`] taken before the replay yields the new ones
    /// only.
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
    /// yet reported when the log interval has passed. Run periodically by `server::events::Events::run`.
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
