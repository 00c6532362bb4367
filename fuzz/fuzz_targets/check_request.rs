//! `Check` request handling end to end: Envoy-shaped requests built from arbitrary bytes (first
//! line `METHOD HOST PATH`, then `name: value` header lines; `{token}` stands for a valid
//! token, and an odd first byte adds `authorization: Bearer <valid token>` unless the input
//! sets that header itself) through the real `ExtAuthz` service over a real verifier. An error or a denial is
//! fine; a panic is a bug, and so is an allowed request that carried no valid token.
#![no_main]

use std::{collections::HashMap, sync::Arc, sync::OnceLock};

use clerk_grpc_auth::{
    emulator::{SigningKey, TokenSpec},
    ext_authz::{ExtAuthz, RoutePolicy},
    jwks::KeySource,
    keys::{Alg, KeySet, VerifyingKey},
    server::{Server, ServerConfig},
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request as AttrRequest},
    authorization_server::Authorization,
    AttributeContext, CheckRequest,
};
use libfuzzer_sys::fuzz_target;

struct Setup {
    runtime: tokio::runtime::Runtime,
    service: ExtAuthz,
    token: String,
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
        let service = runtime.block_on(async {
            let server = Server::build(config).expect("server");
            ExtAuthz::new(server.verifier().clone(), RoutePolicy::authenticated())
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
    let answer = s
        .runtime
        .block_on(s.service.check(tonic::Request::new(request)));
    if let Ok(answer) = answer {
        let code = answer.into_inner().status.map(|st| st.code).unwrap_or(-1);
        assert!(
            has_token || code != 0,
            "allowed without a valid token: {data:?}"
        );
    }
});
