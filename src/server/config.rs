//! Configuration of `clerk-grpc-auth serve` from the environment: Clerk's own variable names
//! (`CLERK_SECRET_KEY`, `CLERK_JWT_KEY`, …) and this server's `CLERK_AUTH_*`, read into plain
//! structs.
//!
//! - [`ServeConfig::from_lookup`] reads every setting ([`VARIABLES`]) through a lookup function
//!   — a map in tests, the process environment in [`ServeConfig::from_env`], the command line
//!   in the binary — and validates it. It does no I/O.
//! - [`ServeConfig::load`] reads the files the settings name (TLS material, the route policy)
//!   and gives the [`ServerConfig`]: the only I/O of configuration. Redis is connected by the
//!   server when it starts.
//!
//! Unset and blank are the same: the default, which is the value of the struct the setting
//! fills ([`ServerConfig::new`], `KeyStoreConfig::default()`, `BudgetConfig::default()`, …; each
//! field's doc states it). Every problem is one [`ConfigError`] naming the variable; its message
//! never contains the value (a value may be a secret). The binary prints it as one line and
//! exits with status 64 (EX_USAGE).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    clerk::{
        api::{is_clerk_id, BackendApiConfig},
        budget::BudgetConfig,
        directory::DirectoryConfig,
        machines::MachineConfig,
        svix::SvixVerifier,
    },
    secret::Secret,
    server::{
        access::AccessConfig, events::RedisConfig, ext_authz::RoutePolicy,
        service::watch::WatchConfig, telemetry::LogFormat, IdentityConfig, ServerConfig, TlsConfig,
        WebhookConfig,
    },
    token::{
        check::Validation,
        keys::{KeySet, VerifyingKey},
    },
    verify::jwks::{KeySource, KeyStoreConfig},
    TokenVerifierConfig,
};

/// Clerk's Backend API (`CLERK_API_URL`'s default).
pub const DEFAULT_API_URL: &str = "https://api.clerk.com";
/// The default listen address (`CLERK_AUTH_LISTEN`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The default Redis key and channel prefix (`CLERK_AUTH_REDIS_PREFIX`).
pub const DEFAULT_REDIS_PREFIX: &str = "clerk-auth";

/// Every variable [`ServeConfig::from_lookup`] reads, in the order it reads them.
pub const VARIABLES: &[&str] = &[
    "CLERK_AUTH_LISTEN",
    "CLERK_AUTH_HTTP_LISTEN",
    "CLERK_AUTH_METRICS_LISTEN",
    "CLERK_AUTH_LOG_FORMAT",
    "CLERK_SECRET_KEY",
    "CLERK_MACHINE_SECRET_KEY",
    "CLERK_API_URL",
    "CLERK_JWKS_URL",
    "CLERK_JWT_KEY",
    "CLERK_CLOCK_SKEW_MS",
    "CLERK_AUTHORIZED_PARTIES",
    "CLERK_ISSUER",
    "CLERK_AUDIENCE",
    "CLERK_AUTH_VERDICT_CACHE_CAPACITY",
    "CLERK_AUTH_JWKS_REFRESH_SECS",
    "CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS",
    "CLERK_AUTH_MAX_STALE_SECS",
    "CLERK_AUTH_IDENTITY_ALLOWLIST",
    "CLERK_AUTH_MACHINE_ID",
    "CLERK_AUTH_IDENTITY_CALLER_TYPES",
    "CLERK_AUTH_IDENTITY_OAUTH_SCOPES",
    "CLERK_AUTH_REVOKE_REQUIRES_MTLS",
    "CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE",
    "CLERK_AUTH_CLIENT_IP_FORWARDERS",
    "CLERK_AUTH_BAPI_CALLS_PER_SEC",
    "CLERK_AUTH_BAPI_BURST",
    "CLERK_AUTH_IDENTITY_CALLER_CALLS_PER_SEC",
    "CLERK_AUTH_IDENTITY_CALLER_BURST",
    "CLERK_AUTH_BAPI_RESERVED_PERCENT",
    "CLERK_AUTH_USER_CACHE_TTL_SECS",
    "CLERK_AUTH_SESSION_CACHE_TTL_SECS",
    "CLERK_AUTH_STALE_IF_ERROR_SECS",
    "CLERK_AUTH_NOT_FOUND_CACHE_TTL_SECS",
    "CLERK_WEBHOOK_SIGNING_SECRET",
    "CLERK_AUTH_WEBHOOK_TOLERANCE_SECS",
    "CLERK_AUTH_REDIS_URL",
    "CLERK_AUTH_REDIS_PREFIX",
    "CLERK_AUTH_REVOCATION_TTL_SECS",
    "CLERK_AUTH_REVOCATION_CAPACITY",
    "CLERK_AUTH_TLS_CERT",
    "CLERK_AUTH_TLS_KEY",
    "CLERK_AUTH_TLS_CLIENT_CA",
    "CLERK_AUTH_ROUTE_POLICY",
    "CLERK_AUTH_SHUTDOWN_GRACE_SECS",
    "CLERK_AUTH_REFLECTION",
    "CLERK_AUTH_WATCH_MAX_STREAMS",
    "CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION",
    "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS",
];

/// A setting is missing or malformed. `Display` is one line: `VARIABLE: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The environment variable (the flag has the matching kebab-case name).
    pub var: &'static str,
    /// What is wrong. Never the value itself (it may be a secret).
    pub problem: String,
}

/// `clerk-grpc-auth serve`'s settings: the ports and files, and the server's configuration.
/// Built by [`ServeConfig::from_lookup`] without I/O; [`ServeConfig::load`] reads the files.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The gRPC port (`CLERK_AUTH_LISTEN`; default [`DEFAULT_LISTEN`]).
    pub listen: SocketAddr,
    /// The HTTP port for Clerk webhooks (`CLERK_AUTH_HTTP_LISTEN`; default: off). Without a
    /// metrics port it also serves `/metrics`, `/livez` and `/readyz`.
    pub http_listen: Option<SocketAddr>,
    /// The metrics port (`CLERK_AUTH_METRICS_LISTEN`; default: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Log format (`CLERK_AUTH_LOG_FORMAT`; default `text`).
    pub log_format: LogFormat,
    /// TLS for the gRPC port (`CLERK_AUTH_TLS_CERT`, `CLERK_AUTH_TLS_KEY`,
    /// `CLERK_AUTH_TLS_CLIENT_CA`; default: plaintext). Read by [`ServeConfig::load`].
    pub tls: Option<TlsFiles>,
    /// A TOML route policy for Envoy's `Check` (`CLERK_AUTH_ROUTE_POLICY`; default: a valid
    /// session token for every request). Read by [`ServeConfig::load`].
    pub route_policy: Option<PathBuf>,
    /// Everything else. Its `tls` and `route_policy` are those of the files, once loaded.
    pub server: ServerConfig,
}

/// The PEM files of the gRPC port's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (`CLERK_AUTH_TLS_CERT`).
    pub cert: PathBuf,
    /// The private key (`CLERK_AUTH_TLS_KEY`).
    pub key: PathBuf,
    /// mTLS: client certificates must chain to this CA (`CLERK_AUTH_TLS_CLIENT_CA`).
    pub client_ca: Option<PathBuf>,
}

// === impl ServeConfig ===

impl ServeConfig {
    /// Reads every setting through `lookup` (a variable's name → its value, `None` when unset)
    /// and validates them together. No I/O: files are read by [`ServeConfig::load`].
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use clerk_grpc_auth::server::config::ServeConfig;
    /// let env = HashMap::from([("CLERK_JWKS_URL", "https://example.com/jwks.json")]);
    /// let config = ServeConfig::from_lookup(|name| env.get(name).map(|v| v.to_string())).unwrap();
    /// assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
    ///
    /// let env = HashMap::from([("CLERK_JWKS_URL", "https://example.com/jwks.json"),
    ///                          ("CLERK_AUTH_MAX_STALE_SECS", "an hour")]);
    /// let e = ServeConfig::from_lookup(|name| env.get(name).map(|v| v.to_string())).unwrap_err();
    /// assert_eq!(e.var, "CLERK_AUTH_MAX_STALE_SECS");
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(&Env::new(move |var| Ok(lookup(var))))
    }

    /// [`ServeConfig::from_lookup`] over the process environment. A variable whose value is
    /// not UTF-8 is an error too.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(&Env::new(|var| match std::env::var(var) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(err(var, "not valid UTF-8")),
        }))
    }

    /// Reads the files the settings name (TLS material, checked usable; the route policy) and
    /// returns the server configuration.
    pub fn load(self) -> Result<ServerConfig, ConfigError> {
        let mut server = self.server;
        if let Some(files) = &self.tls {
            server.tls = Some(files.read()?);
        }
        if let Some(path) = &self.route_policy {
            server.route_policy = RoutePolicy::from_toml_file(path)
                .map_err(|e| err("CLERK_AUTH_ROUTE_POLICY", e.to_string()))?;
        }
        Ok(server)
    }

    fn read(env: &Env<'_>) -> Result<Self, ConfigError> {
        let (listen, http_listen, metrics_listen) = ports(env)?;
        let log_format = match env.text("CLERK_AUTH_LOG_FORMAT")? {
            None => LogFormat::default(),
            Some(s) => s
                .parse()
                .map_err(|e| err("CLERK_AUTH_LOG_FORMAT", format!("{e}")))?,
        };
        let keys = clerk_keys(env)?;
        let key_source = key_source(env, &keys)?;
        let mut server = ServerConfig::new(key_source);
        server.verifier = verifier_from(env)?;
        server.key_store = key_store(env, server.key_store)?;
        server.access = access(env)?;
        server.forwarders = caller_ids(env, "CLERK_AUTH_CLIENT_IP_FORWARDERS")?;
        server.budget = budget(env)?;
        // Validated even without a secret key (no identity queries).
        let directory = directory(env, DirectoryConfig::default())?;
        server.identity = keys.secret.clone().map(|key| IdentityConfig {
            backend: BackendApiConfig::new(keys.base_url(), key),
            directory,
        });
        // Opaque machine tokens go to the Backend API with whichever secret keys are set.
        server.machine = (keys.secret.is_some() || keys.machine_secret.is_some()).then(|| {
            MachineConfig::new(
                keys.base_url(),
                keys.secret.clone(),
                keys.machine_secret.clone(),
            )
        });
        server.webhook = webhook(env, http_listen.is_some())?;
        server.redis = redis(env)?;
        let revocation_ttl = env.secs(
            "CLERK_AUTH_REVOCATION_TTL_SECS",
            server.revocation_ttl,
            30 * 86_400,
        )?;
        server.revocation_ttl = revocation_ttl.max(Duration::from_secs(60));
        server.revocation_capacity = env.num(
            "CLERK_AUTH_REVOCATION_CAPACITY",
            server.revocation_capacity,
            100_000_000,
        )?;
        if server.revocation_capacity == 0 {
            return Err(err(
                "CLERK_AUTH_REVOCATION_CAPACITY",
                "must be at least 1 (revocations would be lost)",
            ));
        }
        let tls = tls_files(env)?;
        let route_policy = env.text("CLERK_AUTH_ROUTE_POLICY")?.map(PathBuf::from);
        server.shutdown_grace = env.secs(
            "CLERK_AUTH_SHUTDOWN_GRACE_SECS",
            server.shutdown_grace,
            3_600,
        )?;
        server.reflection = env.switch("CLERK_AUTH_REFLECTION", server.reflection)?;
        server.watch = watch(env, server.watch)?;
        check_ports(listen, http_listen, metrics_listen)?;
        Ok(Self {
            listen,
            http_listen,
            metrics_listen,
            log_format,
            tls,
            route_policy,
            server,
        })
    }
}

/// The verifier's settings alone (`CLERK_CLOCK_SKEW_MS`, `CLERK_AUTHORIZED_PARTIES`,
/// `CLERK_ISSUER`, `CLERK_AUDIENCE`, `CLERK_AUTH_VERDICT_CACHE_CAPACITY`), read through
/// `lookup` as [`ServeConfig::from_lookup`] reads them; defaults:
/// `TokenVerifierConfig::default()`.
pub fn verifier_config(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<TokenVerifierConfig, ConfigError> {
    verifier_from(&Env::new(move |var| Ok(lookup(var))))
}

// === impl TlsFiles ===

impl TlsFiles {
    /// Reads the PEM files and checks that tonic can use them, so a bad file is a startup
    /// error.
    pub fn read(&self) -> Result<TlsConfig, ConfigError> {
        let read = |var: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| err(var, format!("cannot read the file: {e}")))
        };
        let t = TlsConfig {
            cert_pem: read("CLERK_AUTH_TLS_CERT", &self.cert)?,
            key_pem: read("CLERK_AUTH_TLS_KEY", &self.key)?,
            client_ca_pem: self
                .client_ca
                .as_ref()
                .map(|p| read("CLERK_AUTH_TLS_CLIENT_CA", p))
                .transpose()?,
            client_auth_optional: false,
        };
        tonic::transport::Server::builder()
            .tls_config(t.to_tonic())
            .map_err(|e| err("CLERK_AUTH_TLS_CERT", format!("unusable TLS material: {e}")))?;
        Ok(t)
    }
}

// === The typed readers ===

fn err(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

type Source<'a> = dyn Fn(&'static str) -> Result<Option<String>, ConfigError> + 'a;

/// Settings by name, one small typed reader per kind of value. Unset and blank are the same.
struct Env<'a>(Box<Source<'a>>);

impl<'a> Env<'a> {
    fn new(f: impl Fn(&'static str) -> Result<Option<String>, ConfigError> + 'a) -> Self {
        Self(Box::new(f))
    }

    /// The trimmed value, `None` when unset or blank.
    fn text(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        Ok((self.0)(var)?
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()))
    }

    /// A comma-separated list; blank entries are skipped.
    fn list(&self, var: &'static str) -> Result<Vec<String>, ConfigError> {
        Ok(self
            .text(var)?
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `true` or `false`, exactly (unset: `false`).
    fn flag(&self, var: &'static str) -> Result<bool, ConfigError> {
        match self.text(var)?.as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => Err(err(var, "neither true nor false")),
        }
    }

    /// `true`/`1` or `false`/`0`, in any case (unset: `default`).
    fn switch(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.text(var)?.map(|s| s.to_ascii_lowercase()).as_deref() {
            None => Ok(default),
            Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(_) => Err(err(var, "neither true nor false")),
        }
    }

    /// A whole number from 0 to `max` (unset: `default`).
    fn num(&self, var: &'static str, default: u64, max: u64) -> Result<u64, ConfigError> {
        let Some(s) = self.text(var)? else {
            return Ok(default);
        };
        let n: u64 = s
            .parse()
            .map_err(|_| err(var, "not a non-negative whole number"))?;
        if n > max {
            return Err(err(var, format!("larger than the maximum {max}")));
        }
        Ok(n)
    }

    /// A whole number from 1 to `max` (unset: `default`).
    fn positive(&self, var: &'static str, default: u64, max: u64) -> Result<u64, ConfigError> {
        match self.num(var, default, max)? {
            0 => Err(err(var, "must be at least 1")),
            n => Ok(n),
        }
    }

    /// Whole seconds from 0 to `max_secs` (unset: `default`).
    fn secs(
        &self,
        var: &'static str,
        default: Duration,
        max_secs: u64,
    ) -> Result<Duration, ConfigError> {
        self.num(var, default.as_secs(), max_secs)
            .map(Duration::from_secs)
    }

    /// A socket address such as `example` (unset: `None`).
    fn addr(&self, var: &'static str, example: &str) -> Result<Option<SocketAddr>, ConfigError> {
        self.text(var)?
            .map(|a| {
                a.parse()
                    .map_err(|_| err(var, format!("not an address like {example}")))
            })
            .transpose()
    }

    /// An http(s) URL with a host (unset: `None`).
    fn url(&self, var: &'static str) -> Result<Option<url::Url>, ConfigError> {
        self.text(var)?.map(|s| parse_url(var, &s)).transpose()
    }
}

fn parse_url(var: &'static str, s: &str) -> Result<url::Url, ConfigError> {
    let u = url::Url::parse(s).map_err(|e| err(var, format!("not a valid URL ({e})")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(err(var, "must be an http(s) URL with a host"));
    }
    Ok(u)
}

// === The sections ===

/// The gRPC, HTTP and metrics addresses.
fn ports(
    env: &Env<'_>,
) -> Result<(SocketAddr, Option<SocketAddr>, Option<SocketAddr>), ConfigError> {
    let listen = env
        .addr("CLERK_AUTH_LISTEN", DEFAULT_LISTEN)?
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default address"));
    let http = env.addr("CLERK_AUTH_HTTP_LISTEN", "127.0.0.1:8081")?;
    let metrics = env.addr("CLERK_AUTH_METRICS_LISTEN", "127.0.0.1:9090")?;
    Ok((listen, http, metrics))
}

/// A fixed metrics address must differ from the others (port 0, any free port, may repeat).
fn check_ports(
    listen: SocketAddr,
    http: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) -> Result<(), ConfigError> {
    let Some(m) = metrics.filter(|m| m.port() != 0) else {
        return Ok(());
    };
    if m == listen {
        return Err(err(
            "CLERK_AUTH_METRICS_LISTEN",
            "must differ from CLERK_AUTH_LISTEN",
        ));
    }
    if http == Some(m) {
        return Err(err(
            "CLERK_AUTH_METRICS_LISTEN",
            "must differ from CLERK_AUTH_HTTP_LISTEN: the point is to keep metrics off the \
             webhook port",
        ));
    }
    Ok(())
}

/// Clerk's keys and where its Backend API is.
struct ClerkKeys {
    secret: Option<Secret>,
    machine_secret: Option<Secret>,
    api_url: Option<url::Url>,
}

impl ClerkKeys {
    /// `CLERK_API_URL`, else [`DEFAULT_API_URL`].
    fn base_url(&self) -> url::Url {
        self.api_url
            .clone()
            .unwrap_or_else(|| DEFAULT_API_URL.parse().expect("default URL"))
    }
}

/// A secret key: starts with one of `prefixes`, no whitespace or control characters.
fn secret_key(
    env: &Env<'_>,
    var: &'static str,
    check: impl Fn(&str) -> Result<(), &'static str>,
) -> Result<Option<Secret>, ConfigError> {
    let Some(s) = env.text(var)? else {
        return Ok(None);
    };
    check(&s).map_err(|problem| err(var, problem))?;
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(var, "contains whitespace or control characters"));
    }
    Ok(Some(Secret::new(s)))
}

fn clerk_keys(env: &Env<'_>) -> Result<ClerkKeys, ConfigError> {
    let secret = secret_key(env, "CLERK_SECRET_KEY", |s| {
        if s.starts_with("pk_") {
            Err("this is a publishable key (pk_…); give the secret key (sk_…) from the Clerk Dashboard")
        } else if !s.starts_with("sk_") {
            Err("a Clerk secret key starts with sk_test_ or sk_live_")
        } else {
            Ok(())
        }
    })?;
    let machine_secret = secret_key(env, "CLERK_MACHINE_SECRET_KEY", |s| {
        if s.starts_with("ak_") {
            Ok(())
        } else {
            Err("a Clerk machine secret key starts with ak_")
        }
    })?;
    let api_url = env.url("CLERK_API_URL")?;
    Ok(ClerkKeys {
        secret,
        machine_secret,
        api_url,
    })
}

/// Precedence: the networkless key, then an explicit JWKS URL, then the Backend API.
fn key_source(env: &Env<'_>, keys: &ClerkKeys) -> Result<KeySource, ConfigError> {
    let jwks_url = env.url("CLERK_JWKS_URL")?;
    if let Some(pem) = env.text("CLERK_JWT_KEY")? {
        let key = VerifyingKey::from_pem(&pem).map_err(|e| err("CLERK_JWT_KEY", e.to_string()))?;
        return Ok(KeySource::Static(Arc::new(KeySet::single(key))));
    }
    if let Some(url) = jwks_url {
        return Ok(KeySource::Remote { url, bearer: None });
    }
    let Some(secret) = keys.secret.clone() else {
        return Err(err(
            "CLERK_SECRET_KEY",
            "no key source configured: set CLERK_SECRET_KEY (keys from the Backend API), \
             CLERK_JWT_KEY (networkless PEM) or CLERK_JWKS_URL",
        ));
    };
    // Keep any path prefix (e.g. a proxy mounted under /clerk).
    let url = format!("{}/v1/jwks", keys.base_url().as_str().trim_end_matches('/'));
    Ok(KeySource::Remote {
        url: parse_url("CLERK_API_URL", &url)?,
        bearer: Some(secret),
    })
}

fn verifier_from(env: &Env<'_>) -> Result<TokenVerifierConfig, ConfigError> {
    let d = TokenVerifierConfig::default();
    Ok(TokenVerifierConfig {
        validation: Validation {
            clock_skew_ms: env.num("CLERK_CLOCK_SKEW_MS", d.validation.clock_skew_ms, 3_600_000)?,
            authorized_parties: env.list("CLERK_AUTHORIZED_PARTIES")?,
            issuer: env.text("CLERK_ISSUER")?,
            audience: env.list("CLERK_AUDIENCE")?,
        },
        cache_capacity: env.num(
            "CLERK_AUTH_VERDICT_CACHE_CAPACITY",
            d.cache_capacity,
            100_000_000,
        )?,
    })
}

fn key_store(env: &Env<'_>, d: KeyStoreConfig) -> Result<KeyStoreConfig, ConfigError> {
    Ok(KeyStoreConfig {
        refresh_interval: Duration::from_secs(env.positive(
            "CLERK_AUTH_JWKS_REFRESH_SECS",
            d.refresh_interval.as_secs(),
            86_400,
        )?),
        unknown_kid_cooldown: env.secs(
            "CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS",
            d.unknown_kid_cooldown,
            86_400,
        )?,
        max_stale: env.secs("CLERK_AUTH_MAX_STALE_SECS", d.max_stale, 7 * 86_400)?,
        ..d
    })
}

/// Machine ids (`mch_…`) and SPIFFE IDs (`spiffe://…`).
fn caller_ids(env: &Env<'_>, var: &'static str) -> Result<Vec<String>, ConfigError> {
    let ids = env.list(var)?;
    if let Some(n) = ids
        .iter()
        .position(|m| !is_clerk_id(m, "mch_") && !crate::authz::peer::is_spiffe_id(m))
    {
        return Err(err(
            var,
            format!(
                "entry {} is neither a machine id (mch_…) nor a SPIFFE ID (spiffe://…)",
                n + 1
            ),
        ));
    }
    Ok(ids)
}

fn access(env: &Env<'_>) -> Result<AccessConfig, ConfigError> {
    let allowlist = caller_ids(env, "CLERK_AUTH_IDENTITY_ALLOWLIST")?;
    let machine_id = match env.text("CLERK_AUTH_MACHINE_ID")? {
        None => None,
        Some(m) if is_clerk_id(&m, "mch_") => Some(m),
        Some(_) => return Err(err("CLERK_AUTH_MACHINE_ID", "not a machine id (mch_…)")),
    };
    let access = AccessConfig {
        machine_id,
        allowlist,
        caller_types: match env.text("CLERK_AUTH_IDENTITY_CALLER_TYPES")? {
            None => Vec::new(),
            Some(s) => crate::server::access::parse_caller_types(&s)
                .map_err(|e| err("CLERK_AUTH_IDENTITY_CALLER_TYPES", e))?,
        },
        oauth_scopes: match env.text("CLERK_AUTH_IDENTITY_OAUTH_SCOPES")? {
            None => Default::default(),
            Some(s) => crate::server::access::parse_oauth_scopes(&s)
                .map_err(|e| err("CLERK_AUTH_IDENTITY_OAUTH_SCOPES", e))?,
        },
        revoke_requires_mtls: env.flag("CLERK_AUTH_REVOKE_REQUIRES_MTLS")?,
        exclusive_scope: env.flag("CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE")?,
    };
    // The whole rule set must hold together (e.g. OAuth scopes for a trusted-only RPC).
    crate::server::access::Access::new(access.clone())
        .map_err(|e| err("CLERK_AUTH_IDENTITY_ALLOWLIST", e))?;
    Ok(access)
}

fn budget(env: &Env<'_>) -> Result<BudgetConfig, ConfigError> {
    let d = BudgetConfig::default();
    // The defaults are whole numbers; the variables take whole numbers.
    let calls_per_sec = env.num(
        "CLERK_AUTH_BAPI_CALLS_PER_SEC",
        d.calls_per_sec as u64,
        1_000_000,
    )?;
    let burst = env.positive("CLERK_AUTH_BAPI_BURST", d.burst.into(), 1_000_000)?;
    let caller_calls_per_sec = env.num(
        "CLERK_AUTH_IDENTITY_CALLER_CALLS_PER_SEC",
        d.caller_calls_per_sec as u64,
        1_000_000,
    )?;
    let caller_burst = env.num(
        "CLERK_AUTH_IDENTITY_CALLER_BURST",
        d.caller_burst.into(),
        1_000_000,
    )?;
    let reserved_percent = env.num(
        "CLERK_AUTH_BAPI_RESERVED_PERCENT",
        (d.reserved_share * 100.0).round() as u64,
        100,
    )?;
    Ok(BudgetConfig {
        calls_per_sec: calls_per_sec as f64,
        burst: u32::try_from(burst).expect("bounded above"),
        caller_calls_per_sec: caller_calls_per_sec as f64,
        caller_burst: u32::try_from(caller_burst).expect("bounded above").max(1),
        reserved_share: reserved_percent as f64 / 100.0,
        ..d
    })
}

fn directory(env: &Env<'_>, d: DirectoryConfig) -> Result<DirectoryConfig, ConfigError> {
    let one = Duration::from_secs(1);
    let user_ttl = env.secs("CLERK_AUTH_USER_CACHE_TTL_SECS", d.user_ttl, 86_400)?;
    Ok(DirectoryConfig {
        user_ttl: user_ttl.max(one),
        memberships_ttl: user_ttl.max(one),
        session_ttl: env
            .secs("CLERK_AUTH_SESSION_CACHE_TTL_SECS", d.session_ttl, 3_600)?
            .max(one),
        stale_if_error: env.secs("CLERK_AUTH_STALE_IF_ERROR_SECS", d.stale_if_error, 86_400)?,
        not_found_ttl: env.secs(
            "CLERK_AUTH_NOT_FOUND_CACHE_TTL_SECS",
            d.not_found_ttl,
            3_600,
        )?,
        ..d
    })
}

/// Default tolerance of webhook timestamps (`CLERK_AUTH_WEBHOOK_TOLERANCE_SECS`): 5 minutes.
const DEFAULT_WEBHOOK_TOLERANCE: Duration = Duration::from_secs(300);

fn webhook(env: &Env<'_>, http_port: bool) -> Result<Option<WebhookConfig>, ConfigError> {
    let secret = env.text("CLERK_WEBHOOK_SIGNING_SECRET")?;
    // Checked even without a secret: a bad value is never silently ignored.
    let tolerance = env.secs(
        "CLERK_AUTH_WEBHOOK_TOLERANCE_SECS",
        DEFAULT_WEBHOOK_TOLERANCE,
        86_400,
    )?;
    let Some(secret) = secret else {
        return Ok(None);
    };
    let w = WebhookConfig {
        signing_secret: Secret::new(secret),
        tolerance,
    };
    SvixVerifier::new(&w.signing_secret, w.tolerance).map_err(|e| {
        err(
            "CLERK_WEBHOOK_SIGNING_SECRET",
            e.to_string()
                .trim_start_matches("CLERK_WEBHOOK_SIGNING_SECRET: ")
                .to_owned(),
        )
    })?;
    if !http_port {
        return Err(err(
            "CLERK_AUTH_HTTP_LISTEN",
            "webhooks need the HTTP port: set an address such as 127.0.0.1:8081",
        ));
    }
    Ok(Some(w))
}

fn redis(env: &Env<'_>) -> Result<Option<RedisConfig>, ConfigError> {
    let url = env.text("CLERK_AUTH_REDIS_URL")?;
    let prefix = env
        .text("CLERK_AUTH_REDIS_PREFIX")?
        .unwrap_or_else(|| DEFAULT_REDIS_PREFIX.to_owned());
    let Some(url) = url else {
        return Ok(None);
    };
    // Parsing only (what `redis::Client::open` checks); the server connects when it starts.
    redis::IntoConnectionInfo::into_connection_info(url.as_str())
        .map_err(|_| err("CLERK_AUTH_REDIS_URL", "not a redis:// or rediss:// URL"))?;
    Ok(Some(RedisConfig { url, prefix }))
}

fn tls_files(env: &Env<'_>) -> Result<Option<TlsFiles>, ConfigError> {
    let cert = env.text("CLERK_AUTH_TLS_CERT")?;
    let key = env.text("CLERK_AUTH_TLS_KEY")?;
    let client_ca = env.text("CLERK_AUTH_TLS_CLIENT_CA")?;
    match (cert, key) {
        (None, None) if client_ca.is_some() => Err(err(
            "CLERK_AUTH_TLS_CLIENT_CA",
            "mTLS needs CLERK_AUTH_TLS_CERT and CLERK_AUTH_TLS_KEY too",
        )),
        (None, None) => Ok(None),
        (Some(_), None) => Err(err(
            "CLERK_AUTH_TLS_KEY",
            "set together with CLERK_AUTH_TLS_CERT",
        )),
        (None, Some(_)) => Err(err(
            "CLERK_AUTH_TLS_CERT",
            "set together with CLERK_AUTH_TLS_KEY",
        )),
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.into(),
            key: key.into(),
            client_ca: client_ca.map(PathBuf::from),
        })),
    }
}

fn watch(env: &Env<'_>, d: WatchConfig) -> Result<WatchConfig, ConfigError> {
    let max_streams = env.num(
        "CLERK_AUTH_WATCH_MAX_STREAMS",
        d.max_streams as u64,
        1_000_000,
    )?;
    let per_connection = env.num(
        "CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION",
        d.max_streams_per_connection as u64,
        1_000_000,
    )?;
    let write_timeout = env.positive(
        "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS",
        d.write_timeout.as_secs(),
        3_600,
    )?;
    Ok(WatchConfig {
        max_streams: usize::try_from(max_streams).expect("bounded above"),
        max_streams_per_connection: usize::try_from(per_connection).expect("bounded above"),
        write_timeout: Duration::from_secs(write_timeout),
    })
}

#[cfg(test)]
mod tests;
