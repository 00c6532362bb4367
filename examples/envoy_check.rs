//! Sends AuthService a `Check` request built the way Envoy's ext_authz filter builds it, and
//! prints the answer: what Envoy would forward (identity headers set, spoofed ones removed) or
//! the denial it would return.
//!
//! With `cargo run --release -- dev` running and `$TOKEN` exported from its output:
//!
//! ```sh
//! cargo run --release --example envoy_check -- --path /orders                 # allowed, x-clerk-* headers
//! cargo run --release --example envoy_check -- --path /orders --no-token      # denied 401
//! curl -s 127.0.0.1:9090/metrics | grep 'method="Check"'            # the two decisions
//! ```

use std::collections::HashMap;

use clap::Parser;
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request as AttrRequest},
    authorization_client::AuthorizationClient,
    check_response::HttpResponse,
    AttributeContext, CheckRequest,
};

/// An Envoy-shaped `Check`.
#[derive(Parser)]
struct Args {
    /// AuthService.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    auth_service: String,
    /// HTTP method of the checked request.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Path of the checked request.
    #[arg(long, default_value = "/")]
    path: String,
    /// Host of the checked request.
    #[arg(long, default_value = "api.example.com")]
    host: String,
    /// Send no token (otherwise `authorization: Bearer $TOKEN`).
    #[arg(long)]
    no_token: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut headers = HashMap::from([
        (":method".to_owned(), args.method.clone()),
        (":path".to_owned(), args.path.clone()),
        (":authority".to_owned(), args.host.clone()),
        // A client trying to pass as someone else: Envoy must not forward this.
        ("x-clerk-user-id".to_owned(), "user_spoofed".to_owned()),
    ]);
    if !args.no_token {
        let token =
            std::env::var("TOKEN").map_err(|_| "export TOKEN=… (from `dev`) or pass --no-token")?;
        headers.insert("authorization".into(), format!("Bearer {token}"));
    }
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "example-1".into(),
                    method: args.method,
                    path: args.path,
                    host: args.host,
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let mut client = AuthorizationClient::connect(args.auth_service).await?;
    let answer = client.check(request).await?.into_inner();
    let code = answer.status.map(|s| s.code).unwrap_or(-1);
    match answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            println!("ALLOWED (status {code}); Envoy forwards the request with:");
            for h in ok.headers.iter().filter_map(|h| h.header.as_ref()) {
                println!("  set    {}: {}", h.key, h.value);
            }
            for h in &ok.headers_to_remove {
                println!("  remove {h}");
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            let http = d.status.map(|s| s.code).unwrap_or_default();
            println!("DENIED (status {code}); Envoy answers HTTP {http}");
            for h in d.headers.iter().filter_map(|h| h.header.as_ref()) {
                println!("  {}: {}", h.key, h.value);
            }
            println!("  body: {}", d.body);
        }
        Some(other) => println!("status {code}: {other:?}"),
        None => println!("no HTTP response (status {code})"),
    }
    Ok(())
}
