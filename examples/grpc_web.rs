//! The Orders service for browsers over gRPC-web, verifying in-process: tonic-web, the CORS
//! policy built from the layer's authorized parties, and a static page at `/` that calls
//! `ListOrders` with the `__session` cookie (hand-written gRPC-web framing, no build step).
//!
//! With `cargo run --release -- dev` running in another terminal (its emulator on
//! `127.0.0.1:8787`):
//!
//! ```sh
//! CLERK_JWKS_URL=http://127.0.0.1:8787/.well-known/jwks.json \
//!   cargo run --release --example grpc_web -- --listen 127.0.0.1:50063 \
//!   --accounts-url http://127.0.0.1:8787
//! # open http://127.0.0.1:50063/ → UNAUTHENTICATED; "Sign in" → the emulator's sign-in page →
//! # back with the __session cookie → the caller's user id.
//! ```
//!
//! The authorized parties (the `azp` allowlist, the origins a cookie-borne token may come
//! from, and the CORS allowlist — one list) are this server's own origin, every
//! `--authorized-party`, and `CLERK_AUTHORIZED_PARTIES`. Cookies are not isolated by port: the
//! emulator's cookie for `127.0.0.1` reaches this server on `127.0.0.1`. Open the page as
//! `http://127.0.0.1:…`, not `http://localhost:…` (another site: no cookie, and refused by
//! CORS — what `tests/browser.rs` checks). With a real Clerk instance, clerk-js on your page
//! sets the cookies instead of the emulator's sign-in page.

#[path = "common/orders.rs"]
mod orders;
#[path = "common/web.rs"]
mod web;

use std::process::ExitCode;

use clap::Parser;
use clerk_grpc_auth::{layer::AuthLayer, TokenVerifier};

/// The Orders example service for browsers (gRPC-web), verifying tokens in-process.
#[derive(Parser)]
struct Args {
    /// Address to listen on (the page and the gRPC-web endpoint).
    #[arg(long, default_value = "127.0.0.1:50063")]
    listen: String,
    /// Another origin allowed to call from a browser (`https://app.example.com`); repeatable.
    /// This server's own origin is always one.
    #[arg(long = "authorized-party")]
    authorized_parties: Vec<String>,
    /// Where the sign-in and sign-out pages are (the emulator's URL), linked from the page.
    #[arg(long)]
    accounts_url: Option<String>,
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
    let (verifier, keys) = match TokenVerifier::from_env() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
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
    let own = match web::own_origin(&listener) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parties: Vec<String> = std::iter::once(own.clone())
        .chain(args.authorized_parties)
        .chain(verifier.validation().authorized_parties.iter().cloned())
        .collect();
    let auth = AuthLayer::in_process(verifier, orders::policy()).authorized_parties(parties);
    eprintln!(
        "orders (gRPC-web, in-process auth) on {own}/ — browser origins allowed: {}",
        auth.authorized_origins().join(", ")
    );
    let result = web::serve(listener, auth, args.accounts_url, shutdown_signal()).await;
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
