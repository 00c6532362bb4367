//! Browsers over gRPC-web: tonic-web's [`GrpcWebLayer`] translates gRPC-web to gRPC, and
//! [`AuthLayer::cors`] builds the CORS policy from the layer's own authorized parties, so the
//! origins a browser may call from and the origins a cookie-borne token may come from are one
//! list.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use clerk_grpc_auth::{authz::policy::Policy, layer::{web::GrpcWebLayer, AuthLayer}, TokenVerifier};
//!
//! let (verifier, _keys) = TokenVerifier::from_env()?;
//! let auth = AuthLayer::in_process(verifier, Policy::authenticated())
//!     .authorized_parties(["https://app.example.com"]);
//! let router = tonic::transport::Server::builder()
//!     .accept_http1(true)              // browsers speak HTTP/1.1 to a plaintext server
//!     .layer(auth.cors())              // preflights answered here, before anything else
//!     .layer(GrpcWebLayer::new())
//!     .layer(auth);
//! # Ok(()) }
//! ```
//!
//! The order matters: CORS outermost (a preflight `OPTIONS` never reaches the auth layer, and
//! every answer — refusals included — carries the CORS headers the browser needs to read its
//! `grpc-status`), then gRPC-web, then the auth layer (which sees plain gRPC with the
//! browser's `Origin` and `Cookie` headers).

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
pub use tonic_web::GrpcWebLayer;
use tower_http::cors::AllowOrigin;
pub use tower_http::cors::CorsLayer;

use super::AuthLayer;

/// How long a browser may cache a preflight answer (10 minutes).
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The request headers a gRPC-web page may send: the gRPC-web ones, `grpc-timeout`, and
/// `authorization` (a page sending `getToken()`'s token instead of relying on the cookie).
pub const ALLOWED_HEADERS: [&str; 5] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "authorization",
];

/// The response headers a page may read: the status, its message and its details.
pub const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

impl AuthLayer {
    /// The CORS policy for browsers calling the services behind this layer over gRPC-web:
    ///
    /// * origins: exactly [`AuthLayer::authorized_origins`] (the authorized parties that are
    ///   origins, canonical); none configured → no cross-origin caller (same-origin pages need
    ///   no CORS);
    /// * credentials allowed (the `__session` and `__client_uat` cookies);
    /// * methods: `POST` (gRPC-web's only one);
    /// * request headers: [`ALLOWED_HEADERS`]; exposed headers: [`EXPOSED_HEADERS`];
    /// * preflights cached for [`PREFLIGHT_MAX_AGE`]; `Vary` set by tower-http.
    ///
    /// Attach it outside [`GrpcWebLayer`] and this layer (see [the module docs](self)).
    pub fn cors(&self) -> CorsLayer {
        let origins: Vec<HeaderValue> = self
            .authorized_origins()
            .iter()
            // Canonical origins are visible ASCII: always valid header values.
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_credentials(true)
            .allow_methods([Method::POST])
            .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
            .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(PREFLIGHT_MAX_AGE)
    }
}

/// `content-type` of gRPC-web requests in binary form (what [`GrpcWebLayer`] accepts besides
/// the `-text` base64 form).
pub const GRPC_WEB_CONTENT_TYPE: &str = "application/grpc-web+proto";
