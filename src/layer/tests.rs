//! [`AuthLayer`] around a `tower::service_fn` with hand-built `http::Request`s: no socket, no
//! emulator. The verifier is built by [`TokenVerifier::start`] from a networkless
//! `CLERK_JWT_KEY` made here; tokens are signed with its private half. The same behaviour on
//! a real tonic server against the emulator is `tests/layer.rs`.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tonic::Code;
use tonic_types::StatusExt;
use tower::{service_fn, Layer, Service, ServiceExt};

use super::*;
use crate::{
    authz::Check,
    emulator::{OrgSpec, TokenSpec},
    verify::{
        jwks::{KeySource, KeyStore, KeyStoreConfig},
        settings::tests::TestKey,
    },
    TokenVerifierConfig,
};

const PING: &str = "/examples.orders.v1.Orders/Ping";
const LIST: &str = "/examples.orders.v1.Orders/ListOrders";
const DELETE: &str = "/examples.orders.v1.Orders/DeleteOrder";
const USER: &str = "user_2layerUNIT";

fn policy() -> Policy {
    Policy::authenticated().method(PING, Rule::public()).method(
        DELETE,
        Rule::authenticated().require(Check::permission("org:orders:delete")),
    )
}

/// What the inner service saw of each call that reached it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    identity: Option<Arc<Identity>>,
    token: Option<String>,
}

/// The inner service: records the call and answers an empty OK.
#[derive(Clone, Default)]
struct Inner {
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Inner {
    fn service(
        &self,
    ) -> impl Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        let this = self.clone();
        service_fn(move |req: http::Request<tonic::body::Body>| {
            let this = this.clone();
            async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                let verified = req.extensions().get::<Verified>();
                this.seen.lock().unwrap().push(Seen {
                    path: req.uri().path().to_owned(),
                    identity: verified.map(|v| v.identity().clone()),
                    token: verified.map(|v| v.token().to_owned()),
                });
                let mut res = http::Response::new(tonic::body::Body::default());
                res.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("0"));
                Ok::<_, Infallible>(res)
            }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("a call")
    }
}

fn request(path: &str, headers: &[(&str, &str)]) -> http::Request<tonic::body::Body> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("http://orders.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(tonic::body::Body::default()).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Sends one call through `layer` around `inner`: the gRPC status (`Ok` when the inner service
/// answered) and its `ErrorInfo` reason.
async fn call(
    layer: &AuthLayer,
    inner: &Inner,
    req: http::Request<tonic::body::Body>,
) -> (Code, Option<String>) {
    let svc = layer.layer(inner.service());
    let res = svc.oneshot(req).await.unwrap();
    match Status::from_header_map(res.headers()) {
        None => (Code::Ok, None),
        Some(s) => {
            let reason = s.get_error_details().error_info().map(|i| i.reason.clone());
            (s.code(), reason)
        }
    }
}

fn token(org_permissions: &[&str]) -> String {
    TestKey::get().session(&TokenSpec {
        user_id: Some(USER.into()),
        org: Some(OrgSpec {
            id: Some("org_2layerUNIT".into()),
            slug: Some("unit".into()),
            role: Some("member".into()),
            permissions: org_permissions.iter().map(|p| (*p).to_owned()).collect(),
        }),
        ..TokenSpec::default()
    })
}

fn refused(code: Code, reason: &str) -> (Code, Option<String>) {
    (code, Some(reason.to_owned()))
}

#[tokio::test]
async fn a_call_without_a_token_is_unauthenticated_and_never_reaches_the_handler() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier, policy());
    let inner = Inner::default();
    assert_eq!(
        call(&layer, &inner, request(LIST, &[])).await,
        refused(Code::Unauthenticated, "TOKEN_MISSING")
    );
    // A token is read only from `authorization` and the `__session` cookie by default.
    assert_eq!(
        call(&layer, &inner, request(LIST, &[("x-token", &token(&[]))])).await,
        refused(Code::Unauthenticated, "TOKEN_MISSING")
    );
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn a_public_method_passes_without_a_token_and_without_an_identity() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier, policy());
    let inner = Inner::default();
    assert_eq!(
        call(&layer, &inner, request(PING, &[])).await,
        (Code::Ok, None)
    );
    let seen = inner.last();
    assert_eq!(seen.path, PING);
    assert!(seen.identity.is_none());
    // Not even a bad token is looked at.
    let (code, _) = call(
        &layer,
        &inner,
        request(PING, &[("authorization", "Bearer garbage")]),
    )
    .await;
    assert_eq!(code, Code::Ok);
    assert!(inner.last().identity.is_none());
    assert_eq!(inner.calls(), 2);
}

#[tokio::test]
async fn a_valid_token_reaches_the_handler_with_its_identity() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier.clone(), policy());
    let inner = Inner::default();
    let t = token(&[]);
    let auth = bearer(&t);
    assert_eq!(
        call(&layer, &inner, request(LIST, &[("authorization", &auth)])).await,
        (Code::Ok, None)
    );
    let seen = inner.last();
    let id = seen.identity.expect("identity in the extensions");
    assert_eq!(id.user_id, USER);
    assert_eq!(id.organization.as_ref().unwrap().id, "org_2layerUNIT");
    assert_eq!(seen.token.as_deref(), Some(t.as_str()), "Verified::token");
    // The `__session` cookie works too; the second verification is a verdict-cache hit.
    let cookie = format!("theme=dark; {SESSION_COOKIE}={t}; {CLIENT_UAT_COOKIE}=1");
    assert_eq!(
        call(&layer, &inner, request(LIST, &[("cookie", &cookie)])).await,
        (Code::Ok, None)
    );
    assert_eq!(inner.last().identity.unwrap().user_id, USER);
    assert_eq!(verifier.stats().full_verifications, 1);
    assert_eq!(verifier.stats().cache_hits, 1);
}

#[tokio::test]
async fn a_policy_denial_is_permission_denied() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier, policy());
    let inner = Inner::default();
    let without = bearer(&token(&["org:orders:read"]));
    assert_eq!(
        call(
            &layer,
            &inner,
            request(DELETE, &[("authorization", &without)])
        )
        .await,
        refused(Code::PermissionDenied, "ORG_PERMISSION_REQUIRED")
    );
    assert_eq!(inner.calls(), 0);
    let with = bearer(&token(&["org:orders:delete"]));
    assert_eq!(
        call(&layer, &inner, request(DELETE, &[("authorization", &with)])).await,
        (Code::Ok, None)
    );
    assert_eq!(inner.calls(), 1);
}

#[tokio::test]
async fn an_unknown_method_falls_to_the_default_rule_never_public() {
    let (verifier, _keys) = TestKey::get().verifier();
    let inner = Inner::default();
    let unknown = "/examples.orders.v1.Orders/DropAllOrders";
    let layer = AuthLayer::in_process(verifier.clone(), policy());
    assert_eq!(
        call(&layer, &inner, request(unknown, &[])).await,
        refused(Code::Unauthenticated, "TOKEN_MISSING")
    );
    assert_eq!(
        call(&layer, &inner, request("/other.v1.Svc/Any", &[])).await,
        refused(Code::Unauthenticated, "TOKEN_MISSING")
    );
    // A default with a requirement denies what no rule names, even to a valid token.
    let strict = AuthLayer::in_process(
        verifier,
        Policy::with_default(Rule::authenticated().require(Check::role("org:admin")))
            .method(PING, Rule::public()),
    );
    let auth = bearer(&token(&[]));
    assert_eq!(
        call(
            &strict,
            &inner,
            request(unknown, &[("authorization", &auth)])
        )
        .await,
        refused(Code::PermissionDenied, "ORG_ROLE_REQUIRED")
    );
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn a_path_that_is_not_canonical_is_refused_before_any_rule() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier, policy());
    let inner = Inner::default();
    // Would be public if it fell to Ping's rule; another case of DeleteOrder's path.
    for path in [
        "/examples.orders.v1.Orders/Ping/",
        "//examples.orders.v1.Orders/Ping",
        "/Examples.orders.v1.Orders/DeleteOrder",
    ] {
        let (code, reason) = call(&layer, &inner, request(path, &[])).await;
        assert_eq!(code, Code::InvalidArgument, "{path}");
        assert_eq!(reason.as_deref(), Some("PATH_NOT_CANONICAL"), "{path}");
    }
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_with_clerks_reason() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier, policy());
    let inner = Inner::default();
    let good = token(&[]);
    let expired = TestKey::get().session(&TokenSpec {
        expires_in: Some(-3600),
        ..TokenSpec::default()
    });
    let (head, sig) = good.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{head}.{flipped}{}", &sig[1..]);
    for (t, reason) in [
        ("abc", "TOKEN_INVALID"),
        (expired.as_str(), "TOKEN_EXPIRED"),
        (tampered.as_str(), "TOKEN_INVALID_SIGNATURE"),
    ] {
        let auth = bearer(t);
        assert_eq!(
            call(&layer, &inner, request(LIST, &[("authorization", &auth)])).await,
            refused(Code::Unauthenticated, reason),
            "{reason}"
        );
    }
    assert_eq!(inner.calls(), 0);
}

/// A verifier over a JWKS key store nobody loads: calls answer UNAVAILABLE (no I/O is tried)
/// and the verifier counts them (its one warning is tested in `verify::settings`).
#[tokio::test]
async fn keys_nobody_loads_answer_unavailable() {
    let keys = KeyStore::new(
        KeySource::Remote {
            url: "http://127.0.0.1:9/v1/jwks".parse().unwrap(),
            bearer: None,
        },
        KeyStoreConfig::default(),
        crate::clerk::api::http_client().unwrap(),
    );
    let verifier = TokenVerifier::new(TokenVerifierConfig::default(), keys);
    let layer = AuthLayer::in_process(verifier.clone(), policy());
    let inner = Inner::default();
    let auth = bearer(&token(&[]));
    assert_eq!(
        call(&layer, &inner, request(LIST, &[("authorization", &auth)])).await,
        refused(Code::Unavailable, "JWK_REMOTE_FAILED_TO_LOAD")
    );
    assert_eq!(verifier.stats().keys_never_loaded, 1);
    assert_eq!(verifier.keys().stats().fetches, 0);
    assert_eq!(inner.calls(), 0);
}

/// The README's "Protect your own tonic service" snippet is [`AuthLayer`]'s doc example (which
/// `cargo test --doc` compiles) without its hidden lines: the two cannot drift apart.
#[test]
fn the_readme_snippet_is_the_compiled_doc_example() {
    let module = include_str!("mod.rs");
    let lines: Vec<&str> = module.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("/// Protecting your own tonic service"))
        .expect("AuthLayer's doc example");
    let open = start
        + lines[start..]
            .iter()
            .position(|l| l.trim() == "/// ```no_run")
            .expect("its code block");
    let example: Vec<&str> = lines[open + 1..]
        .iter()
        .take_while(|l| l.trim() != "/// ```")
        .map(|l| {
            l.strip_prefix("/// ")
                .unwrap_or(l.trim_start_matches("///"))
        })
        .filter(|l| !(l.starts_with("# ") || *l == "#"))
        .collect();

    let readme = include_str!("../../README.md");
    let section = &readme[readme
        .find("## Protect your own tonic service\n")
        .expect("the README section")..];
    let block = &section[section.find("```rust\n").expect("its rust block") + 8..];
    let snippet: Vec<&str> = block[..block.find("```\n").unwrap()].lines().collect();
    assert!(example.len() > 10, "{example:?}");
    assert_eq!(snippet, example);
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const APP: &str = "https://app.example.com";

fn session_from(azp: Option<&str>) -> String {
    TestKey::get().session(&TokenSpec {
        user_id: Some(USER.into()),
        azp: azp.map(str::to_owned),
        ..TokenSpec::default()
    })
}

/// A request with the cookie `__session=<t>; __client_uat=<uat>` and `headers` (raw bytes).
fn cookie_request(
    t: &str,
    uat: Option<&str>,
    headers: &[(&str, &[u8])],
) -> http::Request<tonic::body::Body> {
    let cookie = match uat {
        Some(u) => format!("theme=dark; {SESSION_COOKIE}={t}; {CLIENT_UAT_COOKIE}={u}"),
        None => format!("theme=dark; {SESSION_COOKIE}={t}"),
    };
    let mut req = request(LIST, &[("cookie", &cookie)]);
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_bytes(v).unwrap(),
        );
    }
    req
}

/// As Clerk's `authenticateRequest`: a `__session` cookie needs a non-zero `__client_uat`
/// beside it, and a token issued before it is stale.
#[tokio::test]
async fn a_cookie_token_needs_a_client_uat_it_does_not_predate() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier, policy());
    let inner = Inner::default();
    let t = session_from(None);
    let before = (now_secs() - 30).to_string();
    let after = (now_secs() + 3600).to_string();
    let no_uat = refused(Code::Unauthenticated, "SESSION_TOKEN_BUT_NO_CLIENT_UAT");
    for uat in [
        None,
        Some("0"),
        Some(""),
        Some("abc"),
        Some("12abc"),
        Some("-5"),
        Some("+5"),
        Some("1.5"),
        Some("99999999999999999999999"),
    ] {
        assert_eq!(
            call(&layer, &inner, cookie_request(&t, uat, &[])).await,
            no_uat,
            "{uat:?}"
        );
    }
    assert_eq!(
        call(&layer, &inner, cookie_request(&t, Some(&after), &[])).await,
        refused(Code::Unauthenticated, "SESSION_TOKEN_IAT_BEFORE_CLIENT_UAT")
    );
    assert_eq!(inner.calls(), 0);
    for uat in [before.as_str(), "\"1\"", "1"] {
        assert_eq!(
            call(&layer, &inner, cookie_request(&t, Some(uat), &[])).await,
            (Code::Ok, None),
            "{uat}"
        );
    }
    // A header token needs none of it (and wins over the cookie).
    let mut req = cookie_request("x.y.z", None, &[]);
    req.headers_mut()
        .insert("authorization", bearer(&t).parse().unwrap());
    assert_eq!(call(&layer, &inner, req).await, (Code::Ok, None));
}

/// Further than Clerk: a cookie-borne token is spent only from a page among the authorized
/// parties (its `Origin` compared canonically); hostile `Origin`s are refused.
#[tokio::test]
async fn a_cookie_token_from_a_page_outside_the_authorized_parties_is_refused() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier, policy()).authorized_parties([
        APP,
        "http://127.0.0.1:5173",
        "not an origin",
    ]);
    assert_eq!(
        layer.authorized_origins(),
        [APP, "http://127.0.0.1:5173"],
        "canonical origins only"
    );
    let inner = Inner::default();
    let t = session_from(Some(APP));
    let uat = Some("1");
    let ok = (Code::Ok, None);
    let not_authorized = refused(Code::Unauthenticated, "ORIGIN_NOT_AUTHORIZED");
    let invalid = refused(Code::Unauthenticated, "ORIGIN_INVALID");
    type Headers<'a> = &'a [(&'a str, &'a [u8])];
    let cases: &[(Headers<'_>, &(Code, Option<String>))] = &[
        (&[("origin", b"https://app.example.com")], &ok),
        (&[("origin", b"HTTPS://App.Example.COM:443")], &ok),
        (&[("origin", b"https://app.example.com.")], &ok),
        // Another party's page: the `Origin` passes, the token's `azp` is checked as well.
        (&[("origin", b"http://127.0.0.1:5173")], &ok),
        (&[("origin", b"https://evil.example")], &not_authorized),
        (
            &[("origin", b"https://app.example.com:8443")],
            &not_authorized,
        ),
        (&[("origin", b"http://app.example.com")], &not_authorized),
        (
            &[("origin", b"https://app.example.com.evil.example")],
            &not_authorized,
        ),
        (&[("origin", b"null")], &invalid),
        (&[("origin", b"https://app.example.com/")], &invalid),
        (
            &[("origin", b"https://evil.example@app.example.com")],
            &invalid,
        ),
        (&[("origin", b"https://app.example.com\xc2\xa0")], &invalid),
        (
            &[("origin", b"https://app\xef\xbc\x8eexample.com")],
            &invalid,
        ),
        (
            &[("origin", b"https://app.example.com, https://evil.example")],
            &invalid,
        ),
        (
            &[
                ("origin", b"https://app.example.com"),
                ("origin", b"https://app.example.com"),
            ],
            &invalid,
        ),
        (
            &[
                ("origin", b"https://app.example.com"),
                ("origin", b"https://evil.example"),
            ],
            &invalid,
        ),
        // No Origin: a browser says where the request came from, anything else is not one.
        (&[], &ok),
        (&[("sec-fetch-site", b"same-origin")], &ok),
        // A sibling subdomain's page: another page's request.
        (&[("sec-fetch-site", b"same-site")], &not_authorized),
        (&[("sec-fetch-site", b"none")], &ok),
        (&[("sec-fetch-site", b"cross-site")], &not_authorized),
        (&[("sec-fetch-site", b"Cross-Site")], &not_authorized),
        (
            &[
                ("sec-fetch-site", b"same-origin"),
                ("sec-fetch-site", b"same-origin"),
            ],
            &not_authorized,
        ),
    ];
    for (headers, want) in cases {
        assert_eq!(
            &call(&layer, &inner, cookie_request(&t, uat, headers)).await,
            *want,
            "{headers:?}"
        );
    }
    // A token minted for another page fails the azp check even from an authorized Origin.
    let foreign = session_from(Some("https://evil.example"));
    assert_eq!(
        call(
            &layer,
            &inner,
            cookie_request(&foreign, uat, &[("origin", b"https://app.example.com")])
        )
        .await,
        refused(Code::Unauthenticated, "TOKEN_INVALID_AUTHORIZED_PARTIES")
    );
    // A header token is not subject to the Origin: no browser attaches it on its own.
    let mut req = request(LIST, &[("authorization", &bearer(&t))]);
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    assert_eq!(call(&layer, &inner, req).await, ok);
}

/// With no authorized parties, a cookie-borne token's `Origin` must be its own `azp`.
#[tokio::test]
async fn without_authorized_parties_the_origin_must_be_the_tokens_azp() {
    let (verifier, _keys) = TestKey::get().verifier();
    let layer = AuthLayer::in_process(verifier, policy());
    assert!(layer.authorized_origins().is_empty());
    let inner = Inner::default();
    let uat = Some("1");
    let app = session_from(Some(APP));
    let app_loose = session_from(Some("HTTPS://APP.EXAMPLE.COM:443"));
    let none = session_from(None);
    let origin: &[(&str, &[u8])] = &[("origin", b"https://app.example.com")];
    let evil: &[(&str, &[u8])] = &[("origin", b"https://evil.example")];
    let not_authorized = refused(Code::Unauthenticated, "ORIGIN_NOT_AUTHORIZED");
    assert_eq!(
        call(&layer, &inner, cookie_request(&app, uat, origin)).await,
        (Code::Ok, None)
    );
    assert_eq!(
        call(&layer, &inner, cookie_request(&app_loose, uat, origin)).await,
        (Code::Ok, None)
    );
    assert_eq!(
        call(&layer, &inner, cookie_request(&app, uat, evil)).await,
        not_authorized
    );
    assert_eq!(
        call(&layer, &inner, cookie_request(&none, uat, origin)).await,
        not_authorized
    );
    assert_eq!(
        call(&layer, &inner, cookie_request(&none, uat, &[])).await,
        (Code::Ok, None)
    );
}

/// The verifier's `CLERK_AUTHORIZED_PARTIES` are the layer's by default; the interceptor
/// applies the same cookie rules.
#[tokio::test]
async fn the_verifiers_authorized_parties_are_the_default_and_the_interceptor_checks_cookies_too() {
    let key = TestKey::get();
    let env = std::collections::HashMap::from([
        ("CLERK_JWT_KEY", key.pem.clone()),
        (
            "CLERK_AUTHORIZED_PARTIES",
            format!("{APP},http://LOCALHOST:80"),
        ),
    ]);
    let settings = crate::VerifierSettings::from_lookup(|k| env.get(k).cloned()).expect("settings");
    let (verifier, _keys) = TokenVerifier::start(settings).expect("verifier");
    let layer = AuthLayer::in_process(verifier.clone(), policy());
    assert_eq!(layer.authorized_party_list(), [APP, "http://LOCALHOST:80"]);
    assert_eq!(layer.authorized_origins(), [APP, "http://localhost"]);
    let inner = Inner::default();
    let t = session_from(Some(APP));
    let evil: &[(&str, &[u8])] = &[("origin", b"https://evil.example")];
    assert_eq!(
        call(&layer, &inner, cookie_request(&t, Some("1"), evil)).await,
        refused(Code::Unauthenticated, "ORIGIN_NOT_AUTHORIZED")
    );

    use tonic::service::Interceptor;
    let mut interceptor = AuthInterceptor::new(verifier, Rule::authenticated());
    let grpc = |req: http::Request<tonic::body::Body>| tonic::Request::from_http(req.map(|_| ()));
    let reason = |r: Result<tonic::Request<()>, Status>| {
        r.map(|_| ())
            .map_err(|s| s.get_error_details().error_info().unwrap().reason.clone())
    };
    assert_eq!(
        reason(interceptor.call(grpc(cookie_request(&t, Some("1"), evil)))),
        Err("ORIGIN_NOT_AUTHORIZED".into())
    );
    assert_eq!(
        reason(interceptor.call(grpc(cookie_request(&t, None, &[])))),
        Err("SESSION_TOKEN_BUT_NO_CLIENT_UAT".into())
    );
    let app: &[(&str, &[u8])] = &[("origin", b"https://app.example.com")];
    assert_eq!(
        reason(interceptor.call(grpc(cookie_request(&t, Some("1"), app)))),
        Ok(())
    );
}
