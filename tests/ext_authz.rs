//! Envoy's `Authorization/Check` on the real server, with requests shaped as Envoy sends them
//! (attributes.request.http: method, path, host, lower-case headers), against the emulator.

mod common;

use std::collections::HashMap;

use clerk_grpc_auth::{
    emulator::{OrgSpec, TokenSpec},
    server::ext_authz::{identity_header_spellings, RoutePolicy, IDENTITY_HEADERS},
};
use common::Harness;
use envoy_types::pb::envoy::{
    config::core::v3::{address, socket_address, Address, SocketAddress},
    service::auth::v3::{
        attribute_context::{HttpRequest, Peer, Request as AttrRequest},
        authorization_client::AuthorizationClient,
        check_response::HttpResponse,
        AttributeContext, CheckRequest, CheckResponse,
    },
};
use tonic::transport::Channel;

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

/// The issue's policy: everything public except `/admin` (role admin), the whole
/// `ops.example.com` host (role admin) and `DELETE /orders` (a permission).
const OPEN_ROUTES: &str = r#"
[default]
access = "public"

[[routes]]
path_prefix = "/admin"
require = [{ role = "admin" }]

[[routes]]
host = "ops.example.com"
path_prefix = "/"
require = [{ role = "admin" }]

[[routes]]
path_prefix = "/orders"
methods = ["DELETE"]
require = [{ permission = "org:orders:delete" }]
"#;

async fn start() -> (Harness, AuthorizationClient<Channel>) {
    start_with_routes(ROUTES).await
}

async fn start_with_routes(routes: &'static str) -> (Harness, AuthorizationClient<Channel>) {
    let h = Harness::start_with(|_, config| {
        config.route_policy = RoutePolicy::from_toml(routes, "tests/ext_authz.rs").unwrap();
    })
    .await;
    let channel = Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (h, AuthorizationClient::new(channel))
}

fn envoy_request(method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let mut map: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    map.insert(":method".into(), method.into());
    map.insert(":path".into(), path.into());
    map.insert(":authority".into(), host.into());
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "203.0.113.9".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(51234)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "req-1".into(),
                    method: method.into(),
                    headers: map,
                    path: path.into(),
                    host: host.into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check(c: &AuthorizationClient<Channel>, req: CheckRequest) -> CheckResponse {
    c.clone().check(req).await.unwrap().into_inner()
}

/// (code, headers set, headers removed) of an allowed response.
fn ok_parts(r: &CheckResponse) -> (HashMap<String, String>, Vec<String>) {
    assert_eq!(r.status.as_ref().unwrap().code, 0, "expected OK: {r:?}");
    match r.http_response.as_ref().unwrap() {
        HttpResponse::OkResponse(ok) => (
            ok.headers
                .iter()
                .map(|h| {
                    let h = h.header.as_ref().unwrap();
                    (h.key.clone(), h.value.clone())
                })
                .collect(),
            ok.headers_to_remove.clone(),
        ),
        other => panic!("expected an OK response, got {other:?}"),
    }
}

/// (grpc code, http status, headers, body) of a denial.
fn denied_parts(r: &CheckResponse) -> (i32, i32, HashMap<String, String>, String) {
    let code = r.status.as_ref().unwrap().code;
    assert_ne!(code, 0, "expected a denial");
    match r.http_response.as_ref().unwrap() {
        HttpResponse::DeniedResponse(d) => (
            code,
            d.status.as_ref().unwrap().code,
            d.headers
                .iter()
                .map(|h| {
                    let h = h.header.as_ref().unwrap();
                    (h.key.clone(), h.value.clone())
                })
                .collect(),
            d.body.clone(),
        ),
        other => panic!("expected a denial, got {other:?}"),
    }
}

fn admin_token(h: &Harness, role: &str, permissions: &[&str]) -> String {
    h.mint(&TokenSpec {
        user_id: Some("user_envoy".into()),
        session_id: Some("sess_envoy".into()),
        org: Some(OrgSpec {
            id: Some("org_envoy".into()),
            role: Some(role.into()),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
            ..OrgSpec::default()
        }),
        expires_in: Some(600),
        ..TokenSpec::default()
    })
}

#[tokio::test]
async fn allow_sets_identity_headers_and_strips_spoofed_ones() {
    let (h, c) = start().await;
    let token = admin_token(&h, "admin", &["org:orders:read", "org:orders:delete"]);
    let bearer = format!("Bearer {token}");
    let r = check(
        &c,
        envoy_request(
            "GET",
            "api.example.com",
            "/orders?page=2",
            &[
                ("authorization", &bearer),
                ("x-clerk-user-id", "user_spoofed"),
                ("x-clerk-org-role", "org:owner"),
            ],
        ),
    )
    .await;
    let (set, _) = ok_parts(&r);
    assert_eq!(set["x-clerk-user-id"], "user_envoy");
    assert_eq!(set["x-clerk-session-id"], "sess_envoy");
    assert_eq!(set["x-clerk-org-id"], "org_envoy");
    assert_eq!(set["x-clerk-org-role"], "org:admin");
    assert_eq!(
        set["x-clerk-org-permissions"],
        "org:orders:read,org:orders:delete"
    );
    // Every identity header is set (overwriting the client's) or removed.
    let md = r.dynamic_metadata.as_ref().unwrap();
    assert!(md.fields.contains_key("user_id") && md.fields.contains_key("org_role"));

    // A user without an organization: org headers the client sent are removed.
    let plain = h.mint(&TokenSpec {
        user_id: Some("user_plain".into()),
        expires_in: Some(600),
        ..TokenSpec::default()
    });
    let r = check(
        &c,
        envoy_request(
            "GET",
            "api.example.com",
            "/orders",
            &[
                ("authorization", &format!("Bearer {plain}")),
                ("x-clerk-org-id", "org_spoofed"),
            ],
        ),
    )
    .await;
    let (set, removed) = ok_parts(&r);
    assert_eq!(set["x-clerk-user-id"], "user_plain");
    for name in [
        "x-clerk-org-id",
        "x-clerk-org-role",
        "x-clerk-org-permissions",
    ] {
        assert!(
            removed.iter().any(|r| r == name),
            "{name} not removed: {removed:?}"
        );
        assert!(!set.contains_key(name));
    }
    // Public routes strip all of them too.
    let r = check(
        &c,
        envoy_request(
            "GET",
            "api.example.com",
            "/public/x",
            &[("x-clerk-user-id", "user_spoofed")],
        ),
    )
    .await;
    let (set, removed) = ok_parts(&r);
    assert!(set.is_empty());
    for name in IDENTITY_HEADERS
        .iter()
        .map(|h| (*h).to_owned())
        .chain(identity_header_spellings().iter().cloned())
    {
        assert!(removed.contains(&name), "{name} not removed: {removed:?}");
    }
}

/// CGI/WSGI upstreams read `x_clerk_user_id` (any mix of `-` and `_`) as `x-clerk-user-id`:
/// every such spelling the client sent is removed, on authenticated and public routes.
#[tokio::test]
async fn underscore_spellings_of_identity_headers_are_removed() {
    let (h, c) = start().await;
    let spellings = identity_header_spellings();
    for name in [
        "x_clerk_user_id",
        "x_clerk_session_id",
        "x_clerk_org_id",
        "x_clerk_org_role",
        "x_clerk_org_permissions",
        "x-clerk_user-id",
        "x_clerk-org-role",
    ] {
        assert!(spellings.iter().any(|s| s == name), "{name}");
    }
    assert!(!spellings
        .iter()
        .any(|s| IDENTITY_HEADERS.contains(&s.as_str())));
    let token = admin_token(&h, "admin", &[]);
    let bearer = format!("Bearer {token}");
    for (path, auth) in [("/orders", Some(bearer.as_str())), ("/public/x", None)] {
        let mut headers = vec![
            ("x_clerk_user_id", "user_spoofed"),
            ("x_clerk_org_role", "org:owner"),
        ];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let r = check(&c, envoy_request("GET", "api.example.com", path, &headers)).await;
        let (set, removed) = ok_parts(&r);
        for name in spellings {
            assert!(removed.contains(name), "{path}: {name} not removed");
            assert!(!set.contains_key(name));
        }
        if auth.is_some() {
            assert_eq!(set["x-clerk-user-id"], "user_envoy");
        }
    }
}

/// The escapes found by the review, end to end against the server with `default = public`:
/// each is refused (400 with its reason) or gets the protected rule (401 without a token);
/// none is ever allowed without a token, and none is allowed by an ordinary token either.
#[tokio::test]
async fn non_canonical_targets_never_escape_a_protected_route() {
    let (h, c) = start_with_routes(OPEN_ROUTES).await;
    const API: &str = "api.example.com";
    let refused = |reason: &'static str| Err::<(), _>(reason);
    let protected = Ok::<(), &str>(());
    let cases: &[(&str, &str, &str, Result<(), &str>)] = &[
        // the issue's bypasses
        ("GET", API, "/Admin/users", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "//admin/users", refused("PATH_NOT_CANONICAL")),
        (
            "GET",
            API,
            "/x/../admin/users",
            refused("PATH_NOT_CANONICAL"),
        ),
        ("GET", API, "/%61dmin/users", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "/admin;x/users", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "/admin%2Fusers", refused("PATH_NOT_CANONICAL")),
        ("GET", "ops.example.com.", "/x", protected),
        ("GET", "ops.example.com:abc", "/x", refused("HOST_INVALID")),
        // more of the same family
        ("GET", API, "/ADMIN", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "/%2e%2e/admin", refused("PATH_NOT_CANONICAL")),
        (
            "GET",
            API,
            "/public/../admin",
            refused("PATH_NOT_CANONICAL"),
        ),
        (
            "GET",
            API,
            "/admin/%2E%2E/public",
            refused("PATH_NOT_CANONICAL"),
        ),
        ("GET", API, "/admin%5Cusers", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "/admin\\users", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "/admin%00", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "/admin%zz", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "/admin#/public", refused("PATH_NOT_CANONICAL")),
        (
            "GET",
            API,
            "/%c0%ae%c0%ae/admin",
            refused("PATH_NOT_CANONICAL"),
        ),
        (
            "GET",
            API,
            "http://api.example.com/admin",
            refused("PATH_NOT_CANONICAL"),
        ),
        ("GET", API, "*", refused("PATH_NOT_CANONICAL")),
        ("GET", API, "/admin/./users", protected),
        ("GET", API, "/admin?x=/public", protected),
        ("GET", "OPS.EXAMPLE.COM:8443", "/x", protected),
        ("GET", "a@ops.example.com", "/x", refused("HOST_INVALID")),
        ("GET", "ops..example.com", "/x", refused("HOST_INVALID")),
        ("DELETE", API, "/orders/1", protected),
        ("delete", API, "/orders/1", refused("METHOD_INVALID")),
        (" DELETE", API, "/orders/1", refused("METHOD_INVALID")),
        ("DELETE", API, "/Orders/1", refused("PATH_NOT_CANONICAL")),
    ];
    let member = admin_token(&h, "member", &[]);
    let member = format!("Bearer {member}");
    for (method, host, path, want) in cases {
        let what = format!("{method:?} {host:?} {path:?}");
        let r = check(&c, envoy_request(method, host, path, &[])).await;
        let (code, http, _, body) = denied_parts(&r);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        match want {
            Ok(()) => {
                assert_eq!((code, http), (16, 401), "{what}");
                assert_eq!(body["error"], "TOKEN_MISSING", "{what}");
            }
            Err(reason) => {
                assert_eq!((code, http), (3, 400), "{what}: {body}");
                assert_eq!(body["error"], *reason, "{what}");
            }
        }
        // A valid token without the role is not enough either.
        let r = check(
            &c,
            envoy_request(method, host, path, &[("authorization", &member)]),
        )
        .await;
        let (_, http, _, _) = denied_parts(&r);
        assert!(http == 400 || http == 403, "{what}: {http}");
    }

    // A gRPC request with a non-canonical path gets a gRPC-shaped INVALID_ARGUMENT.
    let r = check(
        &c,
        envoy_request(
            "POST",
            API,
            "/Admin/examples.orders.v1.Orders/DeleteOrder",
            &[("content-type", "application/grpc")],
        ),
    )
    .await;
    let (code, http, headers, _) = denied_parts(&r);
    assert_eq!((code, http), (3, 200));
    assert_eq!(headers["grpc-status"], "3");

    // No over-refusal: ordinary paths pass, and the admin reaches /admin and the ops host.
    for path in [
        "/",
        "/public/a-b_c.~d",
        "/administrator",
        "/orders/1",
        "/a%20b",
    ] {
        let r = check(&c, envoy_request("GET", API, path, &[])).await;
        ok_parts(&r);
    }
    let admin = format!("Bearer {}", admin_token(&h, "admin", &[]));
    for (host, path) in [
        (API, "/admin/users"),
        (API, "/admin/"),
        ("ops.example.com.", "/x"),
        ("ops.example.com:8443", "/admin"),
    ] {
        let r = check(
            &c,
            envoy_request("GET", host, path, &[("authorization", &admin)]),
        )
        .await;
        assert_eq!(
            ok_parts(&r).0["x-clerk-user-id"],
            "user_envoy",
            "{host} {path}"
        );
    }
}

#[tokio::test]
async fn denials_are_http_shaped_or_grpc_shaped() {
    let (h, c) = start().await;

    // Missing token: 401, a bare Bearer challenge, a JSON body with the reason.
    let r = check(&c, envoy_request("GET", "api.example.com", "/orders", &[])).await;
    let (code, http, headers, body) = denied_parts(&r);
    assert_eq!((code, http), (16, 401));
    assert_eq!(headers["www-authenticate"], "Bearer");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "TOKEN_MISSING");

    // Expired token: invalid_token challenge.
    let expired = h.mint(&TokenSpec {
        expires_in: Some(-60),
        ..TokenSpec::default()
    });
    let r = check(
        &c,
        envoy_request(
            "GET",
            "api.example.com",
            "/orders",
            &[("authorization", &format!("Bearer {expired}"))],
        ),
    )
    .await;
    let (_, http, headers, body) = denied_parts(&r);
    assert_eq!(http, 401);
    assert_eq!(
        headers["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    assert!(body.contains("TOKEN_EXPIRED"));
    assert!(!body.contains(&expired), "the body never echoes the token");

    // Policy: a member on /admin is 403, no challenge.
    let member = admin_token(&h, "member", &[]);
    let r = check(
        &c,
        envoy_request(
            "GET",
            "api.example.com",
            "/admin/users",
            &[("authorization", &format!("Bearer {member}"))],
        ),
    )
    .await;
    let (code, http, headers, body) = denied_parts(&r);
    assert_eq!((code, http), (7, 403));
    assert!(!headers.contains_key("www-authenticate"));
    assert!(body.contains("ORG_ROLE_REQUIRED"));

    // A gRPC request through Envoy gets a gRPC-shaped denial.
    let r = check(
        &c,
        envoy_request(
            "POST",
            "api.example.com",
            "/examples.orders.v1.Orders/ListOrders",
            &[("content-type", "application/grpc+proto")],
        ),
    )
    .await;
    let (code, http, headers, _) = denied_parts(&r);
    assert_eq!((code, http), (16, 200));
    assert_eq!(headers["grpc-status"], "16");
    assert_eq!(headers["content-type"], "application/grpc");
    assert!(headers.contains_key("grpc-message"));
}

#[tokio::test]
async fn cookie_tokens_and_routes_by_path_method_and_host() {
    let (h, c) = start().await;
    let member = admin_token(&h, "member", &["org:orders:read"]);
    let deleter = admin_token(&h, "member", &["org:orders:delete"]);
    let cookie = format!("theme=dark; __session={member}; __client_uat=1");

    // Browser request with the __session cookie.
    let r = check(
        &c,
        envoy_request("GET", "api.example.com", "/orders", &[("cookie", &cookie)]),
    )
    .await;
    assert_eq!(ok_parts(&r).0["x-clerk-user-id"], "user_envoy");

    // Method-specific route: GET /orders is fine for a member, DELETE needs the permission.
    let bearer = |t: &str| format!("Bearer {t}");
    let r = check(
        &c,
        envoy_request(
            "DELETE",
            "api.example.com",
            "/orders/17",
            &[("authorization", &bearer(&member))],
        ),
    )
    .await;
    assert_eq!(denied_parts(&r).1, 403);
    let r = check(
        &c,
        envoy_request(
            "DELETE",
            "api.example.com",
            "/orders/17",
            &[("authorization", &bearer(&deleter))],
        ),
    )
    .await;
    ok_parts(&r);

    // Whole path segments: /administrator is not under /admin (default rule: authenticated).
    let r = check(
        &c,
        envoy_request(
            "GET",
            "api.example.com",
            "/administrator",
            &[("authorization", &bearer(&member))],
        ),
    )
    .await;
    ok_parts(&r);
    let r = check(
        &c,
        envoy_request(
            "GET",
            "api.example.com",
            "/admin",
            &[("authorization", &bearer(&member))],
        ),
    )
    .await;
    assert_eq!(denied_parts(&r).1, 403);

    // Host-specific route (port ignored): public on the internal host only.
    let r = check(
        &c,
        envoy_request("GET", "internal.example.com:8443", "/orders", &[]),
    )
    .await;
    ok_parts(&r);
    let r = check(&c, envoy_request("GET", "api.example.com", "/orders", &[])).await;
    assert_eq!(denied_parts(&r).1, 401);

    // A malformed Authorization header is refused, never a panic.
    let r = check(
        &c,
        envoy_request(
            "GET",
            "api.example.com",
            "/orders",
            &[("authorization", "Basic Zm9v")],
        ),
    )
    .await;
    let (_, http, _, body) = denied_parts(&r);
    assert_eq!(http, 401);
    assert!(body.contains("TOKEN_INVALID"));
    // A CheckRequest without HTTP attributes: 400.
    let r = check(&c, CheckRequest::default()).await;
    assert_eq!(denied_parts(&r).1, 400);
}

#[test]
fn route_policy_files_are_validated() {
    for (text, needle) in [
        ("[[routes]]\npath_prefix = \"admin\"\n", "path_prefix"),
        ("[[routes]]\npath = \"/x\"\n", "path"),
        ("[[routes]]\nrequire = [{ rol = \"admin\" }]\n", "rol"),
        (
            "[[routes]]\naccess = \"public\"\nrequire = [{ role = \"admin\" }]\n",
            "public",
        ),
        ("[default]\npeers = [\"spiffe://x/y\"]\n", "peers"),
    ] {
        let e = RoutePolicy::from_toml(text, "r.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{text:?} → {e}");
    }
    let p = RoutePolicy::from_toml(ROUTES, "r").unwrap();
    let public = |host, path| p.rule_for(host, path, "GET").unwrap().is_public();
    assert!(public("api.example.com", "/public"));
    assert!(!public("api.example.com", "/publicity"));
    assert!(public("INTERNAL.example.com", "/x"));
    assert!(public("internal.example.com.", "/x"));
}

/// The request as Envoy sends it with `encode_raw_headers`: `header_map` (repeated entries)
/// instead of `headers`.
fn raw_header_request(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    let mut req = envoy_request("GET", "api.example.com", path, &[]);
    let http = req
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap();
    http.headers.clear();
    http.header_map = Some(HeaderMap {
        headers: headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: (*k).into(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    });
    req
}

#[tokio::test]
async fn repeated_raw_headers_read_as_envoy_joins_them() {
    let (h, c) = start().await;
    let token = admin_token(&h, "member", &[]);
    let bearer = format!("Bearer {token}");
    // Two `authorization` entries, the valid one last or first: the credential is ambiguous
    // and refused either way ("last one wins" would let a front proxy and the upstream read
    // different tokens).
    for entries in [
        [
            ("authorization", "Bearer garbage"),
            ("authorization", bearer.as_str()),
        ],
        [
            ("authorization", bearer.as_str()),
            ("authorization", "Bearer garbage"),
        ],
    ] {
        let r = check(&c, raw_header_request("/orders", &entries)).await;
        let (_, http, _, _) = denied_parts(&r);
        assert_eq!(http, 401, "{entries:?}");
    }
    // One `authorization` entry: allowed.
    let r = check(
        &c,
        raw_header_request("/orders", &[("authorization", bearer.as_str())]),
    )
    .await;
    ok_parts(&r);
    // HTTP/2 cookie crumbs arrive as separate `cookie` entries: joined with "; ", the
    // session cookie in any crumb is found.
    let session = format!("__session={token}");
    let r = check(
        &c,
        raw_header_request(
            "/orders",
            &[
                ("cookie", "theme=dark; __client_uat=1"),
                ("Cookie", session.as_str()),
            ],
        ),
    )
    .await;
    let (set, _) = ok_parts(&r);
    assert_eq!(set["x-clerk-user-id"], "user_envoy");
}

// ===== escapes found by the security review of issue 12 (each failed before the fix) =====

/// (grpc code, body["error"]) of a Check answer: code 0 and "" when allowed.
fn verdict(r: &CheckResponse) -> (i32, String) {
    let code = r.status.as_ref().unwrap().code;
    if code == 0 {
        return (0, String::new());
    }
    let (_, _, _, body) = denied_parts(r);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    (code, body["error"].as_str().unwrap_or_default().to_owned())
}

/// Double encoding split over the hex digits: `%25` is followed by an *escaped* hex digit,
/// so the "`%25` starting an escape" refusal does not see it. An upstream that decodes twice
/// (a decoding proxy in front of a decoding app) reads `/%25%361dmin` → `/%61dmin` →
/// `/admin`; Check chose the rule on `/%2561dmin` and allowed with no token.
#[tokio::test]
async fn double_encoding_split_over_escaped_hex_digits_is_refused() {
    let (_h, c) = start_with_routes(OPEN_ROUTES).await;
    for path in [
        "/%25%361dmin/users",                 // %25 %36 1  → %61 → a
        "/%256%31dmin/users",                 // %25 6 %31  → %61 → a
        "/%25%36%31dmin/users",               // %25 %36 %31
        "/public/%25%32e%25%32e/admin/users", // → %2e%2e → ..
    ] {
        let r = check(&c, envoy_request("GET", "api.example.com", path, &[])).await;
        assert_eq!(
            verdict(&r),
            (3, "PATH_NOT_CANONICAL".to_owned()),
            "{path}: a double-decoding upstream reads /admin/users"
        );
    }
}

/// Method overrides: Express `method-override` (X-HTTP-Method-Override, POST only),
/// ASP.NET Core `UseHttpMethodOverride`, Rack::MethodOverride, Symfony/Laravel (`_method`,
/// header or query) run the DELETE handler for `POST /orders/1` with an override, while Check
/// chose the rule on `POST` (public under the issue's policy) and allowed with no token.
#[tokio::test]
async fn method_override_cannot_escape_a_method_specific_route() {
    let (_h, c) = start_with_routes(OPEN_ROUTES).await;
    let api = "api.example.com";
    let mut cases: Vec<(String, Vec<(&str, &str)>)> = Vec::new();
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        cases.push(("/orders/1".into(), vec![(name, "DELETE")]));
    }
    cases.push(("/orders/1?_method=DELETE".into(), vec![]));
    for (path, headers) in cases {
        let r = check(&c, envoy_request("POST", api, &path, &headers)).await;
        let (code, reason) = verdict(&r);
        assert_ne!(
            code, 0,
            "POST {path} {headers:?} is allowed without a token, an upstream honouring the override runs DELETE"
        );
        assert!(
            reason == "TOKEN_MISSING" || reason == "METHOD_INVALID",
            "{path} {headers:?}: {reason}"
        );
    }
}

const GET_ROUTES: &str = r#"
[default]
access = "public"

[[routes]]
path_prefix = "/reports"
methods = ["GET"]
require = [{ role = "admin" }]
"#;

/// `HEAD` runs the `GET` handler in Go's ServeMux (`GET /x` patterns), Express (`app.get`),
/// Flask, Rails, Spring: a route protecting `GET /reports` is escaped by `HEAD /reports/1`
/// (status, headers, Content-Length and the handler's side effects, with no token).
#[tokio::test]
async fn head_is_read_as_get_by_method_specific_routes() {
    let (_h, c) = start_with_routes(GET_ROUTES).await;
    let r = check(
        &c,
        envoy_request("GET", "api.example.com", "/reports/1", &[]),
    )
    .await;
    assert_eq!(verdict(&r).1, "TOKEN_MISSING");
    let r = check(
        &c,
        envoy_request("HEAD", "api.example.com", "/reports/1", &[]),
    )
    .await;
    let (code, reason) = verdict(&r);
    assert_ne!(code, 0, "HEAD /reports/1 is allowed with no token");
    assert!(
        reason == "TOKEN_MISSING" || reason == "METHOD_INVALID",
        "{reason}"
    );
}

/// Segment spellings some upstreams read as `/admin`: a trailing dot or space (Windows/IIS
/// path normalisation; Spring's AntPathMatcher trimming tokens, CVE-2016-5007) and a suffix
/// (Spring MVC suffix pattern matching, on by default before 5.3: `/admin.json` → `/admin`).
/// Check read a segment `admin.`, `admin%20`, `admin.json` — no `/admin` prefix — and allowed.
#[tokio::test]
async fn trailing_dot_space_or_suffix_do_not_escape_a_prefix() {
    let (_h, c) = start_with_routes(OPEN_ROUTES).await;
    for path in [
        "/admin./users",
        "/admin%2e/users",
        "/admin%20/users",
        "/admin.json",
    ] {
        let r = check(&c, envoy_request("GET", "api.example.com", path, &[])).await;
        let (code, reason) = verdict(&r);
        assert_ne!(code, 0, "{path} is allowed with no token");
        assert!(
            reason == "TOKEN_MISSING" || reason == "PATH_NOT_CANONICAL",
            "{path}: {reason}"
        );
    }
}

/// The host rule was chosen on `http.host` only, while upstreams behind a proxy read the host
/// from `x-forwarded-host` / `Forwarded: host=` (Express `trust proxy` → `req.hostname`,
/// Django `USE_X_FORWARDED_HOST`, Spring `ForwardedHeaderFilter`, Rails). Envoy passes the
/// client's copies through by default: a request to a public host naming the protected one
/// in those headers is allowed with no token.
#[tokio::test]
async fn forwarded_host_headers_cannot_select_a_looser_host_rule() {
    let (_h, c) = start_with_routes(OPEN_ROUTES).await;
    for headers in [
        vec![("x-forwarded-host", "ops.example.com")],
        vec![("forwarded", "host=ops.example.com;proto=https")],
    ] {
        let r = check(&c, envoy_request("GET", "api.example.com", "/x", &headers)).await;
        let (code, reason) = verdict(&r);
        assert_ne!(code, 0, "{headers:?}: allowed with no token");
        assert!(
            reason == "TOKEN_MISSING" || reason == "HOST_INVALID",
            "{headers:?}: {reason}"
        );
    }
}

/// What the review's fixes must not refuse: overrides and forwarded hosts that select the same
/// rule, ordinary file names, an encoded `%` that is not an escape.
#[tokio::test]
async fn agreeing_overrides_forwarded_hosts_and_file_names_pass() {
    let (_h, c) = start_with_routes(OPEN_ROUTES).await;
    for (method, path, headers) in [
        ("GET", "/x", vec![("x-forwarded-host", "api.example.com")]),
        (
            "GET",
            "/x",
            vec![("forwarded", "for=192.0.2.1;host=other.example.com")],
        ),
        ("GET", "/static/app.js", vec![]),
        ("GET", "/files/100%25.txt", vec![]),
        ("GET", "/docs/my%20file.pdf", vec![]),
    ] {
        let r = check(&c, envoy_request(method, "api.example.com", path, &headers)).await;
        assert_eq!(
            verdict(&r),
            (0, String::new()),
            "{method} {path} {headers:?}"
        );
    }
}

/// An override header that agrees with the request passes when upstreams read overrides from
/// headers only.
#[tokio::test]
async fn agreeing_override_headers_pass_when_bodies_are_not_read() {
    let routes: &'static str =
        Box::leak(format!("method_override = \"headers\"\n{OPEN_ROUTES}").into_boxed_str());
    let (_h, c) = start_with_routes(routes).await;
    for headers in [vec![], vec![("x-http-method-override", "PATCH")]] {
        let r = check(
            &c,
            envoy_request("POST", "api.example.com", "/orders/1", &headers),
        )
        .await;
        assert_eq!(verdict(&r), (0, String::new()), "{headers:?}");
    }
}

/// By default (`method_override = "body"`) a POST must pass the rule of every method its body
/// could name (`_method=DELETE` in a form Envoy never shows): `POST /orders/1` takes DELETE's
/// rule as well as its own, whatever its content type; where no route names methods, a POST
/// has its own rule only.
#[tokio::test]
async fn a_post_must_pass_every_rule_its_body_could_select() {
    let (h, c) = start_with_routes(OPEN_ROUTES).await;
    for content_type in [
        vec![],
        vec![("content-type", "application/x-www-form-urlencoded")],
        vec![("content-type", "application/json")],
    ] {
        let r = check(
            &c,
            envoy_request("POST", "api.example.com", "/orders/1", &content_type),
        )
        .await;
        assert_eq!(verdict(&r).1, "TOKEN_MISSING", "{content_type:?}");
    }
    let member = format!("Bearer {}", admin_token(&h, "member", &[]));
    let r = check(
        &c,
        envoy_request(
            "POST",
            "api.example.com",
            "/orders/1",
            &[("authorization", &member)],
        ),
    )
    .await;
    assert_eq!(
        verdict(&r).0,
        7,
        "a member may not DELETE, so may not POST here"
    );
    let deleter = format!(
        "Bearer {}",
        admin_token(&h, "member", &["org:orders:delete"])
    );
    let r = check(
        &c,
        envoy_request(
            "POST",
            "api.example.com",
            "/orders/1",
            &[("authorization", &deleter)],
        ),
    )
    .await;
    assert_eq!(verdict(&r), (0, String::new()));
    // GET is not overridden by a body; paths no method route covers keep their own rule.
    for (method, path) in [("GET", "/orders/1"), ("POST", "/x"), ("PUT", "/orders/1")] {
        let r = check(&c, envoy_request(method, "api.example.com", path, &[])).await;
        assert_eq!(verdict(&r), (0, String::new()), "{method} {path}");
    }
}

/// `Check` reads machine tokens from `authorization` only: in the `__session` cookie an M2M
/// JWT is refused on a route that takes it from the header; a session token in the cookie
/// still works beside a cookie holding non-ASCII bytes.
#[tokio::test]
async fn machine_tokens_are_never_taken_from_the_session_cookie() {
    const MACHINE_ROUTES: &str = r#"
[default]
access = "authenticated"
token_types = ["session_token", "m2m_token"]
"#;
    let (h, c) = start_with_routes(MACHINE_ROUTES).await;
    let m2m = h
        .clerk
        .mint_machine(&clerk_grpc_auth::emulator::MachineTokenSpec {
            kind: clerk_grpc_auth::emulator::MachineTokenKind::M2m,
            jwt: true,
            ..Default::default()
        });
    let get = |headers: Vec<(&'static str, String)>| {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        envoy_request("GET", "api.example.com", "/orders", &headers)
    };
    let r = check(&c, get(vec![("authorization", format!("Bearer {m2m}"))])).await;
    ok_parts(&r);
    let session = admin_token(&h, "member", &[]);
    for cookie in [
        format!("__session={m2m}; __client_uat=1"),
        format!("__session={m2m}; __session={session}; __client_uat=1"),
    ] {
        let r = check(&c, get(vec![("cookie", cookie)])).await;
        let (_, http, _, body) = denied_parts(&r);
        assert_eq!(http, 401);
        assert!(body.contains("TOKEN_TYPE_MISMATCH"), "{body}");
    }
    let r = check(
        &c,
        get(vec![(
            "cookie",
            format!("theme=café; lang=日本; __session={session}; __client_uat=1"),
        )]),
    )
    .await;
    assert_eq!(ok_parts(&r).0["x-clerk-user-id"], "user_envoy");
}

// ===== route context: Envoy's context_extensions name a rule of the policy (issue 17) =====

/// The path policy of [`ROUTES`] plus named rules an Envoy route can ask for.
const CONTEXT_ROUTES: &str = r#"
[default]
access = "authenticated"

[[routes]]
path_prefix = "/public"
access = "public"

[[routes]]
path_prefix = "/admin"
require = [{ role = "admin" }]

[rules.admin]
require = [{ role = "admin" }]

[rules.public]
access = "public"

[rules.billing]
require = [{ permission = "org:billing:manage" }]
"#;

/// As [`CONTEXT_ROUTES`], with the named rule replacing the path policy's.
const REPLACE_ROUTES: &str = r#"
context_extensions = "replace"

[default]
access = "authenticated"

[[routes]]
path_prefix = "/admin"
require = [{ role = "admin" }]

[rules.admin]
require = [{ role = "admin" }]

[rules.public]
access = "public"
"#;

/// (path, clerk_rule, authorization, expected verdict)
type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, (i32, &'a str));

/// `req` with Envoy's per-route `context_extensions`.
fn with_context(mut req: CheckRequest, pairs: &[(&str, &str)]) -> CheckRequest {
    req.attributes.as_mut().unwrap().context_extensions = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    req
}

/// By default a named rule adds to the path policy's rule: both must pass, so a route can
/// tighten the policy but never loosen it.
#[tokio::test]
async fn a_named_rule_must_pass_as_well_as_the_path_rule() {
    let (h, c) = start_with_routes(CONTEXT_ROUTES).await;
    let member = format!("Bearer {}", admin_token(&h, "member", &[]));
    let admin = format!("Bearer {}", admin_token(&h, "admin", &[]));
    let billing_admin = format!(
        "Bearer {}",
        admin_token(&h, "admin", &["org:billing:manage"])
    );
    let api = "api.example.com";
    let cases: Vec<Case<'_>> = vec![
        // No extension: the path policy alone, as before.
        ("/orders", None, Some(&member), (0, "")),
        ("/public/x", None, None, (0, "")),
        // `admin` on a path the policy lets any session (or anyone) through.
        (
            "/orders",
            Some("admin"),
            Some(&member),
            (7, "ORG_ROLE_REQUIRED"),
        ),
        ("/orders", Some("admin"), Some(&admin), (0, "")),
        ("/public/x", Some("admin"), None, (16, "TOKEN_MISSING")),
        ("/public/x", Some("admin"), Some(&admin), (0, "")),
        // `public` cannot open a path the policy protects.
        ("/orders", Some("public"), None, (16, "TOKEN_MISSING")),
        (
            "/admin/users",
            Some("public"),
            Some(&member),
            (7, "ORG_ROLE_REQUIRED"),
        ),
        ("/public/x", Some("public"), None, (0, "")),
        // Both rules' requirements: the path's role and the route's permission.
        (
            "/admin/users",
            Some("billing"),
            Some(&admin),
            (7, "ORG_PERMISSION_REQUIRED"),
        ),
        (
            "/admin/users",
            Some("billing"),
            Some(&billing_admin),
            (0, ""),
        ),
    ];
    for (path, rule, auth, want) in cases {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let mut pairs = vec![("virtual_host", "api")]; // someone else's key: ignored
        pairs.extend(rule.map(|r| ("clerk_rule", r)));
        let r = check(
            &c,
            with_context(envoy_request("GET", api, path, &headers), &pairs),
        )
        .await;
        assert_eq!(
            verdict(&r),
            (want.0, want.1.to_owned()),
            "{path} clerk_rule={rule:?} token={}",
            auth.is_some()
        );
    }
    // Allowed with a named rule: the identity headers are set as for any allow.
    let r = check(
        &c,
        with_context(
            envoy_request("GET", api, "/orders", &[("authorization", &admin)]),
            &[("clerk_rule", "admin")],
        ),
    )
    .await;
    assert_eq!(ok_parts(&r).0["x-clerk-org-role"], "org:admin");
}

/// With `context_extensions = "replace"` the named rule alone decides (a public health page
/// behind an Envoy route naming `public`), while a target that cannot be read one way only is
/// still refused and a route naming no rule keeps the path policy.
#[tokio::test]
async fn replace_lets_the_route_decide_but_still_refuses_ambiguous_targets() {
    let (h, c) = start_with_routes(REPLACE_ROUTES).await;
    let member = format!("Bearer {}", admin_token(&h, "member", &[]));
    let api = "api.example.com";
    let cases: Vec<Case<'_>> = vec![
        ("/healthz", Some("public"), None, (0, "")),
        ("/healthz", None, None, (16, "TOKEN_MISSING")),
        // The operator's choice, and the documented risk: the route overrides the path policy.
        ("/admin/status", Some("public"), None, (0, "")),
        (
            "/orders",
            Some("admin"),
            Some(&member),
            (7, "ORG_ROLE_REQUIRED"),
        ),
        (
            "/admin/users",
            None,
            Some(&member),
            (7, "ORG_ROLE_REQUIRED"),
        ),
        (
            "/admin;x/users",
            Some("public"),
            None,
            (3, "PATH_NOT_CANONICAL"),
        ),
        (
            "/%25%361dmin/users",
            Some("public"),
            None,
            (3, "PATH_NOT_CANONICAL"),
        ),
        (
            "/Admin/users",
            Some("public"),
            None,
            (3, "PATH_NOT_CANONICAL"),
        ),
    ];
    for (path, rule, auth, want) in cases {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let pairs: Vec<(&str, &str)> = rule.map(|r| ("clerk_rule", r)).into_iter().collect();
        let r = check(
            &c,
            with_context(envoy_request("GET", api, path, &headers), &pairs),
        )
        .await;
        assert_eq!(
            verdict(&r),
            (want.0, want.1.to_owned()),
            "{path} clerk_rule={rule:?}"
        );
    }
}

/// Whatever shape the extension takes, a route that names no rule of the policy is refused
/// as "cannot decide" (FAILED_PRECONDITION, HTTP 503, ROUTE_RULE_UNKNOWN) — even with a token
/// every rule would let through, and for a path the policy makes public.
#[tokio::test]
async fn hostile_context_extensions_fail_closed() {
    let (h, c) = start_with_routes(CONTEXT_ROUTES).await;
    let owner = format!(
        "Bearer {}",
        admin_token(&h, "admin", &["org:billing:manage"])
    );
    let huge = "admin".repeat(20_000);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("clerk_rule", "nosuch")],
        vec![("clerk_rule", "Admin")],
        vec![("clerk_rule", "ADMIN")],
        vec![("clerk_rule", " admin")],
        vec![("clerk_rule", "admin\t")],
        vec![("clerk_rule", "")],
        vec![("clerk_rule", "admin,public")],
        vec![("clerk_rule", "public admin")],
        vec![("clerk_rule", "admin\u{0}")],
        vec![("clerk_rule", "ädmin")],
        vec![("clerk_rule", "../public")],
        vec![("clerk_rule", &huge)],
        vec![("Clerk_Rule", "public")],
        vec![("CLERK_RULE", "public")],
        vec![("clerk-rule", "public")],
        vec![(" clerk_rule", "public")],
        vec![("clerk_rules", "public")],
        vec![("clerk_rule", "public"), ("clerk_role", "admin")],
    ];
    for pairs in cases {
        for (path, auth) in [("/public/x", None), ("/orders", Some(owner.as_str()))] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("authorization", a)).into_iter().collect();
            let req = with_context(
                envoy_request("GET", "api.example.com", path, &headers),
                &pairs,
            );
            let r = check(&c, req).await;
            let shown: Vec<_> = pairs.iter().map(|(k, v)| (k, v.len())).collect();
            assert_eq!(
                verdict(&r),
                (9, "ROUTE_RULE_UNKNOWN".to_owned()),
                "{path} {shown:?}"
            );
            let (_, http, _, body) = denied_parts(&r);
            assert_eq!(http, 503, "{shown:?}");
            // The client sees a fixed message, never the route's configuration.
            assert!(body.len() < 300 && !body.contains("nosuch"), "{body}");
        }
    }
    // gRPC requests get a gRPC-shaped refusal.
    let req = with_context(
        envoy_request(
            "POST",
            "api.example.com",
            "/orders.v1.Orders/Get",
            &[("content-type", "application/grpc")],
        ),
        &[("clerk_rule", "nosuch")],
    );
    let r = check(&c, req).await;
    let (code, http, headers, _) = denied_parts(&r);
    assert_eq!((code, http), (9, 200));
    assert_eq!(headers["grpc-status"], "9");
}

// ===== reflection: Check callable with nothing but the server's own descriptors =====

mod reflected {
    use prost::Message as _;
    use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
    use tonic::{
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
        transport::Channel,
        Status,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };

    pub async fn reflect(channel: &Channel, request: MessageRequest) -> MessageResponse {
        let mut answers = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::once(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            }))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        answer.message_response.unwrap()
    }

    pub async fn services_v1(channel: &Channel) -> Vec<String> {
        match reflect(channel, MessageRequest::ListServices(String::new())).await {
            MessageResponse::ListServicesResponse(l) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    pub async fn services_v1alpha(channel: &Channel) -> Vec<String> {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut answers = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::once(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }))
            .await
            .unwrap()
            .into_inner();
        match answers.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    /// The file defining `symbol` and everything it imports, as the server reflects them.
    pub async fn pool_for(channel: &Channel, symbol: &str) -> DescriptorPool {
        let mut files = std::collections::BTreeMap::new();
        let mut wanted = vec![MessageRequest::FileContainingSymbol(symbol.to_owned())];
        while let Some(request) = wanted.pop() {
            let MessageResponse::FileDescriptorResponse(found) = reflect(channel, request).await
            else {
                panic!("reflection: unexpected answer");
            };
            for bytes in found.file_descriptor_proto {
                let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
                files.insert(file.name().to_owned(), file);
            }
            let missing: Vec<String> = files
                .values()
                .flat_map(|f| f.dependency.iter())
                .filter(|d| !files.contains_key(*d))
                .cloned()
                .collect();
            for dep in missing {
                if !wanted
                    .iter()
                    .any(|w| matches!(w, MessageRequest::FileByFilename(f) if *f == dep))
                {
                    wanted.push(MessageRequest::FileByFilename(dep));
                }
            }
        }
        let mut pool = DescriptorPool::new();
        pool.add_file_descriptor_protos(files.into_values())
            .unwrap();
        pool
    }

    /// Calls `/service/method` with a request built from JSON; the answer as JSON.
    pub async fn call(
        channel: &Channel,
        pool: &DescriptorPool,
        service: &str,
        method: &str,
        json: &serde_json::Value,
    ) -> serde_json::Value {
        let m = pool
            .get_service_by_name(service)
            .unwrap()
            .methods()
            .find(|m| m.name() == method)
            .unwrap();
        let input = DynamicMessage::deserialize(m.input(), json).unwrap();
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path: http::uri::PathAndQuery = format!("/{service}/{method}").parse().unwrap();
        let out = grpc
            .unary(tonic::Request::new(input), path, DynamicCodec(m.output()))
            .await
            .unwrap()
            .into_inner();
        serde_json::to_value(&out).unwrap()
    }

    struct DynamicCodec(MessageDescriptor);

    impl Codec for DynamicCodec {
        type Encode = DynamicMessage;
        type Decode = DynamicMessage;
        type Encoder = DynamicEncoder;
        type Decoder = DynamicDecoder;

        fn encoder(&mut self) -> Self::Encoder {
            DynamicEncoder
        }

        fn decoder(&mut self) -> Self::Decoder {
            DynamicDecoder(self.0.clone())
        }
    }

    struct DynamicEncoder;

    impl Encoder for DynamicEncoder {
        type Item = DynamicMessage;
        type Error = Status;

        fn encode(&mut self, item: DynamicMessage, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            item.encode(buf)
                .map_err(|e| Status::internal(format!("encode: {e}")))
        }
    }

    struct DynamicDecoder(MessageDescriptor);

    impl Decoder for DynamicDecoder {
        type Item = DynamicMessage;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
            DynamicMessage::decode(self.0.clone(), buf)
                .map(Some)
                .map_err(|e| Status::internal(format!("decode: {e}")))
        }
    }
}

/// Reflection (v1 and v1alpha) lists `envoy.service.auth.v3.Authorization`, and a `Check`
/// built only from the reflected descriptors (as grpcurl builds it: JSON, no Envoy protos)
/// is answered: allowed, denied by the named rule, refused for an unknown rule.
#[tokio::test]
async fn check_is_callable_through_reflection_alone() {
    const AUTHZ: &str = "envoy.service.auth.v3.Authorization";
    let (h, _) = start_with_routes(CONTEXT_ROUTES).await;
    let channel = Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for services in [
        reflected::services_v1(&channel).await,
        reflected::services_v1alpha(&channel).await,
    ] {
        assert!(services.iter().any(|s| s == AUTHZ), "{services:?}");
        assert!(
            services.iter().any(|s| s == "clerk.auth.v1.AuthService"),
            "{services:?}"
        );
    }
    let pool = reflected::pool_for(&channel, AUTHZ).await;
    let admin = format!("Bearer {}", admin_token(&h, "admin", &[]));
    let member = format!("Bearer {}", admin_token(&h, "member", &[]));
    let request = |auth: &str, rule: &str| {
        serde_json::json!({
            "attributes": {
                "request": { "http": {
                    "method": "GET",
                    "host": "api.example.com",
                    "path": "/orders",
                    "headers": { "authorization": auth },
                }},
                "contextExtensions": { "clerk_rule": rule },
            }
        })
    };
    let code = |v: &serde_json::Value| v["status"]["code"].as_i64().unwrap_or(0);
    let allowed = reflected::call(&channel, &pool, AUTHZ, "Check", &request(&admin, "admin")).await;
    assert_eq!(code(&allowed), 0, "{allowed}");
    let set: Vec<&str> = allowed["okResponse"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["header"]["key"].as_str())
        .collect();
    assert!(set.contains(&"x-clerk-user-id"), "{allowed}");
    let denied = reflected::call(&channel, &pool, AUTHZ, "Check", &request(&member, "admin")).await;
    assert_eq!(code(&denied), 7, "{denied}");
    assert_eq!(
        denied["deniedResponse"]["status"]["code"], "Forbidden",
        "{denied}"
    );
    let unknown =
        reflected::call(&channel, &pool, AUTHZ, "Check", &request(&admin, "nosuch")).await;
    assert_eq!(code(&unknown), 9, "{unknown}");
    assert_eq!(
        unknown["deniedResponse"]["status"]["code"], "ServiceUnavailable",
        "{unknown}"
    );
}

/// The review's shapes: override headers in CGI spellings, PHP's query keys, ASP.NET's query
/// overrides, headers naming another target, and requests that would make the server judge
/// the same path thousands of times — each refused (or judged under the stricter rule), never
/// a looser rule, and never much work.
#[tokio::test]
async fn override_spellings_other_targets_and_costly_requests_are_refused() {
    let routes: &'static str =
        Box::leak(format!("method_override = \"headers\"\n{OPEN_ROUTES}").into_boxed_str());
    let (_h, c) = start_with_routes(routes).await;
    let api = "api.example.com";
    // Each would run DELETE /orders/1 (a permission) under GET's public rule.
    let mut cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        (
            "/orders/1".into(),
            vec![("x_http_method_override", "DELETE")],
        ),
        (
            "/orders/1".into(),
            vec![("x-http_method-override", "DELETE")],
        ),
        ("/orders/1".into(), vec![("x_method_override", "DELETE")]),
    ];
    for query in [
        "_method=DELETE",
        "_METHOD=delete",
        ".method=DELETE",
        "%2Emethod=DELETE",
        "%20.method=DELETE",
        "+.method=DELETE",
        "%20_method=DELETE",
        "X-HTTP-Method-Override=DELETE",
        "x_http_method_override=DELETE",
    ] {
        cases.push((format!("/orders/1?{query}"), vec![]));
    }
    for (path, headers) in &cases {
        let r = check(&c, envoy_request("GET", api, path, headers)).await;
        assert_eq!(
            verdict(&r).1,
            "METHOD_INVALID",
            "GET {path} {headers:?} must not pass under GET's public rule"
        );
    }
    // IIS / older Symfony serve X-Original-URL or X-Rewrite-URL instead of the path.
    for name in ["x-original-url", "x-rewrite-url", "x_original_url"] {
        let r = check(
            &c,
            envoy_request("GET", api, "/public", &[(name, "/admin/users")]),
        )
        .await;
        assert_eq!(verdict(&r).1, "PATH_NOT_CANONICAL", "{name}");
    }
    // Many overrides or forwarded hosts: refused, not judged one by one.
    let many_methods: Vec<String> = (0..17).map(|i| format!("M{i}")).collect();
    let many_methods = many_methods.join(",");
    let many_hosts: Vec<String> = (0..17).map(|i| format!("h{i}.example.com")).collect();
    let many_hosts = many_hosts.join(",");
    for (name, value, reason) in [
        ("x-http-method-override", &many_methods, "METHOD_INVALID"),
        ("x-forwarded-host", &many_hosts, "HOST_INVALID"),
    ] {
        let r = check(&c, envoy_request("GET", api, "/x", &[(name, value)])).await;
        assert_eq!(verdict(&r).1, reason, "{name}");
    }
    // The same value repeated is one alternative (and agrees): it passes.
    let same = vec!["GET"; 3000].join(",");
    let r = check(
        &c,
        envoy_request("GET", api, "/x", &[("x-http-method-override", &same)]),
    )
    .await;
    assert_eq!(verdict(&r), (0, String::new()));
    // A path over 8 KiB is refused before any reading of it.
    let long = format!("/public/{}", "a/".repeat(4100));
    let r = check(&c, envoy_request("GET", api, &long, &[])).await;
    assert_eq!(verdict(&r).1, "PATH_NOT_CANONICAL");
    let fits = format!("/public/{}", "a/".repeat(4000));
    let r = check(&c, envoy_request("GET", api, &fits, &[])).await;
    assert_eq!(verdict(&r), (0, String::new()));
}

const REPLACE_BODY: &str = r#"
context_extensions = "replace"

[default]
access = "authenticated"

[[routes]]
path_prefix = "/orders"
methods = ["DELETE"]
require = [{ permission = "org:orders:delete" }]

[rules.public]
access = "public"

[rules.session]
access = "authenticated"
"#;

/// In "replace" mode the named rule stands in for the request's own rule only: a POST (which
/// its body could make a DELETE) still needs DELETE's permission, as a header override would.
#[tokio::test]
async fn replace_keeps_the_rules_a_post_body_could_select() {
    let (h, c) = start_with_routes(REPLACE_BODY).await;
    let member = format!("Bearer {}", admin_token(&h, "member", &[]));
    let form = ("content-type", "application/x-www-form-urlencoded");
    let r = check(
        &c,
        with_context(
            envoy_request(
                "POST",
                "api.example.com",
                "/orders/1",
                &[("authorization", &member), form],
            ),
            &[("clerk_rule", "session")],
        ),
    )
    .await;
    assert_eq!(verdict(&r).0, 7, "a member's POST could be a DELETE");
    let r = check(
        &c,
        with_context(
            envoy_request("POST", "api.example.com", "/orders/1", &[form]),
            &[("clerk_rule", "public")],
        ),
    )
    .await;
    assert_eq!(verdict(&r).1, "TOKEN_MISSING");
    // Where no method route applies, the named public rule alone decides.
    let r = check(
        &c,
        with_context(
            envoy_request("POST", "api.example.com", "/health", &[form]),
            &[("clerk_rule", "public")],
        ),
    )
    .await;
    assert_eq!(verdict(&r), (0, String::new()));
}
