//! The verified [`Identity`] a token carries, and how Clerk's v1 and v2 session claims decode
//! into it (organization, role, permissions, features, plans, actor, factor ages).

use std::sync::OnceLock;

use num_bigint::BigUint;
use serde_json::{Map, Value};

use crate::{
    pb,
    token::claims::{Lenient, RawClaims, RawOrg},
};

pub use crate::pb::{SessionStatus, TokenType};

/// The verified identity of a caller. Handed to handlers by the auth layer and returned by
/// `VerifyToken`.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The kind of credential.
    pub token_type: TokenType,
    /// `sub`: the Clerk user id (`user_…`), or the machine / subject for machine tokens.
    pub user_id: String,
    /// `sid`: the session id, when present.
    pub session_id: Option<String>,
    /// `sts`: the session status, when present.
    pub session_status: Option<SessionStatus>,
    /// The active organization (v1 `org_*` claims or v2 `o` claim).
    pub organization: Option<Organization>,
    /// `fea`, split by scope.
    pub features: Entitlements,
    /// `pla`, split by scope.
    pub plans: Entitlements,
    /// `act`: the impersonator, when the session is impersonated.
    pub actor: Option<Box<Actor>>,
    /// `fva`: minutes since first and second factor verification (-1 = none).
    pub factor_verification_age: Option<[i32; 2]>,
    /// `iss`.
    pub issuer: Option<String>,
    /// `azp`.
    pub authorized_party: Option<String>,
    /// `iat`, seconds since the epoch.
    pub issued_at: Option<f64>,
    /// `exp`, seconds since the epoch.
    pub expires_at: f64,
    /// `nbf`, seconds since the epoch.
    pub not_before: Option<f64>,
    /// `jti`.
    pub token_id: Option<String>,
    /// 2 for v2 session claims (`v: 2`), otherwise 1.
    pub claims_version: u8,
    /// Set for machine tokens (M2M, API key, OAuth).
    pub machine: Option<Box<MachineInfo>>,
    /// `fva` exactly as Clerk's `has()` reads it: two finite numbers, each -1 or ≥ 0.
    fva_exact: Option<[f64; 2]>,
    /// The payload's JSON text as Clerk's `TextDecoder` reads it, parsed on demand by
    /// [`Identity::claims`].
    raw_claims: String,
    claims: OnceLock<Map<String, Value>>,
}

/// What a machine token says about its bearer (Clerk's machine auth objects, §5.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineInfo {
    /// `mch_…` (M2M: the calling machine), `user_…` (OAuth), `user_…` or `org_…` (API key).
    pub subject: String,
    /// Scopes; for M2M tokens the machine ids the token may call.
    pub scopes: Vec<String>,
    /// M2M tokens: the calling machine (= subject).
    pub machine_id: Option<String>,
    /// OAuth tokens: the client id.
    pub client_id: Option<String>,
    /// API keys: the key's name.
    pub name: Option<String>,
}

/// The active organization of a session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Organization {
    /// `org_…`.
    pub id: String,
    /// The organization slug.
    pub slug: Option<String>,
    /// The role key, `org:`-prefixed for v2 tokens (`org:admin`).
    pub role: Option<String>,
    /// `org:<feature>:<permission>` keys.
    pub permissions: Vec<String>,
}

/// Entries of a scoped claim (`fea`, `pla`): `u:` → user, `o:` → organization, `uo:`/`ou:` →
/// both.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entitlements {
    /// User-scoped entries.
    pub user: Vec<String>,
    /// Organization-scoped entries.
    pub organization: Vec<String>,
}

/// The impersonator (`act` claim).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Actor {
    /// The impersonating user id.
    pub sub: String,
    /// `sid`.
    pub sid: Option<String>,
    /// `iss`.
    pub iss: Option<String>,
    /// `type` (e.g. `agent`).
    pub actor_type: Option<String>,
}

/// A scoped claim had an element without a `:`, or was a truthy non-string (Clerk's
/// `splitByScope` throws on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedScopes;

// === impl Identity ===

impl PartialEq for Identity {
    fn eq(&self, o: &Self) -> bool {
        self.token_type == o.token_type
            && self.user_id == o.user_id
            && self.session_id == o.session_id
            && self.session_status == o.session_status
            && self.organization == o.organization
            && self.features == o.features
            && self.plans == o.plans
            && self.actor == o.actor
            && self.factor_verification_age == o.factor_verification_age
            && self.issuer == o.issuer
            && self.authorized_party == o.authorized_party
            && self.issued_at == o.issued_at
            && self.expires_at == o.expires_at
            && self.not_before == o.not_before
            && self.token_id == o.token_id
            && self.claims_version == o.claims_version
            && self.machine == o.machine
            && self.raw_claims == o.raw_claims
    }
}

impl Identity {
    /// Decodes a session token's payload (already verified) into an identity.
    ///
    /// `sub` and `exp` must already have been checked to be a string and a number.
    ///
    /// Fails exactly where Clerk's `__experimental_JWTPayloadToAuthObjectProperties` throws
    /// (building the auth object): a v2 token (`v: 2`) with a truthy `o` whose `fea` is
    /// malformed. Anywhere else a malformed `fea` or `pla` decodes as empty, so every
    /// `has({ feature })` / `has({ plan })` against it fails, as Clerk's (which catches the
    /// throw and answers false).
    pub(crate) fn from_session_claims(
        token_type: TokenType,
        c: RawClaims,
        raw_claims: String,
    ) -> Result<Self, MalformedScopes> {
        let v2 = c.v.as_f64() == Some(2.0);
        let features = split_lenient(&c.fea);
        if features.is_err() && v2 && c.o_truthy {
            return Err(MalformedScopes);
        }
        let features = features.unwrap_or_default();
        let plans = split_lenient(&c.pla).unwrap_or_default();
        let organization = if v2 {
            c.o.and_then(|o| decode_v2_org(o, &features.organization))
        } else {
            decode_v1_org(c.org_id, c.org_slug, c.org_role, c.org_permissions)
        };
        let session_status = match c.sts.as_str() {
            Some("active") => Some(SessionStatus::Active),
            Some("pending") => Some(SessionStatus::Pending),
            _ => None,
        };
        let actor = c.act.as_ref().and_then(Value::as_object).map(|a| {
            let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_owned);
            Box::new(Actor {
                sub: s("sub").unwrap_or_default(),
                sid: s("sid"),
                iss: s("iss"),
                actor_type: s("type"),
            })
        });
        let fva = c
            .fva
            .as_ref()
            .and_then(Value::as_array)
            .and_then(|a| match a.as_slice() {
                [f1, f2] => Some([f1.as_f64()?, f2.as_f64()?]),
                _ => None,
            });
        let factor_verification_age = fva.map(|[f1, f2]| [to_i32(f1), to_i32(f2)]);
        let fva_exact = fva.filter(fva_is_valid);
        Ok(Identity {
            token_type,
            user_id: c.sub.into_string().unwrap_or_default(),
            session_id: c.sid.into_string(),
            session_status,
            organization,
            features,
            plans,
            actor,
            factor_verification_age,
            issuer: c.iss.into_string(),
            authorized_party: c.azp.into_string(),
            issued_at: c.iat.as_f64(),
            expires_at: c.exp.as_f64().unwrap_or(0.0),
            not_before: c.nbf.as_f64(),
            token_id: c.jti.into_string(),
            claims_version: if v2 { 2 } else { 1 },
            machine: None,
            fva_exact,
            raw_claims,
            claims: OnceLock::new(),
        })
    }

    /// Every claim of the token, unchanged (parsed from the payload on first use).
    pub fn claims(&self) -> &Map<String, Value> {
        self.claims
            .get_or_init(|| crate::token::claims::payload_map(&self.raw_claims))
    }

    /// `fva` as Clerk's `has()` reads it: `None` when absent or not two numbers each -1 or ≥ 0.
    pub fn factor_verification_age_exact(&self) -> Option<[f64; 2]> {
        self.fva_exact
    }

    /// An identity for a machine token (no session fields). `expires_at` is in seconds since
    /// the epoch (`f64::INFINITY` when the token does not expire); `claims` are the token's
    /// custom claims.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn for_machine(
        token_type: TokenType,
        token_id: String,
        info: MachineInfo,
        claims: Map<String, Value>,
        issuer: Option<String>,
        issued_at: Option<f64>,
        expires_at: f64,
        not_before: Option<f64>,
    ) -> Self {
        let subject = info.subject.as_str();
        // Clerk's auth objects: OAuth → userId = subject; API key → userId / orgId by prefix.
        let user_id = match token_type {
            TokenType::OauthToken => subject.to_owned(),
            TokenType::ApiKey if subject.starts_with("user_") => subject.to_owned(),
            _ => String::new(),
        };
        let organization =
            (token_type == TokenType::ApiKey && subject.starts_with("org_")).then(|| {
                Organization {
                    id: subject.to_owned(),
                    ..Organization::default()
                }
            });
        let raw_claims = serde_json::to_string(&claims).unwrap_or_default();
        Identity {
            token_type,
            user_id,
            session_id: None,
            session_status: None,
            organization,
            features: Entitlements::default(),
            plans: Entitlements::default(),
            actor: None,
            factor_verification_age: None,
            issuer,
            authorized_party: None,
            issued_at,
            expires_at,
            not_before,
            token_id: (!token_id.is_empty()).then_some(token_id),
            claims_version: 0,
            machine: Some(Box::new(info)),
            fva_exact: None,
            raw_claims,
            claims: OnceLock::from(claims),
        }
    }

    /// The expiry in milliseconds since the epoch, as Clerk reads `exp`: truncated to whole
    /// seconds; infinity when it never expires (no `exp`, or one Clerk reads as an Invalid
    /// Date, which never compares as expired).
    pub fn expires_at_ms(&self) -> f64 {
        crate::token::check::js_date_ms(self.expires_at).unwrap_or(f64::INFINITY)
    }

    /// Rebuilds an identity from the wire type (what a delegated layer receives from
    /// AuthService). Claims come from `claims_json` (exact); without it, from the `Struct`,
    /// whose numbers are doubles (integral values come back as integers).
    pub fn from_proto(p: pb::Identity) -> Self {
        let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
        // `claims_json` is exact; the Struct (older servers, or when asked for) is the fallback.
        // A map parsed from `claims_json` is not kept (a cached identity holds the text, and
        // [`Identity::claims`] parses it again on demand to the same map); text that is not a
        // JSON object reads as no claims, as it always has.
        let (claims, raw_claims, fva_exact) = if p.claims_json.is_empty() {
            let claims = p.claims.map(struct_to_json_map).unwrap_or_default();
            let raw = serde_json::to_string(&claims).unwrap_or_default();
            let fva = fva_from_json(claims.get("fva"));
            (OnceLock::from(claims), raw, fva)
        } else {
            match serde_json::from_str::<Map<String, Value>>(&p.claims_json) {
                Ok(map) => (
                    OnceLock::new(),
                    p.claims_json,
                    fva_from_json(map.get("fva")),
                ),
                Err(_) => (OnceLock::from(Map::new()), p.claims_json, None),
            }
        };
        let secs = |t: Option<prost_types::Timestamp>| {
            t.map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
        };
        let entitlements = |e: Option<pb::Entitlements>| {
            e.map(|e| Entitlements {
                user: e.user,
                organization: e.organization,
            })
            .unwrap_or_default()
        };
        Identity {
            token_type: TokenType::try_from(p.token_type).unwrap_or(TokenType::Unspecified),
            user_id: p.user_id,
            session_id: none_if_empty(p.session_id),
            session_status: match SessionStatus::try_from(p.session_status) {
                Ok(SessionStatus::Unspecified) | Err(_) => None,
                Ok(s) => Some(s),
            },
            organization: p.organization.map(|o| Organization {
                id: o.id,
                slug: none_if_empty(o.slug),
                role: none_if_empty(o.role),
                permissions: o.permissions,
            }),
            features: entitlements(p.features),
            plans: entitlements(p.plans),
            actor: p.actor.map(|a| {
                Box::new(Actor {
                    sub: a.sub,
                    sid: none_if_empty(a.sid),
                    iss: none_if_empty(a.iss),
                    actor_type: none_if_empty(a.r#type),
                })
            }),
            factor_verification_age: p
                .factor_verification_age
                .map(|f| [f.first_factor_minutes, f.second_factor_minutes]),
            issuer: none_if_empty(p.issuer),
            authorized_party: none_if_empty(p.authorized_party),
            issued_at: secs(p.issued_at),
            expires_at: secs(p.expires_at).unwrap_or(f64::INFINITY),
            not_before: secs(p.not_before),
            token_id: none_if_empty(p.token_id),
            claims_version: u8::try_from(p.claims_version).unwrap_or(1),
            machine: p.machine.map(|m| {
                Box::new(MachineInfo {
                    subject: m.subject,
                    scopes: m.scopes,
                    machine_id: none_if_empty(m.machine_id),
                    client_id: none_if_empty(m.client_id),
                    name: none_if_empty(m.name),
                })
            }),
            fva_exact,
            raw_claims,
            claims,
        }
    }

    /// Converts to the wire type, with the claims as a Struct too (`claims`). The claims
    /// parsed for it are not kept: an identity in a verdict cache stays the size of its text.
    pub fn to_proto_with_claims_struct(&self) -> pb::Identity {
        let parsed;
        let claims = match self.claims.get() {
            Some(map) => map,
            None => {
                parsed = crate::token::claims::payload_map(&self.raw_claims);
                &parsed
            }
        };
        pb::Identity {
            claims: Some(json_map_to_struct(claims)),
            ..self.to_proto()
        }
    }

    /// Converts to the wire type (claims as `claims_json` only).
    pub fn to_proto(&self) -> pb::Identity {
        pb::Identity {
            token_type: self.token_type as i32,
            user_id: self.user_id.clone(),
            session_id: self.session_id.clone().unwrap_or_default(),
            session_status: self.session_status.unwrap_or(SessionStatus::Unspecified) as i32,
            organization: self.organization.as_ref().map(|o| pb::Organization {
                id: o.id.clone(),
                slug: o.slug.clone().unwrap_or_default(),
                role: o.role.clone().unwrap_or_default(),
                permissions: o.permissions.clone(),
            }),
            features: Some(self.features.to_proto()),
            plans: Some(self.plans.to_proto()),
            actor: self.actor.as_ref().map(|a| pb::Actor {
                sub: a.sub.clone(),
                sid: a.sid.clone().unwrap_or_default(),
                iss: a.iss.clone().unwrap_or_default(),
                r#type: a.actor_type.clone().unwrap_or_default(),
            }),
            factor_verification_age: self.factor_verification_age.map(|[f1, f2]| {
                pb::FactorVerificationAge {
                    first_factor_minutes: f1,
                    second_factor_minutes: f2,
                }
            }),
            issuer: self.issuer.clone().unwrap_or_default(),
            authorized_party: self.authorized_party.clone().unwrap_or_default(),
            issued_at: self.issued_at.map(timestamp),
            expires_at: self
                .expires_at
                .is_finite()
                .then(|| timestamp(self.expires_at)),
            not_before: self.not_before.map(timestamp),
            claims: None,
            claims_json: self.raw_claims.clone(),
            token_id: self.token_id.clone().unwrap_or_default(),
            claims_version: i32::from(self.claims_version),
            machine: self.machine.as_ref().map(|m| pb::Machine {
                subject: m.subject.clone(),
                scopes: m.scopes.clone(),
                machine_id: m.machine_id.clone().unwrap_or_default(),
                client_id: m.client_id.clone().unwrap_or_default(),
                name: m.name.clone().unwrap_or_default(),
            }),
        }
    }
}

impl Entitlements {
    fn to_proto(&self) -> pb::Entitlements {
        pb::Entitlements {
            user: self.user.clone(),
            organization: self.organization.clone(),
        }
    }
}

/// Clerk's `has()` reads `fva` only when it holds two finite numbers, each -1 or ≥ 0.
fn fva_is_valid(a: &[f64; 2]) -> bool {
    a.iter().all(|x| x.is_finite() && (*x == -1.0 || *x >= 0.0))
}

fn fva_from_json(v: Option<&Value>) -> Option<[f64; 2]> {
    match v?.as_array()?.as_slice() {
        [a, b] => Some([a.as_f64()?, b.as_f64()?]).filter(fva_is_valid),
        _ => None,
    }
}

fn to_i32(f: f64) -> i32 {
    if f.is_finite() {
        f.clamp(i32::MIN as f64, i32::MAX as f64) as i32
    } else {
        -1
    }
}

fn timestamp(secs: f64) -> prost_types::Timestamp {
    let s = secs.floor();
    prost_types::Timestamp {
        seconds: s as i64,
        nanos: ((secs - s) * 1e9).round().min(999_999_999.0) as i32,
    }
}

/// Clerk's `splitByScope(claim)`: a falsy claim is empty; a string is split; any other
/// truthy value throws (it has no `split`).
fn split_lenient(claim: &Lenient) -> Result<Entitlements, MalformedScopes> {
    match claim {
        Lenient::Str(s) => split_by_scope(Some(s)),
        l if !l.truthy() => Ok(Entitlements::default()),
        _ => Err(MalformedScopes),
    }
}

/// Clerk's `splitByScope`: split on `,`, trim; each element must contain `:`; scope `o` →
/// organization, `u` → user, `ou`/`uo` → both; other scopes ignored. Empty or absent → empty.
pub fn split_by_scope(claim: Option<&str>) -> Result<Entitlements, MalformedScopes> {
    let mut out = Entitlements::default();
    let s = match claim {
        None | Some("") => return Ok(out),
        Some(s) => s,
    };
    for el in s.split(',').map(str::trim) {
        let (scope, value) = el.split_once(':').ok_or(MalformedScopes)?;
        let value = value.to_owned();
        match scope {
            "o" => out.organization.push(value),
            "u" => out.user.push(value),
            "ou" | "uo" => {
                out.organization.push(value.clone());
                out.user.push(value);
            }
            _ => {}
        }
    }
    Ok(out)
}

fn decode_v1_org(
    id: Lenient,
    slug: Lenient,
    role: Lenient,
    permissions: Option<Value>,
) -> Option<Organization> {
    let id = id.into_string().filter(|i| !i.is_empty())?;
    Some(Organization {
        id,
        slug: slug.into_string(),
        role: role.into_string(),
        permissions: match permissions {
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        },
    })
}

fn decode_v2_org(o: RawOrg, org_features: &[String]) -> Option<Organization> {
    let non_empty = |l: Lenient| l.into_string().filter(|v| !v.is_empty());
    let id = non_empty(o.id)?;
    let permissions = decode_fpm(org_features, o.per.as_str(), o.fpm.as_str());
    Some(Organization {
        id,
        slug: non_empty(o.slg),
        role: non_empty(o.rol).map(|r| format!("org:{r}")),
        permissions,
    })
}

/// Decodes v2 `o.fpm` masks into `org:<feature>:<permission>` keys, exactly as Clerk's JS SDK:
/// mask *j* belongs to the *j*-th **organization-scoped** feature; bit *i* (LSB first) to the
/// *i*-th permission of `o.per`; masks of any size are decoded exactly; a mask that is not all
/// decimal digits has no bits; bits beyond the permission list are dropped.
pub(crate) fn decode_fpm(
    org_features: &[String],
    per: Option<&str>,
    fpm: Option<&str>,
) -> Vec<String> {
    let (Some(per), Some(fpm)) = (per.filter(|p| !p.is_empty()), fpm.filter(|f| !f.is_empty()))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (feature, mask) in org_features.iter().zip(fpm.split(',').map(str::trim)) {
        if mask.is_empty() || !mask.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let bits = MaskBits::parse(mask);
        for (i, perm) in per.split(',').map(str::trim).enumerate() {
            if bits.bit(i) {
                let mut key = String::with_capacity(5 + feature.len() + perm.len());
                key.push_str("org:");
                key.push_str(feature);
                key.push(':');
                key.push_str(perm);
                out.push(key);
            }
        }
    }
    out
}

/// A decimal permission mask: `u128` when it fits (no allocation), arbitrary size otherwise.
enum MaskBits {
    Small(u128),
    Big(BigUint),
}

impl MaskBits {
    /// `mask` is all ASCII digits and non-empty.
    fn parse(mask: &str) -> Self {
        match mask.parse::<u128>() {
            Ok(v) => MaskBits::Small(v),
            Err(_) => MaskBits::Big(BigUint::parse_bytes(mask.as_bytes(), 10).unwrap_or_default()),
        }
    }

    fn bit(&self, i: usize) -> bool {
        match self {
            MaskBits::Small(v) => i < 128 && (v >> i) & 1 == 1,
            MaskBits::Big(b) => b.bit(i as u64),
        }
    }
}

/// Converts a JSON object into a `google.protobuf.Struct`.
pub fn json_map_to_struct(map: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_proto(v)))
            .collect(),
    }
}

/// Converts a `google.protobuf.Struct` back into a JSON object (integral numbers within
/// ±2^53 become integers).
pub fn struct_to_json_map(s: prost_types::Struct) -> Map<String, Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, proto_to_json(v)))
        .collect()
}

fn proto_to_json(v: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 {
                Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(proto_to_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json_map(s)),
    }
}

fn json_to_proto(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_proto).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_map_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(s: &str) -> Vec<String> {
        split_by_scope(Some(s)).unwrap().organization
    }

    #[test]
    fn docs_worked_example() {
        let got = decode_fpm(
            &feats("o:dashboard,o:teams"),
            Some("manage,read"),
            Some("3,2"),
        );
        assert_eq!(
            got,
            [
                "org:dashboard:manage",
                "org:dashboard:read",
                "org:teams:read"
            ]
        );
    }

    #[test]
    fn masks_beyond_u128_decode_exactly() {
        // 2^200 + 1: bits 0 and 200.
        let mask = (BigUint::from(1u8) << 200usize) + 1u8;
        let perms: Vec<String> = (0..=200).map(|i| format!("p{i}")).collect();
        let got = decode_fpm(
            &feats("o:f"),
            Some(&perms.join(",")),
            Some(&mask.to_string()),
        );
        assert_eq!(got, ["org:f:p0", "org:f:p200"]);
    }

    #[test]
    fn malformed_scopes_fail_closed() {
        for bad in ["o:a,b", "nocolon", "o:a,", ","] {
            assert_eq!(split_by_scope(Some(bad)), Err(MalformedScopes), "{bad}");
        }
        assert_eq!(split_lenient(&Lenient::Num(3.0)), Err(MalformedScopes));
        assert_eq!(split_lenient(&Lenient::Other), Err(MalformedScopes));
        assert_eq!(split_lenient(&Lenient::Bool(true)), Err(MalformedScopes));
        assert_eq!(split_by_scope(Some("")), Ok(Entitlements::default()));
        for falsy in [
            Lenient::Null,
            Lenient::Absent,
            Lenient::Bool(false),
            Lenient::Num(0.0),
            Lenient::Num(-0.0),
        ] {
            assert_eq!(
                split_lenient(&falsy),
                Ok(Entitlements::default()),
                "{falsy:?}"
            );
        }
    }

    #[test]
    fn timestamps_keep_fractions() {
        let t = timestamp(1666648310.5);
        assert_eq!((t.seconds, t.nanos), (1666648310, 500_000_000));
    }
}
