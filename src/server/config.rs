//! Configuration of `clerk-grpc-auth serve`: flags and environment variables with Clerk's own
//! names, validated at startup into a [`ServerConfig`].
//!
//! Every problem is reported as one [`ConfigError`] line naming the variable and what is
//! wrong; the binary exits with status 64 (EX_USAGE).

use std::{net::SocketAddr, sync::Arc, time::Duration};

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

/// Clerk's Backend API.
pub const DEFAULT_API_URL: &str = "https://api.clerk.com";
/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// `clerk-grpc-auth serve` settings. Every flag can also be set by the environment variable
/// named beside it.
#[derive(Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CLERK_AUTH_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Clerk secret key (`sk_…`): loads the JWKS from the Backend API.
    #[arg(long, env = "CLERK_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// Clerk machine secret key (`ak_…`): verifies opaque M2M tokens (else the secret key is
    /// used) and creates M2M tokens for outgoing calls.
    #[arg(long, env = "CLERK_MACHINE_SECRET_KEY", hide_env_values = true)]
    pub machine_secret_key: Option<String>,
    /// Clerk JWT public key (PEM, or the bare base64 body): networkless verification.
    #[arg(long, env = "CLERK_JWT_KEY", hide_env_values = true)]
    pub jwt_key: Option<String>,
    /// Backend API URL.
    #[arg(long, env = "CLERK_API_URL")]
    pub api_url: Option<String>,
    /// A JWKS URL to load keys from without a secret key (e.g. `https://<frontend-api>/.well-known/jwks.json`).
    #[arg(long, env = "CLERK_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Comma-separated authorized parties (`azp` allow-list, exact match).
    #[arg(long, env = "CLERK_AUTHORIZED_PARTIES")]
    pub authorized_parties: Option<String>,
    /// Pin the issuer: `iss` must equal this exactly (off by default, as in Clerk's SDK).
    #[arg(long, env = "CLERK_ISSUER")]
    pub issuer: Option<String>,
    /// Comma-separated accepted audiences (`aud`).
    #[arg(long, env = "CLERK_AUDIENCE")]
    pub audience: Option<String>,
    /// Clock skew in milliseconds (default 5000).
    #[arg(long, env = "CLERK_CLOCK_SKEW_MS")]
    pub clock_skew_ms: Option<String>,
    /// Background JWKS refresh interval in seconds (default 300).
    #[arg(long, env = "CLERK_AUTH_JWKS_REFRESH_SECS")]
    pub jwks_refresh_secs: Option<String>,
    /// Minimum seconds between unknown-kid refetches (default 10).
    #[arg(long, env = "CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS")]
    pub unknown_kid_cooldown_secs: Option<String>,
    /// How long the last good keys are used while refreshes fail, in seconds (default 3600).
    #[arg(long, env = "CLERK_AUTH_MAX_STALE_SECS")]
    pub max_stale_secs: Option<String>,
    /// Verdict cache capacity (default 100000; 0 disables it).
    #[arg(long, env = "CLERK_AUTH_VERDICT_CACHE_CAPACITY")]
    pub verdict_cache_capacity: Option<String>,
    /// Seconds in-flight calls may take to finish after SIGTERM/SIGINT (default 10).
    #[arg(long, env = "CLERK_AUTH_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<String>,
    /// HTTP port (Clerk webhooks), e.g. `127.0.0.1:8081`. Off when unset. Without a metrics
    /// port (`CLERK_AUTH_METRICS_LISTEN`) it also serves `/metrics`, `/livez` and `/readyz`.
    #[arg(long, env = "CLERK_AUTH_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Clerk webhook signing secret (`whsec_…`): enables `POST /webhooks/clerk` on the HTTP port.
    #[arg(long, env = "CLERK_WEBHOOK_SIGNING_SECRET", hide_env_values = true)]
    pub webhook_signing_secret: Option<String>,
    /// Largest distance in seconds between a webhook's timestamp and now (default 300).
    #[arg(long, env = "CLERK_AUTH_WEBHOOK_TOLERANCE_SECS")]
    pub webhook_tolerance_secs: Option<String>,
    /// Comma-separated trusted callers of identity queries and the revocation feed (read any
    /// user, revoke sessions): machine ids (`mch_…`, whose M2M tokens must also be scoped to
    /// `CLERK_AUTH_MACHINE_ID`) and SPIFFE IDs (`spiffe://…`, by mTLS). Default: none.
    #[arg(long, env = "CLERK_AUTH_IDENTITY_ALLOWLIST")]
    pub identity_allowlist: Option<String>,
    /// AuthService's own machine id (`mch_…`): an allowlisted machine's M2M token is trusted
    /// only when its scopes name it. Unset: no M2M caller is trusted.
    #[arg(long, env = "CLERK_AUTH_MACHINE_ID")]
    pub machine_id: Option<String>,
    /// Comma-separated user token types that may call identity queries for their own user,
    /// besides session tokens: `oauth_token`, `api_key` (default: none).
    #[arg(long, env = "CLERK_AUTH_IDENTITY_CALLER_TYPES")]
    pub identity_caller_types: Option<String>,
    /// OAuth scopes each identity RPC needs, `Rpc=scope scope;Rpc=scope` (e.g.
    /// `WhoAmI=profile email;GetUser=profile email`). An RPC not named refuses OAuth tokens.
    #[arg(long, env = "CLERK_AUTH_IDENTITY_OAUTH_SCOPES")]
    pub identity_oauth_scopes: Option<String>,
    /// `true`: `RevokeSession` needs an allowlisted mTLS certificate *and* a trusted M2M token
    /// (default `false`: either).
    #[arg(long, env = "CLERK_AUTH_REVOKE_REQUIRES_MTLS")]
    pub revoke_requires_mtls: Option<String>,
    /// `true`: an M2M caller counts only when `CLERK_AUTH_MACHINE_ID` is its token's *only*
    /// scope (a machine that may also call other services is not trusted). Default `false`.
    #[arg(long, env = "CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE")]
    pub machine_scope_exclusive: Option<String>,
    /// Backend API calls per second one identity-query caller (user, machine, mTLS peer) may
    /// cause (default 5; 0 = no per-caller limit).
    #[arg(long, env = "CLERK_AUTH_IDENTITY_CALLER_CALLS_PER_SEC")]
    pub identity_caller_calls_per_sec: Option<String>,
    /// Backend API calls one identity-query caller may cause at once (default 20).
    #[arg(long, env = "CLERK_AUTH_IDENTITY_CALLER_BURST")]
    pub identity_caller_burst: Option<String>,
    /// How long Clerk's "not found" for a user or session is remembered, in seconds (default
    /// 30; 0 = off).
    #[arg(long, env = "CLERK_AUTH_NOT_FOUND_CACHE_TTL_SECS")]
    pub not_found_cache_ttl_secs: Option<String>,
    /// Redis URL: share revocations and cache invalidations between replicas.
    #[arg(long, env = "CLERK_AUTH_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Redis key and channel prefix (default `clerk-auth`).
    #[arg(long, env = "CLERK_AUTH_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// User-profile and membership cache TTL in seconds (default 60).
    #[arg(long, env = "CLERK_AUTH_USER_CACHE_TTL_SECS")]
    pub user_cache_ttl_secs: Option<String>,
    /// Session-status cache TTL in seconds (default 10).
    #[arg(long, env = "CLERK_AUTH_SESSION_CACHE_TTL_SECS")]
    pub session_cache_ttl_secs: Option<String>,
    /// Serve cached users and memberships this many seconds past their TTL while Clerk fails
    /// (default 300; 0 = off).
    #[arg(long, env = "CLERK_AUTH_STALE_IF_ERROR_SECS")]
    pub stale_if_error_secs: Option<String>,
    /// TLS certificate chain (PEM file) for the gRPC port; with `CLERK_AUTH_TLS_KEY`.
    #[arg(long, env = "CLERK_AUTH_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// TLS private key (PEM file).
    #[arg(long, env = "CLERK_AUTH_TLS_KEY")]
    pub tls_key: Option<String>,
    /// mTLS: client certificates must chain to this CA (PEM file); their SPIFFE IDs can be
    /// allowlisted and required by policy.
    #[arg(long, env = "CLERK_AUTH_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<String>,
    /// A TOML file of routes for Envoy's `Check` (host, path prefix, methods → rule). Default:
    /// a valid session token for every request.
    #[arg(long, env = "CLERK_AUTH_ROUTE_POLICY")]
    pub route_policy: Option<String>,
    /// How long a revoked session is remembered, in seconds: the longest lifetime a token of
    /// a session can have (default 86400, 60 to 2592000).
    #[arg(long, env = "CLERK_AUTH_REVOCATION_TTL_SECS")]
    pub revocation_ttl_secs: Option<String>,
    /// The most revoked sessions remembered at once; past it the oldest is evicted (counted
    /// in `/metrics`, logged). Default 1000000.
    #[arg(long, env = "CLERK_AUTH_REVOCATION_CAPACITY")]
    pub revocation_capacity: Option<String>,
    /// Backend API calls per second this replica may make, identity queries and machine
    /// tokens together (default 20; 0 = no replica-wide limit).
    #[arg(long, env = "CLERK_AUTH_BAPI_CALLS_PER_SEC")]
    pub bapi_calls_per_sec: Option<String>,
    /// Backend API calls that may be made at once after a quiet period (default 40).
    #[arg(long, env = "CLERK_AUTH_BAPI_BURST")]
    pub bapi_burst: Option<String>,
    /// Percentage of the Backend API budget that callers never seen with a valid token cannot
    /// spend (default 50).
    #[arg(long, env = "CLERK_AUTH_BAPI_RESERVED_PERCENT")]
    pub bapi_reserved_percent: Option<String>,
    /// Comma-separated machine ids (`mch_…`) and SPIFFE IDs (`spiffe://…`) allowed to set
    /// `VerifyTokenRequest.client_ip` (the delegated layers; default: none).
    #[arg(long, env = "CLERK_AUTH_CLIENT_IP_FORWARDERS")]
    pub client_ip_forwarders: Option<String>,
    /// Metrics port (`/metrics`, `/livez`, `/readyz`), e.g. `127.0.0.1:9090`. When set, the
    /// HTTP port serves webhooks only.
    #[arg(long, env = "CLERK_AUTH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// gRPC server reflection: `true` (default) or `false` (reflection calls are
    /// UNIMPLEMENTED; turn it off in production).
    #[arg(long, env = "CLERK_AUTH_REFLECTION")]
    pub reflection: Option<String>,
    /// Most `WatchRevocations` streams open at once on this replica (default 1024).
    #[arg(long, env = "CLERK_AUTH_WATCH_MAX_STREAMS")]
    pub watch_max_streams: Option<String>,
    /// Most `WatchRevocations` streams open at once on one connection (default 8).
    #[arg(long, env = "CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION")]
    pub watch_max_streams_per_connection: Option<String>,
    /// Seconds a `WatchRevocations` subscriber may go without reading before it is dropped
    /// (default 30).
    #[arg(long, env = "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS")]
    pub watch_write_timeout_secs: Option<String>,
    /// Log format.
    #[arg(long, env = "CLERK_AUTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A setting is missing or malformed. `Display` is one line: `VARIABLE: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The environment variable (the flag has the matching kebab-case name).
    pub var: &'static str,
    /// What is wrong (never the secret itself).
    pub problem: String,
}

// === impl ServeArgs ===

impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("listen", &self.listen)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "…"))
            .field(
                "machine_secret_key",
                &self.machine_secret_key.as_ref().map(|_| "…"),
            )
            .field(
                "webhook_signing_secret",
                &self.webhook_signing_secret.as_ref().map(|_| "…"),
            )
            .field("redis_url", &self.redis_url.as_ref().map(|_| "…"))
            .field("jwt_key", &self.jwt_key.as_ref().map(|_| "…"))
            .field("api_url", &self.api_url)
            .field("jwks_url", &self.jwks_url)
            .field("authorized_parties", &self.authorized_parties)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

fn err(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn list(v: &Option<String>) -> Vec<String> {
    non_empty(v)
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `true` / `false` (unset: `false`).
fn parse_bool(var: &'static str, v: &Option<String>) -> Result<bool, ConfigError> {
    match non_empty(v) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(err(var, format!("{other:?} is not true or false"))),
    }
}

fn parse_num(
    var: &'static str,
    v: &Option<String>,
    default: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    match non_empty(v) {
        None => Ok(default),
        Some(s) => {
            let n: u64 = s
                .parse()
                .map_err(|_| err(var, format!("{s:?} is not a non-negative whole number")))?;
            if n > max {
                return Err(err(var, format!("{n} is larger than the maximum {max}")));
            }
            Ok(n)
        }
    }
}

fn parse_url(var: &'static str, s: &str) -> Result<url::Url, ConfigError> {
    let u = url::Url::parse(s).map_err(|e| err(var, format!("{s:?} is not a valid URL ({e})")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(err(
            var,
            format!("{s:?} must be an http(s) URL with a host"),
        ));
    }
    Ok(u)
}

#[derive(clap::Parser)]
struct EnvOnly {
    #[command(flatten)]
    args: ServeArgs,
}

impl ServeArgs {
    /// The HTTP port's address (`CLERK_AUTH_HTTP_LISTEN`), when set.
    pub fn http_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        non_empty(&self.http_listen)
            .map(|a| {
                a.parse().map_err(|_| {
                    err(
                        "CLERK_AUTH_HTTP_LISTEN",
                        format!("{a:?} is not an address like 127.0.0.1:8081"),
                    )
                })
            })
            .transpose()
    }

    /// The metrics port's address (`CLERK_AUTH_METRICS_LISTEN`), when set.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        non_empty(&self.metrics_listen)
            .map(|a| {
                a.parse().map_err(|_| {
                    err(
                        "CLERK_AUTH_METRICS_LISTEN",
                        format!("{a:?} is not an address like 127.0.0.1:9090"),
                    )
                })
            })
            .transpose()
    }

    /// The ports (metrics, reflection) and `WatchRevocations` limits.
    fn serving(&self, listen: SocketAddr) -> Result<(WatchConfig, bool), ConfigError> {
        let http = self.http_addr()?;
        if let Some(m) = self.metrics_addr()? {
            // Port 0 (any free port) may appear twice; a fixed address may not.
            if m.port() != 0 && m == listen {
                return Err(err(
                    "CLERK_AUTH_METRICS_LISTEN",
                    "must differ from CLERK_AUTH_LISTEN",
                ));
            }
            if m.port() != 0 && http == Some(m) {
                return Err(err(
                    "CLERK_AUTH_METRICS_LISTEN",
                    "must differ from CLERK_AUTH_HTTP_LISTEN: the point is to keep metrics off \
                     the webhook port",
                ));
            }
        }
        let reflection = match non_empty(&self.reflection).map(str::to_ascii_lowercase) {
            None => true,
            Some(v) if v == "true" || v == "1" => true,
            Some(v) if v == "false" || v == "0" => false,
            Some(v) => {
                return Err(err(
                    "CLERK_AUTH_REFLECTION",
                    format!("{v:?} is neither true nor false"),
                ))
            }
        };
        let max_streams = parse_num(
            "CLERK_AUTH_WATCH_MAX_STREAMS",
            &self.watch_max_streams,
            1024,
            1_000_000,
        )?;
        let per_connection = parse_num(
            "CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION",
            &self.watch_max_streams_per_connection,
            8,
            1_000_000,
        )?;
        let write_timeout = parse_num(
            "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS",
            &self.watch_write_timeout_secs,
            30,
            3_600,
        )?;
        if write_timeout == 0 {
            return Err(err(
                "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS",
                "must be at least 1",
            ));
        }
        let watch = WatchConfig {
            max_streams: usize::try_from(max_streams).expect("bounded above"),
            max_streams_per_connection: usize::try_from(per_connection).expect("bounded above"),
            write_timeout: Duration::from_secs(write_timeout),
        };
        Ok((watch, reflection))
    }

    /// The settings from the environment alone (`CLERK_*`, `CLERK_AUTH_*`), defaults for the
    /// rest — for programs that embed the verifier (the in-process auth layer) and take no
    /// `serve` flags.
    pub fn from_env() -> Self {
        use clap::Parser as _;
        match EnvOnly::try_parse_from(["clerk-grpc-auth"]) {
            Ok(e) => e.args,
            // Only a malformed enum value (CLERK_AUTH_LOG_FORMAT) can fail here.
            Err(_) => ServeArgs {
                listen: DEFAULT_LISTEN.to_owned(),
                ..ServeArgs::default()
            },
        }
    }

    /// Validates everything and builds the server configuration and listen address.
    pub fn to_config(&self) -> Result<(ServerConfig, SocketAddr), ConfigError> {
        let listen: SocketAddr = self.listen.trim().parse().map_err(|_| {
            err(
                "CLERK_AUTH_LISTEN",
                format!("{:?} is not an address like 127.0.0.1:50051", self.listen),
            )
        })?;

        let secret = match non_empty(&self.secret_key) {
            None => None,
            Some(s) if s.starts_with("pk_") => {
                return Err(err(
                    "CLERK_SECRET_KEY",
                    "this is a publishable key (pk_…); give the secret key (sk_…) from the Clerk Dashboard",
                ))
            }
            Some(s) if !s.starts_with("sk_") => {
                return Err(err(
                    "CLERK_SECRET_KEY",
                    "a Clerk secret key starts with sk_test_ or sk_live_",
                ))
            }
            Some(s) if s.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(err("CLERK_SECRET_KEY", "contains whitespace or control characters"))
            }
            Some(s) => Some(Secret::new(s)),
        };
        let machine_secret = match non_empty(&self.machine_secret_key) {
            None => None,
            Some(s) if !s.starts_with("ak_") => {
                return Err(err(
                    "CLERK_MACHINE_SECRET_KEY",
                    "a Clerk machine secret key starts with ak_",
                ))
            }
            Some(s) if s.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(err(
                    "CLERK_MACHINE_SECRET_KEY",
                    "contains whitespace or control characters",
                ))
            }
            Some(s) => Some(Secret::new(s)),
        };
        let api_url = match non_empty(&self.api_url) {
            None => None,
            Some(s) => Some(parse_url("CLERK_API_URL", s)?),
        };
        let jwks_url = match non_empty(&self.jwks_url) {
            None => None,
            Some(s) => Some(parse_url("CLERK_JWKS_URL", s)?),
        };

        let base_url = api_url
            .clone()
            .unwrap_or_else(|| DEFAULT_API_URL.parse().expect("default URL"));
        let allowlist = list(&self.identity_allowlist);
        if let Some(bad) = allowlist
            .iter()
            .find(|m| !is_clerk_id(m, "mch_") && !crate::authz::peer::is_spiffe_id(m))
        {
            return Err(err(
                "CLERK_AUTH_IDENTITY_ALLOWLIST",
                format!("{bad:?} is neither a machine id (mch_…) nor a SPIFFE ID (spiffe://…)"),
            ));
        }
        let machine_id = match non_empty(&self.machine_id) {
            None => None,
            Some(m) if is_clerk_id(m, "mch_") => Some(m.to_owned()),
            Some(m) => {
                return Err(err(
                    "CLERK_AUTH_MACHINE_ID",
                    format!("{m:?} is not a machine id (mch_…)"),
                ))
            }
        };
        let access = AccessConfig {
            machine_id,
            allowlist,
            caller_types: match non_empty(&self.identity_caller_types) {
                None => Vec::new(),
                Some(s) => crate::server::access::parse_caller_types(s)
                    .map_err(|e| err("CLERK_AUTH_IDENTITY_CALLER_TYPES", e))?,
            },
            oauth_scopes: match non_empty(&self.identity_oauth_scopes) {
                None => Default::default(),
                Some(s) => crate::server::access::parse_oauth_scopes(s)
                    .map_err(|e| err("CLERK_AUTH_IDENTITY_OAUTH_SCOPES", e))?,
            },
            revoke_requires_mtls: parse_bool(
                "CLERK_AUTH_REVOKE_REQUIRES_MTLS",
                &self.revoke_requires_mtls,
            )?,
            exclusive_scope: parse_bool(
                "CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE",
                &self.machine_scope_exclusive,
            )?,
        };
        // The whole rule set must hold together (e.g. OAuth scopes for a trusted-only RPC).
        crate::server::access::Access::new(access.clone())
            .map_err(|e| err("CLERK_AUTH_IDENTITY_ALLOWLIST", e))?;
        let forwarders = list(&self.client_ip_forwarders);
        if let Some(bad) = forwarders
            .iter()
            .find(|m| !is_clerk_id(m, "mch_") && !crate::authz::peer::is_spiffe_id(m))
        {
            return Err(err(
                "CLERK_AUTH_CLIENT_IP_FORWARDERS",
                format!("{bad:?} is neither a machine id (mch_…) nor a SPIFFE ID (spiffe://…)"),
            ));
        }
        let burst = parse_num("CLERK_AUTH_BAPI_BURST", &self.bapi_burst, 40, 1_000_000)?;
        if burst == 0 {
            return Err(err("CLERK_AUTH_BAPI_BURST", "must be at least 1"));
        }
        let budget = BudgetConfig {
            calls_per_sec: parse_num(
                "CLERK_AUTH_BAPI_CALLS_PER_SEC",
                &self.bapi_calls_per_sec,
                20,
                1_000_000,
            )? as f64,
            burst: u32::try_from(burst).expect("bounded above"),
            caller_calls_per_sec: parse_num(
                "CLERK_AUTH_IDENTITY_CALLER_CALLS_PER_SEC",
                &self.identity_caller_calls_per_sec,
                5,
                1_000_000,
            )? as f64,
            caller_burst: u32::try_from(parse_num(
                "CLERK_AUTH_IDENTITY_CALLER_BURST",
                &self.identity_caller_burst,
                20,
                1_000_000,
            )?)
            .expect("bounded above")
            .max(1),
            reserved_share: parse_num(
                "CLERK_AUTH_BAPI_RESERVED_PERCENT",
                &self.bapi_reserved_percent,
                50,
                100,
            )? as f64
                / 100.0,
            ..BudgetConfig::default()
        };
        let user_ttl = parse_num(
            "CLERK_AUTH_USER_CACHE_TTL_SECS",
            &self.user_cache_ttl_secs,
            60,
            86_400,
        )?;
        let session_ttl = parse_num(
            "CLERK_AUTH_SESSION_CACHE_TTL_SECS",
            &self.session_cache_ttl_secs,
            10,
            3_600,
        )?;
        let stale = parse_num(
            "CLERK_AUTH_STALE_IF_ERROR_SECS",
            &self.stale_if_error_secs,
            300,
            86_400,
        )?;
        let not_found = parse_num(
            "CLERK_AUTH_NOT_FOUND_CACHE_TTL_SECS",
            &self.not_found_cache_ttl_secs,
            30,
            3_600,
        )?;
        let identity = secret.clone().map(|key| IdentityConfig {
            backend: BackendApiConfig::new(base_url.clone(), key),
            directory: DirectoryConfig {
                user_ttl: Duration::from_secs(user_ttl.max(1)),
                memberships_ttl: Duration::from_secs(user_ttl.max(1)),
                session_ttl: Duration::from_secs(session_ttl.max(1)),
                stale_if_error: Duration::from_secs(stale),
                not_found_ttl: Duration::from_secs(not_found),
                ..DirectoryConfig::default()
            },
        });
        let webhook = match non_empty(&self.webhook_signing_secret) {
            None => None,
            Some(s) => {
                let w = WebhookConfig {
                    signing_secret: Secret::new(s),
                    tolerance: Duration::from_secs(parse_num(
                        "CLERK_AUTH_WEBHOOK_TOLERANCE_SECS",
                        &self.webhook_tolerance_secs,
                        300,
                        86_400,
                    )?),
                };
                SvixVerifier::new(&w.signing_secret, w.tolerance).map_err(|e| {
                    err(
                        "CLERK_WEBHOOK_SIGNING_SECRET",
                        e.to_string()
                            .trim_start_matches("CLERK_WEBHOOK_SIGNING_SECRET: ")
                            .to_owned(),
                    )
                })?;
                if non_empty(&self.http_listen).is_none() {
                    return Err(err(
                        "CLERK_AUTH_HTTP_LISTEN",
                        "webhooks need the HTTP port: set an address such as 127.0.0.1:8081",
                    ));
                }
                Some(w)
            }
        };
        let redis = match non_empty(&self.redis_url) {
            None => None,
            Some(u) => {
                redis::Client::open(u)
                    .map_err(|_| err("CLERK_AUTH_REDIS_URL", "not a redis:// or rediss:// URL"))?;
                Some(RedisConfig {
                    url: u.to_owned(),
                    prefix: non_empty(&self.redis_prefix)
                        .unwrap_or("clerk-auth")
                        .to_owned(),
                })
            }
        };
        let revocation_ttl = Duration::from_secs(
            parse_num(
                "CLERK_AUTH_REVOCATION_TTL_SECS",
                &self.revocation_ttl_secs,
                86_400,
                30 * 86_400,
            )?
            .max(60),
        );
        let revocation_capacity = parse_num(
            "CLERK_AUTH_REVOCATION_CAPACITY",
            &self.revocation_capacity,
            1_000_000,
            100_000_000,
        )?;
        if revocation_capacity == 0 {
            return Err(err(
                "CLERK_AUTH_REVOCATION_CAPACITY",
                "must be at least 1 (revocations would be lost)",
            ));
        }

        let read = |var: &'static str, path: &str| {
            std::fs::read(path).map_err(|e| err(var, format!("cannot read {path}: {e}")))
        };
        let tls = match (non_empty(&self.tls_cert), non_empty(&self.tls_key)) {
            (None, None) => {
                if non_empty(&self.tls_client_ca).is_some() {
                    return Err(err(
                        "CLERK_AUTH_TLS_CLIENT_CA",
                        "mTLS needs CLERK_AUTH_TLS_CERT and CLERK_AUTH_TLS_KEY too",
                    ));
                }
                None
            }
            (Some(_), None) => {
                return Err(err(
                    "CLERK_AUTH_TLS_KEY",
                    "set together with CLERK_AUTH_TLS_CERT",
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    "CLERK_AUTH_TLS_CERT",
                    "set together with CLERK_AUTH_TLS_KEY",
                ))
            }
            (Some(c), Some(k)) => {
                let t = TlsConfig {
                    cert_pem: read("CLERK_AUTH_TLS_CERT", c)?,
                    key_pem: read("CLERK_AUTH_TLS_KEY", k)?,
                    client_ca_pem: non_empty(&self.tls_client_ca)
                        .map(|p| read("CLERK_AUTH_TLS_CLIENT_CA", p))
                        .transpose()?,
                    client_auth_optional: false,
                };
                // Validates the PEM material now, so a bad file is a startup error.
                tonic::transport::Server::builder()
                    .tls_config(t.to_tonic())
                    .map_err(|e| {
                        err("CLERK_AUTH_TLS_CERT", format!("unusable TLS material: {e}"))
                    })?;
                Some(t)
            }
        };
        let route_policy = match non_empty(&self.route_policy) {
            None => RoutePolicy::default(),
            Some(path) => RoutePolicy::from_toml_file(path)
                .map_err(|e| err("CLERK_AUTH_ROUTE_POLICY", e.to_string()))?,
        };

        // Opaque machine tokens go to the Backend API with whichever secret keys are set.
        let machine = (secret.is_some() || machine_secret.is_some()).then(|| {
            MachineConfig::new(
                api_url
                    .clone()
                    .unwrap_or_else(|| DEFAULT_API_URL.parse().expect("default URL")),
                secret.clone(),
                machine_secret,
            )
        });

        // Precedence: networkless key, then an explicit JWKS URL, then the Backend API.
        let key_source = if let Some(pem) = non_empty(&self.jwt_key) {
            let key =
                VerifyingKey::from_pem(pem).map_err(|e| err("CLERK_JWT_KEY", e.to_string()))?;
            KeySource::Static(Arc::new(KeySet::single(key)))
        } else if let Some(url) = jwks_url {
            KeySource::Remote { url, bearer: None }
        } else if let Some(secret) = secret {
            let base = api_url.unwrap_or_else(|| DEFAULT_API_URL.parse().expect("default URL"));
            // Keep any path prefix (e.g. a proxy mounted under /clerk).
            let url = format!("{}/v1/jwks", base.as_str().trim_end_matches('/'));
            let url = parse_url("CLERK_API_URL", &url)?;
            KeySource::Remote {
                url,
                bearer: Some(secret),
            }
        } else {
            return Err(err(
                "CLERK_SECRET_KEY",
                "no key source configured: set CLERK_SECRET_KEY (keys from the Backend API), \
                 CLERK_JWT_KEY (networkless PEM) or CLERK_JWKS_URL",
            ));
        };

        let validation = Validation {
            clock_skew_ms: parse_num("CLERK_CLOCK_SKEW_MS", &self.clock_skew_ms, 5_000, 3_600_000)?,
            authorized_parties: list(&self.authorized_parties),
            issuer: non_empty(&self.issuer).map(str::to_owned),
            audience: list(&self.audience),
        };
        let refresh = parse_num(
            "CLERK_AUTH_JWKS_REFRESH_SECS",
            &self.jwks_refresh_secs,
            300,
            86_400,
        )?;
        if refresh == 0 {
            return Err(err("CLERK_AUTH_JWKS_REFRESH_SECS", "must be at least 1"));
        }
        let key_store = KeyStoreConfig {
            refresh_interval: Duration::from_secs(refresh),
            unknown_kid_cooldown: Duration::from_secs(parse_num(
                "CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS",
                &self.unknown_kid_cooldown_secs,
                10,
                86_400,
            )?),
            max_stale: Duration::from_secs(parse_num(
                "CLERK_AUTH_MAX_STALE_SECS",
                &self.max_stale_secs,
                3_600,
                7 * 86_400,
            )?),
            ..KeyStoreConfig::default()
        };
        let verifier = TokenVerifierConfig {
            validation,
            cache_capacity: parse_num(
                "CLERK_AUTH_VERDICT_CACHE_CAPACITY",
                &self.verdict_cache_capacity,
                100_000,
                100_000_000,
            )?,
        };
        let (watch, reflection) = self.serving(listen)?;
        let shutdown_grace = Duration::from_secs(parse_num(
            "CLERK_AUTH_SHUTDOWN_GRACE_SECS",
            &self.shutdown_grace_secs,
            10,
            3_600,
        )?);
        Ok((
            ServerConfig {
                key_source,
                key_store,
                verifier,
                machine,
                identity,
                access,
                webhook,
                redis,
                revocation_ttl,
                revocation_capacity,
                route_policy,
                tls,
                shutdown_grace,
                budget,
                forwarders,
                watch,
                reflection,
            },
            listen,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::identity::TokenType;

    fn args() -> ServeArgs {
        ServeArgs {
            listen: DEFAULT_LISTEN.into(),
            ..Default::default()
        }
    }

    #[test]
    fn no_key_source_names_the_variable() {
        let e = args().to_config().unwrap_err();
        assert_eq!(e.var, "CLERK_SECRET_KEY");
        assert!(e.to_string().starts_with("CLERK_SECRET_KEY: no key source"));
    }

    #[test]
    fn publishable_key_is_refused_without_echoing_it() {
        let a = ServeArgs {
            secret_key: Some("pk_test_Y2xlcmsuaW5zcGlyZWQucHVtYS03NC5sY2wuZGV2JA".into()),
            ..args()
        };
        let e = a.to_config().unwrap_err();
        assert_eq!(e.var, "CLERK_SECRET_KEY");
        assert!(e.problem.contains("publishable"));
        assert!(!e.to_string().contains("Y2xlcmsu"));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: Vec<(ServeArgs, &str)> = vec![
            (
                ServeArgs {
                    jwt_key: Some("nope".into()),
                    ..args()
                },
                "CLERK_JWT_KEY",
            ),
            (
                ServeArgs {
                    secret_key: Some("sk_test_x".into()),
                    api_url: Some("not a url".into()),
                    ..args()
                },
                "CLERK_API_URL",
            ),
            (
                ServeArgs {
                    jwks_url: Some("ftp://x/jwks".into()),
                    ..args()
                },
                "CLERK_JWKS_URL",
            ),
            (
                ServeArgs {
                    secret_key: Some("sk_test_x".into()),
                    clock_skew_ms: Some("-1".into()),
                    ..args()
                },
                "CLERK_CLOCK_SKEW_MS",
            ),
            (
                ServeArgs {
                    secret_key: Some("sk_test_x".into()),
                    listen: "nowhere".into(),
                    ..args()
                },
                "CLERK_AUTH_LISTEN",
            ),
            (
                ServeArgs {
                    secret_key: Some("sk_test_x".into()),
                    client_ip_forwarders: Some("mch_ok, 10.0.0.1".into()),
                    ..args()
                },
                "CLERK_AUTH_CLIENT_IP_FORWARDERS",
            ),
            (
                ServeArgs {
                    secret_key: Some("sk_test_x".into()),
                    bapi_burst: Some("0".into()),
                    ..args()
                },
                "CLERK_AUTH_BAPI_BURST",
            ),
            (
                ServeArgs {
                    secret_key: Some("sk_test_x".into()),
                    bapi_reserved_percent: Some("101".into()),
                    ..args()
                },
                "CLERK_AUTH_BAPI_RESERVED_PERCENT",
            ),
            (
                ServeArgs {
                    secret_key: Some("sk_test_x".into()),
                    bapi_calls_per_sec: Some("2.5".into()),
                    ..args()
                },
                "CLERK_AUTH_BAPI_CALLS_PER_SEC",
            ),
        ];
        for (a, var) in cases {
            assert_eq!(a.to_config().unwrap_err().var, var);
        }
    }

    #[test]
    fn backend_api_budget_and_forwarders() {
        let (c, _) = ServeArgs {
            secret_key: Some("sk_test_x".into()),
            ..args()
        }
        .to_config()
        .unwrap();
        assert_eq!(c.budget, BudgetConfig::default());
        assert!(c.forwarders.is_empty());
        let (c, _) = ServeArgs {
            secret_key: Some("sk_test_x".into()),
            bapi_calls_per_sec: Some("5".into()),
            bapi_burst: Some("9".into()),
            bapi_reserved_percent: Some("25".into()),
            client_ip_forwarders: Some("mch_layer, spiffe://cluster.local/ns/a/sa/b".into()),
            ..args()
        }
        .to_config()
        .unwrap();
        assert_eq!(
            (
                c.budget.calls_per_sec,
                c.budget.burst,
                c.budget.reserved_share
            ),
            (5.0, 9, 0.25)
        );
        assert_eq!(
            c.forwarders,
            ["mch_layer", "spiffe://cluster.local/ns/a/sa/b"]
        );
    }

    #[test]
    fn identity_access_settings() {
        let keyed = || ServeArgs {
            secret_key: Some("sk_test_x".into()),
            ..args()
        };
        let (c, _) = keyed().to_config().unwrap();
        assert_eq!(c.access, AccessConfig::default());
        let (c, _) = ServeArgs {
            identity_allowlist: Some("mch_ops, spiffe://cluster.local/ns/a/sa/b".into()),
            machine_id: Some(" mch_authsvc ".into()),
            identity_caller_types: Some("oauth_token,api_key".into()),
            identity_oauth_scopes: Some("WhoAmI=profile email; GetUser=profile".into()),
            revoke_requires_mtls: Some("true".into()),
            machine_scope_exclusive: Some("true".into()),
            identity_caller_calls_per_sec: Some("2".into()),
            identity_caller_burst: Some("7".into()),
            ..keyed()
        }
        .to_config()
        .unwrap();
        assert_eq!(c.access.machine_id.as_deref(), Some("mch_authsvc"));
        assert_eq!(c.access.allowlist.len(), 2);
        assert_eq!(
            c.access.caller_types,
            [TokenType::OauthToken, TokenType::ApiKey]
        );
        assert_eq!(
            c.access.oauth_scopes[&crate::server::access::Rpc::WhoAmI],
            ["profile", "email"]
        );
        assert!(c.access.revoke_requires_mtls && c.access.exclusive_scope);
        assert_eq!(
            (c.budget.caller_calls_per_sec, c.budget.caller_burst),
            (2.0, 7)
        );
        for (bad, var) in [
            (
                ServeArgs {
                    machine_id: Some("service-b".into()),
                    ..keyed()
                },
                "CLERK_AUTH_MACHINE_ID",
            ),
            (
                ServeArgs {
                    identity_caller_types: Some("m2m_token".into()),
                    ..keyed()
                },
                "CLERK_AUTH_IDENTITY_CALLER_TYPES",
            ),
            (
                ServeArgs {
                    identity_oauth_scopes: Some("Getuser=profile".into()),
                    ..keyed()
                },
                "CLERK_AUTH_IDENTITY_OAUTH_SCOPES",
            ),
            (
                ServeArgs {
                    identity_oauth_scopes: Some("RevokeSession=admin".into()),
                    ..keyed()
                },
                "CLERK_AUTH_IDENTITY_ALLOWLIST",
            ),
            (
                ServeArgs {
                    revoke_requires_mtls: Some("yes".into()),
                    ..keyed()
                },
                "CLERK_AUTH_REVOKE_REQUIRES_MTLS",
            ),
        ] {
            assert_eq!(bad.to_config().unwrap_err().var, var);
        }
    }

    #[test]
    fn secret_key_builds_the_backend_api_jwks_url() {
        let a = ServeArgs {
            secret_key: Some("sk_test_abc".into()),
            authorized_parties: Some(" https://a.example , ,https://b.example".into()),
            ..args()
        };
        let (cfg, listen) = a.to_config().unwrap();
        assert_eq!(listen.to_string(), DEFAULT_LISTEN);
        match cfg.key_source {
            KeySource::Remote { url, bearer } => {
                assert_eq!(url.as_str(), "https://api.clerk.com/v1/jwks");
                assert_eq!(bearer.unwrap().expose(), "sk_test_abc");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            cfg.verifier.validation.authorized_parties,
            ["https://a.example", "https://b.example"]
        );
        let a = ServeArgs {
            secret_key: Some("sk_test_abc".into()),
            api_url: Some("http://127.0.0.1:9/clerk/".into()),
            ..args()
        };
        match a.to_config().unwrap().0.key_source {
            KeySource::Remote { url, .. } => {
                assert_eq!(url.as_str(), "http://127.0.0.1:9/clerk/v1/jwks")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ports_reflection_and_watch_limits() {
        let key = || ServeArgs {
            secret_key: Some("sk_test_abc".into()),
            ..args()
        };
        let (cfg, _) = key().to_config().unwrap();
        assert!(cfg.reflection);
        assert_eq!(cfg.watch, WatchConfig::default());
        assert_eq!(key().metrics_addr().unwrap(), None);
        let a = ServeArgs {
            http_listen: Some("127.0.0.1:8081".into()),
            metrics_listen: Some(" 127.0.0.1:9090 ".into()),
            reflection: Some("FALSE".into()),
            watch_max_streams: Some("64".into()),
            watch_max_streams_per_connection: Some("2".into()),
            watch_write_timeout_secs: Some("5".into()),
            ..key()
        };
        let (cfg, _) = a.to_config().unwrap();
        assert!(!cfg.reflection);
        assert_eq!(
            cfg.watch,
            WatchConfig {
                max_streams: 64,
                max_streams_per_connection: 2,
                write_timeout: Duration::from_secs(5),
            }
        );
        assert_eq!(
            a.metrics_addr().unwrap(),
            Some("127.0.0.1:9090".parse().unwrap())
        );
        for (bad, var) in [
            (
                ServeArgs {
                    metrics_listen: Some("nowhere".into()),
                    ..key()
                },
                "CLERK_AUTH_METRICS_LISTEN",
            ),
            (
                ServeArgs {
                    http_listen: Some("127.0.0.1:8081".into()),
                    metrics_listen: Some("127.0.0.1:8081".into()),
                    ..key()
                },
                "CLERK_AUTH_METRICS_LISTEN",
            ),
            (
                ServeArgs {
                    metrics_listen: Some(DEFAULT_LISTEN.into()),
                    ..key()
                },
                "CLERK_AUTH_METRICS_LISTEN",
            ),
            (
                ServeArgs {
                    reflection: Some("maybe".into()),
                    ..key()
                },
                "CLERK_AUTH_REFLECTION",
            ),
            (
                ServeArgs {
                    watch_write_timeout_secs: Some("0".into()),
                    ..key()
                },
                "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS",
            ),
            (
                ServeArgs {
                    watch_max_streams: Some("-1".into()),
                    ..key()
                },
                "CLERK_AUTH_WATCH_MAX_STREAMS",
            ),
            (
                ServeArgs {
                    watch_max_streams_per_connection: Some("x".into()),
                    ..key()
                },
                "CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION",
            ),
        ] {
            assert_eq!(bad.to_config().unwrap_err().var, var);
        }
    }

    #[test]
    fn revocation_ttl_and_capacity() {
        let key = || ServeArgs {
            secret_key: Some("sk_test_abc".into()),
            ..args()
        };
        let (cfg, _) = key().to_config().unwrap();
        assert_eq!(cfg.revocation_ttl, Duration::from_secs(86_400));
        assert_eq!(cfg.revocation_capacity, 1_000_000);
        let (cfg, _) = ServeArgs {
            revocation_ttl_secs: Some("3600".into()),
            revocation_capacity: Some("50000".into()),
            ..key()
        }
        .to_config()
        .unwrap();
        assert_eq!(cfg.revocation_ttl, Duration::from_secs(3600));
        assert_eq!(cfg.revocation_capacity, 50_000);
        for bad in ["0", "-1", "x", "100000001"] {
            let e = ServeArgs {
                revocation_capacity: Some(bad.into()),
                ..key()
            }
            .to_config()
            .unwrap_err();
            assert_eq!(e.var, "CLERK_AUTH_REVOCATION_CAPACITY", "{bad}");
        }
    }
}
