//! What a stop waits for: the calls in flight and the answers still being written — not
//! connections that are idle.
//!
//! [`Drain`] wraps the gRPC server (a tower layer) and counts the calls in flight: a call
//! counts from its arrival until its response body ends or is dropped. It also wraps each
//! accepted connection ([`DrainIo`]), noting when a connection last wrote. When the drain
//! begins ([`Drain::start`]):
//!
//! - a response body still streaming (`grpc.health.v1.Health/Watch`, reflection) ends with
//!   `UNAVAILABLE` — what clients of a draining server expect: reconnect, elsewhere or later.
//!   `WatchRevocations` ends itself, with its reason (its hub drains at the same moment), and
//!   is left alone here;
//! - a connection that has not yet sent the 24 bytes of the HTTP/2 client preface (a port
//!   probe, a client that stalled before speaking), and has nothing more to read, reads
//!   end-of-file: the transport drops it instead of waiting for a preface that may never come;
//! - every other connection gets its `GOAWAY` from the transport and closes once its calls are
//!   answered and written.
//!
//! The stop is done when every connection has closed, or ([`Drain::quiet`]) when no call is in
//! flight and no connection has written anything for [`QUIET`] — an idle connection whose peer
//! never closes (a frozen client, a half-written one, a TLS health check) does not hold it,
//! while a slow reader still receiving its answer does — or when the grace period is over.
//! Then [`Drain::kill`] ends every connection left, so nothing outlives the server.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// Paths whose streams end themselves when the server drains (with a reason of their own).
const SELF_DRAINING: [&str; 1] = ["/clerk.auth.v1.AuthService/WatchRevocations"];

/// The length of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const H2_PREFACE_LEN: usize = 24;

/// With no call in flight, how long every connection must have written nothing for the stop to
/// be done (a slow reader's answer still being written keeps it going).
pub(crate) const QUIET: Duration = Duration::from_secs(1);

/// The `grpc-message` of a stream ended by the drain.
const DRAIN_MESSAGE: &str = "server shutting down; reconnect";

/// The drain of one server: calls in flight, connections open, the last write, and the
/// moment the drain began.
#[derive(Clone, Default)]
pub(crate) struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    in_flight: AtomicUsize,
    /// Notified when the last call in flight ends.
    idle: Notify,
    connections: AtomicUsize,
    /// When a connection last wrote, in nanoseconds since `epoch`.
    last_write: AtomicU64,
    epoch: Instant,
    draining: CancellationToken,
    /// Ends every connection still open.
    kill: CancellationToken,
    started: OnceLock<Instant>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            connections: AtomicUsize::new(0),
            last_write: AtomicU64::new(0),
            epoch: Instant::now(),
            draining: CancellationToken::new(),
            kill: CancellationToken::new(),
            started: OnceLock::new(),
        }
    }
}

impl Inner {
    fn wrote(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_write.fetch_max(nanos, Ordering::Relaxed);
    }

    fn since_last_write(&self) -> Duration {
        let last = Duration::from_nanos(self.last_write.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

impl Drain {
    /// The tower layer that counts calls and ends streams once the drain begins.
    pub(crate) fn layer(&self) -> DrainLayer {
        DrainLayer {
            inner: self.inner.clone(),
        }
    }

    /// Begins the drain: streaming responses end (`UNAVAILABLE`), connections that never
    /// spoke are dropped.
    pub(crate) fn start(&self) {
        let _ = self.inner.started.set(Instant::now());
        self.inner.draining.cancel();
    }

    /// Ends every connection still open (after the drain: nothing outlives the server).
    pub(crate) fn kill(&self) {
        self.inner.kill.cancel();
    }

    /// Wraps an accepted connection: see [`DrainIo`].
    pub(crate) fn io<T>(&self, io: T) -> DrainIo<T> {
        self.inner.connections.fetch_add(1, Ordering::Relaxed);
        DrainIo {
            io,
            preface_left: H2_PREFACE_LEN,
            until_spoken: Some(Box::pin(self.inner.draining.clone().cancelled_owned())),
            killed: Box::pin(self.inner.kill.clone().cancelled_owned()),
            open: Open(self.inner.clone()),
        }
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub(crate) fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::Relaxed)
    }

    /// Resolves once no call is in flight and no connection has written for `quiet`.
    pub(crate) async fn quiet(&self, quiet: Duration) {
        loop {
            loop {
                // Registered before the count is read, so the last call's end is not missed.
                let ended = self.inner.idle.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                if self.in_flight() == 0 {
                    break;
                }
                ended.await;
            }
            let since = self.inner.since_last_write();
            if since >= quiet {
                return;
            }
            tokio::time::sleep(quiet - since).await;
        }
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
        inner.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(inner)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
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
            .then(|| Cut::Token(self.inner.draining.clone()));
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
        cut: Option<Cut>,
    }
}

/// How a streaming body learns of the drain: the token until the body first waits, then a
/// future registered for its wake-up (a unary answer, never waiting, allocates nothing).
enum Cut {
    Token(CancellationToken),
    Waiting(Pin<Box<WaitForCancellationFutureOwned>>),
}

impl Cut {
    /// Whether the drain has begun; registers `cx` to be woken when it does.
    fn poll_draining(&mut self, cx: &mut Context<'_>) -> bool {
        if let Cut::Token(token) = self {
            if token.is_cancelled() {
                return true;
            }
            *self = Cut::Waiting(Box::pin(token.clone().cancelled_owned()));
        }
        match self {
            Cut::Waiting(future) => future.as_mut().poll(cx).is_ready(),
            // Not reached: replaced just above.
            Cut::Token(token) => token.is_cancelled(),
        }
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
        cut: Option<Cut>,
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
                let draining = this.cut.as_mut().is_some_and(|cut| cut.poll_draining(cx));
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

/// Counts a connection while it is open.
struct Open(Arc<Inner>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// An accepted connection (under TLS, its TCP stream), as the transport sees it, but:
    /// once the drain begins, it reads end-of-file if it has not sent the HTTP/2 client
    /// preface and has nothing more to read; it notes each write ([`Drain::quiet`]); and once
    /// killed ([`Drain::kill`]) it fails every read and write, so its connection ends.
    pub(crate) struct DrainIo<T> {
        #[pin]
        io: T,
        preface_left: usize,
        // `None` once the preface has been read: from then on the transport's graceful
        // shutdown (GOAWAY, close when the calls are written) applies.
        until_spoken: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        killed: Pin<Box<WaitForCancellationFutureOwned>>,
        open: Open,
    }
}

fn aborted() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the server has stopped",
    )
}

impl<T: Connected> Connected for DrainIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: AsyncRead> AsyncRead for DrainIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        // Polled on every read: a kill wakes a connection waiting for bytes.
        if this.killed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(aborted()));
        }
        let before = buf.filled().len();
        match this.io.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                *this.preface_left = this.preface_left.saturating_sub(n);
                if *this.preface_left == 0 {
                    *this.until_spoken = None;
                }
                Poll::Ready(Ok(()))
            }
            // Bytes already sent are read first: only a connection with nothing more to read
            // is cut, and the drain wakes one that is waiting for its first bytes.
            Poll::Pending => {
                if let Some(draining) = this.until_spoken.as_mut() {
                    if draining.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Pending
            }
            failed => failed,
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for DrainIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        if this.open.0.kill.is_cancelled() {
            return Poll::Ready(Err(aborted()));
        }
        let written = this.io.poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.open.0.wrote();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        if this.open.0.kill.is_cancelled() {
            return Poll::Ready(Err(aborted()));
        }
        let written = this.io.poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.open.0.wrote();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if this.open.0.kill.is_cancelled() {
            return Poll::Ready(Err(aborted()));
        }
        this.io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
