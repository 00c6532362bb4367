//! Credentials for outgoing calls: a static token ([`BearerToken`], an interceptor), the
//! incoming caller's token forwarded to the next service
//! ([`forward_token`](crate::layer::forward_token)), or an async
//! [`TokenSource`] behind a tower layer ([`CredentialsLayer`]). The `authorization` value is
//! always marked sensitive (HPACK never indexes it; `Debug` hides it).
//!
//! Layer: outgoing credentials. May import `clerk` (the M2M token source calls Clerk), `error`,
//! `secret`.

pub mod m2m;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::{header::AUTHORIZATION, HeaderValue};
use tonic::{metadata::MetadataValue, service::Interceptor, Request, Status};
use tower::{Layer, Service};

use crate::secret::token_fingerprint;

/// A token that cannot be sent as a header value (not visible ASCII).
#[derive(Debug, thiserror::Error)]
#[error("the token is not a valid header value")]
pub struct InvalidToken;

fn bearer_value(token: &str) -> Result<HeaderValue, InvalidToken> {
    if token.is_empty() || token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(InvalidToken);
    }
    let mut v = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| InvalidToken)?;
    v.set_sensitive(true);
    Ok(v)
}

fn ascii_metadata(v: HeaderValue) -> Result<MetadataValue<tonic::metadata::Ascii>, InvalidToken> {
    let mut m = MetadataValue::try_from(v.as_bytes()).map_err(|_| InvalidToken)?;
    m.set_sensitive(true);
    Ok(m)
}

/// An interceptor adding `authorization: Bearer <token>` to every outgoing call.
#[derive(Clone)]
pub struct BearerToken {
    value: MetadataValue<tonic::metadata::Ascii>,
    fingerprint: String,
}

impl BearerToken {
    /// Wraps a token.
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        let value = ascii_metadata(bearer_value(token)?)?;
        Ok(Self {
            value,
            fingerprint: token_fingerprint(token),
        })
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerToken")
            .field("token", &self.fingerprint)
            .finish()
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(AUTHORIZATION.as_str(), self.value.clone());
        Ok(req)
    }
}

/// The `authorization` metadata value for `token` (`Bearer …`, marked sensitive).
#[cfg_attr(not(feature = "layer"), allow(dead_code))]
pub(crate) fn bearer_metadata(
    token: &str,
) -> Result<MetadataValue<tonic::metadata::Ascii>, InvalidToken> {
    bearer_value(token).and_then(ascii_metadata)
}

/// Produces the token for an outgoing call (e.g. a cached, refreshed machine token).
pub trait TokenSource: Send + Sync + 'static {
    /// The token to send now. An error fails the call with that status, unsent.
    fn token(&self) -> BoxFuture<'_, Result<String, Status>>;

    /// The callee answered `UNAUTHENTICATED` to a call carrying `token`: a source that caches
    /// may replace it (once) for the next call. Default: nothing.
    fn rejected(&self, _token: &str) {}
}

impl<T: TokenSource> TokenSource for Arc<T> {
    fn token(&self) -> BoxFuture<'_, Result<String, Status>> {
        (**self).token()
    }

    fn rejected(&self, token: &str) {
        (**self).rejected(token)
    }
}

/// A tower layer for a client channel: asks a [`TokenSource`] for a token before each call and
/// sends it as `authorization: Bearer …` (sensitive).
///
/// ```no_run
/// # async fn f(src: impl clerk_grpc_auth::credentials::TokenSource) {
/// let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051").connect_lazy();
/// let svc = tower::ServiceBuilder::new()
///     .layer(clerk_grpc_auth::credentials::CredentialsLayer::new(src))
///     .service(channel);
/// let client = clerk_grpc_auth::pb::auth_service_client::AuthServiceClient::new(svc);
/// # }
/// ```
#[derive(Clone)]
pub struct CredentialsLayer {
    source: Arc<dyn TokenSource>,
}

impl CredentialsLayer {
    /// A layer over `source`.
    pub fn new(source: impl TokenSource) -> Self {
        Self {
            source: Arc::new(source),
        }
    }
}

impl std::fmt::Debug for CredentialsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialsLayer")
    }
}

impl<S> Layer<S> for CredentialsLayer {
    type Service = Credentials<S>;

    fn layer(&self, inner: S) -> Credentials<S> {
        Credentials {
            inner,
            source: self.source.clone(),
        }
    }
}

/// The service made by [`CredentialsLayer`].
#[derive(Clone)]
pub struct Credentials<S> {
    inner: S,
    source: Arc<dyn TokenSource>,
}

impl<S> std::fmt::Debug for Credentials<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials")
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B, RB> Service<http::Request<B>> for Credentials<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let source = self.source.clone();
        Box::pin(async move {
            let token = source.token().await.map_err(BoxError::from)?;
            let value = bearer_value(&token).map_err(|_| {
                BoxError::from(Status::internal(
                    "the token source produced an invalid token",
                ))
            })?;
            req.headers_mut().insert(AUTHORIZATION, value);
            let resp = inner.call(req).await.map_err(Into::into)?;
            // A trailers-only UNAUTHENTICATED (how a refused call is answered): let the source
            // replace its token for the next call.
            if resp.headers().get("grpc-status").map(HeaderValue::as_bytes) == Some(b"16") {
                source.rejected(&token);
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values_are_sensitive_and_validated() {
        let v = bearer_value("a.b.c").unwrap();
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().unwrap(), "Bearer a.b.c");
        for bad in ["", "a b", "a\nb", "é"] {
            assert!(bearer_value(bad).is_err(), "{bad:?}");
        }
        let t = BearerToken::new("secret.token.value").unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let mut t = t;
        let req = t.call(Request::new(())).unwrap();
        let got = req.metadata().get("authorization").unwrap();
        assert!(got.is_sensitive());
        assert_eq!(got.to_str().unwrap(), "Bearer secret.token.value");
    }
}
