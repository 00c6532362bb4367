//! Revocation sharing through the real Redis on 127.0.0.1:6379 survives bad data and outages:
//! malformed stored keys and oversized channel messages are skipped and counted, and a
//! revocation made while Redis is unreachable (a TCP relay the test cuts) reaches the other
//! replicas once it is back; `/readyz` and `/metrics` tell when sharing is down. Each test
//! uses its own key prefix.

mod common;

use std::time::Duration;

use clerk_grpc_auth::{
    server::events::{Event, Events, RedisConfig},
    verify::revocations::Revocations,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn guard<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

fn prefix() -> String {
    format!("clerk-auth-sharing-test-{}", rand::random::<u64>())
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A replica's events hub on `url`, running until the returned token is cancelled.
async fn replica(url: &str, prefix: &str) -> (Events, CancellationToken) {
    let events = Events::with_redis(
        Revocations::default(),
        None,
        RedisConfig {
            url: url.into(),
            prefix: prefix.into(),
        },
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(events.clone().run(stop.clone()));
    (events, stop)
}

async fn del(conn: &mut redis::aio::MultiplexedConnection, keys: &[Vec<u8>]) {
    let _: () = redis::cmd("DEL").arg(keys).query_async(conn).await.unwrap();
}

#[tokio::test]
async fn a_malformed_stored_key_does_not_stop_sharing() {
    let prefix = prefix();
    let mut conn = redis().await;
    let bad = [format!("{prefix}:revoked:bad").into_bytes(), vec![0xff]].concat();
    let long = format!("{prefix}:revoked:sess_{}", "a".repeat(200)).into_bytes();
    let stored = format!("{prefix}:revoked:sess_2storedSTOREDstored").into_bytes();
    for k in [&bad, &long, &stored] {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(1)
            .arg("EX")
            .arg(600)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let url = "redis://127.0.0.1:6379";
    let (one, stop_one) = replica(url, &prefix).await;
    let (two, stop_two) = replica(url, &prefix).await;
    // Both subscribe (before, the non-UTF-8 key failed every attempt) and load the good key.
    guard(one.subscribed()).await;
    guard(two.subscribed()).await;
    assert!(two.revocations().is_revoked("sess_2storedSTOREDstored"));
    assert_eq!(two.revocations().len(), 1);
    assert_eq!(two.sharing().malformed, 2);

    // A new revocation on one reaches two.
    let id = "sess_2newNEWnewNEWnewNEWnewNEW";
    let applied = two.applied();
    one.publish(Event::SessionRevoked { id: id.into() }).await;
    guard(two.wait_applied(applied + 1)).await;
    assert!(two.revocations().is_revoked(id));

    stop_one.cancel();
    stop_two.cancel();
    let new = format!("{prefix}:revoked:{id}").into_bytes();
    del(&mut conn, &[bad, long, stored, new]).await;
}

#[tokio::test]
async fn oversized_and_malformed_messages_are_refused_and_counted() {
    let prefix = prefix();
    let (events, stop) = replica("redis://127.0.0.1:6379", &prefix).await;
    guard(events.subscribed()).await;
    let mut conn = redis().await;
    let channel = format!("{prefix}:events");
    let huge = format!(
        r#"{{"kind":"session_revoked","id":"sess_{}"}}"#,
        "a".repeat(20 << 20)
    );
    let bad_user = r#"{"kind":"user_changed","id":"user_a b"}"#;
    let not_utf8: &[u8] = b"{\"kind\":\"session_revoked\",\"id\":\"sess_\xff\"}";
    let good = r#"{"kind":"session_revoked","id":"sess_2goodGOODgoodGOODgood"}"#;
    for payload in [
        huge.as_bytes(),
        bad_user.as_bytes(),
        not_utf8,
        good.as_bytes(),
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // Messages arrive in order: once the good one is applied, the others were seen.
    guard(events.wait_applied(1)).await;
    assert!(events
        .revocations()
        .is_revoked("sess_2goodGOODgoodGOODgood"));
    // Only the good one was applied (before, the oversized one was applied too) and nothing
    // else is held.
    assert_eq!(events.applied(), 1);
    assert_eq!(events.revocations().len(), 1);
    assert_eq!(events.sharing().malformed, 3);
    assert!(events.sharing().subscribed);
    stop.cancel();
}

#[tokio::test]
async fn a_revocation_made_while_redis_is_down_reaches_the_others_later() {
    let prefix = prefix();
    let relay = common::RedisRelay::start().await;
    let (one, stop_one) = replica(&format!("redis://{}", relay.addr), &prefix).await;
    let (two, stop_two) = replica("redis://127.0.0.1:6379", &prefix).await;
    guard(one.subscribed()).await;
    guard(two.subscribed()).await;
    let reloads = one.reloads();

    relay.cut();
    guard(one.unsubscribed()).await;
    assert!(!one.sharing().subscribed);
    let id = "sess_2downDOWNdownDOWNdownDOWN";
    one.publish(Event::SessionRevoked { id: id.into() }).await;
    // Applied here at once, waiting for Redis.
    assert!(one.revocations().is_revoked(id));
    assert_eq!(one.sharing().pending, 1);
    assert!(!two.revocations().is_revoked(id));

    let applied = two.applied();
    relay.restore();
    guard(one.wait_reloaded(reloads + 1)).await;
    guard(two.wait_applied(applied + 1)).await;
    assert!(two.revocations().is_revoked(id));
    assert_eq!(one.sharing().pending, 0);
    // And it was stored: a replica started now knows it.
    let (three, stop_three) = replica("redis://127.0.0.1:6379", &prefix).await;
    guard(three.wait_reloaded(1)).await;
    assert!(three.revocations().is_revoked(id));

    for s in [stop_one, stop_two, stop_three] {
        s.cancel();
    }
    let mut conn = redis().await;
    del(&mut conn, &[format!("{prefix}:revoked:{id}").into_bytes()]).await;
}

#[tokio::test]
async fn readyz_and_metrics_report_the_subscription() {
    use clerk_grpc_auth::server::{AuthServer, Listeners};
    let prefix = prefix();
    let relay = common::RedisRelay::start().await;
    let clerk = clerk_grpc_auth::emulator::Emulator::start_local()
        .await
        .unwrap();
    let mut config = common::config_for(&clerk);
    config.redis = Some(RedisConfig {
        url: format!("redis://{}", relay.addr),
        prefix: prefix.clone(),
    });
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = metrics.local_addr().unwrap();
    let server = AuthServer::build(config).unwrap();
    let keys = server.verifier().keys().clone();
    let events = server.events().await.unwrap();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(server.serve_on(
        Listeners {
            grpc,
            http: None,
            metrics: Some(metrics),
        },
        events.clone(),
        async move { stopped.cancelled().await },
    ));
    keys.ready().await;
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://{ops}{path}")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    guard(events.subscribed()).await;
    assert_eq!(get("/readyz").await, (200, "ready".to_owned()));
    let (_, text) = get("/metrics").await;
    assert!(text.contains("clerk_auth_redis_subscribed 1"), "{text}");
    assert!(
        text.contains("clerk_auth_redis_malformed_total 0"),
        "{text}"
    );

    relay.cut();
    guard(events.unsubscribed()).await;
    let (status, body) = get("/readyz").await;
    assert_eq!(
        status, 200,
        "verification still works: not taken out of rotation"
    );
    assert!(body.starts_with("ready (degraded"), "{body}");
    let (_, text) = get("/metrics").await;
    assert!(text.contains("clerk_auth_redis_subscribed 0"), "{text}");
    stop.cancel();
}
