//! The Orders service protected in-process: the verifier core and key store run inside this
//! server; no network call per request.
//!
//! With `cargo run --release -- dev` running in another terminal:
//!
//! ```sh
//! CLERK_JWKS_URL=http://127.0.0.1:8787/.well-known/jwks.json \
//!   cargo run --release --example in_process -- --listen 127.0.0.1:50061
//! grpcurl -plaintext 127.0.0.1:50061 examples.orders.v1.Orders/Ping
//! grpcurl -plaintext -H "authorization: Bearer $TOKEN" 127.0.0.1:50061 examples.orders.v1.Orders/ListOrders
//! ```
//!
//! Configured by the same `CLERK_*` environment as `clerk-grpc-auth serve` (`CLERK_SECRET_KEY`,
//! `CLERK_JWT_KEY`, `CLERK_JWKS_URL`, `CLERK_AUTHORIZED_PARTIES`, …), read by
//! `TokenVerifier::from_env` — only the verifier and the layer, no server module.

#[path = "common/orders.rs"]
mod orders;
#[path = "common/tls.rs"]
mod tls;

use std::process::ExitCode;

use clap::Parser;
use clerk_grpc_auth::{layer::AuthLayer, TokenVerifier};

/// The Orders example service, verifying tokens in-process.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: String,
    /// An AuthService to follow for session revocations (webhooks it receives), e.g.
    /// `http://127.0.0.1:50051`. Optional: verification itself stays in-process. AuthService
    /// streams revocations to allowlisted machines only: this service presents an M2M token
    /// made with `CLERK_MACHINE_SECRET_KEY` (at `CLERK_API_URL`).
    #[arg(long, requires = "machine_secret_key")]
    revocations_from: Option<String>,
    /// TLS to `--revocations-from` (an `https://` URL).
    #[command(flatten)]
    tls: tls::AuthServiceTls,
    /// This service's machine secret key (`ak_…`), for `--revocations-from`.
    #[arg(long, env = "CLERK_MACHINE_SECRET_KEY", hide_env_values = true)]
    machine_secret_key: Option<String>,
    /// Clerk Backend API URL (where the M2M token is created).
    #[arg(long, env = "CLERK_API_URL", default_value = "https://api.clerk.com")]
    api_url: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The verifier from the CLERK_* environment; its keys load in the background for as long
    // as `keys` (the refresher's guard) is kept.
    let (verifier, keys) = match TokenVerifier::from_env() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let _revocations = match follow_revocations(&args, &verifier) {
        Ok(feed) => feed,
        Err(e) => {
            eprintln!("error: --revocations-from: {e}");
            return ExitCode::from(64);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --listen {}: {e}", args.listen);
            return ExitCode::from(64);
        }
    };
    eprintln!(
        "orders (in-process auth) listening on {}",
        listener
            .local_addr()
            .map_or(args.listen.clone(), |a| a.to_string())
    );
    let layer = AuthLayer::in_process(verifier, orders::policy());
    let result = orders::serve(listener, layer, shutdown_signal()).await;
    keys.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

/// Follows `--revocations-from` as this service's machine (an M2M token from its machine
/// secret key), when given.
fn follow_revocations(
    args: &Args,
    verifier: &clerk_grpc_auth::TokenVerifier,
) -> Result<Option<clerk_grpc_auth::layer::RevocationFeed>, Box<dyn std::error::Error>> {
    use clerk_grpc_auth::{
        credentials::m2m::{M2mTokenSource, M2mTokenSourceConfig},
        secret::Secret,
    };
    let tls = args.tls.client_config()?;
    let (Some(url), Some(key)) = (&args.revocations_from, &args.machine_secret_key) else {
        if tls.is_some() {
            return Err("--tls-ca and the other --tls flags are for --revocations-from".into());
        }
        return Ok(None);
    };
    if tls.is_some() != url.starts_with("https://") {
        return Err("use an https:// URL with --tls-ca, and --tls-ca with an https:// URL".into());
    }
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect_lazy();
    let source = M2mTokenSource::new(
        M2mTokenSourceConfig::new(args.api_url.parse()?, Secret::new(key)),
        &clerk_grpc_auth::clerk::api::ClerkApi::new()?,
    );
    Ok(Some(clerk_grpc_auth::layer::watch_revocations_with(
        channel,
        verifier.revocations().clone(),
        source,
    )))
}
