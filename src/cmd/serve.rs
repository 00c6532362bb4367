//! `clerk-grpc-auth serve`: the AuthService, configured by flags or the environment.

use std::{net::SocketAddr, process::ExitCode};

use clerk_grpc_auth::server::{self, config::ServeConfig, telemetry, AuthServer};
use tokio::net::TcpListener;

use super::{args::ServeArgs, EXIT_CONFIG};

/// Prints `error: {e}` and gives the configuration-error exit status.
fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// Binds `addr`, or says which variable named it.
async fn bind(var: &str, addr: SocketAddr) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| config_error(format!("{var}: cannot listen on {addr}: {e}")))
}

/// Runs the AuthService until SIGTERM/SIGINT.
pub async fn run(args: ServeArgs) -> ExitCode {
    // First: a SIGTERM from here on stops the server gracefully, even during startup.
    let shutdown = server::shutdown_signal();
    // The flags' values (clap has merged the environment in) by variable name.
    let config = match ServeConfig::from_lookup(|var| args.get(var)) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let _log = telemetry::init(config.log_format);
    let (addr, http, metrics) = (config.listen, config.http_listen, config.metrics_listen);
    let config = match config.load() {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let listener = match bind("CLERK_AUTH_LISTEN", addr).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let http = match http {
        None => None,
        Some(a) => match bind("CLERK_AUTH_HTTP_LISTEN", a).await {
            Ok(l) => Some(l),
            Err(code) => return code,
        },
    };
    let metrics = match metrics {
        None => None,
        Some(a) => match bind("CLERK_AUTH_METRICS_LISTEN", a).await {
            Ok(l) => Some(l),
            Err(code) => return code,
        },
    };
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "AuthService listening");
    if let Some(h) = http.as_ref().and_then(|h| h.local_addr().ok()) {
        tracing::info!(addr = %h, "HTTP port listening");
    }
    if let Some(m) = metrics.as_ref().and_then(|m| m.local_addr().ok()) {
        tracing::info!(addr = %m, "metrics port listening");
    }
    let server = match AuthServer::build(config) {
        Ok(s) => s,
        Err(e) => return config_error(e),
    };
    // Connects Redis, when configured.
    let events = match server.events().await {
        Ok(e) => e,
        Err(e) => return config_error(e),
    };
    let listeners = server::Listeners {
        grpc: listener,
        http,
        metrics,
    };
    match server.serve_on(listeners, events, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}
