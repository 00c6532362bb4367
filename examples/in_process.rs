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
//! `CLERK_JWT_KEY`, `CLERK_JWKS_URL`, `CLERK_AUTHORIZED_PARTIES`, …).

#[path = "common/orders.rs"]
mod orders;

use std::process::ExitCode;

use clap::Parser;
use clerk_grpc_auth::{config::ServeArgs, layer::AuthLayer, server::Server, telemetry};

/// The Orders example service, verifying tokens in-process.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: String,
    /// An AuthService to follow for session revocations (webhooks it receives), e.g.
    /// `http://127.0.0.1:50051`. Optional: verification itself stays in-process.
    #[arg(long)]
    revocations_from: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let settings = ServeArgs::from_env();
    let _log = telemetry::init(settings.log_format);
    let (config, _) = match settings.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let verifier = match Server::build(config) {
        Ok(s) => s.verifier().clone(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let refresher = verifier.keys().spawn_refresher();
    let _revocations =
        match args.revocations_from.as_deref().map(|u| {
            tonic::transport::Endpoint::from_shared(u.to_owned()).map(|e| e.connect_lazy())
        }) {
            None => None,
            Some(Ok(channel)) => Some(clerk_grpc_auth::layer::watch_revocations(
                channel,
                verifier.revocations().clone(),
            )),
            Some(Err(e)) => {
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
    let result = orders::serve(listener, layer, clerk_grpc_auth::server::shutdown_signal()).await;
    refresher.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
