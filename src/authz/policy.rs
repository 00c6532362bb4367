//! Per-method access policy for the auth layer: which calls are public, which need a valid
//! token, and what the token must carry (Clerk `has()` checks, token types, pending sessions).
//!
//! A [`Policy`] holds a default [`Rule`], rules per service (`pkg.Service`) and rules per method
//! (`/pkg.Service/Method`). The **most specific rule wins, whole**: a method rule replaces its
//! service's rule, which replaces the default — rules are never merged, so what a method
//! requires is always written in one place. The gRPC health and reflection services are public
//! unless the policy names them.
//!
//! Built in code:
//!
//! ```
//! use clerk_grpc_auth::authz::{policy::{Policy, Rule}, Check};
//!
//! let policy = Policy::authenticated()
//!     .method("/examples.orders.v1.Orders/Ping", Rule::public())
//!     .method(
//!         "/examples.orders.v1.Orders/DeleteOrder",
//!         Rule::authenticated().require(Check::permission("org:orders:delete")),
//!     );
//! assert!(policy.rule_for("/examples.orders.v1.Orders/Ping").unwrap().is_public());
//! // Not exactly /pkg.Service/Method: refused before any rule is looked up.
//! assert!(policy.rule_for("examples.orders.v1.Orders/DeleteOrder").is_err());
//! ```
//!
//! or loaded from TOML ([`Policy::from_toml`]):
//!
//! ```toml
//! [default]
//! access = "authenticated"            # or "public"
//!
//! [services."examples.orders.v1.Orders"]
//! token_types = ["session_token"]     # session_token | m2m_token | oauth_token | api_key | any
//! accept_pending = false
//!
//! [methods."/examples.orders.v1.Orders/Ping"]
//! access = "public"
//!
//! [methods."/examples.orders.v1.Orders/DeleteOrder"]
//! require = [{ permission = "org:orders:delete" }, { reverification = "strict" }]
//! ```
//!
//! `require` is a list of `has()` checks that must all pass; within one check, asking several
//! things is Clerk's AND across dimensions. Unknown keys, empty values, unknown scopes and
//! malformed method paths are refused when the policy is loaded, so a typo cannot silently
//! open or close a method.

use std::{collections::HashMap, path::Path, sync::Arc};

use serde::Deserialize;

use crate::{
    authz::{Check, Unmet},
    error::{AuthError, Denial},
    token::identity::{Identity, TokenType},
};

/// Services that are public unless the policy names them.
pub const PUBLIC_BY_DEFAULT: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Whether a call needs a token at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// No token needed; none is read or verified.
    Public,
    /// A valid token is needed, and every check of the rule must pass.
    #[default]
    Authenticated,
}

/// What one method (or service, or the default) requires.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Public or authenticated (the default).
    #[serde(default)]
    pub access: Access,
    /// `has()` checks that must all pass.
    #[serde(default)]
    pub require: Vec<Check>,
    /// Accepted token types (default: session tokens only; `any` = all four).
    #[serde(default = "session_only", deserialize_with = "de_token_types")]
    pub token_types: Vec<TokenType>,
    /// Whether `pending` sessions pass (default: no, as in Clerk).
    #[serde(default)]
    pub accept_pending: bool,
    /// Scopes a machine token must carry, all of them (M2M: machine ids; OAuth: OAuth scopes;
    /// API keys: their scopes). A token without scopes (a session token) fails.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// API keys must be owned by a user (`user`) or an organization (`org`).
    #[serde(default)]
    pub api_key_owner: Option<ApiKeyOwner>,
    /// mTLS: the caller's client certificate must carry one of these SPIFFE IDs
    /// (`spiffe://…`), checked before the token (`PERMISSION_DENIED` / `PEER_NOT_ALLOWED`).
    #[serde(default)]
    pub peers: Vec<String>,
}

/// Who owns an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyOwner {
    /// `subject` is `user_…`.
    User,
    /// `subject` is `org_…`.
    Org,
}

/// The per-method policy. Cheap to clone (the tables are shared).
#[derive(Debug, Clone)]
pub struct Policy {
    inner: Arc<Tables>,
}

#[derive(Debug, Clone)]
struct Tables {
    machine_id: Option<String>,
    default: Rule,
    services: HashMap<String, Rule>,
    methods: HashMap<String, Rule>,
    /// The same tables keyed in lower case: a path whose case-folded lookup selects another
    /// rule than its exact one is refused.
    folded_services: HashMap<String, Rule>,
    folded_methods: HashMap<String, Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    machine_id: Option<String>,
    default: Option<Rule>,
    #[serde(default)]
    services: HashMap<String, Rule>,
    #[serde(default)]
    methods: HashMap<String, Rule>,
}

/// A policy that could not be loaded: names the entry and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("policy {source_name}: {message}")]
pub struct PolicyError {
    source_name: String,
    message: String,
}

impl PolicyError {
    pub(crate) fn new(source_name: &str, message: impl Into<String>) -> Self {
        Self {
            source_name: source_name.to_owned(),
            message: message.into(),
        }
    }
}

/// Accepted token types as TOML names them (`session_token`, …, `any`); ext_authz's route
/// table reads them too.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) struct TokenTypes(pub(crate) Vec<TokenType>);

impl<'de> Deserialize<'de> for TokenTypes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_token_types(d).map(TokenTypes)
    }
}

fn session_only() -> Vec<TokenType> {
    vec![TokenType::SessionToken]
}

fn de_token_types<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TokenType>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    let mut out = Vec::new();
    for n in &names {
        let add: &[TokenType] = match n.as_str() {
            "session_token" => &[TokenType::SessionToken],
            "m2m_token" => &[TokenType::M2mToken],
            "oauth_token" => &[TokenType::OauthToken],
            "api_key" => &[TokenType::ApiKey],
            "any" => &[
                TokenType::SessionToken,
                TokenType::M2mToken,
                TokenType::OauthToken,
                TokenType::ApiKey,
            ],
            other => {
                return Err(serde::de::Error::custom(format!(
                    "unknown token type {other:?} (session_token, m2m_token, oauth_token, api_key, any)"
                )))
            }
        };
        for t in add {
            if !out.contains(t) {
                out.push(*t);
            }
        }
    }
    if out.is_empty() {
        return Err(serde::de::Error::custom("token_types is empty"));
    }
    Ok(out)
}

// === impl Rule ===

impl Rule {
    /// No token needed.
    pub fn public() -> Self {
        Self {
            access: Access::Public,
            require: Vec::new(),
            token_types: session_only(),
            accept_pending: false,
            scopes: Vec::new(),
            api_key_owner: None,
            peers: Vec::new(),
        }
    }

    /// A valid session token needed (active sessions only), nothing more.
    pub fn authenticated() -> Self {
        Self {
            access: Access::Authenticated,
            ..Self::public()
        }
    }

    /// Adds a `has()` check that must pass.
    pub fn require(mut self, check: Check) -> Self {
        self.require.push(check);
        self
    }

    /// Sets the accepted token types (Clerk's `acceptsToken`).
    pub fn token_types(mut self, types: impl IntoIterator<Item = TokenType>) -> Self {
        self.token_types = types.into_iter().collect();
        self
    }

    /// Requires a scope on machine tokens.
    pub fn require_scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.push(scope.into());
        self
    }

    /// Limits API keys to user- or organization-owned ones.
    pub fn api_key_owner(mut self, owner: ApiKeyOwner) -> Self {
        self.api_key_owner = Some(owner);
        self
    }

    /// Requires the caller's mTLS SPIFFE ID to be one of `peers`.
    ///
    /// # Panics
    ///
    /// When `peers` is not empty and the crate is built without the `mtls` feature (no client
    /// certificate could be read, so the rule would refuse every caller).
    pub fn peers(mut self, peers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.peers = peers.into_iter().map(Into::into).collect();
        assert!(
            cfg!(feature = "mtls") || self.peers.is_empty(),
            "Rule::peers needs the `mtls` feature of clerk-grpc-auth"
        );
        self
    }

    /// Lets `pending` sessions through.
    pub fn accept_pending(mut self, yes: bool) -> Self {
        self.accept_pending = yes;
        self
    }

    /// Whether no token is needed.
    pub fn is_public(&self) -> bool {
        self.access == Access::Public
    }

    /// Runs the rule's checks against a verified identity (token type and pending status are
    /// the verifier's business: they are rejections, not denials). `machine_id` is this
    /// service's machine id: an M2M token must list it in its scopes (Clerk's M2M semantics).
    pub fn authorize(&self, identity: &Identity, machine_id: Option<&str>) -> Result<(), Denial> {
        let deny = |unmet, required: Vec<(&'static str, String)>| Err(Denial { unmet, required });
        let scopes = identity
            .machine
            .as_ref()
            .map(|m| &m.scopes[..])
            .unwrap_or(&[]);
        if let (Some(own), TokenType::M2mToken) = (machine_id, identity.token_type) {
            if !scopes.iter().any(|s| s == own) {
                return deny(
                    Unmet::MachineNotAllowed,
                    vec![("machine_id", own.to_owned())],
                );
            }
        }
        for s in &self.scopes {
            if !scopes.contains(s) {
                return deny(Unmet::Scope, vec![("scope", s.clone())]);
            }
        }
        if let (Some(owner), TokenType::ApiKey) = (self.api_key_owner, identity.token_type) {
            let subject = identity.machine.as_ref().map_or("", |m| m.subject.as_str());
            let (ok, want) = match owner {
                ApiKeyOwner::User => (subject.starts_with("user_"), "user"),
                ApiKeyOwner::Org => (subject.starts_with("org_"), "org"),
            };
            if !ok {
                return deny(Unmet::ApiKeyOwner, vec![("owner", want.to_owned())]);
            }
        }
        for check in &self.require {
            check.judge(identity)?;
        }
        Ok(())
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.is_public()
            && (!self.require.is_empty()
                || self.accept_pending
                || !self.scopes.is_empty()
                || self.api_key_owner.is_some()
                || !self.peers.is_empty())
        {
            return Err("a public rule cannot require anything".into());
        }
        if self.token_types.is_empty() {
            return Err("token_types is empty".into());
        }
        for (i, c) in self.require.iter().enumerate() {
            c.validate().map_err(|e| format!("require[{i}] {e}"))?;
        }
        if self.scopes.iter().any(|s| s.trim().is_empty()) {
            return Err("scopes holds an empty scope".into());
        }
        if let Some(p) = self
            .peers
            .iter()
            .find(|p| !crate::authz::peer::is_spiffe_id(p))
        {
            return Err(format!("peers: {p:?} is not a spiffe:// ID"));
        }
        if cfg!(not(feature = "mtls")) && !self.peers.is_empty() {
            return Err(
                "peers: this build reads no client certificates (enable the `mtls` feature)".into(),
            );
        }
        Ok(())
    }
}

// === impl Policy ===

impl Policy {
    /// Every method needs a valid session token, unless a rule says otherwise.
    pub fn authenticated() -> Self {
        Self::with_default(Rule::authenticated())
    }

    /// Every method is public unless a rule says otherwise.
    pub fn public() -> Self {
        Self::with_default(Rule::public())
    }

    /// A policy with this default rule (health and reflection public).
    pub fn with_default(default: Rule) -> Self {
        let services: HashMap<String, Rule> = PUBLIC_BY_DEFAULT
            .iter()
            .map(|s| ((*s).to_owned(), Rule::public()))
            .collect();
        let folded_services = services
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        Self {
            inner: Arc::new(Tables {
                machine_id: None,
                default,
                services,
                methods: HashMap::new(),
                folded_services,
                folded_methods: HashMap::new(),
            }),
        }
    }

    /// This service's machine id (`mch_…`): every M2M token must list it in its scopes, as
    /// Clerk's M2M tokens name the machines they may call.
    pub fn machine_id(mut self, id: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.inner).machine_id = Some(id.into());
        self
    }

    /// This service's machine id, when set.
    pub fn own_machine_id(&self) -> Option<&str> {
        self.inner.machine_id.as_deref()
    }

    /// Runs `rule` (looked up with [`Policy::rule_for`]) against `identity`.
    pub fn authorize(&self, rule: &Rule, identity: &Identity) -> Result<(), Denial> {
        rule.authorize(identity, self.own_machine_id())
    }

    /// Sets the rule of one method, `/pkg.Service/Method` (names of `[A-Za-z0-9_.]`).
    ///
    /// # Panics
    /// When `path` is not of that form (a programming error; [`Policy::from_toml`] reports it
    /// as an error instead).
    pub fn method(mut self, path: &str, rule: Rule) -> Self {
        assert!(
            is_method_path(path),
            "not a /pkg.Service/Method path: {path}"
        );
        let t = Arc::make_mut(&mut self.inner);
        t.folded_methods
            .insert(path.to_ascii_lowercase(), rule.clone());
        t.methods.insert(path.to_owned(), rule);
        self
    }

    /// Sets the rule of every method of one service, `pkg.Service` (`[A-Za-z0-9_.]`).
    ///
    /// # Panics
    /// When `service` is empty or holds another character.
    pub fn service(mut self, service: &str, rule: Rule) -> Self {
        assert!(
            is_service_name(service),
            "not a pkg.Service name: {service}"
        );
        let t = Arc::make_mut(&mut self.inner);
        t.folded_services
            .insert(service.to_ascii_lowercase(), rule.clone());
        t.services.insert(service.to_owned(), rule);
        self
    }

    /// The rule for a request path: the method's, else the service's, else the default.
    ///
    /// The path must be exactly `/pkg.Service/Method` — a leading `/`, two non-empty segments
    /// of `[A-Za-z0-9_.]` — or it is refused before any rule is looked up (`INVALID_ARGUMENT`,
    /// `PATH_NOT_CANONICAL`): grpc-go's CVE-2026-33186 was a `:path` without its leading slash
    /// falling to a looser rule. A path naming a method or service of the policy with another
    /// case (`/Examples.orders.v1.Orders/DeleteOrder`) is refused the same way when that would
    /// select another rule.
    pub fn rule_for(&self, path: &str) -> Result<&Rule, AuthError> {
        let path = crate::canonical::grpc_method_path(path)?;
        let t = &*self.inner;
        let exact = lookup(&t.methods, &t.services, path).unwrap_or(&t.default);
        let folded = lookup(
            &t.folded_methods,
            &t.folded_services,
            &path.to_ascii_lowercase(),
        )
        .unwrap_or(&t.default);
        if folded != exact {
            return Err(AuthError::NotCanonical {
                reason: crate::error::Reason::PathNotCanonical,
                message: "the :path names a method or service of the policy with another case",
            });
        }
        Ok(exact)
    }

    /// Parses a TOML policy (see the module docs). `source_name` names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        let err = |message: String| PolicyError {
            source_name: source_name.to_owned(),
            message,
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut policy = Self::with_default(file.default.unwrap_or_else(Rule::authenticated));
        if let Some(id) = file.machine_id {
            if !id.starts_with("mch_") {
                return Err(err(format!(
                    "machine_id {id:?}: a machine id starts with mch_"
                )));
            }
            policy = policy.machine_id(id);
        }
        policy
            .inner
            .default
            .validate()
            .map_err(|e| err(format!("[default]: {e}")))?;
        for (name, rule) in file.services {
            if !is_service_name(&name) {
                return Err(err(format!("[services.{name:?}]: not a pkg.Service name")));
            }
            rule.validate()
                .map_err(|e| err(format!("[services.{name:?}]: {e}")))?;
            policy = policy.service(&name, rule);
        }
        for (path, rule) in file.methods {
            if !is_method_path(&path) {
                return Err(err(format!(
                    "[methods.{path:?}]: not a /pkg.Service/Method path"
                )));
            }
            rule.validate()
                .map_err(|e| err(format!("[methods.{path:?}]: {e}")))?;
            policy = policy.method(&path, rule);
        }
        Ok(policy)
    }

    /// Checks every service and method the policy names against what the server serves —
    /// the encoded `FileDescriptorSet`s tonic-build writes (`FILE_DESCRIPTOR_SET`) — so that a
    /// rule for `/…Orders/DeleteOrders` when the method is `DeleteOrder` is an error naming the
    /// rule, not a rule that never applies while the real method falls to the default. The
    /// services public by default (health, reflection) need not be served.
    ///
    /// ```
    /// # use clerk_grpc_auth::authz::policy::{Policy, Rule};
    /// let policy = Policy::authenticated()
    ///     .method("/clerk.auth.v1.AuthService/VerifyTokn", Rule::public());
    /// let err = policy.check_against(&[clerk_grpc_auth::pb::FILE_DESCRIPTOR_SET]).unwrap_err();
    /// assert!(err.to_string().contains("VerifyTokn"));
    /// ```
    pub fn check_against(&self, descriptor_sets: &[&[u8]]) -> Result<(), PolicyError> {
        use prost::Message;
        let err = |m: String| PolicyError::new("policy", m);
        let mut served: HashMap<String, Vec<String>> = HashMap::new();
        for set in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*set)
                .map_err(|e| err(format!("a descriptor set does not decode: {e}")))?;
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for svc in file.service {
                    let name = match (package.as_str(), svc.name) {
                        (_, None) => continue,
                        ("", Some(n)) => n,
                        (p, Some(n)) => format!("{p}.{n}"),
                    };
                    served
                        .entry(name)
                        .or_default()
                        .extend(svc.method.into_iter().filter_map(|m| m.name));
                }
            }
        }
        let hint = |name: &str, candidates: &mut dyn Iterator<Item = &str>| {
            let lower = name.to_ascii_lowercase();
            let close: Vec<&str> = candidates
                .filter(|c| {
                    let c = c.to_ascii_lowercase();
                    c == lower || c.starts_with(&lower) || lower.starts_with(&c)
                })
                .collect();
            if close.is_empty() {
                String::new()
            } else {
                format!(" (did you mean {}?)", close.join(" or "))
            }
        };
        let t = &*self.inner;
        let mut services: Vec<&String> = t.services.keys().collect();
        services.sort();
        for name in services {
            if PUBLIC_BY_DEFAULT.contains(&name.as_str()) || served.contains_key(name) {
                continue;
            }
            return Err(err(format!(
                "[services.{name:?}]: the server serves no such service{}",
                hint(name, &mut served.keys().map(String::as_str))
            )));
        }
        let mut methods: Vec<&String> = t.methods.keys().collect();
        methods.sort();
        for path in methods {
            let (svc, method) = path[1..].split_once('/').expect("a checked method path");
            if PUBLIC_BY_DEFAULT.contains(&svc) {
                continue;
            }
            let Some(known) = served.get(svc) else {
                return Err(err(format!(
                    "[methods.{path:?}]: the server serves no service {svc:?}{}",
                    hint(svc, &mut served.keys().map(String::as_str))
                )));
            };
            if !known.iter().any(|m| m == method) {
                return Err(err(format!(
                    "[methods.{path:?}]: {svc} has no method {method:?}{}",
                    hint(method, &mut known.iter().map(String::as_str))
                )));
            }
        }
        Ok(())
    }

    /// Reads and parses a TOML policy file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            source_name: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::authenticated()
    }
}

/// The method's rule, else its service's (`path` is a checked `/pkg.Service/Method`).
fn lookup<'a>(
    methods: &'a HashMap<String, Rule>,
    services: &'a HashMap<String, Rule>,
    path: &str,
) -> Option<&'a Rule> {
    methods.get(path).or_else(|| {
        path.strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .and_then(|(s, _)| services.get(s))
    })
}

fn is_service_name(s: &str) -> bool {
    crate::canonical::is_grpc_name(s)
}

fn is_method_path(p: &str) -> bool {
    crate::canonical::is_grpc_method_path(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_typo_cannot_open_a_method() {
        let served = [crate::pb::FILE_DESCRIPTOR_SET];
        let check = |p: Policy| p.check_against(&served).map_err(|e| e.to_string());
        let ok = Policy::authenticated()
            .method(
                "/clerk.auth.v1.AuthService/RevokeSession",
                Rule::authenticated(),
            )
            .service("clerk.auth.v1.AuthService", Rule::authenticated());
        assert_eq!(check(ok), Ok(()));
        for (p, named) in [
            (
                Policy::authenticated()
                    .method("/clerk.auth.v1.AuthService/RevokeSessions", Rule::public()),
                "RevokeSessions",
            ),
            (
                Policy::authenticated()
                    .method("/clerk.auth.v1.AuthServic/RevokeSession", Rule::public()),
                "AuthServic",
            ),
            (
                Policy::authenticated().service("clerk.auth.v1.Auth", Rule::public()),
                "clerk.auth.v1.Auth",
            ),
        ] {
            let e = check(p).unwrap_err();
            assert!(e.contains(named), "{e}");
            assert!(e.contains("did you mean"), "{e}");
        }
        // Health and reflection need not be served to be named.
        let p = Policy::authenticated().service("grpc.health.v1.Health", Rule::authenticated());
        assert_eq!(check(p), Ok(()));
        // Invisible and non-name characters never load.
        for bad in [
            "/pkg.S/Delete\u{200b}Order",
            "/pkg.S/Delete-Order",
            "/pkg.S/Delete Order",
        ] {
            let toml = format!("[methods.{bad:?}]\naccess = \"public\"\n");
            assert!(Policy::from_toml(&toml, "t").is_err(), "{bad:?}");
        }
        // Garbage is not a descriptor set.
        assert!(Policy::authenticated()
            .check_against(&[b"\xff\xff"])
            .is_err());
    }

    #[test]
    fn custom_reverification_refuses_unknown_keys() {
        let load = |r: &str| {
            Policy::from_toml(
                &format!("[methods.\"/pkg.S/M\"]\nrequire = [{{ reverification = {r} }}]\n"),
                "t",
            )
        };
        assert!(load("{ level = \"first_factor\", after_minutes = 5 }").is_ok());
        assert!(load("{ level = \"first_factor\", afterMinutes = 5 }").is_ok());
        assert!(load("\"strict\"").is_ok());
        for bad in [
            "{ level = \"first_factor\", after_minutes = 5, typo_extra = true }",
            "{ level = \"first_factor\", after_minute = 5 }",
            "\"strictest\"",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }

    const ORDERS: &str = r#"
        [default]
        access = "authenticated"

        [services."examples.orders.v1.Orders"]
        token_types = ["session_token"]

        [methods."/examples.orders.v1.Orders/Ping"]
        access = "public"

        [methods."/examples.orders.v1.Orders/DeleteOrder"]
        require = [{ permission = "org:orders:delete" }, { reverification = "strict" }]
        accept_pending = true
    "#;

    #[test]
    fn most_specific_rule_wins_whole() {
        let p = Policy::from_toml(ORDERS, "test").unwrap();
        let rule = |path| p.rule_for(path).unwrap();
        assert!(rule("/examples.orders.v1.Orders/Ping").is_public());
        let del = rule("/examples.orders.v1.Orders/DeleteOrder");
        assert_eq!(del.require.len(), 2);
        assert!(del.accept_pending);
        assert_eq!(del.token_types, [TokenType::SessionToken]);
        let list = rule("/examples.orders.v1.Orders/ListOrders");
        assert!(!list.is_public() && list.require.is_empty());
        assert!(!rule("/other.Svc/M").is_public());
        assert!(rule("/grpc.health.v1.Health/Check").is_public());
        assert!(rule("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").is_public());
    }

    /// A path that is not exactly `/pkg.Service/Method`, or that names a policy entry with
    /// another case, is refused before a rule is chosen (on a public default it would
    /// otherwise fall to the public rule).
    #[test]
    fn malformed_and_case_changed_paths_are_refused() {
        let p = Policy::public().method(
            "/examples.orders.v1.Orders/DeleteOrder",
            Rule::authenticated().require(Check::permission("org:orders:delete")),
        );
        assert!(!p
            .rule_for("/examples.orders.v1.Orders/DeleteOrder")
            .unwrap()
            .is_public());
        assert!(p
            .rule_for("/examples.orders.v1.Orders/Ping")
            .unwrap()
            .is_public());
        for path in [
            "examples.orders.v1.Orders/DeleteOrder",
            "//examples.orders.v1.Orders/DeleteOrder",
            "/examples.orders.v1.Orders/DeleteOrder/",
            "/examples.orders.v1.Orders//DeleteOrder",
            "/examples.orders.v1.Orders/DeleteOrder/x",
            "/Examples.orders.v1.Orders/DeleteOrder",
            "/examples.orders.v1.orders/deleteorder",
            "/EXAMPLES.ORDERS.V1.ORDERS/DELETEORDER",
            "/examples.orders.v1.Orders/Delete%4Frder",
            "garbage",
            "",
            "/",
        ] {
            let e = p.rule_for(path).expect_err(path);
            assert_eq!(e.reason_str(), "PATH_NOT_CANONICAL", "{path}");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
        // A service rule read through another case.
        let p = Policy::public().service("a.B", Rule::authenticated());
        assert!(p.rule_for("/a.b/C").is_err());
        assert!(!p.rule_for("/a.B/C").unwrap().is_public());
        // Case changes that select the same rule pass.
        assert!(p.rule_for("/x.Y/Z").unwrap().is_public());
    }

    #[test]
    fn naming_health_overrides_the_public_default() {
        let p = Policy::from_toml(
            "[services.\"grpc.health.v1.Health\"]\naccess = \"authenticated\"\n",
            "t",
        )
        .unwrap();
        assert!(!p
            .rule_for("/grpc.health.v1.Health/Check")
            .unwrap()
            .is_public());
    }

    #[test]
    fn typos_and_bad_values_are_refused_with_the_entry_named() {
        let cases = [
            ("[default]\naccess = \"publik\"\n", "publik"),
            ("[default]\nrequire = [{ permision = \"x\" }]\n", "permision"),
            ("[methods.\"Orders/Ping\"]\naccess = \"public\"\n", "Orders/Ping"),
            ("[services.\"a/b\"]\n", "a/b"),
            ("[services.\"a-b\"]\n", "a-b"),
            ("[methods.\"/a.B/C/\"]\n", "/a.B/C/"),
            (
                "[methods.\"/a.B/C\"]\nrequire = [{ feature = \"team:x\" }]\n",
                "team",
            ),
            ("[methods.\"/a.B/C\"]\nrequire = [{}]\n", "nothing"),
            ("[methods.\"/a.B/C\"]\ntoken_types = [\"jwt\"]\n", "jwt"),
            ("[methods.\"/a.B/C\"]\ntoken_types = []\n", "empty"),
            (
                "[methods.\"/a.B/C\"]\naccess = \"public\"\nrequire = [{ role = \"admin\" }]\n",
                "public",
            ),
            (
                "[methods.\"/a.B/C\"]\nrequire = [{ reverification = { level = \"first_factor\", after_minutes = 0 } }]\n",
                "after_minutes",
            ),
            ("[extra]\n", "extra"),
        ];
        for (text, needle) in cases {
            let e = Policy::from_toml(text, "p.toml")
                .expect_err(text)
                .to_string();
            assert!(e.starts_with("policy p.toml: "), "{e}");
            assert!(e.contains(needle), "{text:?} → {e}");
        }
    }

    #[test]
    fn any_expands_to_every_type() {
        let p =
            Policy::from_toml("[default]\ntoken_types = [\"any\", \"api_key\"]\n", "t").unwrap();
        assert_eq!(p.rule_for("/a.B/C").unwrap().token_types.len(), 4);
    }
}
