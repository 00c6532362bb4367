//! Machine tokens (as `@clerk/backend` verifies them): recognition by prefix, JWT-format M2M
//! and OAuth tokens decoded into identities, and opaque tokens (`mt_`, `oat_`, `ak_`) verified
//! through Clerk's Backend API
//! ([`MachineVerifier`](crate::clerk::machines::MachineVerifier)).

use serde_json::{Map, Value};

use crate::token::{
    claims::RawClaims,
    identity::{Identity, MachineInfo, TokenType},
};

/// Claims Clerk removes from a machine JWT's payload to form the object's `claims` (§4.4).
const REGISTERED: [&str; 6] = ["iss", "sub", "exp", "nbf", "iat", "jti"];

/// The type an **opaque** token presents by its prefix (Clerk's `getMachineTokenType`):
/// `mt_` → M2M, `oat_` → OAuth, `ak_` → API key. `None` for anything else (a JWT, or an
/// unknown prefix, which then fails as a malformed session token).
pub(crate) fn opaque_type(token: &str) -> Option<TokenType> {
    if token.starts_with("mt_") {
        Some(TokenType::M2mToken)
    } else if token.starts_with("oat_") {
        Some(TokenType::OauthToken)
    } else if token.starts_with("ak_") {
        Some(TokenType::ApiKey)
    } else {
        None
    }
}

fn strings(v: Option<&Value>) -> Option<Vec<String>> {
    v?.as_array().map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    })
}

fn split_spaces(v: Option<&Value>) -> Option<Vec<String>> {
    v?.as_str().map(|s| {
        s.split(' ')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

/// A verified M2M or OAuth JWT → identity, as Clerk builds its machine objects (§4.4).
pub(crate) fn identity_from_jwt(
    token_type: TokenType,
    c: &RawClaims,
    payload_json: &str,
) -> Identity {
    let payload: Map<String, Value> = crate::token::claims::payload_map(payload_json);
    let subject = c.sub.as_str().unwrap_or_default().to_owned();
    let mut info = MachineInfo {
        subject: subject.clone(),
        ..MachineInfo::default()
    };
    if token_type == TokenType::M2mToken {
        info.scopes = split_spaces(payload.get("scopes"))
            .or_else(|| strings(payload.get("aud")))
            .unwrap_or_default();
        info.machine_id = Some(subject);
    } else {
        info.scopes = strings(payload.get("scp"))
            .or_else(|| split_spaces(payload.get("scope")))
            .unwrap_or_default();
        info.client_id = payload
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    let mut claims = payload;
    for k in REGISTERED {
        claims.remove(k);
    }
    Identity::for_machine(
        token_type,
        c.jti.as_str().unwrap_or_default().to_owned(),
        info,
        claims,
        c.iss.as_str().map(str::to_owned),
        c.iat.as_f64(),
        c.exp.as_f64().unwrap_or(0.0),
        c.nbf.as_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(opaque_type("mt_abc"), Some(TokenType::M2mToken));
        assert_eq!(opaque_type("oat_abc"), Some(TokenType::OauthToken));
        assert_eq!(opaque_type("ak_abc"), Some(TokenType::ApiKey));
        assert_eq!(opaque_type("eyJhbGciOi.x.y"), None);
        assert_eq!(opaque_type("m2m_legacy"), None);
        assert_eq!(opaque_type("zz_unknown"), None);
    }
}
