//! The Svix webhook verifier and event mapping on arbitrary headers and bodies.
#![no_main]

use std::time::Duration;

use clerk_grpc_auth::{secret::Secret, server::webhook::events_for, clerk::svix::SvixVerifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let v = SvixVerifier::new(
        &Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        Duration::from_secs(300),
    )
    .expect("secret");
    // Split the input into three header values and a body.
    let mut parts = data.splitn(4, |b| *b == b'\n');
    let (id, ts, sig, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let mut h = http::HeaderMap::new();
    for (k, val) in [
        ("svix-id", id),
        ("svix-timestamp", ts),
        ("svix-signature", sig),
    ] {
        if let Ok(val) = http::HeaderValue::from_bytes(val) {
            h.insert(k, val);
        }
    }
    let _ = v.verify(&h, body, 1_700_000_000);
    if let Ok(event) = serde_json::from_slice::<serde_json::Value>(body) {
        let kind = event["type"].as_str().unwrap_or_default();
        let _ = events_for(kind, &event["data"]);
    }
});
