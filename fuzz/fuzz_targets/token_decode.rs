//! Token decoding and claims parsing: any bytes as a token, through the decoder and the full
//! verifier with a real key — an error is fine, a panic or a hang is a bug.
#![no_main]

use std::sync::OnceLock;

use clerk_grpc_auth::{emulator::SigningKey, token::{keys::KeySet, check::{Decoded, Validation, Verifier, VerifyOptions}}};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = SigningKey::generate().expect("key");
        let jwks = serde_json::json!({ "keys": [key.jwk()] }).to_string();
        KeySet::from_jwks_json(jwks.as_bytes()).expect("jwks").0
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = Decoded::parse(token) {
        let _ = d.kid();
        let _ = d.token_type();
    }
    let v = Verifier::new(Validation::default());
    let _ = v.verify(token, keys(), &VerifyOptions::default(), 1_700_000_000_000);
});
