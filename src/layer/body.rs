//! A response body that ends a stream with `UNAUTHENTICATED` when the caller's token expires.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

pin_project! {
    /// The layer's response body: the handler's body, optionally cut short when the token
    /// that authorized the call expires. At that point the stream ends with trailers
    /// `grpc-status: 16` (`UNAUTHENTICATED`) and `grpc-message: token expired`.
    pub struct ExpiringBody<B> {
        #[pin]
        inner: B,
        #[pin]
        deadline: Option<Sleep>,
        expired: bool,
    }
}

impl<B> ExpiringBody<B> {
    /// No deadline: the handler's body unchanged.
    pub fn unbounded(inner: B) -> Self {
        Self {
            inner,
            deadline: None,
            expired: false,
        }
    }

    /// Ends the stream `after` from now.
    pub fn until(inner: B, after: Duration) -> Self {
        Self {
            inner,
            deadline: Some(tokio::time::sleep(after)),
            expired: false,
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
            .field("bounded", &self.deadline.is_some())
            .field("expired", &self.expired)
            .finish()
    }
}

fn expired_trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from_static("16"));
    t.insert(
        "grpc-message",
        http::HeaderValue::from_static("token expired"),
    );
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
        let mut this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        // The handler's frames first: what it already produced is delivered.
        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if let Some(deadline) = this.deadline.as_mut().as_pin_mut() {
            if deadline.poll(cx).is_ready() {
                *this.expired = true;
                return Poll::Ready(Some(Ok(Frame::trailers(expired_trailers()))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.expired {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}
