//! `Check` on the wire. [`CheckServer`] serves `envoy.service.auth.v3.Authorization` as the
//! generated `AuthorizationServer` does (the same path, codec settings and `UNIMPLEMENTED` for
//! other methods), except for how the allowed answer is encoded: from bytes. Its largest part
//! — the removal of every `_` spelling of the identity headers, 35 names — never changes, so
//! it is encoded once per process and copied into each answer after the identity's own
//! headers, instead of 35 strings being allocated, encoded and freed per call. Denials are
//! built and encoded as messages (they are not the hot path).
//!
//! Protobuf reads the fields of an embedded message laid end to end as one message (repeated
//! fields concatenated in order), so "the identity's `OkHttpResponse` bytes, then the constant
//! removals' bytes" in one length-delimited field *is* the `OkHttpResponse` that
//! [`super::allowed`] builds: the tests decode both and compare them.

use std::{
    convert::Infallible,
    sync::{Arc, LazyLock},
    task::{Context, Poll},
};

use bytes::{Buf, BufMut, Bytes};
use envoy_types::{
    ext_authz::v3::{
        pb::{CheckRequest, CheckResponse, OkHttpResponse},
        CheckResponseExt,
    },
    pb::envoy::service::auth::v3::{
        attribute_context::{HttpRequest, Peer, Request as AttrRequest},
        AttributeContext,
    },
};
use prost::{
    encoding::{encode_key, encode_varint, DecodeContext, WireType},
    DecodeError, Message,
};
use tonic::{body::Body, server::NamedService, Status};

use super::{
    identity_header_spellings, identity_headers, metadata, Answer, ExtAuthz, Headers, ALLOWED,
};
use crate::token::identity::Identity;

/// `CheckResponse.ok_response`'s field number.
const OK_RESPONSE: u32 = 3;
/// `CheckResponse.dynamic_metadata`'s field number.
const DYNAMIC_METADATA: u32 = 4;

/// A message already encoded: written as it is (never decoded: the server only sends it).
#[derive(Debug, Clone, Default)]
pub(crate) struct Encoded(Bytes);

impl Message for Encoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

/// The parts of every allowed answer that never change.
struct Constant {
    /// `status` (OK, "allowed"), as field 1 of a `CheckResponse`.
    status: Vec<u8>,
    /// An `OkHttpResponse`'s fields removing every `_` spelling of the identity headers.
    removals: Vec<u8>,
}

static CONSTANT: LazyLock<Constant> = LazyLock::new(|| Constant {
    status: CheckResponse::with_status(Status::ok(ALLOWED)).encode_to_vec(),
    removals: OkHttpResponse {
        headers_to_remove: identity_header_spellings().to_vec(),
        ..OkHttpResponse::default()
    }
    .encode_to_vec(),
});

/// The allowed answer for `identity`, encoded: the message [`super::allowed`] builds.
pub(crate) fn allowed(identity: Option<&Identity>) -> Encoded {
    let constant = &*CONSTANT;
    let own = identity_headers(identity).build().encode_to_vec();
    let metadata = identity.map(metadata);
    let ok_len = own.len() + constant.removals.len();
    let mut out = Vec::with_capacity(
        constant.status.len()
            + 1
            + prost::encoding::encoded_len_varint(ok_len as u64)
            + ok_len
            + metadata.as_ref().map_or(0, |m| {
                prost::encoding::message::encoded_len(DYNAMIC_METADATA, m)
            }),
    );
    out.extend_from_slice(&constant.status);
    encode_key(OK_RESPONSE, WireType::LengthDelimited, &mut out);
    encode_varint(ok_len as u64, &mut out);
    out.extend_from_slice(&own);
    out.extend_from_slice(&constant.removals);
    if let Some(m) = &metadata {
        prost::encoding::message::encode(DYNAMIC_METADATA, m, &mut out);
    }
    Encoded(out.into())
}

/// A `CheckRequest` decoded for [`ExtAuthz::answer`]: only the fields it reads are kept —
/// `attributes.source.address`, `attributes.context_extensions` and, of
/// `attributes.request.http`, `method`, `headers`, `path`, `host` and `header_map` — each
/// merged by prost's own functions exactly as the generated decoder merges it (repeated
/// occurrences, last-wins strings, map entries, UTF-8 checks, nesting limit) — but for
/// `headers`, which is decoded apart, into [`Headers`] (slices of the received message, no
/// hashing: [`Headers::merge_entry`]), and left empty in the request. Every other field (the
/// destination peer, the request's time, id, scheme, protocol, size and body, the TLS
/// session, the metadata contexts, a peer's labels and certificate) is skipped unread: Envoy
/// sends them on every call, and allocating them costs more than the decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Lean(pub(crate) CheckRequest, pub(crate) Headers);

/// Skips a field the decision never reads.
fn skip(
    tag: u32,
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    prost::encoding::skip_field(wire_type, tag, buf, ctx)
}

/// Headers most requests carry fit without the list growing while it is decoded.
const HEADERS_EXPECTED: usize = 32;

/// Implements [`Message`] for `$view`, a decoding view over a `$target` (owned or borrowed)
/// and the request's [`Headers`], reading fields with `$merge` (`$this` matches the view).
/// Encoding writes what was kept of the target (the server never encodes a request);
/// clearing resets the target, then runs `$clear` (the owned view's headers).
macro_rules! lean_message {
    ($view:ty, $target:ty, |$this:pat, $tag:ident, $wire:ident, $buf:ident, $ctx:ident| $merge:expr
     $(, clear: |$cleared:ident| $clear:expr)?) => {
        impl Message for $view {
            fn encode_raw(&self, buf: &mut impl BufMut) {
                self.0.encode_raw(buf)
            }

            fn merge_field(
                &mut self,
                $tag: u32,
                $wire: WireType,
                $buf: &mut impl Buf,
                $ctx: DecodeContext,
            ) -> Result<(), DecodeError> {
                let $this = self;
                $merge
            }

            fn encoded_len(&self) -> usize {
                self.0.encoded_len()
            }

            fn clear(&mut self) {
                let target: &mut $target = &mut self.0;
                *target = Default::default();
                $(let $cleared = self; $clear;)?
            }
        }
    };
}

/// Merges the nested message in `slot` (created empty when absent) through its lean `view`.
fn nested<'a, T: Default, V: Message + 'a>(
    wire: WireType,
    slot: &'a mut Option<T>,
    view: impl FnOnce(&'a mut T) -> V,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    let mut view = view(slot.get_or_insert_with(Default::default));
    prost::encoding::message::merge(wire, &mut view, buf, ctx)
}

/// Merges the nested message in `slot` (created empty when absent), every field of it read.
fn whole<T: Message + Default>(
    wire: WireType,
    slot: &mut Option<T>,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    prost::encoding::message::merge(wire, slot.get_or_insert_with(Default::default), buf, ctx)
}

/// Merges one entry of a `map<string, string>` field, as the generated decoder does.
fn string_map(
    map: &mut std::collections::HashMap<String, String>,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    prost::encoding::hash_map::merge(
        prost::encoding::string::merge,
        prost::encoding::string::merge,
        map,
        buf,
        ctx,
    )
}

#[derive(Debug)]
struct LeanAttributes<'a>(&'a mut AttributeContext, &'a mut Headers);
#[derive(Debug)]
struct LeanPeer<'a>(&'a mut Peer);
#[derive(Debug)]
struct LeanRequest<'a>(&'a mut AttrRequest, &'a mut Headers);
#[derive(Debug)]
struct LeanHttp<'a>(&'a mut HttpRequest, &'a mut Headers);

lean_message!(
    Lean,
    CheckRequest,
    |Lean(r, headers), tag, wire, buf, ctx| match tag {
        1 => nested(
            wire,
            &mut r.attributes,
            |a| LeanAttributes(a, headers),
            buf,
            ctx
        ),
        _ => skip(tag, wire, buf, ctx),
    },
    clear: |lean| lean.1 = Headers::default()
);

lean_message!(
    LeanAttributes<'_>,
    AttributeContext,
    |LeanAttributes(a, headers), tag, wire, buf, ctx| match tag {
        1 => nested(wire, &mut a.source, LeanPeer, buf, ctx),
        4 => nested(wire, &mut a.request, |r| LeanRequest(r, headers), buf, ctx),
        10 => string_map(&mut a.context_extensions, buf, ctx),
        _ => skip(tag, wire, buf, ctx),
    }
);

lean_message!(
    LeanPeer<'_>,
    Peer,
    |LeanPeer(p), tag, wire, buf, ctx| match tag {
        1 => whole(wire, &mut p.address, buf, ctx),
        _ => skip(tag, wire, buf, ctx),
    }
);

lean_message!(
    LeanRequest<'_>,
    AttrRequest,
    |LeanRequest(r, headers), tag, wire, buf, ctx| match tag {
        2 => nested(wire, &mut r.http, |h| LeanHttp(h, headers), buf, ctx),
        _ => skip(tag, wire, buf, ctx),
    }
);

lean_message!(
    LeanHttp<'_>,
    HttpRequest,
    |LeanHttp(h, headers), tag, wire, buf, ctx| match tag {
        2 => prost::encoding::string::merge(wire, &mut h.method, buf, ctx),
        3 => {
            if headers.is_empty() {
                headers.reserve(HEADERS_EXPECTED);
            }
            headers.merge_entry(buf, ctx)
        }
        4 => prost::encoding::string::merge(wire, &mut h.path, buf, ctx),
        5 => prost::encoding::string::merge(wire, &mut h.host, buf, ctx),
        13 => whole(wire, &mut h.header_map, buf, ctx),
        _ => skip(tag, wire, buf, ctx),
    }
);

/// How many identities' allowed answers each thread keeps ([`allowed_for`]).
const RECENT_ANSWERS: usize = 16;

/// The allowed answers this thread encoded last, by identity.
struct Recent {
    slots: [Option<(Arc<Identity>, Bytes)>; RECENT_ANSWERS],
    /// The slot the next new answer takes (the oldest).
    next: usize,
}

thread_local! {
    static RECENT: std::cell::RefCell<Recent> = const {
        std::cell::RefCell::new(Recent {
            slots: [const { None }; RECENT_ANSWERS],
            next: 0,
        })
    };
    /// The answer for a public route (no identity).
    static PUBLIC: Bytes = allowed(None).0;
}

/// [`allowed`], encoded once per verdict while it is repeated: every verdict-cache hit on a
/// token hands back the same `Arc<Identity>`, so the answer this thread last encoded for that
/// `Arc` is sent again (a copy of a reference-counted buffer). The slot holds the `Arc`
/// itself, so the identity can neither change (no `Arc::get_mut` while it is shared) nor
/// give its address to another one while its answer is kept; a new verdict on the same token
/// is another `Arc` and gets its own answer. At most [`RECENT_ANSWERS`] per thread, the
/// oldest replaced first.
fn allowed_for(identity: Option<Arc<Identity>>) -> Encoded {
    let Some(identity) = identity else {
        return Encoded(PUBLIC.with(Bytes::clone));
    };
    RECENT.with(|recent| {
        let mut recent = recent.borrow_mut();
        if let Some((_, bytes)) = recent
            .slots
            .iter()
            .flatten()
            .find(|(id, _)| Arc::ptr_eq(id, &identity))
        {
            return Encoded(bytes.clone());
        }
        let bytes = allowed(Some(&identity)).0;
        let slot = recent.next;
        recent.slots[slot] = Some((identity, bytes.clone()));
        recent.next = (slot + 1) % RECENT_ANSWERS;
        Encoded(bytes)
    })
}

/// `envoy.service.auth.v3.Authorization` for a tonic server ([`ExtAuthz::into_server`]).
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct CheckServer {
    inner: Arc<ExtAuthz>,
}

impl CheckServer {
    /// Serves `authz`'s decisions.
    pub fn new(authz: ExtAuthz) -> Self {
        Self {
            inner: Arc::new(authz),
        }
    }
}

impl NamedService for CheckServer {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

/// One `Check` call.
struct CheckCall(Arc<ExtAuthz>);

impl tonic::server::UnaryService<Lean> for CheckCall {
    type Response = Encoded;
    type Future = futures::future::BoxFuture<'static, Result<tonic::Response<Encoded>, Status>>;

    fn call(&mut self, request: tonic::Request<Lean>) -> Self::Future {
        let authz = self.0.clone();
        Box::pin(async move {
            let Lean(req, headers) = request.get_ref();
            let encoded = match authz.answer(req, headers).await {
                Answer::Allowed(identity) => allowed_for(identity),
                Answer::Denied(resp) => Encoded(resp.encode_to_vec().into()),
            };
            Ok(tonic::Response::new(encoded))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for CheckServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/envoy.service.auth.v3.Authorization/Check" {
            return Box::pin(async {
                let mut response = http::Response::new(Body::default());
                response.headers_mut().insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            });
        }
        let call = CheckCall(self.inner.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Encoded, Lean>::default();
            Ok(tonic::server::Grpc::new(codec).unary(call, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::identity::Organization;

    fn identity(org: Option<Organization>, session: Option<&str>) -> Identity {
        let mut id = Identity::for_machine(
            crate::token::identity::TokenType::M2mToken,
            "mt_1".into(),
            crate::token::identity::MachineInfo {
                subject: "mch_1".into(),
                machine_id: Some("mch_1".into()),
                ..Default::default()
            },
            serde_json::Map::new(),
            None,
            None,
            f64::INFINITY,
            None,
        );
        id.user_id = "user_2abc".into();
        id.session_id = session.map(str::to_owned);
        id.organization = org;
        id.issuer = Some("https://clerk.example.com".into());
        id
    }

    #[test]
    fn the_encoded_answer_is_the_built_one() {
        let full = Organization {
            id: "org_9".into(),
            slug: Some("acme".into()),
            role: Some("org:admin".into()),
            permissions: vec!["org:a:read".into(), "org:a:write".into()],
        };
        let bare = Organization {
            id: "org_9".into(),
            ..Organization::default()
        };
        let ids = [
            identity(Some(full), Some("sess_1")),
            identity(Some(bare), None),
            identity(None, Some("sess_1")),
        ];
        let cases: Vec<Option<&Identity>> =
            std::iter::once(None).chain(ids.iter().map(Some)).collect();
        for id in cases {
            let built = super::super::allowed(id);
            let encoded = allowed(id);
            let decoded = CheckResponse::decode(encoded.0.clone()).unwrap();
            assert_eq!(decoded, built, "{id:?}");
            // Byte for byte what prost writes, but for the field order inside ok_response.
            assert_eq!(encoded.0.len(), built.encoded_len());
        }
    }

    /// A request with every field Envoy may send, so that the lean decoding has something to
    /// skip at every level.
    fn full_request(seed: &str) -> CheckRequest {
        use envoy_types::pb::envoy::config::core::v3::{
            address::Address as Kind, Address, HeaderMap, HeaderValue, SocketAddress,
        };
        let peer = |ip: &str| Peer {
            address: Some(Address {
                address: Some(Kind::SocketAddress(SocketAddress {
                    address: ip.into(),
                    ..Default::default()
                })),
            }),
            service: format!("svc-{seed}"),
            labels: [("app".to_owned(), seed.to_owned())].into(),
            principal: format!("spiffe://x/{seed}"),
            certificate: "-----BEGIN CERTIFICATE-----".into(),
        };
        let map = |pairs: &[(&str, &str)]| -> std::collections::HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), format!("{v}{seed}")))
                .collect()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer("10.0.0.1")),
                destination: Some(peer("10.0.0.2")),
                request: Some(AttrRequest {
                    time: Some(envoy_types::pb::google::protobuf::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 5,
                    }),
                    http: Some(HttpRequest {
                        id: format!("id-{seed}"),
                        method: format!("GET{seed}"),
                        headers: map(&[("authorization", "Bearer t"), ("cookie", "a=b")]),
                        header_map: Some(HeaderMap {
                            headers: vec![HeaderValue {
                                key: "x-raw".into(),
                                value: String::new(),
                                raw_value: seed.as_bytes().to_vec(),
                            }],
                        }),
                        path: format!("/orders/{seed}"),
                        host: format!("{seed}.example.com"),
                        scheme: "https".into(),
                        query: "q".into(),
                        fragment: "f".into(),
                        size: 7,
                        protocol: "HTTP/2".into(),
                        body: format!("body {seed}"),
                        raw_body: seed.as_bytes().to_vec(),
                    }),
                }),
                context_extensions: map(&[("clerk_rule", "admin")]),
                metadata_context: Some(Default::default()),
                route_metadata_context: Some(Default::default()),
                tls_session: Some(Default::default()),
            }),
        }
    }

    /// What the lean decoding keeps of `full`: everything `answer` reads, the headers apart.
    fn kept(full: &CheckRequest) -> Lean {
        let a = full.attributes.as_ref().unwrap();
        let http = a.request.as_ref().and_then(|r| r.http.as_ref()).unwrap();
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                source: a.source.as_ref().map(|p| Peer {
                    address: p.address.clone(),
                    ..Default::default()
                }),
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        method: http.method.clone(),
                        header_map: http.header_map.clone(),
                        path: http.path.clone(),
                        host: http.host.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: a.context_extensions.clone(),
                ..Default::default()
            }),
        };
        Lean(request, Headers::from_map(&http.headers))
    }

    #[test]
    fn the_lean_decoding_reads_what_the_decision_reads_as_prost_does() {
        let a = full_request("a");
        let lean = Lean::decode(a.encode_to_vec().as_slice()).unwrap();
        assert_eq!(lean, kept(&a));
        assert_eq!(lean.1.get("authorization"), Some("Bearer ta"));
        // Two messages laid end to end merge (strings: the last; maps: entry by entry; the
        // raw header list: appended) — the same as the generated decoder's merge.
        let b = full_request("b");
        let mut both = a.encode_to_vec();
        both.extend(b.encode_to_vec());
        let full = CheckRequest::decode(both.as_slice()).unwrap();
        let lean = Lean::decode(both.as_slice()).unwrap();
        assert_eq!(lean, kept(&full));
        assert_eq!(lean.1.get("authorization"), Some("Bearer tb"));
        assert_eq!(
            lean.0
                .attributes
                .unwrap()
                .request
                .unwrap()
                .http
                .unwrap()
                .path,
            "/orders/b"
        );
        // A header value that is not UTF-8 is refused, as by prost.
        let mut bytes = a.encode_to_vec();
        let at = bytes.windows(8).position(|w| w == b"Bearer t").unwrap();
        bytes[at] = 0xff;
        assert!(CheckRequest::decode(bytes.as_slice()).is_err());
        assert!(Lean::decode(bytes.as_slice()).is_err());
        // A field the decision reads is checked as prost checks it (UTF-8 here).
        let mut bad = CheckRequest::default();
        let http = HttpRequest {
            method: "GET".into(),
            ..Default::default()
        };
        bad.attributes = Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        });
        let mut bytes = bad.encode_to_vec();
        let at = bytes.windows(3).position(|w| w == b"GET").unwrap();
        bytes[at] = 0xff;
        assert!(CheckRequest::decode(bytes.as_slice()).is_err());
        assert!(Lean::decode(bytes.as_slice()).is_err());
        // A field it never reads is skipped unread, malformed or not.
        let mut skipped = bad.clone();
        let http = skipped
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.scheme = "SCHEME".into();
        let mut bytes = skipped.encode_to_vec();
        let at = bytes.windows(6).position(|w| w == b"SCHEME").unwrap();
        bytes[at] = 0xff;
        assert!(CheckRequest::decode(bytes.as_slice()).is_err());
        let lean = Lean::decode(bytes.as_slice()).unwrap();
        assert_eq!(lean, kept(&bad));
        // Truncated input fails in both.
        let whole = a.encode_to_vec();
        for cut in [1, whole.len() / 2, whole.len() - 1] {
            assert!(Lean::decode(&whole[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_repeated_verdict_is_answered_from_its_first_encoding() {
        // The metadata's fields are a map, encoded in no fixed order: compared decoded.
        let decoded = |b: &Bytes| CheckResponse::decode(b.clone()).unwrap();
        let a = Arc::new(identity(None, Some("sess_a")));
        let first = allowed_for(Some(a.clone())).0;
        assert_eq!(decoded(&first), super::super::allowed(Some(&a)));
        // The same Arc: the same buffer, not a new encoding.
        assert_eq!(allowed_for(Some(a.clone())).0.as_ptr(), first.as_ptr());
        // Another identity (or another verdict with equal fields) gets its own answer.
        let mut other = identity(None, Some("sess_b"));
        other.user_id = "user_other".into();
        let b = Arc::new(other);
        let answer_b = allowed_for(Some(b.clone())).0;
        assert_eq!(decoded(&answer_b), super::super::allowed(Some(&b)));
        assert_ne!(decoded(&answer_b), decoded(&first));
        let twin = Arc::new((*a).clone());
        assert_ne!(allowed_for(Some(twin)).0.as_ptr(), first.as_ptr());
        // Past RECENT_ANSWERS newer identities, `a` is encoded again, still the same answer.
        for i in 0..RECENT_ANSWERS {
            let mut id = identity(None, None);
            id.user_id = format!("user_{i}");
            allowed_for(Some(Arc::new(id)));
        }
        let again = allowed_for(Some(a.clone())).0;
        assert_eq!(decoded(&again), decoded(&first));
        assert_ne!(again.as_ptr(), first.as_ptr());
        // A public route's answer.
        assert_eq!(decoded(&allowed_for(None).0), super::super::allowed(None));
    }
}
