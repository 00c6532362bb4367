//! The `clerk.auth.v1.AuthService` gRPC implementation: translates protobuf ↔ domain and calls
//! the [`TokenVerifier`]. Errors become [`Status`] through [`crate::error`]'s one mapping.

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    error::AuthError,
    identity::TokenType,
    pb::{self, auth_service_server::AuthService},
    token_fingerprint, TokenVerifier, VerifyRequest,
};

/// The AuthService. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuthServiceImpl {
    verifier: TokenVerifier,
}

impl AuthServiceImpl {
    /// A service verifying with `verifier`.
    pub fn new(verifier: TokenVerifier) -> Self {
        Self { verifier }
    }

    /// The generated tonic server for this service.
    pub fn into_server(self) -> pb::auth_service_server::AuthServiceServer<Self> {
        pb::auth_service_server::AuthServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl AuthService for AuthServiceImpl {
    async fn verify_token(
        &self,
        request: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        let source = req.client_ip.parse().ok().or(peer);
        let span = tracing::info_span!(
            "rpc",
            method = "VerifyToken",
            token = %token_fingerprint(&req.token),
            outcome = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        async move {
            let result = self.verify(&req, source).await;
            let span = tracing::Span::current();
            match &result {
                Ok(id) => {
                    span.record("outcome", "ok");
                    tracing::debug!(user = %id.user_id, "token verified");
                }
                Err(e) => {
                    span.record("outcome", "rejected");
                    span.record("reason", e.reason_str());
                    if matches!(e, AuthError::Unavailable(_)) {
                        tracing::warn!(code = ?e.code(), "token not verified: keys unavailable");
                    } else {
                        tracing::info!(code = ?e.code(), "token rejected");
                    }
                }
            }
            result
                .map(|identity| {
                    Response::new(pb::VerifyTokenResponse {
                        identity: Some(identity),
                    })
                })
                .map_err(Status::from)
        }
        .instrument(span)
        .await
    }
}

/// Most authorized parties one request may name.
pub const MAX_AUTHORIZED_PARTIES: usize = 64;
/// Longest authorized party accepted, in bytes.
pub const MAX_AUTHORIZED_PARTY_BYTES: usize = 2048;

impl AuthServiceImpl {
    async fn verify(
        &self,
        req: &pb::VerifyTokenRequest,
        source: Option<std::net::IpAddr>,
    ) -> Result<pb::Identity, AuthError> {
        if req.authorized_parties.len() > MAX_AUTHORIZED_PARTIES {
            return Err(AuthError::InvalidRequest(
                "authorized_parties holds more than 64 entries",
            ));
        }
        if req
            .authorized_parties
            .iter()
            .any(|p| p.is_empty() || p.len() > MAX_AUTHORIZED_PARTY_BYTES)
        {
            return Err(AuthError::InvalidRequest(
                "authorized_parties holds an empty entry or one over 2 KiB",
            ));
        }
        if req.accepted_token_types.len() > 8 {
            return Err(AuthError::InvalidRequest(
                "accepted_token_types holds more than 8 entries",
            ));
        }
        let types = req
            .accepted_token_types
            .iter()
            .map(|t| match TokenType::try_from(*t) {
                Ok(TokenType::Unspecified) | Err(_) => Err(AuthError::InvalidRequest(
                    "accepted_token_types holds an unknown token type",
                )),
                Ok(t) => Ok(t),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let identity = self
            .verifier
            .verify(&VerifyRequest {
                token: &req.token,
                authorized_parties: &req.authorized_parties,
                accept_pending: req.accept_pending_session,
                accepted_types: &types,
                source,
            })
            .await?;
        Ok(identity.to_proto())
    }
}
