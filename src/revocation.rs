//! Revoked sessions and cache invalidations, shared across replicas.
//!
//! A webhook (or `RevokeSession`) reaches one replica. [`Events::publish`] applies the event
//! locally at once and, when Redis is configured, stores revocations as keys with a TTL (so a
//! replica that starts later still knows) and publishes every event on a channel that every
//! replica applies at once. Without Redis: single-replica behaviour.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;

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

/// The set of revoked sessions. Cheap to clone; checked on every session-token verification.
#[derive(Clone)]
pub struct Revocations {
    inner: Arc<RevInner>,
}

struct RevInner {
    set: moka::sync::Cache<String, ()>,
    marked: AtomicU64,
    ttl: Duration,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("entries", &self.inner.set.entry_count())
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

impl Revocations {
    /// Revocations remembered for `ttl` (the longest lifetime a session token can have;
    /// default 24 h), at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: u64) -> Self {
        Self {
            inner: Arc::new(RevInner {
                set: moka::sync::Cache::builder()
                    .max_capacity(capacity)
                    .time_to_live(ttl)
                    .build(),
                marked: AtomicU64::new(0),
                ttl,
            }),
        }
    }

    /// How long a revocation is remembered.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Whether the session was revoked. One atomic load while nothing was ever revoked.
    #[inline]
    pub fn is_revoked(&self, session_id: &str) -> bool {
        self.inner.marked.load(Ordering::Relaxed) != 0 && self.inner.set.contains_key(session_id)
    }

    /// Every session id currently remembered as revoked.
    pub fn snapshot(&self) -> Vec<Arc<String>> {
        self.inner.set.iter().map(|(k, ())| k).collect()
    }

    /// Marks a session revoked (locally).
    pub fn mark(&self, session_id: &str) {
        self.inner.set.insert(session_id.to_owned(), ());
        self.inner.marked.fetch_add(1, Ordering::Relaxed);
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
    revoked_feed: broadcast::Sender<Arc<str>>,
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
        let (subscribed, _) = watch::channel(true);
        Self {
            inner: Arc::new(EventsInner {
                revocations,
                directory,
                redis: None,
                subscribed,
                applied: watch::Sender::new(0),
                revoked_feed: broadcast::channel(4096).0,
            }),
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
        let (subscribed, _) = watch::channel(false);
        Ok(Self {
            inner: Arc::new(EventsInner {
                revocations,
                directory,
                redis: Some(Redis {
                    client,
                    conn,
                    prefix: config.prefix,
                }),
                subscribed,
                applied: watch::Sender::new(0),
                revoked_feed: broadcast::channel(4096).0,
            }),
        })
    }

    /// The revoked-session set.
    pub fn revocations(&self) -> &Revocations {
        &self.inner.revocations
    }

    /// Events applied so far (local and from other replicas).
    pub fn applied(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// New revocations as they are applied (for `WatchRevocations`).
    pub fn subscribe_revocations(&self) -> broadcast::Receiver<Arc<str>> {
        self.inner.revoked_feed.subscribe()
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

    /// Applies an event here and shares it with every replica. A Redis failure is logged; the
    /// event is still applied here.
    pub async fn publish(&self, event: Event) {
        self.apply(&event).await;
        let Some(r) = &self.inner.redis else { return };
        let mut conn = r.conn.clone();
        let mut pipe = redis::pipe();
        if let Event::SessionRevoked { id } = &event {
            pipe.cmd("SET")
                .arg(format!("{}:revoked:{id}", r.prefix))
                .arg(1)
                .arg("EX")
                .arg(self.inner.revocations.ttl().as_secs().max(1))
                .ignore();
        }
        let payload = serde_json::to_string(&event).unwrap_or_default();
        pipe.cmd("PUBLISH")
            .arg(format!("{}:events", r.prefix))
            .arg(payload)
            .ignore();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::error!(error = %e, "could not share an event through Redis; other replicas will not see it");
        }
    }

    async fn apply(&self, event: &Event) {
        match event {
            Event::SessionRevoked { id } => {
                self.inner.revocations.mark(id);
                let _ = self.inner.revoked_feed.send(id.as_str().into());
                if let Some(d) = &self.inner.directory {
                    d.invalidate_session(id).await;
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

    /// Receives other replicas' events until `shutdown`: subscribes, then loads every stored
    /// revocation (so nothing published before the subscription is missed), then applies
    /// messages as they come; reconnects with back-off. Returns at once without Redis.
    pub async fn run(self, shutdown: CancellationToken) {
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
                while let Some(msg) = messages.next().await {
                    match serde_json::from_slice::<Event>(msg.get_payload_bytes()) {
                        Ok(event) => self.apply(&event).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring a malformed event from Redis")
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

    async fn load_revoked(&self, r: &Redis) -> Result<(), redis::RedisError> {
        let mut conn = r.conn.clone();
        let pattern = format!("{}:revoked:*", r.prefix);
        let skip = format!("{}:revoked:", r.prefix).len();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            for k in keys {
                if let Some(id) = k.get(skip..) {
                    self.inner.revocations.mark(id);
                    let _ = self.inner.revoked_feed.send(id.into());
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
