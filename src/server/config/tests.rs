//! [`ServeConfig::from_lookup`] fed from a map: defaults, good values, and every kind of bad
//! value naming its variable.

use std::{cell::RefCell, collections::HashMap};

use super::*;
use crate::{
    token::{check::Validation, identity::TokenType},
    verify::jwks::KeySource,
};

/// The configuration of exactly `vars` (nothing from the process environment).
fn cfg(vars: &[(&str, &str)]) -> Result<ServeConfig, ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    ServeConfig::from_lookup(|name| map.get(name).cloned())
}

/// With a secret key (a key source) and `vars`.
fn keyed(vars: &[(&str, &str)]) -> Result<ServeConfig, ConfigError> {
    let mut all = vec![("CLERK_SECRET_KEY", "sk_test_x")];
    all.extend_from_slice(vars);
    cfg(&all)
}

fn bad(vars: &[(&str, &str)]) -> ConfigError {
    match keyed(vars) {
        Ok(_) => panic!("{vars:?} accepted"),
        Err(e) => e,
    }
}

#[test]
fn the_variables_listed_are_the_variables_read() {
    let asked = RefCell::new(Vec::new());
    ServeConfig::from_lookup(|name| {
        asked.borrow_mut().push(name.to_owned());
        (name == "CLERK_SECRET_KEY").then(|| "sk_test_x".to_owned())
    })
    .unwrap();
    let mut asked = asked.into_inner();
    let mut listed: Vec<String> = VARIABLES.iter().map(|v| (*v).to_owned()).collect();
    asked.sort();
    asked.dedup();
    listed.sort();
    assert_eq!(asked, listed);
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = keyed(&[]).unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!((c.http_listen, c.metrics_listen), (None, None));
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(c.tls.is_none() && c.route_policy.is_none());
    let s = &c.server;
    assert_eq!(s.verifier.validation.clock_skew_ms, 5_000);
    assert_eq!(s.verifier.cache_capacity, 100_000);
    assert_eq!(s.key_store.refresh_interval, Duration::from_secs(300));
    assert_eq!(s.key_store.unknown_kid_cooldown, Duration::from_secs(10));
    assert_eq!(s.key_store.max_stale, Duration::from_secs(3_600));
    assert_eq!(
        (
            s.budget.calls_per_sec,
            s.budget.burst,
            s.budget.caller_calls_per_sec,
            s.budget.caller_burst,
            s.budget.reserved_share
        ),
        (20.0, 40, 5.0, 20, 0.5)
    );
    let d = &s.identity.as_ref().unwrap().directory;
    assert_eq!(
        (d.user_ttl, d.session_ttl, d.stale_if_error, d.not_found_ttl),
        (
            Duration::from_secs(60),
            Duration::from_secs(10),
            Duration::from_secs(300),
            Duration::from_secs(30)
        )
    );
    assert_eq!(s.revocation_ttl, Duration::from_secs(86_400));
    assert_eq!(s.revocation_capacity, 1_000_000);
    assert_eq!(s.shutdown_grace, Duration::from_secs(10));
    assert!(s.reflection);
    assert_eq!(
        (
            s.watch.max_streams,
            s.watch.max_streams_per_connection,
            s.watch.write_timeout
        ),
        (1024, 8, Duration::from_secs(30))
    );
    assert!(s.webhook.is_none() && s.redis.is_none() && s.tls.is_none());
    assert!(s.forwarders.is_empty());
    assert_eq!(s.access, AccessConfig::default());
    assert_eq!(s.budget, BudgetConfig::default());
    assert_eq!(s.watch, WatchConfig::default());
    // Blank is unset.
    let c = keyed(&[("CLERK_AUTH_LISTEN", "  "), ("CLERK_CLOCK_SKEW_MS", "")]).unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.server.verifier.validation.clock_skew_ms, 5_000);
}

#[test]
fn good_values_are_read() {
    let c = keyed(&[
        ("CLERK_AUTH_LISTEN", " 127.0.0.1:7000 "),
        ("CLERK_AUTH_HTTP_LISTEN", "127.0.0.1:7001"),
        ("CLERK_AUTH_LOG_FORMAT", "json"),
        ("CLERK_CLOCK_SKEW_MS", "250"),
        ("CLERK_ISSUER", " https://clerk.example.com "),
        ("CLERK_AUDIENCE", "a,b"),
        ("CLERK_AUTH_VERDICT_CACHE_CAPACITY", "0"),
        ("CLERK_AUTH_JWKS_REFRESH_SECS", "60"),
        ("CLERK_AUTH_MAX_STALE_SECS", "7"),
        ("CLERK_AUTH_USER_CACHE_TTL_SECS", "0"),
        ("CLERK_AUTH_STALE_IF_ERROR_SECS", "0"),
        ("CLERK_AUTH_REDIS_URL", "redis://127.0.0.1:6379/"),
        ("CLERK_AUTH_REVOCATION_TTL_SECS", "1"),
        ("CLERK_AUTH_SHUTDOWN_GRACE_SECS", "0"),
        ("CLERK_AUTH_TLS_CERT", "/tls/cert.pem"),
        ("CLERK_AUTH_TLS_KEY", "/tls/key.pem"),
        ("CLERK_AUTH_ROUTE_POLICY", "/etc/routes.toml"),
        (
            "CLERK_WEBHOOK_SIGNING_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
        ("CLERK_AUTH_WEBHOOK_TOLERANCE_SECS", "60"),
    ])
    .unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
    assert_eq!(c.http_listen, Some("127.0.0.1:7001".parse().unwrap()));
    assert_eq!(c.log_format, LogFormat::Json);
    let s = &c.server;
    assert_eq!(s.verifier.validation.clock_skew_ms, 250);
    assert_eq!(
        s.verifier.validation.issuer.as_deref(),
        Some("https://clerk.example.com")
    );
    assert_eq!(s.verifier.validation.audience, ["a", "b"]);
    assert_eq!(s.verifier.cache_capacity, 0);
    assert_eq!(s.key_store.refresh_interval, Duration::from_secs(60));
    assert_eq!(s.key_store.max_stale, Duration::from_secs(7));
    let d = &s.identity.as_ref().unwrap().directory;
    // A TTL of 0 means 1 s (as before); stale-if-error 0 is off.
    assert_eq!(d.user_ttl, Duration::from_secs(1));
    assert_eq!(d.stale_if_error, Duration::ZERO);
    let r = s.redis.as_ref().unwrap();
    assert_eq!(
        (r.url.as_str(), r.prefix.as_str()),
        ("redis://127.0.0.1:6379/", DEFAULT_REDIS_PREFIX)
    );
    // At least a minute.
    assert_eq!(s.revocation_ttl, Duration::from_secs(60));
    assert_eq!(s.shutdown_grace, Duration::ZERO);
    assert_eq!(
        c.tls,
        Some(TlsFiles {
            cert: "/tls/cert.pem".into(),
            key: "/tls/key.pem".into(),
            client_ca: None,
        })
    );
    assert_eq!(c.route_policy, Some("/etc/routes.toml".into()));
    assert_eq!(
        s.webhook.as_ref().unwrap().tolerance,
        Duration::from_secs(60)
    );
    // Nothing was read yet: the files are read by `load`.
    assert!(s.tls.is_none());
}

#[test]
fn every_kind_of_bad_value_names_its_variable() {
    let cases: &[(&str, &str, &str)] = &[
        // number
        ("CLERK_CLOCK_SKEW_MS", "five", "whole number"),
        ("CLERK_CLOCK_SKEW_MS", "-1", "whole number"),
        ("CLERK_CLOCK_SKEW_MS", "3600001", "maximum"),
        ("CLERK_AUTH_BAPI_CALLS_PER_SEC", "2.5", "whole number"),
        ("CLERK_AUTH_VERDICT_CACHE_CAPACITY", "lots", "whole number"),
        // positive number
        ("CLERK_AUTH_BAPI_BURST", "0", "at least 1"),
        ("CLERK_AUTH_JWKS_REFRESH_SECS", "0", "at least 1"),
        ("CLERK_AUTH_REVOCATION_CAPACITY", "0", "at least 1"),
        ("CLERK_AUTH_BAPI_RESERVED_PERCENT", "101", "maximum"),
        // duration (seconds)
        ("CLERK_AUTH_MAX_STALE_SECS", "1h", "whole number"),
        ("CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS", "0", "at least 1"),
        ("CLERK_AUTH_WEBHOOK_TOLERANCE_SECS", "-5", "whole number"),
        ("CLERK_AUTH_SHUTDOWN_GRACE_SECS", "3601", "maximum"),
        // bool
        ("CLERK_AUTH_REVOKE_REQUIRES_MTLS", "yes", "true nor false"),
        (
            "CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE",
            "TRUE",
            "true nor false",
        ),
        ("CLERK_AUTH_REFLECTION", "maybe", "true nor false"),
        // address
        ("CLERK_AUTH_LISTEN", "nowhere", "address"),
        ("CLERK_AUTH_HTTP_LISTEN", "8081", "address"),
        ("CLERK_AUTH_METRICS_LISTEN", "localhost:", "address"),
        // URL
        ("CLERK_API_URL", "not a url", "not a valid URL"),
        ("CLERK_JWKS_URL", "ftp://x/jwks", "http(s)"),
        ("CLERK_AUTH_REDIS_URL", "http://x", "redis://"),
        // enum, ids, keys
        ("CLERK_AUTH_LOG_FORMAT", "xml", "text nor json"),
        ("CLERK_AUTH_MACHINE_ID", "service-b", "machine id"),
        (
            "CLERK_AUTH_CLIENT_IP_FORWARDERS",
            "mch_ok, 10.0.0.1",
            "entry 2",
        ),
        ("CLERK_AUTH_IDENTITY_ALLOWLIST", "ops", "entry 1"),
        ("CLERK_AUTH_IDENTITY_CALLER_TYPES", "m2m_token", ""),
        ("CLERK_AUTH_IDENTITY_OAUTH_SCOPES", "Getuser=profile", ""),
        ("CLERK_MACHINE_SECRET_KEY", "sk_test_y", "ak_"),
        ("CLERK_JWT_KEY", "nope", ""),
        ("CLERK_WEBHOOK_SIGNING_SECRET", "nope", ""),
    ];
    for (var, value, what) in cases {
        let e = bad(&[(var, value)]);
        assert_eq!(e.var, *var, "{var}={value}: {e}");
        assert!(e.problem.contains(what), "{var}={value}: {e}");
        assert!(e.to_string().starts_with(&format!("{var}: ")), "{e}");
    }
}

#[test]
fn no_error_message_contains_the_value() {
    // A distinctive value in every variable, one at a time.
    for var in VARIABLES {
        let value = "Zq9xQv7Wk";
        if let Err(e) = keyed(&[(var, value)]) {
            assert!(!e.to_string().contains(value), "{var}: {e}");
        }
    }
    let e = bad(&[("CLERK_AUTH_REDIS_URL", "redis://:hunter2@[::1")]);
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn no_key_source_names_the_variable() {
    let e = cfg(&[]).unwrap_err();
    assert_eq!(e.var, "CLERK_SECRET_KEY");
    assert!(e.to_string().starts_with("CLERK_SECRET_KEY: no key source"));
}

#[test]
fn publishable_key_is_refused_without_echoing_it() {
    let e = cfg(&[(
        "CLERK_SECRET_KEY",
        "pk_test_Y2xlcmsuaW5zcGlyZWQucHVtYS03NC5sY2wuZGV2JA",
    )])
    .unwrap_err();
    assert_eq!(e.var, "CLERK_SECRET_KEY");
    assert!(e.problem.contains("publishable"));
    assert!(!e.to_string().contains("Y2xlcmsu"));
    for (value, what) in [("nope", "sk_test_"), ("sk_test_a b", "whitespace")] {
        let e = cfg(&[("CLERK_SECRET_KEY", value)]).unwrap_err();
        assert_eq!(e.var, "CLERK_SECRET_KEY");
        assert!(e.problem.contains(what), "{e}");
    }
}

#[test]
fn bad_values_name_their_variable() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("CLERK_JWT_KEY", "nope")], "CLERK_JWT_KEY"),
        (
            &[
                ("CLERK_SECRET_KEY", "sk_test_x"),
                ("CLERK_API_URL", "not a url"),
            ],
            "CLERK_API_URL",
        ),
        (&[("CLERK_JWKS_URL", "ftp://x/jwks")], "CLERK_JWKS_URL"),
        (
            &[
                ("CLERK_SECRET_KEY", "sk_test_x"),
                ("CLERK_CLOCK_SKEW_MS", "-1"),
            ],
            "CLERK_CLOCK_SKEW_MS",
        ),
        (
            &[
                ("CLERK_SECRET_KEY", "sk_test_x"),
                ("CLERK_AUTH_LISTEN", "nowhere"),
            ],
            "CLERK_AUTH_LISTEN",
        ),
    ];
    for (vars, var) in cases {
        assert_eq!(cfg(vars).unwrap_err().var, *var, "{vars:?}");
    }
}

#[test]
fn backend_api_budget_and_forwarders() {
    let c = keyed(&[]).unwrap().server;
    assert_eq!(c.budget, BudgetConfig::default());
    assert!(c.forwarders.is_empty());
    let c = keyed(&[
        ("CLERK_AUTH_BAPI_CALLS_PER_SEC", "5"),
        ("CLERK_AUTH_BAPI_BURST", "9"),
        ("CLERK_AUTH_BAPI_RESERVED_PERCENT", "25"),
        (
            "CLERK_AUTH_CLIENT_IP_FORWARDERS",
            "mch_layer, spiffe://cluster.local/ns/a/sa/b",
        ),
    ])
    .unwrap()
    .server;
    assert_eq!(
        (
            c.budget.calls_per_sec,
            c.budget.burst,
            c.budget.reserved_share
        ),
        (5.0, 9, 0.25)
    );
    assert_eq!(
        c.forwarders,
        ["mch_layer", "spiffe://cluster.local/ns/a/sa/b"]
    );
}

#[test]
fn identity_access_settings() {
    let c = keyed(&[]).unwrap().server;
    assert_eq!(c.access, AccessConfig::default());
    let c = keyed(&[
        (
            "CLERK_AUTH_IDENTITY_ALLOWLIST",
            "mch_ops, spiffe://cluster.local/ns/a/sa/b",
        ),
        ("CLERK_AUTH_MACHINE_ID", " mch_authsvc "),
        ("CLERK_AUTH_IDENTITY_CALLER_TYPES", "oauth_token,api_key"),
        (
            "CLERK_AUTH_IDENTITY_OAUTH_SCOPES",
            "WhoAmI=profile email; GetUser=profile",
        ),
        ("CLERK_AUTH_REVOKE_REQUIRES_MTLS", "true"),
        ("CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE", "true"),
        ("CLERK_AUTH_IDENTITY_CALLER_CALLS_PER_SEC", "2"),
        ("CLERK_AUTH_IDENTITY_CALLER_BURST", "7"),
        ("CLERK_AUTH_SELF_REVOKE", "any"),
        ("CLERK_AUTH_ORG_READ", "org:admin"),
    ])
    .unwrap()
    .server;
    assert_eq!(c.access.self_revoke, crate::server::access::SelfRevoke::Any);
    // Revocation locked down to mTLS stays locked for users unless they are let in.
    let locked = keyed(&[("CLERK_AUTH_REVOKE_REQUIRES_MTLS", "true")])
        .unwrap()
        .server;
    assert_eq!(
        locked.access.self_revoke,
        crate::server::access::SelfRevoke::Never
    );
    assert_eq!(
        c.access.org_read,
        crate::server::access::OrgRead::Role("org:admin".into())
    );
    assert_eq!(c.access.machine_id.as_deref(), Some("mch_authsvc"));
    assert_eq!(c.access.allowlist.len(), 2);
    assert_eq!(
        c.access.caller_types,
        [TokenType::OauthToken, TokenType::ApiKey]
    );
    assert_eq!(
        c.access.oauth_scopes[&crate::server::access::Rpc::WhoAmI],
        ["profile", "email"]
    );
    assert!(c.access.revoke_requires_mtls && c.access.exclusive_scope);
    assert_eq!(
        (c.budget.caller_calls_per_sec, c.budget.caller_burst),
        (2.0, 7)
    );
    for (vars, var) in [
        (
            ("CLERK_AUTH_MACHINE_ID", "service-b"),
            "CLERK_AUTH_MACHINE_ID",
        ),
        (
            ("CLERK_AUTH_IDENTITY_CALLER_TYPES", "m2m_token"),
            "CLERK_AUTH_IDENTITY_CALLER_TYPES",
        ),
        (
            ("CLERK_AUTH_IDENTITY_OAUTH_SCOPES", "Getuser=profile"),
            "CLERK_AUTH_IDENTITY_OAUTH_SCOPES",
        ),
        (
            ("CLERK_AUTH_IDENTITY_OAUTH_SCOPES", "WatchRevocations=admin"),
            "CLERK_AUTH_IDENTITY_ALLOWLIST",
        ),
        (
            ("CLERK_AUTH_IDENTITY_OAUTH_SCOPES", "GetOrganization=org"),
            "CLERK_AUTH_IDENTITY_ALLOWLIST",
        ),
        (
            ("CLERK_AUTH_SELF_REVOKE", "Strict"),
            "CLERK_AUTH_SELF_REVOKE",
        ),
        (("CLERK_AUTH_ORG_READ", "admin"), "CLERK_AUTH_ORG_READ"),
        (
            ("CLERK_AUTH_ORG_READ", "org:Sys_memberships:read"),
            "CLERK_AUTH_ORG_READ",
        ),
        (
            ("CLERK_AUTH_REVOKE_REQUIRES_MTLS", "yes"),
            "CLERK_AUTH_REVOKE_REQUIRES_MTLS",
        ),
    ] {
        assert_eq!(bad(&[vars]).var, var);
    }
}

#[test]
fn secret_key_builds_the_backend_api_jwks_url() {
    let c = cfg(&[
        ("CLERK_SECRET_KEY", "sk_test_abc"),
        (
            "CLERK_AUTHORIZED_PARTIES",
            " https://a.example , ,https://b.example",
        ),
    ])
    .unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    match c.server.key_source {
        KeySource::Remote { url, bearer } => {
            assert_eq!(url.as_str(), "https://api.clerk.com/v1/jwks");
            assert_eq!(bearer.unwrap().expose(), "sk_test_abc");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.server.verifier.validation.authorized_parties,
        ["https://a.example", "https://b.example"]
    );
    let c = cfg(&[
        ("CLERK_SECRET_KEY", "sk_test_abc"),
        ("CLERK_API_URL", "http://127.0.0.1:9/clerk/"),
    ])
    .unwrap();
    match c.server.key_source {
        KeySource::Remote { url, .. } => {
            assert_eq!(url.as_str(), "http://127.0.0.1:9/clerk/v1/jwks")
        }
        other => panic!("{other:?}"),
    }
    // The machine-token and identity clients use the same Backend API.
    assert!(c.server.machine.is_some() && c.server.identity.is_some());
    // Precedence: the networkless key, then a JWKS URL, then the Backend API.
    let c = cfg(&[
        ("CLERK_SECRET_KEY", "sk_test_abc"),
        ("CLERK_JWKS_URL", "https://example.com/jwks.json"),
    ])
    .unwrap();
    assert!(matches!(
        c.server.key_source,
        KeySource::Remote { bearer: None, .. }
    ));
    // A machine secret key alone: machine tokens, no identity queries.
    let c = cfg(&[
        ("CLERK_JWKS_URL", "https://example.com/jwks.json"),
        ("CLERK_MACHINE_SECRET_KEY", "ak_x"),
    ])
    .unwrap();
    assert!(c.server.machine.is_some() && c.server.identity.is_none());
}

#[test]
fn ports_reflection_and_watch_limits() {
    let c = keyed(&[]).unwrap();
    assert!(c.server.reflection);
    assert_eq!(c.server.watch, WatchConfig::default());
    assert_eq!(c.metrics_listen, None);
    let c = keyed(&[
        ("CLERK_AUTH_HTTP_LISTEN", "127.0.0.1:8081"),
        ("CLERK_AUTH_METRICS_LISTEN", " 127.0.0.1:9090 "),
        ("CLERK_AUTH_REFLECTION", "FALSE"),
        ("CLERK_AUTH_WATCH_MAX_STREAMS", "64"),
        ("CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION", "2"),
        ("CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS", "5"),
    ])
    .unwrap();
    assert!(!c.server.reflection);
    assert_eq!(
        c.server.watch,
        WatchConfig {
            max_streams: 64,
            max_streams_per_connection: 2,
            write_timeout: Duration::from_secs(5),
        }
    );
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
    // Port 0 may repeat.
    keyed(&[
        ("CLERK_AUTH_LISTEN", "127.0.0.1:0"),
        ("CLERK_AUTH_HTTP_LISTEN", "127.0.0.1:0"),
        ("CLERK_AUTH_METRICS_LISTEN", "127.0.0.1:0"),
    ])
    .unwrap();
    for (vars, var) in [
        (
            &[("CLERK_AUTH_METRICS_LISTEN", "nowhere")][..],
            "CLERK_AUTH_METRICS_LISTEN",
        ),
        (
            &[
                ("CLERK_AUTH_HTTP_LISTEN", "127.0.0.1:8081"),
                ("CLERK_AUTH_METRICS_LISTEN", "127.0.0.1:8081"),
            ][..],
            "CLERK_AUTH_METRICS_LISTEN",
        ),
        (
            &[("CLERK_AUTH_METRICS_LISTEN", DEFAULT_LISTEN)][..],
            "CLERK_AUTH_METRICS_LISTEN",
        ),
        (
            &[("CLERK_AUTH_REFLECTION", "maybe")][..],
            "CLERK_AUTH_REFLECTION",
        ),
        (
            &[("CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS", "0")][..],
            "CLERK_AUTH_WATCH_WRITE_TIMEOUT_SECS",
        ),
        (
            &[("CLERK_AUTH_WATCH_MAX_STREAMS", "-1")][..],
            "CLERK_AUTH_WATCH_MAX_STREAMS",
        ),
        (
            &[("CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION", "x")][..],
            "CLERK_AUTH_WATCH_MAX_STREAMS_PER_CONNECTION",
        ),
    ] {
        assert_eq!(bad(vars).var, var, "{vars:?}");
    }
}

#[test]
fn webhooks_need_the_http_port_and_tls_needs_cert_and_key() {
    let secret = (
        "CLERK_WEBHOOK_SIGNING_SECRET",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    );
    assert_eq!(bad(&[secret]).var, "CLERK_AUTH_HTTP_LISTEN");
    for (vars, var) in [
        (
            &[("CLERK_AUTH_TLS_CERT", "/c.pem")][..],
            "CLERK_AUTH_TLS_KEY",
        ),
        (
            &[("CLERK_AUTH_TLS_KEY", "/k.pem")][..],
            "CLERK_AUTH_TLS_CERT",
        ),
        (
            &[("CLERK_AUTH_TLS_CLIENT_CA", "/ca.pem")][..],
            "CLERK_AUTH_TLS_CLIENT_CA",
        ),
    ] {
        assert_eq!(bad(vars).var, var, "{vars:?}");
    }
}

#[test]
fn revocation_ttl_and_capacity() {
    let c = keyed(&[]).unwrap().server;
    assert_eq!(c.revocation_ttl, Duration::from_secs(86_400));
    assert_eq!(c.revocation_capacity, 1_000_000);
    let c = keyed(&[
        ("CLERK_AUTH_REVOCATION_TTL_SECS", "3600"),
        ("CLERK_AUTH_REVOCATION_CAPACITY", "50000"),
    ])
    .unwrap()
    .server;
    assert_eq!(c.revocation_ttl, Duration::from_secs(3600));
    assert_eq!(c.revocation_capacity, 50_000);
    for value in ["0", "-1", "x", "100000001"] {
        let e = bad(&[("CLERK_AUTH_REVOCATION_CAPACITY", value)]);
        assert_eq!(e.var, "CLERK_AUTH_REVOCATION_CAPACITY", "{value}");
    }
}

#[test]
fn load_reads_the_files_and_names_the_variable_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM").unwrap();
    let garbage = garbage.to_str().unwrap();
    for (vars, var) in [
        (
            [
                ("CLERK_AUTH_TLS_CERT", missing),
                ("CLERK_AUTH_TLS_KEY", garbage),
            ],
            "CLERK_AUTH_TLS_CERT",
        ),
        (
            [
                ("CLERK_AUTH_TLS_CERT", garbage),
                ("CLERK_AUTH_TLS_KEY", missing),
            ],
            "CLERK_AUTH_TLS_KEY",
        ),
        (
            [
                ("CLERK_AUTH_TLS_CERT", garbage),
                ("CLERK_AUTH_TLS_KEY", garbage),
            ],
            "CLERK_AUTH_TLS_CERT",
        ),
        (
            [
                ("CLERK_AUTH_ROUTE_POLICY", missing),
                ("CLERK_AUTH_LOG_FORMAT", "text"),
            ],
            "CLERK_AUTH_ROUTE_POLICY",
        ),
    ] {
        // Pure: building the configuration reads nothing …
        let c = keyed(&vars).unwrap();
        // … loading does.
        assert_eq!(c.load().unwrap_err().var, var, "{vars:?}");
    }
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, "").unwrap();
    keyed(&[("CLERK_AUTH_ROUTE_POLICY", routes.to_str().unwrap())])
        .unwrap()
        .load()
        .unwrap();
}

#[test]
fn the_verifier_settings_alone() {
    let map = HashMap::from([("CLERK_AUTH_VERDICT_CACHE_CAPACITY", "7")]);
    let v = verifier_config(|n| map.get(n).map(|v| (*v).to_owned())).unwrap();
    assert_eq!(v.cache_capacity, 7);
    assert_eq!(v.validation, Validation::default());
    let map = HashMap::from([("CLERK_AUTH_VERDICT_CACHE_CAPACITY", "x")]);
    let e = verifier_config(|n| map.get(n).map(|v| (*v).to_owned())).unwrap_err();
    assert_eq!(e.var, "CLERK_AUTH_VERDICT_CACHE_CAPACITY");
}

#[test]
fn debug_shows_no_secret() {
    let c = cfg(&[
        ("CLERK_SECRET_KEY", "sk_test_Qz7secret"),
        ("CLERK_MACHINE_SECRET_KEY", "ak_Qz7machine"),
        ("CLERK_AUTH_HTTP_LISTEN", "127.0.0.1:0"),
        (
            "CLERK_WEBHOOK_SIGNING_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
        (
            "CLERK_AUTH_REDIS_URL",
            "redis://:Qz7password@127.0.0.1:6379/",
        ),
    ])
    .unwrap();
    let shown = format!("{c:?}");
    for secret in [
        "Qz7secret",
        "Qz7machine",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "Qz7password",
    ] {
        assert!(!shown.contains(secret), "{shown}");
    }
}
