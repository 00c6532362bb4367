//! The real front doors: Debian's nginx (`auth_request`) and Caddy (`forward_auth`), run with
//! the very files in `deploy/nginx/` and `deploy/caddy/`, in front of an upstream that records
//! what it receives, with AuthService's `/auth` deciding. Everything over real HTTP on
//! 127.0.0.1: the upstream must see the token's identity and never a client's own identity
//! header; no token → 401 with `WWW-Authenticate`; a member on an admin route → 403; the
//! non-canonical path escapes refused; AuthService stopped → refused, never 200.
//!
//! nginx and Caddy come from the distribution's packages (`.ci/run` installs them). Missing,
//! a proxy's test fails when `CI` is set and is skipped (with a message) otherwise.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use clerk_grpc_auth::{
    emulator::{Emulator, OrgSpec, TokenSpec},
    server::{
        ext_authz::RoutePolicy,
        forward_auth::{ForwardAuthConfig, ForwardedHeaders},
        ServerError,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

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
"#;

const HOST: &str = "api.example.com";
const USER: &str = "user_2prxPRXprxPRXprxPRXprxPRX";
const EVIL: &str = "user_2evilEVILevilEVILevilEVIL";

/// What the upstream received: one entry per request, its target and headers (lower-case
/// names, every value).
type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// An upstream that records every request and answers 200 `upstream`.
async fn upstream() -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let record = record.clone();
        async move {
            let target = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            let headers = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            record.lock().unwrap().push((target, headers));
            "upstream"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

struct Auth {
    clerk: Emulator,
    http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

async fn auth_service(headers: ForwardedHeaders) -> Auth {
    let clerk = Emulator::start_local().await.unwrap();
    let mut config = common::config_for(&clerk);
    config.route_policy = RoutePolicy::from_toml(ROUTES, "tests/proxies.rs").unwrap();
    config.forward_auth = Some(ForwardAuthConfig { headers });
    let common::HttpServer { http, stop, task } = common::serve_with_http(config, true).await;
    Auth {
        clerk,
        http,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Auth {
    fn token(&self, role: &str, permissions: &[&str]) -> String {
        self.clerk.mint(&TokenSpec {
            user_id: Some(USER.into()),
            session_id: Some("sess_2prxPRXprxPRXprxPRXprxPRX".into()),
            org: Some(OrgSpec {
                id: Some("org_2prx".into()),
                slug: Some("prx".into()),
                role: Some(role.into()),
                permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
            }),
            expires_in: Some(600),
            ..TokenSpec::default()
        })
    }

    /// Stops AuthService and waits until it has.
    async fn stop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// The proxy binary, or `None` (after saying so) when it is missing outside CI.
fn binary(name: &str, path: &str) -> Option<PathBuf> {
    if Path::new(path).exists() {
        return Some(PathBuf::from(path));
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{name} is missing ({path}): .ci/run installs it from the distribution's packages"
    );
    eprintln!("skipped: {name} is not installed ({path}); apt-get install {name} runs this test");
    None
}

/// A port that was free a moment ago, for a proxy that binds its own.
async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The proxy process (killed on drop) and its address.
struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// Waits until the proxy accepts connections (or has exited: its log is shown).
    async fn listening(mut self, log: &Path) -> Self {
        for _ in 0..500 {
            if TcpStream::connect(self.addr).await.is_ok() {
                return self;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}): {}",
                    self.name,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} did not listen on {}", self.name, self.addr);
    }
}

/// `deploy/` file `path` with each `(from, to)` replaced (each `from` must be there).
fn deploy_file(path: &str, replace: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    for (from, to) in replace {
        assert!(text.contains(from), "{path} no longer contains {from:?}");
        text = text.replace(from, to);
    }
    text
}

/// Debian's nginx with `deploy/nginx/clerk-auth.conf`.
async fn nginx(auth: SocketAddr, app: SocketAddr) -> Option<Proxy> {
    let bin = binary("nginx", "/usr/sbin/nginx")?;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().await;
    let site = deploy_file(
        "deploy/nginx/clerk-auth.conf",
        &[
            ("server auth-service:8081;", format!("server {auth};")),
            ("server app:8080;", format!("server {app};")),
            ("listen 8080", format!("listen 127.0.0.1:{port}")),
        ],
    );
    let d = dir.path().display();
    std::fs::write(dir.path().join("clerk-auth.conf"), site).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             include {d}/clerk-auth.conf;\n}}\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("error.log");
    let child = Command::new(bin)
        .arg("-e")
        .arg(&log)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .args(["-g", "daemon off; master_process off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proxy = Proxy {
        name: "nginx",
        addr: ([127, 0, 0, 1], port).into(),
        child,
        _dir: dir,
    };
    Some(proxy.listening(&log).await)
}

/// Debian's Caddy with `deploy/caddy/Caddyfile`.
async fn caddy(auth: SocketAddr, app: SocketAddr) -> Option<Proxy> {
    let bin = binary("caddy", "/usr/bin/caddy")?;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().await;
    let site = deploy_file(
        "deploy/caddy/Caddyfile",
        &[
            (
                "forward_auth auth-service:8081",
                format!("forward_auth {auth}"),
            ),
            (
                "reverse_proxy app:8080 {",
                format!("reverse_proxy {app} {{"),
            ),
            ("\napi.example.com {", format!("\nhttp://{HOST}:{port} {{")),
        ],
    );
    let config = dir.path().join("Caddyfile");
    std::fs::write(
        &config,
        format!("{{\n\tadmin off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n}}\n{site}"),
    )
    .unwrap();
    let log = dir.path().join("caddy.log");
    let child = Command::new(bin)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&config)
        .env("HOME", dir.path())
        .env("XDG_DATA_HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let proxy = Proxy {
        name: "caddy",
        addr: ([127, 0, 0, 1], port).into(),
        child,
        _dir: dir,
    };
    Some(proxy.listening(&log).await)
}

/// An answer read off the wire.
struct Answer {
    /// 0 when the proxy closed the connection without answering (nginx `return 444`).
    status: u16,
    headers: HashMap<String, String>,
}

/// One HTTP/1.1 request written byte for byte (so that no client library normalises the
/// target) with `Host: host`.
async fn raw(proxy: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Answer {
    raw_host(proxy, HOST, method, target, headers).await
}

async fn raw_host(
    proxy: SocketAddr,
    host: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes).await;
    let text = String::from_utf8_lossy(&bytes);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer { status, headers }
}

/// The upstream's record of the request whose target carries `probe=N`.
fn seen_probe(seen: &Seen, n: usize) -> Option<Vec<(String, String)>> {
    let marker = format!("probe={n}");
    seen.lock()
        .unwrap()
        .iter()
        .find(|(t, _)| t.contains(&marker))
        .map(|(_, h)| h.clone())
}

/// The values the upstream got under any spelling of `name` (`-` or `_`, any case).
fn values(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(k, _)| k.replace('_', "-").eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

/// Everything the issue asks of a front door, through `proxy`.
async fn suite(proxy: &Proxy, auth: &mut Auth, seen: &Seen) {
    let p = proxy.addr;
    let name = proxy.name;
    let admin = format!("Bearer {}", auth.token("admin", &[]));
    let member = format!("Bearer {}", auth.token("member", &["org:invoices:read"]));
    let mut probe = 0;
    let mut next = || {
        probe += 1;
        probe
    };

    // A valid token reaches the upstream with its identity, and the client's own path.
    let n = next();
    let a = raw(
        p,
        "GET",
        &format!("/admin/reports?probe={n}"),
        &[("Authorization", &admin)],
    )
    .await;
    assert_eq!(a.status, 200, "{name}: admin on /admin");
    let h = seen_probe(seen, n).unwrap_or_else(|| panic!("{name}: the upstream got nothing"));
    assert_eq!(values(&h, "x-clerk-user-id"), [USER], "{name}");
    assert_eq!(values(&h, "x-clerk-org-id"), ["org_2prx"], "{name}");
    assert_eq!(values(&h, "x-clerk-org-role"), ["org:admin"], "{name}");

    // The `__session` cookie works as the header does.
    let n = next();
    let cookie = format!(
        "theme=dark; __session={}; __client_uat=1",
        &member["Bearer ".len()..]
    );
    let a = raw(p, "GET", &format!("/x?probe={n}"), &[("Cookie", &cookie)]).await;
    assert_eq!(a.status, 200, "{name}: cookie");
    let h = seen_probe(seen, n).unwrap();
    assert_eq!(values(&h, "x-clerk-user-id"), [USER], "{name}");
    assert_eq!(
        values(&h, "x-clerk-org-permissions"),
        ["org:invoices:read"],
        "{name}"
    );

    // A public route: the upstream sees no identity at all.
    let n = next();
    let a = raw(p, "GET", &format!("/public/page?probe={n}"), &[]).await;
    assert_eq!(a.status, 200, "{name}: public");
    let h = seen_probe(seen, n).unwrap();
    for id in clerk_grpc_auth::server::ext_authz::IDENTITY_HEADERS {
        assert!(
            values(&h, id).iter().all(|v| v.is_empty()),
            "{name}: {id} on a public route: {h:?}"
        );
    }

    // A client's own identity headers, in any spelling, with or without a token, on a public
    // route or not: the upstream never sees its value.
    for spelling in [
        "X-Clerk-User-Id",
        "x-clerk-user-id",
        "X_Clerk_User_Id",
        "x-clerk_user-id",
    ] {
        for (target, token) in [("/public/p", None), ("/x", Some(member.as_str()))] {
            let n = next();
            let mut headers = vec![(spelling, EVIL)];
            if let Some(t) = token {
                headers.push(("Authorization", t));
            }
            let a = raw(p, "GET", &format!("{target}?probe={n}"), &headers).await;
            if let Some(h) = seen_probe(seen, n) {
                assert!(
                    !values(&h, "x-clerk-user-id").iter().any(|v| v == EVIL),
                    "{name}: {spelling} reached the upstream ({}): {h:?}",
                    a.status
                );
            }
        }
    }
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|(_, h)| !h.iter().any(|(_, v)| v == EVIL)),
        "{name}: a spoofed identity reached the upstream"
    );

    // No token: 401 with the challenge, nothing upstream.
    let n = next();
    let a = raw(p, "GET", &format!("/x?probe={n}"), &[]).await;
    assert_eq!(a.status, 401, "{name}: no token");
    assert_eq!(
        a.headers.get("www-authenticate").map(String::as_str),
        Some("Bearer"),
        "{name}"
    );
    assert!(seen_probe(seen, n).is_none(), "{name}");
    let n = next();
    let a = raw(
        p,
        "GET",
        &format!("/x?probe={n}"),
        &[("Authorization", "Bearer not.a.token")],
    )
    .await;
    assert_eq!(a.status, 401, "{name}: a bad token");
    assert!(
        a.headers
            .get("www-authenticate")
            .is_some_and(|c| c.contains("invalid_token")),
        "{name}: {:?}",
        a.headers
    );

    // A member on the admin route, or POSTing where DELETE needs a permission: 403.
    for (method, target) in [("GET", "/admin/reports"), ("POST", "/orders/1")] {
        let n = next();
        let a = raw(
            p,
            method,
            &format!("{target}?probe={n}"),
            &[("Authorization", &member), ("Content-Length", "0")],
        )
        .await;
        assert_eq!(a.status, 403, "{name}: member {method} {target}");
        assert!(seen_probe(seen, n).is_none(), "{name}");
    }

    // The non-canonical spellings of /admin: refused, never the public rule, never upstream.
    for target in [
        "/public/../admin/reports",
        "/public/%2e%2e/admin/reports",
        "/public/.%2E/admin/reports",
        "/public/..%2fadmin/reports",
        "/public%2f..%2fadmin/reports",
        "/public/%252e%252e/admin/reports",
        "//public/../admin/reports",
        "/public/./../admin/reports",
        "/public\\..\\admin/reports",
        "/public;/../admin/reports",
        "/%61dmin/reports",
        "/ADMIN/reports",
        "/public/%00/../../admin/reports",
    ] {
        let n = next();
        let sep = if target.contains('?') { '&' } else { '?' };
        let a = raw(
            p,
            "GET",
            &format!("{target}{sep}probe={n}"),
            &[("Authorization", &member)],
        )
        .await;
        assert!(
            !(200..300).contains(&a.status),
            "{name}: {target} was allowed ({})",
            a.status
        );
        assert!(
            seen_probe(seen, n).is_none(),
            "{name}: {target} reached the upstream"
        );
    }

    // A client naming identity headers in `Connection:` (hop-by-hop: proxies remove them)
    // cannot strip what AuthService set: the upstream still gets all five.
    let n = next();
    let a = raw(
        p,
        "GET",
        &format!("/x?probe={n}"),
        &[
            ("Authorization", &member),
            (
                "Connection",
                "X-Clerk-Org-Id, X-Clerk-Org-Role, X-Clerk-Org-Permissions, X-Clerk-User-Id",
            ),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{name}: Connection");
    let h = seen_probe(seen, n).unwrap();
    assert_eq!(values(&h, "x-clerk-user-id"), [USER], "{name}: {h:?}");
    assert_eq!(values(&h, "x-clerk-org-id"), ["org_2prx"], "{name}: {h:?}");
    assert_eq!(
        values(&h, "x-clerk-org-role"),
        ["org:member"],
        "{name}: {h:?}"
    );

    // Headers naming another target: refused when an upstream could serve it (IIS, older
    // Symfony), and the ones AuthService read never reach the upstream with a client's value.
    for (header, value) in [
        ("X-Original-URL", "/admin/reports"),
        ("X-Rewrite-URL", "/admin/reports"),
        ("X_Original_URL", "/admin/reports"),
    ] {
        let n = next();
        let a = raw(
            p,
            "GET",
            &format!("/public/p?probe={n}"),
            &[(header, value)],
        )
        .await;
        if let Some(h) = seen_probe(seen, n) {
            assert!(
                values(&h, header).is_empty(),
                "{name}: {header} reached the upstream ({}): {h:?}",
                a.status
            );
        }
    }
    for header in [
        "X-Original-URI",
        "X-Original-Method",
        "X-Forwarded-Uri",
        "X-Forwarded-Method",
    ] {
        let n = next();
        let a = raw(
            p,
            "GET",
            &format!("/public/p?probe={n}"),
            &[(header, "/admin/reports")],
        )
        .await;
        if let Some(h) = seen_probe(seen, n) {
            assert!(
                !values(&h, header).iter().any(|v| v == "/admin/reports"),
                "{name}: a client's {header} reached the upstream ({}): {h:?}",
                a.status
            );
        }
    }

    // A method override in any spelling cannot run DELETE under GET's rule.
    for spelling in [
        "X-HTTP-Method-Override",
        "X_HTTP_Method_Override",
        "X-Http_Method-Override",
    ] {
        let n = next();
        let a = raw(
            p,
            "GET",
            &format!("/orders/1?probe={n}"),
            &[("Authorization", &member), (spelling, "DELETE")],
        )
        .await;
        if let Some(h) = seen_probe(seen, n) {
            assert!(
                values(&h, "x-http-method-override").is_empty(),
                "{name}: {spelling}: DELETE reached the upstream under GET's rule ({})",
                a.status
            );
        }
    }
    for query in ["_method=DELETE", ".method=DELETE", "%20.method=DELETE"] {
        let n = next();
        let a = raw(
            p,
            "POST",
            &format!("/orders/1?{query}&probe={n}"),
            &[("Authorization", &member), ("Content-Length", "0")],
        )
        .await;
        assert!(
            !(200..300).contains(&a.status),
            "{name}: {query}: {}",
            a.status
        );
    }

    // AuthService stopped: the proxy refuses, and nothing reaches the upstream.
    auth.stop().await;
    for (target, token) in [("/public/p", None), ("/x", Some(admin.as_str()))] {
        let n = next();
        let headers: Vec<(&str, &str)> = token.map(|t| ("Authorization", t)).into_iter().collect();
        let a = raw(p, "GET", &format!("{target}?probe={n}"), &headers).await;
        assert!(
            a.status >= 500,
            "{name}: {target} with AuthService stopped: {}",
            a.status
        );
        assert!(seen_probe(seen, n).is_none(), "{name}: {target}");
    }
}

#[tokio::test]
async fn nginx_auth_request_in_front_of_an_app() {
    let mut auth = auth_service(ForwardedHeaders::Nginx).await;
    let (app, seen) = upstream().await;
    let Some(proxy) = nginx(auth.http, app).await else {
        return;
    };
    // A host the site does not serve is dropped by the default server (444), unseen.
    let a = raw_host(
        proxy.addr,
        "other.example.com",
        "GET",
        "/public/p?probe=0",
        &[],
    )
    .await;
    assert_eq!(a.status, 0, "nginx answered another host");
    suite(&proxy, &mut auth, &seen).await;
}

#[tokio::test]
async fn caddy_forward_auth_in_front_of_an_app() {
    let mut auth = auth_service(ForwardedHeaders::Forwarded).await;
    let (app, seen) = upstream().await;
    let Some(proxy) = caddy(auth.http, app).await else {
        return;
    };
    let a = raw_host(
        proxy.addr,
        "other.example.com",
        "GET",
        "/public/p?probe=0",
        &[],
    )
    .await;
    assert!(
        seen_probe(&seen, 0).is_none(),
        "caddy proxied another host ({})",
        a.status
    );
    suite(&proxy, &mut auth, &seen).await;
}

/// A listener that accepts connections and never answers: an AuthService that hangs.
async fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// The deploy files' timeouts: an AuthService that accepts and never answers is a refusal
/// (nginx 500 after `proxy_read_timeout`, Caddy 502/504 after `response_header_timeout`),
/// never the upstream and never a client held forever.
#[tokio::test]
async fn a_hanging_auth_service_is_a_refusal() {
    let hole = black_hole().await;
    let (app, seen) = upstream().await;
    let mut proxies = Vec::new();
    if let Some(p) = nginx(hole, app).await {
        proxies.push(p);
    }
    if let Some(p) = caddy(hole, app).await {
        proxies.push(p);
    }
    let answers = futures::future::join_all(
        proxies
            .iter()
            .map(|p| raw(p.addr, "GET", "/public/p?probe=1", &[])),
    )
    .await;
    for (p, a) in proxies.iter().zip(answers) {
        assert!(a.status >= 500, "{}: {}", p.name, a.status);
    }
    assert!(seen.lock().unwrap().is_empty(), "the upstream was reached");
}
