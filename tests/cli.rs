//! The binary as users run it: startup validation, `token`, logs, SIGTERM.

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
};

use clerk_grpc_auth::{
    emulator::{Emulator, TokenSpec},
    pb::{auth_service_client::AuthServiceClient, TokenType, VerifyTokenRequest},
};

const BIN: &str = env!("CARGO_BIN_EXE_clerk-grpc-auth");

/// Runs `serve` with only `env` set (plus PATH) and returns (exit code, stderr).
fn serve_with_env(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run the binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_with_one_line_naming_the_variable() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case<'_>] = &[
        (&[], "CLERK_SECRET_KEY", "no key source"),
        (
            &[(
                "CLERK_SECRET_KEY",
                "pk_test_Y2xlcmsuaW5zcGlyZWQucHVtYS03NC5sY2wuZGV2JA",
            )],
            "CLERK_SECRET_KEY",
            "publishable key",
        ),
        (
            &[(
                "CLERK_JWT_KEY",
                "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----",
            )],
            "CLERK_JWT_KEY",
            "RSA public key",
        ),
        (
            &[
                ("CLERK_SECRET_KEY", "sk_test_x"),
                ("CLERK_API_URL", "not a url"),
            ],
            "CLERK_API_URL",
            "not a valid URL",
        ),
        (
            &[("CLERK_JWKS_URL", "ftp://example.com/jwks")],
            "CLERK_JWKS_URL",
            "http(s)",
        ),
        (
            &[
                ("CLERK_SECRET_KEY", "sk_test_x"),
                ("CLERK_CLOCK_SKEW_MS", "five"),
            ],
            "CLERK_CLOCK_SKEW_MS",
            "whole number",
        ),
    ];
    for (env, var, what) in cases {
        let (code, stderr) = serve_with_env(env);
        assert_eq!(code, Some(64), "{env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line for {env:?}: {stderr}");
        assert!(
            lines[0].starts_with(&format!("error: {var}: ")),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(what), "{}", lines[0]);
        assert!(
            !lines[0].contains("Y2xlcmsu"),
            "the key is echoed: {}",
            lines[0]
        );
    }
}

#[tokio::test]
async fn token_command_prints_only_a_token_that_verifies() {
    let clerk = Emulator::start_local().await.unwrap();
    let url = clerk.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "token",
                "--emulator-url",
                &url,
                "--org",
                "org_1",
                "--role",
                "admin",
                "--permission",
                "org:invoices:read",
                "--expires-in",
                "120",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.trim_end_matches('\n');
    assert_eq!(token.lines().count(), 1);
    assert_eq!(token.split('.').count(), 3);
    // Verify with a server wired to the same emulator.
    let config = common::config_for(&clerk);
    let h = common::Harness::start_server(clerk, config).await;
    h.wait_health(tonic_health::pb::health_check_response::ServingStatus::Serving)
        .await;
    let id = h.verify(token).await.expect("the printed token verifies");
    let org = id.organization.unwrap();
    assert_eq!((org.id.as_str(), org.role.as_str()), ("org_1", "org:admin"));
    assert_eq!(org.permissions, ["org:invoices:read"]);
    let exp = id.expires_at.unwrap().seconds - id.issued_at.unwrap().seconds;
    assert_eq!(exp, 120);
}

/// Starts `serve` against `clerk`, returns the child and the address it logged.
fn spawn_serve(
    clerk: &Emulator,
    extra: &[(&str, &str)],
) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLERK_SECRET_KEY", clerk.secret_key())
        .env("CLERK_API_URL", clerk.url())
        .env("RUST_LOG", "debug")
        .envs(extra.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let addr = loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("server exited before listening: {seen}");
        }
        seen.push_str(&line);
        if line.contains("AuthService listening") {
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            break v["addr"].as_str().unwrap().to_owned();
        }
    };
    let rest = std::thread::spawn(move || {
        let mut s = seen;
        reader.read_to_string(&mut s).unwrap();
        s
    });
    (child, addr, rest)
}

#[tokio::test]
async fn logs_never_contain_tokens_or_secrets_and_sigterm_drains() {
    let clerk = Emulator::start_local().await.unwrap();
    let (child, addr, stderr) = spawn_serve(&clerk, &[]);
    let mut client = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let good = clerk.mint(&TokenSpec::default());
    let expired = clerk.mint(&TokenSpec {
        expires_in: Some(-60),
        ..Default::default()
    });
    let garbage = "not-a-jwt-but-secret-looking-0123456789".to_owned();
    let mut tampered = good.clone();
    tampered.push('x');
    // Keys may still be loading: wait for the first success (the health of the process is
    // checked by the other suites; here the logs are the point).
    loop {
        match client
            .verify_token(VerifyTokenRequest {
                token: good.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                clerk.wait_jwks_requests(1).await;
                tokio::task::yield_now().await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    for t in [&expired, &garbage, &tampered, &good] {
        let _ = client
            .verify_token(VerifyTokenRequest {
                token: t.clone(),
                ..Default::default()
            })
            .await;
    }
    // A 2 MB request field (no token): refused, and its audit line stays short.
    let huge = format!("user_{}", "x".repeat(2_000_000));
    let status = client
        .get_user(clerk_grpc_auth::pb::GetUserRequest { user_id: huge })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // SIGTERM: graceful shutdown, exit 0.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let logs = stderr.join().unwrap();
    assert!(logs.contains("shutdown signal received"), "{logs}");
    for secret in [
        good.as_str(),
        expired.as_str(),
        garbage.as_str(),
        clerk.secret_key(),
    ] {
        assert!(!logs.contains(secret), "a token or secret reached the logs");
    }
    for t in [&good, &expired] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!logs.contains(sig), "a signature reached the logs");
        let payload = t.split('.').nth(1).unwrap();
        assert!(!logs.contains(payload), "a payload reached the logs");
    }
    // The rejection is logged with its reason and the token's fingerprint.
    assert!(logs.contains("TOKEN_EXPIRED"), "{logs}");
    assert!(
        logs.contains(&clerk_grpc_auth::secret::token_fingerprint(&expired)),
        "{logs}"
    );
    // One audit line per decision: the expired token's, with its verdict and reason.
    let audit: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("clerk_grpc_auth::audit"))
        .collect();
    assert!(audit.len() >= 5, "{logs}");
    let fp = clerk_grpc_auth::secret::token_fingerprint(&expired);
    let line = audit
        .iter()
        .find(|l| l.contains(&fp))
        .unwrap_or_else(|| panic!("no audit line for the expired token: {logs}"));
    assert!(
        line.contains("unauthenticated") && line.contains("TOKEN_EXPIRED"),
        "{line}"
    );
    // Bounded lines: the 2 MB user_id was cut, and says by how much.
    let longest = logs.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    let get_user = audit
        .iter()
        .find(|l| l.contains("GetUser"))
        .unwrap_or_else(|| panic!("no audit line for GetUser: {logs}"));
    assert!(get_user.contains("(+1999749 bytes)"), "{get_user}");
}

#[tokio::test]
async fn token_command_mints_machine_tokens_that_verify() {
    let clerk = Emulator::start_local().await.unwrap();
    let url = clerk.url();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || Command::new(BIN).args(args).output().unwrap())
    };
    let cases: [(&[&str], &str, i32); 4] = [
        (&["--m2m"], "mt_", TokenType::M2mToken as i32),
        (&["--m2m", "--jwt"], "eyJ", TokenType::M2mToken as i32),
        (
            &["--api-key", "--subject", "org_7", "--scope", "read"],
            "ak_",
            TokenType::ApiKey as i32,
        ),
        (
            &["--oauth", "--user", "user_9"],
            "oat_",
            TokenType::OauthToken as i32,
        ),
    ];
    let mut minted = Vec::new();
    for (extra, prefix, ty) in cases {
        let mut args = vec!["token".to_owned(), "--emulator-url".to_owned(), url.clone()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let out = run(args).await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim_end().to_owned();
        assert!(token.starts_with(prefix), "{extra:?}: {token}");
        assert_eq!(token.lines().count(), 1);
        minted.push((token, ty));
    }
    // Verify with a server wired to the same emulator (Backend API for opaque tokens).
    let mut config = common::config_for(&clerk);
    config.machine = Some(clerk_grpc_auth::clerk::machines::MachineConfig::new(
        clerk.url().parse().unwrap(),
        Some(clerk_grpc_auth::secret::Secret::new(clerk.secret_key())),
        None,
    ));
    let h = common::Harness::start_server(clerk, config).await;
    h.wait_health(tonic_health::pb::health_check_response::ServingStatus::Serving)
        .await;
    for (token, ty) in minted {
        let id = h
            .verify_req(VerifyTokenRequest {
                token: token.clone(),
                accepted_token_types: vec![ty],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{token}: {e:?}"));
        assert_eq!(id.token_type, ty);
    }
}

/// A child process killed (and reaped) if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Seconds since the epoch.
fn epoch_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[cfg(unix)]
#[test]
fn dev_tls_pki_is_private_short_lived_and_removed_on_exit() {
    use std::os::unix::fs::PermissionsExt;

    // A temp directory of the test's own, so that what `dev` leaves behind can be seen.
    let tmp = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args([
                "dev",
                "--tls",
                "--listen",
                "127.0.0.1:0",
                "--emulator-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    // Ready once the instructions are printed; they name the PKI directory.
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut seen = String::new();
    let mut dir = None;
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            panic!("dev exited before it was ready: {seen}");
        }
        seen.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("export CERTS=") {
            dir = Some(std::path::PathBuf::from(rest));
        }
        // The walk-through's last line (`src/cmd/walkthrough.rs`).
        if line.trim() == "# dev is running. Ctrl-C in its terminal stops it." {
            break;
        }
    }
    let dir = dir.unwrap_or_else(|| panic!("no PKI directory printed: {seen}"));

    // A fresh directory under the temp directory, its name not derived from the pid.
    assert_eq!(dir.parent(), Some(tmp.path()), "{}", dir.display());
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("clerk-grpc-auth-dev-pki-"), "{name}");
    assert_ne!(name, format!("clerk-grpc-auth-dev-pki-{pid}"));
    assert!(!name.ends_with(&pid), "{name}");
    let meta = std::fs::symlink_metadata(&dir).unwrap();
    assert!(meta.is_dir(), "not a plain directory");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);

    // Owner-only files, certificates valid for about a day (starting a little in the past).
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["ca.pem", "client-key.pem", "client.pem"]);
    let now = epoch_secs();
    for f in &files {
        let path = dir.join(f);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file(), "{f}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
        if f.ends_with("key.pem") {
            continue;
        }
        let pem = std::fs::read(&path).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let validity = cert.validity();
        let (from, until) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        assert!(
            from <= now && from >= now - 3600,
            "{f}: notBefore {from}, now {now}"
        );
        assert!(
            until > now + 3600 && until <= now + 86_400 + 60,
            "{f}: notAfter {until}, now {now}"
        );
    }

    // SIGTERM: dev stops and takes its PKI with it.
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(!dir.exists(), "the PKI directory outlived dev");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
