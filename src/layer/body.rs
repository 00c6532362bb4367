//! What ends a call when the token that opened it ends: its expiry (an absolute deadline fixed
//! at verification), its session's revocation, or a failed re-verification. The request body,
//! the wait for the handler's response and the response body all check it — before every frame.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use crate::{
    error::{AuthError, Reason, VerifyError},
    verify::revocations::SessionWatch,
};

/// What ends one call: shared (behind an `Arc`) by its request body, response future and
/// response body. Dropping the last holder stops its re-verification task.
pub(crate) struct CallLife {
    /// When the token expires (`None`: it never does).
    deadline: Option<Instant>,
    /// Cancelled when the session is revoked or a re-verification fails.
    signal: Option<CancellationToken>,
    /// Why a re-verification failed (set before `signal` is cancelled).
    failure: Arc<OnceLock<AuthError>>,
    /// Keeps the session followed.
    session: Option<SessionWatch>,
}

impl CallLife {
    /// Ends at `deadline`, when `session` is revoked, and when a re-verification fails (see
    /// [`CallLife::rechecks`]).
    pub(crate) fn new(
        deadline: Option<Instant>,
        session: Option<SessionWatch>,
        rechecked: bool,
    ) -> Self {
        let signal = match &session {
            Some(s) => Some(s.child_token()),
            None => rechecked.then(CancellationToken::new),
        };
        Self {
            deadline,
            signal,
            failure: Arc::default(),
            session,
        }
    }

    /// What a re-verification task needs to end the call: the signal to cancel and where to
    /// leave the reason. `None` when the call was not made to be re-verified.
    pub(crate) fn rechecks(&self) -> Option<(CancellationToken, Arc<OnceLock<AuthError>>)> {
        if self.session.is_some() {
            return None;
        }
        self.signal.clone().map(|s| (s, self.failure.clone()))
    }

    /// A future completing with the reason the call ends.
    pub(crate) fn ending(self: &Arc<Self>) -> Ending {
        Ending {
            timer: self.deadline.map(tokio::time::sleep_until),
            signal: self.signal.clone().map(CancellationToken::cancelled_owned),
            life: self.clone(),
        }
    }

    fn reason(&self) -> AuthError {
        match self.failure.get() {
            Some(e) => e.clone(),
            None => AuthError::Rejected(VerifyError::new(
                Reason::SessionRevoked,
                "The session was revoked.",
            )),
        }
    }
}

impl Drop for CallLife {
    fn drop(&mut self) {
        // Stops the re-verification task (a child of the session's token: no one else).
        if let Some(s) = &self.signal {
            s.cancel();
        }
    }
}

fn expired() -> AuthError {
    AuthError::Rejected(VerifyError::new(Reason::TokenExpired, "token expired"))
}

pin_project! {
    /// Completes, with the reason, when the call must end.
    pub(crate) struct Ending {
        #[pin]
        timer: Option<Sleep>,
        #[pin]
        signal: Option<WaitForCancellationFutureOwned>,
        life: Arc<CallLife>,
    }
}

impl Future for Ending {
    type Output = AuthError;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AuthError> {
        let this = self.project();
        if let Some(signal) = this.signal.as_pin_mut() {
            if signal.poll(cx).is_ready() {
                return Poll::Ready(this.life.reason());
            }
        }
        if let Some(timer) = this.timer.as_pin_mut() {
            if timer.poll(cx).is_ready() {
                return Poll::Ready(expired());
            }
        }
        Poll::Pending
    }
}

pin_project! {
    /// The layer's response body: the handler's body, cut short (with
    /// [`AuthLayer::end_streams_at_expiry`](super::AuthLayer::end_streams_at_expiry)) when the
    /// token that authorized the call ends — checked before every frame, and by a timer while
    /// the stream is idle. The stream then ends with trailers `grpc-status: 16`
    /// (`UNAUTHENTICATED`) and `google.rpc.ErrorInfo` reason `TOKEN_EXPIRED` (message
    /// "token expired"), `SESSION_REVOKED`, or the re-verification's refusal (e.g.
    /// `TOKEN_REVOKED`).
    pub struct ExpiringBody<B> {
        #[pin]
        inner: B,
        ending: Option<Pin<Box<Ending>>>,
        ended: bool,
    }
}

impl<B> ExpiringBody<B> {
    /// No deadline: the handler's body unchanged.
    pub fn unbounded(inner: B) -> Self {
        Self {
            inner,
            ending: None,
            ended: false,
        }
    }

    /// Ends the stream (`TOKEN_EXPIRED`) `after` from now.
    pub fn until(inner: B, after: Duration) -> Self {
        let life = Arc::new(CallLife::new(Some(Instant::now() + after), None, false));
        Self::ending(inner, Box::pin(life.ending()))
    }

    pub(crate) fn ending(inner: B, ending: Pin<Box<Ending>>) -> Self {
        Self {
            inner,
            ending: Some(ending),
            ended: false,
        }
    }
}

impl<B: Default> Default for ExpiringBody<B> {
    fn default() -> Self {
        Self::unbounded(B::default())
    }
}

impl<B> std::fmt::Debug for ExpiringBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpiringBody")
            .field("bounded", &self.ending.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

/// The trailers ending a stream with `err`'s status.
fn trailers(err: AuthError) -> HeaderMap {
    let mut t = HeaderMap::new();
    if Status::from(err).add_header(&mut t).is_err() {
        // Never expected (our messages are ASCII); still a status, without details.
        t.insert("grpc-status", http::HeaderValue::from_static("16"));
    }
    t
}

impl<B> Body for ExpiringBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        // The end first: a handler whose next frame is always ready is still cut off.
        if let Some(ending) = this.ending.as_mut() {
            if let Poll::Ready(err) = ending.as_mut().poll(cx) {
                *this.ended = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers(err)))));
            }
        }
        let frame = this.inner.poll_frame(cx);
        // The handler's own end (its trailers, or none) is the last frame.
        match &frame {
            Poll::Ready(None) => *this.ended = true,
            Poll::Ready(Some(Ok(f))) if f.is_trailers() => *this.ended = true,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

pin_project! {
    /// The request body handed to the service: the client's body, ending with an error
    /// carrying the same status as [`ExpiringBody`] when the token ends, so that a client
    /// stream does not keep feeding the handler past it.
    pub(crate) struct RequestBody<B> {
        #[pin]
        inner: B,
        ending: Pin<Box<Ending>>,
        ended: bool,
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn new(inner: B, ending: Pin<Box<Ending>>) -> Self {
        Self {
            inner,
            ending,
            ended: false,
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(err) = this.ending.as_mut().poll(cx) {
            *this.ended = true;
            return Poll::Ready(Some(Err(Box::new(Status::from(err)))));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(None) => {
                *this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => Poll::Ready(Some(r.map_err(Into::into))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}
