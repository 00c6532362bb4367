//! The emulator's users, organizations, memberships and sessions, with the Backend API's read
//! endpoints, session revocation, and Svix-signed webhooks sent on every change.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{clerk_error, now_secs, random_id, Shared};
use crate::{
    clerk::{directory::SESSION_STATUSES, svix::SvixVerifier},
    secret::Secret,
};

/// A user to create. Every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct UserSpec {
    /// `user_…` (default random).
    pub id: Option<String>,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Username.
    pub username: Option<String>,
    /// Primary email address (default `<id>@example.com`).
    pub email: Option<String>,
    /// Public metadata.
    pub public_metadata: Map<String, Value>,
}

/// A membership to add.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MembershipSpec {
    /// The member.
    pub user_id: String,
    /// The organization (created when new).
    pub org_id: String,
    /// Organization name (default: the slug or id).
    pub org_name: Option<String>,
    /// Organization slug.
    pub org_slug: Option<String>,
    /// Role, `org:`-prefixed or not (default `org:member`).
    pub role: Option<String>,
    /// Permission keys, besides the system permissions Clerk's `org:admin` and `org:member`
    /// roles carry ([`role_permissions`]).
    pub permissions: Vec<String>,
}

/// The system permissions of Clerk's default roles: `org:admin` has every one, `org:member`
/// may read members; any other role has none (as a custom role without them).
pub fn role_permissions(role: &str) -> &'static [&'static str] {
    match role {
        "org:admin" => &[
            "org:sys_profile:manage",
            "org:sys_profile:delete",
            "org:sys_memberships:read",
            "org:sys_memberships:manage",
            "org:sys_domains:read",
            "org:sys_domains:manage",
            "org:sys_billing:read",
            "org:sys_billing:manage",
        ],
        "org:member" => &["org:sys_memberships:read"],
        _ => &[],
    }
}

/// A role as the emulator stores it: `org:`-prefixed.
fn role_key(role: Option<&str>) -> String {
    match role {
        Some(r) if r.starts_with("org:") => r.to_owned(),
        Some(r) => format!("org:{r}"),
        None => "org:member".into(),
    }
}

/// The role's system permissions, then the others given (no repeats).
fn membership_permissions(role: &str, extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = role_permissions(role)
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
    for p in extra {
        if !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

#[derive(Debug, Default)]
pub(super) struct DirectoryState {
    users: HashMap<String, Value>,
    memberships: Vec<(String, Value)>,
    organizations: HashMap<String, Value>,
    sessions: HashMap<String, Value>,
    webhook: Option<(String, SvixVerifier)>,
}

/// An injected latency for the identity endpoints.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Latency(pub Duration);

fn now_ms() -> i64 {
    now_secs() * 1000
}

fn user_json(id: &str, spec: &UserSpec) -> Value {
    let email_id = format!("idn_{}", random_id(24));
    let email = spec
        .email
        .clone()
        .unwrap_or_else(|| format!("{}@example.com", id.to_lowercase()));
    json!({
        "object": "user",
        "id": id,
        "first_name": spec.first_name,
        "last_name": spec.last_name,
        "username": spec.username,
        "image_url": format!("https://img.clerk.com/{id}"),
        "has_image": false,
        "primary_email_address_id": email_id,
        "primary_phone_number_id": null,
        "email_addresses": [{
            "id": email_id, "object": "email_address", "email_address": email,
            "verification": {"status": "verified", "strategy": "email_code"}, "linked_to": []
        }],
        "phone_numbers": [],
        "external_accounts": [],
        "public_metadata": spec.public_metadata,
        "private_metadata": {},
        "unsafe_metadata": {},
        "external_id": null,
        "banned": false,
        "locked": false,
        "two_factor_enabled": false,
        "last_sign_in_at": now_ms(),
        "last_active_at": now_ms(),
        "created_at": now_ms(),
        "updated_at": now_ms(),
    })
}

/// What an organization sees of a member (`public_user_data`).
fn public_user_data(user_id: &str, user: &Value) -> Value {
    let identifier = user["email_addresses"][0]["email_address"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{user_id}@example.com"));
    json!({
        "user_id": user_id,
        "identifier": identifier,
        "first_name": user["first_name"],
        "last_name": user["last_name"],
        "username": user["username"],
        "image_url": user["image_url"],
        "has_image": user["has_image"].as_bool().unwrap_or(false),
    })
}

fn session_json(id: &str, user_id: &str) -> Value {
    let now = now_ms();
    json!({
        "object": "session",
        "id": id,
        "client_id": format!("client_{}", random_id(24)),
        "user_id": user_id,
        "status": "active",
        "last_active_organization_id": null,
        "actor": null,
        "latest_activity": {
            "object": "session_activity",
            "id": format!("sess_activity_{}", random_id(24)),
            "device_type": "Macintosh",
            "is_mobile": false,
            "browser_name": "Chrome",
            "browser_version": "131.0.0.0",
            "ip_address": "127.0.0.1",
            "city": null,
            "country": null,
        },
        "last_active_at": now,
        "expire_at": now + 7 * 86_400_000,
        "abandon_at": now + 30 * 86_400_000,
        "created_at": now,
        "updated_at": now,
    })
}

impl DirectoryState {
    /// Every user, by id.
    pub(super) fn users(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.users.iter().map(|(id, u)| (id.as_str(), u))
    }

    /// Every membership: (user id, membership object).
    pub(super) fn memberships(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.memberships.iter().map(|(u, m)| (u.as_str(), m))
    }

    pub(super) fn user_mut(&mut self, id: &str) -> Option<&mut Value> {
        self.users.get_mut(id)
    }

    /// Shows a user's current profile in its memberships (`public_user_data`), as Clerk's.
    pub(super) fn refresh_memberships_of(&mut self, user_id: &str) {
        let user = self.users.get(user_id).cloned().unwrap_or(Value::Null);
        for (u, m) in self.memberships.iter_mut() {
            if u == user_id {
                m["public_user_data"] = public_user_data(user_id, &user);
            }
        }
    }

    pub(super) fn set_webhook(&mut self, target: Option<(String, SvixVerifier)>) {
        self.webhook = target;
    }

    /// Makes sure a minted token's user and session exist.
    pub(super) fn ensure(&mut self, user_id: &str, session_id: Option<&str>) {
        if !self.users.contains_key(user_id) {
            let spec = UserSpec {
                first_name: Some("Dev".into()),
                last_name: Some("User".into()),
                ..UserSpec::default()
            };
            self.users
                .insert(user_id.to_owned(), user_json(user_id, &spec));
        }
        if let Some(sid) = session_id {
            self.sessions
                .entry(sid.to_owned())
                .or_insert_with(|| session_json(sid, user_id));
        }
    }
}

impl Shared {
    /// Sends a Svix-signed webhook to the configured target and waits for its answer
    /// (`None` when no target is set or it cannot be reached).
    pub(super) async fn send_webhook(&self, kind: &str, data: Value) -> Option<u16> {
        let (url, signer) = self.directory.lock().expect("lock").webhook.clone()?;
        let body = serde_json::to_vec(&json!({
            "object": "event",
            "type": kind,
            "timestamp": now_ms(),
            "data": data,
        }))
        .ok()?;
        let id = format!("msg_{}", random_id(27));
        let ts = now_secs();
        let sig = signer.sign(&id, ts, &body);
        let resp = self
            .http
            .post(&url)
            .header("svix-id", &id)
            .header("svix-timestamp", ts.to_string())
            .header("svix-signature", sig)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match resp {
            Ok(r) => Some(r.status().as_u16()),
            Err(e) => {
                tracing::warn!(%url, error = %e, "emulator webhook delivery failed");
                None
            }
        }
    }

    pub(super) fn create_user(&self, spec: &UserSpec) -> Value {
        let id = spec
            .id
            .clone()
            .unwrap_or_else(|| format!("user_{}", random_id(27)));
        let user = user_json(&id, spec);
        self.directory
            .lock()
            .expect("lock")
            .users
            .insert(id, user.clone());
        user
    }

    /// Adds (or replaces) the user's membership of the organization, creating the
    /// organization when new.
    pub(super) fn add_membership(&self, spec: &MembershipSpec) -> Value {
        let role = role_key(spec.role.as_deref());
        let mut d = self.directory.lock().expect("lock");
        let org = d
            .organizations
            .entry(spec.org_id.clone())
            .or_insert_with(|| {
                let slug = spec.org_slug.clone().unwrap_or_else(|| spec.org_id.clone());
                json!({
                    "object": "organization",
                    "id": spec.org_id,
                    "name": spec.org_name.clone().unwrap_or_else(|| slug.clone()),
                    "slug": slug,
                    "image_url": "",
                    "has_image": false,
                    "max_allowed_memberships": 0,
                    "admin_delete_enabled": true,
                    "public_metadata": {},
                    "private_metadata": {},
                    "created_by": spec.user_id,
                    "created_at": now_ms(),
                    "updated_at": now_ms(),
                })
            })
            .clone();
        let user = d.users.get(&spec.user_id).cloned().unwrap_or(Value::Null);
        let m = json!({
            "object": "organization_membership",
            "id": format!("orgmem_{}", random_id(24)),
            "role": role,
            "role_name": role.trim_start_matches("org:"),
            "permissions": membership_permissions(&role, &spec.permissions),
            "public_metadata": {},
            "private_metadata": {},
            "created_at": now_ms(),
            "updated_at": now_ms(),
            "organization": org,
            "public_user_data": public_user_data(&spec.user_id, &user),
        });
        let org_id = spec.org_id.as_str();
        d.memberships.retain(|(u, m)| {
            !(*u == spec.user_id && m["organization"]["id"].as_str() == Some(org_id))
        });
        d.memberships.push((spec.user_id.clone(), m.clone()));
        m
    }

    /// Changes an organization (and every membership's copy of it); `None` if unknown.
    pub(super) fn update_organization(&self, id: &str, patch: &OrganizationPatch) -> Option<Value> {
        let mut d = self.directory.lock().expect("lock");
        let org = d.organizations.get_mut(id)?;
        if let Some(v) = &patch.name {
            org["name"] = v.clone().into();
        }
        if let Some(v) = &patch.slug {
            org["slug"] = v.clone().into();
        }
        if let Some(v) = &patch.public_metadata {
            org["public_metadata"] = Value::Object(v.clone());
        }
        if let Some(v) = patch.max_allowed_memberships {
            org["max_allowed_memberships"] = v.into();
        }
        org["updated_at"] = now_ms().into();
        let org = org.clone();
        for (_, m) in d.memberships.iter_mut() {
            if m["organization"]["id"].as_str() == Some(id) {
                m["organization"] = org.clone();
            }
        }
        Some(org)
    }

    /// Changes a member's role (its permissions follow: the role's system permissions and
    /// those given); `None` if the user is not a member.
    pub(super) fn update_member(
        &self,
        org_id: &str,
        user_id: &str,
        patch: &MemberPatch,
    ) -> Option<Value> {
        let mut d = self.directory.lock().expect("lock");
        let (_, m) = d
            .memberships
            .iter_mut()
            .find(|(u, m)| u == user_id && m["organization"]["id"].as_str() == Some(org_id))?;
        let role = match &patch.role {
            Some(r) => role_key(Some(r)),
            None => m["role"].as_str().unwrap_or("org:member").to_owned(),
        };
        m["permissions"] = json!(membership_permissions(&role, &patch.permissions));
        m["role_name"] = role.trim_start_matches("org:").into();
        m["role"] = role.into();
        m["updated_at"] = now_ms().into();
        Some(m.clone())
    }

    /// Removes a member; the removed membership, or `None` if the user was not one.
    pub(super) fn remove_member(&self, org_id: &str, user_id: &str) -> Option<Value> {
        let mut d = self.directory.lock().expect("lock");
        let at = d
            .memberships
            .iter()
            .position(|(u, m)| u == user_id && m["organization"]["id"].as_str() == Some(org_id))?;
        Some(d.memberships.remove(at).1)
    }

    /// Sets a session's status; sends `session.<event>` for ended / revoked / removed.
    pub(super) async fn set_session_status(&self, id: &str, status: &str) -> Option<Value> {
        let session = {
            let mut d = self.directory.lock().expect("lock");
            let s = d.sessions.get_mut(id)?;
            s["status"] = status.into();
            s["updated_at"] = now_ms().into();
            s.clone()
        };
        let event = match status {
            "ended" => Some("session.ended"),
            "revoked" => Some("session.revoked"),
            "removed" => Some("session.removed"),
            _ => None,
        };
        if let Some(kind) = event {
            self.send_webhook(kind, session.clone()).await;
        }
        Some(session)
    }

    /// What every identity endpoint answers before its own work, if anything: Clerk's 401
    /// without the secret key, then the injected latency and Backend API fault.
    async fn identity_gate(&self, headers: &HeaderMap) -> Option<Response> {
        if let Some(r) = self.check_secret(headers) {
            return Some(r);
        }
        self.identity_fault().await
    }

    async fn identity_fault(&self) -> Option<Response> {
        let latency = self.latency.lock().expect("lock").0;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        self.bapi_fault()
    }

    fn check_secret(&self, headers: &HeaderMap) -> Option<Response> {
        let ok = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|a| a.strip_prefix("Bearer "))
            == Some(self.secret_key.as_str());
        (!ok).then(|| {
            clerk_error(
                StatusCode::UNAUTHORIZED,
                "clerk_key_invalid",
                "Secret Key is invalid",
                "The provided Clerk Secret Key is invalid.",
            )
        })
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

async fn get_user(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.identity_gate(&headers).await {
        return r;
    }
    match s.directory.lock().expect("lock").users.get(&id) {
        Some(u) => Json(u.clone()).into_response(),
        None => not_found("user"),
    }
}

/// `limit` and `offset` as sent (checked by [`number_param`]).
#[derive(Deserialize)]
struct PageQuery {
    limit: Option<String>,
    offset: Option<String>,
}

async fn list_memberships(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.identity_gate(&headers).await {
        return r;
    }
    let (limit, offset) = match paging(q.limit.as_deref(), q.offset.as_deref()) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let d = s.directory.lock().expect("lock");
    if !d.users.contains_key(&id) {
        return not_found("user");
    }
    let all: Vec<&Value> = d
        .memberships
        .iter()
        .filter(|(u, _)| *u == id)
        .map(|(_, m)| m)
        .collect();
    let page: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|m| (*m).clone())
        .collect();
    Json(json!({"data": page, "total_count": all.len()})).into_response()
}

/// A number parameter as Clerk reads it: ASCII digits only (no sign, space or fraction), at
/// most 9 of them, within `range`; `default` when absent. `None`: refused.
fn number_param(
    v: Option<&str>,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Option<usize> {
    match v {
        None => Some(default),
        Some(v) if !v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit()) => {
            v.parse().ok().filter(|n| range.contains(n))
        }
        Some(_) => None,
    }
}

/// A list's `limit` (1–500, 10 by default) and `offset` (0 by default), or Clerk's 422.
fn paging(limit: Option<&str>, offset: Option<&str>) -> Result<(usize, usize), Box<Response>> {
    let refuse = |name: &str, why: &str| bad_param("form_param_value_invalid", name, why);
    match (
        number_param(limit, 10, 1..=500),
        number_param(offset, 0, 0..=usize::MAX),
    ) {
        (Some(limit), Some(offset)) => Ok((limit, offset)),
        (None, _) => Err(Box::new(refuse("limit", "must be a number from 1 to 500"))),
        (_, None) => Err(Box::new(refuse("offset", "must be a number from 0"))),
    }
}

/// Sorts Clerk objects newest first (`created_at`; those made in the same millisecond by id,
/// so that pages never overlap) and returns `limit` of them from `offset`.
fn newest_first(all: &mut [&Value], offset: usize, limit: usize) -> Vec<Value> {
    let created = |v: &Value| v["created_at"].as_i64().unwrap_or(0);
    let id = |v: &Value| v["id"].as_str().unwrap_or("").to_owned();
    all.sort_by(|a, b| created(b).cmp(&created(a)).then_with(|| id(a).cmp(&id(b))));
    all.iter()
        .skip(offset)
        .take(limit)
        .map(|v| (*v).clone())
        .collect()
}

/// `GET /v1/organizations/{id}`: by id or slug, as Clerk's; `members_count` with
/// `include_members_count=true`.
async fn get_organization(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.identity_gate(&headers).await {
        return r;
    }
    let mut count = false;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k == "include_members_count" {
            match &*v {
                "true" => count = true,
                "false" => count = false,
                _ => {
                    return bad_param(
                        "form_param_value_invalid",
                        "include_members_count",
                        "must be true or false",
                    )
                }
            }
        }
    }
    let d = s.directory.lock().expect("lock");
    let found = d.organizations.get(&id).or_else(|| {
        d.organizations
            .values()
            .find(|o| o["slug"].as_str() == Some(id.as_str()))
    });
    let Some(org) = found else {
        return not_found("organization");
    };
    let mut org = org.clone();
    if count {
        let oid = org["id"].as_str().unwrap_or_default().to_owned();
        let n = d
            .memberships
            .iter()
            .filter(|(_, m)| m["organization"]["id"].as_str() == Some(oid.as_str()))
            .count();
        org["members_count"] = n.into();
    }
    Json(org).into_response()
}

/// `GET /v1/organizations/{id}/memberships`: newest first, `limit` 1–500 (10 by default)
/// from `offset`, `role` any number of times (members with one of them), `{data,
/// total_count}`.
async fn list_organization_memberships(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.identity_gate(&headers).await {
        return r;
    }
    let (mut limit, mut offset, mut roles) = (None, None, Vec::new());
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "limit" => limit = Some(v.into_owned()),
            "offset" => offset = Some(v.into_owned()),
            "role" => roles.push(v.into_owned()),
            _ => {}
        }
    }
    let (limit, offset) = match paging(limit.as_deref(), offset.as_deref()) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let d = s.directory.lock().expect("lock");
    if !d.organizations.contains_key(&id) {
        return not_found("organization");
    }
    let mut all: Vec<&Value> = d
        .memberships
        .iter()
        .map(|(_, m)| m)
        .filter(|m| m["organization"]["id"].as_str() == Some(id.as_str()))
        .filter(|m| roles.is_empty() || roles.iter().any(|r| m["role"].as_str() == Some(r)))
        .collect();
    let page = newest_first(&mut all, offset, limit);
    Json(json!({"data": page, "total_count": all.len()})).into_response()
}

/// The query of `GET /v1/sessions`, every value as sent (checked by [`list_sessions`]).
#[derive(Deserialize)]
struct SessionListQuery {
    user_id: Option<String>,
    client_id: Option<String>,
    status: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
    paginated: Option<String>,
}

/// A form parameter Clerk refuses (422, `form_param_value_invalid` or `form_param_missing`).
fn bad_param(code: &str, name: &str, why: &str) -> Response {
    clerk_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        code,
        "is invalid",
        &format!("{name} {why}"),
    )
}

/// `GET /v1/sessions`: a user's (or a client's) sessions, newest first, filtered by `status`,
/// `limit` 1–500 (10 by default) from `offset`; `{data, total_count}` with `paginated=true`
/// (as Clerk's SDK asks), a bare array without it. One of `user_id` and `client_id` is
/// required.
async fn list_sessions(
    State(s): State<Arc<Shared>>,
    Query(q): Query<SessionListQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.identity_gate(&headers).await {
        return r;
    }
    if q.user_id.is_none() && q.client_id.is_none() {
        return bad_param("form_param_missing", "user_id", "or client_id is required");
    }
    if let Some(st) = q.status.as_deref() {
        if !SESSION_STATUSES.contains(&st) {
            let why = format!("must be one of {}", SESSION_STATUSES.join(", "));
            return bad_param("form_param_value_invalid", "status", &why);
        }
    }
    let (limit, offset) = match paging(q.limit.as_deref(), q.offset.as_deref()) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let paginated = match q.paginated.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return bad_param(
                "form_param_value_invalid",
                "paginated",
                "must be true or false",
            )
        }
    };
    let d = s.directory.lock().expect("lock");
    let wanted = |field: &str, want: &Option<String>, v: &Value| {
        want.as_deref()
            .is_none_or(|w| v.get(field).and_then(Value::as_str) == Some(w))
    };
    let mut all: Vec<&Value> = d
        .sessions
        .values()
        .filter(|v| {
            wanted("user_id", &q.user_id, v)
                && wanted("client_id", &q.client_id, v)
                && wanted("status", &q.status, v)
        })
        .collect();
    let page = newest_first(&mut all, offset, limit);
    if paginated {
        Json(json!({"data": page, "total_count": all.len()})).into_response()
    } else {
        Json(page).into_response()
    }
}

async fn get_session(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.identity_gate(&headers).await {
        return r;
    }
    match s.directory.lock().expect("lock").sessions.get(&id) {
        Some(v) => Json(v.clone()).into_response(),
        None => not_found("session"),
    }
}

async fn revoke_session(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = s.identity_gate(&headers).await {
        return r;
    }
    match s.set_session_status(&id, "revoked").await {
        Some(v) => Json(v).into_response(),
        None => not_found("session"),
    }
}

async fn emu_create_user(State(s): State<Arc<Shared>>, Json(spec): Json<UserSpec>) -> Response {
    Json(s.create_user(&spec)).into_response()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct UserPatch {
    first_name: Option<String>,
    last_name: Option<String>,
    username: Option<String>,
    public_metadata: Option<Map<String, Value>>,
    banned: Option<bool>,
}

async fn emu_update_user(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Json(p): Json<UserPatch>,
) -> Response {
    let user = {
        let mut d = s.directory.lock().expect("lock");
        let Some(u) = d.users.get_mut(&id) else {
            return not_found("user");
        };
        if let Some(v) = p.first_name {
            u["first_name"] = v.into();
        }
        if let Some(v) = p.last_name {
            u["last_name"] = v.into();
        }
        if let Some(v) = p.username {
            u["username"] = v.into();
        }
        if let Some(v) = p.public_metadata {
            u["public_metadata"] = Value::Object(v);
        }
        if let Some(v) = p.banned {
            u["banned"] = v.into();
        }
        u["updated_at"] = now_ms().into();
        let u = u.clone();
        d.refresh_memberships_of(&id);
        u
    };
    s.send_webhook("user.updated", user.clone()).await;
    Json(user).into_response()
}

async fn emu_delete_user(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let removed = s.directory.lock().expect("lock").users.remove(&id);
    if removed.is_none() {
        return not_found("user");
    }
    let data = json!({"object": "user", "id": id, "deleted": true});
    s.send_webhook("user.deleted", data.clone()).await;
    Json(data).into_response()
}

async fn emu_add_membership(
    State(s): State<Arc<Shared>>,
    Json(spec): Json<MembershipSpec>,
) -> Response {
    let m = s.add_membership(&spec);
    s.send_webhook("organizationMembership.created", m.clone())
        .await;
    Json(m).into_response()
}

/// A change to an organization (`PATCH /emulator/organizations/{id}`); absent fields stay.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct OrganizationPatch {
    /// Name.
    pub name: Option<String>,
    /// Slug.
    pub slug: Option<String>,
    /// Public metadata (replaced).
    pub public_metadata: Option<Map<String, Value>>,
    /// The membership limit (0: none).
    pub max_allowed_memberships: Option<i64>,
}

/// A change to a membership (`PATCH /emulator/organizations/{id}/memberships/{user_id}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MemberPatch {
    /// The new role, `org:`-prefixed or not (absent: unchanged).
    pub role: Option<String>,
    /// Permissions besides the role's system ones (replaced).
    pub permissions: Vec<String>,
}

async fn emu_update_organization(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Json(p): Json<OrganizationPatch>,
) -> Response {
    let Some(org) = s.update_organization(&id, &p) else {
        return not_found("organization");
    };
    s.send_webhook("organization.updated", org.clone()).await;
    Json(org).into_response()
}

async fn emu_update_member(
    State(s): State<Arc<Shared>>,
    Path((org_id, user_id)): Path<(String, String)>,
    Json(p): Json<MemberPatch>,
) -> Response {
    let Some(m) = s.update_member(&org_id, &user_id, &p) else {
        return not_found("membership");
    };
    s.send_webhook("organizationMembership.updated", m.clone())
        .await;
    Json(m).into_response()
}

async fn emu_remove_member(
    State(s): State<Arc<Shared>>,
    Path((org_id, user_id)): Path<(String, String)>,
) -> Response {
    let Some(m) = s.remove_member(&org_id, &user_id) else {
        return not_found("membership");
    };
    s.send_webhook("organizationMembership.deleted", m.clone())
        .await;
    Json(m).into_response()
}

#[derive(Deserialize)]
struct NewSession {
    user_id: String,
}

async fn emu_create_session(State(s): State<Arc<Shared>>, Json(b): Json<NewSession>) -> Response {
    let id = format!("sess_{}", random_id(27));
    let mut d = s.directory.lock().expect("lock");
    d.ensure(&b.user_id, Some(&id));
    Json(d.sessions[&id].clone()).into_response()
}

#[derive(Deserialize)]
struct StatusBody {
    status: String,
}

async fn emu_session_status(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Json(b): Json<StatusBody>,
) -> Response {
    match s.set_session_status(&id, &b.status).await {
        Some(v) => Json(v).into_response(),
        None => not_found("session"),
    }
}

#[derive(Deserialize)]
struct WebhookTarget {
    url: Option<String>,
    secret: Option<String>,
}

async fn emu_set_webhook(State(s): State<Arc<Shared>>, Json(t): Json<WebhookTarget>) -> Response {
    match (t.url, t.secret) {
        (Some(url), Some(secret)) => {
            match SvixVerifier::new(&Secret::new(secret), Duration::from_secs(300)) {
                Ok(v) => {
                    s.directory.lock().expect("lock").webhook = Some((url, v));
                    StatusCode::NO_CONTENT.into_response()
                }
                Err(e) => clerk_error(
                    StatusCode::BAD_REQUEST,
                    "form_param_invalid",
                    &e.to_string(),
                    &e.to_string(),
                ),
            }
        }
        _ => {
            s.directory.lock().expect("lock").webhook = None;
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// The identity routes.
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/users/{user_id}", get(get_user))
        .route(
            "/v1/users/{user_id}/organization_memberships",
            get(list_memberships),
        )
        .route("/v1/organizations/{organization_id}", get(get_organization))
        .route(
            "/v1/organizations/{organization_id}/memberships",
            get(list_organization_memberships),
        )
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{session_id}", get(get_session))
        .route("/v1/sessions/{session_id}/revoke", post(revoke_session))
        .route("/emulator/users", post(emu_create_user))
        .route(
            "/emulator/users/{id}",
            axum::routing::patch(emu_update_user).delete(emu_delete_user),
        )
        .route("/emulator/memberships", post(emu_add_membership))
        .route(
            "/emulator/organizations/{id}",
            axum::routing::patch(emu_update_organization),
        )
        .route(
            "/emulator/organizations/{org_id}/memberships/{user_id}",
            axum::routing::patch(emu_update_member).delete(emu_remove_member),
        )
        .route("/emulator/sessions", post(emu_create_session))
        .route("/emulator/sessions/{id}/status", post(emu_session_status))
        .route("/emulator/webhook", put(emu_set_webhook))
}
