//! Svix signatures, the way Clerk signs its webhooks: `svix-id`, `svix-timestamp`,
//! `svix-signature` (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, space-separated,
//! several allowed), secret `whsec_<base64>` (`CLERK_WEBHOOK_SIGNING_SECRET`). Deliveries
//! outside the timestamp tolerance are refused. Pure: no I/O; the HTTP endpoint that applies
//! deliveries is `server::webhook`.

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::{engine::general_purpose::STANDARD, Engine as _};
use http::HeaderMap;

use crate::secret::Secret;

/// A webhook signing secret that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("CLERK_WEBHOOK_SIGNING_SECRET: {0}")]
pub struct WebhookSecretError(&'static str);

/// Verifies Svix signatures.
#[derive(Clone)]
pub struct SvixVerifier {
    key: hmac::Key,
    pub(crate) tolerance: Duration,
}

impl std::fmt::Debug for SvixVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvixVerifier")
            .field("tolerance", &self.tolerance)
            .finish_non_exhaustive()
    }
}

/// Why a delivery was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// A `svix-*` header is missing or malformed.
    #[error("missing or malformed svix headers")]
    Headers,
    /// The timestamp is outside the tolerance (a replay, or a badly skewed clock).
    #[error("timestamp outside the tolerance")]
    Timestamp,
    /// No signature matches.
    #[error("no matching signature")]
    Signature,
}

impl SvixVerifier {
    /// `secret` as Clerk shows it (`whsec_…`, base64 after the prefix); `tolerance` how far the
    /// timestamp may be from now (Svix: 5 minutes).
    pub fn new(secret: &Secret, tolerance: Duration) -> Result<Self, WebhookSecretError> {
        let s = secret.expose().trim();
        let b64 = s.strip_prefix("whsec_").unwrap_or(s);
        let raw = STANDARD
            .decode(b64)
            .map_err(|_| WebhookSecretError("not a whsec_<base64> secret"))?;
        if raw.len() < 16 {
            return Err(WebhookSecretError("the secret is too short"));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &raw),
            tolerance,
        })
    }

    /// Signs a delivery (for the emulator and tests): the `svix-signature` value.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = hmac::sign(&self.key, &signed_content(id, timestamp, body));
        format!("v1,{}", STANDARD.encode(tag.as_ref()))
    }

    /// Checks a delivery's headers against its body at `now` (seconds since the epoch).
    /// Returns the delivery id.
    pub fn verify<'h>(
        &self,
        headers: &'h HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<&'h str, WebhookError> {
        let get = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or(WebhookError::Headers)
        };
        let id = get("svix-id")?;
        let ts: i64 = get("svix-timestamp")?
            .trim()
            .parse()
            .map_err(|_| WebhookError::Headers)?;
        let sigs = get("svix-signature")?;
        if (now - ts).unsigned_abs() > self.tolerance.as_secs() {
            return Err(WebhookError::Timestamp);
        }
        let content = signed_content(id, ts, body);
        for sig in sigs.split(' ') {
            let Some(b64) = sig.strip_prefix("v1,") else {
                continue;
            };
            let Ok(tag) = STANDARD.decode(b64) else {
                continue;
            };
            // Constant-time comparison.
            if hmac::verify(&self.key, &content, &tag).is_ok() {
                return Ok(id);
            }
        }
        Err(WebhookError::Signature)
    }
}

fn signed_content(id: &str, ts: i64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(id.len() + body.len() + 24);
    v.extend_from_slice(id.as_bytes());
    v.push(b'.');
    v.extend_from_slice(ts.to_string().as_bytes());
    v.push(b'.');
    v.extend_from_slice(body);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> SvixVerifier {
        SvixVerifier::new(
            &Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Duration::from_secs(300),
        )
        .unwrap()
    }

    fn headers(id: &str, ts: i64, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("svix-id", id.parse().unwrap());
        h.insert("svix-timestamp", ts.to_string().parse().unwrap());
        h.insert("svix-signature", sig.parse().unwrap());
        h
    }

    #[test]
    fn svix_reference_vector() {
        // Svix's documented example: secret, id, timestamp, payload → signature.
        let v = verifier();
        let body = br#"{"test": 2432232314}"#;
        let sig = v.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let h = headers("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, &sig);
        assert_eq!(
            v.verify(&h, body, 1614265330 + 10),
            Ok("msg_p5jXN8AQM9LWM0D4loKWxJek")
        );
    }

    #[test]
    fn bad_signatures_and_replays_are_refused() {
        let v = verifier();
        let body = br#"{"type":"session.revoked","data":{"id":"sess_1"}}"#;
        let now = 1_700_000_000;
        let good = v.sign("msg_1", now, body);
        // Several signatures: one match is enough.
        let h = headers("msg_1", now, &format!("v1,AAAA {good}"));
        assert!(v.verify(&h, body, now).is_ok());
        // Tampered body, wrong id, other secret, wrong version.
        assert_eq!(v.verify(&h, b"{}", now), Err(WebhookError::Signature));
        assert_eq!(
            v.verify(&headers("msg_2", now, &good), body, now),
            Err(WebhookError::Signature)
        );
        let other = SvixVerifier::new(
            &Secret::new("whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"),
            Duration::from_secs(300),
        )
        .unwrap();
        assert_eq!(
            other.verify(&headers("msg_1", now, &good), body, now),
            Err(WebhookError::Signature)
        );
        assert_eq!(
            v.verify(
                &headers("msg_1", now, &good.replace("v1,", "v2,")),
                body,
                now
            ),
            Err(WebhookError::Signature)
        );
        // Outside the tolerance either way.
        assert_eq!(
            v.verify(&headers("msg_1", now, &good), body, now + 301),
            Err(WebhookError::Timestamp)
        );
        assert_eq!(
            v.verify(&headers("msg_1", now, &good), body, now - 301),
            Err(WebhookError::Timestamp)
        );
        // Missing headers.
        assert_eq!(
            v.verify(&HeaderMap::new(), body, now),
            Err(WebhookError::Headers)
        );
    }
}
