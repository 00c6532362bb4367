//! Building an in-process [`TokenVerifier`] in one call: [`VerifierSettings`] (explicit, or
//! from the `CLERK_*` environment through a lookup function) and [`TokenVerifier::start`],
//! which also starts key loading and hands back the refresher's [`RefresherGuard`].
//!
//! Nothing here depends on the server: a service that uses only the auth layer builds its
//! verifier with this module. `clerk-grpc-auth serve` reads these variables through this
//! module too ([`VerifierSettings::from_lookup`]'s parser is the only one), so names,
//! defaults, limits and error messages are the same in both.

use std::{sync::Arc, time::Duration};

use crate::{
    clerk::{
        api::{http_client, ClerkApi},
        budget::BudgetConfig,
        machines::{MachineConfig, MachineVerifier},
    },
    secret::Secret,
    token::{
        check::Validation,
        keys::{KeySet, VerifyingKey},
    },
    verify::{
        env::{err, parse_url, Env},
        jwks::{KeySource, KeyStore, KeyStoreConfig, RefresherGuard},
        revocations::Revocations,
        TokenVerifier, TokenVerifierConfig,
    },
};

/// Clerk's Backend API, the default of `CLERK_API_URL`.
pub const DEFAULT_API_URL: &str = "https://api.clerk.com";

/// The environment variables [`VerifierSettings::from_lookup`] reads, in the order it reads them
/// (`clerk-grpc-auth serve` reads them too, through the same function).
pub const VARIABLES: &[&str] = &[
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
];

/// Everything an in-process [`TokenVerifier`] needs. Build it with [`VerifierSettings::new`]
/// (defaults for all but the key source), [`VerifierSettings::from_env`] or
/// [`VerifierSettings::from_lookup`], then start the verifier with [`TokenVerifier::start`].
///
/// Its `Debug` shows no secret.
#[derive(Debug, Clone)]
pub struct VerifierSettings {
    /// Where keys come from: `CLERK_JWT_KEY` (networkless PEM), else `CLERK_JWKS_URL`, else
    /// the Backend API's `/v1/jwks` at `CLERK_API_URL` with `CLERK_SECRET_KEY`.
    pub key_source: KeySource,
    /// Key refresh timing and limits (`CLERK_AUTH_JWKS_REFRESH_SECS`, default 300;
    /// `CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS`, default 10; `CLERK_AUTH_MAX_STALE_SECS`,
    /// default 3600).
    pub key_store: KeyStoreConfig,
    /// Claim validation (`CLERK_AUTHORIZED_PARTIES`, `CLERK_ISSUER`, `CLERK_AUDIENCE`,
    /// `CLERK_CLOCK_SKEW_MS`, default 5000) and the verdict cache
    /// (`CLERK_AUTH_VERDICT_CACHE_CAPACITY`, default 100 000).
    pub verifier: TokenVerifierConfig,
    /// Opaque machine tokens (`mt_`, `oat_`, `ak_`) through the Backend API, set when
    /// `CLERK_SECRET_KEY` or `CLERK_MACHINE_SECRET_KEY` is (`None`: they are refused with
    /// `FAILED_PRECONDITION` / `SECRET_KEY_MISSING`).
    pub machine: Option<MachineConfig>,
    /// What machine-token verification may spend at the Backend API
    /// (`CLERK_AUTH_BAPI_CALLS_PER_SEC`, default 20; `CLERK_AUTH_BAPI_BURST`, default 40;
    /// `CLERK_AUTH_BAPI_RESERVED_PERCENT`, default 50).
    pub budget: BudgetConfig,
    /// How long a revoked session is remembered (`CLERK_AUTH_REVOCATION_TTL_SECS`, default
    /// 86 400, at least 60).
    pub revocation_ttl: Duration,
    /// The most revoked sessions remembered at once (`CLERK_AUTH_REVOCATION_CAPACITY`, default
    /// 1 000 000).
    pub revocation_capacity: u64,
}

/// A setting is missing or malformed. `Display` is one line, `VARIABLE: what is wrong`; it
/// never shows a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct SettingError {
    /// The environment variable.
    pub var: &'static str,
    /// What is wrong (never the value of a secret).
    pub problem: String,
}

/// Why [`TokenVerifier::start`] could not start a verifier.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is missing or malformed.
    #[error(transparent)]
    Setting(#[from] SettingError),
    /// The HTTP client for Clerk could not be built.
    #[error("building the HTTP client failed")]
    HttpClient(#[source] reqwest::Error),
    /// Called outside a tokio runtime: the key refresher is a tokio task.
    #[error(
        "TokenVerifier::start must be called within a tokio runtime (it spawns the key refresher)"
    )]
    NoRuntime,
}

// === impl VerifierSettings ===

impl VerifierSettings {
    /// Defaults for everything but the key source; no machine tokens.
    pub fn new(key_source: KeySource) -> Self {
        Self {
            key_source,
            key_store: KeyStoreConfig::default(),
            verifier: TokenVerifierConfig::default(),
            machine: None,
            budget: BudgetConfig::default(),
            revocation_ttl: Duration::from_secs(86_400),
            revocation_capacity: 1_000_000,
        }
    }

    /// The settings from the process environment ([`VARIABLES`]); see
    /// [`VerifierSettings::from_lookup`]. A variable that is not valid UTF-8 is an error
    /// naming it.
    pub fn from_env() -> Result<Self, SettingError> {
        Self::read(&Env::process())
    }

    /// The settings from `lookup` (a variable's value, `None` when unset), with the names and
    /// defaults of `clerk-grpc-auth serve` (which reads them through this function): one key
    /// source is needed (`CLERK_JWT_KEY`, `CLERK_JWKS_URL` or `CLERK_SECRET_KEY`, in that
    /// order of precedence); every other setting has a default. Empty values count as unset.
    /// An unparsable value is an error naming its variable (never showing the value).
    ///
    /// ```
    /// use clerk_grpc_auth::verify::settings::VerifierSettings;
    ///
    /// let env = std::collections::HashMap::from([
    ///     ("CLERK_JWKS_URL", "https://clerk.example.com/.well-known/jwks.json"),
    ///     ("CLERK_CLOCK_SKEW_MS", "soon"),
    /// ]);
    /// let e = VerifierSettings::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap_err();
    /// assert_eq!(e.var, "CLERK_CLOCK_SKEW_MS");
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingError> {
        Self::read(&Env::lookup(lookup))
    }

    /// Reads [`VARIABLES`] from `env`: the one parser of these variables, also used by the
    /// server's configuration.
    pub(crate) fn read(env: &Env<'_>) -> Result<Self, SettingError> {
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
        let api_url = env
            .url("CLERK_API_URL")?
            .unwrap_or_else(|| DEFAULT_API_URL.parse().expect("default URL"));
        let jwks_url = env.url("CLERK_JWKS_URL")?;

        // Precedence: networkless key, then an explicit JWKS URL, then the Backend API.
        let key_source = if let Some(pem) = env.text("CLERK_JWT_KEY")? {
            let key =
                VerifyingKey::from_pem(&pem).map_err(|e| err("CLERK_JWT_KEY", e.to_string()))?;
            KeySource::Static(Arc::new(KeySet::single(key)))
        } else if let Some(url) = jwks_url {
            KeySource::Remote { url, bearer: None }
        } else if let Some(secret) = secret.clone() {
            // Keep any path prefix (e.g. a proxy mounted under /clerk).
            let url = format!("{}/v1/jwks", api_url.as_str().trim_end_matches('/'));
            KeySource::Remote {
                url: parse_url("CLERK_API_URL", &url)?,
                bearer: Some(secret),
            }
        } else {
            return Err(err(
                "CLERK_SECRET_KEY",
                "no key source configured: set CLERK_SECRET_KEY (keys from the Backend API), \
                 CLERK_JWT_KEY (networkless PEM) or CLERK_JWKS_URL",
            ));
        };
        let d = Self::new(key_source);
        let verifier = verifier_config(env)?;
        let key_store = key_store(env, d.key_store)?;
        let budget = budget(env, d.budget)?;
        let revocation_ttl = env
            .secs(
                "CLERK_AUTH_REVOCATION_TTL_SECS",
                d.revocation_ttl,
                30 * 86_400,
            )?
            .max(Duration::from_secs(60));
        let revocation_capacity = env.num(
            "CLERK_AUTH_REVOCATION_CAPACITY",
            d.revocation_capacity,
            100_000_000,
        )?;
        if revocation_capacity == 0 {
            return Err(err(
                "CLERK_AUTH_REVOCATION_CAPACITY",
                "must be at least 1 (revocations would be lost)",
            ));
        }
        // Opaque machine tokens go to the Backend API with whichever secret keys are set.
        let machine = (secret.is_some() || machine_secret.is_some())
            .then(|| MachineConfig::new(api_url, secret, machine_secret));
        Ok(Self {
            verifier,
            key_store,
            machine,
            budget,
            revocation_ttl,
            revocation_capacity,
            ..d
        })
    }
}

/// A secret key: passes `check`, no whitespace or control characters. No error shows it.
fn secret_key(
    env: &Env<'_>,
    var: &'static str,
    check: impl Fn(&str) -> Result<(), &'static str>,
) -> Result<Option<Secret>, SettingError> {
    let Some(s) = env.text(var)? else {
        return Ok(None);
    };
    check(&s).map_err(|problem| err(var, problem))?;
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(var, "contains whitespace or control characters"));
    }
    Ok(Some(Secret::new(s)))
}

/// Claim validation and the verdict cache (`CLERK_CLOCK_SKEW_MS`, `CLERK_AUTHORIZED_PARTIES`,
/// `CLERK_ISSUER`, `CLERK_AUDIENCE`, `CLERK_AUTH_VERDICT_CACHE_CAPACITY`); defaults:
/// `TokenVerifierConfig::default()`.
pub(crate) fn verifier_config(env: &Env<'_>) -> Result<TokenVerifierConfig, SettingError> {
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

fn key_store(env: &Env<'_>, d: KeyStoreConfig) -> Result<KeyStoreConfig, SettingError> {
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

/// The replica-wide Backend API budget. The per-caller limits of identity queries
/// (`CLERK_AUTH_IDENTITY_CALLER_*`) are the server's and read there.
fn budget(env: &Env<'_>, d: BudgetConfig) -> Result<BudgetConfig, SettingError> {
    // The defaults are whole numbers; the variables take whole numbers.
    let calls_per_sec = env.num(
        "CLERK_AUTH_BAPI_CALLS_PER_SEC",
        d.calls_per_sec as u64,
        1_000_000,
    )?;
    let burst = env.positive("CLERK_AUTH_BAPI_BURST", d.burst.into(), 1_000_000)?;
    let reserved_percent = env.num(
        "CLERK_AUTH_BAPI_RESERVED_PERCENT",
        (d.reserved_share * 100.0).round() as u64,
        100,
    )?;
    Ok(BudgetConfig {
        calls_per_sec: calls_per_sec as f64,
        burst: u32::try_from(burst).expect("bounded above"),
        reserved_share: reserved_percent as f64 / 100.0,
        ..d
    })
}

// === impl TokenVerifier ===

impl TokenVerifier {
    /// Builds an in-process verifier from `settings` and starts loading its keys: the key
    /// refresher runs as a tokio task until the returned [`RefresherGuard`] is dropped (or
    /// [`RefresherGuard::shutdown`] is awaited). Keep the guard for as long as the verifier
    /// serves — bind it to a name (`_keys`), not `_`, which drops it at once.
    ///
    /// Keys load in the background: until the first load (a JWKS source) verifications answer
    /// `UNAVAILABLE` / `JWK_REMOTE_FAILED_TO_LOAD`; await `verifier.keys().ready()` to wait for
    /// it. A networkless key (`CLERK_JWT_KEY`) is usable at once. With a secret key
    /// ([`VerifierSettings::machine`]), opaque machine tokens are verified too.
    ///
    /// Must be called within a tokio runtime ([`StartError::NoRuntime`] otherwise).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use clerk_grpc_auth::{verify::{jwks::KeySource, settings::VerifierSettings}, TokenVerifier};
    ///
    /// let source = KeySource::Remote {
    ///     url: "https://clerk.example.com/.well-known/jwks.json".parse()?,
    ///     bearer: None,
    /// };
    /// let (verifier, _keys) = TokenVerifier::start(VerifierSettings::new(source))?;
    /// verifier.keys().ready().await; // optional: wait for the first load
    /// # Ok(()) }
    /// ```
    pub fn start(settings: VerifierSettings) -> Result<(Self, RefresherGuard), StartError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StartError::NoRuntime);
        }
        // One client for every call to Clerk: the key store's JWKS fetches share its HTTP
        // client; the machine tokens' Backend API calls also its budget and Retry-After gate
        // (the key store waits out a JWKS Retry-After itself, within its fetch budget).
        let api = ClerkApi::with_http(
            http_client().map_err(StartError::HttpClient)?,
            settings.budget.clone(),
        );
        let verifier = Self::assemble(settings, &api);
        let guard = verifier.keys().spawn_refresher();
        Ok((verifier, guard))
    }

    /// The verifier of `settings` calling Clerk through `api` (the key store's JWKS fetches
    /// through its HTTP client, machine tokens through its budget and Retry-After gate). Its
    /// keys are not loading yet: the caller spawns the refresher. The one wiring of
    /// [`TokenVerifier::start`] and the server.
    pub(crate) fn assemble(settings: VerifierSettings, api: &ClerkApi) -> Self {
        let machine = settings.machine.map(|m| MachineVerifier::new(m, api));
        let keys = KeyStore::new(settings.key_source, settings.key_store, api.http().clone());
        let revocations = Revocations::new(settings.revocation_ttl, settings.revocation_capacity);
        Self::with_parts(settings.verifier, keys, machine, revocations)
    }

    /// [`TokenVerifier::start`] with [`VerifierSettings::from_env`]: the `CLERK_*`
    /// environment of `clerk-grpc-auth serve` (`CLERK_SECRET_KEY`, `CLERK_JWT_KEY`,
    /// `CLERK_JWKS_URL`, `CLERK_API_URL`, `CLERK_AUTHORIZED_PARTIES`, …).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let (verifier, _keys) = clerk_grpc_auth::TokenVerifier::from_env()?;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<(Self, RefresherGuard), StartError> {
        Self::start(VerifierSettings::from_env()?)
    }
}

#[cfg(test)]
pub(crate) mod tests;
