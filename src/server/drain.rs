//! What a stop waits for: the calls in flight, not the connections.
//!
//! [`Drain`] wraps the gRPC server (a tower layer) and counts the calls in flight: a call
//! counts from its arrival until its response body ends or is dropped. When the drain begins
//! ([`Drain::start`]):
//!
//! - a response body still streaming (`grpc.health.v1.Health/Watch`, reflection) ends with
//!   `UNAVAILABLE` — what clients of a draining server expect: reconnect, elsewhere or later.
//!   `WatchRevocations` ends itself, with its reason (its hub drains at the same moment), and
//!   is left alone here;
//! - [`Drain::idle`] resolves once no call is in flight. The server stops then, without
//!   waiting for idle connections: an HTTP/2 connection whose client never sent its preface
//!   (a port probe, a client that stalled) would otherwise hold the stop for the whole grace
//!   period. Connections that are still open get their `GOAWAY` from the transport as usual.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Paths whose streams end themselves when the server drains (with a reason of their own).
const SELF_DRAINING: [&str; 1] = ["/clerk.auth.v1.AuthService/WatchRevocations"];

/// The `grpc-message` of a stream ended by the drain.
const DRAIN_MESSAGE: &str = "server shutting down; reconnect";

/// The drain of one server: calls in flight and the moment the drain began.
#[derive(Clone, Default)]
pub(crate) struct Drain {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    in_flight: watch::Sender<usize>,
    draining: CancellationToken,
    started: OnceLock<Instant>,
}

impl Drain {
    /// The tower layer that counts calls and ends streams once the drain begins.
    pub(crate) fn layer(&self) -> DrainLayer {
        DrainLayer {
            inner: self.inner.clone(),
        }
    }

    /// Begins the drain: streaming responses end (`UNAVAILABLE`).
    pub(crate) fn start(&self) {
        let _ = self.inner.started.set(Instant::now());
        self.inner.draining.cancel();
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> usize {
        *self.inner.in_flight.borrow()
    }

    /// Resolves when no call is in flight (at once if none is).
    pub(crate) async fn idle(&self) {
        let mut rx = self.inner.in_flight.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// How long since the drain began (`None`: it has not).
    pub(crate) fn elapsed(&self) -> Option<Duration> {
        self.inner.started.get().map(Instant::elapsed)
    }
}

/// Counts a call while it is held.
struct InFlight(Arc<Inner>);

impl InFlight {
    fn new(inner: Arc<Inner>) -> Self {
        inner.in_flight.send_modify(|n| *n += 1);
        Self(inner)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// See [`Drain::layer`].
#[derive(Clone)]
pub(crate) struct DrainLayer {
    inner: Arc<Inner>,
}

impl<S> tower::Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, service: S) -> Self::Service {
        DrainService {
            service,
            inner: self.inner.clone(),
        }
    }
}

/// See [`Drain::layer`].
#[derive(Clone)]
pub(crate) struct DrainService<S> {
    service: S,
    inner: Arc<Inner>,
}

impl<S, B, R> tower::Service<http::Request<B>> for DrainService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<DrainBody<R>>;
    type Error = S::Error;
    type Future = DrainFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let held = InFlight::new(self.inner.clone());
        let cut = (!SELF_DRAINING.contains(&req.uri().path()))
            .then(|| Box::pin(self.inner.draining.clone().cancelled_owned()));
        DrainFuture {
            future: self.service.call(req),
            held: Some(held),
            cut,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Drain::layer`].
    pub(crate) struct DrainFuture<F> {
        #[pin]
        future: F,
        held: Option<InFlight>,
        cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    }
}

impl<F, R, E> Future for DrainFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<DrainBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.future.poll(cx))?;
        let (held, cut) = (this.held.take(), this.cut.take());
        Poll::Ready(Ok(resp.map(|body| DrainBody {
            body,
            held,
            cut,
            done: false,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts as in flight until it ends, and ends with `UNAVAILABLE`
    /// when the drain begins while it waits for its next frame.
    pub(crate) struct DrainBody<B> {
        #[pin]
        body: B,
        held: Option<InFlight>,
        cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        done: bool,
    }
}

impl<B: Body> Body for DrainBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        match this.body.poll_frame(cx) {
            Poll::Ready(None) => {
                *this.done = true;
                this.held.take();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    // Trailers are the end of a gRPC response.
                    *this.done = true;
                    this.held.take();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Pending => {
                let draining = this
                    .cut
                    .as_mut()
                    .is_some_and(|cut| cut.as_mut().poll(cx).is_ready());
                if !draining {
                    return Poll::Pending;
                }
                *this.done = true;
                this.held.take();
                Poll::Ready(Some(Ok(Frame::trailers(unavailable()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            SizeHint::with_exact(0)
        } else {
            self.body.size_hint()
        }
    }
}

/// Trailers ending a gRPC stream with `UNAVAILABLE`.
fn unavailable() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
    trailers.insert(
        "grpc-message",
        http::HeaderValue::from_static(DRAIN_MESSAGE),
    );
    trailers
}
