//! VerifyToken end to end: the real server against the real emulator, one behaviour per test.

mod common;

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use clerk_grpc_auth::{
    emulator::{OrgSpec, SigningKey, TokenSpec},
    pb::{SessionStatus, TokenType, VerifyTokenRequest},
    token::keys::Alg,
};

// Clerk's `cat` claim values (@clerk/backend): a JWT template, an M2M token, "ignore".
const CAT_TEMPLATE: &str = "cl_B7d4PD222AAA";
const CAT_M2M: &str = "cl_B7d4PD333AAA";
const CAT_IGNORE: &str = "cl_I7d4PD111III";
use common::{assert_rejected, now, Harness};
use serde_json::{json, Value};
use tonic::Code;

fn org_spec() -> OrgSpec {
    OrgSpec {
        id: Some("org_2acme".into()),
        slug: Some("acme".into()),
        role: Some("admin".into()),
        permissions: vec![
            "org:invoices:read".into(),
            "org:invoices:write".into(),
            "org:teams:manage".into(),
        ],
    }
}

fn claims_of(h: &Harness, spec: &TokenSpec) -> Value {
    Value::Object(spec.claims(&h.clerk.url(), now()))
}

#[tokio::test]
async fn valid_v2_token_decodes_org_role_permissions_and_claims() {
    let h = Harness::start().await;
    let spec = TokenSpec {
        user_id: Some("user_2abc".into()),
        session_id: Some("sess_2abc".into()),
        org: Some(org_spec()),
        features: vec!["u:dashboard".into()],
        plans: vec!["u:pro".into(), "o:business".into()],
        fva: Some([3, -1]),
        azp: Some("https://app.example".into()),
        ..Default::default()
    };
    let token = h.mint(&spec);
    let id = h.verify(&token).await.expect("valid");
    assert_eq!(id.token_type(), TokenType::SessionToken);
    assert_eq!(id.user_id, "user_2abc");
    assert_eq!(id.session_id, "sess_2abc");
    assert_eq!(id.session_status(), SessionStatus::Active);
    assert_eq!(id.claims_version, 2);
    let org = id.organization.expect("organization");
    assert_eq!(org.id, "org_2acme");
    assert_eq!(org.slug, "acme");
    assert_eq!(org.role, "org:admin");
    assert_eq!(
        org.permissions,
        [
            "org:invoices:read",
            "org:invoices:write",
            "org:teams:manage"
        ]
    );
    let features = id.features.unwrap();
    assert_eq!(features.organization, ["invoices", "teams"]);
    assert_eq!(features.user, ["dashboard"]);
    let plans = id.plans.unwrap();
    assert_eq!(
        (plans.user, plans.organization),
        (vec!["pro".to_owned()], vec!["business".to_owned()])
    );
    let fva = id.factor_verification_age.unwrap();
    assert_eq!(
        (fva.first_factor_minutes, fva.second_factor_minutes),
        (3, -1)
    );
    assert_eq!(id.issuer, h.clerk.url());
    assert_eq!(id.authorized_party, "https://app.example");
    let exp = id.expires_at.unwrap().seconds;
    let iat = id.issued_at.unwrap().seconds;
    assert_eq!(exp - iat, 60);
    assert_eq!(id.not_before.unwrap().seconds, iat - 10);
    // Every raw claim is there, exactly: `claims_json` is the signed payload's text.
    let payload = token.split('.').nth(1).unwrap();
    let payload = URL_SAFE_NO_PAD.decode(payload).unwrap();
    assert_eq!(id.claims_json.as_bytes(), &payload[..]);
    let claims: serde_json::Map<String, Value> = serde_json::from_str(&id.claims_json).unwrap();
    for k in [
        "sub", "sid", "iss", "exp", "iat", "nbf", "v", "o", "fea", "pla", "fva", "sts", "azp",
        "jti",
    ] {
        assert!(claims.contains_key(k), "claim {k} missing");
    }
    // The Struct form only when asked for.
    assert!(id.claims.is_none(), "a Struct nobody asked for");
    let with_struct = h
        .verify_req(VerifyTokenRequest {
            token: token.clone(),
            claims_struct: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let fields = with_struct.claims.unwrap().fields;
    assert_eq!(fields.len(), claims.len());
    assert_eq!(
        fields["sub"].kind,
        Some(prost_types::value::Kind::StringValue(
            claims["sub"].as_str().unwrap().to_owned()
        ))
    );
}

#[tokio::test]
async fn valid_v1_token_decodes_org_claims() {
    let h = Harness::start().await;
    let token = h.mint(&TokenSpec {
        v1: true,
        org: Some(org_spec()),
        ..Default::default()
    });
    let id = h.verify(&token).await.expect("valid");
    assert_eq!(id.claims_version, 1);
    assert_eq!(id.session_status(), SessionStatus::Unspecified);
    let org = id.organization.unwrap();
    assert_eq!(org.role, "org:admin");
    assert_eq!(org.slug, "acme");
    assert_eq!(
        org.permissions,
        [
            "org:invoices:read",
            "org:invoices:write",
            "org:teams:manage"
        ]
    );
}

#[tokio::test]
async fn expiry_and_clock_skew() {
    let h = Harness::start().await;
    let expired = h.mint(&TokenSpec {
        expires_in: Some(-60),
        ..Default::default()
    });
    assert_rejected(
        h.verify(&expired).await,
        Code::Unauthenticated,
        "TOKEN_EXPIRED",
        &expired,
    );
    // Expired 2 s ago: within the default 5 s skew.
    let within = h.mint(&TokenSpec {
        expires_in: Some(-2),
        ..Default::default()
    });
    h.verify(&within).await.expect("within skew");
}

#[tokio::test]
async fn nbf_and_iat_in_the_future_have_distinct_reasons() {
    let h = Harness::start().await;
    let t = now();
    let mut spec = TokenSpec::default();
    spec.extra_claims.insert("nbf".into(), json!(t + 60));
    spec.extra_claims.insert("iat".into(), json!(t));
    let nbf = h.mint(&spec);
    assert_rejected(
        h.verify(&nbf).await,
        Code::Unauthenticated,
        "TOKEN_NOT_ACTIVE_YET",
        &nbf,
    );

    let mut spec = TokenSpec::default();
    spec.extra_claims.insert("iat".into(), json!(t + 60));
    let iat = h.mint(&spec);
    assert_rejected(
        h.verify(&iat).await,
        Code::Unauthenticated,
        "TOKEN_IAT_IN_THE_FUTURE",
        &iat,
    );

    // Both ahead: nbf is checked first.
    spec.extra_claims.insert("nbf".into(), json!(t + 60));
    let both = h.mint(&spec);
    assert_rejected(
        h.verify(&both).await,
        Code::Unauthenticated,
        "TOKEN_NOT_ACTIVE_YET",
        &both,
    );

    // 3 s ahead is within the skew.
    let mut spec = TokenSpec::default();
    spec.extra_claims.insert("nbf".into(), json!(t + 3));
    spec.extra_claims.insert("iat".into(), json!(t + 3));
    h.verify(&h.mint(&spec)).await.expect("within skew");
}

#[tokio::test]
async fn authorized_parties_wrong_missing_and_per_call_override() {
    let h = Harness::start_with(|_, c| {
        c.verifier.validation.authorized_parties = vec!["https://app.example".into()];
    })
    .await;
    let good = h.mint(&TokenSpec {
        azp: Some("https://app.example".into()),
        ..Default::default()
    });
    h.verify(&good).await.expect("azp allowed");
    let wrong = h.mint(&TokenSpec {
        azp: Some("https://evil.example".into()),
        ..Default::default()
    });
    assert_rejected(
        h.verify(&wrong).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_AUTHORIZED_PARTIES",
        &wrong,
    );
    let slash = h.mint(&TokenSpec {
        azp: Some("https://app.example/".into()),
        ..Default::default()
    });
    assert_rejected(
        h.verify(&slash).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_AUTHORIZED_PARTIES",
        &slash,
    );
    let missing = h.mint(&TokenSpec::default());
    assert_rejected(
        h.verify(&missing).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_AUTHORIZED_PARTIES",
        &missing,
    );
    // The request's list replaces the configured one.
    let req = |t: &str| VerifyTokenRequest {
        token: t.into(),
        authorized_parties: vec!["https://evil.example".into()],
        ..Default::default()
    };
    h.verify_req(req(&wrong))
        .await
        .expect("per-call override allows it");
    assert_rejected(
        h.verify_req(req(&good)).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_AUTHORIZED_PARTIES",
        &good,
    );
}

#[tokio::test]
async fn oversized_or_empty_authorized_parties_are_malformed_requests() {
    let h = Harness::start().await;
    let t = h.mint(&TokenSpec {
        azp: Some("https://app.example".into()),
        ..Default::default()
    });
    for parties in [
        vec!["https://app.example".to_owned(); 65],
        vec![String::new()],
        vec![format!("https://{}.example", "a".repeat(2100))],
    ] {
        let r = h
            .verify_req(VerifyTokenRequest {
                token: t.clone(),
                authorized_parties: parties,
                ..Default::default()
            })
            .await;
        assert_rejected(r, Code::InvalidArgument, "INVALID_REQUEST", &t);
    }
    // 64 entries is within bounds.
    let r = h
        .verify_req(VerifyTokenRequest {
            token: t.clone(),
            authorized_parties: vec!["https://app.example".to_owned(); 64],
            ..Default::default()
        })
        .await;
    r.expect("64 parties are accepted");
}

#[tokio::test]
async fn no_authorized_parties_configured_accepts_missing_azp() {
    let h = Harness::start().await;
    h.verify(&h.mint(&TokenSpec::default()))
        .await
        .expect("no azp check by default");
}

#[tokio::test]
async fn unknown_kid_is_a_kid_mismatch() {
    let h = Harness::start().await;
    let stranger = SigningKey::generate().unwrap();
    let token = stranger.sign_jwt(
        &json!({"alg": "RS256", "kid": stranger.kid(), "typ": "JWT"}),
        &claims_of(&h, &TokenSpec::default()),
        Alg::RS256,
    );
    assert_rejected(
        h.verify(&token).await,
        Code::Unauthenticated,
        "JWK_KID_MISMATCH",
        &token,
    );
    // A token without a kid cannot select a JWKS key either.
    let no_kid = h.clerk.sign(
        &json!({"alg": "RS256", "typ": "JWT"}),
        &claims_of(&h, &TokenSpec::default()),
        Alg::RS256,
    );
    assert_rejected(
        h.verify(&no_kid).await,
        Code::Unauthenticated,
        "JWK_KID_MISMATCH",
        &no_kid,
    );
}

#[tokio::test]
async fn rotated_key_one_refetch_then_valid_for_concurrent_callers() {
    let h = Harness::start().await;
    assert_eq!(h.clerk.jwks_requests(), 1, "the startup fetch");
    let old = h.mint(&TokenSpec::default());
    h.clerk.rotate().await.unwrap();
    let tokens: Vec<String> = (0..20).map(|_| h.mint(&TokenSpec::default())).collect();
    let results = futures::future::join_all(tokens.iter().map(|t| h.verify(t))).await;
    for r in results {
        r.expect("rotated key verifies after one refetch");
    }
    assert_eq!(
        h.clerk.jwks_requests(),
        2,
        "exactly one refetch for all concurrent misses"
    );
    // The old key is still published and still verifies.
    h.verify(&old).await.expect("old key still valid");
    assert_eq!(h.clerk.jwks_requests(), 2);
}

#[tokio::test]
async fn tampered_payload_and_signature_are_invalid_signatures() {
    let h = Harness::start().await;
    let token = h.mint(&TokenSpec {
        user_id: Some("user_alice".into()),
        ..Default::default()
    });
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = "user_mallory".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap()),
        parts[2]
    );
    assert_rejected(
        h.verify(&tampered).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_SIGNATURE",
        &tampered,
    );
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 0x01;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig));
    assert_rejected(
        h.verify(&bad_sig).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_SIGNATURE",
        &bad_sig,
    );
    // A truncated signature too.
    let short = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..40]);
    assert_rejected(
        h.verify(&short).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_SIGNATURE",
        &short,
    );
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn algorithm_attacks_are_refused() {
    let h = Harness::start().await;
    let kid = h.clerk.kid();
    let claims = claims_of(&h, &TokenSpec::default());

    // alg: none, empty signature.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": kid, "typ": "JWT"})),
        b64(&claims)
    );
    assert_rejected(
        h.verify(&none).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_ALGORITHM",
        &none,
    );

    // HS256 signed with the public key as the HMAC secret (key confusion).
    let jwk = h.clerk.current_key().jwk();
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    for secret in [serde_json::to_vec(&jwk).unwrap(), n] {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": "HS256", "kid": kid, "typ": "JWT"})),
            b64(&claims)
        );
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
        let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        let hs = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        assert_rejected(
            h.verify(&hs).await,
            Code::Unauthenticated,
            "TOKEN_INVALID_ALGORITHM",
            &hs,
        );
    }

    // RS512 correctly signed with the instance key, but the JWKS declares RS256.
    let rs512 = h.clerk.sign(
        &json!({"alg": "RS512", "kid": kid, "typ": "JWT"}),
        &claims,
        Alg::RS512,
    );
    assert_rejected(
        h.verify(&rs512).await,
        Code::Unauthenticated,
        "TOKEN_VERIFICATION_FAILED",
        &rs512,
    );
    // RS256 header over an RS512 signature.
    let mixed = h.clerk.sign(
        &json!({"alg": "RS256", "kid": kid, "typ": "JWT"}),
        &claims,
        Alg::RS512,
    );
    assert_rejected(
        h.verify(&mixed).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_SIGNATURE",
        &mixed,
    );

    // ES256 with a P-256 key.
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let ec = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let _ = ec.public_key();
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": "ES256", "kid": kid, "typ": "JWT"})),
        b64(&claims)
    );
    let sig = ec.sign(&rng, input.as_bytes()).unwrap();
    let es = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    assert_rejected(
        h.verify(&es).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_ALGORITHM",
        &es,
    );

    // PS256 and lowercase rs256 are not on the list; a missing alg neither.
    for alg in [json!("PS256"), json!("rs256"), Value::Null] {
        let mut header = json!({"kid": kid, "typ": "JWT"});
        if !alg.is_null() {
            header["alg"] = alg;
        }
        let t = h.clerk.sign(&header, &claims, Alg::RS256);
        assert_rejected(
            h.verify(&t).await,
            Code::Unauthenticated,
            "TOKEN_INVALID_ALGORITHM",
            &t,
        );
    }
}

#[tokio::test]
async fn malformed_tokens() {
    let h = Harness::start().await;
    let good = h.mint(&TokenSpec::default());
    let p: Vec<&str> = good.split('.').collect();
    let header = p[0];
    let cases = [
        format!("{}.{}", p[0], p[1]),
        format!("{good}.{}", p[2]),
        format!("{}.%%%.{}", header, p[2]),
        format!("{}.{}.{}", header, URL_SAFE_NO_PAD.encode("not json"), p[2]),
        format!("{}.{}.{}", header, URL_SAFE_NO_PAD.encode("null"), p[2]),
        format!("{}.{}.{}", URL_SAFE_NO_PAD.encode("[1,2]"), p[1], p[2]),
        format!(" {good}"),
        format!("{good} "),
        format!("{good}\n"),
        format!("Bearer {good}"),
        "garbage".into(),
        "...".into(),
    ];
    for t in &cases {
        assert_rejected(h.verify(t).await, Code::Unauthenticated, "TOKEN_INVALID", t);
    }
    // Empty and oversized tokens are malformed requests.
    assert_rejected(
        h.verify("").await,
        Code::InvalidArgument,
        "INVALID_REQUEST",
        "",
    );
    let huge = format!("{}.{}.{}", header, "A".repeat(16 * 1024), p[2]);
    assert_rejected(
        h.verify(&huge).await,
        Code::InvalidArgument,
        "INVALID_REQUEST",
        &huge,
    );
    // Payload that is a JSON array: signed correctly, no string sub.
    let arr = h
        .clerk
        .sign(&h.clerk.session_header(), &json!([1, 2]), Alg::RS256);
    assert_rejected(
        h.verify(&arr).await,
        Code::Unauthenticated,
        "TOKEN_VERIFICATION_FAILED",
        &arr,
    );
    // Claims of the wrong type.
    for (k, v) in [
        ("sub", json!(42)),
        ("exp", json!("soon")),
        ("nbf", json!("x")),
        ("iat", json!([])),
    ] {
        let mut spec = TokenSpec::default();
        spec.extra_claims.insert(k.into(), v);
        let t = h.mint(&spec);
        assert_rejected(
            h.verify(&t).await,
            Code::Unauthenticated,
            "TOKEN_VERIFICATION_FAILED",
            &t,
        );
    }
    // typ must be absent or exactly JWT.
    for typ in [json!("jwt"), json!("JOSE"), json!(1)] {
        let mut spec = TokenSpec::default();
        spec.extra_header.insert("typ".into(), typ);
        let t = h.mint(&spec);
        assert_rejected(
            h.verify(&t).await,
            Code::Unauthenticated,
            "TOKEN_INVALID",
            &t,
        );
    }
    let mut spec = TokenSpec::default();
    spec.extra_header.insert("typ".into(), Value::Null);
    h.verify(&h.mint(&spec)).await.expect("typ may be absent");
    // Unknown header fields are fine.
    let mut spec = TokenSpec::default();
    spec.extra_header.insert("oiat".into(), json!(1));
    spec.extra_header.insert("x-future".into(), json!("y"));
    h.verify(&h.mint(&spec))
        .await
        .expect("unknown header fields are ignored");
    // A fea entry without a scope fails where Clerk's auth object throws: a v2 token with `o`.
    let mut spec = TokenSpec {
        org: Some(org_spec()),
        ..TokenSpec::default()
    };
    spec.extra_claims.insert("fea".into(), json!("o:a,broken"));
    let t = h.mint(&spec);
    assert_rejected(
        h.verify(&t).await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
        &t,
    );
    // Without an active organization Clerk does not split `fea`: the token verifies, with no
    // features (every has({ feature }) is false, as Clerk's).
    let mut spec = TokenSpec::default();
    spec.extra_claims.insert("fea".into(), json!("o:a,broken"));
    spec.extra_claims.insert("pla".into(), json!("nocolon"));
    let id = h
        .verify(&h.mint(&spec))
        .await
        .expect("malformed fea without o");
    let features = id.features.unwrap_or_default();
    assert!(features.user.is_empty() && features.organization.is_empty());
}

#[tokio::test]
async fn machine_and_template_tokens_are_type_mismatches() {
    let h = Harness::start().await;
    for cat in [CAT_M2M, CAT_TEMPLATE, "cl_unknown"] {
        let mut spec = TokenSpec::default();
        spec.extra_header.insert("cat".into(), json!(cat));
        let t = h.mint(&spec);
        assert_rejected(
            h.verify(&t).await,
            Code::Unauthenticated,
            "TOKEN_TYPE_MISMATCH",
            &t,
        );
    }
    // The ignore marker and a missing cat are session tokens.
    for cat in [json!(CAT_IGNORE), Value::Null] {
        let mut spec = TokenSpec::default();
        spec.extra_header.insert("cat".into(), cat);
        h.verify(&h.mint(&spec)).await.expect("session category");
    }
    // An M2M JWT (sub mch_…) and an OAuth JWT (typ at+jwt).
    let m2m = h.mint(&TokenSpec {
        user_id: Some("mch_2vYVtest".into()),
        ..Default::default()
    });
    assert_rejected(
        h.verify(&m2m).await,
        Code::Unauthenticated,
        "TOKEN_TYPE_MISMATCH",
        &m2m,
    );
    let mut spec = TokenSpec::default();
    spec.extra_header.insert("typ".into(), json!("at+jwt"));
    let oauth = h.mint(&spec);
    assert_rejected(
        h.verify(&oauth).await,
        Code::Unauthenticated,
        "TOKEN_TYPE_MISMATCH",
        &oauth,
    );
    // A caller that accepts only M2M tokens refuses a session token.
    let session = h.mint(&TokenSpec::default());
    let r = h
        .verify_req(VerifyTokenRequest {
            token: session.clone(),
            accepted_token_types: vec![TokenType::M2mToken as i32],
            ..Default::default()
        })
        .await;
    assert_rejected(r, Code::Unauthenticated, "TOKEN_TYPE_MISMATCH", &session);
    // Unknown enum values are a malformed request.
    let r = h
        .verify_req(VerifyTokenRequest {
            token: session.clone(),
            accepted_token_types: vec![99],
            ..Default::default()
        })
        .await;
    assert_rejected(r, Code::InvalidArgument, "INVALID_REQUEST", &session);
}

#[tokio::test]
async fn pending_sessions_need_explicit_acceptance() {
    let h = Harness::start().await;
    let t = h.mint(&TokenSpec {
        session_status: Some("pending".into()),
        ..Default::default()
    });
    assert_rejected(
        h.verify(&t).await,
        Code::Unauthenticated,
        "SESSION_PENDING",
        &t,
    );
    let id = h
        .verify_req(VerifyTokenRequest {
            token: t.clone(),
            accept_pending_session: true,
            ..Default::default()
        })
        .await
        .expect("accepted when asked");
    assert_eq!(id.session_status(), SessionStatus::Pending);
    // The cached acceptance does not leak into a call that does not accept pending sessions.
    assert_rejected(
        h.verify(&t).await,
        Code::Unauthenticated,
        "SESSION_PENDING",
        &t,
    );
}

#[tokio::test]
async fn issuer_pinning_and_audience() {
    let h = Harness::start_with(|clerk, c| {
        c.verifier.validation.issuer = Some(clerk.url());
        c.verifier.validation.audience = vec!["api://orders".into()];
    })
    .await;
    h.verify(&h.mint(&TokenSpec::default()))
        .await
        .expect("right issuer, no aud");
    let mut spec = TokenSpec::default();
    spec.extra_claims
        .insert("iss".into(), json!("https://clerk.other.example"));
    let t = h.mint(&spec);
    assert_rejected(
        h.verify(&t).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_ISSUER",
        &t,
    );
    let mut spec = TokenSpec::default();
    spec.extra_claims
        .insert("aud".into(), json!(["api://billing", "api://orders"]));
    h.verify(&h.mint(&spec))
        .await
        .expect("one audience matches");
    spec.extra_claims
        .insert("aud".into(), json!("api://billing"));
    let t = h.mint(&spec);
    assert_rejected(
        h.verify(&t).await,
        Code::Unauthenticated,
        "TOKEN_VERIFICATION_FAILED",
        &t,
    );
}

#[tokio::test]
async fn verdict_cache_hits_and_still_expires_on_time() {
    let h = Harness::start_with(|_, c| c.verifier.validation.clock_skew_ms = 0).await;
    let t = h.mint(&TokenSpec::default());
    for _ in 0..10 {
        h.verify(&t).await.unwrap();
    }
    let s = h.verifier.stats();
    assert_eq!(s.full_verifications, 1);
    assert_eq!(s.cache_hits, 9);

    // A token that expires in ~1 s: cached while valid, refused once expired.
    let short = h.mint(&TokenSpec {
        expires_in: Some(1),
        ..Default::default()
    });
    h.verify(&short).await.expect("valid now");
    let exp = (now() + 1) as u64;
    // Wait for the wall clock to pass exp (no event signals the passing of time).
    while (now() as u64) <= exp {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_rejected(
        h.verify(&short).await,
        Code::Unauthenticated,
        "TOKEN_EXPIRED",
        &short,
    );
}

#[tokio::test]
async fn disabled_cache_verifies_every_time() {
    let h = Harness::start_with(|_, c| c.verifier.cache_capacity = 0).await;
    let t = h.mint(&TokenSpec::default());
    for _ in 0..5 {
        h.verify(&t).await.unwrap();
    }
    assert_eq!(h.verifier.stats().full_verifications, 5);
    assert_eq!(h.verifier.stats().cache_hits, 0);
}

// --- Issue 12: OAuth `aud`, base64url trailing bits, whole-second times (Clerk's verdicts).

/// A token over exactly these (already encoded) segments, signed as given.
fn sign_segments(h: &Harness, header: &str, payload: &str) -> String {
    let input = format!("{header}.{payload}");
    let sig = h.clerk.current_key().sign_raw(&input, Alg::RS256);
    format!("{input}.{sig}")
}

fn oauth_jwt(h: &Harness, aud: Option<Value>) -> String {
    let mut claims = json!({
        "sub": "user_oauth",
        "client_id": "client_1",
        "exp": now() + 600,
        "iat": now() - 1,
        "jti": "oat_jwt_1",
    });
    if let Some(aud) = aud {
        claims["aud"] = aud;
    }
    let header = json!({"alg": "RS256", "kid": h.clerk.kid(), "typ": "at+jwt"});
    h.clerk.sign(&header, &claims, Alg::RS256)
}

async fn verify_oauth(
    h: &Harness,
    token: &str,
) -> Result<clerk_grpc_auth::pb::Identity, tonic::Status> {
    h.verify_req(VerifyTokenRequest {
        token: token.into(),
        accepted_token_types: vec![TokenType::OauthToken as i32],
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn oauth_jwt_audience_is_enforced_when_configured() {
    let h = Harness::start_with(|_, c| {
        c.verifier.validation.audience = vec!["api://orders".into()];
    })
    .await;
    for aud in [
        None,
        Some(json!("https://other")),
        Some(json!("")),
        Some(json!([])),
        Some(json!(["api://orders", ""])),
        Some(json!(["api://orders", 1])),
        Some(json!(null)),
    ] {
        let t = oauth_jwt(&h, aud.clone());
        assert_rejected(
            verify_oauth(&h, &t).await,
            Code::Unauthenticated,
            "TOKEN_VERIFICATION_FAILED",
            &t,
        );
    }
    for aud in [
        json!("api://orders"),
        json!(["https://other", "api://orders"]),
    ] {
        let id = verify_oauth(&h, &oauth_jwt(&h, Some(aud.clone())))
            .await
            .unwrap_or_else(|s| panic!("{aud}: {s:?}"));
        assert_eq!(id.token_type(), TokenType::OauthToken);
        assert_eq!(id.user_id, "user_oauth");
    }
    // Without a configured audience, `aud` is not looked at.
    let open = Harness::start().await;
    for aud in [None, Some(json!("https://other"))] {
        verify_oauth(&open, &oauth_jwt(&open, aud))
            .await
            .expect("no audience configured");
    }
}

#[tokio::test]
async fn signature_trailing_bits_are_refused_and_padding_accepted() {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let h = Harness::start().await;
    let good = h.mint(&TokenSpec::default());
    h.verify(&good).await.expect("the original verifies");
    let (input, sig) = good.rsplit_once('.').unwrap();
    assert_eq!(
        sig.len() % 4,
        2,
        "a 2048-bit signature leaves 4 unused bits"
    );
    let last = ALPHABET
        .iter()
        .position(|&c| c == *sig.as_bytes().last().unwrap())
        .unwrap();
    for k in 1..16 {
        let c = ALPHABET[(last & !0x0F) | k] as char;
        let t = format!("{input}.{}{c}", &sig[..sig.len() - 1]);
        assert_rejected(
            h.verify(&t).await,
            Code::Unauthenticated,
            "TOKEN_INVALID",
            &t,
        );
    }
    // Over-padding (Clerk's loose decoder drops every trailing `=`).
    for pad in ["==", "==="] {
        h.verify(&format!("{good}{pad}"))
            .await
            .unwrap_or_else(|s| panic!("{pad}: {s:?}"));
    }
    // Padded header and payload, signed as sent.
    let (h64, rest) = input.split_once('.').unwrap();
    let t = sign_segments(&h, &format!("{h64}==="), &format!("{rest}="));
    h.verify(&t).await.expect("padded segments");
}

#[tokio::test]
async fn fractional_times_are_whole_seconds() {
    let h = Harness::start().await;
    let n = now() as f64;
    let session = |claims: Value| h.clerk.sign(&h.clerk.session_header(), &claims, Alg::RS256);
    // exp = now − 4.1 s: Clerk truncates to now − 5 s, expired with the 5 s skew.
    let t = session(json!({"sub": "user_1", "exp": n - 4.1, "iat": n - 60.0}));
    assert_rejected(
        h.verify(&t).await,
        Code::Unauthenticated,
        "TOKEN_EXPIRED",
        &t,
    );
    // nbf = now + 5.9 s: truncated to now + 5 s, active with the skew.
    let t = session(json!({"sub": "user_1", "exp": n + 60.0, "nbf": n + 5.9}));
    h.verify(&t).await.expect("nbf within skew once truncated");
    // iat likewise.
    let t = session(json!({"sub": "user_1", "exp": n + 60.0, "iat": n + 5.9}));
    h.verify(&t).await.expect("iat within skew once truncated");
    // exp = 1e400 is Infinity in JS: an Invalid Date, never expired (Clerk accepts it).
    let header = URL_SAFE_NO_PAD.encode(h.clerk.session_header().to_string());
    let payload = URL_SAFE_NO_PAD.encode(r#"{"sub":"user_1","exp":1e400}"#);
    let t = sign_segments(&h, &header, &payload);
    let id = h.verify(&t).await.expect("exp 1e400");
    assert!(id.expires_at.is_none(), "no finite expiry");
}
