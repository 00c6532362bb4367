//! The one-pass JSON scanner against the JS-faithful reference decoder (Clerk's `TextDecoder`
//! then `JSON.parse`): the same bytes, as a decoded JWT header or payload, give the same header
//! and the same claims the verifier reads, or both are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = clerk_grpc_auth::fuzzing::claims_agree(data) {
        panic!("{e}");
    }
});
