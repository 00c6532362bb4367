//! Parsed verification keys: one [`VerifyingKey`] per Clerk signing key, grouped in a
//! [`KeySet`] that belongs to exactly one key source.
//!
//! Keys are parsed **once**, when they are loaded: the RSA public key is turned into
//! `aws-lc-rs` parsed keys ready to verify, so the hot path never re-parses key material.

use std::{collections::HashMap, fmt, sync::Arc};

use aws_lc_rs::signature::{
    ParsedPublicKey, RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512,
};
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine as _,
};
use serde::Deserialize;

use crate::error::KeyError;

/// The smallest RSA modulus we accept, in bits (Clerk issues 2048-bit keys).
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus we accept, in bits.
pub const MAX_RSA_BITS: usize = 8192;
/// The most keys a JWKS may hold before it is considered hostile.
pub const MAX_JWKS_KEYS: usize = 64;

/// A JWS algorithm this crate can verify: RSASSA-PKCS1-v1_5 with SHA-256/384/512.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
}

/// One RSA public key, parsed and ready to verify.
pub struct VerifyingKey {
    kid: Option<String>,
    /// The `alg` the key declares (JWKS `alg`, or RS256 for a PEM key, as Clerk's SDK
    /// derives). A token whose `alg` differs fails with `token-verification-failed`.
    declared_alg: Option<Alg>,
    /// Parsed keys indexed by [`Alg::index`]; only the declared one when `alg` is declared.
    parsed: [Option<ParsedPublicKey>; 3],
    n: Vec<u8>,
    e: Vec<u8>,
}

/// The keys of one Clerk instance, from one source.
#[derive(Clone)]
pub struct KeySet {
    kind: KeySetKind,
}

#[derive(Clone)]
enum KeySetKind {
    /// Networkless: one key that verifies any `kid` (as Clerk's `jwtKey` mode).
    Single(Arc<VerifyingKey>),
    /// JWKS: keys selected by `kid`.
    ByKid(HashMap<String, Arc<VerifyingKey>>),
}

#[derive(Deserialize)]
struct JwksDoc {
    keys: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

// === impl Alg ===

impl Alg {
    /// Parses a JOSE `alg` value; only the exact strings `RS256`, `RS384`, `RS512`.
    pub fn from_jose(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::RS256),
            "RS384" => Some(Alg::RS384),
            "RS512" => Some(Alg::RS512),
            _ => None,
        }
    }

    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
        }
    }

    const ALL: [Alg; 3] = [Alg::RS256, Alg::RS384, Alg::RS512];

    fn index(self) -> usize {
        match self {
            Alg::RS256 => 0,
            Alg::RS384 => 1,
            Alg::RS512 => 2,
        }
    }

    fn params(self) -> &'static aws_lc_rs::signature::RsaParameters {
        match self {
            Alg::RS256 => &RSA_PKCS1_2048_8192_SHA256,
            Alg::RS384 => &RSA_PKCS1_2048_8192_SHA384,
            Alg::RS512 => &RSA_PKCS1_2048_8192_SHA512,
        }
    }
}

// === impl VerifyingKey ===

impl VerifyingKey {
    /// Builds a key from its big-endian modulus and exponent.
    pub fn from_components(
        kid: Option<String>,
        declared_alg: Option<Alg>,
        n: &[u8],
        e: &[u8],
    ) -> Result<Self, String> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        if n.is_empty() || e.is_empty() {
            return Err("empty modulus or exponent".into());
        }
        let bits = n.len() * 8 - n[0].leading_zeros() as usize;
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(format!(
                "RSA modulus of {bits} bits (accepted: {MIN_RSA_BITS}..={MAX_RSA_BITS})"
            ));
        }
        if e.len() > 8 || e[e.len() - 1] & 1 == 0 {
            return Err("RSA exponent must be odd and at most 64 bits".into());
        }
        let comps = RsaPublicKeyComponents { n, e };
        let mut parsed: [Option<ParsedPublicKey>; 3] = [None, None, None];
        for alg in Alg::ALL {
            if declared_alg.is_none_or(|d| d == alg) {
                let key = comps
                    .to_parsed_public_key(alg.params())
                    .map_err(|e| format!("RSA key rejected: {e}"))?;
                parsed[alg.index()] = Some(key);
            }
        }
        Ok(Self {
            kid,
            declared_alg,
            parsed,
            n: n.to_vec(),
            e: e.to_vec(),
        })
    }

    /// Parses a PEM public key as Clerk's Dashboard shows it: armoured SPKI
    /// (`-----BEGIN PUBLIC KEY-----`) or the bare single-line base64 body. RSA only.
    ///
    /// The key is declared RS256, as Clerk's SDK derives it (`alg: RS256`).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let body: String = pem
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .concat()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if body.is_empty() {
            return Err(KeyError::InvalidPem("empty key".into()));
        }
        if pem.contains("PRIVATE KEY") {
            return Err(KeyError::InvalidPem(
                "this is a private key; give the public key".into(),
            ));
        }
        let der = STANDARD
            .decode(body.trim_end_matches('='))
            .or_else(|_| STANDARD.decode(&body))
            .or_else(|_| {
                base64::engine::general_purpose::STANDARD_NO_PAD.decode(body.trim_end_matches('='))
            })
            .map_err(|_| KeyError::InvalidPem("not base64".into()))?;
        let pk = aws_lc_rs::rsa::PublicKey::from_der(&der)
            .map_err(|_| KeyError::InvalidPem("not an RSA SubjectPublicKeyInfo".into()))?;
        Self::from_components(
            None,
            Some(Alg::RS256),
            pk.modulus().big_endian_without_leading_zero(),
            pk.exponent().big_endian_without_leading_zero(),
        )
        .map_err(KeyError::InvalidPem)
    }

    /// The key id, when the key came from a JWKS.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The base64url modulus `n`, as a JWK would carry it.
    pub fn n_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.n)
    }

    /// The base64url exponent `e`, as a JWK would carry it.
    pub fn e_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.e)
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.n.len() * 8 - self.n[0].leading_zeros() as usize
    }

    /// Verifies `signature` over `message` with `alg`.
    ///
    /// `Err(Mismatch)` when the key cannot be used with `alg` (Clerk reports
    /// `token-verification-failed`); `Err(Invalid)` when the signature is wrong.
    pub fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> Result<(), SigError> {
        if self.declared_alg.is_some_and(|d| d != alg) {
            return Err(SigError::Mismatch);
        }
        let key = self.parsed[alg.index()]
            .as_ref()
            .ok_or(SigError::Mismatch)?;
        if signature.len() != self.n.len() {
            // aws-lc rejects these too; a wrong length is just an invalid signature.
            return Err(SigError::Invalid);
        }
        key.verify_sig(message, signature)
            .map_err(|_| SigError::Invalid)
    }

    fn same_material(&self, other: &VerifyingKey) -> bool {
        self.kid == other.kid
            && self.declared_alg == other.declared_alg
            && self.n == other.n
            && self.e == other.e
    }
}

/// Why a signature check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigError {
    /// The key cannot verify this algorithm.
    Mismatch,
    /// The signature does not verify.
    Invalid,
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.declared_alg)
            .field("bits", &self.bits())
            .finish()
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[i..]
}

// === impl KeySet ===

impl KeySet {
    /// A networkless key set: one key verifies every token, whatever its `kid`.
    pub fn single(key: VerifyingKey) -> Self {
        Self {
            kind: KeySetKind::Single(Arc::new(key)),
        }
    }

    /// Parses a JWKS document (`{"keys": [...]}`).
    ///
    /// Keys that are not RSA signature keys, lack a `kid`, declare an algorithm other than
    /// RS256/384/512, or do not parse are skipped (returned in the second value as warnings).
    /// A document with no usable key is an error.
    pub fn from_jwks_json(body: &[u8]) -> Result<(Self, Vec<String>), String> {
        let doc: JwksDoc =
            serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
        let keys = doc.keys.ok_or("no `keys` array")?;
        if keys.len() > MAX_JWKS_KEYS {
            return Err(format!(
                "{} keys (more than {MAX_JWKS_KEYS}; refusing a hostile JWKS)",
                keys.len()
            ));
        }
        let mut out = HashMap::new();
        let mut skipped = Vec::new();
        for (i, raw) in keys.into_iter().enumerate() {
            match Self::parse_jwk(raw) {
                Ok(key) => {
                    let kid = key.kid.clone().unwrap_or_default();
                    if out.contains_key(&kid) {
                        skipped.push(format!("key {i}: duplicate kid {kid:?}"));
                        continue;
                    }
                    out.insert(kid, Arc::new(key));
                }
                Err(why) => skipped.push(format!("key {i}: {why}")),
            }
        }
        if out.is_empty() {
            return Err(if skipped.is_empty() {
                "the JWKS holds no keys".into()
            } else {
                format!("the JWKS holds no usable key ({})", skipped.join("; "))
            });
        }
        Ok((
            Self {
                kind: KeySetKind::ByKid(out),
            },
            skipped,
        ))
    }

    fn parse_jwk(raw: serde_json::Value) -> Result<VerifyingKey, String> {
        let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("not a JWK: {e}"))?;
        if jwk.kty.as_deref() != Some("RSA") {
            return Err(format!("kty {:?} is not RSA", jwk.kty));
        }
        if let Some(u) = jwk.use_.as_deref() {
            if u != "sig" {
                return Err(format!("use {u:?} is not sig"));
            }
        }
        let kid = jwk.kid.filter(|k| !k.is_empty()).ok_or("no kid")?;
        if kid.len() > 256 {
            return Err("kid longer than 256 bytes".into());
        }
        let alg = match jwk.alg.as_deref() {
            None => None,
            Some(a) => Some(Alg::from_jose(a).ok_or_else(|| format!("alg {a:?} not supported"))?),
        };
        let n = b64url_lenient(jwk.n.as_deref().ok_or("no n")?).ok_or("n is not base64url")?;
        let e = b64url_lenient(jwk.e.as_deref().ok_or("no e")?).ok_or("e is not base64url")?;
        VerifyingKey::from_components(Some(kid), alg, &n, &e)
    }

    /// Looks up the key for a token's `kid`. A single-key set ignores `kid`, as Clerk's
    /// networkless mode does.
    #[inline]
    pub fn get(&self, kid: Option<&str>) -> Option<&Arc<VerifyingKey>> {
        match &self.kind {
            KeySetKind::Single(k) => Some(k),
            KeySetKind::ByKid(map) => map.get(kid?),
        }
    }

    /// The key ids in this set (empty for a networkless key).
    pub fn kids(&self) -> Vec<&str> {
        match &self.kind {
            KeySetKind::Single(_) => Vec::new(),
            KeySetKind::ByKid(map) => map.keys().map(String::as_str).collect(),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        match &self.kind {
            KeySetKind::Single(_) => 1,
            KeySetKind::ByKid(map) => map.len(),
        }
    }

    /// Never true: a key set holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether two sets hold exactly the same keys.
    pub fn same_keys(&self, other: &KeySet) -> bool {
        match (&self.kind, &other.kind) {
            (KeySetKind::Single(a), KeySetKind::Single(b)) => a.same_material(b),
            (KeySetKind::ByKid(a), KeySetKind::ByKid(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .all(|(k, v)| b.get(k).is_some_and(|w| v.same_material(w)))
            }
            _ => false,
        }
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            KeySetKind::Single(k) => f.debug_tuple("KeySet::Single").field(k).finish(),
            KeySetKind::ByKid(m) => f.debug_set().entries(m.keys()).finish(),
        }
    }
}

/// base64url that tolerates padding and non-zero trailing bits, as Clerk's SDK decoder does.
const LENIENT_B64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Decodes base64url, tolerating padding and trailing bits (as Clerk's SDK does).
///
/// Canonical input (every real token) takes the SIMD decoder; anything it refuses is retried
/// with the lenient scalar decoder, which accepts a strict superset and decodes identically.
#[inline]
pub(crate) fn b64url_lenient(s: &str) -> Option<Vec<u8>> {
    base64_simd::URL_SAFE_NO_PAD
        .decode_to_vec(s)
        .ok()
        .or_else(|| LENIENT_B64URL.decode(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_small_and_even_exponent_keys() {
        let n = vec![0xC3u8; 128]; // 1024 bits
        assert!(VerifyingKey::from_components(None, None, &n, &[1, 0, 1])
            .unwrap_err()
            .contains("1024 bits"));
        let n = vec![0xC3u8; 256];
        assert!(VerifyingKey::from_components(None, None, &n, &[2]).is_err());
    }

    #[test]
    fn hostile_jwks_documents_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"null",
            b"[]",
            b"{}",
            b"{\"keys\":null}",
            b"{\"keys\":[]}",
            b"{\"keys\":[1,2,3]}",
            b"{\"keys\":[{\"kty\":\"RSA\",\"kid\":\"x\",\"n\":\"!!\",\"e\":\"AQAB\"}]}",
            b"{\"keys\":[{\"kty\":\"EC\",\"kid\":\"x\"}]}",
        ] {
            assert!(KeySet::from_jwks_json(body).is_err(), "{body:?}");
        }
        let many = format!("{{\"keys\":[{}]}}", vec!["{}"; MAX_JWKS_KEYS + 1].join(","));
        assert!(KeySet::from_jwks_json(many.as_bytes())
            .unwrap_err()
            .contains("hostile"));
    }

    #[test]
    fn lenient_base64url() {
        assert_eq!(b64url_lenient("aGk").unwrap(), b"hi");
        assert_eq!(b64url_lenient("aGk=").unwrap(), b"hi");
        assert_eq!(
            b64url_lenient("aGl").unwrap(),
            b"hi",
            "trailing bits are ignored"
        );
        assert_eq!(b64url_lenient("-_8").unwrap(), [0xfb, 0xff]);
        for bad in ["a+b/", "a b", " aGk", "aGk\n", "a"] {
            assert!(b64url_lenient(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn pem_rejects_garbage_and_private_keys() {
        assert!(VerifyingKey::from_pem("").is_err());
        assert!(VerifyingKey::from_pem("not a key").is_err());
        assert!(VerifyingKey::from_pem(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"
        )
        .is_err());
    }
}
