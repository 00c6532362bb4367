//! The JWKS parser on hostile documents: bounded, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((set, _skipped)) = clerk_grpc_auth::token::keys::KeySet::from_jwks_json(data) {
        for kid in set.kids() {
            let _ = set.get(Some(kid));
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = clerk_grpc_auth::token::keys::VerifyingKey::from_pem(s);
    }
});
