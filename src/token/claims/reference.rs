//! The reference decoder the one-pass scanner is differentially tested (and fuzzed) against:
//! Clerk's `decodeJwt` step by step — `TextDecoder` (one BOM stripped, invalid UTF-8 →
//! U+FFFD), then `JSON.parse` into a tree ([`super::js`]: numbers beyond `f64` are
//! ±infinity, lone surrogates kept, no nesting limit, last duplicate wins), then the members
//! the verifier reads, picked from the tree. Where JS's `JSON.parse` and serde_json differ, JS
//! is the reference.

use super::{
    js::{self, JsValue},
    Cat, Lenient, Payload, RawClaims, RawHeader, RawOrg, Typ,
};
use crate::token::{
    check::{CAT_IGNORE, CAT_M2M, CAT_SESSION},
    keys::Alg,
};

/// `new TextDecoder().decode(bytes)`.
fn text_decoder(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

fn lenient(v: Option<&JsValue>) -> Lenient {
    match v {
        None => Lenient::Absent,
        Some(JsValue::Null) => Lenient::Null,
        Some(JsValue::Bool(b)) => Lenient::Bool(*b),
        Some(JsValue::Num(n)) => Lenient::Num(*n),
        Some(JsValue::Str(s)) => Lenient::Str(js::to_string_lossy(s)),
        Some(JsValue::Arr(_) | JsValue::Obj(_)) => Lenient::Other,
    }
}

/// The header from the decoded segment: `None` unless it is a JSON object.
pub(crate) fn parse_header_js(bytes: &[u8]) -> Option<RawHeader> {
    let h = js::parse(&text_decoder(bytes))?;
    if !matches!(h, JsValue::Obj(_)) {
        return None;
    }
    let text = |k| lenient(h.get(k)).into_string();
    Some(RawHeader {
        alg: text("alg").as_deref().and_then(Alg::from_jose),
        typ: match lenient(h.get("typ")) {
            Lenient::Absent => Typ::Absent,
            Lenient::Str(t) if t == "JWT" => Typ::Jwt,
            Lenient::Str(t) if t == "at+jwt" || t == "application/at+jwt" => Typ::AccessToken,
            _ => Typ::Other,
        },
        kid: text("kid"),
        cat: match lenient(h.get("cat")) {
            Lenient::Absent => Cat::Absent,
            Lenient::Str(c) if c == CAT_SESSION || c == CAT_IGNORE => Cat::Session,
            Lenient::Str(c) if c == CAT_M2M => Cat::M2m,
            _ => Cat::Other,
        },
    })
}

/// The payload from the decoded segment: `Err` where `JSON.parse` throws.
pub(crate) fn parse_payload_js(bytes: &[u8]) -> Result<Payload, ()> {
    let p = js::parse(&text_decoder(bytes)).ok_or(())?;
    match p {
        JsValue::Null => Ok(Payload(None)),
        JsValue::Obj(_) => {
            let l = |k| lenient(p.get(k));
            let serde = |k| p.get(k).map(js::to_serde);
            let o = p.get("o");
            Ok(Payload(Some(RawClaims {
                sub: l("sub"),
                sid: l("sid"),
                iss: l("iss"),
                azp: l("azp"),
                jti: l("jti"),
                sts: l("sts"),
                fea: l("fea"),
                pla: l("pla"),
                exp: l("exp"),
                nbf: l("nbf"),
                iat: l("iat"),
                v: l("v"),
                aud: serde("aud"),
                act: serde("act"),
                fva: serde("fva"),
                o: match o {
                    Some(o @ JsValue::Obj(_)) => Some(RawOrg {
                        id: lenient(o.get("id")),
                        slg: lenient(o.get("slg")),
                        rol: lenient(o.get("rol")),
                        per: lenient(o.get("per")),
                        fpm: lenient(o.get("fpm")),
                    }),
                    _ => None,
                },
                o_truthy: lenient(o).truthy(),
                org_id: l("org_id"),
                org_slug: l("org_slug"),
                org_role: l("org_role"),
                org_permissions: serde("org_permissions"),
            })))
        }
        _ => Ok(Payload(Some(RawClaims::default()))),
    }
}
