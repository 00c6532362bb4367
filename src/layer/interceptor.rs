//! A synchronous `tonic::service::Interceptor` for in-process verification.

use std::sync::Arc;

use tonic::{service::Interceptor, Request, Status};

use super::{
    authorize,
    extract::{AuthorizedOrigins, CookieContext},
    request_for, Origin, TokenSources, Verified,
};
use crate::{authz::policy::Rule, error::AuthError, TokenVerifier};

/// Authenticates every call of one service in-process, synchronously:
/// `OrdersServer::with_interceptor(svc, AuthInterceptor::new(verifier, rule))`.
///
/// An interceptor does not see the method path, so it applies **one** [`Rule`] to the whole
/// service (use [`super::AuthLayer`] for per-method policy): no rule is looked up by path, so
/// a malformed `:path` cannot select a looser one (and tonic's generated server answers
/// `UNIMPLEMENTED` for any path that is not exactly one of its methods). It never waits for I/O:
///
/// * known key → verified at once (or answered from the verdict cache);
/// * unknown `kid` → the key store's rate-limited, single-flight refetch is started in the
///   background and the call fails closed with `UNAVAILABLE` / `JWK_KID_MISMATCH` (message
///   "retry shortly"). A retry after the refetch verifies (the key arrived) or gets
///   `UNAUTHENTICATED` / `JWK_KID_MISMATCH` (the kid is unknown to Clerk and negative-cached);
/// * no usable key material → `UNAVAILABLE`.
///
/// An interceptor sees only the request's metadata, never the bodies: it cannot end a stream
/// when its token expires or is revoked ([`super::AuthLayer::end_streams_at_expiry`] does).
#[derive(Clone)]
pub struct AuthInterceptor {
    verifier: TokenVerifier,
    rule: Arc<Rule>,
    sources: Arc<TokenSources>,
    authorized: Arc<AuthorizedOrigins>,
    machine_id: Option<Arc<str>>,
}

impl std::fmt::Debug for AuthInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthInterceptor")
            .field("rule", &self.rule)
            .field("sources", &self.sources)
            .finish()
    }
}

impl AuthInterceptor {
    /// An interceptor applying `rule` to every call.
    pub fn new(verifier: TokenVerifier, rule: Rule) -> Self {
        let authorized = AuthorizedOrigins::new(verifier.validation().authorized_parties.clone());
        Self {
            verifier,
            rule: Arc::new(rule),
            sources: Arc::new(TokenSources::default()),
            authorized: Arc::new(authorized),
            machine_id: None,
        }
    }

    /// This service's machine id: M2M tokens must list it in their scopes.
    pub fn machine_id(mut self, id: &str) -> Self {
        self.machine_id = Some(id.into());
        self
    }

    /// The authorized parties, replacing the verifier's: as [`super::AuthLayer::authorized_parties`]
    /// (the `azp` allowlist, and the `Origin` a cookie-borne token must come from).
    pub fn authorized_parties<I, P>(mut self, parties: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let parties = parties.into_iter().map(Into::into).collect();
        self.authorized = Arc::new(AuthorizedOrigins::new(parties));
        self
    }

    /// Where tokens are read from.
    pub fn token_sources(mut self, sources: TokenSources) -> Self {
        self.sources = Arc::new(sources);
        self
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if self.rule.is_public() {
            return Ok(req);
        }
        // mTLS: a rule naming peers refuses any other caller before looking at tokens.
        if !self.rule.peers.is_empty()
            && !crate::authz::peer::PeerIdentity::from_request(&req).any_in(&self.rule.peers)
        {
            return Err(AuthError::Denied(crate::error::Denial {
                unmet: crate::authz::Unmet::PeerNotAllowed,
                required: Vec::new(),
            })
            .into());
        }
        let verified = {
            let (token, header, origin) =
                self.sources.extract_with_header(req.metadata().as_ref())?;
            let source = req.remote_addr().map(|a| a.ip());
            let parties = &self.authorized.parties[..];
            let request = request_for(&self.rule, token, origin, parties, source)?;
            let cookie = match origin {
                Origin::Cookie => Some(CookieContext::read(
                    req.metadata().as_ref(),
                    &self.authorized,
                )?),
                Origin::Header => None,
            };
            let identity = self.verifier.verify_now(&request)?;
            if let Some(c) = &cookie {
                c.check(&identity, &self.authorized)?;
            }
            authorize(&self.rule, self.machine_id.as_deref(), &identity)?;
            Verified::new(identity, header, token)
        };
        req.extensions_mut().insert(verified);
        Ok(req)
    }
}
