//! Lenient, allocation-light parsing of JWT headers and payloads.
//!
//! Only the members verification and decoding need are extracted, each as a [`Lenient`] value
//! that records its JSON type instead of failing, so that type errors surface as Clerk's
//! reasons in Clerk's order (a non-string `sub` is `token-verification-failed` after the
//! signature check, not a parse error). Unknown members are skipped without allocating;
//! duplicate members follow JSON.parse (the last one wins). The full claim set stays
//! available as the raw JSON text, parsed only when asked for.

mod scan;

use std::{borrow::Cow, fmt};

use serde::{
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::Value;

use crate::{
    keys::Alg,
    verify::{CAT_IGNORE, CAT_SESSION},
};

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
#[derive(Debug, Default)]
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
    /// Anything else (JWT template, M2M, unknown, `null`).
    Other,
}

/// A header value, borrowed from the decoded header when possible.
enum HeaderVal<'de> {
    Str(Cow<'de, str>),
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

/// An object key, borrowed when it has no escapes.
struct Key<'de>(Cow<'de, str>);

/// `Some` when the value is an object.
struct MaybeObject<T>(Option<T>);

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

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Lenient, E> {
                Ok(Lenient::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Lenient, E> {
                Ok(Lenient::Str(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Lenient, E> {
                Ok(Lenient::Num(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Lenient, E> {
                Ok(Lenient::Num(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Lenient, E> {
                Ok(Lenient::Num(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Lenient, E> {
                Ok(Lenient::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Lenient, E> {
                Ok(Lenient::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Lenient, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Lenient, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Lenient::Other)
            }
        }
        d.deserialize_any(V)
    }
}

// === impl Key ===

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

// === impl MaybeObject ===

/// Types built member by member from a JSON object.
trait FromMembers: Default {
    fn member<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error>;
}

impl<'de, T: FromMembers> Deserialize<'de> for MaybeObject<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: FromMembers> Visitor<'de> for V<T> {
            type Value = MaybeObject<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut out = T::default();
                while let Some(Key(k)) = a.next_key::<Key<'de>>()? {
                    out.member(&k, &mut a)?;
                }
                Ok(MaybeObject(Some(out)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeObject(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MaybeObject(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeObject(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeObject(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeObject(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeObject(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(MaybeObject(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for HeaderVal<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HeaderVal<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(HeaderVal::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(HeaderVal::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(HeaderVal::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(HeaderVal::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(HeaderVal::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(HeaderVal::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(HeaderVal::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(HeaderVal::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(HeaderVal::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl FromMembers for RawHeader {
    fn member<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        let s = |v: &HeaderVal<'_>| match v {
            HeaderVal::Str(s) => Some(s.as_ref().to_owned()),
            HeaderVal::Other => None,
        };
        match key {
            "alg" => {
                self.alg = match map.next_value::<HeaderVal<'de>>()? {
                    HeaderVal::Str(a) => Alg::from_jose(&a),
                    HeaderVal::Other => None,
                }
            }
            "typ" => {
                self.typ = match map.next_value::<HeaderVal<'de>>()? {
                    HeaderVal::Str(t) if t == "JWT" => Typ::Jwt,
                    HeaderVal::Str(t) if t == "at+jwt" || t == "application/at+jwt" => {
                        Typ::AccessToken
                    }
                    _ => Typ::Other,
                }
            }
            "kid" => self.kid = s(&map.next_value::<HeaderVal<'de>>()?),
            "cat" => {
                self.cat = match map.next_value::<HeaderVal<'de>>()? {
                    HeaderVal::Str(c) if c == CAT_SESSION || c == CAT_IGNORE => Cat::Session,
                    _ => Cat::Other,
                }
            }
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl FromMembers for RawOrg {
    fn member<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "id" => self.id = map.next_value()?,
            "slg" => self.slg = map.next_value()?,
            "rol" => self.rol = map.next_value()?,
            "per" => self.per = map.next_value()?,
            "fpm" => self.fpm = map.next_value()?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl FromMembers for RawClaims {
    fn member<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "sub" => self.sub = map.next_value()?,
            "sid" => self.sid = map.next_value()?,
            "iss" => self.iss = map.next_value()?,
            "azp" => self.azp = map.next_value()?,
            "jti" => self.jti = map.next_value()?,
            "sts" => self.sts = map.next_value()?,
            "fea" => self.fea = map.next_value()?,
            "pla" => self.pla = map.next_value()?,
            "exp" => self.exp = map.next_value()?,
            "nbf" => self.nbf = map.next_value()?,
            "iat" => self.iat = map.next_value()?,
            "v" => self.v = map.next_value()?,
            "aud" => self.aud = Some(map.next_value()?),
            "act" => self.act = Some(map.next_value()?),
            "fva" => self.fva = Some(map.next_value()?),
            "o" => self.o = map.next_value::<MaybeObject<RawOrg>>()?.0,
            "org_id" => self.org_id = map.next_value()?,
            "org_slug" => self.org_slug = map.next_value()?,
            "org_role" => self.org_role = map.next_value()?,
            "org_permissions" => self.org_permissions = Some(map.next_value()?),
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Parses a JOSE header; it must be a JSON object.
pub(crate) fn parse_header(json: &[u8]) -> Option<RawHeader> {
    serde_json::from_slice::<MaybeObject<RawHeader>>(json)
        .ok()
        .and_then(|m| m.0)
}

/// Parses a payload in one pass (see [`scan`]): `Err` when it is not JSON.
pub(crate) fn parse_payload(json: &[u8]) -> Result<Payload, scan::Invalid> {
    scan::parse_payload(json)
}

/// The same through serde_json: the reference the scanner is tested against.
#[cfg(test)]
pub(crate) fn parse_payload_serde(json: &[u8]) -> Result<Payload, serde_json::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Payload;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Payload, E> {
            Ok(Payload(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Payload, A::Error> {
            let m =
                <MaybeObject<RawClaims>>::deserialize(de::value::MapAccessDeserializer::new(a))?;
            Ok(Payload(Some(m.0.unwrap_or_default())))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Payload, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Payload(Some(RawClaims::default())))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Payload, E> {
            Ok(Payload(Some(RawClaims::default())))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Payload, E> {
            Ok(Payload(Some(RawClaims::default())))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Payload, E> {
            Ok(Payload(Some(RawClaims::default())))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Payload, E> {
            Ok(Payload(Some(RawClaims::default())))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Payload, E> {
            Ok(Payload(Some(RawClaims::default())))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let p = de::Deserializer::deserialize_any(&mut de, V)?;
    de.end()?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers for mutations.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
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
            "", " ", "null", " null ", "nul", "{}", "[]", "[1,2]", "\"s\"", "1", "-0", "1.5e3", "1e400",
            "-1e400", "01", "1.", ".5", "+1", "-", "1e", "1e+", "true", "false", "tru", "{} x", "{},",
            "{\"a\":1,}", "{,}", "{\"a\" 1}", "{\"a\":}", "{a:1}", "{\"sub\":\"a\",\"sub\":\"b\"}",
            "{\"sub\":\"\\u0041\\ud83d\\ude00\"}", "{\"sub\":\"\\ud83d\"}", "{\"sub\":\"\\ude00\"}",
            "{\"sub\":\"\\ud83dx\"}", "{\"sub\":\"\\x\"}", "{\"sub\":\"a\tb\"}", "{\"sub\":\"a\\tb\"}",
            "{\"s\\u0075b\":\"k\"}", "{\"exp\":1e308,\"nbf\":-1.5E-3,\"iat\":0}", "{\"exp\":1.7976931348623159e308}",
            "{\"exp\":\"1\",\"nbf\":null,\"iat\":[1],\"sub\":{\"a\":[]}}", "{\"o\":5}", "{\"o\":{\"id\":1,\"per\":\"a,b\",\"x\":[{}]}}",
            "{\"o\":{\"id\":\"o1\"},\"o\":null}", "{\"aud\":[\"a\",1],\"act\":{\"sub\":\"u\"},\"fva\":[1,-1]}",
            "{\"org_permissions\":[\"a\"],\"org_id\":\"x\"}", "{\"deep\":[[[[[[[[[[]]]]]]]]]]}",
            "\u{feff}{}", "{\"sub\":\"\u{e9}\u{1F600}\"}", "{\"sub\":\"a\"}\n", "\t{\"v\":2}\r\n",
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

    #[test]
    fn scanner_agrees_with_serde_json_on_mutated_payloads() {
        let seeds = [
            r#"{"azp":"https://app.example","exp":1795773289,"fea":"o:invoices,o:members","iat":1795769689,"iss":"http://127.0.0.1:8787","jti":"E2qU9BqWnmrrNTL6e3IM","nbf":1795769679,"o":{"fpm":"3,4","id":"org_2dev","per":"read,write,manage","rol":"admin","slg":"acme"},"sid":"sess_5aTx","sts":"active","sub":"user_2dev","v":2}"#,
            r#"{"act":{"iss":"https://x","sid":"sess_1","sub":"user_1"},"aud":["a","b"],"exp":1.5,"fva":[3,-1],"org_id":"org_1","org_permissions":["org:a:b"],"org_role":"org:admin","pla":"u:free","sub":"user_é
","custom":{"nested":[1,2,{"k":null}],"t":true}}"#,
        ];
        let alphabet = b"{}[]\",:0123456789-+.eEtrufalsn \\u\x00\x1f\xc3\xa9ab";
        let mut rng = Lcg(42);
        for seed in seeds {
            same(seed.as_bytes());
            for _ in 0..20_000 {
                let mut m = seed.as_bytes().to_vec();
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
                same(&m);
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
