//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`) on the same
//! server, so that Envoy or Istio can delegate authentication to AuthService.
//!
//! For each request Envoy forwards: the route rule is chosen by host, path prefix and HTTP method
//! ([`RoutePolicy`], the same [`Rule`] model as the layer's policy) in their canonical forms
//! ([`crate::canonical`]: a target that cannot be read one way only is refused with 400); the
//! token comes from `authorization: Bearer …` or the `__session` cookie. An Envoy route can
//! name a rule of the policy's `[rules]` in its `context_extensions` (`clerk_rule = "NAME"`,
//! [`context_rule`]): by default it must pass as well as the path's rule, so the route table can
//! only tighten the policy ([`ContextExtensions`]); a name the policy lacks is refused with
//! `ROUTE_RULE_UNKNOWN` (503), never allowed. Then:
//!
//! * **allow** — `OkHttpResponse` setting `x-clerk-user-id`, `x-clerk-session-id`,
//!   `x-clerk-org-id`, `x-clerk-org-role`, `x-clerk-org-permissions` (overwriting anything the
//!   client sent) and removing those the identity does not have (so none can be spoofed), and
//!   every spelling of them with `_` ([`identity_header_spellings`]), plus
//!   `dynamic_metadata` with the identity;
//! * **deny** — `DeniedHttpResponse` 401 with `WWW-Authenticate: Bearer error="invalid_token"`
//!   (403 for policy, 400 for a non-canonical path, host or method, 503 when verification is
//!   impossible or the route names an unknown rule, 429 when rate limited) and a JSON
//!   body `{"error": REASON, "message": …}`; for gRPC requests (`content-type:
//!   application/grpc…`) a gRPC-shaped denial (HTTP 200, `grpc-status`, `grpc-message`).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::Arc,
};

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
    authz::{
        policy::{ApiKeyOwner, PolicyError, Rule},
        Check,
    },
    canonical,
    error::{AuthError, Reason},
    layer::{AuthorizedOrigins, CookieContext, TokenSources},
    secret::token_fingerprint,
    server::metrics::Observer,
    token::identity::Identity,
    TokenVerifier, VerifyRequest,
};

mod headers;
mod wire;

pub(crate) use headers::Headers;

pub use wire::CheckServer;

/// The encoded `FileDescriptorSet` of `envoy.service.auth.v3` (`external_auth.proto` and its
/// imports, from the vendored protos in `proto/envoy-vendored/`): served by reflection, so that
/// grpcurl can call `Check` without Envoy's protos.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_auth_descriptor.bin"));

/// The identity headers set on allowed requests (and stripped from the client's request).
pub const IDENTITY_HEADERS: [&str; 5] = [
    "x-clerk-user-id",
    "x-clerk-session-id",
    "x-clerk-org-id",
    "x-clerk-org-role",
    "x-clerk-org-permissions",
];

/// Every other spelling of the [`IDENTITY_HEADERS`] with `_` for any of their `-`
/// (`x_clerk_user_id`, `x-clerk_user-id`, …): CGI/WSGI upstreams read them as the same header
/// (`HTTP_X_CLERK_USER_ID`), so allowed responses remove them all. Envoy's
/// `headers_with_underscores_action: REJECT_REQUEST` refuses such requests outright.
pub fn identity_header_spellings() -> &'static [String] {
    static SPELLINGS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        let mut out = Vec::new();
        for name in IDENTITY_HEADERS {
            let dashes: Vec<usize> = name.match_indices('-').map(|(i, _)| i).collect();
            // Each non-zero mask is a non-empty set of dashes turned into underscores.
            for mask in 1u32..(1 << dashes.len()) {
                let mut s = name.as_bytes().to_vec();
                for (bit, &at) in dashes.iter().enumerate() {
                    if mask & (1 << bit) != 0 {
                        s[at] = b'_';
                    }
                }
                out.push(String::from_utf8(s).unwrap_or_default());
            }
        }
        out
    });
    &SPELLINGS
}

/// What [`RoutePolicy::read_request`] read from a request: its rules (the request's own first) and
/// its canonical host and path.
pub(crate) struct Routed<'p> {
    pub(crate) rules: Vec<&'p Rule>,
    pub(crate) host: String,
    pub(crate) path: canonical::CanonicalPath,
}

/// One route: which requests it covers and the rule for them.
#[derive(Debug, Clone)]
pub struct Route {
    /// Exact host, canonical ([`canonical::host`]: lower case, no trailing dot, no port);
    /// `None` = any host.
    pub host: Option<String>,
    /// Path prefix, canonical ([`canonical::path`]), matched on whole segments (`/admin` covers
    /// `/admin` and `/admin/x`, not `/administrator`); `/` covers everything.
    pub path_prefix: String,
    /// HTTP methods (upper case); empty = any.
    pub methods: Vec<String>,
    /// What the route requires.
    pub rule: Rule,
}

/// Rules for the HTTP requests Envoy asks about. The matching route with the longest path
/// prefix wins (then a host-specific over an any-host route, then a method-specific one);
/// no match → the default rule.
///
/// Routes are chosen on the request's canonical host, path and method, and a request whose
/// readings select different rules is refused ([`canonical`] states the rules).
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    routes: Vec<Route>,
    default: Rule,
    machine_id: Option<String>,
    case_sensitive_paths: bool,
    method_override: MethodOverride,
    /// Rules an Envoy route can name in its `context_extensions` ([`CONTEXT_RULE_KEY`]).
    named: BTreeMap<String, Rule>,
    context_extensions: ContextExtensions,
}

/// Where the upstreams behind the proxy may read a method override from (Rails/Rack, Laravel,
/// Symfony, Spring's `HiddenHttpMethodFilter`, Express `method-override` run a POST as the
/// method it names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodOverride {
    /// Headers and the query only (`x-http-method-override`, `x-http-method`,
    /// `x-method-override`, `_method=`), which the proxy shows: each method they name must
    /// select the request's rule, or it is refused (`METHOD_INVALID`). Choose it only when no
    /// upstream reads `_method` from a POST body.
    Headers,
    /// Also the body of a POST (`_method` in a form — Rack even reads a POST without a
    /// content type as one — or in JSON, as Laravel does), which neither Envoy nor a
    /// forward-auth proxy shows: a POST must pass the rule of every method it could become
    /// (each method a route names, and any other) as well as its own. Where no route names
    /// methods this is the POST's rule alone. The default.
    #[default]
    Body,
}

/// The `context_extensions` key naming a rule of the route policy's `[rules]` (set in Envoy's
/// route or virtual-host config: `typed_per_filter_config` → `envoy.filters.http.ext_authz` →
/// `check_settings.context_extensions`; the client cannot set it).
pub const CONTEXT_RULE_KEY: &str = "clerk_rule";

/// Longest rule name, in bytes.
pub const MAX_RULE_NAME: usize = 64;

/// How a rule named by an Envoy route ([`CONTEXT_RULE_KEY`]) combines with the rule the path
/// policy chooses for the request (`context_extensions = "and" | "replace"` in the policy
/// file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextExtensions {
    /// Both must pass (the default): a route can only add requirements, never loosen the path
    /// policy.
    #[default]
    And,
    /// The named rule alone decides: Envoy's route table overrides the path policy for the
    /// routes that name a rule (a route naming a public rule makes its paths public, whatever
    /// the path policy says). Only as safe as Envoy's route matching: a route whose match is
    /// looser than the upstream's reading of the path (prefix vs segment, case, `%2F`, …)
    /// extends the named rule to paths the path policy protects. Targets that cannot be read
    /// one way only are still refused.
    Replace,
}

/// Whether `name` can name a rule: 1 to [`MAX_RULE_NAME`] bytes of lower-case ASCII letters,
/// digits, `_` and `-`, starting with a letter.
pub fn is_rule_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_RULE_NAME
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// The rule name an Envoy route asks for in `context_extensions`: `Ok(None)` when it names
/// none. Keys are matched exactly ([`CONTEXT_RULE_KEY`]); keys that are not ours (no `lerk`
/// in them, in any ASCII case) are ignored, as other filters and access logs read
/// `context_extensions` too; any other key holding `lerk` (`Clerk_Rule`, `clerk-rule`,
/// ` clerk_rule`, `clerk_rules`, `x-clerk_rule`, a zero-width or look-alike first letter…) is
/// refused rather than ignored, since ignoring a misspelt key would drop the requirement the
/// operator meant. The value must be a rule name
/// ([`is_rule_name`]) as written: no trimming, no case folding, no lists.
pub fn context_rule(extensions: &HashMap<String, String>) -> Result<Option<&str>, RouteRuleError> {
    let mut named = None;
    for (key, value) in extensions {
        if key == CONTEXT_RULE_KEY {
            if !is_rule_name(value) {
                return Err(RouteRuleError::NotAName(bounded_debug(value)));
            }
            named = Some(value.as_str());
        } else if looks_like_ours(key) {
            return Err(RouteRuleError::UnknownKey(bounded_debug(key)));
        }
    }
    Ok(named)
}

/// Whether a key other than [`CONTEXT_RULE_KEY`] could be meant as it: anything holding
/// `lerk` in any ASCII case (`Clerk_Rule`, ` clerk_rule`, `_clerk_rule`, `x-clerk_rule`, a
/// zero-width or look-alike first letter such as Cyrillic `с`).
fn looks_like_ours(key: &str) -> bool {
    key.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"lerk"))
}

/// What is wrong with the rule an Envoy route names (logged; the request is refused with
/// `ROUTE_RULE_UNKNOWN`). Values are escaped and cut to [`MAX_RULE_NAME`] characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteRuleError {
    /// A `clerk…` key other than [`CONTEXT_RULE_KEY`].
    #[error("context extension key {0} is not {CONTEXT_RULE_KEY:?} (keys starting with clerk are reserved)")]
    UnknownKey(String),
    /// The value is not a rule name ([`is_rule_name`]).
    #[error("{CONTEXT_RULE_KEY} = {0} is not a rule name (lower-case letters, digits, _ and -)")]
    NotAName(String),
    /// No `[rules.NAME]` in the route policy.
    #[error("{CONTEXT_RULE_KEY} = {0} names no rule of the route policy")]
    NoSuchRule(String),
}

/// `s` escaped, quoted, cut to [`MAX_RULE_NAME`] characters (and how many more there were).
fn bounded_debug(s: &str) -> String {
    let n = s.chars().count();
    let head: String = s.chars().take(MAX_RULE_NAME).collect();
    if n > MAX_RULE_NAME {
        format!("\"{}\"…(+{} chars)", head.escape_debug(), n - MAX_RULE_NAME)
    } else {
        format!("\"{}\"", head.escape_debug())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    machine_id: Option<String>,
    #[serde(default)]
    case_sensitive_paths: bool,
    #[serde(default)]
    method_override: MethodOverride,
    default: Option<Rule>,
    #[serde(default)]
    routes: Vec<RouteEntry>,
    #[serde(default)]
    rules: BTreeMap<String, Rule>,
    #[serde(default)]
    context_extensions: ContextExtensions,
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
    access: crate::authz::policy::Access,
    #[serde(default)]
    require: Vec<Check>,
    #[serde(default)]
    token_types: Option<crate::authz::policy::TokenTypes>,
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
            case_sensitive_paths: false,
            method_override: MethodOverride::default(),
            named: BTreeMap::new(),
            context_extensions: ContextExtensions::And,
        }
    }
}

/// The header names an upstream may read as `name`: CGI-style servers (PHP, wsgiref, uWSGI)
/// map `-` and `_` alike to `_` (`X_Http_Method_Override` is `HTTP_X_HTTP_METHOD_OVERRIDE`).
fn same_header(lower_name: &str, name: &str) -> bool {
    lower_name.len() == name.len()
        && lower_name
            .bytes()
            .zip(name.bytes())
            .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
}

/// The values of every spelling of `name` among `headers` (lower-case names).
fn header_values<'h>(
    headers: &'h Headers,
    name: &'static str,
) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .iter()
        .filter(move |(k, _)| same_header(k, name))
        .map(|(_, v)| v)
}

/// The hosts named by `x-forwarded-host` (every comma-separated entry, under any spelling) and
/// `forwarded` (`host=` of every element, quotes removed).
fn forwarded_hosts(headers: &Headers) -> Vec<&str> {
    let mut out = Vec::new();
    for v in header_values(headers, "x-forwarded-host") {
        out.extend(v.split(',').map(str::trim));
    }
    for v in header_values(headers, "forwarded") {
        for pair in v.split([',', ';']) {
            if let Some((k, val)) = pair.split_once('=') {
                if k.trim().eq_ignore_ascii_case("host") {
                    out.push(val.trim().trim_matches('"'));
                }
            }
        }
    }
    out
}

/// The override headers method-override middleware reads (Express, ASP.NET, Rack, Symfony,
/// Google APIs); ASP.NET MVC also reads them as query parameters.
const OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// A query parameter name as PHP makes it (leading spaces dropped, `.` and space turned into
/// `_`, so that `.method` and `%20method` are `_method` to Laravel and Symfony), lower case,
/// `-` as `_`.
fn query_key(raw: &str) -> String {
    raw.trim_start_matches(' ')
        .chars()
        .map(|c| match c {
            '.' | ' ' | '-' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// The methods a method-override middleware could run instead: the override headers' values
/// (every spelling with `_`), and `_method` (or an override header's name) in the query
/// (percent-decoded, PHP's key rules), upper-cased; a value that is not an HTTP token is kept
/// as given, so that it is refused.
fn method_overrides(headers: &Headers, path: &str) -> Vec<String> {
    let mut out: Vec<String> = OVERRIDE_HEADERS
        .iter()
        .flat_map(|h| header_values(headers, h))
        .flat_map(|v| v.split(','))
        .map(|m| m.trim().to_ascii_uppercase())
        .collect();
    if let Some((_, query)) = path.split_once('?') {
        let keys: Vec<String> = std::iter::once("_method".to_owned())
            .chain(OVERRIDE_HEADERS.iter().map(|h| query_key(h)))
            .collect();
        for pair in query.split(['&', ';']) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("k={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            if keys.contains(&query_key(&decode(k))) {
                out.push(decode(v).trim().to_ascii_uppercase());
            }
        }
    }
    out
}

/// At most this many distinct other hosts or methods a request may name (each is judged in
/// full; more is refused rather than judged).
const MAX_ALTERNATIVES: usize = 16;

/// A route's canonical host, path prefix and methods, or what is wrong with them.
fn canonical_route(
    host: Option<&str>,
    path_prefix: &str,
    methods: &[String],
) -> Result<(Option<String>, String, Vec<String>), String> {
    let host = match host {
        None => None,
        Some(h) => match canonical::host(h) {
            Ok(c) if c.is_empty() => return Err("host is empty".into()),
            Ok(c) => Some(c),
            Err(e) => return Err(format!("host {h:?}: {}", e.message())),
        },
    };
    if !path_prefix.starts_with('/') {
        return Err("path_prefix must start with /".into());
    }
    match canonical::path(path_prefix) {
        Ok(c) if c.as_str() == path_prefix => {}
        Ok(c) => {
            return Err(format!(
                "path_prefix {path_prefix:?} is not canonical (write {:?})",
                c.as_str()
            ))
        }
        Err(e) => return Err(format!("path_prefix {path_prefix:?}: {}", e.message())),
    }
    let mut methods: Vec<String> = methods
        .iter()
        .map(|m| match canonical::method(m) {
            Ok(m) => Ok(m.to_ascii_uppercase()),
            Err(_) => Err(format!("method {m:?} is not an HTTP method token")),
        })
        .collect::<Result<_, _>>()?;
    // Most frameworks answer HEAD with the GET handler: a rule for GET covers HEAD.
    if methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
        methods.push("HEAD".into());
    }
    Ok((host, path_prefix.to_owned(), methods))
}

impl RoutePolicy {
    /// Every request needs a valid session token unless a route says otherwise.
    pub fn authenticated() -> Self {
        Self::default()
    }

    /// Adds a route (its host, prefix and methods are canonicalised as a policy file's are).
    ///
    /// # Panics
    /// When the host, path prefix or a method is invalid or the prefix is not canonical (a
    /// programming error; [`RoutePolicy::from_toml`] reports it as an error instead).
    pub fn route(mut self, route: Route) -> Self {
        let (host, path_prefix, methods) =
            canonical_route(route.host.as_deref(), &route.path_prefix, &route.methods)
                .unwrap_or_else(|e| panic!("invalid route: {e}"));
        self.routes.push(Route {
            host,
            path_prefix,
            methods,
            rule: route.rule,
        });
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

    /// Adds a rule an Envoy route can name with `context_extensions` ([`CONTEXT_RULE_KEY`]).
    ///
    /// # Panics
    /// When `name` is not a rule name ([`is_rule_name`]) or the rule is invalid or names
    /// `peers` (a programming error; [`RoutePolicy::from_toml`] reports it as an error instead).
    pub fn named_rule(mut self, name: &str, rule: Rule) -> Self {
        check_named_rule(name, &rule).unwrap_or_else(|e| panic!("invalid rule: {e}"));
        self.named.insert(name.to_owned(), rule);
        self
    }

    /// How a rule named by an Envoy route combines with the path policy's (default
    /// [`ContextExtensions::And`]: both must pass).
    pub fn context_extensions(mut self, mode: ContextExtensions) -> Self {
        self.context_extensions = mode;
        self
    }

    /// The rule `[rules.NAME]`, if the policy has one.
    pub fn rule_named(&self, name: &str) -> Option<&Rule> {
        self.named.get(name)
    }

    /// Compare paths case-sensitively only (default `false`: a path that selects a different
    /// rule when compared without regard to case is refused). Set it only when every upstream
    /// behind Envoy is known to treat paths case-sensitively.
    pub fn case_sensitive_paths(mut self, yes: bool) -> Self {
        self.case_sensitive_paths = yes;
        self
    }

    /// Where upstreams may read a method override from (default [`MethodOverride::Body`]).
    pub fn method_override(mut self, from: MethodOverride) -> Self {
        self.method_override = from;
        self
    }

    /// The rule for a request, chosen on its canonical host, path and method
    /// ([`canonical`]); refused (`INVALID_ARGUMENT` with `HOST_INVALID`, `METHOD_INVALID` or
    /// `PATH_NOT_CANONICAL`) when one cannot be canonicalised, or when readings an upstream
    /// could make of it (undecoded, unmerged, dot segments kept, case folded, method
    /// upper-cased) select a different rule than the canonical one.
    pub fn rule_for(&self, host: &str, path: &str, method: &str) -> Result<&Rule, AuthError> {
        let host = canonical::host(host)?;
        canonical::method(method)?;
        let path = canonical::path(path)?;
        self.rule_for_canonical(&host, &path, method)
    }

    /// [`RoutePolicy::rule_for`] with the host and path already in their canonical forms.
    fn rule_for_canonical(
        &self,
        host: &str,
        path: &canonical::CanonicalPath,
        method: &str,
    ) -> Result<&Rule, AuthError> {
        let method = canonical::method(method)?;
        let rule = self.select(host, path.as_str(), method, false);
        let upper = canonical::method_upper(method);
        if self.select(host, path.as_str(), &upper, false) != rule {
            return Err(AuthError::NotCanonical {
                reason: Reason::MethodInvalid,
                message: "the HTTP method selects a different rule in upper case",
            });
        }
        let folds: &[bool] = if self.case_sensitive_paths {
            &[false]
        } else {
            &[false, true]
        };
        let methods: &[&str] = if upper == method {
            &[method]
        } else {
            &[method, &upper]
        };
        for &fold in folds {
            for reading in path.readings() {
                for &m in methods {
                    if self.select(host, reading, m, fold) != rule {
                        return Err(AuthError::NotCanonical {
                            reason: Reason::PathNotCanonical,
                            message: if fold {
                                "the path selects a different rule when compared without regard to case"
                            } else {
                                "the path selects a different rule when read without decoding, slash merging or dot removal"
                            },
                        });
                    }
                }
            }
        }
        Ok(rule)
    }

    /// As [`RoutePolicy::rule_for`], for a request with its headers (lower-case names): the
    /// other hosts and methods an upstream could act on — `x-forwarded-host` and
    /// `forwarded: host=` (frameworks behind a proxy serve that host), `x-http-method-override`,
    /// `x-http-method`, `x-method-override` and a `_method` query parameter (method-override
    /// middleware; every spelling with `_`, at most 16 distinct) — must select the same rule,
    /// or the request is refused (`HOST_INVALID` / `METHOD_INVALID`); a request naming another
    /// target (`x-original-url`, `x-rewrite-url`) is refused (`PATH_NOT_CANONICAL`). Then, with [`MethodOverride::Body`], a POST's rules are those of
    /// every method its body could name: the request must pass them all. The first rule is the
    /// request's own; the others differ from it and from each other.
    pub fn rules_for_request(
        &self,
        host: &str,
        path: &str,
        method: &str,
        headers: &HashMap<String, String>,
    ) -> Result<Vec<&Rule>, AuthError> {
        self.read_request(host, path, method, &Headers::from_map(headers))
            .map(|r| r.rules)
    }

    /// [`RoutePolicy::rules_for_request`], with the canonical host and path it read (each
    /// canonicalised once, for every alternative and the audit line).
    pub(crate) fn read_request(
        &self,
        host: &str,
        path: &str,
        method: &str,
        headers: &Headers,
    ) -> Result<Routed<'_>, AuthError> {
        let c_host = canonical::host(host)?;
        canonical::method(method)?;
        let c_path = canonical::path(path)?;
        let rule = self.rule_for_canonical(&c_host, &c_path, method)?;
        let refuse = |reason, message| Err(AuthError::NotCanonical { reason, message });
        // IIS URL Rewrite, ASP.NET, older Symfony, Zend/Laminas serve the target these name
        // instead of the request's: it would be served under the rule of another path.
        if headers
            .names()
            .any(|k| same_header(k, "x-original-url") || same_header(k, "x-rewrite-url"))
        {
            return refuse(
                Reason::PathNotCanonical,
                "the request names another target (X-Original-URL, X-Rewrite-URL)",
            );
        }
        let hosts: std::collections::BTreeSet<&str> =
            forwarded_hosts(headers).into_iter().collect();
        if hosts.len() > MAX_ALTERNATIVES {
            return refuse(
                Reason::HostInvalid,
                "the request names too many forwarded hosts",
            );
        }
        let methods: std::collections::BTreeSet<String> =
            method_overrides(headers, path).into_iter().collect();
        if methods.len() > MAX_ALTERNATIVES {
            return refuse(
                Reason::MethodInvalid,
                "the request names too many method overrides",
            );
        }
        for alt in hosts {
            match canonical::host(alt).and_then(|h| self.rule_for_canonical(&h, &c_path, method)) {
                Ok(r) if r == rule => {}
                _ => {
                    return refuse(
                        Reason::HostInvalid,
                        "a forwarded host header selects a different rule",
                    )
                }
            }
        }
        for alt in methods {
            match self.rule_for_canonical(&c_host, &c_path, &alt) {
                Ok(r) if r == rule => {}
                _ => {
                    return refuse(
                        Reason::MethodInvalid,
                        "a method override selects a different rule",
                    )
                }
            }
        }
        let mut rules = vec![rule];
        if self.method_override == MethodOverride::Body && method.eq_ignore_ascii_case("POST") {
            // A rule depends on the method only through the routes that name it: the named
            // methods and one no route names cover every method a body could ask for.
            let mut other = String::from("X-UNNAMED");
            while self.routes.iter().any(|r| r.methods.contains(&other)) {
                other.push('X');
            }
            let named = self.routes.iter().flat_map(|r| r.methods.iter());
            for alt in named.chain(std::iter::once(&other)) {
                let r = self.rule_for_canonical(&c_host, &c_path, alt)?;
                if !rules.contains(&r) {
                    rules.push(r);
                }
            }
        }
        Ok(Routed {
            rules,
            host: c_host,
            path: c_path,
        })
    }

    /// The request's own rule of [`RoutePolicy::rules_for_request`].
    pub fn rule_for_request(
        &self,
        host: &str,
        path: &str,
        method: &str,
        headers: &HashMap<String, String>,
    ) -> Result<&Rule, AuthError> {
        Ok(self.rules_for_request(host, path, method, headers)?[0])
    }

    /// Whether a route names a host (so that a proxy's virtual hosts must match it).
    pub(crate) fn has_host_routes(&self) -> bool {
        self.routes.iter().any(|r| r.host.is_some())
    }

    /// The rule for one reading of a request (`fold`: paths compared without regard to case).
    fn select(&self, host: &str, path: &str, method: &str, fold: bool) -> &Rule {
        self.routes
            .iter()
            .filter(|r| {
                r.host.as_deref().is_none_or(|h| h == host)
                    && (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
                    && segment_prefix(&r.path_prefix, path, fold)
            })
            .max_by_key(|r| (r.path_prefix.len(), r.host.is_some(), !r.methods.is_empty()))
            .map_or(&self.default, |r| &r.rule)
    }

    /// Parses a TOML route policy:
    ///
    /// ```toml
    /// # case_sensitive_paths = false   # true: upstreams are known case-sensitive
    /// # method_override = "body"       # "headers": no upstream reads _method from a POST body
    /// # context_extensions = "and"     # "replace": a rule an Envoy route names alone decides
    ///
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
    ///
    /// # A rule an Envoy route names: context_extensions { clerk_rule: admin }
    /// [rules.admin]
    /// require = [{ role = "org:admin" }]
    /// ```
    ///
    /// Hosts are canonicalised ([`canonical::host`]); a path prefix must already be canonical
    /// ([`canonical::path`]: no `//`, dot segments, `;`, encoded unreserved characters…);
    /// methods must be HTTP tokens. With `case_sensitive_paths = false`, two prefixes that
    /// differ only by case are refused (every request under them would be). Rule names are
    /// [`is_rule_name`]s; `[default]` and `[rules.*]` cannot name `peers` (the TLS peer of
    /// `Check` is Envoy).
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        let err = |m: String| PolicyError::new(source_name, m);
        let file: RouteFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut policy = Self {
            case_sensitive_paths: file.case_sensitive_paths,
            method_override: file.method_override,
            ..Self::default()
        };
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
        for (name, rule) in file.rules {
            check_named_rule(&name, &rule).map_err(err)?;
            policy.named.insert(name, rule);
        }
        policy.context_extensions = file.context_extensions;
        for (i, r) in file.routes.into_iter().enumerate() {
            let (host, path_prefix, methods) =
                canonical_route(r.host.as_deref(), &r.path_prefix, &r.methods)
                    .map_err(|e| err(format!("routes[{i}]: {e}")))?;
            if !policy.case_sensitive_paths {
                if let Some(j) = policy.routes.iter().position(|o| {
                    o.path_prefix != path_prefix && o.path_prefix.eq_ignore_ascii_case(&path_prefix)
                }) {
                    return Err(err(format!(
                        "routes[{i}]: path_prefix {path_prefix:?} differs from routes[{j}]'s only by case \
                         (with case_sensitive_paths = false every request under them is refused)"
                    )));
                }
            }
            let rule = r.rule();
            rule.validate()
                .map_err(|e| err(format!("routes[{i}]: {e}")))?;
            if policy.method_override == MethodOverride::Body && methods.iter().any(|m| m == "POST")
            {
                tracing::warn!(
                    route = i,
                    path_prefix = %path_prefix,
                    "with method_override = \"body\" a POST here must also pass the rules of \
                     the other methods on these paths (its body could name them): drop `methods` \
                     from this route, or set method_override = \"headers\" if no upstream reads \
                     _method from a POST body"
                );
            }
            policy.routes.push(Route {
                host,
                path_prefix,
                methods,
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

/// Why `[rules.NAME]` cannot be used, if it cannot.
fn check_named_rule(name: &str, rule: &Rule) -> Result<(), String> {
    if !is_rule_name(name) {
        return Err(format!(
            "rules.{}: a rule name is 1 to {MAX_RULE_NAME} lower-case letters, digits, _ and -, \
             starting with a letter",
            bounded_debug(name)
        ));
    }
    rule.validate().map_err(|e| format!("rules.{name}: {e}"))?;
    if !rule.peers.is_empty() {
        return Err(format!(
            "rules.{name}: peers cannot be checked by Check (the TLS peer is Envoy)"
        ));
    }
    Ok(())
}

/// Whether `prefix` covers `path` on whole segments (`fold`: without regard to ASCII case).
fn segment_prefix(prefix: &str, path: &str, fold: bool) -> bool {
    if prefix == "/" || prefix.is_empty() {
        return true;
    }
    let (p, x) = (prefix.as_bytes(), path.as_bytes());
    let Some(head) = x.get(..p.len()) else {
        return false;
    };
    let same = if fold {
        head.eq_ignore_ascii_case(p)
    } else {
        head == p
    };
    let rest = &x[p.len()..];
    same && (prefix.ends_with('/') || rest.is_empty() || rest.starts_with(b"/"))
}

/// A request's target as the proxy reports it (before canonicalisation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    /// `Host` / `:authority`.
    pub(crate) host: &'a str,
    /// Path and query.
    pub(crate) path: &'a str,
    /// HTTP method.
    pub(crate) method: &'a str,
}

/// The `Authorization` service.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    verifier: TokenVerifier,
    policy: Arc<RoutePolicy>,
    observer: Observer,
    /// The verifier's authorized parties as origins, for cookie-borne tokens.
    authorized: Arc<AuthorizedOrigins>,
}

impl ExtAuthz {
    /// Checks requests with `verifier` against `policy`.
    pub fn new(verifier: TokenVerifier, policy: RoutePolicy) -> Self {
        let authorized = AuthorizedOrigins::new(verifier.validation().authorized_parties.clone());
        Self {
            verifier,
            policy: Arc::new(policy),
            observer: Observer::default(),
            authorized: Arc::new(authorized),
        }
    }

    /// Sends every decision to `observer` (metrics and the audit log).
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = observer;
        self
    }

    /// The tonic server for Envoy: `Check` as the generated `AuthorizationServer` serves it
    /// (this type also implements [`Authorization`]), with the allowed answer assembled from
    /// bytes ([`CheckServer`]).
    pub fn into_server(self) -> CheckServer {
        CheckServer::new(self)
    }

    /// The decision behind `Check` and the HTTP forward-auth endpoint: the rule for the
    /// request's canonical host, path and method (a target that cannot be read one way only is
    /// refused), then the token (`authorization` or the `__session` cookie) against it.
    /// `headers` has lower-case names, repeated ones joined. Every decision goes to the
    /// observer (metrics, audit log) as `surface`, with the canonical target (a refused one
    /// escaped, never raw). No route context: [`ExtAuthz::judge_routed`] with none.
    pub(crate) async fn judge(
        &self,
        surface: &'static str,
        host: &str,
        path: &str,
        method: &str,
        headers: &Headers,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Option<Arc<Identity>>, AuthError> {
        let target = Target { host, path, method };
        self.judge_routed(surface, target, headers, client_ip, Ok(None))
            .await
    }

    /// [`ExtAuthz::judge`], with the rule the proxy's route names (`route_rule`, from
    /// [`context_rule`]; only `Check` has one, from Envoy's `context_extensions`). A named
    /// rule must pass as well as the path policy's ([`ContextExtensions::And`]), or instead of
    /// it ([`ContextExtensions::Replace`]). A name the policy does not define, or that is not
    /// a name, is refused with `ROUTE_RULE_UNKNOWN` (`FAILED_PRECONDITION`; HTTP 503 from
    /// `Check`) and an error log: the server cannot decide, so it never allows. The audit line
    /// and `clerk_auth_route_rule_decisions` carry the rule's name (`(invalid)` when refused).
    pub(crate) async fn judge_routed(
        &self,
        surface: &'static str,
        target: Target<'_>,
        headers: &Headers,
        client_ip: Option<std::net::IpAddr>,
        route_rule: Result<Option<&str>, RouteRuleError>,
    ) -> Result<Option<Arc<Identity>>, AuthError> {
        let started = std::time::Instant::now();
        let Target { host, path, method } = target;
        // A page load behind a proxy (for the cookie checks): a GET or HEAD that no override
        // turns into another method.
        // Only a cookie-borne token reads it: the override scan is skipped for everyone else.
        let navigation = matches!(method, "GET" | "HEAD")
            && headers.contains("cookie")
            && method_overrides(headers, path).is_empty();
        let named = route_rule.and_then(|name| match name {
            None => Ok(None),
            Some(name) => self
                .policy
                .named
                .get_key_value(name)
                .map(|(n, r)| Some((n.as_str(), r)))
                .ok_or_else(|| RouteRuleError::NoSuchRule(bounded_debug(name))),
        });
        let routed = self.policy.read_request(host, path, method, headers);
        let what = match &routed {
            // `METHOD hostPATH`, without the formatting machinery (every decision writes it).
            Ok(r) => [method, " ", &r.host, r.path.as_str()].concat(),
            Err(_) => format!(
                "{} {}{}",
                method.escape_debug(),
                host.escape_debug(),
                path.split('?').next().unwrap_or("").escape_debug()
            ),
        };
        let rule_label = match &named {
            Ok(n) => n.map(|(name, _)| name),
            Err(_) => Some("(invalid)"),
        };
        // A route naming no usable rule is the operator's error: refused before the target
        // is looked at, so that it shows on every request of that route.
        let result = match (named, routed.map(|r| r.rules)) {
            (Err(e), _) => {
                tracing::error!(
                    surface,
                    error = %e,
                    "the proxy's route names no rule of the route policy; refused"
                );
                Err(AuthError::Misconfigured(Reason::RouteRuleUnknown))
            }
            (Ok(_), Err(e)) => Err(e),
            (Ok(None), Ok(rules)) => self.decide(headers, navigation, &rules, client_ip).await,
            (Ok(Some((_, named))), Ok(mut rules)) => match self.policy.context_extensions {
                ContextExtensions::And => {
                    rules.push(named);
                    self.decide(headers, navigation, &rules, client_ip).await
                }
                // The named rule stands in for the request's own rule only: a POST still needs
                // every rule its body could select (`method_override = "body"`).
                ContextExtensions::Replace => {
                    rules[0] = named;
                    self.decide(headers, navigation, &rules, client_ip).await
                }
            },
        };
        self.observer.route_decision(
            surface,
            &what,
            rule_label,
            result.as_ref().ok().and_then(|i| i.as_deref()),
            result.as_ref().map(|_| ()),
            started.elapsed(),
        );
        result
    }

    /// Every rule of `rules` must pass: public ones need nothing; each other one is checked
    /// with its own token settings (types, pending) and requirements (the same token, so the
    /// second verification is a verdict-cache hit).
    async fn decide(
        &self,
        headers: &Headers,
        navigation: bool,
        rules: &[&Rule],
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Option<Arc<Identity>>, AuthError> {
        let mut identity = None;
        for (i, rule) in rules.iter().enumerate() {
            if rule.is_public() || rules[..i].contains(rule) {
                continue;
            }
            identity = Some(
                self.verify_token(headers, navigation, rule, client_ip)
                    .await?,
            );
        }
        Ok(identity)
    }

    /// The token against `rule`. From the `__session` cookie it needs what the layer asks
    /// of one ([`CookieContext`]: `__client_uat`, `iat` not before it, an `Origin` among the
    /// authorized parties, no request from another page without one but a page load).
    async fn verify_token(
        &self,
        headers: &Headers,
        navigation: bool,
        rule: &Rule,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Arc<Identity>, AuthError> {
        // Only the headers the extractor and the cookie checks read are copied into a header
        // map (repeated ones arrive joined: two `Origin`s are one unreadable value).
        let mut map = HeaderMap::new();
        for name in [
            "authorization",
            "cookie",
            "origin",
            "sec-fetch-site",
            "sec-fetch-mode",
            "sec-fetch-dest",
        ] {
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
        let (token, origin) = TokenSources::default().extract_with_origin(&map)?;
        let accepted = origin.accepted(&rule.token_types)?;
        let cookie = match origin {
            crate::layer::Origin::Cookie => {
                Some(CookieContext::read_for(&map, &self.authorized, navigation)?)
            }
            crate::layer::Origin::Header => None,
        };
        let identity = self
            .verifier
            .verify(&VerifyRequest {
                token,
                accept_pending: rule.accept_pending,
                // From the `__session` cookie: session tokens only (Clerk reads machine
                // tokens from `Authorization` only).
                accepted_types: accepted,
                source: client_ip,
                ..VerifyRequest::default()
            })
            .await
            .inspect_err(|e| {
                tracing::debug!(token = %token_fingerprint(token), reason = e.reason_str(), "Check refused");
            })?;
        if let Some(cookie) = &cookie {
            cookie.check(&identity, &self.authorized)?;
        }
        rule.authorize(&identity, self.policy.machine_id.as_deref())
            .map_err(AuthError::Denied)?;
        Ok(identity)
    }
}

/// The identity's own headers for the upstream: each set when the identity has a value,
/// removed otherwise (a client's copy never passes).
fn identity_headers(identity: Option<&Identity>) -> OkHttpResponseBuilder {
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
    ok
}

/// The allowed answer: the identity headers, the removal of every other spelling of them,
/// the identity as dynamic metadata.
fn allowed(identity: Option<&Identity>) -> CheckResponse {
    let mut ok = identity_headers(identity);
    // CGI/WSGI upstreams read `x_clerk_user_id` (and any mix of `-` and `_`) as the same
    // header: the client's copies under those spellings are removed too.
    for name in identity_header_spellings() {
        ok.remove_header(name);
    }
    let mut resp = CheckResponse::with_status(Status::ok(ALLOWED));
    resp.set_http_response(ok);
    if let Some(i) = identity {
        resp.set_dynamic_metadata(Some(metadata(i)));
    }
    resp
}

/// The allowed answer's status message.
const ALLOWED: &str = "allowed";

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

/// What `Check` answers: an allow for an identity (or a public route), or a denial already
/// built. Encoded by the trait ([`allowed`]) or, on the served path, from bytes
/// ([`wire::allowed`]); the two are the same message (tested).
// Returned once per call, never stored: boxing the denial would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Answer {
    Allowed(Option<Arc<Identity>>),
    Denied(CheckResponse),
}

impl ExtAuthz {
    /// The decision for one `CheckRequest`. `headers` is its `attributes.request.http.headers`
    /// (decoded apart from the message: [`wire::Lean`]).
    async fn answer(&self, req: &CheckRequest, headers: &Headers) -> Answer {
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let Some(http) = http else {
            return Answer::Denied(denied(
                &AuthError::InvalidRequest("the CheckRequest has no HTTP request attributes"),
                false,
            ));
        };
        // Envoy sends `headers`, or `header_map` when raw headers are encoded. Repeated
        // headers are joined as Envoy joins them in `headers` (cookies with `; `, others with
        // `,`), so both forms read the same: a second `authorization` makes the credential
        // unreadable (refused), never "the last one wins".
        let raw_headers: Headers;
        let headers = if headers.is_empty() {
            let raw = http.header_map.iter().flat_map(|m| &m.headers);
            let values: Vec<(&str, std::borrow::Cow<'_, str>)> = raw
                .map(|h| {
                    let v = if h.value.is_empty() {
                        String::from_utf8_lossy(&h.raw_value)
                    } else {
                        std::borrow::Cow::Borrowed(h.value.as_str())
                    };
                    (h.key.as_str(), v)
                })
                .collect();
            raw_headers = Headers::joined(values.iter().map(|(k, v)| (*k, &**v)));
            &raw_headers
        } else {
            headers
        };
        let grpc = headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("application/grpc"));
        let host = if http.host.is_empty() {
            headers.get(":authority").unwrap_or("")
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
        // Set by Envoy's route configuration only (the client cannot set them).
        let route_rule = req
            .attributes
            .as_ref()
            .map_or(Ok(None), |a| context_rule(&a.context_extensions));
        let target = Target {
            host,
            path: &http.path,
            method: &http.method,
        };
        let result = self
            .judge_routed("Check", target, headers, client_ip, route_rule)
            .await;
        match result {
            Ok(identity) => Answer::Allowed(identity),
            Err(e) => Answer::Denied(denied(&e, grpc)),
        }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let req = request.get_ref();
        let headers = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|h| Headers::from_map(&h.headers))
            .unwrap_or_default();
        Ok(Response::new(match self.answer(req, &headers).await {
            Answer::Allowed(identity) => allowed(identity.as_deref()),
            Answer::Denied(resp) => resp,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn rule_names() {
        for ok in [
            "admin",
            "a",
            "public-health",
            "tier_2",
            &"a".repeat(MAX_RULE_NAME),
        ] {
            assert!(is_rule_name(ok), "{ok:?}");
        }
        let long = "a".repeat(MAX_RULE_NAME + 1);
        for bad in [
            "",
            "Admin",
            "ADMIN",
            "1admin",
            "_admin",
            "-admin",
            " admin",
            "admin ",
            "ad min",
            "admin,billing",
            "admin\n",
            "ad\0min",
            "ädmin",
            "../admin",
            "admin.x",
            "a/b",
            &long,
        ] {
            assert!(!is_rule_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn context_extension_shapes() {
        use RouteRuleError::*;
        let huge = "a".repeat(100_000);
        // (extensions, the rule named or which kind of refusal)
        type Case<'a> = (HashMap<String, String>, Result<Option<&'a str>, &'a str>);
        let cases: Vec<Case<'_>> = vec![
            (ext(&[]), Ok(None)),
            (ext(&[("clerk_rule", "admin")]), Ok(Some("admin"))),
            // Not ours: ignored (other filters and access logs read context_extensions).
            (ext(&[("virtual_host", "api"), ("rule", "x")]), Ok(None)),
            (
                ext(&[("virtual_host", "api"), ("clerk_rule", "admin")]),
                Ok(Some("admin")),
            ),
            (ext(&[("rule_set", "x")]), Ok(None)),
            // Ours, misspelt or in another case: refused, never ignored.
            (ext(&[("Clerk_Rule", "admin")]), Err("key")),
            (ext(&[("CLERK_RULE", "admin")]), Err("key")),
            (ext(&[("clerk-rule", "admin")]), Err("key")),
            (ext(&[(" clerk_rule", "admin")]), Err("key")),
            (ext(&[("clerk_rule ", "admin")]), Err("key")),
            (ext(&[("clerk_rules", "admin")]), Err("key")),
            (ext(&[("clerk", "admin")]), Err("key")),
            (ext(&[("my_clerk_rule", "admin")]), Err("key")),
            (ext(&[("x-clerk_rule", "admin")]), Err("key")),
            (ext(&[("\u{200b}clerk_rule", "admin")]), Err("key")),
            (ext(&[("\u{feff}clerk_rule", "admin")]), Err("key")),
            (ext(&[("\u{441}lerk_rule", "admin")]), Err("key")),
            (ext(&[("\u{ff43}lerk_rule", "admin")]), Err("key")),
            (ext(&[("\0clerk_rule", "admin")]), Err("key")),
            (
                ext(&[("clerk_rule", "admin"), ("Clerk_rule", "public")]),
                Err("key"),
            ),
            // Values: a rule name as written, nothing else.
            (ext(&[("clerk_rule", "")]), Err("value")),
            (ext(&[("clerk_rule", " admin")]), Err("value")),
            (ext(&[("clerk_rule", "admin ")]), Err("value")),
            (ext(&[("clerk_rule", "Admin")]), Err("value")),
            (ext(&[("clerk_rule", "admin,public")]), Err("value")),
            (ext(&[("clerk_rule", "admin public")]), Err("value")),
            (ext(&[("clerk_rule", "admin\npublic")]), Err("value")),
            (ext(&[("clerk_rule", "ad\0min")]), Err("value")),
            (ext(&[("clerk_rule", huge.as_str())]), Err("value")),
        ];
        for (input, want) in cases {
            let got = context_rule(&input);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(*g, w, "{input:?}"),
                (Err("key"), Err(UnknownKey(_))) | (Err("value"), Err(NotAName(_))) => {}
                _ => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
        // A huge value is cut in the error (it is logged), and control characters escaped.
        let e = context_rule(&ext(&[("clerk_rule", huge.as_str())]))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 300, "{e}");
        assert!(e.contains("(+99936 chars)"), "{e}");
        let e = context_rule(&ext(&[("clerk_rule", "a\nb\u{1b}[31m")]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e:?}");
    }

    #[test]
    fn policy_files_define_named_rules() {
        let p = RoutePolicy::from_toml(
            r#"
context_extensions = "replace"
[rules.admin]
require = [{ role = "admin" }]
[rules.public]
access = "public"
"#,
            "r.toml",
        )
        .unwrap();
        assert_eq!(p.context_extensions, ContextExtensions::Replace);
        assert!(p.rule_named("public").unwrap().is_public());
        assert!(!p.rule_named("admin").unwrap().is_public());
        assert!(p.rule_named("Admin").is_none());
        let p = RoutePolicy::from_toml("[rules.a]\n", "r.toml").unwrap();
        assert_eq!(p.context_extensions, ContextExtensions::And);
        for (text, needle) in [
            ("[rules.Admin]\n", "rule name"),
            ("[rules.\"a b\"]\n", "rule name"),
            ("[rules.\"\"]\n", "rule name"),
            ("[rules.1x]\n", "rule name"),
            (&format!("[rules.{}]\n", "a".repeat(65)), "rule name"),
            ("[rules.a]\npeers = [\"spiffe://x/y\"]\n", "peers"),
            ("[rules.a]\nrol = \"admin\"\n", "rol"),
            (
                "[rules.a]\naccess = \"public\"\nscopes = [\"x\"]\n",
                "public",
            ),
            ("context_extensions = \"or\"\n", "or"),
            ("context_extensions = \"AND\"\n", "AND"),
        ] {
            let e = RoutePolicy::from_toml(text, "r.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{text:?} → {e}");
        }
    }

    /// The audit line and the metrics name the rule the route asked for.
    #[test]
    fn audit_and_metrics_show_the_named_rule() {
        use std::sync::Mutex;
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = runtime.enter();
        // Never asked: every rule here is public.
        let keys = crate::verify::jwks::KeyStore::new(
            crate::verify::jwks::KeySource::Remote {
                url: "http://127.0.0.1:9/v1/jwks".parse().unwrap(),
                bearer: None,
            },
            crate::verify::jwks::KeyStoreConfig::default(),
            crate::clerk::api::http_client().unwrap(),
        );
        let verifier = TokenVerifier::new(crate::verify::TokenVerifierConfig::default(), keys);
        let metrics = crate::server::metrics::Metrics::new(verifier.clone(), None);
        let policy = RoutePolicy::authenticated()
            .default_rule(Rule::public())
            .named_rule("health", Rule::public());
        let authz =
            ExtAuthz::new(verifier, policy).with_observer(Observer::new(Some(metrics.clone())));
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let target = Target {
            host: "api.example.com",
            path: "/healthz",
            method: "GET",
        };
        let headers = Headers::default();
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                let ok = authz
                    .judge_routed("Check", target, &headers, None, Ok(Some("health")))
                    .await;
                assert_eq!(ok, Ok(None));
                let refused = authz
                    .judge_routed("Check", target, &headers, None, Ok(Some("nosuch")))
                    .await;
                assert_eq!(
                    refused,
                    Err(AuthError::Misconfigured(Reason::RouteRuleUnknown))
                );
                let refused = authz
                    .judge_routed(
                        "Check",
                        target,
                        &headers,
                        None,
                        context_rule(&ext(&[("Clerk_Rule", "health")])),
                    )
                    .await;
                assert_eq!(
                    refused,
                    Err(AuthError::Misconfigured(Reason::RouteRuleUnknown))
                );
            })
        });
        let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let audit: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("clerk_grpc_auth::audit"))
            .collect();
        assert_eq!(audit.len(), 3, "{logs}");
        assert!(
            audit[0].contains("rule=\"health\"") || audit[0].contains("rule=health"),
            "{logs}"
        );
        assert!(
            audit[0].contains("verdict=\"allow\"") || audit[0].contains("verdict=allow"),
            "{logs}"
        );
        assert!(
            audit[1].contains("(invalid)") && audit[1].contains("ROUTE_RULE_UNKNOWN"),
            "{logs}"
        );
        let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 2, "{logs}");
        assert!(
            errors[0].contains("clerk_rule = \"nosuch\" names no rule"),
            "{logs}"
        );
        assert!(errors[1].contains("Clerk_Rule"), "{logs}");
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"clerk_auth_route_rule_decisions_total{method="Check",rule="health",outcome="allowed"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"clerk_auth_route_rule_decisions_total{method="Check",rule="(invalid)",outcome="misconfigured"} 2"#
            ),
            "{text}"
        );
    }
}
