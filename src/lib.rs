//! # clerk-grpc-auth
//!
//! Clerk authentication for gRPC services: verify Clerk session and machine tokens exactly as
//! Clerk's own backend SDK does, protect any tonic server with a tower layer, run the
//! `clerk.auth.v1.AuthService` (with Envoy's ext_authz `Check`) for a whole mesh, and test all of
//! it offline against an emulated Clerk.
//!
//! ## What to use for which job
//!
//! | you want to… | use | feature |
//! | --- | --- | --- |
//! | verify a token in your process | [`TokenVerifier::start`] / [`TokenVerifier::from_env`] → [`TokenVerifier::verify`] | (none) |
//! | protect a tonic server | [`AuthLayer::in_process`] (or [`AuthLayer::delegated`] to an AuthService) with a [`Policy`] of [`Rule`]s; in handlers [`RequestIdentity::identity`] | `layer` |
//! | check roles, permissions, features, plans | [`Identity::has`] with a [`Check`] (Clerk's `has()`) | (none) |
//! | call another service with credentials | [`BearerToken`], [`CredentialsLayer`] over an [`M2mTokenSource`], [`layer::forward_token`] | (none) / `layer` |
//! | read users, memberships, sessions | [`clerk::directory::Directory`] (the AuthService answers them over gRPC) | (none) |
//! | run the AuthService yourself | [`server::AuthServer`], configured by [`server::config::ServeConfig`] | `server` |
//! | test without Clerk | [`emulator::Emulator`] (JWKS, token minting, a Backend API subset, faults) | `emulator` |
//! | SPIFFE peers from client certificates | [`authz::peer::PeerIdentity`], `Rule::peers` | `mtls` |
//!
//! Errors are typed ([`AuthError`], with Clerk's [`Reason`]s) and become gRPC status codes in one
//! place ([`error`]): `UNAUTHENTICATED` for bad credentials, `PERMISSION_DENIED` for policy,
//! `UNAVAILABLE` when Clerk or keys are unavailable, `INVALID_ARGUMENT` for malformed requests,
//! each with a `google.rpc.ErrorInfo` reason.
//!
//! ## Features
//!
//! | feature | adds | pulls in |
//! | --- | --- | --- |
//! | (none) | the verifier: [`token`], [`verify`], [`clerk`], [`authz`], [`credentials`] | tonic (no router), prost, tokio, tower, reqwest (rustls), moka, tracing |
//! | `layer` | [`layer`]: [`AuthLayer`], [`AuthInterceptor`](layer::AuthInterceptor), delegation, revocation feeds | — |
//! | `web` | [`layer::web`]: browsers over gRPC-web — the CORS policy built from the layer's authorized parties, tonic-web's `GrpcWebLayer` (implies `layer`) | tonic-web, tower-http (`cors`) |
//! | `mtls` | SPIFFE IDs read from verified client certificates | x509-parser |
//! | `emulator` | [`emulator`]: the offline Clerk, e.g. in your `[dev-dependencies]` | axum |
//! | `server` | [`server`]: AuthService, ext_authz, webhooks, Redis sharing, metrics (implies `layer`, `mtls`) | axum, redis, envoy-types, prometheus-client, tonic-health, tonic-reflection, tracing-subscriber |
//! | `cli` | the `clerk-grpc-auth` binary (implies `server`, `emulator`, `mimalloc`) | clap, rcgen, tempfile |
//! | `mimalloc` | mimalloc as the global allocator of the binary and of `examples/loadgen`; the library never sets one | mimalloc |
//! | `demo` | the Orders/Echo protos of this package's examples and tests only | — |
//!
//! `default` is `cli` + `demo` + `web`. A service that only wants the layer depends on
//! `clerk-grpc-auth = { version = "…", default-features = false, features = ["layer"] }`
//! (and `features = ["emulator"]` in its `[dev-dependencies]` for offline tests).
//!
//! ## Quick start
//!
//! ```
//! # #[cfg(feature = "emulator")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use clerk_grpc_auth::{
//!     emulator::{Emulator, OrgSpec, TokenSpec},
//!     verify::jwks::KeySource,
//!     Check, TokenVerifier, VerifierSettings, VerifyRequest,
//! };
//!
//! // An offline Clerk; in production the settings come from `CLERK_*` (TokenVerifier::from_env).
//! let clerk = Emulator::start_local().await?;
//! let jwks = KeySource::Remote {
//!     url: format!("{}/.well-known/jwks.json", clerk.url()).parse()?,
//!     bearer: None,
//! };
//! // Starts loading keys in the background; keep `_keys` (dropping it stops the refresher).
//! let (verifier, _keys) = TokenVerifier::start(VerifierSettings::new(jwks))?;
//! verifier.keys().ready().await;
//!
//! let token = clerk.mint(&TokenSpec {
//!     org: Some(OrgSpec { role: Some("admin".into()), ..Default::default() }),
//!     ..Default::default()
//! });
//! let who = verifier.verify(&VerifyRequest { token: &token, ..Default::default() }).await?;
//! assert!(who.has(&Check::role("org:admin")));
//! # clerk.shutdown().await;
//! # Ok(()) }
//! # #[cfg(not(feature = "emulator"))]
//! # fn main() {}
//! ```
//!
//! To protect a tonic server, hand the verifier to [`AuthLayer::in_process`] (its docs show
//! the whole service); `examples/` holds runnable versions of every job above.
//!
//! ## Layout: where a change belongs
//!
//! Bottom first; each module imports only the ones above it in this table (`tests/layout.rs`
//! reads the sources and fails on any import that points down it, so there is no cycle).
//!
//! | module | owns |
//! | --- | --- |
//! | [`secret`] | [`Secret`] (never printed) and [`token_fingerprint`] (what logs show instead of a token) |
//! | `retry` | backoff and a strict `Retry-After` reader (crate-private) |
//! | [`pb`] | the generated `clerk.auth.v1` messages, client and server |
//! | [`error`] | typed errors, Clerk's reasons, the one error → gRPC status mapping |
//! | [`canonical`] | hostile request bytes (paths, hosts, methods) made canonical once, or refused |
//! | [`token`] | a token's bytes → a verdict, no I/O: claims, JWK keys, the check in Clerk's order, [`Identity`] |
//! | [`authz`] | Clerk's `has()` ([`Check`]), per-method [`Policy`] / [`Rule`], mTLS peers |
//! | [`clerk`] | talking to Clerk: the one Backend API client, its budget, the identity directory, opaque machine tokens, Svix |
//! | [`verify`] | [`TokenVerifier`]: the core + the JWKS key store + the verdict cache + the revoked-session set |
//! | [`credentials`] | outgoing calls: [`BearerToken`], [`CredentialsLayer`], the [`M2mTokenSource`] |
//! | [`layer`] | [`AuthLayer`], the interceptor, token extraction, stream lifetimes, delegation (feature `layer`) |
//! | [`emulator`] | the offline Clerk (feature `emulator`) |
//! | [`server`] | the AuthService: service, ext_authz and HTTP forward auth, webhooks, events and Redis, metrics, access, config (feature `server`) |
//!
//! The binary (`src/main.rs`, `src/cmd/`) only parses flags and calls [`server`].

#![warn(unreachable_pub)]

pub mod authz;
pub mod canonical;
pub mod clerk;
pub mod credentials;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod error;
#[cfg(feature = "layer")]
pub mod layer;
pub(crate) mod retry;
pub mod secret;
#[cfg(feature = "server")]
pub mod server;
pub mod token;
pub mod verify;

/// Generated protobuf types, client and server for `clerk.auth.v1`.
pub mod pb {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("clerk.auth.v1");

    /// The encoded `FileDescriptorSet` of `clerk.auth.v1` and its imports (for reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/clerk_auth_descriptor.bin"));

    /// The token as its fingerprint ([`crate::secret::token_fingerprint`]), never the token.
    impl std::fmt::Debug for VerifyTokenRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("VerifyTokenRequest")
                .field("token", &crate::secret::token_fingerprint(&self.token))
                .field("authorized_parties", &self.authorized_parties)
                .field("accept_pending_session", &self.accept_pending_session)
                .field("accepted_token_types", &self.accepted_token_types)
                .field("client_ip", &self.client_ip)
                .field("check_session_online", &self.check_session_online)
                .field("claims_struct", &self.claims_struct)
                .finish_non_exhaustive()
        }
    }
}

pub use authz::{
    policy::{Policy, Rule},
    Check,
};
pub use credentials::{
    m2m::{M2mTokenSource, M2mTokenSourceConfig},
    BearerToken, CredentialsLayer, TokenSource,
};
pub use error::{AuthError, Reason, VerifyError};
#[cfg(feature = "layer")]
pub use layer::{AuthLayer, RequestIdentity};
pub use secret::{token_fingerprint, Secret};
pub use token::identity::Identity;
pub use verify::{
    TokenVerifier, TokenVerifierConfig, VerifierSettings, VerifierStats, VerifyRequest,
    MAX_TOKEN_BYTES,
};

/// Crate internals for the fuzz targets (`fuzz/`). Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// The one-pass JSON scanner and the JS-faithful reference decoder (Clerk's `TextDecoder`
    /// then `JSON.parse`) read `segment`, a decoded JWT header or payload, into the same
    /// header and claims, or both refuse it. `Err` describes the difference.
    pub fn claims_agree(segment: &[u8]) -> Result<(), String> {
        crate::token::claims::scanner_agrees_with_reference(segment)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn descriptor_set_decodes_and_names_the_service() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let auth = fds
            .file
            .iter()
            .find(|f| f.package() == "clerk.auth.v1")
            .unwrap();
        assert_eq!(auth.service[0].name(), "AuthService");
        assert!(fds
            .file
            .iter()
            .any(|f| f.name() == "google/protobuf/struct.proto"));
    }

    /// Issue 12, item 7: no type that holds a token prints it.
    #[test]
    fn debug_output_holds_fingerprints_never_tokens() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyXzEifQ.c2lnbmF0dXJlLWJ5dGVz";
        let parties = vec!["https://app.example".to_owned()];
        let shown = [
            format!(
                "{:?}",
                crate::pb::VerifyTokenRequest {
                    token: token.into(),
                    authorized_parties: parties.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                crate::VerifyRequest {
                    token,
                    authorized_parties: &parties,
                    ..Default::default()
                }
            ),
            format!("{:?}", crate::credentials::BearerToken::new(token).unwrap()),
        ];
        for s in &shown {
            for part in token.split('.') {
                assert!(!s.contains(part), "{s}");
            }
            assert!(s.contains(&super::token_fingerprint(token)), "{s}");
        }
        assert!(shown[0].contains("https://app.example"), "{}", shown[0]);
    }
}
