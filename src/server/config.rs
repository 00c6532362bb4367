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

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use crate::verify::settings::DEFAULT_API_URL;
use crate::{
    clerk::{
        api::{is_clerk_id, BackendApiConfig},
        budget::BudgetConfig,
        directory::DirectoryConfig,
        svix::SvixVerifier,
    },
    secret::Secret,
    server::{
        access::AccessConfig, events::RedisConfig, ext_authz::RoutePolicy,
        service::watch::WatchConfig, telemetry::LogFormat, IdentityConfig, ServerConfig, TlsConfig,
        WebhookConfig,
    },
    verify::{
        env::{err, Env},
        settings::{self, VerifierSettings},
    },
    TokenVerifierConfig,
};

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
    "CLERK_AUTH_BAPI_CALLS_PER_SEC",
    "CLERK_AUTH_BAPI_BURST",
    "CLERK_AUTH_BAPI_RESERVED_PERCENT",
    "CLERK_AUTH_REVOCATION_TTL_SECS",
    "CLERK_AUTH_REVOCATION_CAPACITY",
    "CLERK_AUTH_IDENTITY_ALLOWLIST",
    "CLERK_AUTH_MACHINE_ID",
    "CLERK_AUTH_IDENTITY_CALLER_TYPES",
    "CLERK_AUTH_IDENTITY_OAUTH_SCOPES",
    "CLERK_AUTH_REVOKE_REQUIRES_MTLS",
    "CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE",
    "CLERK_AUTH_SELF_REVOKE",
    "CLERK_AUTH_ORG_READ",
    "CLERK_AUTH_CLIENT_IP_FORWARDERS",
    "CLERK_AUTH_IDENTITY_CALLER_CALLS_PER_SEC",
    "CLERK_AUTH_IDENTITY_CALLER_BURST",
    "CLERK_AUTH_USER_CACHE_TTL_SECS",
    "CLERK_AUTH_SESSION_CACHE_TTL_SECS",
    "CLERK_AUTH_STALE_IF_ERROR_SECS",
    "CLERK_AUTH_NOT_FOUND_CACHE_TTL_SECS",
    "CLERK_WEBHOOK_SIGNING_SECRET",
    "CLERK_AUTH_WEBHOOK_TOLERANCE_SECS",
    "CLERK_AUTH_REDIS_URL",
    "CLERK_AUTH_REDIS_PREFIX",
    "CLERK_AUTH_TLS_CERT",
    "CLERK_AUTH_TLS_KEY",
    "CLERK_AUTH_TLS_CLIENT_CA",
    "CLERK_AUTH_ROUTE_POLICY",
    "CLERK_AUTH_FORWARD_AUTH",
    "CLERK_AUTH_SHUTDOWN_GRACE_SECS",
    "CLERK_AUTH_REFLECTION",
    "CLERK_AUTH_WATCH_MAX_STREAMS",
    "CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION",
    "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS",
];

/// A setting is missing or malformed: the same type as the verifier's
/// [`SettingError`](crate::verify::SettingError) (its variables are read by
/// [`VerifierSettings::from_lookup`]'s parser). `Display` is one line: `VARIABLE: what is
/// wrong`, never the value (it may be a secret).
pub type ConfigError = crate::verify::SettingError;

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
        Self::read(&Env::lookup(lookup))
    }

    /// [`ServeConfig::from_lookup`] over the process environment. A variable whose value is
    /// not UTF-8 is an error too.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(&Env::process())
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
        // The verifier's variables (key source, keys, claims, key store, Backend API budget,
        // revocations) are read by the verifier's own parser, and only there.
        let verifier = VerifierSettings::read(env)?;
        let mut server = ServerConfig::with_verifier(verifier);
        server.access = access(env)?;
        server.forwarders = caller_ids(env, "CLERK_AUTH_CLIENT_IP_FORWARDERS")?;
        server.budget = caller_budget(env, server.budget)?;
        // Validated even without a secret key (no identity queries).
        let directory = directory(env, DirectoryConfig::default())?;
        // Identity queries use the machine tokens' Backend API and instance secret key
        // (`CLERK_API_URL`, `CLERK_SECRET_KEY`); a machine secret key alone gives none.
        server.identity = server.machine.as_ref().and_then(|m| {
            m.secret_key.clone().map(|key| IdentityConfig {
                backend: BackendApiConfig::new(m.api_url.clone(), key),
                directory,
            })
        });
        server.webhook = webhook(env, http_listen.is_some())?;
        server.forward_auth = forward_auth(env, http_listen.is_some())?;
        server.redis = redis(env)?;
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
    settings::verifier_config(&Env::lookup(lookup))
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
    let revoke_requires_mtls = env.flag("CLERK_AUTH_REVOKE_REQUIRES_MTLS")?;
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
        revoke_requires_mtls,
        exclusive_scope: env.flag("CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE")?,
        self_revoke: match env.text("CLERK_AUTH_SELF_REVOKE")? {
            // Who locked revocation down to mTLS before users could revoke their own keeps
            // it locked unless they say otherwise.
            None if revoke_requires_mtls => crate::server::access::SelfRevoke::Never,
            None => Default::default(),
            Some(s) => crate::server::access::SelfRevoke::parse(&s)
                .map_err(|e| err("CLERK_AUTH_SELF_REVOKE", e))?,
        },
        org_read: match env.text("CLERK_AUTH_ORG_READ")? {
            None => Default::default(),
            Some(s) => crate::server::access::OrgRead::parse(&s)
                .map_err(|e| err("CLERK_AUTH_ORG_READ", e))?,
        },
    };
    // The whole rule set must hold together (e.g. OAuth scopes for a trusted-only RPC).
    crate::server::access::Access::new(access.clone())
        .map_err(|e| err("CLERK_AUTH_IDENTITY_ALLOWLIST", e))?;
    Ok(access)
}

/// The per-caller limits of identity queries on top of the replica-wide budget (read with
/// the verifier's settings).
fn caller_budget(env: &Env<'_>, d: BudgetConfig) -> Result<BudgetConfig, ConfigError> {
    // The defaults are whole numbers; the variables take whole numbers.
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
    Ok(BudgetConfig {
        caller_calls_per_sec: caller_calls_per_sec as f64,
        caller_burst: u32::try_from(caller_burst).expect("bounded above").max(1),
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

fn forward_auth(
    env: &Env<'_>,
    http_port: bool,
) -> Result<Option<crate::server::forward_auth::ForwardAuthConfig>, ConfigError> {
    use crate::server::forward_auth::{ForwardAuthConfig, ForwardedHeaders};
    let Some(name) = env.text("CLERK_AUTH_FORWARD_AUTH")? else {
        return Ok(None);
    };
    let headers = ForwardedHeaders::parse(&name).ok_or_else(|| {
        err(
            "CLERK_AUTH_FORWARD_AUTH",
            format!("one of {}", ForwardedHeaders::NAMES.join(", ")),
        )
    })?;
    if !http_port {
        return Err(err(
            "CLERK_AUTH_HTTP_LISTEN",
            "forward auth needs the HTTP port: set an address such as 127.0.0.1:8081",
        ));
    }
    Ok(Some(ForwardAuthConfig { headers }))
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
