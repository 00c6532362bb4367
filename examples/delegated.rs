//! The Orders service protected by delegation: each new token is verified by a
//! `clerk.auth.v1.AuthService` (e.g. `clerk-grpc-auth dev`), verdicts are cached for 10 s.
//!
//! With `cargo run --release -- dev --tls` running in another terminal (it prints this line
//! with its PKI directory filled in):
//!
//! ```sh
//! cargo run --release --example delegated -- --listen 127.0.0.1:50062 \
//!   --auth-service https://127.0.0.1:50051 \
//!   --tls-ca $PKI/ca.pem --tls-cert $PKI/client.pem --tls-key $PKI/client-key.pem
//! grpcurl -plaintext -H "authorization: Bearer $TOKEN" 127.0.0.1:50062 examples.orders.v1.Orders/ListOrders
//! ```
//!
//! Every verdict comes from AuthService, so whoever can change its answers on the way can make
//! any token valid: use `https://` (TLS, `--tls-ca`; mTLS with `--tls-cert` / `--tls-key`)
//! whenever AuthService is not on this machine. Plain `dev` serves plaintext, for loopback:
//! `--auth-service http://127.0.0.1:50051`; a plaintext endpoint that is not loopback is
//! warned about at startup.
//!
//! `--auth-service` may be repeated: calls are balanced over every endpoint. While no
//! AuthService answers, protected methods fail closed with `UNAVAILABLE`.
//!
//! Sessions revoked at AuthService are refused here at once through `WatchRevocations`, which
//! AuthService streams to allowlisted machines only: with `CLERK_MACHINE_SECRET_KEY` (and
//! `CLERK_API_URL`) this service presents its own M2M token (`dev` prints the line for its
//! allowlisted machine A); without, it verifies every call but does not follow revocations.

#[path = "common/orders.rs"]
mod orders;
#[path = "common/tls.rs"]
mod tls;

use std::process::ExitCode;

use clap::Parser;
use clerk_grpc_auth::{
    clerk::api::ClerkApi,
    credentials::m2m::{M2mTokenSource, M2mTokenSourceConfig},
    layer::{AuthLayer, CallerCredentials, DelegatedConfig, DelegatedVerifier},
    secret::Secret,
    server::telemetry::{self, LogFormat},
};

/// The Orders example service, delegating verification to AuthService.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50062")]
    listen: String,
    /// AuthService endpoint(s): `https://auth.internal:50051` (with `--tls-ca`), or
    /// `http://127.0.0.1:50051` on loopback.
    #[arg(long = "auth-service", required = true)]
    auth_service: Vec<String>,
    #[command(flatten)]
    tls: tls::AuthServiceTls,
    /// Per-call deadline of VerifyToken, in milliseconds.
    #[arg(long, default_value_t = 200)]
    deadline_ms: u64,
    /// This service's machine secret key (`ak_…`): its M2M token is presented to AuthService
    /// (revocation feed, `client_ip` forwarding).
    #[arg(long, env = "CLERK_MACHINE_SECRET_KEY", hide_env_values = true)]
    machine_secret_key: Option<String>,
    /// Clerk Backend API URL (where the M2M token is created).
    #[arg(long, env = "CLERK_API_URL", default_value = "https://api.clerk.com")]
    api_url: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let _log = telemetry::init(LogFormat::Text);
    let credentials = match args.machine_secret_key.as_deref().map(|key| {
        let api_url = args.api_url.parse()?;
        let source = M2mTokenSource::new(
            M2mTokenSourceConfig::new(api_url, Secret::new(key)),
            &ClerkApi::new()?,
        );
        Ok::<_, Box<dyn std::error::Error>>(CallerCredentials::new(source))
    }) {
        None => {
            eprintln!(
                "no CLERK_MACHINE_SECRET_KEY: revocations are not followed (AuthService streams \
                 them to allowlisted machines only)"
            );
            None
        }
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("error: --api-url: {e}");
            return ExitCode::from(64);
        }
    };
    let tls = match args.tls.client_config() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let verifier = match DelegatedVerifier::new(DelegatedConfig {
        endpoints: args.auth_service.clone(),
        deadline: std::time::Duration::from_millis(args.deadline_ms),
        credentials,
        tls,
        ..DelegatedConfig::default()
    }) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: --auth-service: {e}");
            return ExitCode::from(64);
        }
    };
    // Sessions revoked at AuthService are refused here at once, cached verdicts included.
    let _revocations = args
        .machine_secret_key
        .is_some()
        .then(|| verifier.watch_revocations());
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --listen {}: {e}", args.listen);
            return ExitCode::from(64);
        }
    };
    eprintln!(
        "orders (delegated auth via {}) listening on {}",
        args.auth_service.join(", "),
        listener
            .local_addr()
            .map_or(args.listen.clone(), |a| a.to_string())
    );
    let layer = AuthLayer::delegated(verifier, orders::policy());
    match orders::serve(listener, layer, clerk_grpc_auth::server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
