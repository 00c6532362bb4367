//! Protect any tonic server: a tower [`AuthLayer`] (in-process or delegated verification, per-method
//! [`Policy`]) and a synchronous [`AuthInterceptor`] (in-process only).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use clerk_grpc_auth::{authz::{policy::{Policy, Rule}, Check}, layer::AuthLayer, TokenVerifier};
//!
//! // Starts loading the keys; keep `_keys` (the key refresher) while serving.
//! let (verifier, _keys) = TokenVerifier::from_env()?;
//! let policy = Policy::authenticated().method(
//!     "/examples.orders.v1.Orders/DeleteOrder",
//!     Rule::authenticated().require(Check::permission("org:orders:delete")),
//! );
//! let router = tonic::transport::Server::builder()
//!     .layer(AuthLayer::in_process(verifier, policy));
//! # Ok(()) }
//! ```
//!
//! Every call: its path must be exactly `/pkg.Service/Method` (else `INVALID_ARGUMENT` /
//! `PATH_NOT_CANONICAL`, before any rule is looked up — see [`Policy::rule_for`]); the [`Rule`]
//! for its path is looked up; a public method goes straight through
//! (no token read); otherwise the token is taken from the request ([`TokenSources`]), verified
//! by the [`Authenticate`] implementation (in-process [`TokenVerifier`], or
//! [`DelegatedVerifier`] calling AuthService), the rule's `has()` checks run, and the handler
//! is called with the [`Identity`] in the request extensions ([`RequestIdentity::identity`]).
//! Errors answer without calling the handler: no or invalid credentials → `UNAUTHENTICATED`,
//! authenticated but not allowed → `PERMISSION_DENIED`, verification impossible →
//! `UNAVAILABLE`, all with `google.rpc.ErrorInfo` reasons.
//!
//! Layer: the `layer` feature. May import `verify`, `credentials`, `authz`, `token`, `error`,
//! `canonical`, `retry`, `secret`, `pb`; never `server` or `emulator`.

mod body;
mod delegated;
mod extract;
mod feed;
mod interceptor;
#[cfg(feature = "web")]
pub mod web;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use tonic::Status;
use tower::{Layer, Service};

pub use body::ExpiringBody;
pub use delegated::{CallerCredentials, DelegatedConfig, DelegatedStats, DelegatedVerifier};
pub use extract::{Origin, TokenSources, CLIENT_UAT_COOKIE, SESSION_COOKIE};
pub use feed::{watch_revocations, watch_revocations_with, RevocationFeed};
pub use interceptor::AuthInterceptor;

use crate::{
    authz::policy::{Policy, Rule},
    error::{AuthError, Reason, VerifyError},
    secret::token_fingerprint,
    token::identity::Identity,
    verify::revocations::Revocations,
    TokenVerifier, VerifyRequest,
};

use body::{CallLife, RequestBody};
pub(crate) use extract::{AuthorizedOrigins, CookieContext};

/// How often, by default, a stream whose token has no session to follow (API keys, M2M and
/// OAuth tokens) is re-verified ([`AuthLayer::reverify_streams_every`]).
pub const DEFAULT_REVERIFY_INTERVAL: Duration = Duration::from_secs(60);

/// The shortest re-verification interval accepted.
const MIN_REVERIFY_INTERVAL: Duration = Duration::from_millis(100);

/// Verifies a token into an [`Identity`]: the one trait behind both modes.
///
/// Implemented by [`TokenVerifier`] (in-process: verifier core, key store, verdict cache) and
/// by [`DelegatedVerifier`] (calls `clerk.auth.v1.AuthService/VerifyToken`).
pub trait Authenticate: Send + Sync + 'static {
    /// Verifies `req.token` with the request's options.
    fn authenticate<'a>(
        &'a self,
        req: VerifyRequest<'a>,
    ) -> BoxFuture<'a, Result<Arc<Identity>, AuthError>>;

    /// The revoked sessions this implementation refuses, if it follows any: with
    /// [`AuthLayer::end_streams_at_expiry`], the open streams of a session marked there end at
    /// once (`SESSION_REVOKED`). Default: none.
    fn revocations(&self) -> Option<&Revocations> {
        None
    }

    /// The authorized parties (`azp` allowlist) this implementation verifies against, when it
    /// knows them: the layer's default for [`AuthLayer::authorized_parties`] (its `Origin`
    /// check for cookie-borne tokens, and its CORS policy). Default: none.
    fn authorized_parties(&self) -> &[String] {
        &[]
    }
}

impl Authenticate for TokenVerifier {
    fn authenticate<'a>(
        &'a self,
        req: VerifyRequest<'a>,
    ) -> BoxFuture<'a, Result<Arc<Identity>, AuthError>> {
        Box::pin(async move { self.verify(&req).await })
    }

    fn revocations(&self) -> Option<&Revocations> {
        Some(TokenVerifier::revocations(self))
    }

    fn authorized_parties(&self) -> &[String] {
        &self.validation().authorized_parties
    }
}

/// The verified identity, as the layer leaves it in the request extensions. Only this crate
/// can create one, so no other middleware can forge it.
#[derive(Clone)]
pub struct Verified {
    identity: Arc<Identity>,
    /// The header value that carried the token (shared, not copied) and where the token is.
    header: http::HeaderValue,
    token_at: std::ops::Range<usize>,
}

impl Verified {
    /// `token` must be a slice of `header`'s bytes.
    pub(crate) fn new(identity: Arc<Identity>, header: &http::HeaderValue, token: &str) -> Self {
        let base = header.as_bytes().as_ptr() as usize;
        let start = (token.as_ptr() as usize).saturating_sub(base);
        let token_at = start..start + token.len();
        debug_assert_eq!(
            header.as_bytes().get(token_at.clone()),
            Some(token.as_bytes())
        );
        Self {
            identity,
            header: header.clone(),
            token_at,
        }
    }

    /// The verified identity.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// The token the call was verified with (to forward it to the next service, see
    /// [`forward_token`]). Keep it out of logs.
    pub fn token(&self) -> &str {
        self.header
            .as_bytes()
            .get(self.token_at.clone())
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("user_id", &self.identity.user_id)
            .field("token", &token_fingerprint(self.token()))
            .finish()
    }
}

/// Reads the verified identity from a request (`request.identity()?`).
pub trait RequestIdentity {
    /// The identity verified by the auth layer or interceptor. `UNAUTHENTICATED` /
    /// `TOKEN_MISSING` when there is none (a public method, or no auth layer) — fail closed.
    fn identity(&self) -> Result<&Identity, Status>;

    /// The identity and the token it was verified with.
    fn verified(&self) -> Option<&Verified>;
}

fn no_identity() -> Status {
    Status::from(AuthError::Rejected(VerifyError::new(
        Reason::TokenMissing,
        "this call carries no verified identity",
    )))
}

impl<T> RequestIdentity for tonic::Request<T> {
    fn identity(&self) -> Result<&Identity, Status> {
        self.extensions().identity()
    }

    fn verified(&self) -> Option<&Verified> {
        self.extensions().verified()
    }
}

impl RequestIdentity for tonic::Extensions {
    fn identity(&self) -> Result<&Identity, Status> {
        self.get::<Verified>()
            .map(|v| &*v.identity)
            .ok_or_else(no_identity)
    }

    fn verified(&self) -> Option<&Verified> {
        self.get::<Verified>()
    }
}

struct Shared {
    auth: Arc<dyn Authenticate>,
    policy: Policy,
    sources: TokenSources,
    authorized: AuthorizedOrigins,
    end_streams_at_expiry: bool,
    reverify_every: Duration,
}

/// A tower layer that authenticates and authorizes every call of the services it wraps.
///
/// Usable with `tonic::transport::Server::builder().layer(…)` or around one service. Cheap to
/// clone.
///
/// Protecting your own tonic service (the README's snippet; this copy is the one compiled):
///
/// ```no_run
/// # // A stand-in for your generated `OrdersServer` and your handlers.
/// # #[derive(Clone)] struct MyOrders;
/// # #[derive(Clone)] struct OrdersServer<T>(T);
/// # impl<T> OrdersServer<T> { fn new(t: T) -> Self { Self(t) } }
/// # impl<T> tonic::server::NamedService for OrdersServer<T> { const NAME: &'static str = "examples.orders.v1.Orders"; }
/// # impl<T: Clone + Send + 'static> tower::Service<http::Request<tonic::body::Body>> for OrdersServer<T> {
/// #     type Response = http::Response<tonic::body::Body>;
/// #     type Error = std::convert::Infallible;
/// #     type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
/// #     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> { std::task::Poll::Ready(Ok(())) }
/// #     fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future { std::future::ready(Ok(http::Response::default())) }
/// # }
/// # struct DeleteOrderRequest;
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// # let addr = "127.0.0.1:50061".parse()?;
/// use clerk_grpc_auth::{
///     authz::{policy::{Policy, Rule}, Check},
///     layer::{AuthLayer, RequestIdentity},
///     TokenVerifier,
/// };
///
/// // From CLERK_SECRET_KEY, CLERK_JWT_KEY or CLERK_JWKS_URL (and the other CLERK_* settings).
/// // Keys load in the background; keep `_keys` (the key refresher) while you serve.
/// let (verifier, _keys) = TokenVerifier::from_env()?;
///
/// let policy = Policy::authenticated()                       // default: a valid session token
///     .method("/examples.orders.v1.Orders/Ping", Rule::public())
///     .method("/examples.orders.v1.Orders/DeleteOrder",
///             Rule::authenticated().require(Check::permission("org:orders:delete")));
///
/// tonic::transport::Server::builder()
///     .layer(AuthLayer::in_process(verifier, policy))        // or AuthLayer::delegated(…)
///     .add_service(OrdersServer::new(MyOrders))
///     .serve(addr).await?;
///
/// // in a handler
/// fn delete_order(request: &tonic::Request<DeleteOrderRequest>) -> Result<(), tonic::Status> {
///     let who = request.identity()?;                         // &Identity, or UNAUTHENTICATED
///     if who.has(&Check::role("org:admin")) { /* … */ }      // Clerk's has(), exact rules
///     Ok(())
/// }
/// # Ok(()) }
/// ```
///
/// # Cookie-borne tokens
///
/// A token read from the `__session` cookie (browsers, gRPC-web) is a session token or nothing
/// ([`Origin::accepted`]), and the request must also show, as Clerk's `authenticateRequest`
/// checks on its cookie path:
///
/// * a non-zero `__client_uat` cookie beside it, else `UNAUTHENTICATED` /
///   `SESSION_TOKEN_BUT_NO_CLIENT_UAT` (Clerk: `session-token-but-no-client-uat`;
///   `__client_uat=0` means signed out). Read as decimal digits only;
/// * a token issued no earlier than it (`iat` ≥ `__client_uat`), else
///   `SESSION_TOKEN_IAT_BEFORE_CLIENT_UAT`;
/// * `azp` among the [authorized parties](AuthLayer::authorized_parties) when some are set
///   (`TOKEN_INVALID_AUTHORIZED_PARTIES`, as for a header token).
///
/// Further than Clerk, which does not read `Origin` (it relies on `azp` and `SameSite`):
///
/// * one `Origin` header at most, and a canonicalisable one ([`crate::canonical::origin`]:
///   not `null`, no path, userinfo, whitespace or non-ASCII), else `ORIGIN_INVALID`;
/// * an `Origin` among the authorized parties (compared canonically) — or, with none
///   configured, equal to the token's own `azp` — else `ORIGIN_NOT_AUTHORIZED`;
/// * with no `Origin`, `Sec-Fetch-Site` absent, `same-origin` or `none`, else
///   `ORIGIN_NOT_AUTHORIZED` (browsers send `Origin` on every gRPC-web `POST`; a client that
///   sends neither is not a browser and is taken as Clerk takes it).
///
/// A token in `authorization` (a page calling with `getToken()`) is not subject to these: no
/// browser attaches it on its own. Cookie checks happen before any rule's `has()` checks.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("policy", &self.shared.policy)
            .field("sources", &self.shared.sources)
            .field("authorized_parties", &self.shared.authorized.parties)
            .field("end_streams_at_expiry", &self.shared.end_streams_at_expiry)
            .field("reverify_every", &self.shared.reverify_every)
            .finish()
    }
}

impl AuthLayer {
    /// A layer over any [`Authenticate`] implementation.
    pub fn new(auth: impl Authenticate, policy: Policy) -> Self {
        Self::from_arc(Arc::new(auth), policy)
    }

    fn from_arc(auth: Arc<dyn Authenticate>, policy: Policy) -> Self {
        let authorized = AuthorizedOrigins::new(auth.authorized_parties().to_vec());
        Self {
            shared: Arc::new(Shared {
                auth,
                policy,
                sources: TokenSources::default(),
                authorized,
                end_streams_at_expiry: false,
                reverify_every: DEFAULT_REVERIFY_INTERVAL,
            }),
        }
    }

    /// In-process: the verifier core and key store in this process; no network per call.
    ///
    /// Get the verifier from [`TokenVerifier::from_env`] (the `CLERK_*` environment) or
    /// [`TokenVerifier::start`] (explicit [`VerifierSettings`](crate::verify::VerifierSettings)).
    /// Both start loading the keys in the background and return the key refresher's
    /// [`RefresherGuard`](crate::verify::jwks::RefresherGuard) with the verifier: keep the
    /// guard for as long as the layer serves (dropping it stops the refresher). Until the
    /// first load, calls answer `UNAVAILABLE` / `JWK_REMOTE_FAILED_TO_LOAD`; await
    /// `verifier.keys().ready()` before serving to avoid that. A verifier whose keys nobody
    /// loads (built from a bare [`KeyStore`](crate::verify::jwks::KeyStore) without
    /// [`spawn_refresher`](crate::verify::jwks::KeyStore::spawn_refresher)) logs one warning
    /// saying so.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use clerk_grpc_auth::{authz::policy::Policy, layer::AuthLayer, TokenVerifier};
    ///
    /// let (verifier, _keys) = TokenVerifier::from_env()?;
    /// verifier.keys().ready().await;
    /// let layer = AuthLayer::in_process(verifier, Policy::authenticated());
    /// # Ok(()) }
    /// ```
    pub fn in_process(verifier: TokenVerifier, policy: Policy) -> Self {
        Self::new(verifier, policy)
    }

    /// Delegated: each verification is a `VerifyToken` call to AuthService (cached).
    pub fn delegated(verifier: DelegatedVerifier, policy: Policy) -> Self {
        Self::new(verifier, policy)
    }

    fn modify(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        if Arc::get_mut(&mut self.shared).is_none() {
            let old = &*self.shared;
            self.shared = Arc::new(Shared {
                auth: old.auth.clone(),
                policy: old.policy.clone(),
                sources: old.sources.clone(),
                authorized: old.authorized.clone(),
                end_streams_at_expiry: old.end_streams_at_expiry,
                reverify_every: old.reverify_every,
            });
        }
        f(Arc::get_mut(&mut self.shared).expect("unique after the copy"));
        self
    }

    /// Where tokens are read from (default: `authorization`, then the `__session` cookie).
    pub fn token_sources(self, sources: TokenSources) -> Self {
        self.modify(|s| s.sources = sources)
    }

    /// The authorized parties (`azp` allowlist, e.g. `https://app.example.com`) for every call
    /// through this layer, replacing the verifier's (`CLERK_AUTHORIZED_PARTIES`, the default
    /// for an in-process [`TokenVerifier`]; none for a [`DelegatedVerifier`], whose
    /// AuthService has its own unless the layer sends these). One list serves three checks,
    /// so they cannot drift apart:
    ///
    /// * a session token's `azp` must be one of them (exact, as Clerk's SDK; sent to
    ///   AuthService by a delegated layer);
    /// * a token from the `__session` cookie whose request has an `Origin` must come from one
    ///   of them (compared canonically, [`crate::canonical::origin`]), see
    ///   [the cookie rules](#cookie-borne-tokens);
    /// * the CORS policy for browsers ([`AuthLayer::cors`], the `web` feature) allows exactly
    ///   these origins.
    ///
    /// An entry that is not an origin (`scheme://host[:port]`) still counts for `azp` but never
    /// matches an `Origin` (a warning is logged). An empty list: no `azp` check (Clerk's
    /// default), and a cookie-borne token's `Origin` must equal its own `azp`.
    pub fn authorized_parties<I, P>(self, parties: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let authorized = AuthorizedOrigins::new(parties.into_iter().map(Into::into).collect());
        self.modify(|s| s.authorized = authorized)
    }

    /// The authorized parties in effect ([`AuthLayer::authorized_parties`]), as configured.
    pub fn authorized_party_list(&self) -> &[String] {
        &self.shared.authorized.parties
    }

    /// The authorized parties that are origins, canonical (`scheme://host[:port]`): what a
    /// browser's `Origin` is compared with, and what the CORS policy allows.
    pub fn authorized_origins(&self) -> &[String] {
        &self.shared.authorized.origins
    }

    /// End every call — streams of either direction included — when the token that opened it
    /// ends (default: off), with `UNAUTHENTICATED` and reason:
    ///
    /// * `TOKEN_EXPIRED` at the token's `exp`: an absolute deadline fixed at verification
    ///   (however long the handler takes to answer), checked before every frame of the
    ///   request and the response, and by a timer while the stream is idle;
    /// * `SESSION_REVOKED` as soon as the session is marked in the verifier's
    ///   [`Revocations`] (webhook, `RevokeSession`, Redis, or a [`RevocationFeed`]);
    /// * the re-verification's refusal (e.g. `TOKEN_REVOKED`) for a token without a session
    ///   (API keys, M2M and OAuth tokens), re-verified through the same verifier every
    ///   [`AuthLayer::reverify_streams_every`] while the call is open (only when it outlives
    ///   that interval). A verdict cache may answer a re-verification: a revoked machine token
    ///   is seen within the interval plus that cache's age (in-process:
    ///   `MachineConfig::max_age`; delegated: [`DelegatedConfig::max_age`] plus AuthService's).
    ///   A re-verification that cannot be made (Clerk or AuthService down) ends the call too,
    ///   with its `UNAVAILABLE` status: fail closed.
    ///
    /// A response not yet produced is answered with the status; the request body ends with it,
    /// so a client stream stops feeding the handler.
    pub fn end_streams_at_expiry(self, yes: bool) -> Self {
        self.modify(|s| s.end_streams_at_expiry = yes)
    }

    /// How often a call whose token has no session (API keys, M2M and OAuth tokens) is
    /// re-verified while it is open, with [`AuthLayer::end_streams_at_expiry`] (default
    /// [`DEFAULT_REVERIFY_INTERVAL`], 60 s; at least 100 ms).
    pub fn reverify_streams_every(self, every: Duration) -> Self {
        self.modify(|s| s.reverify_every = every.max(MIN_REVERIFY_INTERVAL))
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("inner", &self.inner).finish()
    }
}

/// Authorizes one verified call against `rule`: the part shared by the layer and the
/// interceptor.
pub(crate) fn authorize(
    rule: &Rule,
    machine_id: Option<&str>,
    identity: &Identity,
) -> Result<(), AuthError> {
    rule.authorize(identity, machine_id)
        .map_err(AuthError::Denied)
}

pub(crate) fn request_for<'a>(
    rule: &'a Rule,
    token: &'a str,
    origin: Origin,
    authorized_parties: &'a [String],
    source: Option<std::net::IpAddr>,
) -> Result<VerifyRequest<'a>, AuthError> {
    Ok(VerifyRequest {
        token,
        authorized_parties,
        accept_pending: rule.accept_pending,
        // From the `__session` cookie: session tokens only.
        accepted_types: origin.accepted(&rule.token_types)?,
        source,
    })
}

use crate::authz::peer::{peer_ip, PeerIdentity};

fn log_refusal(path: &str, token: Option<&str>, err: &AuthError) {
    let fingerprint = token.map(token_fingerprint);
    tracing::debug!(
        method = path,
        token = fingerprint.as_deref().unwrap_or("-"),
        code = ?err.code(),
        reason = err.reason_str(),
        "call refused"
    );
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Auth<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ReqBody::Error: Into<tonic::codegen::StdError>,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ExpiringBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // The ready service handles this call; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let path = req.uri().path();
            // A path that is not exactly /pkg.Service/Method is refused before any rule is
            // looked up (it could otherwise fall to a looser one).
            let rule = match shared.policy.rule_for(path) {
                Ok(rule) => rule,
                Err(e) => {
                    log_refusal(&path.escape_debug().to_string(), None, &e);
                    return Ok(refusal(e));
                }
            };
            if rule.is_public() {
                return inner
                    .call(req.map(tonic::body::Body::new))
                    .await
                    .map(|r| r.map(ExpiringBody::unbounded));
            }
            // mTLS: a rule naming peers refuses any other caller before looking at tokens.
            if !rule.peers.is_empty()
                && !PeerIdentity::from_extensions(req.extensions()).any_in(&rule.peers)
            {
                let e = AuthError::Denied(crate::error::Denial {
                    unmet: crate::authz::Unmet::PeerNotAllowed,
                    required: Vec::new(),
                });
                log_refusal(path, None, &e);
                return Ok(refusal(e));
            }
            let (token, header, origin) = match shared.sources.extract_with_header(req.headers()) {
                Ok(t) => t,
                Err(e) => {
                    log_refusal(path, None, &e);
                    return Ok(refusal(e));
                }
            };
            let source = peer_ip(req.extensions());
            let parties = &shared.authorized.parties[..];
            // A token from the cookie (on a rule that takes session tokens): the browser
            // context must check out too, before and after verification.
            let verdict = match request_for(rule, token, origin, parties, source) {
                Ok(r) => match origin {
                    Origin::Header => shared.auth.authenticate(r).await,
                    Origin::Cookie => {
                        match CookieContext::read(req.headers(), &shared.authorized) {
                            Ok(cookie) => shared.auth.authenticate(r).await.and_then(|identity| {
                                cookie
                                    .check(&identity, &shared.authorized)
                                    .map(|()| identity)
                            }),
                            Err(e) => Err(e),
                        }
                    }
                },
                Err(e) => Err(e),
            };
            let verdict = match verdict {
                Ok(identity) => {
                    authorize(rule, shared.policy.own_machine_id(), &identity).map(|()| identity)
                }
                Err(e) => Err(e),
            };
            let identity = match verdict {
                Ok(identity) => identity,
                Err(e) => {
                    log_refusal(path, Some(token), &e);
                    return Ok(refusal(e));
                }
            };
            let verified = Verified::new(identity, header, token);
            if !shared.end_streams_at_expiry {
                let mut req = req.map(tonic::body::Body::new);
                req.extensions_mut().insert(verified);
                return inner
                    .call(req)
                    .await
                    .map(|r| r.map(ExpiringBody::unbounded));
            }
            let life = Arc::new(life_of(&shared, &verified, path, origin, source));
            let method: Box<str> = path.into();
            let mut req =
                req.map(|b| tonic::body::Body::new(RequestBody::new(b, Box::pin(life.ending()))));
            req.extensions_mut().insert(verified.clone());
            let mut ending = Box::pin(life.ending());
            drop(life);
            let res = tokio::select! {
                biased;
                // The end first: a handler answering after it is not waited for.
                err = &mut ending => {
                    log_end(&method, &verified, &err);
                    return Ok(refusal(err));
                }
                res = inner.call(req) => res?,
            };
            Ok(res.map(|b| ExpiringBody::ending(b, ending)))
        })
    }
}

/// What ends a call authorized for `verified`: the token's expiry, its session's revocation,
/// and, for a token without a session that outlives the interval, a re-verification task
/// (owned by the call: it stops when the call's bodies are dropped).
fn life_of(
    shared: &Arc<Shared>,
    verified: &Verified,
    path: &str,
    origin: Origin,
    source: Option<std::net::IpAddr>,
) -> CallLife {
    let identity = verified.identity();
    let deadline = deadline_of(identity.expires_at);
    let session = identity
        .session_id
        .as_deref()
        .and_then(|sid| shared.auth.revocations().map(|r| r.watch(sid)));
    let every = shared.reverify_every;
    let recheck = identity.session_id.is_none()
        && deadline.is_none_or(|d| d > tokio::time::Instant::now() + every);
    let life = CallLife::new(deadline, session, recheck);
    if let Some((signal, failure)) = life.rechecks() {
        let shared = shared.clone();
        let verified = verified.clone();
        let path: Box<str> = path.into();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = signal.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let again = async {
                    let rule = shared.policy.rule_for(&path)?;
                    let parties = &shared.authorized.parties[..];
                    let req = request_for(rule, verified.token(), origin, parties, source)?;
                    let identity = shared.auth.authenticate(req).await?;
                    authorize(rule, shared.policy.own_machine_id(), &identity)
                };
                let result = tokio::select! {
                    _ = signal.cancelled() => return,
                    r = again => r,
                };
                if let Err(e) = result {
                    log_end(&path, &verified, &e);
                    let _ = failure.set(e);
                    signal.cancel();
                    return;
                }
            }
        });
    }
    life
}

fn log_end(path: &str, verified: &Verified, err: &AuthError) {
    tracing::debug!(
        method = path,
        token = token_fingerprint(verified.token()),
        code = ?err.code(),
        reason = err.reason_str(),
        "call ended: its token ended"
    );
}

fn refusal<B: Default>(e: AuthError) -> http::Response<ExpiringBody<B>> {
    Status::from(e)
        .into_http::<B>()
        .map(ExpiringBody::unbounded)
}

/// The instant a token expiring at `exp` (seconds since the epoch) expires, fixed now; `None`
/// when it never does (no `exp`: infinity, or more than ten years away). A NaN is already past.
fn deadline_of(exp: f64) -> Option<tokio::time::Instant> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let left = exp - now;
    if left > 10.0 * 365.0 * 86_400.0 {
        return None;
    }
    let left = if left.is_nan() { 0.0 } else { left.max(0.0) };
    Some(tokio::time::Instant::now() + Duration::from_secs_f64(left))
}

/// Copies the token the incoming call was verified with onto an outgoing request, so the next
/// service sees the same caller. `UNAUTHENTICATED` / `TOKEN_MISSING` when the incoming call
/// carries no verified identity (a public method, or no auth layer).
pub fn forward_token<T, U>(
    incoming: &tonic::Request<T>,
    outgoing: &mut tonic::Request<U>,
) -> Result<(), Status> {
    let verified = incoming.verified().ok_or_else(|| {
        Status::from(AuthError::Rejected(VerifyError::new(
            Reason::TokenMissing,
            "the incoming call carries no verified token to forward",
        )))
    })?;
    let value = crate::credentials::bearer_metadata(verified.token())
        .map_err(|_| Status::internal("the incoming token cannot be forwarded"))?;
    outgoing
        .metadata_mut()
        .insert(http::header::AUTHORIZATION.as_str(), value);
    Ok(())
}

#[cfg(test)]
mod tests;
