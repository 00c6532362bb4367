//! `WatchRevocations` end to end: the real AuthService (gRPC, metrics port) against the
//! emulator, callers with real tokens, the layer's feed, and a replica whose Redis connection
//! (the real Redis on 127.0.0.1:6379, behind a TCP relay the test can cut) drops and replays.

mod common;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use clerk_grpc_auth::{
    clerk::{api::BackendApiConfig, directory::DirectoryConfig, machines::MachineConfig},
    credentials::TokenSource,
    emulator::{Emulator, MachineTokenKind, MachineTokenSpec, TokenSpec, UserSpec},
    layer::{watch_revocations_with, CallerCredentials, DelegatedConfig, DelegatedVerifier},
    pb::{auth_service_client::AuthServiceClient, Revocation, WatchRevocationsRequest},
    secret::Secret,
    server::{
        events::{Event, Events, RedisConfig, FEED_CAPACITY},
        service::watch::{WatchConfig, WatchHub, PAGE_SIZE, STREAM_BUFFER},
        AuthServer, IdentityConfig, Listeners, ServerError,
    },
};
use common::reason;
use futures::future::BoxFuture;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{transport::Channel, Code, Request, Status, Streaming};
use tonic_types::StatusExt;

/// One AuthService with identity queries (machine `machine` allowlisted) and a metrics port.
struct Feed {
    clerk: Emulator,
    grpc: SocketAddr,
    metrics: SocketAddr,
    hub: WatchHub,
    events: Events,
    machine: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Default)]
struct Setup {
    watch: WatchConfig,
    redis: Option<RedisConfig>,
    /// Revocations held before the server starts: `sid(0..revoked)`.
    revoked: usize,
}

fn sid(i: usize) -> String {
    format!("sess_{i:027}")
}

async fn start(setup: Setup) -> Feed {
    let clerk = Emulator::start_local().await.unwrap();
    let machine = clerk.create_machine("revocation-follower").id;
    let mut config = common::config_for(&clerk);
    let api: url::Url = clerk.url().parse().unwrap();
    config.machine = Some(MachineConfig::new(
        api.clone(),
        Some(Secret::new(clerk.secret_key())),
        None,
    ));
    config.identity = Some(IdentityConfig {
        backend: BackendApiConfig::new(api, Secret::new(clerk.secret_key())),
        directory: DirectoryConfig::default(),
    });
    // The follower is allowlisted and its tokens are scoped to AuthService's machine.
    let auth_service = clerk.create_machine("auth-service").id;
    assert!(clerk.allow(&machine, &auth_service));
    config.access.machine_id = Some(auth_service);
    config.access.allowlist = vec![machine.clone()];
    config.watch = setup.watch;
    config.redis = setup.redis;
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, metrics_addr) = (grpc.local_addr().unwrap(), metrics.local_addr().unwrap());
    let server = AuthServer::build(config).unwrap();
    for i in 0..setup.revoked {
        assert!(server.verifier().revocations().mark(&sid(i)));
    }
    let keys = server.verifier().keys().clone();
    let hub = server.watch().clone();
    let events = server.events().await.expect("Redis on 127.0.0.1:6379");
    let (tx, rx) = oneshot::channel::<()>();
    let listeners = Listeners {
        grpc,
        http: None,
        metrics: Some(metrics),
    };
    let task = tokio::spawn(server.serve_on(listeners, events.clone(), async move {
        let _ = rx.await;
    }));
    keys.ready().await;
    events.subscribed().await;
    Feed {
        clerk,
        grpc: grpc_addr,
        metrics: metrics_addr,
        hub,
        events,
        machine,
        stop: Some(tx),
        task: Some(task),
    }
}

impl Feed {
    /// A client on a connection of its own.
    async fn client(&self) -> AuthServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        AuthServiceClient::new(channel)
    }

    /// An M2M token of the allowlisted machine, valid for `secs`.
    fn caller_token(&self, secs: i64) -> String {
        m2m_token(&self.clerk, &self.machine, secs)
    }

    /// `/metrics` on the metrics port.
    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics);
        let resp = reqwest::get(url).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// Stops the server and waits for it (streams end; no grace period is waited out).
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            guard(t).await.unwrap().unwrap();
        }
    }
}

/// A JWT-format M2M token of `machine`, valid for `secs`.
fn m2m_token(clerk: &Emulator, machine: &str, secs: i64) -> String {
    clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        jwt: true,
        subject: Some(machine.into()),
        expires_in: Some(secs),
        ..MachineTokenSpec::default()
    })
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn open(
    client: &AuthServiceClient<Channel>,
    token: Option<&str>,
) -> Result<Streaming<Revocation>, Status> {
    let req = match token {
        Some(t) => with_token(WatchRevocationsRequest {}, t),
        None => Request::new(WatchRevocationsRequest {}),
    };
    client
        .clone()
        .watch_revocations(req)
        .await
        .map(|r| r.into_inner())
}

/// A failure guard, not a timing assertion: the future is expected to finish long before.
async fn guard<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("did not finish within two minutes")
}

/// Reads `n` revocations.
async fn read(stream: &mut Streaming<Revocation>, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match guard(stream.message()).await {
            Ok(Some(r)) => out.push(r.session_id),
            Ok(None) => panic!("stream ended after {} of {n}", out.len()),
            Err(e) => panic!("stream failed after {} of {n}: {e:?}", out.len()),
        }
    }
    out
}

/// Reads until the stream fails; returns how many revocations came first and the status.
async fn read_to_error(stream: &mut Streaming<Revocation>) -> (usize, Status) {
    let mut n = 0;
    loop {
        match guard(stream.message()).await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("stream ended without an error after {n}"),
            Err(e) => return (n, e),
        }
    }
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn watch_revocations_is_for_allowlisted_callers_only() {
    let feed = start(Setup {
        revoked: 3,
        ..Setup::default()
    })
    .await;
    let client = feed.client().await;

    // No token: UNAUTHENTICATED, as every identity query.
    let e = open(&client, None).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unauthenticated, "TOKEN_MISSING")
    );

    // A session token, a machine not on the allowlist, a garbage token: refused.
    let user = feed.clerk.create_user(&UserSpec::default());
    let session = feed.clerk.create_session(&user);
    let session_token = feed.clerk.mint(&TokenSpec {
        user_id: Some(user),
        session_id: Some(session),
        expires_in: Some(600),
        ..TokenSpec::default()
    });
    let e = open(&client, Some(&session_token)).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::PermissionDenied, "CALLER_NOT_ALLOWED")
    );
    let stranger = feed.clerk.create_machine("stranger").id;
    let e = open(&client, Some(&m2m_token(&feed.clerk, &stranger, 600)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::PermissionDenied, "CALLER_NOT_ALLOWED")
    );
    let e = open(&client, Some("not.a.token")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(feed.hub.stats().opened, 0, "no refused caller got a stream");

    // The allowlisted machine: the snapshot, then live revocations.
    let mut stream = open(&client, Some(&feed.caller_token(600))).await.unwrap();
    assert_eq!(read(&mut stream, 3).await, [sid(0), sid(1), sid(2)]);
    let live = "sess_2liveLIVEliveLIVEliveLIVE".to_owned();
    feed.events
        .publish(Event::SessionRevoked { id: live.clone() })
        .await;
    assert_eq!(read(&mut stream, 1).await, [live]);
    let metrics = feed.metrics().await;
    assert_eq!(sample(&metrics, "clerk_auth_watch_streams"), 1.0);
    assert_eq!(
        sample(&metrics, "clerk_auth_watch_streams_opened_total"),
        1.0
    );
    assert!(metrics.contains(
        r#"clerk_auth_decisions_total{method="WatchRevocations",outcome="denied",reason="CALLER_NOT_ALLOWED"} 2"#
    ));
    drop(stream);
    feed.stop().await;
}

#[tokio::test]
async fn streams_over_the_caps_are_refused() {
    let feed = start(Setup {
        watch: WatchConfig {
            max_streams: 3,
            max_streams_per_connection: 2,
            ..WatchConfig::default()
        },
        ..Setup::default()
    })
    .await;
    let token = feed.caller_token(600);
    let (one, two, three) = (
        feed.client().await,
        feed.client().await,
        feed.client().await,
    );
    let a = open(&one, Some(&token)).await.unwrap();
    let _b = open(&one, Some(&token)).await.unwrap();
    let e = open(&one, Some(&token)).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::ResourceExhausted, "STREAM_LIMIT_REACHED")
    );
    assert_eq!(
        e.get_details_error_info().unwrap().metadata["limit"],
        "per_connection"
    );
    let _c = open(&two, Some(&token)).await.unwrap();
    let e = open(&three, Some(&token)).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::ResourceExhausted, "STREAM_LIMIT_REACHED")
    );
    assert_eq!(
        e.get_details_error_info().unwrap().metadata["limit"],
        "total"
    );
    assert_eq!(feed.hub.stats().active, 3);

    // A closed stream gives its slot back.
    drop(a);
    guard(feed.hub.wait_for(|s| s.active == 2)).await;
    let _d = open(&three, Some(&token)).await.unwrap();
    let metrics = feed.metrics().await;
    assert_eq!(
        sample(&metrics, "clerk_auth_watch_refused_limit_total"),
        2.0
    );
    assert_eq!(sample(&metrics, "clerk_auth_watch_streams"), 3.0);
}

#[tokio::test]
async fn slow_subscribers_of_a_large_set_hold_bounded_memory() {
    const SET: usize = 150_000;
    const SLOW: usize = 32;
    let feed = start(Setup {
        revoked: SET,
        ..Setup::default()
    })
    .await;
    let token = feed.caller_token(600);
    // 32 subscribers on four connections that never read: each stalls once HTTP/2 flow
    // control is exhausted, long before the end of the set.
    let mut slow = Vec::new();
    for _ in 0..SLOW / 8 {
        let client = feed.client().await;
        for _ in 0..8 {
            slow.push(open(&client, Some(&token)).await.unwrap());
        }
    }
    // One subscriber that reads gets the whole set, in order, meanwhile.
    let mut fast = open(&feed.client().await, Some(&token)).await.unwrap();
    let got = read(&mut fast, SET).await;
    assert!(got.iter().map(String::as_str).eq((0..SET)
        .map(sid)
        .collect::<Vec<_>>()
        .iter()
        .map(String::as_str)));

    let streams = SLOW + 1;
    let bound = (streams * (PAGE_SIZE + STREAM_BUFFER)) as f64;
    let metrics = feed.metrics().await;
    assert_eq!(sample(&metrics, "clerk_auth_watch_streams"), streams as f64);
    let buffered = sample(&metrics, "clerk_auth_watch_buffered_revocations");
    let peak = sample(&metrics, "clerk_auth_watch_buffered_revocations_peak");
    // Before: every stream copied the set (32 × 150 000 ids). Now: a page and a small buffer
    // each, at any time.
    assert!(buffered <= bound, "{buffered} ids buffered, bound {bound}");
    assert!(
        peak <= bound,
        "{peak} ids buffered at the peak, bound {bound}"
    );
    assert!(
        peak >= STREAM_BUFFER as f64,
        "the streams did buffer: {peak}"
    );
    assert_eq!(feed.hub.stats().dropped_write_timeout, 0);

    // Dropping the subscribers gives everything back.
    drop(slow);
    drop(fast);
    guard(feed.hub.wait_for(|s| s.active == 0)).await;
    let metrics = feed.metrics().await;
    assert_eq!(sample(&metrics, "clerk_auth_watch_streams"), 0.0);
    feed.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_dropped_after_the_write_timeout() {
    let feed = start(Setup {
        revoked: 150_000,
        watch: WatchConfig {
            write_timeout: Duration::from_millis(300),
            ..WatchConfig::default()
        },
        ..Setup::default()
    })
    .await;
    let client = feed.client().await;
    let mut stream = open(&client, Some(&feed.caller_token(600))).await.unwrap();
    guard(feed.hub.wait_for(|s| s.dropped_write_timeout == 1)).await;
    // Reading again: what HTTP/2 had delivered, then the reason; never the whole set.
    let (n, e) = read_to_error(&mut stream).await;
    assert!(n < 150_000, "{n}");
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unavailable, "SUBSCRIBER_TOO_SLOW")
    );
    guard(feed.hub.wait_for(|s| s.active == 0)).await;
    let metrics = feed.metrics().await;
    assert_eq!(
        sample(&metrics, "clerk_auth_watch_dropped_write_timeout_total"),
        1.0
    );
    // Resubscribing starts over with the snapshot.
    let mut again = open(&client, Some(&feed.caller_token(600))).await.unwrap();
    assert_eq!(read(&mut again, 1).await, [sid(0)]);
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_the_live_feed_is_dropped() {
    let feed = start(Setup {
        revoked: 150_000,
        ..Setup::default()
    })
    .await;
    let client = feed.client().await;
    let mut stream = open(&client, Some(&feed.caller_token(600))).await.unwrap();
    // While it is stalled in the snapshot, more live revocations than the feed holds.
    for i in 0..FEED_CAPACITY + 100 {
        feed.events
            .publish(Event::SessionRevoked {
                id: format!("sess_live{i:022}"),
            })
            .await;
    }
    let (n, e) = read_to_error(&mut stream).await;
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unavailable, "SUBSCRIBER_TOO_SLOW")
    );
    assert!(n >= 150_000, "the snapshot came first: {n}");
    assert_eq!(feed.hub.stats().dropped_lagged, 1);
    let metrics = feed.metrics().await;
    assert_eq!(
        sample(&metrics, "clerk_auth_watch_dropped_lagged_total"),
        1.0
    );
}

#[tokio::test]
async fn a_stream_ends_when_the_callers_token_expires() {
    let feed = start(Setup {
        revoked: 2,
        ..Setup::default()
    })
    .await;
    let client = feed.client().await;
    let mut stream = open(&client, Some(&feed.caller_token(2))).await.unwrap();
    let (n, e) = read_to_error(&mut stream).await;
    assert_eq!(n, 2);
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unauthenticated, "TOKEN_EXPIRED")
    );
    assert_eq!(feed.hub.stats().ended_token_expired, 1);
    // A fresh token subscribes again.
    let mut stream = open(&client, Some(&feed.caller_token(600))).await.unwrap();
    assert_eq!(read(&mut stream, 2).await, [sid(0), sid(1)]);
}

#[tokio::test]
async fn a_draining_server_ends_its_streams() {
    let feed = start(Setup::default()).await;
    let client = feed.client().await;
    let mut stream = open(&client, Some(&feed.caller_token(600))).await.unwrap();
    let hub = feed.hub.clone();
    // The shutdown completes (instead of waiting out the grace period on an endless stream).
    let stopping = tokio::spawn(feed.stop());
    let (_, e) = read_to_error(&mut stream).await;
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unavailable, "AUTH_SERVICE_UNAVAILABLE")
    );
    guard(stopping).await.unwrap();
    assert_eq!(hub.stats().active, 0);
}

/// A token source minting a fresh short-lived M2M token at every call, through the emulator's
/// HTTP API.
struct Minting {
    url: String,
    machine: String,
    secs: i64,
    minted: Arc<Mutex<u64>>,
}

impl TokenSource for Minting {
    fn token(&self) -> BoxFuture<'_, Result<String, Status>> {
        Box::pin(async move {
            *self.minted.lock().unwrap() += 1;
            let spec = MachineTokenSpec {
                kind: MachineTokenKind::M2m,
                jwt: true,
                subject: Some(self.machine.clone()),
                expires_in: Some(self.secs),
                ..MachineTokenSpec::default()
            };
            let answer: serde_json::Value = reqwest::Client::new()
                .post(format!("{}/emulator/machine_tokens", self.url))
                .json(&spec)
                .send()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .json()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(answer["token"].as_str().unwrap().to_owned())
        })
    }
}

#[tokio::test]
async fn layers_follow_with_credentials_and_resubscribe() {
    let feed = start(Setup {
        revoked: 5,
        ..Setup::default()
    })
    .await;
    let endpoint = format!("http://{}", feed.grpc);

    // Without credentials the feed is refused (and keeps retrying).
    let anonymous = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![endpoint.clone()],
        ..DelegatedConfig::default()
    })
    .unwrap();
    let anonymous_feed = anonymous.watch_revocations();
    assert_eq!(
        guard(anonymous_feed.wait_errors(1)).await,
        Some(Code::Unauthenticated)
    );
    assert_eq!(anonymous_feed.received(), 0);

    // A delegated verifier with its machine's token follows.
    let minted = Arc::new(Mutex::new(0));
    let source = |secs| Minting {
        url: feed.clerk.url(),
        machine: feed.machine.clone(),
        secs,
        minted: minted.clone(),
    };
    let delegated = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![endpoint.clone()],
        credentials: Some(CallerCredentials::new(source(600))),
        ..DelegatedConfig::default()
    })
    .unwrap();
    let delegated_feed = delegated.watch_revocations();
    guard(delegated_feed.wait_received(5)).await;
    assert!(delegated.revocations().is_revoked(&sid(4)));

    // The in-process layer's feed, with tokens that expire in 2 s: the stream ends with
    // TOKEN_EXPIRED, and the feed resubscribes with a fresh token and reads the set again.
    let local = clerk_grpc_auth::verify::revocations::Revocations::default();
    let channel = Channel::from_shared(endpoint).unwrap().connect_lazy();
    let local_feed = watch_revocations_with(channel, local.clone(), source(2));
    guard(local_feed.wait_received(5)).await;
    assert_eq!(
        guard(local_feed.wait_errors(1)).await,
        Some(Code::Unauthenticated)
    );
    guard(local_feed.wait_received(10)).await;
    assert!(local.is_revoked(&sid(0)));
    assert!(feed.hub.stats().ended_token_expired >= 1);

    // Live revocations reach both.
    let live = "sess_2liveLIVEliveLIVEliveLIVE";
    let before = delegated_feed.received();
    feed.events
        .publish(Event::SessionRevoked { id: live.into() })
        .await;
    guard(delegated_feed.wait_received(before + 1)).await;
    assert!(delegated.revocations().is_revoked(live));
    guard(async {
        while !local.is_revoked(live) {
            let n = local_feed.received();
            local_feed.wait_received(n + 1).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_redis_replay_larger_than_the_feed_lags_no_subscriber() {
    let relay = common::RedisRelay::start().await;
    let prefix = format!("clerk-auth-watch-test-{}", rand::random::<u64>());
    // Subscribers stalled in a large snapshot (HTTP/2 flow control exhausted) are not reading
    // the live feed when the replay happens: before, each replayed id went through the feed
    // and every one of them lagged.
    const SET: usize = 150_000;
    let feed = start(Setup {
        redis: Some(RedisConfig {
            url: format!("redis://{}", relay.addr),
            prefix: prefix.clone(),
        }),
        revoked: SET,
        ..Setup::default()
    })
    .await;
    let reloads = feed.events.reloads();
    assert!(reloads >= 1);
    let token = feed.caller_token(600);
    let client = feed.client().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open(&client, Some(&token)).await.unwrap());
    }

    // Other replicas revoked more sessions than the feed holds while this one's Redis
    // connection is about to drop: stored, not seen here.
    let n = FEED_CAPACITY + 1_000;
    let ids: Vec<String> = (0..n).map(|i| format!("sess_replay{i:020}")).collect();
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    for chunk in ids.chunks(1_000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}:revoked:{id}"))
                .arg(1)
                .arg("EX")
                .arg(600)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }

    // The connection drops; the replica reconnects and replays the stored ids, while the
    // subscribers read nothing.
    relay.drop_connections();
    guard(feed.events.wait_reloaded(reloads + 1)).await;
    assert!(ids
        .iter()
        .all(|id| feed.events.revocations().is_revoked(id)));

    // Every subscriber gets the snapshot, then every replayed id, and none lagged.
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    for s in &mut streams {
        let got = read(s, SET + n).await;
        assert_eq!(got[SET - 1], sid(SET - 1));
        let got: HashSet<&str> = got[SET..].iter().map(String::as_str).collect();
        assert_eq!(got, want);
    }
    let stats = feed.hub.stats();
    assert_eq!((stats.dropped_lagged, stats.active), (0, 3));
    assert!(stats.resyncs >= 3);
    // And they are still live.
    let live = "sess_2liveLIVEliveLIVEliveLIVE".to_owned();
    feed.events
        .publish(Event::SessionRevoked { id: live.clone() })
        .await;
    for s in &mut streams {
        assert_eq!(read(s, 1).await, std::slice::from_ref(&live));
    }

    // Clean up this test's keys.
    let mut keys: Vec<String> = ids
        .iter()
        .map(|id| format!("{prefix}:revoked:{id}"))
        .collect();
    keys.push(format!("{prefix}:revoked:{live}"));
    for chunk in keys.chunks(1_000) {
        let _: () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
