//! The command line: clap's definitions of every subcommand and flag.
//!
//! `serve`'s flags are declared once ([`ServeFlags`]), each with the environment variable it
//! sets; their values reach the library's configuration by that variable's name
//! ([`ServeArgs::get`], fed to [`clerk_grpc_auth::server::config::ServeConfig::from_lookup`]),
//! so every value is parsed by the library alone, with one rule, whether it came from a flag or
//! from the environment.

use std::collections::BTreeMap;

use clap::{builder::TypedValueParser as _, Parser, Subcommand};
use clerk_grpc_auth::server::{config::DEFAULT_LISTEN, telemetry::LogFormat};

#[derive(Parser)]
#[command(
    name = "clerk-grpc-auth",
    version,
    about = "Clerk authentication for gRPC services"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the AuthService (configuration from flags or Clerk's environment variables).
    Serve(Box<ServeArgs>),
    /// Run the Clerk emulator (JWKS, token minting) on its own.
    Emulator(EmulatorArgs),
    /// Mint a session token from a running emulator; prints only the token.
    Token(Box<TokenArgs>),
    /// Run the emulator and the AuthService together and print a ready token.
    Dev(Box<DevArgs>),
}

/// `--log-format`: the library's names, parsed by the library.
fn log_format() -> impl clap::builder::TypedValueParser<Value = LogFormat> {
    clap::builder::PossibleValuesParser::new(LogFormat::NAMES)
        .map(|s| s.parse::<LogFormat>().expect("one of LogFormat::NAMES"))
}

/// `clerk-grpc-auth serve` settings. Every flag can also be set by the environment variable
/// named beside it.
///
/// Declares the flags only (help, `env`, defaults): their values are read by variable name
/// through [`ServeArgs`], never from these fields.
#[derive(clap::Args)]
#[allow(dead_code)]
struct ServeFlags {
    /// Address to listen on.
    #[arg(long, env = "CLERK_AUTH_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: String,
    /// Clerk secret key (`sk_…`): loads the JWKS from the Backend API.
    #[arg(long, env = "CLERK_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Clerk machine secret key (`ak_…`): verifies opaque M2M tokens (else the secret key is
    /// used) and creates M2M tokens for outgoing calls.
    #[arg(long, env = "CLERK_MACHINE_SECRET_KEY", hide_env_values = true)]
    machine_secret_key: Option<String>,
    /// Clerk JWT public key (PEM, or the bare base64 body): networkless verification.
    #[arg(long, env = "CLERK_JWT_KEY", hide_env_values = true)]
    jwt_key: Option<String>,
    /// Backend API URL.
    #[arg(long, env = "CLERK_API_URL")]
    api_url: Option<String>,
    /// A JWKS URL to load keys from without a secret key (e.g. `https://<frontend-api>/.well-known/jwks.json`).
    #[arg(long, env = "CLERK_JWKS_URL")]
    jwks_url: Option<String>,
    /// Comma-separated authorized parties (`azp` allow-list, exact match).
    #[arg(long, env = "CLERK_AUTHORIZED_PARTIES")]
    authorized_parties: Option<String>,
    /// Pin the issuer: `iss` must equal this exactly (off by default, as in Clerk's SDK).
    #[arg(long, env = "CLERK_ISSUER")]
    issuer: Option<String>,
    /// Comma-separated accepted audiences (`aud`).
    #[arg(long, env = "CLERK_AUDIENCE")]
    audience: Option<String>,
    /// Clock skew in milliseconds (default 5000).
    #[arg(long, env = "CLERK_CLOCK_SKEW_MS")]
    clock_skew_ms: Option<String>,
    /// Background JWKS refresh interval in seconds (default 300).
    #[arg(long, env = "CLERK_AUTH_JWKS_REFRESH_SECS")]
    jwks_refresh_secs: Option<String>,
    /// Minimum seconds between unknown-kid refetches (default 10).
    #[arg(long, env = "CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS")]
    unknown_kid_cooldown_secs: Option<String>,
    /// How long the last good keys are used while refreshes fail, in seconds (default 3600).
    #[arg(long, env = "CLERK_AUTH_MAX_STALE_SECS")]
    max_stale_secs: Option<String>,
    /// Verdict cache capacity (default 100000; 0 disables it).
    #[arg(long, env = "CLERK_AUTH_VERDICT_CACHE_CAPACITY")]
    verdict_cache_capacity: Option<String>,
    /// Seconds in-flight calls may take to finish after SIGTERM/SIGINT (default 10).
    #[arg(long, env = "CLERK_AUTH_SHUTDOWN_GRACE_SECS")]
    shutdown_grace_secs: Option<String>,
    /// HTTP port (Clerk webhooks), e.g. `127.0.0.1:8081`. Off when unset. Without a metrics
    /// port (`CLERK_AUTH_METRICS_LISTEN`) it also serves `/metrics`, `/livez` and `/readyz`.
    #[arg(long, env = "CLERK_AUTH_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Clerk webhook signing secret (`whsec_…`): enables `POST /webhooks/clerk` on the HTTP port.
    #[arg(long, env = "CLERK_WEBHOOK_SIGNING_SECRET", hide_env_values = true)]
    webhook_signing_secret: Option<String>,
    /// Largest distance in seconds between a webhook's timestamp and now (default 300).
    #[arg(long, env = "CLERK_AUTH_WEBHOOK_TOLERANCE_SECS")]
    webhook_tolerance_secs: Option<String>,
    /// Comma-separated trusted callers of identity queries and the revocation feed (read any
    /// user, revoke sessions): machine ids (`mch_…`, whose M2M tokens must also be scoped to
    /// `CLERK_AUTH_MACHINE_ID`) and SPIFFE IDs (`spiffe://…`, by mTLS). Default: none.
    #[arg(long, env = "CLERK_AUTH_IDENTITY_ALLOWLIST")]
    identity_allowlist: Option<String>,
    /// AuthService's own machine id (`mch_…`): an allowlisted machine's M2M token is trusted
    /// only when its scopes name it. Unset: no M2M caller is trusted.
    #[arg(long, env = "CLERK_AUTH_MACHINE_ID")]
    machine_id: Option<String>,
    /// Comma-separated user token types that may call identity queries for their own user,
    /// besides session tokens: `oauth_token`, `api_key` (default: none).
    #[arg(long, env = "CLERK_AUTH_IDENTITY_CALLER_TYPES")]
    identity_caller_types: Option<String>,
    /// OAuth scopes each identity RPC needs, `Rpc=scope scope;Rpc=scope` (e.g.
    /// `WhoAmI=profile email;GetUser=profile email`). An RPC not named refuses OAuth tokens.
    #[arg(long, env = "CLERK_AUTH_IDENTITY_OAUTH_SCOPES")]
    identity_oauth_scopes: Option<String>,
    /// `true`: a trusted caller's `RevokeSession` needs an allowlisted mTLS certificate *and*
    /// a trusted M2M token (default `false`: either).
    #[arg(long, env = "CLERK_AUTH_REVOKE_REQUIRES_MTLS")]
    revoke_requires_mtls: Option<String>,
    /// Users revoking their own sessions: the current one always, the others with a recent
    /// second factor per Clerk's reverification preset (`strict_mfa`, `strict` — the
    /// default —, `moderate`, `lax`); `any`: no factor asked; `never`: trusted callers only.
    #[arg(long, env = "CLERK_AUTH_SELF_REVOKE")]
    self_revoke: Option<String>,
    /// What a member needs in its active organization to read it (`GetOrganization`,
    /// `ListOrganizationMembers`): a permission (default `org:sys_memberships:read`, system
    /// permissions read from Clerk), a role (`org:admin`), or `never`.
    #[arg(long, env = "CLERK_AUTH_ORG_READ")]
    org_read: Option<String>,
    /// `true`: an M2M caller counts only when `CLERK_AUTH_MACHINE_ID` is its token's *only*
    /// scope (a machine that may also call other services is not trusted). Default `false`.
    #[arg(long, env = "CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE")]
    machine_scope_exclusive: Option<String>,
    /// Backend API calls per second one identity-query caller (user, machine, mTLS peer) may
    /// cause (default 5; 0 = no per-caller limit).
    #[arg(long, env = "CLERK_AUTH_IDENTITY_CALLER_CALLS_PER_SEC")]
    identity_caller_calls_per_sec: Option<String>,
    /// Backend API calls one identity-query caller may cause at once (default 20).
    #[arg(long, env = "CLERK_AUTH_IDENTITY_CALLER_BURST")]
    identity_caller_burst: Option<String>,
    /// How long Clerk's "not found" for a user or session is remembered, in seconds (default
    /// 30; 0 = off).
    #[arg(long, env = "CLERK_AUTH_NOT_FOUND_CACHE_TTL_SECS")]
    not_found_cache_ttl_secs: Option<String>,
    /// Redis URL: share revocations and cache invalidations between replicas.
    #[arg(long, env = "CLERK_AUTH_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Redis key and channel prefix (default `clerk-auth`).
    #[arg(long, env = "CLERK_AUTH_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// User-profile and membership cache TTL in seconds (default 60).
    #[arg(long, env = "CLERK_AUTH_USER_CACHE_TTL_SECS")]
    user_cache_ttl_secs: Option<String>,
    /// Session-status cache TTL in seconds (default 10).
    #[arg(long, env = "CLERK_AUTH_SESSION_CACHE_TTL_SECS")]
    session_cache_ttl_secs: Option<String>,
    /// Serve cached users and memberships this many seconds past their TTL while Clerk fails
    /// (default 300; 0 = off).
    #[arg(long, env = "CLERK_AUTH_STALE_IF_ERROR_SECS")]
    stale_if_error_secs: Option<String>,
    /// TLS certificate chain (PEM file) for the gRPC port; with `CLERK_AUTH_TLS_KEY`.
    #[arg(long, env = "CLERK_AUTH_TLS_CERT")]
    tls_cert: Option<String>,
    /// TLS private key (PEM file).
    #[arg(long, env = "CLERK_AUTH_TLS_KEY")]
    tls_key: Option<String>,
    /// mTLS: client certificates must chain to this CA (PEM file); their SPIFFE IDs can be
    /// allowlisted and required by policy.
    #[arg(long, env = "CLERK_AUTH_TLS_CLIENT_CA")]
    tls_client_ca: Option<String>,
    /// A TOML file of routes for Envoy's `Check` (host, path prefix, methods → rule). Default:
    /// a valid session token for every request.
    #[arg(long, env = "CLERK_AUTH_ROUTE_POLICY")]
    route_policy: Option<String>,
    /// HTTP forward auth at `/auth` on the HTTP port, decided as `Check` is: which headers
    /// carry the original request — `nginx` (X-Original-Method/-Host/-URI, as the README's
    /// config sets them), `ingress-nginx` (X-Original-Method, X-Original-URL) or `forwarded`
    /// (Traefik, Caddy: X-Forwarded-Method/-Host/-Uri). Off by default.
    #[arg(long, env = "CLERK_AUTH_FORWARD_AUTH")]
    forward_auth: Option<String>,
    /// How long a revoked session is remembered, in seconds: the longest lifetime a token of
    /// a session can have (default 86400, 60 to 2592000).
    #[arg(long, env = "CLERK_AUTH_REVOCATION_TTL_SECS")]
    revocation_ttl_secs: Option<String>,
    /// The most revoked sessions remembered at once; past it the oldest is evicted (counted
    /// in `/metrics`, logged). Default 1000000.
    #[arg(long, env = "CLERK_AUTH_REVOCATION_CAPACITY")]
    revocation_capacity: Option<String>,
    /// Backend API calls per second this replica may make, identity queries and machine
    /// tokens together (default 20; 0 = no replica-wide limit).
    #[arg(long, env = "CLERK_AUTH_BAPI_CALLS_PER_SEC")]
    bapi_calls_per_sec: Option<String>,
    /// Backend API calls that may be made at once after a quiet period (default 40).
    #[arg(long, env = "CLERK_AUTH_BAPI_BURST")]
    bapi_burst: Option<String>,
    /// Percentage of the Backend API budget that callers never seen with a valid token cannot
    /// spend (default 50).
    #[arg(long, env = "CLERK_AUTH_BAPI_RESERVED_PERCENT")]
    bapi_reserved_percent: Option<String>,
    /// Comma-separated machine ids (`mch_…`) and SPIFFE IDs (`spiffe://…`) allowed to set
    /// `VerifyTokenRequest.client_ip` (the delegated layers; default: none).
    #[arg(long, env = "CLERK_AUTH_CLIENT_IP_FORWARDERS")]
    client_ip_forwarders: Option<String>,
    /// Metrics port (`/metrics`, `/livez`, `/readyz`), e.g. `127.0.0.1:9090`. When set, the
    /// HTTP port serves webhooks only.
    #[arg(long, env = "CLERK_AUTH_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// gRPC server reflection: `true` (default) or `false` (reflection calls are
    /// UNIMPLEMENTED; turn it off in production).
    #[arg(long, env = "CLERK_AUTH_REFLECTION")]
    reflection: Option<String>,
    /// Most `WatchRevocations` streams open at once on this replica (default 1024).
    #[arg(long, env = "CLERK_AUTH_WATCH_MAX_STREAMS")]
    watch_max_streams: Option<String>,
    /// Most `WatchRevocations` streams open at once on one connection (default 8).
    #[arg(long, env = "CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION")]
    watch_max_streams_per_connection: Option<String>,
    /// Seconds a `WatchRevocations` subscriber may go without reading before it is dropped
    /// (default 30).
    #[arg(long, env = "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS")]
    watch_write_timeout_secs: Option<String>,
    /// Log format.
    #[arg(long, env = "CLERK_AUTH_LOG_FORMAT", default_value = "text", value_parser = LogFormat::NAMES)]
    log_format: String,
}
/// `serve`'s flag values by the environment variable each sets.
pub struct ServeArgs {
    values: BTreeMap<String, String>,
}

impl ServeArgs {
    /// The value given for `var` by its flag or the environment (clap's `env`), if any.
    pub fn get(&self, var: &str) -> Option<String> {
        self.values.get(var).cloned()
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let flags = <ServeFlags as clap::Args>::augment_args(clap::Command::new("serve"));
        let values = flags
            .get_arguments()
            .filter_map(|arg| {
                let var = arg.get_env()?.to_str()?.to_owned();
                let value = matches.get_one::<String>(arg.get_id().as_str())?;
                Some((var, value.clone()))
            })
            .collect();
        Ok(Self { values })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        let update = Self::from_arg_matches(matches)?;
        self.values.extend(update.values);
        Ok(())
    }
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        ServeFlags::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        ServeFlags::augment_args_for_update(cmd)
    }
}

/// `emulator`'s settings.
#[derive(clap::Args)]
pub struct EmulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: String,
    /// The secret key `/v1/jwks` requires (default: random, printed).
    #[arg(long, env = "CLERK_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
}

/// `token`'s settings.
#[derive(clap::Args)]
pub struct TokenArgs {
    /// The emulator's URL (as `dev` or `emulator` prints it).
    #[arg(long, default_value = "http://127.0.0.1:8787")]
    pub emulator_url: String,
    /// `sub` (default: random `user_…`).
    #[arg(long)]
    pub user: Option<String>,
    /// `sid` (default: random `sess_…`).
    #[arg(long)]
    pub session: Option<String>,
    /// Active organization id.
    #[arg(long)]
    pub org: Option<String>,
    /// Organization slug.
    #[arg(long)]
    pub org_slug: Option<String>,
    /// Organization role (`admin` or `org:admin`).
    #[arg(long)]
    pub role: Option<String>,
    /// Organization permission `org:<feature>:<permission>` (repeat for more).
    #[arg(long = "permission")]
    pub permissions: Vec<String>,
    /// Lifetime in seconds (default 60, as Clerk's session tokens).
    #[arg(long)]
    pub expires_in: Option<i64>,
    /// `azp` claim.
    #[arg(long)]
    pub azp: Option<String>,
    /// Mint a pending session (`sts: pending`).
    #[arg(long)]
    pub pending: bool,
    /// Minutes since the first and the second factor were verified, `FIRST,SECOND` (Clerk's
    /// `fva`; `-1` for a factor not set up), e.g. `0,2` for a second factor just now.
    #[arg(long, value_parser = parse_fva, allow_hyphen_values = true)]
    pub fva: Option<[i64; 2]>,
    /// Mint v1 claims instead of v2.
    #[arg(long)]
    pub v1: bool,
    /// Mint an M2M token instead (opaque `mt_…`; `--jwt` for JWT format). `--machine` picks
    /// the issuing machine (default: the emulator's first machine).
    #[arg(long, group = "machine_kind")]
    pub m2m: bool,
    /// Mint an API key instead (`ak_…`); `--subject user_…|org_…` owns it.
    #[arg(long, group = "machine_kind")]
    pub api_key: bool,
    /// Mint an OAuth access token instead (opaque `oat_…`, or `--jwt`); `--user` is its user.
    #[arg(long, group = "machine_kind")]
    pub oauth: bool,
    /// Machine tokens in JWT format (M2M and OAuth).
    #[arg(long)]
    pub jwt: bool,
    /// The issuing machine of an M2M token (`mch_…`).
    #[arg(long)]
    pub machine: Option<String>,
    /// The owner of an API key (`user_…` or `org_…`).
    #[arg(long)]
    pub subject: Option<String>,
    /// A scope of the machine token (repeat for more).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// OAuth client id.
    #[arg(long)]
    pub client_id: Option<String>,
    /// API key name.
    #[arg(long)]
    pub name: Option<String>,
}
/// `dev`'s settings.
#[derive(clap::Args)]
pub struct DevArgs {
    /// AuthService address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Emulator address.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub emulator_listen: String,
    /// AuthService HTTP port (Clerk webhooks from the emulator).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub http_listen: String,
    /// AuthService metrics port (/metrics, /livez, /readyz).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_listen: String,
    /// Serve gRPC with mTLS: writes a throw-away CA, server and client certificates (the
    /// client's SPIFFE ID is on the identity-query allowlist) and prints how to use them.
    #[arg(long)]
    pub tls: bool,
    /// Verdict cache capacity (default 100000; 0 turns it off, e.g. to measure every
    /// call's signature check).
    #[arg(long, env = "CLERK_AUTH_VERDICT_CACHE_CAPACITY")]
    pub verdict_cache_capacity: Option<String>,
    /// Where the walk-through's Orders example verifying in-process listens (printed in its
    /// commands; dev does not bind it).
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub orders_in_process: String,
    /// Where the walk-through's Orders example delegating to AuthService listens (printed in
    /// its commands; dev does not bind it).
    #[arg(long, default_value = "127.0.0.1:50062")]
    pub orders_delegated: String,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = log_format())]
    pub log_format: LogFormat,
}
/// `--fva FIRST,SECOND`: two whole numbers of minutes, each `-1` or more.
fn parse_fva(s: &str) -> Result<[i64; 2], String> {
    let (a, b) = s.split_once(',').ok_or("FIRST,SECOND minutes, e.g. 0,2")?;
    let minutes = |v: &str| match v.trim().parse::<i64>() {
        Ok(n) if (-1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(format!("{v:?} is not a number of minutes from -1")),
    };
    Ok([minutes(a)?, minutes(b)?])
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, CommandFactory as _};
    use clerk_grpc_auth::server::config::VARIABLES;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_variable_has_one_flag_and_every_flag_a_variable() {
        let flags = ServeArgs::augment_args(clap::Command::new("serve"));
        let mut envs: Vec<String> = flags
            .get_arguments()
            .filter(|a| a.get_id() != "help")
            .map(|a| {
                a.get_env()
                    .unwrap_or_else(|| panic!("--{} sets no variable", a.get_id()))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        envs.sort();
        let mut vars: Vec<String> = VARIABLES.iter().map(|v| (*v).to_owned()).collect();
        vars.sort();
        assert_eq!(envs, vars);
    }

    #[test]
    fn flag_values_arrive_under_their_variable() {
        let cli = Cli::try_parse_from([
            "clerk-grpc-auth",
            "serve",
            "--clock-skew-ms",
            "7",
            "--secret-key",
            "sk_test_x",
            "--log-format",
            "json",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.get("CLERK_CLOCK_SKEW_MS").as_deref(), Some("7"));
        assert_eq!(args.get("CLERK_SECRET_KEY").as_deref(), Some("sk_test_x"));
        assert_eq!(args.get("CLERK_AUTH_LOG_FORMAT").as_deref(), Some("json"));
        // Defaults are the library's.
        assert_eq!(
            args.get("CLERK_AUTH_LISTEN").as_deref(),
            Some(DEFAULT_LISTEN)
        );
        assert!(Cli::try_parse_from(["clerk-grpc-auth", "serve", "--log-format", "xml"]).is_err());
    }
}
