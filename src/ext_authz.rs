//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`) on the same
//! server, so that Envoy or Istio can delegate authentication to AuthService.
//!
//! For each request Envoy forwards: the route rule is chosen by host, path prefix and HTTP method
//! ([`RoutePolicy`], the same [`Rule`] model as the layer's policy); the token comes from
//! `authorization: Bearer …` or the `__session` cookie; then:
//!
//! * **allow** — `OkHttpResponse` setting `x-clerk-user-id`, `x-clerk-session-id`,
//!   `x-clerk-org-id`, `x-clerk-org-role`, `x-clerk-org-permissions` (overwriting anything the
//!   client sent) and removing those the identity does not have (so none can be spoofed), plus
//!   `dynamic_metadata` with the identity;
//! * **deny** — `DeniedHttpResponse` 401 with `WWW-Authenticate: Bearer error="invalid_token"`
//!   (403 for policy, 503 when verification is impossible, 429 when rate limited) and a JSON
//!   body `{"error": REASON, "message": …}`; for gRPC requests (`content-type:
//!   application/grpc…`) a gRPC-shaped denial (HTTP 200, `grpc-status`, `grpc-message`).

use std::{collections::HashMap, path::Path, sync::Arc};

use envoy_types::{
    ext_authz::v3::{
        pb::{Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode},
        CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
    },
    pb::google::protobuf::{value::Kind, Struct, Value},
};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use tonic::{Code, Request, Response, Status};

use crate::{
    authz::Check,
    error::AuthError,
    identity::Identity,
    layer::TokenSources,
    metrics::Observer,
    policy::{ApiKeyOwner, PolicyError, Rule},
    token_fingerprint, TokenVerifier, VerifyRequest,
};

/// The identity headers set on allowed requests (and stripped from the client's request).
pub const IDENTITY_HEADERS: [&str; 5] = [
    "x-clerk-user-id",
    "x-clerk-session-id",
    "x-clerk-org-id",
    "x-clerk-org-role",
    "x-clerk-org-permissions",
];

/// One route: which requests it covers and the rule for them.
#[derive(Debug, Clone)]
pub struct Route {
    /// Exact host (case-insensitive, port ignored); `None` = any host.
    pub host: Option<String>,
    /// Path prefix, matched on whole segments (`/admin` covers `/admin` and `/admin/x`, not
    /// `/administrator`); `/` covers everything.
    pub path_prefix: String,
    /// HTTP methods (upper case); empty = any.
    pub methods: Vec<String>,
    /// What the route requires.
    pub rule: Rule,
}

/// Rules for the HTTP requests Envoy asks about. The matching route with the longest path
/// prefix wins (then a host-specific over an any-host route, then a method-specific one);
/// no match → the default rule.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    routes: Vec<Route>,
    default: Rule,
    machine_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    machine_id: Option<String>,
    default: Option<Rule>,
    #[serde(default)]
    routes: Vec<RouteEntry>,
}

/// A `[[routes]]` entry: what it matches, then the same fields as a policy rule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    host: Option<String>,
    #[serde(default = "root")]
    path_prefix: String,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    access: crate::policy::Access,
    #[serde(default)]
    require: Vec<Check>,
    #[serde(default)]
    token_types: Option<crate::policy::TokenTypes>,
    #[serde(default)]
    accept_pending: bool,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    api_key_owner: Option<ApiKeyOwner>,
}

impl RouteEntry {
    fn rule(&self) -> Rule {
        let mut rule = Rule::authenticated();
        rule.access = self.access;
        rule.require = self.require.clone();
        if let Some(t) = &self.token_types {
            rule.token_types = t.0.clone();
        }
        rule.accept_pending = self.accept_pending;
        rule.scopes = self.scopes.clone();
        rule.api_key_owner = self.api_key_owner;
        rule
    }
}

fn root() -> String {
    "/".into()
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            default: Rule::authenticated(),
            machine_id: None,
        }
    }
}

impl RoutePolicy {
    /// Every request needs a valid session token unless a route says otherwise.
    pub fn authenticated() -> Self {
        Self::default()
    }

    /// Adds a route.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Sets the default rule.
    pub fn default_rule(mut self, rule: Rule) -> Self {
        self.default = rule;
        self
    }

    /// This service's machine id (M2M tokens must list it in their scopes).
    pub fn machine_id(mut self, id: impl Into<String>) -> Self {
        self.machine_id = Some(id.into());
        self
    }

    /// The rule for a request.
    pub fn rule_for(&self, host: &str, path: &str, method: &str) -> &Rule {
        let host = host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        let path = path.split(['?', '#']).next().unwrap_or("/");
        self.routes
            .iter()
            .filter(|r| {
                r.host
                    .as_deref()
                    .is_none_or(|h| h.eq_ignore_ascii_case(host))
                    && (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
                    && segment_prefix(&r.path_prefix, path)
            })
            .max_by_key(|r| (r.path_prefix.len(), r.host.is_some(), !r.methods.is_empty()))
            .map_or(&self.default, |r| &r.rule)
    }

    /// Parses a TOML route policy:
    ///
    /// ```toml
    /// [default]
    /// access = "authenticated"
    ///
    /// [[routes]]
    /// path_prefix = "/public"
    /// access = "public"
    ///
    /// [[routes]]
    /// host = "admin.example.com"
    /// path_prefix = "/orders"
    /// methods = ["DELETE"]
    /// require = [{ permission = "org:orders:delete" }]
    /// ```
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        let err = |m: String| PolicyError::new(source_name, m);
        let file: RouteFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut policy = Self::default();
        if let Some(d) = file.default {
            d.validate().map_err(|e| err(format!("[default]: {e}")))?;
            if !d.peers.is_empty() {
                // The TLS peer of Check is Envoy, not the client: such a rule could not be
                // enforced, so it is refused rather than silently ignored.
                return Err(err(
                    "[default]: peers cannot be checked by Check (the TLS peer is Envoy)".into(),
                ));
            }
            policy.default = d;
        }
        if let Some(id) = file.machine_id {
            if !id.starts_with("mch_") {
                return Err(err(format!(
                    "machine_id {id:?}: a machine id starts with mch_"
                )));
            }
            policy.machine_id = Some(id);
        }
        for (i, r) in file.routes.into_iter().enumerate() {
            if !r.path_prefix.starts_with('/') {
                return Err(err(format!("routes[{i}]: path_prefix must start with /")));
            }
            let rule = r.rule();
            rule.validate()
                .map_err(|e| err(format!("routes[{i}]: {e}")))?;
            policy.routes.push(Route {
                host: r.host.map(|h| h.to_ascii_lowercase()),
                path_prefix: r.path_prefix,
                methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                rule,
            });
        }
        Ok(policy)
    }

    /// Reads and parses a TOML route policy file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::new(&path.display().to_string(), e.to_string()))?;
        Self::from_toml(&text, &path.display().to_string())
    }
}

fn segment_prefix(prefix: &str, path: &str) -> bool {
    if prefix == "/" || prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The `Authorization` service.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    verifier: TokenVerifier,
    policy: Arc<RoutePolicy>,
    observer: Observer,
}

impl ExtAuthz {
    /// Checks requests with `verifier` against `policy`.
    pub fn new(verifier: TokenVerifier, policy: RoutePolicy) -> Self {
        Self {
            verifier,
            policy: Arc::new(policy),
            observer: Observer::default(),
        }
    }

    /// Sends every decision to `observer` (metrics and the audit log).
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = observer;
        self
    }

    /// The tonic server for Envoy.
    pub fn into_server(self) -> envoy_types::ext_authz::v3::pb::AuthorizationServer<Self> {
        envoy_types::ext_authz::v3::pb::AuthorizationServer::new(self)
    }

    async fn decide(
        &self,
        headers: &HashMap<String, String>,
        rule: &Rule,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Option<Arc<Identity>>, AuthError> {
        if rule.is_public() {
            return Ok(None);
        }
        self.verify_token(headers, rule, client_ip).await.map(Some)
    }

    async fn verify_token(
        &self,
        headers: &HashMap<String, String>,
        rule: &Rule,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Arc<Identity>, AuthError> {
        // Only the credential headers are copied into a header map for the extractor.
        let mut map = HeaderMap::new();
        for name in ["authorization", "cookie"] {
            if let Some(v) = headers.get(name) {
                let v = HeaderValue::from_str(v).map_err(|_| {
                    AuthError::Rejected(crate::error::VerifyError::new(
                        crate::error::Reason::TokenInvalid,
                        "the credentials header is malformed",
                    ))
                })?;
                map.insert(HeaderName::from_static(name), v);
            }
        }
        let token = TokenSources::default().extract(&map)?;
        let identity = self
            .verifier
            .verify(&VerifyRequest {
                token,
                accept_pending: rule.accept_pending,
                accepted_types: &rule.token_types,
                source: client_ip,
                ..VerifyRequest::default()
            })
            .await
            .inspect_err(|e| {
                tracing::debug!(token = %token_fingerprint(token), reason = e.reason_str(), "Check refused");
            })?;
        rule.authorize(&identity, self.policy.machine_id.as_deref())
            .map_err(AuthError::Denied)?;
        Ok(identity)
    }
}

fn allowed(identity: Option<&Identity>) -> CheckResponse {
    let mut ok = OkHttpResponseBuilder::new();
    let mut set = |name: &str, value: Option<String>| match value.filter(|v| !v.is_empty()) {
        Some(v) => {
            ok.add_header(
                name,
                v,
                Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
                false,
            );
        }
        None => {
            ok.remove_header(name);
        }
    };
    let org = identity.and_then(|i| i.organization.as_ref());
    set(IDENTITY_HEADERS[0], identity.map(|i| i.user_id.clone()));
    set(
        IDENTITY_HEADERS[1],
        identity.and_then(|i| i.session_id.clone()),
    );
    set(IDENTITY_HEADERS[2], org.map(|o| o.id.clone()));
    set(IDENTITY_HEADERS[3], org.and_then(|o| o.role.clone()));
    set(IDENTITY_HEADERS[4], org.map(|o| o.permissions.join(",")));
    let mut resp = CheckResponse::with_status(Status::ok("allowed"));
    resp.set_http_response(ok);
    if let Some(i) = identity {
        resp.set_dynamic_metadata(Some(metadata(i)));
    }
    resp
}

fn string_value(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn metadata(i: &Identity) -> Struct {
    let mut fields = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            fields.insert(k.to_owned(), string_value(v));
        }
    };
    put("token_type", Some(i.token_type.as_str_name().to_owned()));
    put("user_id", Some(i.user_id.clone()));
    put("session_id", i.session_id.clone());
    let org = i.organization.as_ref();
    put("org_id", org.map(|o| o.id.clone()));
    put("org_role", org.and_then(|o| o.role.clone()));
    put("org_permissions", org.map(|o| o.permissions.join(",")));
    put(
        "machine_id",
        i.machine.as_ref().and_then(|m| m.machine_id.clone()),
    );
    put("issuer", i.issuer.clone());
    Struct {
        fields: fields.into_iter().collect(),
    }
}

fn denied(err: &AuthError, grpc: bool) -> CheckResponse {
    let code = err.code();
    let reason = err.reason_str();
    let mut d = DeniedHttpResponseBuilder::new();
    if grpc {
        // A trailers-only gRPC answer the client's stub understands.
        d.set_http_status(HttpStatusCode::Ok);
        d.add_header("content-type", "application/grpc", None, false);
        d.add_header("grpc-status", (code as i32).to_string(), None, false);
        d.add_header("grpc-message", err.message(), None, false);
    } else {
        let status = match code {
            Code::Unauthenticated => HttpStatusCode::Unauthorized,
            Code::PermissionDenied => HttpStatusCode::Forbidden,
            Code::InvalidArgument => HttpStatusCode::BadRequest,
            Code::ResourceExhausted => HttpStatusCode::TooManyRequests,
            Code::NotFound => HttpStatusCode::NotFound,
            _ => HttpStatusCode::ServiceUnavailable,
        };
        d.set_http_status(status);
        if code == Code::Unauthenticated {
            let challenge = if reason == "TOKEN_MISSING" {
                "Bearer".to_owned()
            } else {
                "Bearer error=\"invalid_token\"".to_owned()
            };
            d.add_header("www-authenticate", challenge, None, false);
        }
        d.add_header("content-type", "application/json", None, false);
        d.set_body(serde_json::json!({"error": reason, "message": err.message()}).to_string());
    }
    let mut resp = CheckResponse::with_status(Status::new(code, reason));
    resp.set_http_response(d);
    resp
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let req = request.into_inner();
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let Some(http) = http else {
            return Ok(Response::new(denied(
                &AuthError::InvalidRequest("the CheckRequest has no HTTP request attributes"),
                false,
            )));
        };
        // Envoy sends `headers`, or `header_map` when raw headers are encoded.
        let raw_headers: HashMap<String, String>;
        let headers = if http.headers.is_empty() {
            raw_headers = http
                .header_map
                .as_ref()
                .map(|m| {
                    m.headers
                        .iter()
                        .map(|h| {
                            let v = if h.value.is_empty() {
                                String::from_utf8_lossy(&h.raw_value).into_owned()
                            } else {
                                h.value.clone()
                            };
                            (h.key.to_ascii_lowercase(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            &raw_headers
        } else {
            &http.headers
        };
        let grpc = headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("application/grpc"));
        let host = if http.host.is_empty() {
            headers.get(":authority").map_or("", String::as_str)
        } else {
            http.host.as_str()
        };
        let client_ip = req
            .attributes
            .as_ref()
            .and_then(|a| a.source.as_ref())
            .and_then(|p| p.address.as_ref())
            .and_then(|a| a.address.as_ref())
            .and_then(|a| match a {
                envoy_types::ext_authz::v3::pb::Address::SocketAddress(s) => s.address.parse().ok(),
                _ => None,
            });
        let rule = self.policy.rule_for(host, &http.path, &http.method);
        let started = std::time::Instant::now();
        let result = self.decide(headers, rule, client_ip).await;
        let what = format!(
            "{} {host}{}",
            http.method,
            http.path.split('?').next().unwrap_or("")
        );
        self.observer.decision(
            "Check",
            &what,
            result.as_ref().ok().and_then(|i| i.as_deref()),
            None,
            result.as_ref().map(|_| ()),
            started.elapsed(),
        );
        let resp = match result {
            Ok(identity) => allowed(identity.as_deref()),
            Err(e) => denied(&e, grpc),
        };
        Ok(Response::new(resp))
    }
}
