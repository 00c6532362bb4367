//! A real browser over gRPC-web: Debian's Chromium, headless, driven by Playwright's core
//! library (`tests/browser/driver.mjs`), through the `grpc_web` example's page and server
//! (in-process here, on 127.0.0.1:0) and the emulator's sign-in page.
//!
//! * (a) signed in on the emulator's page, the page shows the user picked;
//! * (b) the `__session` cookie removed, it shows `UNAUTHENTICATED`;
//! * the page on another origin of the same site (another port), among the authorized parties,
//!   calls cross-origin with the cookies (preflight, credentials) and shows the user;
//! * (c) the page served from another site (`http://localhost:PORT` against the API on
//!   `http://127.0.0.1:PORT`) is refused by the browser (CORS), and a non-browser request with
//!   that `Origin` and the signed-in cookies is refused by the server (`ORIGIN_NOT_AUTHORIZED`).
//!
//! Needs `/usr/bin/chromium` and `node`/`npm`; playwright-core (pinned in
//! `tests/browser/package-lock.json`) is installed with `npm ci --prefer-offline` into
//! `<target>/browser-node_modules` (never a browser download). Missing any of them: the test
//! fails when `CI` is set, else prints `skipped: …` and passes.

#[path = "../examples/common/orders.rs"]
mod orders;
#[path = "../examples/common/web.rs"]
mod web;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use clerk_grpc_auth::{
    emulator::{Emulator, MembershipSpec, UserSpec},
    layer::AuthLayer,
    verify::jwks::KeySource,
    TokenVerifier, VerifierSettings,
};
use serde_json::Value;
use tonic_types::StatusExt;

const CHROMIUM: &str = "/usr/bin/chromium";
/// How long the whole browser run may take (a stuck browser fails the test, never hangs it).
const DRIVER_DEADLINE: Duration = Duration::from_secs(180);

/// A missing prerequisite: fails under CI, skips elsewhere (`false`: skip).
fn prerequisite(ok: bool, why: impl FnOnce() -> String) -> bool {
    if ok {
        return true;
    }
    let why = why();
    if std::env::var_os("CI").is_some() {
        panic!("the browser test cannot run (CI is set, so this fails): {why}");
    }
    println!("skipped: {why}");
    false
}

fn runs(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the pinned playwright-core into `<target>/browser-node_modules` (from npm's cache
/// when it holds it), unless already there. `Err`: npm's output.
fn playwright_dir() -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("browser-node_modules");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let lock = std::fs::read(src.join("package-lock.json")).map_err(|e| e.to_string())?;
    let lock_json: Value = serde_json::from_slice(&lock).map_err(|e| e.to_string())?;
    let pinned = lock_json["packages"]["node_modules/playwright-core"]["version"]
        .as_str()
        .ok_or("no playwright-core in tests/browser/package-lock.json")?
        .to_owned();
    let installed = std::fs::read(dir.join("node_modules/playwright-core/package.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned));
    if installed.as_deref() == Some(pinned.as_str()) {
        return Ok(dir);
    }
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(src.join(f), dir.join(f)).map_err(|e| e.to_string())?;
    }
    let out = std::process::Command::new("npm")
        .args([
            "ci",
            "--prefer-offline",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
        ])
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("npm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "npm ci (playwright-core {pinned}) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir)
}

/// A gRPC-web `ListOrders` as a non-browser client sends it, with `cookie` and `origin`: the
/// HTTP answer's headers and body.
async fn grpc_web_list(api: &str, cookie: &str, origin: &str) -> (http::HeaderMap, Vec<u8>) {
    let res = reqwest::Client::new()
        .post(format!("{api}/examples.orders.v1.Orders/ListOrders"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("cookie", cookie)
        .header("origin", origin)
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .expect("the server answers");
    assert_eq!(res.status(), 200);
    let headers = res.headers().clone();
    (headers, res.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_calls_over_grpc_web_and_another_site_is_refused() {
    if !prerequisite(Path::new(CHROMIUM).exists(), || {
        format!("{CHROMIUM} is missing (apt-get install chromium)")
    }) || !prerequisite(runs("node") && runs("npm"), || {
        "node or npm is missing".to_owned()
    }) {
        return;
    }
    let playwright = match playwright_dir() {
        Ok(d) => d,
        Err(e) => {
            prerequisite(false, || e);
            return;
        }
    };

    // The emulator, with two users (the second is picked) and an organization.
    let emu = Emulator::start_local().await.unwrap();
    emu.create_user(&UserSpec {
        id: Some("user_2aaaFIRSTfirstFIRSTfirstFIRST".into()),
        first_name: Some("First".into()),
        ..UserSpec::default()
    });
    let user = emu.create_user(&UserSpec {
        id: Some("user_2zzzPICKEDpickedPICKEDpicked".into()),
        first_name: Some("Ada".into()),
        last_name: Some("Lovelace".into()),
        ..UserSpec::default()
    });
    let org = "org_2acmeACMEacmeACMEacmeACME";
    emu.add_membership(&MembershipSpec {
        user_id: user.clone(),
        org_id: org.into(),
        org_slug: Some("acme".into()),
        role: Some("org:admin".into()),
        ..MembershipSpec::default()
    })
    .await;

    // The grpc_web example's server, verifying in-process against the emulator's JWKS.
    let jwks = KeySource::Remote {
        url: format!("{}/.well-known/jwks.json", emu.url())
            .parse()
            .unwrap(),
        bearer: None,
    };
    let (verifier, _keys) = TokenVerifier::start(VerifierSettings::new(jwks)).unwrap();
    verifier.keys().ready().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = web::own_origin(&listener).unwrap();
    let port = listener.local_addr().unwrap().port();
    // A second origin of the same site (another port), serving a page that calls the first.
    let sibling_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sibling = web::own_origin(&sibling_listener).unwrap();
    let auth = AuthLayer::in_process(verifier, orders::policy())
        .authorized_parties([api.clone(), sibling.clone()]);
    assert_eq!(auth.authorized_origins(), [api.clone(), sibling.clone()]);
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(web::serve(
        listener,
        auth.clone(),
        Some(emu.url()),
        async move { stopped.cancelled().await },
    ));
    let stopped = stop.clone();
    let sibling_server = tokio::spawn(web::serve_calling(
        sibling_listener,
        auth,
        Some(emu.url()),
        api.clone(),
        async move { stopped.cancelled().await },
    ));

    // The browser.
    let profile = tempfile::tempdir().unwrap();
    let app_url = format!("{api}/");
    let foreign_url = format!("http://localhost:{port}/");
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/driver.mjs");
    let child = std::process::Command::new("node")
        .arg(&driver)
        .env("CHROMIUM", CHROMIUM)
        .env("PLAYWRIGHT_DIR", &playwright)
        .env("USER_DATA_DIR", profile.path())
        .env("APP_URL", &app_url)
        .env("FOREIGN_URL", &foreign_url)
        .env("SIBLING_URL", format!("{sibling}/"))
        .env("USER_ID", &user)
        .env("ORG_ID", org)
        .env("ROLE", "org:admin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    // std's process on a blocking thread (tokio's `process` feature would change the
    // library's dependency features for every build), killed if it overruns.
    let pid = child.id().to_string();
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(DRIVER_DEADLINE, waited).await {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", "--", &pid])
                .status();
            panic!("the browser run did not finish in {DRIVER_DEADLINE:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "driver failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("driver output is not JSON ({e}):\n{stdout}\n{stderr}"));
    let shown =
        |step: &str, field: &str| report[step][field].as_str().unwrap_or_default().to_owned();

    // Signed out at first.
    assert_eq!(shown("before", "code"), "UNAUTHENTICATED", "{report:#}");
    assert!(
        report["signInPage"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/sign-in?redirect_url=", emu.url())),
        "{report:#}"
    );
    // (a) The caller is the user picked, in the organization picked.
    assert_eq!(shown("signedIn", "code"), "OK", "{report:#}");
    assert_eq!(shown("signedIn", "user"), user, "{report:#}");
    assert_eq!(
        shown("signedIn", "text"),
        format!("{user} in {org} as org:admin"),
        "{report:#}"
    );
    let cookies = report["cookies"].as_array().unwrap();
    let cookie = |name: &str| {
        cookies
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} cookie: {report:#}"))
    };
    assert_eq!(cookie("__session")["sameSite"], "Lax");
    assert_eq!(cookie("__session")["httpOnly"], false);
    assert_eq!(cookie("__session")["path"], "/");
    let jar = format!(
        "__session={}; __client_uat={}",
        cookie("__session")["value"].as_str().unwrap(),
        cookie("__client_uat")["value"].as_str().unwrap()
    );
    // (b) Without the cookie.
    assert_eq!(shown("removed", "code"), "UNAUTHENTICATED", "{report:#}");
    // From another origin of the same site, authorized: preflight passed, cookies sent.
    assert_eq!(shown("sibling", "code"), "OK", "{report:#}");
    assert_eq!(shown("sibling", "user"), user, "{report:#}");
    // (c) From another site: the browser refused the call (CORS) …
    assert_eq!(shown("foreign", "code"), "FETCH_FAILED", "{report:#}");
    let console: Vec<&str> = report["foreignConsole"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        console.iter().any(|m| m.contains("CORS policy")),
        "no CORS refusal in the console: {console:?}"
    );
    // … and so does the server, for a client that sends that Origin with the cookies.
    let (headers, _) = grpc_web_list(&api, &jar, &foreign_url[..foreign_url.len() - 1]).await;
    let status = tonic::Status::from_header_map(&headers).expect("a trailers-only refusal");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        status
            .get_error_details()
            .error_info()
            .map(|i| i.reason.as_str()),
        Some("ORIGIN_NOT_AUTHORIZED")
    );
    assert!(headers.get("access-control-allow-origin").is_none());
    // The same request from the page's own origin is answered, with the CORS headers.
    let (headers, body) = grpc_web_list(&api, &jar, &api).await;
    assert!(
        tonic::Status::from_header_map(&headers).is_none(),
        "{headers:?}"
    );
    assert_eq!(headers["access-control-allow-origin"], api.as_str());
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let exposed = headers["access-control-expose-headers"].to_str().unwrap();
    for h in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(h), "{exposed}");
    }
    assert!(
        body.windows(user.len()).any(|w| w == user.as_bytes()),
        "the answer names the caller"
    );

    stop.cancel();
    server.await.unwrap().unwrap();
    sibling_server.await.unwrap().unwrap();
    emu.shutdown().await;
}

/// The preflight, without a browser: answered by the CORS layer (the auth layer never sees
/// it) from the authorized parties; another origin gets no CORS headers.
#[tokio::test]
async fn preflights_are_answered_from_the_authorized_parties() {
    let emu = Emulator::start_local().await.unwrap();
    let jwks = KeySource::Remote {
        url: format!("{}/.well-known/jwks.json", emu.url())
            .parse()
            .unwrap(),
        bearer: None,
    };
    let (verifier, _keys) = TokenVerifier::start(VerifierSettings::new(jwks)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = web::own_origin(&listener).unwrap();
    // Written loosely: canonicalised for the CORS list.
    let auth = AuthLayer::in_process(verifier, orders::policy()).authorized_parties([
        "HTTPS://App.Example.COM:443",
        "null",
        "https://x/y",
    ]);
    assert_eq!(auth.authorized_origins(), ["https://app.example.com"]);
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(web::serve(listener, auth, None, async move {
        stopped.cancelled().await
    }));
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(
            reqwest::Method::OPTIONS,
            format!("{api}/examples.orders.v1.Orders/ListOrders"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,authorization",
        )
        .send()
    };
    let res = preflight("https://app.example.com").await.unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-allow-methods"], "POST");
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    for name in ["content-type", "x-grpc-web", "authorization"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert_eq!(h["access-control-max-age"], "600");
    assert!(
        h.get("grpc-status").is_none(),
        "the auth layer answered the preflight"
    );
    for other in [
        "https://evil.example",
        "http://app.example.com",
        "null",
        "https://app.example.com.evil.example",
    ] {
        let res = preflight(other).await.unwrap();
        assert!(
            res.headers().get("access-control-allow-origin").is_none(),
            "{other}: {:?}",
            res.headers()
        );
    }
    // A refusal carries the CORS headers, so the page can read its status.
    let res = http
        .post(format!("{api}/examples.orders.v1.Orders/ListOrders"))
        .header("origin", "https://app.example.com")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["grpc-status"], "16");
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("grpc-status") && exposed.contains("grpc-message"));
    stop.cancel();
    server.await.unwrap().unwrap();
}
