//! The outgoing M2M token source against a Backend API whose clock is far from ours: expiry is
//! Clerk's stated lifetime on our monotonic clock, not Clerk's timestamps against our wall
//! clock; a token a callee refuses is replaced once.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{routing::post, Json, Router};
use clerk_grpc_auth::{
    clerk::api::ClerkApi,
    credentials::m2m::{M2mTokenSource, M2mTokenSourceConfig},
    secret::Secret,
};
use serde_json::{json, Value};

/// A fake `POST /m2m_tokens` whose clock is `skew_secs` away from ours; counts creations.
async fn fake_bapi(skew_secs: f64) -> (url::Url, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let app = Router::new().route(
        "/m2m_tokens",
        post(move |Json(body): Json<Value>| {
            let c = c.clone();
            async move {
                let n = c.fetch_add(1, Ordering::Relaxed);
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
                    * 1000.0
                    + skew_secs * 1000.0;
                let secs = body["seconds_until_expiration"].as_f64().unwrap_or(3600.0);
                Json(json!({
                    "object": "machine_to_machine_token",
                    "id": format!("mt_id{n}"),
                    "token": format!("mt_token{n}"),
                    "created_at": now_ms,
                    "expiration": now_ms + secs * 1000.0,
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}").parse().unwrap(), count)
}

fn source(url: url::Url) -> M2mTokenSource {
    M2mTokenSource::new(
        M2mTokenSourceConfig::new(url, Secret::new("ak_machine_secret")),
        &ClerkApi::new().unwrap(),
    )
}

#[tokio::test]
async fn a_skewed_clock_neither_floods_clerk_nor_sends_expired_tokens() {
    // Clerk two hours behind us (our clock ahead): its one-hour token's `expiration` is in our
    // past. Read against our wall clock, every get() would create a token.
    for skew in [-7200.0, 7200.0] {
        let (url, created) = fake_bapi(skew).await;
        let s = source(url);
        let first = s.get().await.unwrap();
        for _ in 0..20 {
            assert_eq!(s.get().await.unwrap(), first, "skew {skew}");
        }
        assert_eq!(
            created.load(Ordering::Relaxed),
            1,
            "skew {skew}: one creation"
        );
    }
}

#[tokio::test]
async fn a_refused_token_is_replaced_once() {
    let (url, created) = fake_bapi(0.0).await;
    let s = source(url);
    let first = s.get().await.unwrap();
    s.rejected(&first);
    let second = s.get().await.unwrap();
    assert_ne!(first, second);
    assert_eq!(created.load(Ordering::Relaxed), 2);
    // The callee refuses the new one too: no storm, it is kept until its normal refresh.
    s.rejected(&second);
    for _ in 0..10 {
        assert_eq!(s.get().await.unwrap(), second);
    }
    // A stale refusal (of a token no longer current) changes nothing.
    s.rejected(&first);
    assert_eq!(s.get().await.unwrap(), second);
    assert_eq!(created.load(Ordering::Relaxed), 2);
}
