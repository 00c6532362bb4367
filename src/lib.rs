//! # clerk-grpc-auth
//!
//! Clerk authentication for gRPC services, in Rust:
//!
//! - [`TokenVerifier`]: verifies Clerk session tokens exactly as Clerk's own backend SDK does
//!   (same verdict, same reason, same decoded claims), with keys held in memory, refreshed in
//!   the background, and a verdict cache;
//! - [`server`]: the `clerk.auth.v1.AuthService` gRPC server (health, reflection, graceful
//!   shutdown);
//! - [`emulator`]: an offline Clerk (JWKS, token minting, key rotation) for quickstarts, tests
//!   and CI.
//!
//! Verification errors carry Clerk's reasons ([`error::Reason`]) and map to gRPC status codes
//! in one place ([`error`]).

pub mod authz;
pub mod canonical;
pub mod clerk;
pub mod credentials;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod error;
#[cfg(feature = "layer")]
pub mod layer;
pub mod retry;
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

pub use error::{AuthError, Reason, VerifyError};
pub use secret::token_fingerprint;
pub use token::identity::Identity;
pub use verify::{
    TokenVerifier, TokenVerifierConfig, VerifierStats, VerifyRequest, MAX_TOKEN_BYTES,
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
