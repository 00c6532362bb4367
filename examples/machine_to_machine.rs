//! Service A calls service B as a machine, with a Clerk M2M token.
//!
//! * **B** is the Orders service; its `ListOrders` accepts M2M tokens that list B's machine id
//!   in their scopes (Clerk's M2M semantics), verified by a delegated layer that asks an
//!   AuthService (which holds the Clerk secret key for opaque tokens).
//! * **A** creates its M2M token through Clerk's Backend API with *its* machine secret key
//!   (cached, refreshed before expiry) and sends it on every call through the client
//!   credentials layer.
//!
//! With `cargo run --release -- dev` running (it creates machines A and B and prints this line
//! with their ids and A's key filled in):
//!
//! ```sh
//! CLERK_API_URL=http://127.0.0.1:8787 CLERK_MACHINE_SECRET_KEY=ak_… \
//!   cargo run --release --example machine_to_machine -- \
//!   --auth-service http://127.0.0.1:50051 --machine-id mch_…B
//! ```
//!
//! Plaintext is for AuthService on loopback; elsewhere use `--auth-service https://…` with
//! `--tls-ca` (and `--tls-cert` / `--tls-key` for mTLS), as in the `delegated` example.

#[path = "common/orders.rs"]
mod orders;
#[path = "common/tls.rs"]
mod tls;

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use clerk_grpc_auth::{
    authz::policy::{Policy, Rule},
    clerk::api::ClerkApi,
    credentials::{
        m2m::{M2mTokenSource, M2mTokenSourceConfig},
        CredentialsLayer,
    },
    layer::{AuthLayer, DelegatedConfig, DelegatedVerifier},
    pb::TokenType,
    secret::Secret,
};
use orders::pb::{orders_client::OrdersClient, ListOrdersRequest};
use tonic_types::StatusExt;

/// Service A calling service B with an M2M token.
#[derive(Parser)]
struct Args {
    /// Clerk Backend API URL (where A creates its M2M tokens).
    #[arg(long, env = "CLERK_API_URL", default_value = "https://api.clerk.com")]
    api_url: String,
    /// A's machine secret key (`ak_…`).
    #[arg(long, env = "CLERK_MACHINE_SECRET_KEY", hide_env_values = true)]
    machine_secret_key: String,
    /// B's machine id (`mch_…`): A's tokens must list it.
    #[arg(long)]
    machine_id: String,
    /// The AuthService B delegates verification to: `https://…` with `--tls-ca`, or
    /// `http://127.0.0.1:50051` on loopback.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    auth_service: String,
    #[command(flatten)]
    tls: tls::AuthServiceTls,
    /// Where B listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// How many calls A makes.
    #[arg(long, default_value_t = 3)]
    calls: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // --- Service B: Orders, accepting M2M tokens addressed to B.
    let policy = Policy::authenticated().machine_id(&args.machine_id).method(
        "/examples.orders.v1.Orders/ListOrders",
        Rule::authenticated().token_types([TokenType::M2mToken, TokenType::SessionToken]),
    );
    let verifier = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![args.auth_service.clone()],
        tls: args.tls.client_config()?,
        ..DelegatedConfig::default()
    })?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let b_addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let b = tokio::spawn(orders::serve(
        listener,
        AuthLayer::delegated(verifier, policy),
        async move {
            let _ = stopped.await;
        },
    ));
    println!("service B (machine {}) on {b_addr}", args.machine_id);

    // --- Service A: a client that sends its M2M token on every call.
    let source = M2mTokenSource::new(
        M2mTokenSourceConfig::new(
            args.api_url.parse()?,
            Secret::new(args.machine_secret_key.clone()),
        ),
        &ClerkApi::new()?,
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{b_addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let authed = tower::ServiceBuilder::new()
        .layer(CredentialsLayer::new(source.clone()))
        .service(channel.clone());
    let mut client = OrdersClient::new(authed);
    for i in 1..=args.calls {
        match client.list_orders(ListOrdersRequest {}).await {
            Ok(r) => {
                let caller = r.into_inner().caller.unwrap_or_default();
                println!(
                    "A → B call {i}: OK, B saw {} from machine {}",
                    caller.token_type, caller.machine_id
                );
            }
            Err(s) => {
                let reason = s
                    .get_details_error_info()
                    .map(|i| i.reason)
                    .unwrap_or_default();
                println!("A → B call {i}: {:?} {reason}: {}", s.code(), s.message());
            }
        }
    }
    println!(
        "M2M tokens A created: {} (reused across calls)",
        source.created()
    );

    // Without credentials, B refuses.
    let mut anonymous = OrdersClient::new(channel);
    if let Err(s) = anonymous.list_orders(ListOrdersRequest {}).await {
        let reason = s
            .get_details_error_info()
            .map(|i| i.reason)
            .unwrap_or_default();
        println!("anonymous → B: {:?} {reason}", s.code());
    }
    let _ = stop.send(());
    b.await??;
    Ok(())
}
