//! `clerk-grpc-auth emulator`: the Clerk emulator on its own.

use std::process::ExitCode;

use clerk_grpc_auth::{
    emulator::{Emulator, EmulatorConfig},
    server::{
        self,
        telemetry::{self, LogFormat},
    },
};
use tokio::net::TcpListener;

use super::{args::EmulatorArgs, EXIT_CONFIG};

/// Runs the emulator until SIGTERM/SIGINT, after printing how to point a server at it.
pub async fn run(EmulatorArgs { listen, secret_key }: EmulatorArgs) -> ExitCode {
    let _log = telemetry::init(LogFormat::Text);
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --listen: cannot listen on {listen}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match secret_key {
        Some(secret_key) => EmulatorConfig {
            secret_key,
            ..EmulatorConfig::default()
        },
        None => EmulatorConfig::default(),
    };
    let emu = match Emulator::start(config, listener).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("Clerk emulator on {}", emu.url());
    println!("  CLERK_API_URL={}", emu.url());
    println!("  CLERK_SECRET_KEY={}", emu.secret_key());
    println!("  CLERK_JWKS_URL={}/.well-known/jwks.json", emu.url());
    server::shutdown_signal().await;
    emu.shutdown().await;
    ExitCode::SUCCESS
}
