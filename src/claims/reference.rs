//! The serde_json-based parsers the one-pass scanner is differentially tested against.

use std::{borrow::Cow, fmt};

use serde::{
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};

use super::{Cat, Lenient, Payload, RawClaims, RawHeader, RawOrg, Typ};
use crate::{
    keys::Alg,
    verify::{CAT_IGNORE, CAT_M2M, CAT_SESSION},
};

/// A header value, borrowed from the decoded header when possible.
enum HeaderVal<'de> {
    Str(Cow<'de, str>),
    Other,
}

/// An object key, borrowed when it has no escapes.
struct Key<'de>(Cow<'de, str>);

/// `Some` when the value is an object.
struct MaybeObject<T>(Option<T>);

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
                    HeaderVal::Str(c) if c == CAT_M2M => Cat::M2m,
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

/// The same through serde_json: the reference the scanner is tested against.
pub(crate) fn parse_header_serde(json: &[u8]) -> Option<RawHeader> {
    serde_json::from_slice::<MaybeObject<RawHeader>>(json)
        .ok()
        .and_then(|m| m.0)
}

/// The same through serde_json: the reference the scanner is tested against.
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
