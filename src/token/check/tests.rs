//! Conformance: every vector of Clerk's own SDK fixtures (`tests/data/clerk-fixtures.json`,
//! a copy of `shared/conformance/clerk-fixtures.json`) at its fixed clock.

use super::*;
use crate::token::{identity::SessionStatus, keys::VerifyingKey};

const FIXTURES: &str = include_str!("../../../tests/data/clerk-fixtures.json");

fn fx() -> Value {
    serde_json::from_str(FIXTURES).unwrap()
}

fn token(name: &str) -> String {
    fx()["tokens"][name]["raw"].as_str().unwrap().to_owned()
}

fn clock(name: &str) -> i64 {
    fx()["tokens"][name]["test_clock_ms"].as_i64().unwrap()
}

fn mock_jwks() -> KeySet {
    let doc = serde_json::to_vec(&fx()["keys"]["mockJwks"]["value"]).unwrap();
    KeySet::from_jwks_json(&doc).unwrap().0
}

fn verifier(parties: &[&str], skew: u64) -> Verifier {
    Verifier::new(Validation {
        clock_skew_ms: skew,
        authorized_parties: parties.iter().map(|s| s.to_string()).collect(),
        ..Validation::default()
    })
}

fn reason(r: Result<Identity, VerifyError>) -> Reason {
    r.expect_err("expected a rejection").reason
}

const AZP: &str = "https://accounts.inspired.puma-74.lcl.dev";

#[test]
fn mock_jwt_verifies_with_authorized_parties_and_decodes_unchanged() {
    let f = fx();
    let id = verifier(&[AZP], DEFAULT_CLOCK_SKEW_MS)
        .verify(
            &token("mockJwt"),
            &mock_jwks(),
            &VerifyOptions::default(),
            clock("mockJwt"),
        )
        .unwrap();
    let payload = &f["tokens"]["mockJwt"]["payload"];
    assert_eq!(Value::Object(id.claims().clone()), *payload);
    assert_eq!(id.user_id, payload["sub"].as_str().unwrap());
    assert_eq!(id.session_id.as_deref(), payload["sid"].as_str());
    assert_eq!(id.issuer.as_deref(), payload["iss"].as_str());
    assert_eq!(id.authorized_party.as_deref(), Some(AZP));
    assert_eq!(id.expires_at, payload["exp"].as_f64().unwrap());
    assert_eq!(id.not_before, payload["nbf"].as_f64());
    assert_eq!(id.issued_at, payload["iat"].as_f64());
    assert_eq!(id.claims_version, 1);
    assert_eq!(id.token_type, TokenType::SessionToken);
    assert_eq!(id.organization, None);
    // signedJwt is the same string.
    assert_eq!(token("signedJwt"), token("mockJwt"));
}

#[test]
fn mock_jwt_validity_window_and_expectations() {
    let f = fx();
    let t = token("mockJwt");
    let keys = mock_jwks();
    let o = VerifyOptions::default();
    let win = &f["tokens"]["mockJwt"]["validity_window_default_skew"];
    let from = win["valid_from_ms_inclusive"].as_i64().unwrap();
    let until = win["valid_until_ms_exclusive"].as_i64().unwrap();
    let v = verifier(&[], DEFAULT_CLOCK_SKEW_MS);
    assert!(v.verify(&t, &keys, &o, from).is_ok());
    assert!(v.verify(&t, &keys, &o, until - 1).is_ok());
    assert_eq!(reason(v.verify(&t, &keys, &o, until)), Reason::TokenExpired);
    // Before the window (set by iat here): iat in the future; earlier than nbf - skew, nbf
    // (checked before iat) is the reason.
    assert_eq!(
        reason(v.verify(&t, &keys, &o, from - 1)),
        Reason::TokenIatInTheFuture
    );
    let nbf_ms = f["tokens"]["mockJwt"]["payload"]["nbf"].as_i64().unwrap() * 1000;
    assert!(v.verify(&t, &keys, &o, nbf_ms - 5000).is_err());
    assert_eq!(
        reason(v.verify(&t, &keys, &o, nbf_ms - 5001)),
        Reason::TokenNotActiveYet
    );

    let exp_ms = f["tokens"]["mockJwt"]["payload"]["exp"].as_i64().unwrap() * 1000;
    assert!(
        v.verify(&t, &keys, &o, exp_ms + 1000).is_ok(),
        "at_exp_plus_1s_default_skew"
    );
    assert_eq!(
        reason(verifier(&[], 0).verify(&t, &keys, &o, exp_ms + 1000)),
        Reason::TokenExpired,
        "at_exp_plus_1s_skew_0"
    );
    assert_eq!(
        reason(v.verify(&t, &keys, &o, exp_ms + 60_000)),
        Reason::TokenExpired
    );
}

#[test]
fn expired_invalid_signature_and_malformed_fixtures() {
    let keys = mock_jwks();
    let o = VerifyOptions::default();
    let v = verifier(&[], DEFAULT_CLOCK_SKEW_MS);
    assert_eq!(
        reason(v.verify(&token("mockExpiredJwt"), &keys, &o, clock("mockExpiredJwt"))),
        Reason::TokenExpired
    );
    assert_eq!(
        reason(v.verify(
            &token("mockInvalidSignatureJwt"),
            &keys,
            &o,
            clock("mockInvalidSignatureJwt")
        )),
        Reason::TokenInvalidSignature
    );
    // Signature is checked before claims: the missing `sub` is never reached.
    assert_eq!(
        reason(v.verify(
            &token("mockMalformedJwt"),
            &keys,
            &o,
            clock("mockMalformedJwt")
        )),
        Reason::TokenInvalidSignature
    );
}

#[test]
fn oauth_and_m2m_jwts_are_type_mismatches_on_the_session_path() {
    let keys = mock_jwks();
    let v = verifier(&[], DEFAULT_CLOCK_SKEW_MS);
    for name in [
        "mockSignedOAuthAccessTokenJwt",
        "mockSignedOAuthAccessTokenJwtApplicationTyp",
        "derived_m2m_jwt",
    ] {
        let t = token(name);
        let d = Decoded::parse(&t).unwrap();
        let expected = if name.starts_with("derived_m2m") {
            TokenType::M2mToken
        } else {
            TokenType::OauthToken
        };
        assert_eq!(d.token_type(), expected, "{name}");
        assert_eq!(
            reason(v.verify(&t, &keys, &VerifyOptions::default(), 1666648250000)),
            Reason::TokenTypeMismatch,
            "{name}"
        );
    }
}

#[test]
fn derived_v2_session_token_decodes_like_the_js_sdk() {
    let f = fx();
    let exp = &f["tokens"]["derived_v2_session_jwt"]["expected"];
    let id = verifier(&[AZP], DEFAULT_CLOCK_SKEW_MS)
        .verify(
            &token("derived_v2_session_jwt"),
            &mock_jwks(),
            &VerifyOptions::default(),
            clock("derived_v2_session_jwt"),
        )
        .unwrap();
    let org = id.organization.clone().unwrap();
    assert_eq!(org.id, exp["orgId"].as_str().unwrap());
    assert_eq!(org.role.as_deref(), exp["orgRole"].as_str());
    assert_eq!(org.slug.as_deref(), exp["orgSlug"].as_str());
    let js: Vec<&str> = exp["orgPermissions_js"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(org.permissions, js);
    assert_eq!(id.claims_version, 2);
    assert_eq!(id.session_status, Some(SessionStatus::Active));
    assert_eq!(id.factor_verification_age, Some([3, -1]));
    assert_eq!(
        id.features.organization,
        ["reservations", "support-chat", "impersonation"]
    );
    assert_eq!(id.features.user, ["dashboard", "support-chat"]);
    assert_eq!(id.plans.user, ["pro"]);
    assert_eq!(id.plans.organization, ["business"]);
}

fn expand_per(per: &str) -> String {
    if per.starts_with("permission_0") {
        (0..54)
            .map(|i| format!("permission_{i}"))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        per.to_owned()
    }
}

#[test]
fn every_fpm_decode_vector() {
    let f = fx();
    let cases = f["decode_vectors"]["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 17);
    for c in cases {
        let fea = crate::token::identity::split_by_scope(c["fea"].as_str())
            .unwrap()
            .organization;
        let per = c["per"].as_str().map(expand_per);
        let got = crate::token::identity::decode_fpm(&fea, per.as_deref(), c["fpm"].as_str());
        let want = c.get("expected").or(c.get("expected_ordered")).unwrap();
        let want: Vec<&str> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(got, want, "case {c}");
    }
    let av = &f["decode_vectors"]["authObjects_vector"];
    let fea = crate::token::identity::split_by_scope(av["fea"].as_str())
        .unwrap()
        .organization;
    let got = crate::token::identity::decode_fpm(&fea, av["per"].as_str(), av["fpm"].as_str());
    let want: Vec<&str> = av["expected_js"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn pem_keys_derive_the_expected_jwk_and_verify_networkless() {
    let f = fx();
    let keys = &f["keys"];
    let want_n = keys["mockPEMJwk"]["value"]["n"].as_str().unwrap();
    let want_e = keys["mockPEMJwk"]["value"]["e"].as_str().unwrap();
    for name in ["mockPEMKey", "mockPEMJwtKey"] {
        let k = VerifyingKey::from_pem(keys[name]["value"].as_str().unwrap()).unwrap();
        assert_eq!(k.n_b64(), want_n, "{name}");
        assert_eq!(k.e_b64(), want_e, "{name}");
        assert_eq!(k.bits(), 2048);
    }
    // The PEM of mockRsaJwk verifies mockJwt whatever its kid (networkless mode).
    let pem =
        VerifyingKey::from_pem(keys["pemEncodedPublicKey"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        pem.n_b64(),
        keys["mockRsaJwk"]["value"]["n"].as_str().unwrap()
    );
    let set = KeySet::single(pem);
    let v = verifier(&[], DEFAULT_CLOCK_SKEW_MS);
    assert!(v
        .verify(
            &token("mockJwt"),
            &set,
            &VerifyOptions::default(),
            clock("mockJwt")
        )
        .is_ok());
    // An unrelated key: the signature check is false, not an error.
    let other =
        VerifyingKey::from_pem(keys["someOtherPublicKey"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        reason(v.verify(
            &token("mockJwt"),
            &KeySet::single(other),
            &VerifyOptions::default(),
            clock("mockJwt")
        )),
        Reason::TokenInvalidSignature
    );
}

#[test]
fn static_jwks_fixture_with_odd_exponent_parses() {
    let doc = serde_json::to_vec(&fx()["keys"]["jwks.json"]["value"]).unwrap();
    let (set, skipped) = KeySet::from_jwks_json(&doc).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(set.kids(), ["ins_1234"]);
}

#[test]
fn public_jwk_without_kid_is_skipped_but_with_kid_verifies() {
    let f = fx();
    let mut jwk = f["keys"]["publicJwks"]["value"].clone();
    let doc = serde_json::json!({ "keys": [jwk.clone()] });
    assert!(KeySet::from_jwks_json(&serde_json::to_vec(&doc).unwrap()).is_err());
    jwk["kid"] = "ins_2GIoQhbUpy0hX7B2cVkuTMinXoD".into();
    let doc = serde_json::json!({ "keys": [jwk] });
    let (set, _) = KeySet::from_jwks_json(&serde_json::to_vec(&doc).unwrap()).unwrap();
    assert!(verifier(&[], DEFAULT_CLOCK_SKEW_MS)
        .verify(
            &token("mockJwt"),
            &set,
            &VerifyOptions::default(),
            clock("mockJwt")
        )
        .is_ok());
}

#[test]
fn azp_rules() {
    let keys = mock_jwks();
    let t = token("mockJwt");
    let now = clock("mockJwt");
    let o = VerifyOptions::default();
    // Exact match only: no normalisation of trailing slash.
    assert_eq!(
        reason(
            verifier(&["https://accounts.inspired.puma-74.lcl.dev/"], 5000)
                .verify(&t, &keys, &o, now)
        ),
        Reason::TokenInvalidAuthorizedParties
    );
    // A per-call override replaces the configured list.
    let parties = vec![AZP.to_owned()];
    let o2 = VerifyOptions {
        authorized_parties: &parties,
        ..o
    };
    assert!(verifier(&["https://other.example"], 5000)
        .verify(&t, &keys, &o2, now)
        .is_ok());
    // The wrong azp on an expired token reports the azp reason (azp before exp).
    assert_eq!(
        reason(verifier(&["https://other.example"], 5000).verify(
            &token("mockExpiredJwt"),
            &keys,
            &o,
            now
        )),
        Reason::TokenInvalidAuthorizedParties
    );
}

#[test]
fn audience_rules() {
    let allowed = vec!["a".to_owned()];
    assert!(audience_ok(None, &allowed));
    assert!(audience_ok(Some(&Value::from("a")), &allowed));
    assert!(!audience_ok(Some(&Value::from("b")), &allowed));
    assert!(audience_ok(Some(&serde_json::json!(["b", "a"])), &allowed));
    assert!(!audience_ok(Some(&serde_json::json!(["b", "c"])), &allowed));
    assert!(audience_ok(Some(&serde_json::json!([1, "b"])), &allowed));
    assert!(audience_ok(Some(&Value::from("b")), &[]));
}

#[test]
fn malformed_tokens_are_token_invalid() {
    let keys = mock_jwks();
    let v = verifier(&[], 5000);
    let good = token("mockJwt");
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        String::new(),
        "garbage".into(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.x"),
        format!(" {good}"),
        format!("{good}\n"),
        format!("Bearer {good}"),
        format!("{}.{}.{}", parts[0], "bm90IGpzb24", parts[2]),
        format!("{}.{}.{}", parts[0], "bnVsbA", parts[2]), // "null"
        format!(
            "{}.{}.{}",
            parts[0],
            parts[1].replace('-', "+").replace('_', "/") + "+/",
            parts[2]
        ),
    ];
    for t in cases {
        assert_eq!(
            reason(v.verify(&t, &keys, &VerifyOptions::default(), 1666648250000)),
            Reason::TokenInvalid,
            "{t:?}"
        );
    }
    // Padded segments are accepted.
    let padded = format!("{}=.{}.{}", parts[0], parts[1], parts[2]);
    let d = Decoded::parse(&padded);
    assert!(d.is_ok());
}

#[test]
fn verify_with_key_enforces_the_token_type_itself() {
    let t = token("derived_m2m_jwt");
    let keys = mock_jwks();
    let d = Decoded::parse(&t).unwrap();
    let key = keys.get(d.kid()).unwrap().clone();
    let r = verifier(&[], DEFAULT_CLOCK_SKEW_MS).verify_with_key(
        d,
        &key,
        &VerifyOptions::default(),
        clock("derived_m2m_jwt"),
    );
    assert_eq!(reason(r), Reason::TokenTypeMismatch);
}

/// Parses a `has` fixture key such as `permission org:a:b`, `reverification strict (fva …)`,
/// `reverification {level:'second_factor',afterMinutes:3}` or `{} (nothing asked)`.
fn has_check(key: &str) -> crate::authz::Check {
    use crate::authz::{Check, Reverification, ReverificationLevel, ReverificationPreset};
    let (kind, rest) = key.split_once(' ').unwrap();
    let value = rest.split(' ').next().unwrap().to_owned();
    match kind {
        "permission" => Check::permission(value),
        "role" => Check::role(value),
        "feature" => Check::feature(value),
        "plan" => Check::plan(value),
        "{}" => Check::default(),
        "reverification" if value.starts_with('{') => {
            let level = if value.contains("second_factor") {
                ReverificationLevel::SecondFactor
            } else if value.contains("multi_factor") {
                ReverificationLevel::MultiFactor
            } else {
                ReverificationLevel::FirstFactor
            };
            let after: f64 = value
                .split("afterMinutes:")
                .nth(1)
                .unwrap()
                .trim_end_matches('}')
                .parse()
                .unwrap();
            Check::reverification(Reverification::Custom {
                level,
                after_minutes: after,
            })
        }
        "reverification" => Check::reverification(Reverification::Preset(
            serde_json::from_value::<ReverificationPreset>(Value::String(value)).unwrap(),
        )),
        other => panic!("unknown has() fixture kind {other}"),
    }
}

#[test]
fn has_matches_every_fixture_expectation() {
    let f = fx();
    let cases = f["tokens"]["derived_v2_session_jwt"]["expected"]["has"]
        .as_object()
        .unwrap();
    assert!(cases.len() >= 20, "fixture lost its has() vectors");
    let id = verifier(&[AZP], DEFAULT_CLOCK_SKEW_MS)
        .verify(
            &token("derived_v2_session_jwt"),
            &mock_jwks(),
            &VerifyOptions::default(),
            clock("derived_v2_session_jwt"),
        )
        .unwrap();
    for (key, want) in cases {
        let check = has_check(key);
        assert_eq!(id.has(&check), want.as_bool().unwrap(), "has({key})");
    }
    // Asking across dimensions is an AND (Clerk #8372): a passing role does not carry a
    // failing feature.
    let mut both = crate::authz::Check::role("member");
    both.feature = Some("org:dashboard".into());
    assert!(!id.has(&both));
    both.feature = Some("org:reservations".into());
    assert!(id.has(&both));
}

#[test]
fn identity_survives_the_wire_unchanged() {
    // The delegated layer rebuilds the identity from VerifyToken's answer: the handler must see
    // the same identity as in-process.
    let name = "derived_v2_session_jwt";
    let id = verifier(&[AZP], DEFAULT_CLOCK_SKEW_MS)
        .verify(
            &token(name),
            &mock_jwks(),
            &VerifyOptions::default(),
            clock(name),
        )
        .unwrap();
    let back = Identity::from_proto(id.to_proto());
    assert_eq!(back.user_id, id.user_id);
    assert_eq!(back.session_id, id.session_id);
    assert_eq!(back.session_status, id.session_status);
    assert_eq!(back.organization, id.organization);
    assert_eq!(back.features, id.features);
    assert_eq!(back.plans, id.plans);
    assert_eq!(back.actor, id.actor);
    assert_eq!(back.factor_verification_age, id.factor_verification_age);
    assert_eq!(
        back.factor_verification_age_exact(),
        id.factor_verification_age_exact()
    );
    assert_eq!(back.issuer, id.issuer);
    assert_eq!(back.authorized_party, id.authorized_party);
    assert_eq!(back.issued_at, id.issued_at);
    assert_eq!(back.expires_at, id.expires_at);
    assert_eq!(back.not_before, id.not_before);
    assert_eq!(back.token_id, id.token_id);
    assert_eq!(back.claims_version, id.claims_version);
    assert_eq!(back.claims(), id.claims());
    assert_eq!(back.token_type, id.token_type);
}

#[test]
fn machine_jwts_decode_like_the_js_sdk() {
    // M2MToken.fromJwtPayload / IdPOAuthAccessToken.fromJwtPayload, at the fixtures' clock.
    let f = fx();
    let keys = mock_jwks();
    let v = verifier(&[AZP], DEFAULT_CLOCK_SKEW_MS);
    let all = [
        TokenType::M2mToken,
        TokenType::OauthToken,
        TokenType::SessionToken,
    ];
    let opts = VerifyOptions {
        accepted_types: &all,
        ..VerifyOptions::default()
    };
    for (name, object_key) in [
        ("derived_m2m_jwt", "M2MToken.fromJwtPayload"),
        (
            "mockSignedOAuthAccessTokenJwt",
            "IdPOAuthAccessToken.fromJwtPayload",
        ),
    ] {
        let exp = &f["tokens"][name]["expected"][object_key];
        // Authorized parties apply to session tokens only: a machine JWT has no azp.
        let id = v.verify(&token(name), &keys, &opts, clock(name)).unwrap();
        let m = id.machine.as_ref().expect("machine fields");
        assert_eq!(id.token_id.as_deref(), exp["id"].as_str(), "{name}");
        assert_eq!(m.subject, exp["subject"].as_str().unwrap(), "{name}");
        let scopes: Vec<&str> = exp["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(m.scopes, scopes, "{name}");
        assert_eq!(
            id.expires_at * 1000.0,
            exp["expiration"].as_f64().unwrap(),
            "{name}"
        );
        assert_eq!(
            id.issued_at.map(|s| s * 1000.0),
            exp["createdAt"].as_f64(),
            "{name}"
        );
        if name == "derived_m2m_jwt" {
            assert_eq!(id.token_type, TokenType::M2mToken);
            assert_eq!(m.machine_id.as_deref(), Some(m.subject.as_str()));
            let claims = Value::Object(id.claims().clone());
            assert_eq!(claims, exp["claims"], "claims = payload minus registered");
        } else {
            assert_eq!(id.token_type, TokenType::OauthToken);
            assert_eq!(m.client_id.as_deref(), exp["clientId"].as_str());
            assert_eq!(id.user_id, m.subject, "OAuth: userId = subject");
        }
        // has() is false for every machine token (§5.2).
        assert!(!id.has(&crate::authz::Check::role("admin")));
    }
    // The application/at+jwt variant is an OAuth token too.
    let id = v
        .verify(
            &token("mockSignedOAuthAccessTokenJwtApplicationTyp"),
            &keys,
            &opts,
            clock("mockSignedOAuthAccessTokenJwtApplicationTyp"),
        )
        .unwrap();
    assert_eq!(id.token_type, TokenType::OauthToken);

    // Past its exp (+ skew): token-verification-failed, cause token-expired (§4.2).
    let late = clock("derived_m2m_jwt") + 3_600_000;
    let e = v
        .verify(&token("derived_m2m_jwt"), &keys, &opts, late)
        .unwrap_err();
    assert_eq!(e.reason, Reason::TokenVerificationFailed);
    assert_eq!(e.cause, Some(Reason::TokenExpired));
}

// --- Issue 12: Clerk's exact decoding, times and OAuth audience, checked against
// @clerk/backend 3.25 (`verifyJwt` / `verifyMachineAuthToken` with `Date.now` fixed at NOW).

const NOW: i64 = 1_700_000_000_000;
const N: f64 = 1_700_000_000.0;

struct Signer {
    key: crate::emulator::SigningKey,
    keys: KeySet,
}

fn signer() -> &'static Signer {
    static S: std::sync::OnceLock<Signer> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let key = crate::emulator::SigningKey::generate().unwrap();
        let doc = serde_json::json!({ "keys": [key.jwk()] }).to_string();
        let keys = KeySet::from_jwks_json(doc.as_bytes()).unwrap().0;
        Signer { key, keys }
    })
}

fn seg(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn header_json(typ: &str) -> String {
    format!(
        r#"{{"alg":"RS256","kid":"{}","typ":"{typ}"}}"#,
        signer().key.kid()
    )
}

/// A token over exactly these segments (already encoded), signed over them as given.
fn signed(h: &str, p: &str) -> String {
    let input = format!("{h}.{p}");
    let sig = signer()
        .key
        .sign_raw(&input, crate::token::keys::Alg::RS256);
    format!("{input}.{sig}")
}

/// A session token with exactly this payload text.
fn session(payload: &str) -> String {
    signed(
        &seg(header_json("JWT").as_bytes()),
        &seg(payload.as_bytes()),
    )
}

fn verdict(token: &str) -> Result<Identity, Reason> {
    verifier(&[], DEFAULT_CLOCK_SKEW_MS)
        .verify(token, &signer().keys, &VerifyOptions::default(), NOW)
        .map_err(|e| e.reason)
}

#[test]
fn base64url_decodes_exactly_as_clerk() {
    // (input, Clerk's base64url.parse(s, { loose: true })), from the SDK.
    let cases: &[(&str, Option<&[u8]>)] = &[
        ("", Some(b"")),
        ("=", Some(b"")),
        ("====", Some(b"")),
        ("QQ", Some(b"A")),
        ("QQ=", Some(b"A")),
        ("QQ==", Some(b"A")),
        ("QQ===", Some(b"A")),
        ("QUI", Some(b"AB")),
        ("QUJD", Some(b"ABC")),
        ("QR", None),   // unused bits 0001
        ("QUJ", None),  // unused bits 01
        ("Q", None),    // one character mod 4
        ("Q===", None), // still one once the padding goes
        ("QUJDR", None),
        ("Q=Q", None), // `=` inside
        ("QQ==QQ", None),
        ("+/", None),
        ("QQ\n", None),
        (" QQ", None),
        ("-_8", Some(&[0xfb, 0xff])),
    ];
    for (input, want) in cases {
        assert_eq!(b64url_clerk(input).as_deref(), *want, "{input:?}");
        let mut buf = [0u8; 8];
        assert_eq!(
            b64url_clerk_in(input, &mut buf).as_deref(),
            *want,
            "{input:?} (in place)"
        );
    }
}

#[test]
fn signature_trailing_bits_are_refused_and_padding_accepted() {
    let good = session(&format!(r#"{{"sub":"user_1","exp":{}}}"#, N + 60.0));
    verdict(&good).expect("the original verifies");
    let (input, sig) = good.rsplit_once('.').unwrap();
    // 256 bytes: 342 characters, the last carrying 2 bits and 4 unused ones.
    assert_eq!(sig.len() % 4, 2);
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = b64url_value(*sig.as_bytes().last().unwrap());
    let mut seen = std::collections::HashSet::new();
    for k in 1..16u8 {
        let c = ALPHABET[usize::from((last & !0x0F) | k)] as char;
        let t = format!("{input}.{}{c}", &sig[..sig.len() - 1]);
        assert!(seen.insert(t.clone()));
        assert_eq!(
            Decoded::parse(&t).unwrap_err().reason,
            Reason::TokenInvalid,
            "{k}"
        );
        assert_eq!(verdict(&t).unwrap_err(), Reason::TokenInvalid, "{k}");
    }
    assert_eq!(seen.len(), 15);
    // Over-padding is stripped, as Clerk's loose decoder does (any number of `=`).
    for pad in ["=", "==", "===", "====", "====="] {
        verdict(&format!("{good}{pad}")).unwrap_or_else(|r| panic!("{pad:?}: {r:?}"));
    }
    // `=` anywhere else is an invalid character.
    let inside = format!("{input}.{}={}", &sig[..10], &sig[10..]);
    assert_eq!(verdict(&inside).unwrap_err(), Reason::TokenInvalid);
    // Padded header and payload, signed as sent (Clerk signs the raw segments).
    let h = seg(header_json("JWT").as_bytes());
    let p = seg(format!(r#"{{"sub":"user_1","exp":{}}}"#, N + 60.0).as_bytes());
    verdict(&signed(&format!("{h}==="), &format!("{p}="))).expect("padded segments");
    // Non-zero unused bits in a signed header or payload are refused too.
    let odd = |s: &str| {
        let unused = match s.len() % 4 {
            2 => 0x0F,
            3 => 0x03,
            _ => return None,
        };
        let last = b64url_value(*s.as_bytes().last().unwrap());
        let c = ALPHABET[usize::from(last | unused)] as char;
        Some(format!("{}{c}", &s[..s.len() - 1]))
    };
    let pad_to = |extra: &str| format!(r#"{{"sub":"user_1","exp":{},"x":"{extra}"}}"#, N + 60.0);
    let p = (0..3)
        .map(|i| seg(pad_to(&"a".repeat(i)).as_bytes()))
        .find(|p| p.len() % 4 != 0)
        .unwrap();
    assert_eq!(
        verdict(&signed(&h, &odd(&p).unwrap())).unwrap_err(),
        Reason::TokenInvalid
    );
    if let Some(h2) = odd(&h) {
        assert_eq!(verdict(&signed(&h2, &p)).unwrap_err(), Reason::TokenInvalid);
    }
}

#[test]
fn times_are_whole_seconds_as_set_utc_seconds_makes_them() {
    let exp = |e: &str| session(&format!(r#"{{"sub":"u","exp":{e}}}"#));
    let with =
        |k: &str, v: &str| session(&format!(r#"{{"sub":"u","exp":{},"{k}":{v}}}"#, N + 60.0));
    let ok = Ok::<(), Reason>(());
    let cases: Vec<(&str, String, Result<(), Reason>)> = vec![
        (
            "exp N-4.1",
            exp(&format!("{}", N - 4.1)),
            Err(Reason::TokenExpired),
        ),
        ("exp N-4", exp(&format!("{}", N - 4.0)), ok),
        (
            "exp N-4.999",
            exp(&format!("{}", N - 4.999)),
            Err(Reason::TokenExpired),
        ),
        (
            "exp N-5",
            exp(&format!("{}", N - 5.0)),
            Err(Reason::TokenExpired),
        ),
        ("exp -0.5", exp("-0.5"), Err(Reason::TokenExpired)),
        ("exp -1.9", exp("-1.9"), Err(Reason::TokenExpired)),
        // Invalid Dates never compare as expired.
        ("exp 1e400", exp("1e400"), ok),
        ("exp -1e400", exp("-1e400"), ok),
        ("exp 1e300", exp("1e300"), ok),
        ("exp 8.64e12", exp("8640000000000"), ok),
        ("exp 8.64e12+1", exp("8640000000001"), ok),
        ("exp -8.64e12-1", exp("-8640000000001"), ok),
        ("nbf N+5.9", with("nbf", &format!("{}", N + 5.9)), ok),
        (
            "nbf N+6",
            with("nbf", &format!("{}", N + 6.0)),
            Err(Reason::TokenNotActiveYet),
        ),
        ("nbf 1e400", with("nbf", "1e400"), ok),
        (
            "nbf 8.64e12",
            with("nbf", "8640000000000"),
            Err(Reason::TokenNotActiveYet),
        ),
        ("nbf 8.64e12+1", with("nbf", "8640000000001"), ok),
        ("iat N+5.9", with("iat", &format!("{}", N + 5.9)), ok),
        (
            "iat N+6",
            with("iat", &format!("{}", N + 6.0)),
            Err(Reason::TokenIatInTheFuture),
        ),
        ("iat 1e400", with("iat", "1e400"), ok),
    ];
    for (name, token, want) in cases {
        assert_eq!(verdict(&token).map(|_| ()), want, "{name}");
    }
    assert_eq!(js_date_ms(-0.5), Some(0.0));
    assert!(js_date_ms(-0.5).unwrap().is_sign_positive());
    assert_eq!(js_date_ms(f64::NAN), None);
    // The verdict cache keeps a token no longer than Clerk would accept it.
    let id = verdict(&exp(&format!("{}", N + 10.9))).unwrap();
    assert_eq!(id.expires_at_ms(), (N + 10.0) * 1000.0);
    let id = verdict(&exp("1e400")).unwrap();
    assert_eq!(id.expires_at_ms(), f64::INFINITY);
}

#[test]
fn oauth_jwt_audience_is_checked_as_assert_oauth_audience_claim() {
    let token = |aud: Option<&str>| {
        let aud = aud.map(|a| format!(r#","aud":{a}"#)).unwrap_or_default();
        signed(
            &seg(header_json("at+jwt").as_bytes()),
            &seg(format!(
                r#"{{"sub":"user_1","client_id":"c","exp":{}{aud}}}"#,
                N + 60.0
            )
            .as_bytes()),
        )
    };
    let all = [TokenType::OauthToken];
    let opts = VerifyOptions {
        accepted_types: &all,
        ..VerifyOptions::default()
    };
    let run = |audience: &[&str], t: &str| {
        Verifier::new(Validation {
            audience: audience.iter().map(|s| s.to_string()).collect(),
            ..Validation::default()
        })
        .verify(t, &signer().keys, &opts, NOW)
    };
    // (aud, with "api://orders" configured), from the SDK.
    let cases: &[(Option<&str>, bool)] = &[
        (None, false),
        (Some(r#""api://orders""#), true),
        (Some(r#""https://other""#), false),
        (Some(r#""""#), false),
        (Some("[]"), false),
        (Some(r#"["api://orders"]"#), true),
        (Some(r#"["x","api://orders"]"#), true),
        (Some(r#"["api://orders",""]"#), false),
        (Some(r#"["api://orders",1]"#), false),
        (Some(r#"[["api://orders"]]"#), false),
        (Some("1"), false),
        (Some("null"), false),
        (Some("{}"), false),
        (Some("true"), false),
        (Some("1e400"), false),
    ];
    for (aud, ok) in cases {
        let t = token(*aud);
        for configured in [&["api://orders"][..], &["", "api://orders"]] {
            match run(configured, &t) {
                Ok(_) => assert!(ok, "{aud:?} accepted"),
                Err(e) => {
                    assert!(!ok, "{aud:?} refused: {e:?}");
                    assert_eq!(e.reason, Reason::TokenVerificationFailed, "{aud:?}");
                    assert_eq!(e.cause, Some(Reason::TokenVerificationFailed), "{aud:?}");
                }
            }
        }
        // Without a configured audience (or only empty ones), `aud` is not checked.
        run(&[], &t).unwrap_or_else(|e| panic!("{aud:?}: {e:?}"));
        run(&[""], &t).unwrap_or_else(|e| panic!("{aud:?}: {e:?}"));
    }
    // Expiry is checked first (Clerk's verifyJwt runs before the audience assertion).
    let late = NOW + 3_600_000;
    let e = Verifier::new(Validation {
        audience: vec!["api://orders".into()],
        ..Validation::default()
    })
    .verify(&token(None), &signer().keys, &opts, late)
    .unwrap_err();
    assert_eq!(e.cause, Some(Reason::TokenExpired));
}

#[test]
fn what_clerk_decodes_verifies() {
    let p = |extra: &str| format!(r#"{{"sub":"user_1","exp":{}{extra}}}"#, N + 60.0);
    let bom = |s: &str| [&b"\xEF\xBB\xBF"[..], s.as_bytes()].concat();
    let h = header_json("JWT");
    // A BOM before the header's and the payload's JSON (TextDecoder strips it).
    verdict(&signed(&seg(&bom(&h)), &seg(p("").as_bytes()))).expect("BOM in the header");
    let id = verdict(&signed(&seg(h.as_bytes()), &seg(&bom(&p(""))))).expect("BOM in the payload");
    assert_eq!(id.user_id, "user_1");
    assert_eq!(id.claims()["sub"], "user_1");
    // Two BOMs: JSON.parse refuses the second.
    assert_eq!(
        verdict(&signed(
            &seg(h.as_bytes()),
            &seg(&bom(&String::from_utf8(bom(&p(""))).unwrap()))
        ))
        .unwrap_err(),
        Reason::TokenInvalid
    );
    // 1e400 in a claim nobody reads, lone surrogates, deep nesting, invalid UTF-8 in a string.
    let deep = format!(r#","x":{}{}"#, "[".repeat(3000), "]".repeat(3000));
    for extra in [
        r#","x":1e400,"y":-1e400"#.to_owned(),
        r#","x":"\ud800","sid":"sess_\udc00""#.to_owned(),
        deep,
        format!(r#","x":{}1{}"#, r#"{"a":"#.repeat(200), "}".repeat(200)),
    ] {
        let id = verdict(&session(&p(&extra))).unwrap_or_else(|r| panic!("{extra:.40}: {r:?}"));
        assert_eq!(id.user_id, "user_1");
        assert!(id.claims().contains_key("x"));
    }
    let id = verdict(&session(&p(r#","sid":"sess_\udc00""#))).unwrap();
    assert_eq!(id.session_id.as_deref(), Some("sess_\u{FFFD}"));
    let id = verdict(&session(&p(r#","x":1e400"#))).unwrap();
    assert_eq!(
        id.claims()["x"],
        Value::Null,
        "JSON.stringify(Infinity) is null"
    );
    let raw = [&p(r#","x":"a"#).as_bytes()[..p("").len() + 6], b"\xff\"}"].concat();
    let id = verdict(&signed(&seg(h.as_bytes()), &seg(&raw))).expect("invalid UTF-8 in a string");
    assert_eq!(id.claims()["x"], "a\u{FFFD}");
}

#[test]
fn malformed_fea_fails_only_where_clerks_auth_object_throws() {
    // (extra claims, Clerk's signedInAuthObject throws), from the SDK.
    let cases: &[(&str, bool)] = &[
        (r#","v":2,"o":{"id":"org_1"},"fea":"o:a,b""#, true),
        (r#","v":2,"fea":"o:a,b""#, false),
        (r#","fea":"o:a,b""#, false),
        (r#","v":2,"o":{"id":"org_1"},"pla":"nocolon""#, false),
        (r#","v":2,"o":"x","fea":"bad""#, true),
        (r#","v":2,"o":[],"fea":"bad""#, true),
        (r#","v":2,"o":0,"fea":"bad""#, false),
        (r#","v":2,"o":{},"fea":5"#, true),
        (r#","v":2,"o":{},"fea":true"#, true),
        (r#","v":2,"o":{},"fea":false"#, false),
        (r#","v":2,"o":{},"fea":[]"#, true),
        (r#","v":2,"o":{},"fea":0"#, false),
        (r#","v":"2","o":{},"fea":"bad""#, false),
    ];
    for (extra, throws) in cases {
        let t = session(&format!(r#"{{"sub":"user_1","exp":{}{extra}}}"#, N + 60.0));
        match verdict(&t) {
            Ok(id) => {
                assert!(!throws, "{extra} accepted");
                // has({ feature }) / has({ plan }) against a malformed claim is false.
                assert!(!id.has(&crate::authz::Check::feature("a")), "{extra}");
                assert!(!id.has(&crate::authz::Check::plan("a")), "{extra}");
            }
            Err(r) => {
                assert!(throws, "{extra} refused: {r:?}");
                assert_eq!(r, Reason::TokenInvalid);
            }
        }
    }
}

#[test]
fn debug_output_never_holds_the_token() {
    let t = session(&format!(
        r#"{{"sub":"user_1","exp":{},"secret":"do-not-print"}}"#,
        N + 60.0
    ));
    let d = Decoded::parse(&t).unwrap();
    let shown = format!("{d:?}");
    for part in t.split('.') {
        assert!(!shown.contains(part), "{shown}");
    }
    assert!(!shown.contains("do-not-print"), "{shown}");
    assert!(
        shown.contains(&crate::secret::token_fingerprint(&t)),
        "{shown}"
    );
}
