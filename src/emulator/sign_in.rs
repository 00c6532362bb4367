//! The emulator's hosted sign-in and sign-out pages, as Clerk's Account Portal for a browser
//! app: pick a user, an organization and a role from the emulator's directory; the emulator
//! mints a session token (as `POST /emulator/tokens` does, with `azp` the app's origin), sets
//! the `__session` and `__client_uat` cookies as Clerk's frontend does, and redirects back.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /sign-in?redirect_url=…` | the form (users, organizations and roles of the directory) |
//! | `POST /sign-in` | `user_id`, `org_id` (empty: none), `role`, `redirect_url` → cookies, `303` to `redirect_url` |
//! | `GET /sign-out?redirect_url=…` | a sign-out button |
//! | `POST /sign-out` | clears `__session`, sets `__client_uat=0` (signed out), `303` to `redirect_url` |
//!
//! Cookies: `Path=/`, `SameSite=Lax`, not `HttpOnly` (Clerk's `__session` is readable by the
//! page's JavaScript), no `Domain` (host-only: the emulator's host; cookies are not isolated
//! by port, so a page on `127.0.0.1:OTHER` gets them). `__session` lives as long as its token
//! ([`SESSION_LIFETIME_SECS`]; nothing refreshes it, unlike Clerk's 60-second tokens kept fresh
//! by clerk-js).
//!
//! `redirect_url` ([`redirect_target`]): an absolute `http`/`https` URL without userinfo, to a
//! loopback host (`localhost`, `127.0.0.0/8`, `[::1]`) or an origin in
//! [`EmulatorConfig::redirect_origins`](super::EmulatorConfig::redirect_origins); anything else
//! is `400` — no open redirect. A `POST` whose `Origin` is not the emulator's own (or that is
//! `Sec-Fetch-Site: cross-site`) is `403`: another page cannot sign a browser in.

use std::{collections::BTreeSet, sync::Arc};

use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde::Deserialize;
use serde_json::Value;

use super::{now_secs, random_id, OrgSpec, Shared, TokenSpec};
use crate::canonical;

/// How long a session token minted by the sign-in page lives (one hour).
pub const SESSION_LIFETIME_SECS: i64 = 3600;

/// The hosted pages' routes (not counted in the stats: they are the emulator's own).
pub(super) const ROUTES: [&str; 2] = ["/sign-in", "/sign-out"];

/// The cookie holding the session token (Clerk's name).
pub const SESSION_COOKIE: &str = "__session";

/// The cookie holding when the client last signed in or out (Clerk's name; `0`: signed out).
pub const CLIENT_UAT_COOKIE: &str = "__client_uat";

/// The longest `redirect_url` accepted.
const MAX_REDIRECT_URL: usize = 2048;

/// Why a `redirect_url` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("redirect_url refused: {0}")]
pub struct RedirectRefused(pub &'static str);

/// Checks a `redirect_url` (see [the module docs](self)); answers the URL to redirect to (as
/// parsed and serialised, never the raw text) and its canonical origin (the token's `azp`).
pub fn redirect_target(
    raw: &str,
    allowed_origins: &[String],
) -> Result<(url::Url, String), RedirectRefused> {
    let refuse = |m| Err(RedirectRefused(m));
    if raw.is_empty() {
        return refuse("it is empty");
    }
    if raw.len() > MAX_REDIRECT_URL {
        return refuse("it is too long");
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return refuse("it holds whitespace, a control byte or a byte outside ASCII");
    }
    let lower = raw.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) || raw.contains('\\') {
        return refuse("it is not an absolute http:// or https:// URL");
    }
    let Ok(url) = url::Url::parse(raw) else {
        return refuse("it is not a URL");
    };
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("it holds userinfo");
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return refuse("it has no host"),
    };
    let Ok(origin) = canonical::origin(url.origin().ascii_serialization().as_bytes()) else {
        return refuse("its origin is not scheme://host[:port]");
    };
    if !loopback && !allowed_origins.contains(&origin) {
        return refuse("it leads neither to a loopback host nor to an allowed origin");
    }
    Ok((url, origin))
}

#[derive(Debug, Deserialize)]
struct RedirectQuery {
    #[serde(default)]
    redirect_url: String,
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title} · Clerk emulator</title>\
         <style>body{{font:16px system-ui,sans-serif;max-width:32rem;margin:3rem auto}}\
         label{{display:block;margin:.8rem 0}}select,button{{font:inherit}}</style>\
         </head><body><h1>{title}</h1>\n{body}\n</body></html>\n",
        title = escape(title)
    );
    let mut res = (status, html).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page runs no script and may not be framed (no clickjacking of the buttons). No
    // `form-action`: browsers apply it to the redirect after the POST, to the app's origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    res
}

fn refused(status: StatusCode, why: &str) -> Response {
    page(
        status,
        "Refused",
        &format!("<p id=\"error\">{}</p>", escape(why)),
    )
}

/// The directory as the form offers it: users (id, label), organizations (id, label), roles.
struct Choices {
    users: Vec<(String, String)>,
    orgs: Vec<(String, String)>,
    roles: BTreeSet<String>,
}

fn choices(s: &Shared) -> Choices {
    let d = s.directory.lock().expect("lock");
    let mut users: Vec<(String, String)> = d
        .users()
        .map(|(id, u)| {
            let name = [&u["first_name"], &u["last_name"]]
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            (id.to_owned(), name)
        })
        .collect();
    users.sort();
    let mut orgs: Vec<(String, String)> = Vec::new();
    let mut roles: BTreeSet<String> = ["org:admin".to_owned(), "org:member".to_owned()].into();
    for (_, m) in d.memberships() {
        if let Some(id) = m["organization"]["id"].as_str() {
            if !orgs.iter().any(|(o, _)| o == id) {
                let name = m["organization"]["name"].as_str().unwrap_or(id).to_owned();
                orgs.push((id.to_owned(), name));
            }
        }
        if let Some(r) = m["role"].as_str() {
            roles.insert(r.to_owned());
        }
    }
    orgs.sort();
    Choices { users, orgs, roles }
}

async fn sign_in_page(State(s): State<Arc<Shared>>, Query(q): Query<RedirectQuery>) -> Response {
    if let Err(e) = redirect_target(&q.redirect_url, &s.redirect_origins) {
        return refused(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let c = choices(&s);
    if c.users.is_empty() {
        return refused(
            StatusCode::CONFLICT,
            "the emulator's directory has no user yet: create one (POST /emulator/users)",
        );
    }
    let option = |(id, label): &(String, String)| {
        let text = if label.is_empty() {
            escape(id)
        } else {
            format!("{} ({})", escape(label), escape(id))
        };
        format!("<option value=\"{}\">{text}</option>", escape(id))
    };
    let users: String = c.users.iter().map(option).collect();
    let orgs: String = c.orgs.iter().map(option).collect();
    let roles: String = c
        .roles
        .iter()
        .map(|r| format!("<option value=\"{0}\">{0}</option>", escape(r)))
        .collect();
    let body = format!(
        "<form method=\"post\" action=\"/sign-in\">\
         <input type=\"hidden\" name=\"redirect_url\" value=\"{redirect}\">\
         <label>User <select name=\"user_id\" id=\"user_id\">{users}</select></label>\
         <label>Organization <select name=\"org_id\" id=\"org_id\">\
         <option value=\"\">(none)</option>{orgs}</select></label>\
         <label>Role <select name=\"role\" id=\"role\">{roles}</select></label>\
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form>\
         <p>Back to <code>{redirect}</code> with a session token valid for {SESSION_LIFETIME_SECS} s.</p>",
        redirect = escape(&q.redirect_url),
    );
    page(StatusCode::OK, "Sign in", &body)
}

async fn sign_out_page(State(s): State<Arc<Shared>>, Query(q): Query<RedirectQuery>) -> Response {
    if let Err(e) = redirect_target(&q.redirect_url, &s.redirect_origins) {
        return refused(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let body = format!(
        "<form method=\"post\" action=\"/sign-out\">\
         <input type=\"hidden\" name=\"redirect_url\" value=\"{}\">\
         <button type=\"submit\" id=\"sign-out\">Sign out</button></form>",
        escape(&q.redirect_url)
    );
    page(StatusCode::OK, "Sign out", &body)
}

/// A form POST from another page (login CSRF) is refused: its `Origin` must be the emulator's.
fn same_origin_post(s: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let forbidden = |why| Err(Box::new(refused(StatusCode::FORBIDDEN, why)));
    let mut origins = headers.get_all(header::ORIGIN).iter();
    match (origins.next(), origins.next()) {
        (None, _) => {}
        (Some(o), None) => {
            // The emulator's own origin, as this request reached it (`localhost` or 127.0.0.1).
            let own = headers
                .get(header::HOST)
                .map(|h| [b"http://", h.as_bytes()].concat())
                .and_then(|h| canonical::origin(&h).ok())
                .unwrap_or_else(|| s.issuer.clone());
            match canonical::origin(o.as_bytes()) {
                Ok(o) if o == own => {}
                _ => return forbidden("this form may only be posted from the emulator's own page"),
            }
        }
        (Some(_), Some(_)) => return forbidden("several Origin headers"),
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return forbidden("this form may only be posted from the emulator's own page");
    }
    Ok(())
}

fn form(body: &[u8]) -> std::collections::HashMap<String, String> {
    let mut fields = std::collections::HashMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        // The first value of a repeated field wins; later ones are ignored.
        fields
            .entry(k.into_owned())
            .or_insert_with(|| v.into_owned());
    }
    fields
}

fn cookie(name: &str, value: &str, max_age: i64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; SameSite=Lax; Max-Age={max_age}"
    ))
    .expect("a token and digits are valid header characters")
}

fn redirect(to: &url::Url, cookies: [HeaderValue; 2]) -> Response {
    let mut res = StatusCode::SEE_OTHER.into_response();
    let h = res.headers_mut();
    match HeaderValue::from_str(to.as_str()) {
        Ok(v) => h.insert(header::LOCATION, v),
        Err(_) => {
            return refused(
                StatusCode::BAD_REQUEST,
                "redirect_url is not a header value",
            )
        }
    };
    for c in cookies {
        h.append(header::SET_COOKIE, c);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn sign_in(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = same_origin_post(&s, &headers) {
        return *r;
    }
    let f = form(&body);
    let field = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    let (to, azp) = match redirect_target(field("redirect_url"), &s.redirect_origins) {
        Ok(t) => t,
        Err(e) => return refused(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let c = choices(&s);
    let user_id = field("user_id");
    if !c.users.iter().any(|(id, _)| id == user_id) {
        return refused(StatusCode::BAD_REQUEST, "no such user in the directory");
    }
    let org_id = field("org_id");
    let org = if org_id.is_empty() {
        None
    } else {
        if !c.orgs.iter().any(|(id, _)| id == org_id) {
            return refused(
                StatusCode::BAD_REQUEST,
                "no such organization in the directory",
            );
        }
        let role = field("role");
        if !c.roles.contains(role) {
            return refused(StatusCode::BAD_REQUEST, "no such role in the directory");
        }
        // The user's own membership gives the slug and the permissions, when there is one.
        let d = s.directory.lock().expect("lock");
        let membership = d
            .memberships()
            .find(|(u, m)| *u == user_id && m["organization"]["id"].as_str() == Some(org_id))
            .map(|(_, m)| m.clone());
        let any = d
            .memberships()
            .find(|(_, m)| m["organization"]["id"].as_str() == Some(org_id))
            .map(|(_, m)| m.clone());
        let slug = any
            .as_ref()
            .and_then(|m| m["organization"]["slug"].as_str())
            .map(str::to_owned);
        let permissions = membership
            .as_ref()
            .and_then(|m| m["permissions"].as_array())
            .map(|a| {
                // Session tokens never carry system permissions (Clerk's rule).
                a.iter()
                    .filter_map(Value::as_str)
                    .filter(|p| !p.starts_with("org:sys_"))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Some(OrgSpec {
            id: Some(org_id.to_owned()),
            slug,
            role: Some(role.to_owned()),
            permissions,
        })
    };
    let uat = now_secs();
    let token = s.mint(&TokenSpec {
        user_id: Some(user_id.to_owned()),
        session_id: Some(format!("sess_{}", random_id(27))),
        org,
        expires_in: Some(SESSION_LIFETIME_SECS),
        azp: Some(azp),
        ..TokenSpec::default()
    });
    redirect(
        &to,
        [
            cookie(SESSION_COOKIE, &token, SESSION_LIFETIME_SECS),
            cookie(CLIENT_UAT_COOKIE, &uat.to_string(), 365 * 86_400),
        ],
    )
}

async fn sign_out(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = same_origin_post(&s, &headers) {
        return *r;
    }
    let f = form(&body);
    let raw = f
        .get("redirect_url")
        .map(String::as_str)
        .unwrap_or_default();
    let (to, _) = match redirect_target(raw, &s.redirect_origins) {
        Ok(t) => t,
        Err(e) => return refused(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    redirect(
        &to,
        [
            cookie(SESSION_COOKIE, "", 0),
            cookie(CLIENT_UAT_COOKIE, "0", 365 * 86_400),
        ],
    )
}

/// The hosted pages.
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/sign-out", get(sign_out_page).post(sign_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_urls_go_to_loopback_or_an_allowed_origin_only() {
        let allowed = vec!["https://app.example.com".to_owned()];
        let ok = |raw: &str, url: &str, azp: &str| {
            let (u, o) = redirect_target(raw, &allowed).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!((u.as_str(), o.as_str()), (url, azp), "{raw}");
        };
        ok(
            "http://127.0.0.1:5173/",
            "http://127.0.0.1:5173/",
            "http://127.0.0.1:5173",
        );
        ok(
            "http://127.0.0.1:5173/app?x=1#top",
            "http://127.0.0.1:5173/app?x=1#top",
            "http://127.0.0.1:5173",
        );
        ok(
            "http://localhost:3000",
            "http://localhost:3000/",
            "http://localhost:3000",
        );
        ok(
            "HTTP://LOCALHOST:80/a",
            "http://localhost/a",
            "http://localhost",
        );
        ok(
            "http://[::1]:8080/",
            "http://[::1]:8080/",
            "http://[::1]:8080",
        );
        ok(
            "http://127.8.9.10/",
            "http://127.8.9.10/",
            "http://127.8.9.10",
        );
        ok(
            "https://app.example.com/done",
            "https://app.example.com/done",
            "https://app.example.com",
        );
        // The URL parser's reading of odd IPv4 forms is what the browser reads: still loopback.
        ok("http://0x7f.1/", "http://127.0.0.1/", "http://127.0.0.1");
        for bad in [
            "",
            "/relative",
            "//evil.example/",
            "evil.example",
            "https://evil.example/",
            "https://app.example.com.evil.example/",
            "http://app.example.com/",        // not the allowed scheme
            "https://app.example.com:8443/",  // not the allowed port
            "http://127.0.0.1@evil.example/", // userinfo: the host is evil.example
            "http://user:pw@127.0.0.1/",      // userinfo at all
            "http://evil.example#@127.0.0.1/",
            "http://evil.example\\@127.0.0.1/",
            "http:\\\\evil.example/",
            "http:/\\evil.example/",
            "javascript:alert(1)",
            "JaVaScRiPt://127.0.0.1/%0aalert(1)",
            "data:text/html,<script>alert(1)</script>",
            "ftp://127.0.0.1/",
            "file:///etc/passwd",
            "http://127.0.0.1.evil.example/",
            "http://localhost.evil.example/",
            "http://evil.example/?next=http://127.0.0.1/",
            " http://127.0.0.1/",
            "http://127.0.0.1/ x",
            "http://127.0.0.1/\r\nSet-Cookie: x=y",
            "http://127.0.0.1/\u{e9}",
            "http://\u{ff11}27.0.0.1/",
        ] {
            assert!(redirect_target(bad, &allowed).is_err(), "{bad:?} accepted");
        }
        let long = format!("http://127.0.0.1/{}", "a".repeat(3000));
        assert!(redirect_target(&long, &allowed).is_err());
        // Nothing beyond loopback without an allowlist.
        assert!(redirect_target("https://app.example.com/", &[]).is_err());
    }

    #[test]
    fn the_page_escapes_what_the_directory_holds() {
        assert_eq!(
            escape("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
    }

    /// The whole flow over real HTTP: the form lists the directory, the POST mints a token for
    /// the choice (azp: the app's origin) and sets Clerk's cookies, sign-out clears them, and
    /// hostile redirects and cross-site posts are refused.
    #[tokio::test]
    async fn sign_in_sets_clerks_cookies_and_redirects_back() {
        use base64::Engine as _;
        let emu = super::super::Emulator::start_local().await.unwrap();
        let user = emu.create_user(&super::super::UserSpec {
            first_name: Some("Ada <b>".into()),
            ..Default::default()
        });
        emu.add_membership(&super::super::MembershipSpec {
            user_id: user.clone(),
            org_id: "org_2acme".into(),
            org_slug: Some("acme".into()),
            role: Some("billing".into()),
            permissions: vec!["org:invoices:read".into()],
            ..Default::default()
        })
        .await;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let back = "http://127.0.0.1:5173/orders?x=1";
        let sign_in_url = |to: &str| {
            let q = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("redirect_url", to)
                .finish();
            format!("{}/sign-in?{q}", emu.url())
        };
        let page = http.get(sign_in_url(back)).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(html.contains(&format!("value=\"{user}\"")), "{html}");
        assert!(
            html.contains("Ada &lt;b&gt;") && !html.contains("Ada <b>"),
            "{html}"
        );
        assert!(html.contains("value=\"org_2acme\"") && html.contains("org:billing"));
        for evil in [
            "https://evil.example/",
            "//evil.example",
            "http://127.0.0.1@evil.example/",
        ] {
            let r = http.get(sign_in_url(evil)).send().await.unwrap();
            assert_eq!(r.status(), 400, "{evil}");
        }
        let post = |path: &'static str, body: String, origin: Option<String>| {
            let mut r = http
                .post(format!("{}{path}", emu.url()))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body);
            if let Some(o) = origin {
                r = r.header("origin", o);
            }
            r.send()
        };
        let form = |pairs: &[(&str, &str)]| {
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish()
        };
        let choice = form(&[
            ("user_id", &user),
            ("org_id", "org_2acme"),
            ("role", "org:billing"),
            ("redirect_url", back),
        ]);
        // Another page cannot sign the browser in (login CSRF).
        let r = post(
            "/sign-in",
            choice.clone(),
            Some("https://evil.example".into()),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 403);
        let r = post("/sign-in", choice.clone(), Some(emu.url()))
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        assert_eq!(r.headers()["location"], back);
        let cookies: Vec<&str> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(cookies.len(), 2, "{cookies:?}");
        let token = cookies[0]
            .strip_prefix("__session=")
            .and_then(|c| c.split_once(';'))
            .map(|(t, _)| t)
            .expect("__session first");
        assert!(cookies[0].ends_with("; Path=/; SameSite=Lax; Max-Age=3600"));
        assert!(!cookies[0].to_ascii_lowercase().contains("httponly"));
        let uat: i64 = cookies[1]
            .strip_prefix("__client_uat=")
            .and_then(|c| c.split_once(';'))
            .map(|(t, _)| t.parse().unwrap())
            .expect("__client_uat second");
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["sub"], user.as_str());
        assert_eq!(claims["azp"], "http://127.0.0.1:5173");
        assert_eq!(claims["o"]["id"], "org_2acme");
        assert_eq!(claims["o"]["rol"], "billing");
        assert_eq!(claims["o"]["per"], "read");
        assert!(
            claims["iat"].as_i64().unwrap() >= uat,
            "iat before __client_uat"
        );
        // Hostile choices.
        for (pairs, status) in [
            (
                vec![("user_id", "user_nobody"), ("redirect_url", back)],
                400,
            ),
            (
                vec![
                    ("user_id", user.as_str()),
                    ("org_id", "org_nope"),
                    ("role", "org:admin"),
                    ("redirect_url", back),
                ],
                400,
            ),
            (
                vec![
                    ("user_id", user.as_str()),
                    ("org_id", "org_2acme"),
                    ("role", "org:god"),
                    ("redirect_url", back),
                ],
                400,
            ),
            (
                vec![
                    ("user_id", user.as_str()),
                    ("redirect_url", "https://evil.example/"),
                ],
                400,
            ),
        ] {
            let r = post("/sign-in", form(&pairs), None).await.unwrap();
            assert_eq!(r.status(), status, "{pairs:?}");
            assert!(r.headers().get("set-cookie").is_none());
        }
        // Sign-out: the session cookie cleared, __client_uat=0 (signed out).
        let r = post(
            "/sign-out",
            form(&[("redirect_url", back)]),
            Some(emu.url()),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 303);
        let cookies: Vec<&str> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert!(cookies[0].starts_with("__session=; ") && cookies[0].ends_with("Max-Age=0"));
        assert!(cookies[1].starts_with("__client_uat=0; "));
        // The hosted pages are not Clerk-facing traffic.
        assert_eq!(emu.stats().bapi_requests, 0);
    }
}
