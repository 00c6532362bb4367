//! Following an AuthService's revocations (`WatchRevocations`) so that a layer refuses a
//! revoked session's tokens at once — verdict caches included.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    jwks::retry_delay,
    pb::{auth_service_client::AuthServiceClient, WatchRevocationsRequest},
    revocation::Revocations,
};

/// A running subscription (see [`watch_revocations`]). Dropping it stops the task.
#[derive(Debug)]
pub struct RevocationFeed {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    connected: watch::Receiver<bool>,
    received: watch::Receiver<u64>,
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

    /// Revocations received so far.
    pub fn received(&self) -> u64 {
        *self.received.borrow()
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
/// [`super::DelegatedVerifier`] checks). Reconnects with back-off (0.2–10 s) and gets the full
/// list again on every reconnection. Runs on the current tokio runtime.
pub fn watch_revocations(channel: Channel, revocations: Revocations) -> RevocationFeed {
    let stop = CancellationToken::new();
    let (connected_tx, connected) = watch::channel(false);
    let (received_tx, received) = watch::channel(0u64);
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut client = AuthServiceClient::new(channel);
        let mut failures = 0u32;
        loop {
            let session = async {
                let mut stream = client
                    .watch_revocations(WatchRevocationsRequest {})
                    .await?
                    .into_inner();
                connected_tx.send_replace(true);
                failures = 0;
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
                        tracing::debug!(code = ?e.code(), "revocation feed interrupted; resubscribing");
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
    }
}
