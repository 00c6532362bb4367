//! The pattern for your own tests: a Clerk emulator and the AuthService in-process on
//! 127.0.0.1:0, a token minted with an organization role, and one verification. No network,
//! no Clerk account.
//!
//! ```sh
//! cargo run --release --example offline_ci
//! ```

use clerk_grpc_auth::{
    emulator::{Emulator, OrgSpec, TokenSpec},
    pb::{auth_service_client::AuthServiceClient, VerifyTokenRequest},
    secret::Secret,
    server::{AuthServer, ServerConfig},
    verify::jwks::KeySource,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let clerk = Emulator::start_local().await?;
    let config = ServerConfig::new(KeySource::Remote {
        url: format!("{}/v1/jwks", clerk.url()).parse()?,
        bearer: Some(Secret::new(clerk.secret_key())),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = AuthServer::build(config)?;
    let keys = server.verifier().keys().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    keys.ready().await;

    let token = clerk.mint(&TokenSpec {
        org: Some(OrgSpec {
            role: Some("admin".into()),
            permissions: vec!["org:invoices:read".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut client = AuthServiceClient::connect(format!("http://{addr}")).await?;
    let identity = client
        .verify_token(VerifyTokenRequest {
            token,
            ..Default::default()
        })
        .await?
        .into_inner()
        .identity
        .ok_or("no identity")?;
    let org = identity.organization.ok_or("no organization")?;
    println!(
        "{} is {} of {} with {:?}",
        identity.user_id, org.role, org.id, org.permissions
    );

    let _ = stop.send(());
    running.await??;
    clerk.shutdown().await;
    Ok(())
}
