//! `clerk-grpc-auth`: the AuthService server, the Clerk emulator, a token minter, and `dev`
//! (emulator + AuthService wired together).
//!
//! This file parses the command line and dispatches; each subcommand lives in [`cmd`]. The
//! library (`clerk_grpc_auth`) knows nothing of the command line: `serve`'s flags are fed to
//! its configuration ([`clerk_grpc_auth::server::config`]) by variable name.

mod cmd;

use std::process::ExitCode;

use clap::Parser;

use crate::cmd::args::{Cli, Command};

/// The server's allocator. A `Check` or `VerifyToken` call allocates and frees some hundred
/// small buffers (HTTP/2 frames, protobuf strings, the audit line); mimalloc's per-thread
/// free lists serve them at a fraction of glibc malloc's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => cmd::serve::run(*args).await,
            Command::Emulator(args) => cmd::emulator::run(args).await,
            Command::Token(args) => cmd::token::run(*args).await,
            Command::Dev(args) => cmd::dev::run(*args).await,
        }
    })
}
