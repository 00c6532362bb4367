//! `Check` request handling end to end: Envoy-shaped requests built from arbitrary bytes (first
//! line `METHOD HOST PATH`, then `name: value` header lines; `{token}` stands for a valid
//! token, and an odd first byte adds `authorization: Bearer <valid token>` unless the input
//! sets that header itself) through the real `ExtAuthz` service over a real verifier. An error or a denial is
//! fine; a panic is a bug, and so is an allowed request that carried no valid token.
//!
//! The same request also goes to a second service whose policy is public by default but
//! protects `/admin`, the host `ops.example.com` and `DELETE /orders` (requirements the fuzz
//! token does not meet). Property: **a request is never allowed under a looser rule than its
//! canonical path selects** — computed here independently, as the most lenient upstream would
//! read the request (escapes decoded once or twice, `\` as `/`, `;` parameters stripped, the
//! fragment cut or kept, NUL truncation, case folded, slashes merged, dot segments resolved;
//! host lower-cased without userinfo, port or trailing dots; method trimmed and upper-cased):
//! if any such reading lands on a protected route, the request must not be allowed, token or
//! not.
#![no_main]

use std::{collections::HashMap, sync::Arc, sync::OnceLock};

use clerk_grpc_auth::{emulator::{SigningKey, TokenSpec}, server::{ext_authz::{ExtAuthz, RoutePolicy}, Server, ServerConfig}, verify::jwks::KeySource, token::keys::{Alg, KeySet, VerifyingKey}};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request as AttrRequest},
    authorization_server::Authorization,
    AttributeContext, CheckRequest,
};
use libfuzzer_sys::fuzz_target;

struct Setup {
    runtime: tokio::runtime::Runtime,
    service: ExtAuthz,
    open: ExtAuthz,
    token: String,
}

/// Public by default; `/admin`, the ops host and `DELETE /orders` need what the token lacks.
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

/// Percent-decodes every valid escape (what a lenient upstream does); invalid ones are kept.
fn decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Lower-cased, `\` as `/`, `;` parameters stripped, slashes merged, dot segments resolved
/// (clamped at the root).
fn lenient(path: &[u8]) -> String {
    let text = String::from_utf8_lossy(path).to_ascii_lowercase().replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        let seg = seg.split(';').next().unwrap_or_default();
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Every lenient reading of a raw path.
fn readings(raw: &str) -> Vec<String> {
    let target = raw.split('?').next().unwrap_or_default().as_bytes();
    let mut bases: Vec<Vec<u8>> = vec![target.to_vec()];
    if let Some(i) = target.iter().position(|&b| b == b'#') {
        bases.push(target[..i].to_vec());
    }
    let mut out = Vec::new();
    for base in bases {
        let once = decode(&base);
        let twice = decode(&once);
        for b in [base, once, twice] {
            if let Some(i) = b.iter().position(|&c| c == 0) {
                out.push(lenient(&b[..i]));
            }
            out.push(lenient(&b));
        }
    }
    out
}

fn under(path: &str, prefix: &str) -> bool {
    path == prefix || path.starts_with(&format!("{prefix}/"))
}

/// Whether any lenient reading of the request lands on a protected route of `OPEN_ROUTES`.
fn protected(method: &str, host: &str, path: &str) -> bool {
    let host = host.rsplit('@').next().unwrap_or_default().to_ascii_lowercase();
    let host = if host.starts_with('[') {
        host.as_str()
    } else {
        host.split(':').next().unwrap_or_default()
    };
    if host.trim_end_matches('.') == "ops.example.com" {
        return true;
    }
    let delete = method.trim().eq_ignore_ascii_case("DELETE");
    readings(path)
        .iter()
        .any(|p| under(p, "/admin") || (delete && under(p, "/orders")))
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let key = SigningKey::generate().expect("key");
        let jwk = key.jwk();
        let b64 = |s: &str| {
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s)
                .expect("b64")
        };
        let verifying = VerifyingKey::from_components(
            None,
            Some(Alg::RS256),
            &b64(jwk["n"].as_str().expect("n")),
            &b64(jwk["e"].as_str().expect("e")),
        )
        .expect("key");
        let config = ServerConfig::new(KeySource::Static(Arc::new(KeySet::single(verifying))));
        let (service, open) = runtime.block_on(async {
            let server = Server::build(config).expect("server");
            let open = RoutePolicy::from_toml(OPEN_ROUTES, "fuzz").expect("routes");
            (
                ExtAuthz::new(server.verifier().clone(), RoutePolicy::authenticated()),
                ExtAuthz::new(server.verifier().clone(), open),
            )
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let spec = TokenSpec {
            expires_in: Some(365 * 24 * 3600),
            ..TokenSpec::default()
        };
        let claims = serde_json::Value::Object(spec.claims("https://clerk.fuzz", now));
        let token = key.sign_jwt(
            &serde_json::json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT"}),
            &claims,
            Alg::RS256,
        );
        Setup {
            runtime,
            service,
            open,
            token,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let text = String::from_utf8_lossy(data);
    let bearer = data.first().is_some_and(|b| b & 1 == 1);
    let has_token = bearer || text.contains("{token}");
    let text = text.replace("{token}", &s.token);
    let mut lines = text.split('\n');
    let mut first = lines.next().unwrap_or_default().splitn(3, ' ');
    let (method, host, path) = (
        first.next().unwrap_or_default().to_owned(),
        first.next().unwrap_or_default().to_owned(),
        first.next().unwrap_or_default().to_owned(),
    );
    let mut headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if bearer {
        headers
            .entry("authorization".into())
            .or_insert_with(|| format!("Bearer {}", s.token));
    }
    let must_refuse = protected(&method, &host, &path);
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method,
                    host,
                    path,
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let code = |service: &ExtAuthz, request: CheckRequest| {
        s.runtime
            .block_on(service.check(tonic::Request::new(request)))
            .ok()
            .map(|a| a.into_inner().status.map(|st| st.code).unwrap_or(-1))
    };
    if let Some(code) = code(&s.service, request.clone()) {
        assert!(
            has_token || code != 0,
            "allowed without a valid token: {data:?}"
        );
    }
    if let Some(code) = code(&s.open, request) {
        assert!(
            !must_refuse || code != 0,
            "allowed under a looser rule than a reading of its path selects: {data:?}"
        );
    }
});
