//! `clerk-grpc-auth token`: mint a token from a running emulator.

use std::process::ExitCode;

use clerk_grpc_auth::emulator::{MachineTokenKind, MachineTokenSpec, OrgSpec, TokenSpec};

use super::args::TokenArgs;

/// Mints a token (a session token, or a machine token with `--m2m`, `--api-key`, `--oauth`)
/// from a running emulator and prints it alone.
pub async fn run(args: TokenArgs) -> ExitCode {
    if args.m2m || args.api_key || args.oauth {
        return machine_token(args).await;
    }
    let org = (args.org.is_some() || args.role.is_some() || !args.permissions.is_empty())
        .then_some(OrgSpec {
            id: args.org,
            slug: args.org_slug,
            role: args.role,
            permissions: args.permissions,
        });
    let spec = TokenSpec {
        user_id: args.user,
        session_id: args.session,
        org,
        expires_in: args.expires_in,
        v1: args.v1,
        azp: args.azp,
        session_status: args.pending.then(|| "pending".to_owned()),
        fva: args.fva,
        ..TokenSpec::default()
    };
    let url = format!(
        "{}/emulator/tokens",
        args.emulator_url.trim_end_matches('/')
    );
    print_field(&url, &spec, "jwt").await
}

async fn machine_token(args: TokenArgs) -> ExitCode {
    let kind = if args.m2m {
        MachineTokenKind::M2m
    } else if args.api_key {
        MachineTokenKind::ApiKey
    } else {
        MachineTokenKind::Oauth
    };
    let spec = MachineTokenSpec {
        kind,
        jwt: args.jwt,
        subject: match kind {
            MachineTokenKind::M2m => args.machine,
            MachineTokenKind::ApiKey => args.subject,
            MachineTokenKind::Oauth => args.user,
        },
        scopes: args.scopes,
        expires_in: args.expires_in,
        client_id: args.client_id,
        name: args.name,
        ..MachineTokenSpec::default()
    };
    let url = format!(
        "{}/emulator/machine_tokens",
        args.emulator_url.trim_end_matches('/')
    );
    print_field(&url, &spec, "token").await
}

/// POSTs `body` to the emulator and prints the string `field` of its answer.
async fn print_field(url: &str, body: &impl serde::Serialize, field: &str) -> ExitCode {
    let resp = reqwest::Client::new().post(url).json(body).send().await;
    let answer: serde_json::Value = match resp {
        Ok(r) if r.status().is_success() => match r.json().await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: the emulator at {url} answered something else than a token: {e}");
                return ExitCode::FAILURE;
            }
        },
        Ok(r) => {
            let status = r.status();
            let detail = r.text().await.unwrap_or_default();
            eprintln!("error: the emulator at {url} answered HTTP {status}: {detail}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: cannot reach the emulator at {url}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match answer.get(field).and_then(|j| j.as_str()) {
        Some(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("error: the emulator's answer has no {field}");
            ExitCode::FAILURE
        }
    }
}
