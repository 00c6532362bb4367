//! The verified [`Identity`] a token carries, and how Clerk's v1 and v2 session claims decode
//! into it (organization, role, permissions, features, plans, actor, factor ages).

use num_bigint::BigUint;
use serde_json::{Map, Value};

use crate::pb;

pub use crate::pb::{SessionStatus, TokenType};

/// The verified identity of a caller. Handed to handlers by the auth layer and returned by
/// `VerifyToken`.
#[derive(Debug, Clone, PartialEq)]
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
    pub actor: Option<Actor>,
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
    /// Every claim, unchanged.
    pub claims: Map<String, Value>,
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

/// A scoped claim had an element without a `:` (Clerk's SDK throws on it; we reject).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedScopes;

// === impl Identity ===

impl Identity {
    /// Decodes a session token's payload (already verified) into an identity.
    ///
    /// `sub` and `exp` must already have been checked to be a string and a number.
    pub(crate) fn from_session_claims(
        token_type: TokenType,
        claims: Map<String, Value>,
    ) -> Result<Self, MalformedScopes> {
        let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
        let n = |k: &str| claims.get(k).and_then(Value::as_f64);
        let v2 = claims.get("v").and_then(Value::as_f64) == Some(2.0);
        let features = split_by_scope(claims.get("fea"))?;
        let plans = split_by_scope(claims.get("pla"))?;
        let organization = if v2 {
            claims
                .get("o")
                .and_then(Value::as_object)
                .and_then(|o| decode_v2_org(o, &features.organization))
        } else {
            decode_v1_org(&claims)
        };
        let session_status = match claims.get("sts").and_then(Value::as_str) {
            Some("active") => Some(SessionStatus::Active),
            Some("pending") => Some(SessionStatus::Pending),
            _ => None,
        };
        let actor = claims.get("act").and_then(Value::as_object).map(|a| {
            let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_owned);
            Actor {
                sub: s("sub").unwrap_or_default(),
                sid: s("sid"),
                iss: s("iss"),
                actor_type: s("type"),
            }
        });
        let factor_verification_age =
            claims
                .get("fva")
                .and_then(Value::as_array)
                .and_then(|a| match a.as_slice() {
                    [f1, f2] => Some([to_i32(f1.as_f64()?), to_i32(f2.as_f64()?)]),
                    _ => None,
                });
        Ok(Identity {
            token_type,
            user_id: s("sub").unwrap_or_default(),
            session_id: s("sid"),
            session_status,
            organization,
            features,
            plans,
            actor,
            factor_verification_age,
            issuer: s("iss"),
            authorized_party: s("azp"),
            issued_at: n("iat"),
            expires_at: n("exp").unwrap_or(0.0),
            not_before: n("nbf"),
            token_id: s("jti"),
            claims_version: if v2 { 2 } else { 1 },
            claims,
        })
    }

    /// The expiry in milliseconds since the epoch.
    pub fn expires_at_ms(&self) -> f64 {
        self.expires_at * 1000.0
    }

    /// Converts to the wire type.
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
            expires_at: Some(timestamp(self.expires_at)),
            not_before: self.not_before.map(timestamp),
            claims: Some(json_map_to_struct(&self.claims)),
            token_id: self.token_id.clone().unwrap_or_default(),
            claims_version: i32::from(self.claims_version),
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

/// Clerk's `splitByScope`: split on `,`, trim; each element must contain `:`; scope `o` →
/// organization, `u` → user, `ou`/`uo` → both; other scopes ignored. Empty or absent → empty.
pub fn split_by_scope(claim: Option<&Value>) -> Result<Entitlements, MalformedScopes> {
    let mut out = Entitlements::default();
    let s = match claim {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::String(s)) if s.is_empty() => return Ok(out),
        Some(Value::String(s)) => s,
        Some(_) => return Err(MalformedScopes),
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

fn decode_v1_org(claims: &Map<String, Value>) -> Option<Organization> {
    let id = claims.get("org_id").and_then(Value::as_str)?;
    if id.is_empty() {
        return None;
    }
    let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(Organization {
        id: id.to_owned(),
        slug: s("org_slug"),
        role: s("org_role"),
        permissions: claims
            .get("org_permissions")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn decode_v2_org(o: &Map<String, Value>, org_features: &[String]) -> Option<Organization> {
    let s = |k: &str| o.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    let id = s("id")?;
    Some(Organization {
        id: id.to_owned(),
        slug: s("slg").map(str::to_owned),
        role: s("rol").map(|r| format!("org:{r}")),
        permissions: decode_fpm(org_features, s("per"), s("fpm")),
    })
}

/// Decodes v2 `o.fpm` masks into `org:<feature>:<permission>` keys, exactly as Clerk's JS SDK:
/// mask *j* belongs to the *j*-th **organization-scoped** feature; bit *i* (LSB first) to the
/// *i*-th permission of `o.per`; masks of any size are decoded exactly; a mask that is not all
/// decimal digits has no bits; bits beyond the permission list are dropped.
pub fn decode_fpm(org_features: &[String], per: Option<&str>, fpm: Option<&str>) -> Vec<String> {
    let (Some(per), Some(fpm)) = (per, fpm) else {
        return Vec::new();
    };
    let perms: Vec<&str> = per.split(',').map(str::trim).collect();
    let masks: Vec<&str> = fpm.split(',').map(str::trim).collect();
    let mut out = Vec::new();
    for (j, feature) in org_features.iter().enumerate() {
        let Some(mask) = masks.get(j) else { continue };
        if mask.is_empty() || !mask.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Some(bits) = mask_bits(mask) else {
            continue;
        };
        for (i, perm) in perms.iter().enumerate() {
            if bits.bit(i as u64) {
                out.push(format!("org:{feature}:{perm}"));
            }
        }
    }
    out
}

fn mask_bits(mask: &str) -> Option<BigUint> {
    // Fast path for the common small masks.
    if mask.len() <= 19 {
        return mask.parse::<u64>().ok().map(BigUint::from);
    }
    BigUint::parse_bytes(mask.as_bytes(), 10)
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
        split_by_scope(Some(&Value::String(s.into())))
            .unwrap()
            .organization
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
            assert_eq!(
                split_by_scope(Some(&Value::String(bad.into()))),
                Err(MalformedScopes),
                "{bad}"
            );
        }
        assert_eq!(split_by_scope(Some(&Value::from(3))), Err(MalformedScopes));
        assert_eq!(
            split_by_scope(Some(&Value::String(String::new()))),
            Ok(Entitlements::default())
        );
    }

    #[test]
    fn timestamps_keep_fractions() {
        let t = timestamp(1666648310.5);
        assert_eq!((t.seconds, t.nanos), (1666648310, 500_000_000));
    }
}
