//! [`TokenVerifier`]: the verifier core plus the key store plus the verdict cache. This is what
//! the AuthService and the in-process auth layer call.
//!
//! An in-process verifier is made in one call, which also starts loading its keys and hands
//! back the refresher's guard ([`settings`]):
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // From the CLERK_* environment (CLERK_SECRET_KEY, CLERK_JWT_KEY, CLERK_JWKS_URL, …):
//! let (verifier, _keys) = clerk_grpc_auth::TokenVerifier::from_env()?;
//! // Keep `_keys` while the verifier serves: dropping it stops the key refresher.
//! # Ok(()) }
//! ```
//!
//! Layer: verification with keys held in memory (the key store refreshes them in the background;
//! the request path never waits on the network for a known key). May import `token`, `clerk`,
//! `authz`, `error`, `retry`, `secret`, `pb`.

pub(crate) mod env;
pub mod jwks;
pub mod revocations;
pub mod settings;

pub use settings::{SettingError, StartError, VerifierSettings};

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};

use crate::{
    clerk::machines::MachineVerifier,
    error::AuthError,
    secret::TokenDigest,
    token::{
        check::{Decoded, Validation, Verifier, VerifyOptions, KID_MISMATCH},
        identity::{Identity, TokenType},
        keys::VerifyingKey,
    },
    verify::{
        jwks::{KeyStore, ResolveError, SyncLookup},
        revocations::Revocations,
    },
};

/// The largest token accepted, in bytes (16 KiB). Larger → `INVALID_ARGUMENT`.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Settings of a [`TokenVerifier`].
#[derive(Debug, Clone)]
pub struct TokenVerifierConfig {
    /// Claim validation settings.
    pub validation: Validation,
    /// Most verdicts kept in the verdict cache. Defaults to 100 000; 0 disables the cache.
    pub cache_capacity: u64,
}

/// One verification request. Its `Debug` shows the token's fingerprint, never the token.
#[derive(Clone, Copy, Default)]
pub struct VerifyRequest<'a> {
    /// The token, without `Bearer `.
    pub token: &'a str,
    /// Overrides the configured authorized parties when non-empty.
    pub authorized_parties: &'a [String],
    /// Accept `pending` sessions.
    pub accept_pending: bool,
    /// Accepted token types; empty = session tokens only.
    pub accepted_types: &'a [TokenType],
    /// Who is asking (the peer address), for the per-source limit on machine-token
    /// verifications through the Backend API. Not part of the verdict.
    pub source: Option<std::net::IpAddr>,
}

/// Held by value in the cache (moka keeps each value behind its own pointer already).
#[derive(Debug, Clone)]
struct CachedVerdict {
    identity: Arc<Identity>,
    /// `exp` + skew, in ms since the epoch: the verdict is void from then on.
    valid_until_ms: f64,
    key_generation: u64,
}

struct VerdictExpiry;

/// Counters kept by a [`TokenVerifier`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifierStats {
    /// Verdicts answered from the verdict cache.
    pub cache_hits: u64,
    /// Tokens that went through the full verification (signature included).
    pub full_verifications: u64,
    /// Verifications refused `UNAVAILABLE` because the key store was never loaded and nothing
    /// is loading it (no key refresher running, no fetch ever made). The first one logs a
    /// warning saying what to do ([`TokenVerifier::start`]).
    pub keys_never_loaded: u64,
}

struct Inner {
    core: Verifier,
    cache_hits: AtomicU64,
    full_verifications: AtomicU64,
    keys_never_loaded: AtomicU64,
    warned_never_loaded: AtomicBool,
    keys: KeyStore,
    cache: Option<moka::sync::Cache<[u8; 32], CachedVerdict>>,
    machine: Option<MachineVerifier>,
    revocations: Revocations,
}

/// Verifies Clerk tokens with keys from a [`KeyStore`], caching verdicts. Cheap to clone.
///
/// A token seen again costs a hash and a cache lookup, not an RSA verification; a cached
/// verdict still expires on time (its expiry is re-checked on every hit) and is dropped when
/// the key material changes or becomes unusable.
#[derive(Clone)]
pub struct TokenVerifier {
    inner: Arc<Inner>,
}

// === impl TokenVerifierConfig ===

impl Default for TokenVerifierConfig {
    fn default() -> Self {
        Self {
            validation: Validation::default(),
            cache_capacity: 100_000,
        }
    }
}

// === impl VerdictExpiry ===

impl moka::Expiry<[u8; 32], CachedVerdict> for VerdictExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &CachedVerdict,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let left_ms = value.valid_until_ms - now_ms() as f64;
        Some(Duration::from_millis(
            left_ms.clamp(0.0, 86_400_000.0) as u64
        ))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// === impl TokenVerifier ===

impl TokenVerifier {
    /// A verifier over `keys`, for session tokens and JWT-format machine tokens. Opaque
    /// machine tokens are refused with `FAILED_PRECONDITION` / `SECRET_KEY_MISSING` (see
    /// [`TokenVerifier::with_machine`]).
    pub fn new(config: TokenVerifierConfig, keys: KeyStore) -> Self {
        Self::with_machine(config, keys, None)
    }

    /// A verifier that also verifies opaque machine tokens (`mt_`, `oat_`, `ak_`) through the
    /// Backend API with `machine`.
    pub fn with_machine(
        config: TokenVerifierConfig,
        keys: KeyStore,
        machine: Option<MachineVerifier>,
    ) -> Self {
        Self::with_parts(config, keys, machine, Revocations::default())
    }

    /// A verifier that also refuses the sessions in `revocations` (webhooks, `RevokeSession`,
    /// other replicas through Redis) with `SESSION_REVOKED` — on every path, verdict-cache
    /// hits included.
    pub fn with_parts(
        config: TokenVerifierConfig,
        keys: KeyStore,
        machine: Option<MachineVerifier>,
        revocations: Revocations,
    ) -> Self {
        let cache = (config.cache_capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.cache_capacity)
                .expire_after(VerdictExpiry)
                .build()
        });
        Self {
            inner: Arc::new(Inner {
                core: Verifier::new(config.validation),
                cache_hits: AtomicU64::new(0),
                full_verifications: AtomicU64::new(0),
                keys_never_loaded: AtomicU64::new(0),
                warned_never_loaded: AtomicBool::new(false),
                keys,
                cache,
                machine,
                revocations,
            }),
        }
    }

    /// The key store.
    pub fn keys(&self) -> &KeyStore {
        &self.inner.keys
    }

    /// Counters.
    pub fn stats(&self) -> VerifierStats {
        VerifierStats {
            cache_hits: self.inner.cache_hits.load(Ordering::Relaxed),
            full_verifications: self.inner.full_verifications.load(Ordering::Relaxed),
            keys_never_loaded: self.inner.keys_never_loaded.load(Ordering::Relaxed),
        }
    }

    /// The validation settings.
    pub fn validation(&self) -> &Validation {
        self.inner.core.validation()
    }

    /// The opaque machine-token verifier, when configured.
    pub fn machine(&self) -> Option<&MachineVerifier> {
        self.inner.machine.as_ref()
    }

    /// The revoked-session set this verifier honours.
    pub fn revocations(&self) -> &Revocations {
        &self.inner.revocations
    }

    /// Verifies a token. See the crate docs for the order of checks and the error mapping.
    pub async fn verify(&self, req: &VerifyRequest<'_>) -> Result<Arc<Identity>, AuthError> {
        let identity = self.verify_unrevoked(req, None).await?;
        self.check_revoked(&identity)?;
        Ok(identity)
    }

    /// [`TokenVerifier::verify`], for a caller that needs the token's digest too (for its
    /// log's fingerprint): computed once. `digest` must be `TokenDigest::of(req.token)`.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) async fn verify_digested(
        &self,
        req: &VerifyRequest<'_>,
        digest: &TokenDigest,
    ) -> Result<Arc<Identity>, AuthError> {
        debug_assert_eq!(*digest, TokenDigest::of(req.token));
        let identity = self.verify_unrevoked(req, Some(digest)).await?;
        self.check_revoked(&identity)?;
        Ok(identity)
    }

    fn check_revoked(&self, identity: &Identity) -> Result<(), AuthError> {
        match &identity.session_id {
            Some(sid) if self.inner.revocations.is_revoked(sid) => {
                Err(AuthError::Rejected(crate::error::VerifyError::new(
                    crate::error::Reason::SessionRevoked,
                    "The session was revoked.",
                )))
            }
            _ => Ok(()),
        }
    }

    /// `digest`: the token's, when the caller has it (else computed if the cache needs it).
    async fn verify_unrevoked(
        &self,
        req: &VerifyRequest<'_>,
        digest: Option<&TokenDigest>,
    ) -> Result<Arc<Identity>, AuthError> {
        if let Some(token_type) = self.opaque(req)? {
            let machine = self.inner.machine.as_ref().ok_or(AuthError::Misconfigured(
                crate::error::Reason::SecretKeyMissing,
            ))?;
            // Boxed: the Backend API call's state would otherwise make every verification's
            // future (moved, on every call, into the boxes of async traits) kilobytes larger.
            return Box::pin(machine.verify(req.token, token_type, req.source)).await;
        }
        let pending = match self.begin(req, digest)? {
            Begin::Hit(identity) => return Ok(identity),
            Begin::Miss(p) => p,
        };
        // From memory for a known kid; one rate-limited, single-flight refetch otherwise.
        let key = self
            .inner
            .keys
            .resolve(pending.decoded.kid())
            .await
            .map_err(|e| self.resolve_error(e, pending.decoded.token_type()))?;
        let identity = self.finish(pending, &key)?;
        // A source seen with a valid token may spend the Backend API budget's reserve. Marked
        // on full verifications only (a verdict-cache hit stays a lookup): a session token is
        // re-verified within its minute, well inside the mark's 10 minutes.
        if let (Some(source), Some(machine)) = (req.source, &self.inner.machine) {
            machine.budget().mark_known(source);
        }
        Ok(identity)
    }

    /// An opaque machine token (by prefix)? Checks it is accepted (Clerk's `acceptsToken`:
    /// no network call for a type the caller does not take).
    fn opaque(&self, req: &VerifyRequest<'_>) -> Result<Option<TokenType>, AuthError> {
        let Some(t) = crate::token::machine::opaque_type(req.token) else {
            return Ok(None);
        };
        if req.token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::InvalidRequest("token exceeds 16 KiB"));
        }
        if !req.accepted_types.contains(&t) {
            return Err(AuthError::Rejected(crate::error::VerifyError::new(
                crate::error::Reason::TokenTypeMismatch,
                "This machine token type is not accepted here.",
            )));
        }
        Ok(Some(t))
    }

    /// Verifies a token without waiting for I/O (for synchronous interceptors): keys already
    /// loaded only. A token whose `kid` is not loaded starts the key store's rate-limited,
    /// single-flight refetch in the background and fails closed at once with `UNAVAILABLE` /
    /// `JWK_KID_MISMATCH` ("retry"); once the refetch is done, the same token verifies (key
    /// found) or is refused with `UNAUTHENTICATED` / `JWK_KID_MISMATCH` (kid negative-cached).
    /// Needs a tokio runtime to start the refetch; without one it answers `UNAVAILABLE`.
    ///
    /// Opaque machine tokens need a Backend API call: they are refused here
    /// (`UNAUTHENTICATED` / `TOKEN_TYPE_MISMATCH`) — use the async layer for them.
    pub fn verify_now(&self, req: &VerifyRequest<'_>) -> Result<Arc<Identity>, AuthError> {
        let identity = self.verify_now_unrevoked(req)?;
        self.check_revoked(&identity)?;
        Ok(identity)
    }

    fn verify_now_unrevoked(&self, req: &VerifyRequest<'_>) -> Result<Arc<Identity>, AuthError> {
        if self.opaque(req)?.is_some() {
            return Err(AuthError::Rejected(crate::error::VerifyError::new(
                crate::error::Reason::TokenTypeMismatch,
                "Opaque machine tokens cannot be verified synchronously; use the auth layer.",
            )));
        }
        let pending = match self.begin(req, None)? {
            Begin::Hit(identity) => return Ok(identity),
            Begin::Miss(p) => p,
        };
        let key = match self.inner.keys.lookup_or_refetch(pending.decoded.kid()) {
            SyncLookup::Found(k) => k,
            SyncLookup::Refreshing => {
                return Err(AuthError::Unavailable(crate::error::Reason::JwkKidMismatch))
            }
            SyncLookup::Failed(e) => {
                return Err(self.resolve_error(e, pending.decoded.token_type()))
            }
        };
        self.finish(pending, &key)
    }

    /// The free `resolve_error`, noticing (and, once per verifier, logging) a key store that nobody
    /// ever started loading — the usual cause being a forgotten refresher.
    fn resolve_error(&self, e: ResolveError, token_type: TokenType) -> AuthError {
        if matches!(e, ResolveError::Unavailable(_)) && self.inner.keys.never_loading() {
            self.inner.keys_never_loaded.fetch_add(1, Ordering::Relaxed);
            if !self.inner.warned_never_loaded.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "refusing tokens UNAVAILABLE / JWK_REMOTE_FAILED_TO_LOAD: the Clerk signing \
                     keys were never loaded, and nothing is loading them (no key refresher is \
                     running). Build the verifier with TokenVerifier::start or \
                     TokenVerifier::from_env, which start the refresher, and keep the \
                     RefresherGuard they return for as long as the verifier serves (or call \
                     verifier.keys().spawn_refresher() and keep its guard)"
                );
            }
        }
        resolve_error(e, token_type)
    }

    /// Bounds, verdict cache, decoding and the type checks: everything before the key.
    /// `digest` is the token's, when the caller has it.
    fn begin<'t>(
        &self,
        req: &VerifyRequest<'t>,
        digest: Option<&TokenDigest>,
    ) -> Result<Begin<'t>, AuthError> {
        let token = req.token;
        if token.is_empty() {
            return Err(AuthError::InvalidRequest("token is empty"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::InvalidRequest("token exceeds 16 KiB"));
        }
        let now = now_ms();
        let cache_key = self.inner.cache.as_ref().map(|_| match digest {
            Some(d) => verdict_key(req, d),
            None => verdict_key(req, &TokenDigest::of(token)),
        });
        if let (Some(cache), Some(key)) = (&self.inner.cache, &cache_key) {
            if let Some(hit) = cache.get(key) {
                if hit.valid_until_ms > now as f64
                    && hit.key_generation == self.inner.keys.generation()
                    && self.inner.keys.is_usable()
                {
                    self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Begin::Hit(hit.identity.clone()));
                }
                cache.invalidate(key);
            }
        }
        // Taken before the key is resolved: a verdict is cached against the key material it
        // could have been verified with, never a newer one (a withdrawn key voids it).
        let generation = self.inner.keys.generation();
        let decoded = Decoded::parse(token)?;
        self.inner.core.check_type(&decoded, &options(req))?;
        Ok(Begin::Miss(Pending {
            decoded,
            cache_key,
            generation,
            now,
            authorized_parties: req.authorized_parties,
            accept_pending: req.accept_pending,
            accepted_types: req.accepted_types,
        }))
    }

    fn finish(&self, p: Pending<'_>, key: &VerifyingKey) -> Result<Arc<Identity>, AuthError> {
        self.inner
            .full_verifications
            .fetch_add(1, Ordering::Relaxed);
        let opts = VerifyOptions {
            authorized_parties: p.authorized_parties,
            accept_pending: p.accept_pending,
            accepted_types: p.accepted_types,
        };
        let identity = Arc::new(
            self.inner
                .core
                .verify_with_key(p.decoded, key, &opts, p.now)?,
        );
        if let (Some(cache), Some(key)) = (&self.inner.cache, p.cache_key) {
            cache.insert(
                key,
                CachedVerdict {
                    identity: identity.clone(),
                    valid_until_ms: identity.expires_at_ms()
                        + self.inner.core.validation().clock_skew_ms as f64,
                    key_generation: p.generation,
                },
            );
        }
        Ok(identity)
    }
}

// Moved once per verification, on the stack; boxing `Pending` would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Begin<'t> {
    Hit(Arc<Identity>),
    Miss(Pending<'t>),
}

impl std::fmt::Debug for VerifyRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("token", &crate::secret::token_fingerprint(self.token))
            .field("authorized_parties", &self.authorized_parties)
            .field("accept_pending", &self.accept_pending)
            .field("accepted_types", &self.accepted_types)
            .field("source", &self.source)
            .finish()
    }
}

/// A decoded token waiting for its key.
struct Pending<'t> {
    decoded: Decoded<'t>,
    cache_key: Option<[u8; 32]>,
    generation: u64,
    now: i64,
    authorized_parties: &'t [String],
    accept_pending: bool,
    accepted_types: &'t [TokenType],
}

fn options<'a>(req: &VerifyRequest<'a>) -> VerifyOptions<'a> {
    VerifyOptions {
        authorized_parties: req.authorized_parties,
        accept_pending: req.accept_pending,
        accepted_types: req.accepted_types,
    }
}

fn resolve_error(e: ResolveError, token_type: TokenType) -> AuthError {
    match e {
        // Clerk reports every machine-JWT failure as token-verification-failed (§4.2).
        ResolveError::UnknownKid if token_type != TokenType::SessionToken => AuthError::Rejected(
            KID_MISMATCH.reported_as(crate::error::Reason::TokenVerificationFailed),
        ),
        ResolveError::UnknownKid => AuthError::Rejected(KID_MISMATCH),
        ResolveError::Unavailable(r) => AuthError::Unavailable(r),
    }
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("validation", self.inner.core.validation())
            .field("keys", &self.inner.keys)
            .field("cache", &self.inner.cache.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

/// SHA-256 over the digest of the token without its trailing `=` and every option that
/// changes the verdict. The signature's padding is not part of it: Clerk accepts any number of
/// trailing `=`, and they are the only bytes anyone can change without re-signing, so `t`,
/// `t=`, `t==`… share one entry. `token` is `TokenDigest::of(req.token)`: the key's digest
/// for every unpadded token, computed again only for a padded one.
pub(crate) fn verdict_key(req: &VerifyRequest<'_>, token: &TokenDigest) -> [u8; 32] {
    let trimmed = req.token.trim_end_matches('=');
    let unpadded;
    let token = if trimmed.len() == req.token.len() {
        token
    } else {
        unpadded = TokenDigest::of(trimmed);
        &unpadded
    };
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    h.update([0u8, u8::from(req.accept_pending)]);
    // Length-prefixed: `["a", "b"]` and `["a\u{1e}b"]` are different lists.
    for p in req.authorized_parties {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.update(u64::MAX.to_le_bytes());
    for t in req.accepted_types {
        h.update((*t as i32).to_le_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_key_depends_on_every_option() {
        let key = |r: &VerifyRequest<'_>| verdict_key(r, &TokenDigest::of(r.token));
        let parties = vec!["https://a".to_owned()];
        let two = vec!["a".to_owned(), "b".to_owned()];
        let joined = vec!["a\u{1e}b".to_owned()];
        let base = VerifyRequest {
            token: "t",
            ..Default::default()
        };
        let keys = [
            key(&base),
            key(&VerifyRequest {
                accept_pending: true,
                ..base
            }),
            key(&VerifyRequest {
                authorized_parties: &parties,
                ..base
            }),
            key(&VerifyRequest {
                accepted_types: &[TokenType::SessionToken],
                ..base
            }),
            key(&VerifyRequest { token: "u", ..base }),
            key(&VerifyRequest {
                authorized_parties: &two,
                ..base
            }),
            key(&VerifyRequest {
                authorized_parties: &joined,
                ..base
            }),
        ];
        // Signature padding is not a different token.
        for padded in ["t=", "t===="] {
            assert_eq!(
                key(&VerifyRequest {
                    token: padded,
                    ..base
                }),
                keys[0]
            );
        }
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j], "{i} vs {j}");
            }
        }
    }
}
