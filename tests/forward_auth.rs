//! HTTP forward auth (`/auth` on the HTTP port) on the real server against the emulator, over
//! real HTTP, with requests shaped as each proxy sends them (nginx `auth_request`,
//! ingress-nginx `auth-url`, Traefik/Caddy): the same route policy and canonical forms as
//! `Check`, and every shape an attacker controls refused or canonicalised — never a looser
//! rule, never an allow for "cannot decide".

mod common;

use std::net::SocketAddr;

use clerk_grpc_auth::{
    emulator::{Emulator, OrgSpec, TokenSpec},
    server::{
        ext_authz::{RoutePolicy, IDENTITY_HEADERS},
        forward_auth::{ForwardAuthConfig, ForwardedHeaders},
        ServerError,
    },
};
use tokio::{sync::oneshot, task::JoinHandle};

const ROUTES: &str = r#"
[default]
access = "authenticated"

[[routes]]
path_prefix = "/public"
access = "public"

[[routes]]
path_prefix = "/admin"
require = [{ role = "admin" }]

[[routes]]
path_prefix = "/orders"
methods = ["DELETE"]
require = [{ permission = "org:orders:delete" }]

[[routes]]
host = "internal.example.com"
path_prefix = "/"
access = "public"
"#;

struct Running {
    clerk: Emulator,
    http: SocketAddr,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
    _task: JoinHandle<Result<(), ServerError>>,
}

async fn start(headers: ForwardedHeaders) -> Running {
    start_with(headers, true, |_| {}).await
}

/// `ready`: wait until the keys are loaded (a failing JWKS never gets there).
async fn start_with(
    headers: ForwardedHeaders,
    ready: bool,
    before: impl FnOnce(&Emulator),
) -> Running {
    let clerk = Emulator::start_local().await.unwrap();
    before(&clerk);
    let mut config = common::config_for(&clerk);
    config.route_policy = RoutePolicy::from_toml(ROUTES, "tests/forward_auth.rs").unwrap();
    config.forward_auth = Some(ForwardAuthConfig { headers });
    let common::HttpServer { http, stop, task } = common::serve_with_http(config, ready).await;
    Running {
        clerk,
        http,
        client: reqwest::Client::new(),
        _stop: stop,
        _task: task,
    }
}

impl Running {
    fn token(&self, role: &str) -> String {
        self.clerk.mint(&TokenSpec {
            user_id: Some("user_2fwdFWDfwdFWDfwdFWDfwdFWD".into()),
            session_id: Some("sess_2fwdFWDfwdFWDfwdFWDfwdFWD".into()),
            org: Some(OrgSpec {
                id: Some("org_2fwd".into()),
                slug: Some("fwd".into()),
                role: Some(role.into()),
                permissions: vec!["org:invoices:read".into()],
            }),
            expires_in: Some(600),
            ..TokenSpec::default()
        })
    }

    /// `/auth` (any method) with exactly these headers.
    async fn ask(&self, headers: &[(&str, String)]) -> reqwest::Response {
        self.ask_at("/auth", headers).await
    }

    async fn ask_at(&self, path: &str, headers: &[(&str, String)]) -> reqwest::Response {
        let mut req = self.client.get(format!("http://{}{path}", self.http));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.send().await.unwrap()
    }
}

/// The headers Traefik and Caddy set for `GET host/target`.
fn forwarded(host: &str, target: &str, method: &str) -> Vec<(&'static str, String)> {
    vec![
        ("x-forwarded-method", method.into()),
        ("x-forwarded-host", host.into()),
        ("x-forwarded-uri", target.into()),
        ("x-forwarded-proto", "https".into()),
    ]
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

fn header<'r>(r: &'r reqwest::Response, name: &str) -> &'r str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn a_valid_token_is_allowed_with_its_identity_in_all_five_headers() {
    let s = start(ForwardedHeaders::Forwarded).await;
    let mut h = forwarded("api.example.com", "/admin/users?page=2", "GET");
    h.push(bearer(&s.token("admin")));
    let r = s.ask(&h).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-clerk-user-id"),
        "user_2fwdFWDfwdFWDfwdFWDfwdFWD"
    );
    assert_eq!(
        header(&r, "x-clerk-session-id"),
        "sess_2fwdFWDfwdFWDfwdFWDfwdFWD"
    );
    assert_eq!(header(&r, "x-clerk-org-id"), "org_2fwd");
    assert_eq!(header(&r, "x-clerk-org-role"), "org:admin");
    assert_eq!(header(&r, "x-clerk-org-permissions"), "org:invoices:read");
    // The `__session` cookie works as in `Check`.
    let mut h = forwarded("api.example.com", "/orders", "GET");
    h.push((
        "cookie",
        format!("other=1; __session={}; __client_uat=1", s.token("member")),
    ));
    let r = s.ask(&h).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-clerk-org-role"), "org:member");
    // An app cookie that is not ASCII does not refuse the request.
    let mut req = s.client.get(format!("http://{}/auth", s.http));
    for (k, v) in forwarded("api.example.com", "/orders", "GET") {
        req = req.header(k, v);
    }
    let cookie = format!(
        "theme=caf\u{e9}; __session={}; __client_uat=1",
        s.token("member")
    );
    let r = req
        .header(
            "cookie",
            reqwest::header::HeaderValue::from_bytes(cookie.as_bytes()).unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_public_route_is_allowed_with_every_identity_header_empty() {
    let s = start(ForwardedHeaders::Forwarded).await;
    let r = s
        .ask(&forwarded("api.example.com", "/public/x", "GET"))
        .await;
    assert_eq!(r.status(), 200);
    // Present and empty: nginx removes the client's copy, Caddy copies "" (no placeholder).
    for name in IDENTITY_HEADERS {
        assert_eq!(header(&r, name), "", "{name}");
    }
    // A public host, too.
    let r = s
        .ask(&forwarded("internal.example.com", "/anything", "POST"))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn refusals_are_401_403_and_never_an_allow() {
    let s = start(ForwardedHeaders::Forwarded).await;
    // No token.
    let r = s.ask(&forwarded("api.example.com", "/orders", "GET")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Bearer");
    assert!(r.headers().get("x-clerk-user-id").is_none());
    // A bad token.
    let mut h = forwarded("api.example.com", "/orders", "GET");
    h.push(bearer("abc"));
    let r = s.ask(&h).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(&r, "www-authenticate"),
        "Bearer error=\"invalid_token\""
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "TOKEN_INVALID");
    // A member on an admin route; a DELETE that needs a permission.
    let member = s.token("member");
    for (target, method) in [("/admin", "GET"), ("/orders/1", "DELETE")] {
        let mut h = forwarded("api.example.com", target, method);
        h.push(bearer(&member));
        let r = s.ask(&h).await;
        assert_eq!(r.status(), 403, "{method} {target}");
        assert!(r.headers().get("x-clerk-user-id").is_none());
    }
}

#[tokio::test]
async fn the_original_request_must_be_named_once_by_the_trusted_headers() {
    let s = start(ForwardedHeaders::Forwarded).await;
    let admin = s.token("admin");
    let full = forwarded("api.example.com", "/admin", "GET");
    // Each required header missing.
    for missing in ["x-forwarded-method", "x-forwarded-host", "x-forwarded-uri"] {
        let mut h: Vec<_> = full
            .iter()
            .filter(|(k, _)| *k != missing)
            .cloned()
            .collect();
        h.push(bearer(&admin));
        assert_eq!(s.ask(&h).await.status(), 400, "without {missing}");
    }
    // Each repeated, even with the same value.
    for repeated in ["x-forwarded-method", "x-forwarded-host", "x-forwarded-uri"] {
        let mut h = full.clone();
        let v = h.iter().find(|(k, _)| *k == repeated).unwrap().1.clone();
        h.push((repeated, v));
        h.push(bearer(&admin));
        assert_eq!(s.ask(&h).await.status(), 400, "{repeated} twice");
    }
    // The endpoint's own path and query say nothing (Caddy appends the client's query).
    let r = s
        .ask_at(
            "/auth?x-forwarded-uri=/public",
            &forwarded("api.example.com", "/admin", "GET"),
        )
        .await;
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_request_carrying_an_identity_header_of_its_own_is_refused() {
    let s = start(ForwardedHeaders::Forwarded).await;
    let admin = s.token("admin");
    for name in [
        "x-clerk-user-id",
        "X-Clerk-Org-Role",
        "x_clerk_user_id",
        "x-clerk_org-permissions",
    ] {
        let mut h = forwarded("api.example.com", "/public", "GET");
        h.push(bearer(&admin));
        h.push((name, "user_spoofed".into()));
        let r = s.ask(&h).await;
        assert_eq!(r.status(), 400, "{name}");
        assert!(r.headers().get("x-clerk-user-id").is_none(), "{name}");
    }
}

#[tokio::test]
async fn no_spelling_of_a_path_selects_a_looser_rule() {
    let s = start(ForwardedHeaders::Forwarded).await;
    let member = s.token("member");
    // Each names /admin (role admin) to some reader — nginx with `proxy_pass …/;` sends the
    // upstream the decoded, normalised path — or cannot be read one way only.
    for target in [
        "/admin",
        "/orders/../admin",
        "/orders/%2e%2e/admin",
        "/orders/%2E%2E/admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public%2F..%2Fadmin",
        "/public/..%2fadmin",
        "/public/..%5cadmin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/ADMIN",
        "/Admin/x",
        "/admin;x",
        "/public/../../admin",
        "/admin%00",
        "/admin\\x",
        "admin",
        "/admin#x",
        "/public%",
        "/public%zz",
    ] {
        let mut h = forwarded("api.example.com", target, "GET");
        h.push(bearer(&member));
        let r = s.ask(&h).await;
        let status = r.status().as_u16();
        assert!(
            status == 400 || status == 403,
            "{target}: {status} (must be refused)"
        );
    }
    // A method spelled otherwise, or overridden, cannot escape DELETE's rule either.
    for (method, extra) in [
        ("delete", None),
        ("DELETE ", None),
        ("GET", Some(("x-http-method-override", "DELETE"))),
        ("POST", Some(("x-method-override", "DELETE"))),
    ] {
        let mut h = forwarded("api.example.com", "/orders/1", method);
        h.push(bearer(&member));
        if let Some((k, v)) = extra {
            h.push((k, v.into()));
        }
        let status = s.ask(&h).await.status().as_u16();
        assert!(
            status == 400 || status == 403,
            "{method:?} {extra:?}: {status} (must be refused)"
        );
    }
    // A POST may carry `_method=DELETE` in a body no proxy shows us (a form; for Rack, one
    // without a content type; for Laravel, JSON): by default it must pass DELETE's rule too.
    for content_type in [
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json"),
        None,
    ] {
        let mut h = forwarded("api.example.com", "/orders/1", "POST");
        h.push(bearer(&member));
        if let Some(c) = content_type {
            h.push(("content-type", c.into()));
        }
        let r = s.ask(&h).await;
        assert_eq!(r.status(), 403, "{content_type:?}");
    }
    // Nor a host: a forwarded host naming the public host (or spelled otherwise) is refused.
    for host in [
        "INTERNAL.example.com",
        "internal.example.com.",
        "internal.example.com:443",
    ] {
        let status = s
            .ask(&forwarded(host, "/admin", "GET"))
            .await
            .status()
            .as_u16();
        assert!(
            status == 400 || status == 401,
            "{host}: {status} (must be refused)"
        );
    }
}

#[tokio::test]
async fn nginx_headers_are_read_and_a_client_forwarded_host_cannot_pick_a_rule() {
    let s = start(ForwardedHeaders::Nginx).await;
    let admin = s.token("admin");
    let nginx = |target: &str| -> Vec<(&'static str, String)> {
        vec![
            ("x-original-method", "GET".into()),
            ("x-original-host", "api.example.com".into()),
            ("x-original-uri", target.into()),
        ]
    };
    let mut h = nginx("/admin/x?y=1");
    h.push(bearer(&admin));
    let r = s.ask(&h).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-clerk-org-role"), "org:admin");
    // X-Forwarded-* are the client's own behind nginx: never the original request.
    let h = forwarded("internal.example.com", "/public", "GET");
    assert_eq!(s.ask(&h).await.status(), 400, "nginx headers are required");
    // A client's X-Forwarded-Host naming the public host, where it would select a looser
    // rule than the original host's, is refused outright (`HOST_INVALID`), as in `Check`.
    let mut h = nginx("/orders");
    h.push(("x-forwarded-host", "internal.example.com".into()));
    let r = s.ask(&h).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "HOST_INVALID");
}

#[tokio::test]
async fn ingress_nginx_original_urls_are_split_without_normalising() {
    let s = start(ForwardedHeaders::IngressNginx).await;
    let admin = s.token("admin");
    let member = s.token("member");
    // `X-Original-Host` (`$host`, through the auth-proxy-set-headers ConfigMap) is the host
    // nginx routed by; the URL's host is the client's `Host` header.
    let ingress = |url: &str| -> Vec<(&'static str, String)> {
        vec![
            ("x-original-method", "GET".into()),
            ("x-original-host", "api.example.com".into()),
            ("x-original-url", url.into()),
        ]
    };
    let mut h = ingress("https://api.example.com/admin?x=1");
    h.push(bearer(&admin));
    assert_eq!(s.ask(&h).await.status(), 200);
    for url in [
        "https://api.example.com/public/../admin",
        "https://api.example.com/public/%2e%2e/admin",
        "https://api.example.com//admin",
    ] {
        let mut h = ingress(url);
        h.push(bearer(&member));
        let status = s.ask(&h).await.status().as_u16();
        assert!(status == 400 || status == 403, "{url}: {status}");
    }
    for url in [
        "/admin",
        "api.example.com/admin",
        "ftp://api.example.com/admin",
        "https://user@internal.example.com/admin",
        "https://api.example.com",
        // `GET http://api.example.com/orders/1` with `Host: internal.example.com`: nginx routes
        // by the request line, the URL carries the Host header (the public host).
        "http://internal.example.com/orders/1",
        "https://API.example.com.evil/admin",
    ] {
        let mut h = ingress(url);
        h.push(bearer(&admin));
        assert_eq!(s.ask(&h).await.status(), 400, "{url}");
    }
}

#[tokio::test]
async fn without_keys_it_cannot_decide_and_refuses() {
    let s = start_with(ForwardedHeaders::Forwarded, false, |clerk| {
        clerk.set_jwks_failure(Some(503));
    })
    .await;
    let mut h = forwarded("api.example.com", "/orders", "GET");
    h.push(bearer(&s.token("admin")));
    let r = s.ask(&h).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("x-clerk-user-id").is_none());
}

/// Every decision is counted under `method="ForwardAuth"`, as `Check`'s are under its name.
#[tokio::test]
async fn decisions_are_counted_as_forward_auth() {
    let s = start(ForwardedHeaders::Forwarded).await;
    let mut h = forwarded("api.example.com", "/x", "GET");
    h.push(bearer(&s.token("member")));
    assert_eq!(s.ask(&h).await.status(), 200);
    assert_eq!(s.ask(&h).await.status(), 200);
    let r = s.ask(&forwarded("api.example.com", "/x", "GET")).await;
    assert_eq!(r.status(), 401);
    let r = s
        .ask(&forwarded("api.example.com", "/public/../admin", "GET"))
        .await;
    assert_eq!(r.status(), 400);
    let text = s
        .client
        .get(format!("http://{}/metrics", s.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |labels: &str| -> Option<f64> {
        let needle = format!("clerk_auth_decisions_total{{method=\"ForwardAuth\",{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(needle.as_str()))
            .map(|v| v.parse().unwrap())
    };
    assert_eq!(
        value(r#"outcome="allowed",reason="OK""#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(r#"outcome="unauthenticated",reason="TOKEN_MISSING""#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(r#"outcome="invalid",reason="PATH_NOT_CANONICAL""#),
        Some(1.0),
        "{text}"
    );
}

/// A token from the `__session` cookie needs what the layer asks of one (Clerk's
/// `__client_uat` rules, and our `Origin` checks): a page on another site cannot spend the
/// cookie, while a link from another site to the app (a top-level GET) is an ordinary visit,
/// and a token in `Authorization` is not a cookie.
#[tokio::test]
async fn cookie_tokens_need_a_client_uat_and_an_authorized_origin() {
    let s = start(ForwardedHeaders::Forwarded).await;
    let token = s.clerk.mint(&TokenSpec {
        user_id: Some("user_2fwdFWDfwdFWDfwdFWDfwdFWD".into()),
        azp: Some("https://app.example.com".into()),
        expires_in: Some(600),
        ..TokenSpec::default()
    });
    let iat = {
        let payload = token.split('.').nth(1).unwrap();
        let bytes =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["iat"]
            .as_i64()
            .unwrap()
    };
    let s = &s;
    let ask = |method: &'static str, extra: Vec<(&'static str, String)>| {
        let mut h = forwarded("api.example.com", "/x", method);
        h.extend(extra);
        async move { s.ask(&h).await }
    };
    let with_uat = |uat: i64| ("cookie", format!("__session={token}; __client_uat={uat}"));
    let reason = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let ok = (200, String::new());
    let refused = |why: &str| (401, why.to_owned());

    // Clerk's rules: __client_uat must be there, non-zero, and not after the token's iat.
    assert_eq!(
        reason(ask("GET", vec![("cookie", format!("__session={token}"))]).await).await,
        refused("SESSION_TOKEN_BUT_NO_CLIENT_UAT")
    );
    assert_eq!(
        reason(ask("GET", vec![with_uat(0)]).await).await,
        refused("SESSION_TOKEN_BUT_NO_CLIENT_UAT")
    );
    assert_eq!(
        reason(ask("GET", vec![with_uat(iat + 60)]).await).await,
        refused("SESSION_TOKEN_IAT_BEFORE_CLIENT_UAT")
    );
    assert_eq!(ask("GET", vec![with_uat(iat)]).await.status(), 200);

    // Origins: the token's own azp (no authorized parties configured), nothing else.
    let origin = |o: &str| ("origin", o.to_owned());
    for (method, extra, want) in [
        ("POST", vec![origin("https://app.example.com")], ok.clone()),
        (
            "POST",
            vec![origin("HTTPS://App.Example.com:443")],
            ok.clone(),
        ),
        (
            "POST",
            vec![origin("https://evil.example")],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        (
            "GET",
            vec![origin("https://app.example.com.evil.example")],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        ("POST", vec![origin("null")], refused("ORIGIN_INVALID")),
        (
            "POST",
            vec![origin("https://app.example.com/")],
            refused("ORIGIN_INVALID"),
        ),
        (
            "POST",
            vec![
                origin("https://app.example.com"),
                origin("https://evil.example"),
            ],
            refused("ORIGIN_INVALID"),
        ),
        // Without an Origin: a cross-site request is refused, but a page visit.
        (
            "POST",
            vec![("sec-fetch-site", "cross-site".into())],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        (
            "GET",
            vec![("sec-fetch-site", "cross-site".into())],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        (
            "GET",
            vec![
                ("sec-fetch-site", "cross-site".into()),
                ("sec-fetch-mode", "navigate".into()),
                ("sec-fetch-dest", "document".into()),
            ],
            ok.clone(),
        ),
        (
            "GET",
            vec![
                ("sec-fetch-site", "same-site".into()),
                ("sec-fetch-mode", "navigate".into()),
                ("sec-fetch-dest", "document".into()),
            ],
            ok.clone(),
        ),
        (
            "POST",
            vec![
                ("sec-fetch-site", "cross-site".into()),
                ("sec-fetch-mode", "navigate".into()),
                ("sec-fetch-dest", "document".into()),
            ],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        // Frames and embeds navigate too, but are not page loads; a sibling subdomain's
        // image or script is another page's request.
        (
            "GET",
            vec![
                ("sec-fetch-site", "cross-site".into()),
                ("sec-fetch-mode", "navigate".into()),
                ("sec-fetch-dest", "iframe".into()),
            ],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        (
            "GET",
            vec![
                ("sec-fetch-site", "cross-site".into()),
                ("sec-fetch-mode", "navigate".into()),
                ("sec-fetch-dest", "embed".into()),
            ],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        (
            "GET",
            vec![
                ("sec-fetch-site", "cross-site".into()),
                ("sec-fetch-mode", "navigate".into()),
            ],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        (
            "GET",
            vec![
                ("sec-fetch-site", "same-site".into()),
                ("sec-fetch-mode", "no-cors".into()),
                ("sec-fetch-dest", "image".into()),
            ],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        (
            "GET",
            vec![("sec-fetch-site", "same-site".into())],
            refused("ORIGIN_NOT_AUTHORIZED"),
        ),
        (
            "POST",
            vec![("sec-fetch-site", "same-origin".into())],
            ok.clone(),
        ),
    ] {
        let mut extra = extra;
        extra.push(with_uat(iat));
        let what = format!("{method} {extra:?}");
        assert_eq!(reason(ask(method, extra).await).await, want, "{what}");
    }
    // A page load naming a method override is not a page load.
    let mut h = forwarded("api.example.com", "/x?_method=DELETE", "GET");
    h.extend([
        ("sec-fetch-site", "cross-site".to_owned()),
        ("sec-fetch-mode", "navigate".to_owned()),
        ("sec-fetch-dest", "document".to_owned()),
        with_uat(iat),
    ]);
    assert_eq!(
        reason(s.ask(&h).await).await,
        refused("ORIGIN_NOT_AUTHORIZED")
    );
    // The same token in Authorization is no cookie: no Origin or __client_uat rules.
    let r = ask("POST", vec![bearer(&token), origin("https://evil.example")]).await;
    assert_eq!(r.status(), 200);
}
