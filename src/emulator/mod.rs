//! An offline Clerk for quickstarts, examples, tests and CI: JWKS endpoints, Clerk-shaped
//! session tokens, key rotation and fault injection.
//!
//! | endpoint | what |
//! | --- | --- |
//! | `GET /v1/jwks` | the Backend API JWKS; needs `Authorization: Bearer <secret key>`, else a Clerk-shaped 401 |
//! | `GET /.well-known/jwks.json` | the Frontend API JWKS (public) |
//! | `POST /emulator/tokens` | mints a session token from a [`TokenSpec`] (JSON); answers `{"object":"token","jwt":…}` |
//! | `POST /emulator/keys/rotate` | rotates the signing key (the old key stays in the JWKS); answers `{"kid":…}` |
//! | `PUT /emulator/faults` | `{"jwks_status": 503}` makes both JWKS endpoints fail; `{"jwks": {"status": 429, "retry_after": "1", "times": 1}}` only the next request, with a `Retry-After`; `null` heals |
//! | `GET /emulator/stats` | request counts since start or the last reset: `{"jwks_requests": n, "bapi_requests": n, "requests": {"GET /v1/jwks": n, "GET /v1/users/{user_id}": n, …}}` (see [Stats](#stats)) |
//! | `POST /emulator/stats/reset` | sets every count to zero; answers the counts it cleared (same shape) |
//! | `POST /m2m_tokens` | creates an M2M token (Bearer machine secret key; `seconds_until_expiration`, `claims`, `token_format: "jwt"`) |
//! | `POST /m2m_tokens/verify`, `/api_keys/verify`, `/oauth_applications/access_tokens/verify` | Clerk's verify endpoints (also under `/v1`); unknown → 404, revoked / expired → 400 `token_revoked` / `token_expired` |
//! | `POST /m2m_tokens/{m2m_token_id}/revoke`, `/api_keys/{api_key_id}/revoke` | revoke (Bearer secret or machine secret key) |
//! | `POST /api_keys` | creates an API key (Bearer secret key; `subject`, `name`, `scopes`, `claims`) |
//! | `POST /emulator/machines` | creates a machine `{"name", "scopes": [callee ids]}` → id and machine secret key |
//! | `POST /emulator/machine_tokens` | mints any machine token from a [`MachineTokenSpec`] → `{"token": …}` |
//! | `PUT /emulator/faults/bapi` | `{"status": 429, "retry_after": 2}` makes the Backend API fail: the machine endpoints (verify, `POST /m2m_tokens`) and the identity endpoints (users, memberships, sessions); each request is counted in `bapi_requests`; `null` heals |
//! | `GET /sign-in?redirect_url=…`, `POST /sign-in`; `GET`/`POST /sign-out` | hosted pages for browser apps: pick a user, organization and role → `__session` and `__client_uat` cookies, redirect back (see [`sign_in`]) |
//! | `GET /v1/users/{user_id}`, `/v1/users/{user_id}/organization_memberships`, `/v1/sessions/{session_id}`, `/v1/sessions?user_id=…` (a user's or client's sessions: `status`, `limit`, `offset`, `paginated`); `POST /v1/sessions/{session_id}/revoke` | the identity endpoints (Bearer secret key) |
//!
//! # Stats
//!
//! Every request to a Clerk-facing route — the two JWKS endpoints and the Backend API
//! routes above, everything but the emulator's own control routes — is counted when it
//! arrives (a path that matches no route included, as `<unmatched>`), whatever its
//! answer (an injected fault, a 401, a 404, a refused body, a 405 for a method the route does
//! not serve):
//!
//! - `requests` is keyed by `"METHOD /route/template"`: the route as registered, never the
//!   path as sent (`GET /v1/users/{user_id}` for every user id, hostile or not). A method
//!   other than the nine standard ones counts as `OTHER`. A path that matches no route counts
//!   as `"METHOD <unmatched>"` (whatever the path). So the keys are bounded by the routes.
//!   Keys are sorted.
//! - `jwks_requests` is the sum of the `requests` under `/v1/jwks` and
//!   `/.well-known/jwks.json`; `bapi_requests` the sum under every other counted route
//!   template (`<unmatched>` feeds neither).
//!
//! [`Emulator::stats`] and [`Emulator::reset_stats`] do the same from Rust. A reset starts
//! every count again from zero: [`Emulator::wait_jwks_requests`] and
//! [`Emulator::wait_bapi_requests`] count from the last reset, including a wait already under
//! way when the reset happens.
//!
//! Tests start it in-process on `127.0.0.1:0`:
//!
//! ```no_run
//! # async fn t() -> Result<(), Box<dyn std::error::Error>> {
//! use clerk_grpc_auth::emulator::{Emulator, TokenSpec};
//! let clerk = Emulator::start_local().await?;
//! let token = clerk.mint(&TokenSpec::default());
//! println!("{} {}", clerk.url(), token);
//! # Ok(()) }
//! ```
//!
//! Layer: the `emulator` feature, beside the server (neither imports the other). May import
//! `token` (to sign tokens as Clerk does), `clerk::svix` (to sign webhooks), `secret`,
//! `canonical` (origins, for the sign-in page's redirects).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::KeySize,
    signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256, RSA_PKCS1_SHA384, RSA_PKCS1_SHA512},
};
use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use rand::{distr::Alphanumeric, Rng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::token::{check::CAT_SESSION, keys::Alg};

mod directory;
mod machines;
pub mod sign_in;

pub use directory::{role_permissions, MemberPatch, MembershipSpec, OrganizationPatch, UserSpec};
pub use machines::{Machine, MachineTokenKind, MachineTokenSpec};

/// An RSA-2048 signing key with a Clerk-like kid (`ins_…`).
pub struct SigningKey {
    kid: String,
    pair: RsaKeyPair,
}

/// What a minted session token carries. Every field is optional; see [`Emulator::mint`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenSpec {
    /// `sub`. Defaults to a random `user_…`.
    pub user_id: Option<String>,
    /// `sid`. Defaults to a random `sess_…`.
    pub session_id: Option<String>,
    /// The active organization.
    pub org: Option<OrgSpec>,
    /// Lifetime in seconds from now (negative for an already expired token). Defaults to 60.
    pub expires_in: Option<i64>,
    /// Mint v1 claims (`org_*`) instead of v2 (`v: 2`, `o`).
    pub v1: bool,
    /// `azp`. Defaults to none.
    pub azp: Option<String>,
    /// `sts` (`active`, `pending`). Defaults to `active` for v2, absent for v1.
    pub session_status: Option<String>,
    /// Extra `fea` entries, scoped (`u:feature`, `o:feature`, `uo:feature`).
    pub features: Vec<String>,
    /// `pla` entries, scoped (`u:free`, `o:pro`).
    pub plans: Vec<String>,
    /// `fva`: [first, second] factor ages in minutes.
    pub fva: Option<[i64; 2]>,
    /// Claims set last, overriding anything above (e.g. `nbf`, `iat`, `aud`).
    pub extra_claims: Map<String, Value>,
    /// Header fields set last (e.g. `cat`, `typ`); `null` removes a field.
    pub extra_header: Map<String, Value>,
}

/// An organization membership for a minted token.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OrgSpec {
    /// `org_…`. Defaults to a random id.
    pub id: Option<String>,
    /// The slug.
    pub slug: Option<String>,
    /// Role key, with or without the `org:` prefix (`admin` or `org:admin`).
    pub role: Option<String>,
    /// Permissions as full keys `org:<feature>:<permission>`.
    pub permissions: Vec<String>,
}

/// Settings of an emulator.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// The secret key `/v1/jwks` requires. Defaults to a random `sk_test_…`.
    pub secret_key: String,
    /// Origins (`https://app.example.com`) the sign-in and sign-out pages may redirect to,
    /// besides loopback hosts (always allowed). Defaults to none. Entries that are not origins
    /// are ignored.
    pub redirect_origins: Vec<String>,
}

/// A fault the JWKS endpoints inject (see [`Emulator::set_jwks_fault`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwksFault {
    /// Answer this HTTP status with a Clerk error body.
    pub status: Option<u16>,
    /// Wait this many milliseconds before answering (a slow Clerk).
    pub delay_ms: Option<u64>,
    /// Hold every request until the fault changes (a Clerk that never answers: the
    /// client's timeout decides).
    pub hang: bool,
    /// Answer `200 application/json` with this body instead of the keys (garbage, keys of
    /// the wrong type or size, a hostile document).
    pub body: Option<String>,
    /// With `status`: send this `Retry-After` value verbatim (`"1"`, an HTTP-date, garbage).
    pub retry_after: Option<String>,
    /// Apply the fault to the next this many requests only, then heal (`None`: until changed).
    pub times: Option<u64>,
}

impl JwksFault {
    /// The injected answer; `None` when only a delay or hang was injected (the keys follow).
    fn answer(&self) -> Option<Response> {
        if let Some(status) = self.status {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut resp = clerk_error(
                status,
                "internal_clerk_error",
                "Something went wrong",
                "Injected failure",
            );
            if let Some(v) = self
                .retry_after
                .as_deref()
                .and_then(|v| http::HeaderValue::from_str(v).ok())
            {
                resp.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
            return Some(resp);
        }
        self.body.as_ref().map(|body| {
            (
                [(http::header::CONTENT_TYPE, "application/json")],
                body.clone(),
            )
                .into_response()
        })
    }
}

/// Request counts of an emulator since it started or since the last reset: what
/// `GET /emulator/stats` answers (see [the module docs](self#stats)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EmulatorStats {
    /// Requests to `/v1/jwks` and `/.well-known/jwks.json`.
    pub jwks_requests: u64,
    /// Requests to every other Clerk-facing route (the Backend API).
    pub bapi_requests: u64,
    /// Requests by `"METHOD /route/template"` (e.g. `"GET /v1/users/{user_id}"`), sorted.
    pub requests: BTreeMap<String, u64>,
}

impl EmulatorStats {
    /// The count under `key` (`"GET /v1/jwks"`); 0 when none arrived.
    pub fn get(&self, key: &str) -> u64 {
        self.requests.get(key).copied().unwrap_or(0)
    }
}

/// The routes whose requests feed `jwks_requests`.
const JWKS_ROUTES: [&str; 2] = ["/v1/jwks", "/.well-known/jwks.json"];

/// The key of a request to a path that matches no route.
const UNMATCHED: &str = "<unmatched>";

/// The method as a key: one of the nine standard methods, or `OTHER` (extension methods
/// must not make keys).
fn method_key(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

struct Shared {
    secret_key: String,
    issuer: String,
    /// Canonical origins the hosted pages may redirect to (besides loopback).
    redirect_origins: Vec<String>,
    keys: Mutex<Vec<Arc<SigningKey>>>,
    jwks_fault: watch::Sender<Option<JwksFault>>,
    stats: watch::Sender<EmulatorStats>,
    machines: Mutex<machines::MachineState>,
    bapi_failure: Mutex<Option<machines::BapiFault>>,
    directory: Mutex<directory::DirectoryState>,
    latency: Mutex<directory::Latency>,
    http: reqwest::Client,
}

/// A running emulator. Dropping it stops the server.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// The emulator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// Binding or serving failed.
    #[error("emulator I/O error")]
    Io(#[from] std::io::Error),
    /// RSA key generation failed.
    #[error("RSA key generation failed")]
    KeyGen,
}

// === impl SigningKey ===

impl SigningKey {
    /// Generates an RSA-2048 key with a random `ins_…` kid.
    pub fn generate() -> Result<Self, EmulatorError> {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| EmulatorError::KeyGen)?;
        Ok(Self {
            kid: format!("ins_{}", random_id(27)),
            pair,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a Clerk JWKS entry.
    pub fn jwk(&self) -> Value {
        let pk = self.pair.public_key();
        json!({
            "use": "sig",
            "kty": "RSA",
            "kid": self.kid,
            "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(pk.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(pk.exponent().big_endian_without_leading_zero()),
        })
    }

    /// Signs `header.payload` (both serialised as given) with `alg`.
    pub fn sign_jwt(&self, header: &Value, payload: &Value, alg: Alg) -> String {
        let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).expect("JSON"));
        let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(payload).expect("JSON"));
        let input = format!("{h}.{p}");
        let sig = self.sign_raw(&input, alg);
        format!("{input}.{sig}")
    }

    /// The base64url (unpadded) signature over exactly `signing_input` (for crafting tokens
    /// whose segments are not canonical JSON or base64url).
    pub fn sign_raw(&self, signing_input: &str, alg: Alg) -> String {
        let enc = match alg {
            Alg::RS256 => &RSA_PKCS1_SHA256,
            Alg::RS384 => &RSA_PKCS1_SHA384,
            Alg::RS512 => &RSA_PKCS1_SHA512,
        };
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(
                enc,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
        URL_SAFE_NO_PAD.encode(sig)
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn random_id(n: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// === impl TokenSpec ===

impl TokenSpec {
    /// The claims this spec produces at `now` (seconds), for `issuer`.
    pub fn claims(&self, issuer: &str, now: i64) -> Map<String, Value> {
        let mut c = Map::new();
        c.insert("iss".into(), issuer.into());
        c.insert(
            "sub".into(),
            self.user_id
                .clone()
                .unwrap_or_else(|| format!("user_{}", random_id(27)))
                .into(),
        );
        c.insert(
            "sid".into(),
            self.session_id
                .clone()
                .unwrap_or_else(|| format!("sess_{}", random_id(27)))
                .into(),
        );
        c.insert("iat".into(), now.into());
        c.insert("nbf".into(), (now - 10).into());
        c.insert(
            "exp".into(),
            now.saturating_add(self.expires_in.unwrap_or(60)).into(),
        );
        c.insert("jti".into(), random_id(20).into());
        if let Some(azp) = &self.azp {
            c.insert("azp".into(), azp.clone().into());
        }
        if let Some(fva) = self.fva {
            c.insert("fva".into(), json!(fva));
        }
        let org = self.org.as_ref().map(|o| {
            let id =
                o.id.clone()
                    .unwrap_or_else(|| format!("org_{}", random_id(27)));
            let role = o
                .role
                .as_deref()
                .map(|r| r.trim_start_matches("org:").to_owned());
            (o, id, role)
        });
        if self.v1 {
            if let Some((o, id, role)) = org {
                c.insert("org_id".into(), id.into());
                if let Some(slug) = &o.slug {
                    c.insert("org_slug".into(), slug.clone().into());
                }
                if let Some(role) = role {
                    c.insert("org_role".into(), format!("org:{role}").into());
                }
                c.insert("org_permissions".into(), json!(o.permissions));
            }
            if let Some(sts) = &self.session_status {
                c.insert("sts".into(), sts.clone().into());
            }
            if !self.features.is_empty() {
                c.insert("fea".into(), self.features.join(",").into());
            }
        } else {
            c.insert("v".into(), 2.into());
            c.insert(
                "sts".into(),
                self.session_status
                    .clone()
                    .unwrap_or_else(|| "active".into())
                    .into(),
            );
            // Features: those the permissions name (org-scoped), then the extra ones.
            let mut fea: Vec<String> = Vec::new();
            let mut perm_names: Vec<String> = Vec::new();
            let mut pairs: Vec<(String, String)> = Vec::new();
            if let Some((o, _, _)) = &org {
                for p in &o.permissions {
                    let rest = p.strip_prefix("org:").unwrap_or(p);
                    let Some((feature, perm)) = rest.split_once(':') else {
                        continue;
                    };
                    let scoped = format!("o:{feature}");
                    if !fea.contains(&scoped) {
                        fea.push(scoped);
                    }
                    if !perm_names.iter().any(|n| n == perm) {
                        perm_names.push(perm.to_owned());
                    }
                    pairs.push((feature.to_owned(), perm.to_owned()));
                }
            }
            for f in &self.features {
                if !fea.contains(f) {
                    fea.push(f.clone());
                }
            }
            if !fea.is_empty() {
                c.insert("fea".into(), fea.join(",").into());
            }
            if let Some((o, id, role)) = org {
                let mut obj = Map::new();
                obj.insert("id".into(), id.into());
                if let Some(slug) = &o.slug {
                    obj.insert("slg".into(), slug.clone().into());
                }
                if let Some(role) = role {
                    obj.insert("rol".into(), role.into());
                }
                if !perm_names.is_empty() {
                    // One mask per org-scoped feature, in `fea` order (Clerk's JS alignment).
                    let masks: Vec<String> = fea
                        .iter()
                        .filter_map(|f| {
                            let (scope, name) = f.split_once(':')?;
                            matches!(scope, "o" | "ou" | "uo").then_some(name)
                        })
                        .map(|feature| {
                            let mut mask = num_bigint::BigUint::default();
                            for (f, p) in &pairs {
                                if f == feature {
                                    let bit = perm_names.iter().position(|n| n == p).unwrap_or(0);
                                    mask.set_bit(bit as u64, true);
                                }
                            }
                            mask.to_string()
                        })
                        .collect();
                    obj.insert("per".into(), perm_names.join(",").into());
                    obj.insert("fpm".into(), masks.join(",").into());
                }
                c.insert("o".into(), Value::Object(obj));
            }
        }
        if !self.plans.is_empty() {
            c.insert("pla".into(), self.plans.join(",").into());
        }
        for (k, v) in &self.extra_claims {
            c.insert(k.clone(), v.clone());
        }
        c
    }
}

// === impl Emulator ===

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            secret_key: format!("sk_test_{}", random_id(40)),
            redirect_origins: Vec::new(),
        }
    }
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("secret_key", &"…")
            .field("redirect_origins", &self.redirect_origins)
            .finish()
    }
}

impl Emulator {
    /// Starts on `127.0.0.1:0` with a random secret key.
    pub async fn start_local() -> Result<Self, EmulatorError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start(EmulatorConfig::default(), listener).await
    }

    /// Starts serving on `listener`.
    pub async fn start(
        config: EmulatorConfig,
        listener: TcpListener,
    ) -> Result<Self, EmulatorError> {
        let addr = listener.local_addr()?;
        let key = tokio::task::spawn_blocking(SigningKey::generate)
            .await
            .map_err(|_| EmulatorError::KeyGen)??;
        let shared = Arc::new(Shared {
            secret_key: config.secret_key,
            issuer: format!("http://{addr}"),
            redirect_origins: config
                .redirect_origins
                .iter()
                .filter_map(|o| crate::canonical::origin(o.as_bytes()).ok())
                .collect(),
            keys: Mutex::new(vec![Arc::new(key)]),
            jwks_fault: watch::Sender::new(None),
            stats: watch::Sender::new(EmulatorStats::default()),
            machines: Mutex::new(machines::MachineState::default()),
            bapi_failure: Mutex::new(None),
            directory: Mutex::new(directory::DirectoryState::default()),
            latency: Mutex::new(directory::Latency::default()),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| EmulatorError::Io(std::io::Error::other(e)))?,
        });
        // One machine from the start, so that `token --m2m` works without setup.
        shared
            .machines
            .lock()
            .expect("lock")
            .create_machine("default");
        let app = Router::new()
            .route("/v1/jwks", get(bapi_jwks))
            .route("/.well-known/jwks.json", get(public_jwks))
            .route("/emulator/tokens", post(mint_token))
            .route("/emulator/keys/rotate", post(rotate_key))
            .route("/emulator/faults", put(set_faults))
            .route("/emulator/stats", get(stats))
            .route("/emulator/stats/reset", post(reset_stats))
            .merge(machines::routes())
            .merge(directory::routes())
            .merge(sign_in::routes())
            // Applied to every route and the fallback: it sees the matched route template.
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                count_requests,
            ))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "emulator stopped");
            }
        });
        Ok(Self {
            shared,
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: use as `CLERK_API_URL`. Also the `iss` of minted tokens.
    pub fn url(&self) -> String {
        self.shared.issuer.clone()
    }

    /// The secret key `/v1/jwks` requires.
    pub fn secret_key(&self) -> &str {
        &self.shared.secret_key
    }

    /// The current signing key.
    pub fn current_key(&self) -> Arc<SigningKey> {
        self.shared.current()
    }

    /// The current signing key's kid.
    pub fn kid(&self) -> String {
        self.current_key().kid.clone()
    }

    /// Mints a Clerk-shaped session token signed with the current key.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        self.shared.mint(spec)
    }

    /// Signs arbitrary header and claims with the current key (for crafting odd tokens).
    pub fn sign(&self, header: &Value, claims: &Value, alg: Alg) -> String {
        self.current_key().sign_jwt(header, claims, alg)
    }

    /// The standard session header for the current key: `{alg, kid, typ, cat}`.
    pub fn session_header(&self) -> Value {
        json!({"alg": "RS256", "kid": self.kid(), "typ": "JWT", "cat": CAT_SESSION})
    }

    /// Rotates: a new key signs from now on; the old one stays in the JWKS. Returns the new kid.
    pub async fn rotate(&self) -> Result<String, EmulatorError> {
        let key = tokio::task::spawn_blocking(SigningKey::generate)
            .await
            .map_err(|_| EmulatorError::KeyGen)??;
        Ok(self.shared.push_key(key))
    }

    /// Makes both JWKS endpoints answer `status` (e.g. 503), or heal with `None`.
    pub fn set_jwks_failure(&self, status: Option<u16>) {
        self.set_jwks_fault(status.map(|s| JwksFault {
            status: Some(s),
            ..JwksFault::default()
        }));
    }

    /// Injects a JWKS fault on both endpoints (status, delay, a hang, a substitute body), or
    /// heals with `None`. Requests held by a hang are released when the fault changes.
    pub fn set_jwks_fault(&self, fault: Option<JwksFault>) {
        self.shared.jwks_fault.send_replace(fault);
    }

    /// JWKS requests served since start or the last reset (both endpoints, failed ones
    /// included).
    pub fn jwks_requests(&self) -> u64 {
        self.shared.stats.borrow().jwks_requests
    }

    /// Waits until at least `n` JWKS requests have arrived since start or the last reset
    /// (a reset during the wait starts the count again).
    pub async fn wait_jwks_requests(&self, n: u64) {
        let mut rx = self.shared.stats.subscribe();
        let _ = rx.wait_for(|s| s.jwks_requests >= n).await;
    }

    /// Every request count (see [the module docs](self#stats)).
    pub fn stats(&self) -> EmulatorStats {
        self.shared.stats.borrow().clone()
    }

    /// Requests under `key` (`"GET /v1/users/{user_id}"`) since start or the last reset.
    pub fn requests(&self, key: &str) -> u64 {
        self.shared.stats.borrow().get(key)
    }

    /// Sets every count to zero; returns the counts it cleared.
    pub fn reset_stats(&self) -> EmulatorStats {
        self.shared.reset_stats()
    }

    /// Creates a machine (id `mch_…`, machine secret key `ak_…`).
    pub fn create_machine(&self, name: &str) -> Machine {
        self.shared
            .machines
            .lock()
            .expect("lock")
            .create_machine(name)
    }

    /// The machine created at start (`token --m2m` uses it by default).
    pub fn default_machine(&self) -> Machine {
        self.shared
            .machines
            .lock()
            .expect("lock")
            .first()
            .expect("a default machine")
    }

    /// Lets `caller`'s M2M tokens call `callee` (adds `callee` to `caller`'s scopes). `false`
    /// when `caller` does not exist.
    pub fn allow(&self, caller: &str, callee: &str) -> bool {
        self.shared
            .machines
            .lock()
            .expect("lock")
            .allow(caller, callee)
    }

    /// Mints a machine token; returns the token.
    ///
    /// # Panics
    /// When the spec names a machine that does not exist, or asks for a JWT API key.
    pub fn mint_machine(&self, spec: &MachineTokenSpec) -> String {
        self.shared
            .mint_machine_token(spec)
            .unwrap_or_else(|e| panic!("mint_machine: {e}"))
            .0
    }

    /// Revokes an opaque machine token (by token or id).
    pub fn revoke(&self, token_or_id: &str) -> bool {
        self.shared
            .machines
            .lock()
            .expect("lock")
            .revoke(token_or_id, Some("revoked by test".into()))
            .is_some()
    }

    /// Makes the machine-token verify endpoints answer `status` (with `Retry-After:
    /// retry_after` seconds when given), or heal with `None`.
    pub fn set_bapi_failure(&self, failure: Option<(u16, Option<u64>)>) {
        *self.shared.bapi_failure.lock().expect("lock") =
            failure.map(|(status, retry_after)| machines::BapiFault {
                status,
                retry_after,
            });
    }

    /// Backend API requests served since start or the last reset: machine tokens (create,
    /// verify, revoke) and identity (users, memberships, sessions); failed ones included.
    pub fn bapi_requests(&self) -> u64 {
        self.shared.stats.borrow().bapi_requests
    }

    /// Waits until at least `n` Backend API requests have arrived since start or the last
    /// reset (a reset during the wait starts the count again).
    pub async fn wait_bapi_requests(&self, n: u64) {
        let mut rx = self.shared.stats.subscribe();
        let _ = rx.wait_for(|s| s.bapi_requests >= n).await;
    }

    /// Creates a user; returns its id.
    pub fn create_user(&self, spec: &UserSpec) -> String {
        self.shared.create_user(spec)["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Adds an organization membership (and sends `organizationMembership.created`).
    pub async fn add_membership(&self, spec: &MembershipSpec) {
        let m = self.shared.add_membership(spec);
        self.shared
            .send_webhook("organizationMembership.created", m)
            .await;
    }

    /// Changes a user's first name (and sends `user.updated`).
    pub async fn rename_user(&self, user_id: &str, first_name: &str) -> bool {
        let user = {
            let mut d = self.shared.directory.lock().expect("lock");
            match d.user_mut(user_id) {
                Some(u) => {
                    u["first_name"] = first_name.into();
                    let u = u.clone();
                    d.refresh_memberships_of(user_id);
                    u
                }
                None => return false,
            }
        };
        self.shared.send_webhook("user.updated", user).await;
        true
    }

    /// Changes an organization (and sends `organization.updated`, waiting for its delivery).
    /// `false` for an unknown organization.
    pub async fn update_organization(&self, org_id: &str, patch: &OrganizationPatch) -> bool {
        match self.shared.update_organization(org_id, patch) {
            Some(org) => {
                self.shared.send_webhook("organization.updated", org).await;
                true
            }
            None => false,
        }
    }

    /// Changes a member's role and permissions (and sends `organizationMembership.updated`,
    /// waiting for its delivery). `false` when the user is not a member.
    pub async fn update_member(&self, org_id: &str, user_id: &str, patch: &MemberPatch) -> bool {
        match self.shared.update_member(org_id, user_id, patch) {
            Some(m) => {
                self.shared
                    .send_webhook("organizationMembership.updated", m)
                    .await;
                true
            }
            None => false,
        }
    }

    /// Removes a member (and sends `organizationMembership.deleted`, waiting for its
    /// delivery). `false` when the user was not a member.
    pub async fn remove_member(&self, org_id: &str, user_id: &str) -> bool {
        match self.shared.remove_member(org_id, user_id) {
            Some(m) => {
                self.shared
                    .send_webhook("organizationMembership.deleted", m)
                    .await;
                true
            }
            None => false,
        }
    }

    /// Creates an active session for a user; returns its id.
    pub fn create_session(&self, user_id: &str) -> String {
        let id = format!("sess_{}", random_id(27));
        self.shared
            .directory
            .lock()
            .expect("lock")
            .ensure(user_id, Some(&id));
        id
    }

    /// Sets a session's status (`revoked`, `ended`, `removed` send their webhook and wait for
    /// its delivery). `false` for an unknown session.
    pub async fn set_session_status(&self, session_id: &str, status: &str) -> bool {
        self.shared
            .set_session_status(session_id, status)
            .await
            .is_some()
    }

    /// Sends webhooks to `url`, signed with `secret` (`whsec_…`); `None` stops sending.
    ///
    /// # Panics
    /// When `secret` is not a usable Svix secret.
    pub fn set_webhook(&self, target: Option<(&str, &str)>) {
        let target = target.map(|(url, secret)| {
            let v = crate::clerk::svix::SvixVerifier::new(
                &crate::secret::Secret::new(secret),
                std::time::Duration::from_secs(300),
            )
            .expect("a whsec_ secret");
            (url.to_owned(), v)
        });
        self.shared
            .directory
            .lock()
            .expect("lock")
            .set_webhook(target);
    }

    /// Sends an arbitrary event to the webhook target; returns the HTTP status it answered.
    pub async fn send_webhook(&self, kind: &str, data: Value) -> Option<u16> {
        self.shared.send_webhook(kind, data).await
    }

    /// Delays every identity endpoint by `latency`.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.shared.latency.lock().expect("lock").0 = latency;
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        self.release_held();
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Emulator {
    /// Lets requests held by a `hang` fault finish, so that a graceful stop does not wait on
    /// them forever.
    fn release_held(&self) {
        self.shared.jwks_fault.send_replace(None);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.release_held();
        self.stop.cancel();
    }
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

// === impl Shared ===

impl Shared {
    fn current(&self) -> Arc<SigningKey> {
        self.keys
            .lock()
            .expect("lock")
            .last()
            .expect("a key")
            .clone()
    }

    fn push_key(&self, key: SigningKey) -> String {
        let kid = key.kid.clone();
        let mut keys = self.keys.lock().expect("lock");
        keys.push(Arc::new(key));
        // Keep the JWKS small, as Clerk does: current and previous keys only.
        let excess = keys.len().saturating_sub(2);
        keys.drain(..excess);
        kid
    }

    fn mint(&self, spec: &TokenSpec) -> String {
        let key = self.current();
        let mut header = json!({"alg": "RS256", "kid": key.kid, "typ": "JWT", "cat": CAT_SESSION});
        for (k, v) in &spec.extra_header {
            if v.is_null() {
                header.as_object_mut().expect("object").remove(k);
            } else {
                header[k] = v.clone();
            }
        }
        let claims = spec.claims(&self.issuer, now_secs());
        if let Some(sub) = claims.get("sub").and_then(Value::as_str) {
            // The token's user and session exist at this "Clerk" (GetUser, GetSession work).
            self.directory
                .lock()
                .expect("lock")
                .ensure(sub, claims.get("sid").and_then(Value::as_str));
        }
        key.sign_jwt(&header, &Value::Object(claims), Alg::RS256)
    }

    fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .lock()
            .expect("lock")
            .iter()
            .map(|k| k.jwk())
            .collect();
        json!({ "keys": keys })
    }

    /// Counts a request to `route` (the matched template; `None`: no route matched). The
    /// `/emulator/*` control routes are not counted.
    fn count(&self, method: &Method, route: Option<&str>) {
        let key = match route {
            Some(r) if r.starts_with("/emulator/") || sign_in::ROUTES.contains(&r) => return,
            Some(r) => format!("{} {r}", method_key(method)),
            None => format!("{} {UNMATCHED}", method_key(method)),
        };
        self.stats.send_modify(|s| {
            match route {
                Some(r) if JWKS_ROUTES.contains(&r) => s.jwks_requests += 1,
                Some(_) => s.bapi_requests += 1,
                None => {}
            }
            *s.requests.entry(key).or_insert(0) += 1;
        });
    }

    fn reset_stats(&self) -> EmulatorStats {
        self.stats.send_replace(EmulatorStats::default())
    }

    /// Applies the injected JWKS fault, if any: waits (delay, hang), then answers with the
    /// injected status or body. `None`: serve the keys.
    async fn failure(&self) -> Option<Response> {
        let mut rx = self.jwks_fault.subscribe();
        let fault = rx.borrow_and_update().clone()?;
        if fault.times.is_some() {
            // Count this request against `times`; the last one heals the fault.
            let mut applies = false;
            self.jwks_fault.send_if_modified(|f| match f {
                Some(JwksFault { times: Some(n), .. }) => {
                    applies = *n > 0;
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        *f = None;
                    }
                    true
                }
                _ => false,
            });
            if !applies {
                return None;
            }
            rx.borrow_and_update();
        }
        if let Some(ms) = fault.delay_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if fault.hang {
            // Held until the fault is changed or cleared; then answered as it now stands.
            let _ = rx.changed().await;
            return rx.borrow().as_ref().and_then(JwksFault::answer);
        }
        fault.answer()
    }
}

fn clerk_error(status: StatusCode, code: &str, message: &str, long: &str) -> Response {
    (
        status,
        Json(json!({
            "errors": [{ "message": message, "long_message": long, "code": code }],
            "clerk_trace_id": random_id(32),
        })),
    )
        .into_response()
}

async fn bapi_jwks(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let auth = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.and_then(|a| a.strip_prefix("Bearer ")) {
        None => {
            return clerk_error(
                StatusCode::UNAUTHORIZED,
                "authentication_invalid",
                "Invalid authentication",
                "Unable to authenticate the request, you need to supply an active API key",
            )
        }
        Some(k) if k != s.secret_key => {
            return clerk_error(
                StatusCode::UNAUTHORIZED,
                "clerk_key_invalid",
                "Secret Key is invalid",
                "The provided Clerk Secret Key is invalid. Make sure that your Clerk Secret Key is correct.",
            )
        }
        Some(_) => {}
    }
    if let Some(r) = s.failure().await {
        return r;
    }
    Json(s.jwks()).into_response()
}

async fn public_jwks(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = s.failure().await {
        return r;
    }
    Json(s.jwks()).into_response()
}

async fn mint_token(State(s): State<Arc<Shared>>, Json(spec): Json<TokenSpec>) -> Response {
    let jwt = s.mint(&spec);
    Json(json!({"object": "token", "jwt": jwt})).into_response()
}

async fn rotate_key(State(s): State<Arc<Shared>>) -> Response {
    match tokio::task::spawn_blocking(SigningKey::generate).await {
        Ok(Ok(key)) => Json(json!({"kid": s.push_key(key)})).into_response(),
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(Deserialize)]
struct Faults {
    /// Shorthand for `{"jwks": {"status": …}}`.
    jwks_status: Option<u16>,
    jwks: Option<JwksFault>,
}

async fn set_faults(State(s): State<Arc<Shared>>, Json(f): Json<Faults>) -> Response {
    let fault = f.jwks.or(f.jwks_status.map(|status| JwksFault {
        status: Some(status),
        ..JwksFault::default()
    }));
    s.jwks_fault.send_replace(fault);
    StatusCode::NO_CONTENT.into_response()
}

/// Counts every request on arrival, before its handler (and its extractors) run.
async fn count_requests(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    s.count(req.method(), route);
    next.run(req).await
}

async fn stats(State(s): State<Arc<Shared>>) -> Response {
    let snapshot = s.stats.borrow().clone();
    Json(snapshot).into_response()
}

async fn reset_stats(State(s): State<Arc<Shared>>) -> Response {
    Json(s.reset_stats()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::identity::split_by_scope;

    #[test]
    fn v2_spec_encodes_permissions_that_decode_back() {
        let spec = TokenSpec {
            org: Some(OrgSpec {
                id: Some("org_1".into()),
                slug: Some("acme".into()),
                role: Some("org:admin".into()),
                permissions: vec![
                    "org:invoices:read".into(),
                    "org:invoices:write".into(),
                    "org:teams:read".into(),
                ],
            }),
            features: vec!["u:dashboard".into()],
            ..Default::default()
        };
        let c = spec.claims("http://x", 1_000);
        let o = c["o"].as_object().unwrap();
        assert_eq!(o["rol"], "admin");
        let fea = split_by_scope(c["fea"].as_str()).unwrap();
        let perms = crate::token::identity::decode_fpm(
            &fea.organization,
            o["per"].as_str(),
            o["fpm"].as_str(),
        );
        assert_eq!(
            perms,
            ["org:invoices:read", "org:invoices:write", "org:teams:read"]
        );
        assert_eq!(fea.user, ["dashboard"]);
    }
}
