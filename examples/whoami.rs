//! Calls a running AuthService with a token and prints the verified identity.
//!
//! Run `cargo run --release -- dev` in one terminal, copy the `export TOKEN=…` line it prints,
//! then:
//!
//! ```sh
//! cargo run --release --example whoami -- http://127.0.0.1:50051
//! ```

use clerk_grpc_auth::pb::{auth_service_client::AuthServiceClient, VerifyTokenRequest};
use tonic_types::StatusExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let token = std::env::var("TOKEN").map_err(|_| "set TOKEN to a Clerk session token")?;
    let mut client = AuthServiceClient::connect(addr).await?;
    match client
        .verify_token(VerifyTokenRequest {
            token,
            ..Default::default()
        })
        .await
    {
        Ok(resp) => {
            let id = resp.into_inner().identity.unwrap_or_default();
            println!("user      {}", id.user_id);
            println!("session   {}", id.session_id);
            if let Some(org) = id.organization {
                println!("org       {} ({}) as {}", org.id, org.slug, org.role);
                for p in org.permissions {
                    println!("          {p}");
                }
            }
        }
        Err(status) => {
            let reason = status
                .get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_default();
            eprintln!("{:?}: {} ({reason})", status.code(), status.message());
            std::process::exit(1);
        }
    }
    Ok(())
}
