//! `clerk-grpc-auth dev`: the emulator and the AuthService wired together, a throw-away PKI
//! for `--tls`, and the quickstart printed for the user.

use std::process::ExitCode;

use clerk_grpc_auth::{
    clerk::{api::BackendApiConfig, directory::DirectoryConfig, machines::MachineConfig},
    emulator::{Emulator, EmulatorConfig, MembershipSpec, OrgSpec, TokenSpec, UserSpec},
    secret::Secret,
    server::{
        self, config, telemetry, AuthServer, IdentityConfig, ServerConfig, TlsConfig, WebhookConfig,
    },
    verify::jwks::KeySource,
};
use tokio::net::TcpListener;

use super::{args::DevArgs, walkthrough::Walkthrough, EXIT_CONFIG};

/// The dev token's organization ("acme").
const ORG_ID: &str = "org_2devACMEacmeACMEacmeACME";

/// Another organization ("globex"), whose admin may not read acme.
const OTHER_ORG_ID: &str = "org_2devGLOBEXglobexGLOBEXgl";

/// The dev user, admin of acme.
const USER_ID: &str = "user_2devDEVdevDEVdevDEVdevDEV";

/// The dev token's session.
const SESSION_ID: &str = "sess_2devDEVdevDEVdevDEVdevDEV";

/// The dev user's other signed-in device (its phone).
const PHONE_SESSION_ID: &str = "sess_2devPHONEphonePHONEphone";

/// Grace, acme's billing member (no `org:sys_memberships:read`).
const GRACE_ID: &str = "user_2otherOTHERotherOTHERother";

/// Linus, admin of globex.
const LINUS_ID: &str = "user_2devLINUSlinusLINUSlinus";

/// The SPIFFE ID of `dev --tls`'s client certificate.
pub const DEV_SPIFFE_ID: &str = "spiffe://dev.local/ns/default/sa/dev-client";

/// How long `dev --tls`'s certificates are valid: a day of development, no longer.
const DEV_PKI_VALIDITY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// How far back they start, for a clock (this machine's or a client's) a little behind.
const DEV_PKI_BACKDATE: std::time::Duration = std::time::Duration::from_secs(300);

/// The throw-away PKI of `dev --tls`: a fresh private directory (0700, random name, removed
/// when this is dropped) holding `ca.pem`, `client.pem` and `client-key.pem` (0600 each), and
/// the server's TLS settings (its key stays in memory).
struct DevPki {
    dir: tempfile::TempDir,
    tls: TlsConfig,
}

/// Makes the PKI: a CA, a server certificate (`localhost`, `127.0.0.1`) and a client
/// certificate (SPIFFE ID [`DEV_SPIFFE_ID`]), valid from [`DEV_PKI_BACKDATE`] ago for
/// [`DEV_PKI_VALIDITY`].
///
/// The directory is made under the system temp directory by `tempfile` with an unpredictable
/// name (`mkdir` fails rather than reuse an existing path, and is retried with another name),
/// so no other local user can have planted it — or a symlink in its place — in advance; the
/// files are created exclusively ([`write_private`]).
fn dev_pki() -> Result<DevPki, Box<dyn std::error::Error>> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let mut dir = tempfile::Builder::new();
    dir.prefix("clerk-grpc-auth-dev-pki-").rand_bytes(16);
    #[cfg(unix)]
    let owner_only = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(0o700)
    };
    #[cfg(unix)]
    dir.permissions(owner_only);
    let dir = dir.tempdir()?;
    let now = std::time::SystemTime::now();
    let params = || -> Result<CertificateParams, rcgen::Error> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.not_before = (now - DEV_PKI_BACKDATE).into();
        p.not_after = (now + DEV_PKI_VALIDITY).into();
        Ok(p)
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = params()?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |sans: Vec<SanType>| -> Result<(String, String), Box<dyn std::error::Error>> {
        let key = KeyPair::generate()?;
        let mut p = params()?;
        p.subject_alt_names = sans;
        Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    };
    let server = leaf(vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    ])?;
    let client = leaf(vec![SanType::URI(DEV_SPIFFE_ID.try_into()?)])?;
    write_private(&dir.path().join("ca.pem"), ca_cert.pem().as_bytes())?;
    write_private(&dir.path().join("client.pem"), client.0.as_bytes())?;
    write_private(&dir.path().join("client-key.pem"), client.1.as_bytes())?;
    Ok(DevPki {
        dir,
        tls: TlsConfig {
            cert_pem: server.0.into_bytes(),
            key_pem: server.1.into_bytes(),
            client_ca_pem: Some(ca_cert.pem().into_bytes()),
            client_auth_optional: false,
        },
    })
}

/// Writes `contents` to a new file that only its owner can read (0600). Refuses any existing
/// path, a symlink included: `O_CREAT | O_EXCL` (`create_new`) never follows one, so a link
/// planted by someone else cannot redirect the write.
fn write_private(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
    })?;
    file.write_all(contents)
}

/// Runs the emulator and the AuthService wired together, prints a ready token and how to
/// use it, until SIGTERM/SIGINT.
pub async fn run(args: DevArgs) -> ExitCode {
    // First: a SIGTERM from here on stops `dev` gracefully (and removes its PKI).
    let shutdown = server::shutdown_signal();
    let DevArgs {
        listen,
        emulator_listen,
        http_listen,
        metrics_listen,
        tls,
        verdict_cache_capacity,
        orders_in_process,
        orders_delegated,
        log_format,
    } = args;
    // `--verdict-cache-capacity` (or its variable) by the library's rule; the rest of the
    // verifier's settings are the defaults.
    let verifier = match config::verifier_config(|var| {
        (var == "CLERK_AUTH_VERDICT_CACHE_CAPACITY")
            .then(|| verdict_cache_capacity.clone())
            .flatten()
    }) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _log = telemetry::init(log_format);
    let (emu_listener, listener, http_listener, metrics_listener) = match (
        TcpListener::bind(&emulator_listen).await,
        TcpListener::bind(&listen).await,
        TcpListener::bind(&http_listen).await,
        TcpListener::bind(&metrics_listen).await,
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
        (Err(e), _, _, _) => {
            eprintln!("error: --emulator-listen: cannot listen on {emulator_listen}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        (_, Err(e), _, _) => {
            eprintln!("error: --listen: cannot listen on {listen}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        (_, _, Err(e), _) => {
            eprintln!("error: --http-listen: cannot listen on {http_listen}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        (_, _, _, Err(e)) => {
            eprintln!("error: --metrics-listen: cannot listen on {metrics_listen}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let emu = match Emulator::start(EmulatorConfig::default(), emu_listener).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let jwks_url = match format!("{}/v1/jwks", emu.url()).parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: emulator URL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = ServerConfig::new(KeySource::Remote {
        url: jwks_url,
        bearer: Some(Secret::new(emu.secret_key())),
    });
    config.verifier = verifier;
    let api_url: url::Url = match emu.url().parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: emulator URL: {e}");
            return ExitCode::FAILURE;
        }
    };
    config.machine = Some(MachineConfig::new(
        api_url.clone(),
        Some(Secret::new(emu.secret_key())),
        None,
    ));
    // Two machines for the machine-to-machine example: A may call B. A may also read any
    // user and revoke sessions: it is on the identity-query allowlist and its tokens are
    // scoped to AuthService's own machine (a token of B's, or one A made only for B, is not).
    let service_a = emu.create_machine("service-a");
    let service_b = emu.create_machine("service-b");
    let auth_service = emu.create_machine("auth-service");
    emu.allow(&service_a.id, &service_b.id);
    emu.allow(&service_a.id, &auth_service.id);
    config.identity = Some(IdentityConfig {
        backend: BackendApiConfig::new(api_url, Secret::new(emu.secret_key())),
        directory: DirectoryConfig::default(),
    });
    // HTTP forward auth on the HTTP port, as Caddy and Traefik ask (X-Forwarded-*).
    config.forward_auth = Some(server::forward_auth::ForwardAuthConfig {
        headers: server::forward_auth::ForwardedHeaders::Forwarded,
    });
    config.access = server::access::AccessConfig {
        machine_id: Some(auth_service.id.clone()),
        allowlist: vec![service_a.id.clone(), DEV_SPIFFE_ID.to_owned()],
        ..Default::default()
    };
    // Removed when `dev` returns (on Ctrl-C / SIGTERM, or any error).
    let pki_dir = if tls {
        match dev_pki() {
            Ok(DevPki { dir, tls }) => {
                config.tls = Some(tls);
                Some(dir)
            }
            Err(e) => {
                eprintln!("error: --tls: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    // The directory the walk-through reads (before webhooks are wired: nothing to send yet).
    // The dev user administers acme; Grace is acme's billing member, a custom role without
    // Clerk's org:sys_memberships:read; Linus administers globex.
    let person = |id: &str, first: &str, last: &str, email: &str| UserSpec {
        id: Some(id.into()),
        first_name: Some(first.into()),
        last_name: Some(last.into()),
        email: Some(email.into()),
        ..UserSpec::default()
    };
    emu.create_user(&person(USER_ID, "Dev", "User", "dev@example.com"));
    let other_user = emu.create_user(&person(GRACE_ID, "Grace", "Hopper", "grace@example.com"));
    emu.create_user(&person(LINUS_ID, "Linus", "Torvalds", "linus@example.com"));
    for (user, org, (name, slug), role, permissions) in [
        (
            USER_ID,
            ORG_ID,
            ("Acme", "acme"),
            "admin",
            &[
                "org:invoices:read",
                "org:invoices:write",
                "org:members:manage",
            ][..],
        ),
        (
            GRACE_ID,
            ORG_ID,
            ("Acme", "acme"),
            "billing",
            &["org:invoices:read"][..],
        ),
        (
            LINUS_ID,
            OTHER_ORG_ID,
            ("Globex", "globex"),
            "admin",
            &[][..],
        ),
    ] {
        emu.add_membership(&MembershipSpec {
            user_id: user.into(),
            org_id: org.into(),
            org_name: Some(name.into()),
            org_slug: Some(slug.into()),
            role: Some(role.into()),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        })
        .await;
    }
    // Webhooks from the emulator to the HTTP port, signed with a fresh secret.
    let webhook_secret = format!(
        "whsec_{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            rand::random::<[u8; 32]>()
        )
    );
    config.webhook = Some(WebhookConfig {
        signing_secret: Secret::new(&webhook_secret),
        tolerance: std::time::Duration::from_secs(300),
    });
    let http_addr = match http_listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    emu.set_webhook(Some((
        &format!("http://{http_addr}/webhooks/clerk"),
        &webhook_secret,
    )));
    let server = match AuthServer::build(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let keys = server.verifier().keys().clone();
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics_addr = match metrics_listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let events = match server.events().await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `dev` keeps reflection on (the default): the grpcurl lines below need no proto files.
    let running = tokio::spawn(server.serve_on(
        server::Listeners {
            grpc: listener,
            http: Some(http_listener),
            metrics: Some(metrics_listener),
        },
        events,
        shutdown,
    ));
    keys.ready().await;
    let (user_id, session_id) = (USER_ID, SESSION_ID);
    // The phone's own token (minting it signs the phone in: its session exists from now on).
    let phone_token = emu.mint(&TokenSpec {
        user_id: Some(user_id.into()),
        session_id: Some(PHONE_SESSION_ID.into()),
        expires_in: Some(3600),
        ..TokenSpec::default()
    });
    let token = emu.mint(&TokenSpec {
        user_id: Some(user_id.into()),
        session_id: Some(session_id.into()),
        org: Some(OrgSpec {
            id: Some(ORG_ID.into()),
            slug: Some("acme".into()),
            role: Some("admin".into()),
            permissions: vec![
                "org:invoices:read".into(),
                "org:invoices:write".into(),
                "org:members:manage".into(),
            ],
        }),
        expires_in: Some(3600),
        ..TokenSpec::default()
    });
    let org_id = ORG_ID;
    let walkthrough = Walkthrough {
        auth: addr.to_string(),
        emu: emu.url().to_owned(),
        webhooks: format!("http://{http_addr}"),
        metrics: format!("http://{metrics_addr}"),
        token: &token,
        user_id,
        session_id,
        phone_session_id: PHONE_SESSION_ID,
        phone_token: &phone_token,
        org_id,
        other_org_id: OTHER_ORG_ID,
        linus: LINUS_ID,
        other_user: &other_user,
        machine_a: &service_a.id,
        machine_a_secret: &service_a.secret_key,
        machine_b: &service_b.id,
        certs: pki_dir.as_ref().map(|d| d.path().display().to_string()),
        orders_in_process,
        orders_delegated,
    };
    let transport = if pki_dir.is_some() {
        "gRPC with mTLS: a client certificate is required"
    } else {
        "gRPC, plaintext"
    };
    let tls_note = match &pki_dir {
        Some(dir) => format!(
            "\n  mTLS (--tls)    {d}/{{ca,client,client-key}}.pem: private to you (directory 0700,\n                  \
             files 0600), valid for a day, removed when dev stops. The client's SPIFFE ID\n                  \
             ({DEV_SPIFFE_ID}) is on the identity-query allowlist.\n",
            d = dir.path().display()
        ),
        None => String::new(),
    };
    println!(
        "\nclerk-grpc-auth dev: a Clerk emulator and the AuthService, wired together.\n\n  \
         AuthService     {addr}   ({transport}; health and reflection on)\n                  \
         http://{http_addr}/webhooks/clerk   (Clerk webhooks)\n                  \
         http://{http_addr}/auth   (HTTP forward auth, asked as Caddy and Traefik ask)\n                  \
         http://{metrics_addr}/metrics   (Prometheus; /livez, /readyz)\n  \
         Clerk emulator  {emu_url}   (CLERK_API_URL; JWKS at /v1/jwks and /.well-known/jwks.json)\n                  \
         {emu_url}/sign-in   (browser sign-in: sets the __session cookie; examples/grpc_web.rs)\n\
         {tls_note}\n{steps}",
        emu_url = emu.url(),
        steps = walkthrough.render(),
    );
    let result = running.await;
    emu.shutdown().await;
    // The PKI directory goes with it.
    drop(pki_dir);
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    #[test]
    fn private_files_are_new_and_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private(&path, b"secret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // An existing file is refused, and left as it was.
        let err = write_private(&path, b"other").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }

    #[test]
    fn a_planted_symlink_cannot_redirect_the_write() {
        let dir = tempfile::tempdir().unwrap();
        // A link to a file that does not exist yet (the attacker's choice of target) …
        let target = dir.path().join("chosen-by-the-attacker");
        let link = dir.path().join("client-key.pem");
        symlink(&target, &link).unwrap();
        let err = write_private(&link, b"private key").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(!target.exists(), "the write followed the symlink");
        // … and to one that does.
        std::fs::write(&target, b"theirs").unwrap();
        assert!(write_private(&link, b"private key").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"theirs");
    }

    #[test]
    fn each_pki_gets_its_own_private_directory() {
        let a = dev_pki().unwrap();
        let b = dev_pki().unwrap();
        assert_ne!(a.dir.path(), b.dir.path());
        let mode = std::fs::metadata(a.dir.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = a.dir.path().to_owned();
        drop(a);
        assert!(!path.exists(), "removed when dropped");
    }
}
