//! The Orders service for browsers: gRPC-web (tonic-web) with the layer's CORS policy, and a
//! static page (HTML and ~60 lines of JavaScript, no build step) that calls `ListOrders` with
//! the `__session` cookie and shows the caller's user id, or the gRPC status. Shared by
//! `examples/grpc_web.rs` and `tests/browser.rs`.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use clerk_grpc_auth::layer::{web::GrpcWebLayer, AuthLayer};
use tower::Service;

use crate::orders::{pb::orders_server::OrdersServer, OrdersService};

/// The page. `__API__` and `__ACCOUNTS__` are replaced by JSON string literals.
const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Orders over gRPC-web</title>
<style>body{font:16px system-ui,sans-serif;max-width:40rem;margin:3rem auto}</style></head>
<body>
<h1>Orders over gRPC-web</h1>
<p><a id="sign-in" href="#">Sign in</a> · <a id="sign-out" href="#">Sign out</a>
 · <button id="call" type="button">Call ListOrders</button></p>
<p>Caller: <output id="result">…</output></p>
<script>
const API = __API__;           // the gRPC-web endpoint: this server's own origin
const ACCOUNTS = __ACCOUNTS__; // the sign-in pages (the emulator's), or ""
const CODES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
  "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
  "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];
const text = (b) => new TextDecoder().decode(b);
// Protobuf fields of a message: [number, bytes or integer].
function* fields(b) {
  let i = 0;
  const varint = () => { let n = 0, s = 0, x; do { x = b[i++]; n += (x & 0x7f) * 2 ** s; s += 7; } while (x & 0x80); return n; };
  while (i < b.length) {
    const key = varint(), type = key & 7, number = Math.floor(key / 8);
    if (type === 0) yield [number, varint()];
    else if (type === 2) { const n = varint(); yield [number, b.subarray(i, i += n)]; }
    else if (type === 1 || type === 5) i += type === 1 ? 8 : 4;
    else throw new Error("protobuf wire type " + type);
  }
}
function show(r) {
  const out = document.getElementById("result");
  out.dataset.code = r.code; out.dataset.user = r.user || ""; out.dataset.message = r.message || "";
  out.textContent = r.code === "OK" ? r.user + (r.org ? " in " + r.org + " as " + r.role : "")
                                    : r.code + (r.message ? ": " + r.message : "");
  document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
}
async function listOrders() {
  let res;
  try {
    res = await fetch(API + "/examples.orders.v1.Orders/ListOrders", {
      method: "POST", credentials: "include", // the __session and __client_uat cookies
      headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
      body: new Uint8Array([0, 0, 0, 0, 0]),  // one frame: uncompressed, 0 bytes (ListOrdersRequest {})
    });
  } catch (e) {
    return show({ code: "FETCH_FAILED", message: String(e) }); // e.g. refused by CORS
  }
  let status = res.headers.get("grpc-status"), message = res.headers.get("grpc-message") || "";
  const buf = new Uint8Array(await res.arrayBuffer());
  let reply = null;
  for (let i = 0; i + 5 <= buf.length;) {       // frames: flags, u32 length, bytes
    const n = new DataView(buf.buffer, buf.byteOffset + i + 1, 4).getUint32(0);
    const flags = buf[i], frame = buf.subarray(i + 5, i + 5 + n);
    i += 5 + n;
    if (!(flags & 0x80)) { reply = frame; continue; }
    for (const line of text(frame).split("\r\n")) { // the trailers frame
      const c = line.indexOf(":");
      const k = line.slice(0, c).trim().toLowerCase(), v = line.slice(c + 1).trim();
      if (k === "grpc-status") status = v;
      if (k === "grpc-message") message = v;
    }
  }
  try { message = decodeURIComponent(message); } catch (_) {}
  if (status === null) return show({ code: "HTTP_" + res.status, message });
  if (status !== "0") return show({ code: CODES[Number(status)] || "UNKNOWN", message });
  const r = { code: "OK" };
  for (const [n, caller] of fields(reply || new Uint8Array())) {
    if (n !== 1) continue;                      // ListOrdersResponse.caller
    for (const [m, v] of fields(caller)) {      // Caller: user_id 1, org_id 2, org_role 3
      if (m === 1) r.user = text(v);
      if (m === 2) r.org = text(v);
      if (m === 3) r.role = text(v);
    }
  }
  show(r);
}
const back = "?redirect_url=" + encodeURIComponent(location.href);
if (ACCOUNTS) {
  document.getElementById("sign-in").href = ACCOUNTS + "/sign-in" + back;
  document.getElementById("sign-out").href = ACCOUNTS + "/sign-out" + back;
}
document.getElementById("call").onclick = listOrders;
listOrders();
</script>
</body></html>
"##;

/// A JavaScript string literal for `s` (JSON, with `<` escaped so it cannot end the script).
fn js_string(s: &str) -> String {
    serde_json::to_string(s)
        .expect("a string serialises")
        .replace('<', "\\u003c")
}

/// The page, calling the gRPC-web endpoint at `api` (an origin) and linking to the sign-in
/// pages at `accounts` (an emulator's URL), if any.
pub fn page(api: &str, accounts: Option<&str>) -> String {
    PAGE.replace("__API__", &js_string(api))
        .replace("__ACCOUNTS__", &js_string(accounts.unwrap_or_default()))
}

/// Answers `GET /` with the page; everything else goes to the gRPC(-web) stack.
#[derive(Clone)]
pub struct WithPage<S> {
    inner: S,
    html: Arc<str>,
}

impl<S, B, ResBody> Service<http::Request<B>> for WithPage<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>, Error = Infallible>,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.method() == http::Method::GET && req.uri().path() == "/" {
            let res = http::Response::builder()
                .header("content-type", "text/html; charset=utf-8")
                .header("cache-control", "no-store")
                .header("x-content-type-options", "nosniff")
                .body(tonic::body::Body::new(self.html.to_string()))
                .expect("a valid response");
            return Box::pin(std::future::ready(Ok(res)));
        }
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map(|r| r.map(tonic::body::Body::new)) })
    }
}

/// The origin a browser sees for `listener`'s address: `http://127.0.0.1:PORT`.
pub fn own_origin(listener: &tokio::net::TcpListener) -> std::io::Result<String> {
    Ok(format!("http://{}", listener.local_addr()?))
}

/// Serves the page and the Orders service over gRPC-web (and plain gRPC) on `listener`,
/// behind `auth` and its CORS policy, until `shutdown`. The page calls `api` (this server's
/// origin) and links to the sign-in pages at `accounts`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    auth: AuthLayer,
    accounts: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let api = own_origin(&listener).expect("a bound listener");
    serve_calling(listener, auth, accounts, api, shutdown).await
}

/// As [`serve`], with a page that calls the gRPC-web endpoint at `api` (another server's
/// origin: a cross-origin caller, for tests).
pub async fn serve_calling(
    listener: tokio::net::TcpListener,
    auth: AuthLayer,
    accounts: Option<String>,
    api: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let html: Arc<str> = page(&api, accounts.as_deref()).into();
    tonic::transport::Server::builder()
        // Browsers speak HTTP/1.1 to a plaintext server.
        .accept_http1(true)
        .layer(tower::layer::layer_fn(move |inner| WithPage {
            inner,
            html: html.clone(),
        }))
        // Outermost: preflights answered, CORS headers on every answer (refusals included).
        .layer(auth.cors())
        .layer(GrpcWebLayer::new())
        .layer(auth)
        .add_service(OrdersServer::new(OrdersService))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
