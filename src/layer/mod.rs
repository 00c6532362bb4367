//! Protect any tonic server: a tower [`AuthLayer`] (in-process or delegated verification, per-method
//! [`Policy`]) and a synchronous [`AuthInterceptor`] (in-process only).
//!
//! ```no_run
//! # async fn run(verifier: clerk_grpc_auth::TokenVerifier) {
//! use clerk_grpc_auth::{authz::Check, layer::AuthLayer, policy::{Policy, Rule}};
//!
//! let policy = Policy::authenticated().method(
//!     "/examples.orders.v1.Orders/DeleteOrder",
//!     Rule::authenticated().require(Check::permission("org:orders:delete")),
//! );
//! let router = tonic::transport::Server::builder()
//!     .layer(AuthLayer::in_process(verifier, policy));
//! # }
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

mod body;
mod delegated;
mod feed;
mod interceptor;
mod token;

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
pub use feed::{watch_revocations, watch_revocations_with, RevocationFeed};
pub use interceptor::AuthInterceptor;
pub use token::{Origin, TokenSources, SESSION_COOKIE};

use crate::{
    error::{AuthError, Reason, VerifyError},
    identity::Identity,
    policy::{Policy, Rule},
    token_fingerprint, TokenVerifier, VerifyRequest,
};

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
}

impl Authenticate for TokenVerifier {
    fn authenticate<'a>(
        &'a self,
        req: VerifyRequest<'a>,
    ) -> BoxFuture<'a, Result<Arc<Identity>, AuthError>> {
        Box::pin(async move { self.verify(&req).await })
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
    /// [`crate::client::forward_token`]). Keep it out of logs.
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
    end_streams_at_expiry: bool,
}

/// A tower layer that authenticates and authorizes every call of the services it wraps.
///
/// Usable with `tonic::transport::Server::builder().layer(…)` or around one service. Cheap to
/// clone.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("policy", &self.shared.policy)
            .field("sources", &self.shared.sources)
            .field("end_streams_at_expiry", &self.shared.end_streams_at_expiry)
            .finish()
    }
}

impl AuthLayer {
    /// A layer over any [`Authenticate`] implementation.
    pub fn new(auth: impl Authenticate, policy: Policy) -> Self {
        Self::from_arc(Arc::new(auth), policy)
    }

    fn from_arc(auth: Arc<dyn Authenticate>, policy: Policy) -> Self {
        Self {
            shared: Arc::new(Shared {
                auth,
                policy,
                sources: TokenSources::default(),
                end_streams_at_expiry: false,
            }),
        }
    }

    /// In-process: the verifier core and key store in this process; no network per call.
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
                end_streams_at_expiry: old.end_streams_at_expiry,
            });
        }
        f(Arc::get_mut(&mut self.shared).expect("unique after the copy"));
        self
    }

    /// Where tokens are read from (default: `authorization`, then the `__session` cookie).
    pub fn token_sources(self, sources: TokenSources) -> Self {
        self.modify(|s| s.sources = sources)
    }

    /// End a response stream with `UNAUTHENTICATED` / `TOKEN_EXPIRED` when the token that
    /// opened it expires (default: off). Applies to server-streaming and bidirectional
    /// responses; a unary or client-streaming response is produced once, at its end.
    pub fn end_streams_at_expiry(self, yes: bool) -> Self {
        self.modify(|s| s.end_streams_at_expiry = yes)
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
    source: Option<std::net::IpAddr>,
) -> Result<VerifyRequest<'a>, AuthError> {
    Ok(VerifyRequest {
        token,
        authorized_parties: &[],
        accept_pending: rule.accept_pending,
        // From the `__session` cookie: session tokens only.
        accepted_types: origin.accepted(&rule.token_types)?,
        source,
    })
}

use crate::peer::{peer_ip, PeerIdentity};

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
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ExpiringBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
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
                    .call(req)
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
            let verdict = match request_for(rule, token, origin, source) {
                Ok(r) => shared.auth.authenticate(r).await,
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
            let deadline = shared
                .end_streams_at_expiry
                .then(|| until(identity.expires_at));
            let verified = Verified::new(identity, header, token);
            req.extensions_mut().insert(verified);
            let res = inner.call(req).await?;
            Ok(res.map(|b| match deadline {
                Some(d) => ExpiringBody::until(b, d),
                None => ExpiringBody::unbounded(b),
            }))
        })
    }
}

fn refusal<B: Default>(e: AuthError) -> http::Response<ExpiringBody<B>> {
    Status::from(e)
        .into_http::<B>()
        .map(ExpiringBody::unbounded)
}

/// Time left until `exp` (seconds since the epoch); zero when past.
fn until(exp: f64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    Duration::from_secs_f64((exp - now).clamp(0.0, 10.0 * 365.0 * 86_400.0))
}
