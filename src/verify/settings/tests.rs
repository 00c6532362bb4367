//! [`VerifierSettings`] from a map, [`TokenVerifier::start`] with a networkless key, and the
//! one warning for keys nobody loads. No socket is opened. [`TestKey`] is shared with the
//! layer's tests.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use aws_lc_rs::{
    encoding::AsDer,
    rand::SystemRandom,
    rsa::KeySize,
    signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256},
};
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine as _,
};
use serde_json::{json, Value};

use super::*;
use crate::{
    emulator::TokenSpec,
    error::{AuthError, Reason},
    token::check::CAT_SESSION,
    verify::VerifyRequest,
};

/// An RSA key made for the tests (once per process): its public half as `CLERK_JWT_KEY` PEM,
/// its private half signs session tokens.
pub(crate) struct TestKey {
    pair: RsaKeyPair,
    /// The public key, armoured SPKI (as Clerk's Dashboard shows it).
    pub(crate) pem: String,
}

impl TestKey {
    pub(crate) fn get() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| {
            let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation");
            let der = pair.public_key().as_der().expect("SPKI DER");
            let pem = format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                STANDARD.encode(der.as_ref())
            );
            TestKey { pair, pem }
        })
    }

    /// `header.payload.signature`, RS256.
    pub(crate) fn sign(&self, header: &Value, claims: &Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap());
        let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
        let input = format!("{h}.{p}");
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// A session token as the emulator would mint it for `spec`.
    pub(crate) fn session(&self, spec: &TokenSpec) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let header = json!({"alg": "RS256", "kid": "ins_test", "typ": "JWT", "cat": CAT_SESSION});
        self.sign(
            &header,
            &Value::Object(spec.claims("https://clerk.test.example", now)),
        )
    }

    /// A verifier over this key, built by [`TokenVerifier::start`] from `CLERK_JWT_KEY`.
    pub(crate) fn verifier(&self) -> (TokenVerifier, RefresherGuard) {
        let env = HashMap::from([("CLERK_JWT_KEY", self.pem.clone())]);
        TokenVerifier::start(settings(&env).unwrap()).unwrap()
    }
}

fn settings(env: &HashMap<&str, String>) -> Result<VerifierSettings, SettingError> {
    VerifierSettings::from_lookup(|k| env.get(k).cloned())
}

fn env(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

#[test]
fn the_variables_listed_are_the_variables_read() {
    let asked = std::cell::RefCell::new(Vec::new());
    VerifierSettings::from_lookup(|name| {
        asked.borrow_mut().push(name.to_owned());
        (name == "CLERK_SECRET_KEY").then(|| "sk_test_x".to_owned())
    })
    .unwrap();
    // In the order listed, each once.
    assert_eq!(asked.into_inner(), VARIABLES);
}

/// The server reads the verifier's variables through [`VerifierSettings::read`] alone: the
/// same values give the same settings and the same errors.
#[cfg(feature = "server")]
#[test]
fn the_server_reads_the_verifier_variables_through_these_settings() {
    use crate::server::config::{ServeConfig, VARIABLES as SERVE_VARIABLES};
    for var in VARIABLES {
        assert!(SERVE_VARIABLES.contains(var), "{var}");
    }
    let read = |pairs: &[(&'static str, &str)]| {
        let map = env(pairs);
        (
            settings(&map),
            ServeConfig::from_lookup(|k| map.get(k).cloned()).map(|c| c.server),
        )
    };
    let (v, s) = read(&[
        ("CLERK_SECRET_KEY", "sk_test_abc"),
        ("CLERK_MACHINE_SECRET_KEY", "ak_machine"),
        ("CLERK_API_URL", "http://127.0.0.1:9/clerk/"),
        ("CLERK_AUDIENCE", "api"),
        ("CLERK_AUTH_MAX_STALE_SECS", "120"),
        ("CLERK_AUTH_BAPI_BURST", "9"),
        ("CLERK_AUTH_REVOCATION_CAPACITY", "50000"),
    ]);
    let (v, s) = (v.unwrap(), s.unwrap());
    assert_eq!(format!("{:?}", v.key_source), format!("{:?}", s.key_source));
    assert_eq!(format!("{:?}", v.key_store), format!("{:?}", s.key_store));
    assert_eq!(format!("{:?}", v.verifier), format!("{:?}", s.verifier));
    assert_eq!(format!("{:?}", v.machine), format!("{:?}", s.machine));
    assert_eq!(v.budget, s.budget);
    assert_eq!(
        (v.revocation_ttl, v.revocation_capacity),
        (s.revocation_ttl, s.revocation_capacity)
    );
    // Identity queries: the same Backend API and instance secret key.
    let backend = &s.identity.as_ref().unwrap().backend;
    assert_eq!(backend.api_url.as_str(), "http://127.0.0.1:9/clerk/");
    assert_eq!(backend.secret_key.expose(), "sk_test_abc");
    for pairs in [
        &[
            ("CLERK_SECRET_KEY", "sk_test_x"),
            ("CLERK_CLOCK_SKEW_MS", "Zq9"),
        ][..],
        &[("CLERK_JWKS_URL", "ftp://x/jwks")][..],
        &[][..],
    ] {
        let (v, s) = read(pairs);
        assert_eq!(v.unwrap_err(), s.unwrap_err(), "{pairs:?}");
    }
}

#[test]
fn defaults_are_those_of_serve() {
    let s = settings(&env(&[(
        "CLERK_JWKS_URL",
        "https://fapi.example/.well-known/jwks.json",
    )]))
    .unwrap();
    match &s.key_source {
        KeySource::Remote { url, bearer } => {
            assert_eq!(url.as_str(), "https://fapi.example/.well-known/jwks.json");
            assert!(bearer.is_none());
        }
        other => panic!("{other:?}"),
    }
    let d = KeyStoreConfig::default();
    assert_eq!(s.key_store.refresh_interval, d.refresh_interval);
    assert_eq!(s.key_store.unknown_kid_cooldown, d.unknown_kid_cooldown);
    assert_eq!(s.key_store.max_stale, d.max_stale);
    assert_eq!(s.key_store.fetch_timeout, d.fetch_timeout);
    assert_eq!(s.verifier.cache_capacity, 100_000);
    assert_eq!(s.verifier.validation.clock_skew_ms, 5_000);
    assert!(s.verifier.validation.authorized_parties.is_empty());
    assert!(s.verifier.validation.issuer.is_none());
    assert!(s.verifier.validation.audience.is_empty());
    assert!(s.machine.is_none());
    assert_eq!(s.budget, BudgetConfig::default());
    assert_eq!(s.revocation_ttl, Duration::from_secs(86_400));
    assert_eq!(s.revocation_capacity, 1_000_000);
    // `new` has the same defaults.
    let n = VerifierSettings::new(s.key_source.clone());
    assert_eq!(format!("{n:?}"), format!("{s:?}"));
}

#[test]
fn every_setting_is_read() {
    let s = settings(&env(&[
        ("CLERK_SECRET_KEY", " sk_test_abc "),
        ("CLERK_MACHINE_SECRET_KEY", "ak_machine"),
        ("CLERK_API_URL", "http://127.0.0.1:9/clerk/"),
        (
            "CLERK_AUTHORIZED_PARTIES",
            " https://a.example , ,https://b.example",
        ),
        ("CLERK_ISSUER", "https://clerk.example"),
        ("CLERK_AUDIENCE", "api,web"),
        ("CLERK_CLOCK_SKEW_MS", "250"),
        ("CLERK_AUTH_JWKS_REFRESH_SECS", "60"),
        ("CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS", "0"),
        ("CLERK_AUTH_MAX_STALE_SECS", "120"),
        ("CLERK_AUTH_VERDICT_CACHE_CAPACITY", "0"),
        ("CLERK_AUTH_BAPI_CALLS_PER_SEC", "5"),
        ("CLERK_AUTH_BAPI_BURST", "9"),
        ("CLERK_AUTH_BAPI_RESERVED_PERCENT", "25"),
        ("CLERK_AUTH_REVOCATION_TTL_SECS", "10"),
        ("CLERK_AUTH_REVOCATION_CAPACITY", "50000"),
    ]))
    .unwrap();
    match &s.key_source {
        KeySource::Remote { url, bearer } => {
            // The Backend API's JWKS, any path prefix kept.
            assert_eq!(url.as_str(), "http://127.0.0.1:9/clerk/v1/jwks");
            assert_eq!(bearer.as_ref().unwrap().expose(), "sk_test_abc");
        }
        other => panic!("{other:?}"),
    }
    let v = &s.verifier.validation;
    assert_eq!(
        v.authorized_parties,
        ["https://a.example", "https://b.example"]
    );
    assert_eq!(v.issuer.as_deref(), Some("https://clerk.example"));
    assert_eq!(v.audience, ["api", "web"]);
    assert_eq!(v.clock_skew_ms, 250);
    assert_eq!(s.key_store.refresh_interval, Duration::from_secs(60));
    assert_eq!(s.key_store.unknown_kid_cooldown, Duration::ZERO);
    assert_eq!(s.key_store.max_stale, Duration::from_secs(120));
    assert_eq!(s.verifier.cache_capacity, 0);
    assert_eq!(
        (
            s.budget.calls_per_sec,
            s.budget.burst,
            s.budget.reserved_share
        ),
        (5.0, 9, 0.25)
    );
    assert_eq!(s.revocation_ttl, Duration::from_secs(60), "at least 60 s");
    assert_eq!(s.revocation_capacity, 50_000);
    let m = s.machine.as_ref().unwrap();
    assert_eq!(m.api_url.as_str(), "http://127.0.0.1:9/clerk/");
    assert_eq!(m.secret_key.as_ref().unwrap().expose(), "sk_test_abc");
    assert_eq!(
        m.machine_secret_key.as_ref().unwrap().expose(),
        "ak_machine"
    );
    // No secret in Debug.
    let shown = format!("{s:?}");
    assert!(
        !shown.contains("sk_test_abc") && !shown.contains("ak_machine"),
        "{shown}"
    );

    // The default Backend API; a machine secret key alone enables machine tokens.
    let s = settings(&env(&[("CLERK_SECRET_KEY", "sk_live_x")])).unwrap();
    match &s.key_source {
        KeySource::Remote { url, .. } => assert_eq!(url.as_str(), "https://api.clerk.com/v1/jwks"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.machine.unwrap().api_url.as_str(),
        "https://api.clerk.com/"
    );
    let s = settings(&env(&[
        ("CLERK_JWKS_URL", "https://fapi.example/jwks"),
        ("CLERK_MACHINE_SECRET_KEY", "ak_x"),
    ]))
    .unwrap();
    assert!(s.machine.unwrap().secret_key.is_none());
}

#[test]
fn key_source_precedence_jwt_key_then_jwks_url_then_secret_key() {
    let pem = TestKey::get().pem.clone();
    let all = env(&[
        ("CLERK_JWT_KEY", &pem),
        ("CLERK_JWKS_URL", "https://fapi.example/jwks"),
        ("CLERK_SECRET_KEY", "sk_test_x"),
    ]);
    assert!(matches!(
        settings(&all).unwrap().key_source,
        KeySource::Static(_)
    ));
    let mut no_pem = all.clone();
    no_pem.remove("CLERK_JWT_KEY");
    match settings(&no_pem).unwrap().key_source {
        KeySource::Remote { url, bearer } => {
            assert_eq!(url.as_str(), "https://fapi.example/jwks");
            assert!(bearer.is_none());
        }
        other => panic!("{other:?}"),
    }
    // Blank counts as unset.
    let blank = env(&[("CLERK_JWT_KEY", "  "), ("CLERK_SECRET_KEY", "sk_test_x")]);
    assert!(matches!(
        settings(&blank).unwrap().key_source,
        KeySource::Remote { .. }
    ));
}

#[test]
fn bad_values_name_their_variable_and_never_show_a_secret() {
    let e = settings(&HashMap::new()).unwrap_err();
    assert_eq!(e.var, "CLERK_SECRET_KEY");
    assert!(
        e.to_string().starts_with("CLERK_SECRET_KEY: no key source"),
        "{e}"
    );

    let key = || ("CLERK_SECRET_KEY", "sk_test_x");
    let cases: Vec<(Vec<(&'static str, &str)>, &str)> = vec![
        (
            vec![(
                "CLERK_SECRET_KEY",
                "pk_test_Y2xlcmsuaW5zcGlyZWQucHVtYS03NC5sY2wuZGV2JA",
            )],
            "CLERK_SECRET_KEY",
        ),
        (
            vec![("CLERK_SECRET_KEY", "sk_test_a b")],
            "CLERK_SECRET_KEY",
        ),
        (
            vec![("CLERK_SECRET_KEY", "secret_Y2xlcmsu")],
            "CLERK_SECRET_KEY",
        ),
        (
            vec![key(), ("CLERK_MACHINE_SECRET_KEY", "sk_Y2xlcmsu")],
            "CLERK_MACHINE_SECRET_KEY",
        ),
        (vec![("CLERK_JWT_KEY", "nope")], "CLERK_JWT_KEY"),
        (
            vec![(
                "CLERK_JWT_KEY",
                "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----",
            )],
            "CLERK_JWT_KEY",
        ),
        (vec![key(), ("CLERK_API_URL", "not a url")], "CLERK_API_URL"),
        (vec![("CLERK_JWKS_URL", "ftp://x/jwks")], "CLERK_JWKS_URL"),
        (
            vec![key(), ("CLERK_CLOCK_SKEW_MS", "-1")],
            "CLERK_CLOCK_SKEW_MS",
        ),
        (
            vec![key(), ("CLERK_CLOCK_SKEW_MS", "3600001")],
            "CLERK_CLOCK_SKEW_MS",
        ),
        (
            vec![key(), ("CLERK_AUTH_JWKS_REFRESH_SECS", "0")],
            "CLERK_AUTH_JWKS_REFRESH_SECS",
        ),
        (
            vec![key(), ("CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS", "x")],
            "CLERK_AUTH_UNKNOWN_KID_COOLDOWN_SECS",
        ),
        (
            vec![key(), ("CLERK_AUTH_MAX_STALE_SECS", "1.5")],
            "CLERK_AUTH_MAX_STALE_SECS",
        ),
        (
            vec![key(), ("CLERK_AUTH_VERDICT_CACHE_CAPACITY", "lots")],
            "CLERK_AUTH_VERDICT_CACHE_CAPACITY",
        ),
        (
            vec![key(), ("CLERK_AUTH_BAPI_BURST", "0")],
            "CLERK_AUTH_BAPI_BURST",
        ),
        (
            vec![key(), ("CLERK_AUTH_BAPI_CALLS_PER_SEC", "2.5")],
            "CLERK_AUTH_BAPI_CALLS_PER_SEC",
        ),
        (
            vec![key(), ("CLERK_AUTH_BAPI_RESERVED_PERCENT", "101")],
            "CLERK_AUTH_BAPI_RESERVED_PERCENT",
        ),
        (
            vec![key(), ("CLERK_AUTH_REVOCATION_TTL_SECS", "-5")],
            "CLERK_AUTH_REVOCATION_TTL_SECS",
        ),
        (
            vec![key(), ("CLERK_AUTH_REVOCATION_CAPACITY", "0")],
            "CLERK_AUTH_REVOCATION_CAPACITY",
        ),
    ];
    for (pairs, var) in cases {
        let e = settings(&env(&pairs)).unwrap_err();
        assert_eq!(e.var, var, "{pairs:?}: {e}");
        assert!(e.to_string().starts_with(&format!("{var}: ")), "{e}");
        assert!(!e.to_string().contains("Y2xlcmsu"), "{e}");
        assert!(VARIABLES.contains(&e.var), "{var}");
    }
}

#[test]
fn no_error_message_contains_the_value() {
    // A distinctive value in every variable, one at a time (with and without a key source).
    let value = "Zq9xQv7Wk";
    for var in VARIABLES {
        for base in [&[][..], &[("CLERK_SECRET_KEY", "sk_test_x")][..]] {
            let mut pairs = base.to_vec();
            pairs.push((var, value));
            if let Err(e) = settings(&env(&pairs)) {
                assert!(!e.to_string().contains(value), "{var}: {e}");
            }
        }
    }
}

#[test]
fn start_needs_a_tokio_runtime() {
    let s = settings(&env(&[("CLERK_JWT_KEY", &TestKey::get().pem)])).unwrap();
    assert!(matches!(
        TokenVerifier::start(s),
        Err(StartError::NoRuntime)
    ));
}

#[tokio::test]
async fn start_with_a_networkless_key_verifies_at_once() {
    let key = TestKey::get();
    let (verifier, guard) = key.verifier();
    assert!(verifier.keys().is_usable() && !verifier.keys().is_remote());
    let token = key.session(&TokenSpec {
        user_id: Some("user_settings".into()),
        ..TokenSpec::default()
    });
    let id = verifier
        .verify(&VerifyRequest {
            token: &token,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(id.user_id, "user_settings");
    assert!(verifier.machine().is_none());
    assert_eq!(verifier.stats().keys_never_loaded, 0);
    guard.shutdown().await;
}

/// Records every event (level, message) dispatched while it is the default subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), m.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A JWKS key store nobody loads (no refresher, no fetch): every verification answers
/// UNAVAILABLE without I/O, is counted, and the first one logs the one warning.
#[test]
fn keys_nobody_loads_log_one_warning_per_verifier() {
    let remote = || {
        KeyStore::new(
            KeySource::Remote {
                url: "http://127.0.0.1:9/v1/jwks".parse().unwrap(),
                bearer: None,
            },
            KeyStoreConfig::default(),
            crate::clerk::api::http_client().unwrap(),
        )
    };
    let verifier = TokenVerifier::new(TokenVerifierConfig::default(), remote());
    let token = TestKey::get().session(&TokenSpec::default());
    let req = VerifyRequest {
        token: &token,
        ..Default::default()
    };
    let capture = Capture::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    tracing::subscriber::with_default(capture.clone(), || {
        for _ in 0..3 {
            let e = verifier.verify_now(&req).unwrap_err();
            assert_eq!(e, AuthError::Unavailable(Reason::JwkRemoteFailedToLoad));
            let e = rt.block_on(verifier.verify(&req)).unwrap_err();
            assert_eq!(e, AuthError::Unavailable(Reason::JwkRemoteFailedToLoad));
        }
    });
    assert_eq!(verifier.stats().keys_never_loaded, 6);
    let warnings: Vec<String> = capture
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(l, _)| *l == tracing::Level::WARN)
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("never loaded")
            && warnings[0].contains("TokenVerifier::start")
            && warnings[0].contains("spawn_refresher"),
        "{}",
        warnings[0]
    );
    assert!(!warnings[0].contains(&token[..20]), "no token in the log");

    // A refresher that is running (even if not yet polled) is loading: not counted.
    let keys = remote();
    let verifier = TokenVerifier::new(TokenVerifierConfig::default(), keys.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let refresher = keys.run(stop.clone());
    assert!(verifier.verify_now(&req).is_err());
    assert_eq!(verifier.stats().keys_never_loaded, 0);
    // Dropped unpolled (a guard dropped at once): nothing loads it any more.
    drop(refresher);
    assert!(verifier.verify_now(&req).is_err());
    assert_eq!(verifier.stats().keys_never_loaded, 1);
}
