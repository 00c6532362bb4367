//! The emulator's machine tokens: machines with machine secret keys, M2M tokens (opaque and
//! JWT), API keys and OAuth access tokens, with create / verify / revoke endpoints shaped like
//! Clerk's Backend API (un-versioned paths as Clerk's JS SDK calls them, `/v1/…` too).

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{clerk_error, now_secs, random_id, Shared};
use crate::token::{check::CAT_M2M, keys::Alg};

/// A machine: what M2M tokens are issued to.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `mch_…`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Its machine secret key (`ak_…`): creates its M2M tokens.
    pub secret_key: String,
    /// Machine ids its tokens may call (copied into every M2M token's scopes).
    pub scopes: Vec<String>,
}

/// What kind of machine token to mint (for `POST /emulator/machine_tokens` and the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineTokenKind {
    /// An M2M token (`mt_…`, or a JWT with `sub: mch_…`).
    #[default]
    M2m,
    /// An API key (`ak_…`).
    ApiKey,
    /// An OAuth access token (`oat_…`, or a JWT with `typ: at+jwt`).
    Oauth,
}

/// A machine token to mint. Every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineTokenSpec {
    /// The kind.
    pub kind: MachineTokenKind,
    /// JWT format instead of opaque (M2M and OAuth only).
    pub jwt: bool,
    /// M2M: the issuing machine (`mch_…`, default: the emulator's first machine). API key:
    /// the owner (`user_…` or `org_…`, default a random user). OAuth: the user.
    pub subject: Option<String>,
    /// Extra scopes (M2M: added to the machine's own scopes).
    pub scopes: Vec<String>,
    /// Lifetime in seconds (negative: already expired). Default: none for API keys and
    /// opaque M2M tokens, 3 600 for JWTs and OAuth tokens.
    pub expires_in: Option<i64>,
    /// OAuth: the client id (default random).
    pub client_id: Option<String>,
    /// API key: its name (default `emulator key`).
    pub name: Option<String>,
    /// Custom claims.
    pub claims: Map<String, Value>,
}

#[derive(Debug, Clone)]
struct Record {
    kind: MachineTokenKind,
    id: String,
    subject: String,
    scopes: Vec<String>,
    claims: Option<Map<String, Value>>,
    client_id: Option<String>,
    name: Option<String>,
    revoked: bool,
    revocation_reason: Option<String>,
    /// Milliseconds since the epoch.
    expiration: Option<i64>,
    created_at: i64,
}

/// Machine-token state of the emulator.
#[derive(Debug, Default)]
pub(super) struct MachineState {
    machines: Vec<Machine>,
    /// Opaque token → record.
    tokens: HashMap<String, Record>,
    /// Id → opaque token (for revoke by id).
    by_id: HashMap<String, String>,
}

/// An injected Backend API failure for the machine endpoints.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(super) struct BapiFault {
    pub status: u16,
    pub retry_after: Option<u64>,
}

fn now_ms() -> i64 {
    now_secs() * 1000
}

impl Record {
    fn object(&self) -> Value {
        let now = now_ms();
        let expired = self.expiration.is_some_and(|e| e <= now);
        match self.kind {
            MachineTokenKind::M2m => json!({
                "object": "machine_to_machine_token",
                "id": self.id,
                "subject": self.subject,
                "scopes": self.scopes,
                "claims": self.claims,
                "revoked": self.revoked,
                "revocation_reason": self.revocation_reason,
                "expired": expired,
                "expiration": self.expiration,
                "last_used_at": now,
                "created_at": self.created_at,
                "updated_at": self.created_at,
            }),
            MachineTokenKind::ApiKey => json!({
                "object": "api_key",
                "id": self.id,
                "type": "api_key",
                "name": self.name,
                "subject": self.subject,
                "description": null,
                "claims": self.claims,
                "scopes": self.scopes,
                "revoked": self.revoked,
                "revocation_reason": self.revocation_reason,
                "expired": expired,
                "expiration": self.expiration,
                "created_by": null,
                "last_used_at": now,
                "created_at": self.created_at,
                "updated_at": self.created_at,
            }),
            MachineTokenKind::Oauth => json!({
                "object": "clerk_idp_oauth_access_token",
                "id": self.id,
                "client_id": self.client_id,
                "type": "oauth_token",
                "subject": self.subject,
                "scopes": self.scopes,
                "revoked": self.revoked,
                "revocation_reason": self.revocation_reason,
                "expired": expired,
                "expiration": self.expiration,
                "created_at": self.created_at,
                "updated_at": self.created_at,
            }),
        }
    }
}

impl MachineState {
    pub(super) fn first(&self) -> Option<Machine> {
        self.machines.first().cloned()
    }

    pub(super) fn machine(&self, id: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.id == id)
    }

    fn by_secret(&self, secret: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.secret_key == secret)
    }

    pub(super) fn create_machine(&mut self, name: &str) -> Machine {
        let m = Machine {
            id: format!("mch_{}", random_id(27)),
            name: name.to_owned(),
            secret_key: format!("ak_{}", random_id(40)),
            scopes: Vec::new(),
        };
        self.machines.push(m.clone());
        m
    }

    pub(super) fn allow(&mut self, caller: &str, callee: &str) -> bool {
        match self.machines.iter_mut().find(|m| m.id == caller) {
            Some(m) => {
                if !m.scopes.iter().any(|s| s == callee) {
                    m.scopes.push(callee.to_owned());
                }
                true
            }
            None => false,
        }
    }

    pub(super) fn revoke(&mut self, token_or_id: &str, reason: Option<String>) -> Option<Value> {
        let token = self
            .by_id
            .get(token_or_id)
            .cloned()
            .unwrap_or_else(|| token_or_id.to_owned());
        let r = self.tokens.get_mut(&token)?;
        r.revoked = true;
        r.revocation_reason = reason;
        Some(r.object())
    }
}

impl Shared {
    /// Mints a machine token (and records it when opaque). Returns (token, id) or an error
    /// message.
    pub(super) fn mint_machine_token(
        &self,
        spec: &MachineTokenSpec,
    ) -> Result<(String, String), String> {
        let now = now_secs();
        let mut st = self.machines.lock().expect("lock");
        let (subject, mut scopes) = match spec.kind {
            MachineTokenKind::M2m => {
                let m = match &spec.subject {
                    Some(id) => st.machine(id).ok_or(format!("no machine {id}"))?,
                    None => st.machines.first().ok_or("the emulator has no machine")?,
                };
                (m.id.clone(), m.scopes.clone())
            }
            MachineTokenKind::ApiKey => (
                spec.subject
                    .clone()
                    .unwrap_or_else(|| format!("user_{}", random_id(27))),
                Vec::new(),
            ),
            MachineTokenKind::Oauth => (
                spec.subject
                    .clone()
                    .unwrap_or_else(|| format!("user_{}", random_id(27))),
                Vec::new(),
            ),
        };
        for s in &spec.scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        let default_ttl = match (spec.kind, spec.jwt) {
            (MachineTokenKind::Oauth, _) | (_, true) => Some(3600),
            _ => None,
        };
        let ttl = spec.expires_in.or(default_ttl);
        let prefix = match spec.kind {
            MachineTokenKind::M2m => "mt_",
            MachineTokenKind::ApiKey => "ak_",
            MachineTokenKind::Oauth => "oat_",
        };
        let id = format!("{prefix}{}", random_id(27));
        let client_id = (spec.kind == MachineTokenKind::Oauth)
            .then(|| spec.client_id.clone().unwrap_or_else(|| random_id(16)));
        if spec.jwt {
            if spec.kind == MachineTokenKind::ApiKey {
                return Err("API keys have no JWT form".into());
            }
            let key = self.current();
            let exp = now.saturating_add(ttl.unwrap_or(3600));
            let mut claims = spec.claims.clone();
            claims.insert("iss".into(), self.issuer.clone().into());
            claims.insert("sub".into(), subject.clone().into());
            claims.insert("iat".into(), now.into());
            claims.insert("nbf".into(), (now - 5).into());
            claims.insert("exp".into(), exp.into());
            claims.insert("jti".into(), id.clone().into());
            let header = if spec.kind == MachineTokenKind::M2m {
                claims.insert("aud".into(), json!(scopes));
                claims.insert("scopes".into(), scopes.join(" ").into());
                json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT", "cat": CAT_M2M})
            } else {
                claims.insert("client_id".into(), client_id.clone().into());
                claims.insert("scp".into(), json!(scopes));
                json!({"alg": "RS256", "kid": key.kid(), "typ": "at+jwt"})
            };
            return Ok((
                key.sign_jwt(&header, &Value::Object(claims), Alg::RS256),
                id,
            ));
        }
        let token = format!("{prefix}{}", random_id(40));
        let record = Record {
            kind: spec.kind,
            id: id.clone(),
            subject,
            scopes,
            claims: (!spec.claims.is_empty()).then(|| spec.claims.clone()),
            client_id,
            name: (spec.kind == MachineTokenKind::ApiKey).then(|| {
                spec.name
                    .clone()
                    .unwrap_or_else(|| "emulator key".to_owned())
            }),
            revoked: false,
            revocation_reason: None,
            expiration: ttl.map(|t| now_ms().saturating_add(t.saturating_mul(1000))),
            created_at: now_ms(),
        };
        st.by_id.insert(id.clone(), token.clone());
        st.tokens.insert(token.clone(), record);
        Ok((token, id))
    }

    pub(super) fn bapi_fault(&self) -> Option<Response> {
        let f = (*self.bapi_failure.lock().expect("lock"))?;
        let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut r = clerk_error(
            status,
            if f.status == 429 {
                "too_many_requests"
            } else {
                "internal_clerk_error"
            },
            "Injected failure",
            "Injected failure",
        );
        if let Some(s) = f.retry_after {
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                s.to_string().parse().expect("digits"),
            );
        }
        Some(r)
    }

    /// `Bearer <key>`: `Ok(Some(machine))` for a machine secret key, `Ok(None)` for the
    /// instance secret key, `Err` (a Clerk-shaped 401) otherwise.
    #[allow(clippy::result_large_err)] // an axum handler's early return; built at most once
    fn bearer_kind(
        &self,
        headers: &HeaderMap,
        machine_ok: bool,
    ) -> Result<Option<Machine>, Response> {
        let key = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|a| a.strip_prefix("Bearer "));
        let unauthorized = || {
            clerk_error(
                StatusCode::UNAUTHORIZED,
                "authentication_invalid",
                "Invalid authentication",
                "Unable to authenticate the request, you need to supply an active API key",
            )
        };
        match key {
            Some(k) if k == self.secret_key => Ok(None),
            Some(k) if machine_ok => self
                .machines
                .lock()
                .expect("lock")
                .by_secret(k)
                .cloned()
                .map(Some)
                .ok_or_else(unauthorized),
            _ => Err(unauthorized()),
        }
    }
}

fn not_found(what: &str) -> Response {
    clerk_error(
        StatusCode::NOT_FOUND,
        "resource_not_found",
        "not found",
        &format!("{what} not found"),
    )
}

fn verify_answer(s: &Shared, token: &str, kind: MachineTokenKind, what: &str) -> Response {
    let st = s.machines.lock().expect("lock");
    let Some(r) = st.tokens.get(token).filter(|r| r.kind == kind) else {
        return not_found(what);
    };
    if r.revoked {
        return clerk_error(
            StatusCode::BAD_REQUEST,
            "token_revoked",
            "Token has been revoked",
            &format!("This {what} has been revoked"),
        );
    }
    if r.expiration.is_some_and(|e| e <= now_ms()) {
        return clerk_error(
            StatusCode::BAD_REQUEST,
            "token_expired",
            "Token has expired",
            &format!("This {what} has expired"),
        );
    }
    Json(r.object()).into_response()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenBody {
    token: Option<String>,
    secret: Option<String>,
    access_token: Option<String>,
    revocation_reason: Option<String>,
    seconds_until_expiration: Option<i64>,
    claims: Option<Map<String, Value>>,
    token_format: Option<String>,
    name: Option<String>,
    subject: Option<String>,
    scopes: Option<Vec<String>>,
}

async fn m2m_create(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(b): Json<TokenBody>,
) -> Response {
    if let Some(r) = s.bapi_fault() {
        return r;
    }
    let machine = match s.bearer_kind(&headers, true) {
        Ok(Some(m)) => m,
        Ok(None) => {
            return clerk_error(
                StatusCode::BAD_REQUEST,
                "machine_secret_key_required",
                "A machine secret key is required",
                "Creating M2M tokens needs a machine secret key",
            )
        }
        Err(r) => return r,
    };
    let spec = MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        jwt: b.token_format.as_deref() == Some("jwt"),
        subject: Some(machine.id.clone()),
        expires_in: b.seconds_until_expiration,
        claims: b.claims.unwrap_or_default(),
        ..MachineTokenSpec::default()
    };
    match s.mint_machine_token(&spec) {
        Ok((token, id)) => {
            let now = now_ms();
            let mut obj = s
                .machines
                .lock()
                .expect("lock")
                .tokens
                .get(&token)
                .map(Record::object)
                .unwrap_or_else(|| {
                    json!({
                        "object": "machine_to_machine_token",
                        "id": id,
                        "subject": machine.id,
                        "scopes": machine.scopes,
                        "claims": null,
                        "revoked": false,
                        "revocation_reason": null,
                        "expired": false,
                        "expiration": spec.expires_in.or(Some(3600)).map(|t| now + t * 1000),
                        "created_at": now,
                        "updated_at": now,
                    })
                });
            obj["token"] = token.into();
            Json(obj).into_response()
        }
        Err(e) => clerk_error(StatusCode::BAD_REQUEST, "form_param_invalid", &e, &e),
    }
}

async fn m2m_verify(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(b): Json<TokenBody>,
) -> Response {
    if let Some(r) = s.bapi_fault() {
        return r;
    }
    if let Err(r) = s.bearer_kind(&headers, true) {
        return r;
    }
    verify_answer(
        &s,
        &b.token.unwrap_or_default(),
        MachineTokenKind::M2m,
        "machine token",
    )
}

async fn api_key_create(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(b): Json<TokenBody>,
) -> Response {
    if let Err(r) = s.bearer_kind(&headers, false) {
        return r;
    }
    let spec = MachineTokenSpec {
        kind: MachineTokenKind::ApiKey,
        subject: b.subject,
        scopes: b.scopes.unwrap_or_default(),
        expires_in: b.seconds_until_expiration,
        name: b.name,
        claims: b.claims.unwrap_or_default(),
        ..MachineTokenSpec::default()
    };
    match s.mint_machine_token(&spec) {
        Ok((secret, _)) => {
            let st = s.machines.lock().expect("lock");
            let mut obj = st
                .tokens
                .get(&secret)
                .map(Record::object)
                .unwrap_or_default();
            obj["secret"] = secret.into();
            Json(obj).into_response()
        }
        Err(e) => clerk_error(StatusCode::BAD_REQUEST, "form_param_invalid", &e, &e),
    }
}

async fn api_key_verify(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(b): Json<TokenBody>,
) -> Response {
    if let Some(r) = s.bapi_fault() {
        return r;
    }
    if let Err(r) = s.bearer_kind(&headers, false) {
        return r;
    }
    verify_answer(
        &s,
        &b.secret.unwrap_or_default(),
        MachineTokenKind::ApiKey,
        "API key",
    )
}

async fn oauth_verify(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(b): Json<TokenBody>,
) -> Response {
    if let Some(r) = s.bapi_fault() {
        return r;
    }
    if let Err(r) = s.bearer_kind(&headers, false) {
        return r;
    }
    let token = b.access_token.or(b.secret).unwrap_or_default();
    verify_answer(&s, &token, MachineTokenKind::Oauth, "OAuth token")
}

async fn revoke(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Option<Json<TokenBody>>,
) -> Response {
    if let Err(r) = s.bearer_kind(&headers, true) {
        return r;
    }
    let reason = body.and_then(|Json(b)| b.revocation_reason);
    match s.machines.lock().expect("lock").revoke(&id, reason) {
        Some(obj) => Json(obj).into_response(),
        None => not_found("token"),
    }
}

async fn emulator_revoke(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.machines.lock().expect("lock").revoke(&id, None) {
        Some(obj) => Json(obj).into_response(),
        None => not_found("token"),
    }
}

async fn create_machine(State(s): State<Arc<Shared>>, Json(b): Json<TokenBody>) -> Response {
    let mut st = s.machines.lock().expect("lock");
    let m = st.create_machine(b.name.as_deref().unwrap_or("machine"));
    for scope in b.scopes.unwrap_or_default() {
        st.allow(&m.id, &scope);
    }
    let m = st.machine(&m.id).cloned().unwrap_or(m);
    Json(json!({"object": "machine", "id": m.id, "name": m.name, "secret_key": m.secret_key, "scopes": m.scopes}))
        .into_response()
}

async fn mint_machine_token(
    State(s): State<Arc<Shared>>,
    Json(spec): Json<MachineTokenSpec>,
) -> Response {
    match s.mint_machine_token(&spec) {
        Ok((token, id)) => {
            Json(json!({"object": "token", "token": token, "id": id})).into_response()
        }
        Err(e) => clerk_error(StatusCode::BAD_REQUEST, "form_param_invalid", &e, &e),
    }
}

async fn set_bapi_fault(
    State(s): State<Arc<Shared>>,
    Json(f): Json<Option<BapiFault>>,
) -> Response {
    *s.bapi_failure.lock().expect("lock") = f;
    StatusCode::NO_CONTENT.into_response()
}

/// The machine-token routes.
pub(super) fn routes() -> Router<Arc<Shared>> {
    let mut r = Router::new();
    for prefix in ["", "/v1"] {
        r = r
            .route(&format!("{prefix}/m2m_tokens"), post(m2m_create))
            .route(&format!("{prefix}/m2m_tokens/verify"), post(m2m_verify))
            .route(
                &format!("{prefix}/m2m_tokens/{{m2m_token_id}}/revoke"),
                post(revoke),
            )
            .route(&format!("{prefix}/api_keys"), post(api_key_create))
            .route(&format!("{prefix}/api_keys/verify"), post(api_key_verify))
            .route(
                &format!("{prefix}/api_keys/{{api_key_id}}/revoke"),
                post(revoke),
            )
            .route(
                &format!("{prefix}/oauth_applications/access_tokens/verify"),
                post(oauth_verify),
            );
    }
    r.route("/emulator/machines", post(create_machine))
        .route("/emulator/machine_tokens", post(mint_machine_token))
        .route(
            "/emulator/machine_tokens/{id}/revoke",
            post(emulator_revoke),
        )
        .route("/emulator/faults/bapi", axum::routing::put(set_bapi_fault))
}
