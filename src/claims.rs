//! Lenient, allocation-light, one-pass parsing of JWT headers and payloads.
//!
//! Only the members verification and decoding need are extracted, each as a [`Lenient`] value
//! that records its JSON type instead of failing, so that type errors surface as Clerk's
//! reasons in Clerk's order (a non-string `sub` is `token-verification-failed` after the
//! signature check, not a parse error). Unknown members are skipped without allocating;
//! duplicate members follow JSON.parse (the last one wins). The full claim set stays
//! available as the raw JSON text, parsed only when asked for.

#[cfg(test)]
mod reference;
mod scan;

use serde_json::Value;

use crate::keys::Alg;

/// A JSON member, typed only as far as verification needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Lenient {
    /// Not present.
    #[default]
    Absent,
    /// `null`.
    Null,
    /// A string.
    Str(String),
    /// A number.
    Num(f64),
    /// A boolean, array or object.
    Other,
}

/// The JOSE header members we look at, classified as they are parsed (only `kid` is kept as
/// text).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct RawHeader {
    /// `None` when missing or not exactly RS256/RS384/RS512.
    pub(crate) alg: Option<Alg>,
    pub(crate) typ: Typ,
    /// `None` when missing or not a string.
    pub(crate) kid: Option<String>,
    pub(crate) cat: Cat,
}

/// The header `typ`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Typ {
    #[default]
    Absent,
    /// Exactly `JWT`.
    Jwt,
    /// `at+jwt` or `application/at+jwt` (an OAuth access token).
    AccessToken,
    /// Anything else, `null` included.
    Other,
}

/// The header `cat` (Clerk's token category).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cat {
    #[default]
    Absent,
    /// The session category or the "ignore" marker.
    Session,
    /// The M2M JWT category.
    M2m,
    /// Anything else (JWT template, unknown, `null`).
    Other,
}

/// The claims we look at. A payload that is valid JSON but not an object yields all-absent
/// claims (and then fails the `sub` check, as in Clerk's SDK).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct RawClaims {
    pub(crate) sub: Lenient,
    pub(crate) sid: Lenient,
    pub(crate) iss: Lenient,
    pub(crate) azp: Lenient,
    pub(crate) jti: Lenient,
    pub(crate) sts: Lenient,
    pub(crate) fea: Lenient,
    pub(crate) pla: Lenient,
    pub(crate) exp: Lenient,
    pub(crate) nbf: Lenient,
    pub(crate) iat: Lenient,
    pub(crate) v: Lenient,
    pub(crate) aud: Option<Value>,
    pub(crate) act: Option<Value>,
    pub(crate) fva: Option<Value>,
    pub(crate) o: Option<RawOrg>,
    pub(crate) org_id: Lenient,
    pub(crate) org_slug: Lenient,
    pub(crate) org_role: Lenient,
    pub(crate) org_permissions: Option<Value>,
}

/// The v2 `o` claim.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct RawOrg {
    pub(crate) id: Lenient,
    pub(crate) slg: Lenient,
    pub(crate) rol: Lenient,
    pub(crate) per: Lenient,
    pub(crate) fpm: Lenient,
}

/// A parsed payload: `None` for JSON `null`.
#[derive(Debug, PartialEq)]
pub(crate) struct Payload(pub(crate) Option<RawClaims>);

// === impl Lenient ===

impl Lenient {
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Lenient::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn into_string(self) -> Option<String> {
        match self {
            Lenient::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Lenient::Num(n) => Some(*n),
            _ => None,
        }
    }
}

/// Parses a JOSE header in one pass (see [`scan`]); it must be a JSON object.
pub(crate) fn parse_header(json: &[u8]) -> Option<RawHeader> {
    scan::parse_header(json).ok()
}

/// Parses a payload in one pass (see [`scan`]): `Err` when it is not JSON.
pub(crate) fn parse_payload(json: &[u8]) -> Result<Payload, scan::Invalid> {
    scan::parse_payload(json)
}

#[cfg(test)]
mod tests {
    use super::{
        reference::{parse_header_serde, parse_payload_serde},
        *,
    };

    /// Deterministic pseudo-random numbers for mutations.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    fn same(input: &[u8]) {
        let fast = parse_payload(input);
        if std::str::from_utf8(input).is_err() {
            // serde_json does not validate strings it skips; we refuse invalid UTF-8 anywhere.
            assert!(fast.is_err(), "{:?}", String::from_utf8_lossy(input));
            return;
        }
        let reference = parse_payload_serde(input);
        match (&fast, &reference) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{:?}", String::from_utf8_lossy(input)),
            (Err(_), Err(_)) => {}
            _ => panic!(
                "scanner {:?} vs serde_json {:?} on {:?}",
                fast.is_ok(),
                reference.map_err(|e| e.to_string()),
                String::from_utf8_lossy(input)
            ),
        }
    }

    #[test]
    fn scanner_agrees_with_serde_json_on_edge_cases() {
        let cases: &[&str] = &[
            "",
            " ",
            "null",
            " null ",
            "nul",
            "{}",
            "[]",
            "[1,2]",
            "\"s\"",
            "1",
            "-0",
            "1.5e3",
            "1e400",
            "-1e400",
            "01",
            "1.",
            ".5",
            "+1",
            "-",
            "1e",
            "1e+",
            "true",
            "false",
            "tru",
            "{} x",
            "{},",
            "{\"a\":1,}",
            "{,}",
            "{\"a\" 1}",
            "{\"a\":}",
            "{a:1}",
            "{\"sub\":\"a\",\"sub\":\"b\"}",
            "{\"sub\":\"\\u0041\\ud83d\\ude00\"}",
            "{\"sub\":\"\\ud83d\"}",
            "{\"sub\":\"\\ude00\"}",
            "{\"sub\":\"\\ud83dx\"}",
            "{\"sub\":\"\\x\"}",
            "{\"sub\":\"a\tb\"}",
            "{\"sub\":\"a\\tb\"}",
            "{\"s\\u0075b\":\"k\"}",
            "{\"exp\":1e308,\"nbf\":-1.5E-3,\"iat\":0}",
            "{\"exp\":1.7976931348623159e308}",
            "{\"exp\":\"1\",\"nbf\":null,\"iat\":[1],\"sub\":{\"a\":[]}}",
            "{\"o\":5}",
            "{\"o\":{\"id\":1,\"per\":\"a,b\",\"x\":[{}]}}",
            "{\"o\":{\"id\":\"o1\"},\"o\":null}",
            "{\"aud\":[\"a\",1],\"act\":{\"sub\":\"u\"},\"fva\":[1,-1]}",
            "{\"org_permissions\":[\"a\"],\"org_id\":\"x\"}",
            "{\"deep\":[[[[[[[[[[]]]]]]]]]]}",
            "\u{feff}{}",
            "{\"sub\":\"\u{e9}\u{1F600}\"}",
            "{\"sub\":\"a\"}\n",
            "\t{\"v\":2}\r\n",
        ];
        for c in cases {
            same(c.as_bytes());
        }
        same(b"{\"sub\":\"\xff\"}");
        same(b"{\"sub\":\"a\x01\"}");
        let deep_ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        same(deep_ok.as_bytes());
        let too_deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        // Deeper than 128 levels: refused (serde_json's skipping has no limit; we fail closed).
        assert!(parse_payload(too_deep.as_bytes()).is_err());
    }

    /// `seed` with up to three random byte replacements, deletions or insertions.
    fn mutate(rng: &mut Lcg, seed: &[u8], alphabet: &[u8]) -> Vec<u8> {
        let mut m = seed.to_vec();
        for _ in 0..=(rng.next() % 3) {
            let pos = (rng.next() as usize) % (m.len() + 1);
            let b = alphabet[(rng.next() as usize) % alphabet.len()];
            match rng.next() % 3 {
                0 if pos < m.len() => m[pos] = b,
                1 if pos < m.len() => {
                    m.remove(pos);
                }
                _ => m.insert(pos, b),
            }
        }
        m
    }

    #[test]
    fn header_scanner_agrees_with_serde_json() {
        let seed = r#"{"alg":"RS256","cat":"cl_B7d4PD111AAA","kid":"ins_2GIoQhbUpy0hX7B2cVkuTMinXoD","typ":"JWT","x":[1,{"y":null}]}"#;
        let alphabet = b"{}[]\",:019-.etrufalsn \\uRSJWTcl_";
        let mut rng = Lcg(7);
        assert!(parse_header(seed.as_bytes()).is_some());
        for _ in 0..20_000 {
            let m = mutate(&mut rng, seed.as_bytes(), alphabet);
            assert_eq!(
                parse_header(&m),
                parse_header_serde(&m),
                "{:?}",
                String::from_utf8_lossy(&m)
            );
        }
    }

    #[test]
    fn scanner_agrees_with_serde_json_on_mutated_payloads() {
        let seeds = [
            r#"{"azp":"https://app.example","exp":1795773289,"fea":"o:invoices,o:members","iat":1795769689,"iss":"http://127.0.0.1:8787","jti":"E2qU9BqWnmrrNTL6e3IM","nbf":1795769679,"o":{"fpm":"3,4","id":"org_2dev","per":"read,write,manage","rol":"admin","slg":"acme"},"sid":"sess_5aTx","sts":"active","sub":"user_2dev","v":2}"#,
            r#"{"act":{"iss":"https://x","sid":"sess_1","sub":"user_1"},"aud":["a","b"],"exp":1.5,"fva":[3,-1],"org_id":"org_1","org_permissions":["org:a:b"],"org_role":"org:admin","pla":"u:free","sub":"user_\u00e9\n\u00e9","custom":{"nested":[1,2,{"k":null}],"t":true}}"#,
        ];
        let alphabet = b"{}[]\",:0123456789-+.eEtrufalsn \\u\x00\x1f\xc3\xa9ab";
        let mut rng = Lcg(42);
        for seed in seeds {
            // The seeds themselves are valid and carry their claims.
            let seeded = parse_payload(seed.as_bytes()).unwrap().0.unwrap();
            assert!(seeded.sub.as_str().is_some_and(|s| s.starts_with("user_")));
            same(seed.as_bytes());
            for _ in 0..20_000 {
                same(&mutate(&mut rng, seed.as_bytes(), alphabet));
            }
        }
    }

    #[test]
    fn last_duplicate_wins_and_types_are_recorded() {
        let p = parse_payload(
            br#"{"sub":"a","sub":"b","exp":"soon","nbf":1.5,"x":{"y":[1]},"o":{"id":"org_1"}}"#,
        )
        .unwrap()
        .0
        .unwrap();
        assert_eq!(p.sub, Lenient::Str("b".into()));
        assert_eq!(p.exp, Lenient::Str("soon".into()));
        assert_eq!(p.nbf, Lenient::Num(1.5));
        assert_eq!(p.o.unwrap().id, Lenient::Str("org_1".into()));
    }

    #[test]
    fn payload_shapes() {
        assert!(parse_payload(b"null").unwrap().0.is_none());
        assert_eq!(
            parse_payload(b"[1,2]").unwrap().0.unwrap().sub,
            Lenient::Absent
        );
        assert!(parse_payload(b"not json").is_err());
        assert!(parse_payload(b"{} trailing").is_err());
        assert!(
            parse_payload(br#"{"sub":"a\u0062"}"#)
                .unwrap()
                .0
                .unwrap()
                .sub
                == Lenient::Str("ab".into())
        );
        assert!(parse_header(b"[]").is_none());
        assert!(parse_header(b"null").is_none());
        let h = parse_header(
            br#"{"al\u0067":"RS\u0032\u0035\u0036","typ":null,"cat":"cl_B7d4PD111AAA","kid":"k"}"#,
        )
        .unwrap();
        assert_eq!(h.alg, Some(Alg::RS256));
        assert_eq!(
            (h.typ, h.cat, h.kid.as_deref()),
            (Typ::Other, Cat::Session, Some("k"))
        );
        let h = parse_header(br#"{"alg":"rs256","kid":7}"#).unwrap();
        assert_eq!(
            (h.alg, h.typ, h.cat, h.kid),
            (None, Typ::Absent, Cat::Absent, None)
        );
    }
}
