//! Following an AuthService's revocations (`WatchRevocations`) so that a layer refuses a
//! revoked session's tokens at once — verdict caches included.
//!
//! AuthService streams revocations to known callers only: an M2M token of a machine on its
//! `CLERK_AUTH_IDENTITY_ALLOWLIST` ([`watch_revocations_with`] and a [`TokenSource`] such as
//! [`M2mTokenSource`](crate::credentials::m2m::M2mTokenSource)), or an mTLS client certificate whose
//! SPIFFE ID is on it (a TLS `channel` and [`watch_revocations`]).

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{transport::Channel, Code};

use crate::{
    credentials::TokenSource,
    pb::{auth_service_client::AuthServiceClient, WatchRevocationsRequest},
    retry::retry_delay,
    verify::revocations::Revocations,
};

/// A running subscription (see [`watch_revocations`]). Dropping it stops the task.
#[derive(Debug)]
pub struct RevocationFeed {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    connected: watch::Receiver<bool>,
    received: watch::Receiver<u64>,
    errors: watch::Receiver<(u64, Option<Code>)>,
}

impl RevocationFeed {
    /// Waits until the subscription is established.
    pub async fn connected(&self) {
        let mut rx = self.connected.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Waits until at least `n` revocations have been received.
    pub async fn wait_received(&self, n: u64) {
        let mut rx = self.received.clone();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Revocations received so far (a resubscription receives the snapshot again).
    pub fn received(&self) -> u64 {
        *self.received.borrow()
    }

    /// Subscriptions refused or interrupted so far, and the last one's code (`PERMISSION_DENIED`:
    /// this layer is not an allowed caller; `UNAUTHENTICATED`: no or an expired token;
    /// `UNAVAILABLE`: AuthService down, or this subscriber fell behind).
    pub fn errors(&self) -> (u64, Option<Code>) {
        *self.errors.borrow()
    }

    /// Waits until at least `n` subscriptions were refused or interrupted; returns the last
    /// one's code.
    pub async fn wait_errors(&self, n: u64) -> Option<Code> {
        let mut rx = self.errors.clone();
        let seen = rx.wait_for(|(c, _)| *c >= n).await.map(|v| v.1);
        seen.unwrap_or(None)
    }

    /// Stops the subscription and waits for the task.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for RevocationFeed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Subscribes to `WatchRevocations` on `channel` and marks every revoked session in
/// `revocations` (the set a [`crate::TokenVerifier`] or a
/// [`super::DelegatedVerifier`] checks), presenting no token: for a TLS `channel` whose client
/// certificate's SPIFFE ID AuthService allowlists. Otherwise use [`watch_revocations_with`].
/// Reconnects with back-off (0.2–10 s) and gets the full list again on every reconnection
/// (after being dropped for falling behind, too). Runs on the current tokio runtime.
pub fn watch_revocations(channel: Channel, revocations: Revocations) -> RevocationFeed {
    follow(channel, revocations, None)
}

/// As [`watch_revocations`], sending `authorization: Bearer <token>` from `credentials` on
/// every subscription (asked afresh each time, so a stream ended because its token expired
/// resubscribes with the next one). The token must be an M2M token of a machine on
/// AuthService's `CLERK_AUTH_IDENTITY_ALLOWLIST`.
pub fn watch_revocations_with(
    channel: Channel,
    revocations: Revocations,
    credentials: impl TokenSource,
) -> RevocationFeed {
    follow(channel, revocations, Some(Arc::new(credentials)))
}

/// The subscription loop, with optional credentials.
pub(super) fn follow(
    channel: Channel,
    revocations: Revocations,
    credentials: Option<Arc<dyn TokenSource>>,
) -> RevocationFeed {
    let stop = CancellationToken::new();
    let (connected_tx, connected) = watch::channel(false);
    let (received_tx, received) = watch::channel(0u64);
    let (errors_tx, errors) = watch::channel((0u64, None));
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut client = AuthServiceClient::new(channel);
        let mut failures = 0u32;
        // Refusals are logged once per run of them, not at every retry.
        let mut warned = false;
        loop {
            let session = async {
                let mut request = tonic::Request::new(WatchRevocationsRequest {});
                if let Some(c) = &credentials {
                    let token = c.token().await?;
                    let mut value: tonic::metadata::MetadataValue<_> =
                        format!("Bearer {token}").parse().map_err(|_| {
                            tonic::Status::internal("the token source produced an invalid token")
                        })?;
                    value.set_sensitive(true);
                    request.metadata_mut().insert("authorization", value);
                }
                let mut stream = client.watch_revocations(request).await?.into_inner();
                connected_tx.send_replace(true);
                failures = 0;
                warned = false;
                while let Some(r) = stream.message().await? {
                    revocations.mark(&r.session_id);
                    received_tx.send_modify(|n| *n += 1);
                }
                Ok::<(), tonic::Status>(())
            };
            tokio::select! {
                _ = stopped.cancelled() => return,
                result = session => {
                    connected_tx.send_replace(false);
                    if let Err(e) = result {
                        errors_tx.send_modify(|(n, last)| {
                            *n += 1;
                            *last = Some(e.code());
                        });
                        match e.code() {
                            Code::PermissionDenied | Code::Unauthenticated if !warned => {
                                warned = true;
                                tracing::warn!(
                                    code = ?e.code(),
                                    "AuthService refused the revocation feed: give the layer an \
                                     M2M token (or mTLS certificate) on AuthService's \
                                     CLERK_AUTH_IDENTITY_ALLOWLIST; retrying"
                                );
                            }
                            _ => tracing::debug!(
                                code = ?e.code(),
                                "revocation feed interrupted; resubscribing"
                            ),
                        }
                    }
                }
            }
            failures = failures.saturating_add(1);
            let wait = retry_delay(
                failures,
                Duration::from_millis(200),
                Duration::from_secs(10),
            );
            tokio::select! {
                _ = stopped.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
    RevocationFeed {
        stop,
        task: Some(task),
        connected,
        received,
        errors,
    }
}
