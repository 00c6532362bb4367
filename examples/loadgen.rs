//! Load generator: drives `VerifyToken`, Envoy's `Check`, the Orders example through the auth
//! layer, or a bare tonic echo server (the framework's ceiling), closed-loop at a concurrency
//! or open-loop at a target rate, with repeated, fresh or random-kid tokens. Reports
//! throughput, latency percentiles (HdrHistogram, µs), outcomes by gRPC code, the server's
//! memory, file descriptors and tasks, and the JWKS requests Clerk saw. `--soak` turns the
//! run into a pass/fail check: no errors, flat memory, no leaked tasks or descriptors.
//!
//! ```sh
//! cargo run --release -- dev                                   # AuthService + emulator
//! cargo run --release --example loadgen -- run --target verify --concurrency 64 --duration 10
//! cargo run --release --example loadgen -- run --target verify --rate 5000 --duration 10
//! cargo run --release --example loadgen -- run --target verify --tokens fresh --pool 40000
//! cargo run --release --example loadgen -- run --target verify --tokens random-kid --pool 10000
//! cargo run --release --example loadgen -- run --target check
//! cargo run --release --example loadgen -- serve-echo &        # the ceiling, another process
//! cargo run --release --example loadgen -- run --target echo --addr http://127.0.0.1:50070 --pid $!
//! cargo run --release --example loadgen -- run --soak --duration 600 --rate 2000
//! ```
//!
//! The server's memory, descriptors and tasks come from `--metrics` (its Prometheus endpoint,
//! default `http://127.0.0.1:9090/metrics`, `dev`'s metrics port) or, for any local process, `--pid`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use clap::{Parser, Subcommand, ValueEnum};
use clerk_grpc_auth::pb::VerifyTokenRequest;
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request as AttrRequest},
    AttributeContext, CheckRequest,
};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tonic::{transport::Channel, Code, Request, Response, Status};

#[path = "common/orders.rs"]
mod orders;

/// The allocator of the binary under test (the `mimalloc` feature, in `cli`), so that the
/// echo ceiling and the AuthService are measured alike.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Generated code for `examples.echo.v1`.
mod echo {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("examples.echo.v1");
}

#[derive(Parser)]
#[command(about = "Load generator for clerk-grpc-auth")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive a target and report.
    Run(RunArgs),
    /// Write one call's gRPC request body (the 5-byte prefix and the protobuf message) for
    /// another load generator, h2load (`scripts/h2load.sh`), with a token minted by the
    /// emulator; prints the call's path.
    Body {
        /// Which call.
        #[arg(long, value_enum, default_value_t = Target::Verify)]
        target: Target,
        /// The emulator that mints the token.
        #[arg(long, default_value = "http://127.0.0.1:8787")]
        emulator: String,
        /// Where to write the body.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Serve the bare echo service (no auth): the framework's ceiling.
    ServeEcho {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50070")]
        listen: SocketAddr,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Target {
    /// `clerk.auth.v1.AuthService/VerifyToken`.
    Verify,
    /// `envoy.service.auth.v3.Authorization/Check`, shaped as Envoy sends it.
    Check,
    /// `examples.orders.v1.Orders/ListOrders` behind the auth layer (the `in_process` or
    /// `delegated` example).
    Orders,
    /// The bare echo service (`serve-echo`).
    Echo,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Tokens {
    /// `--pool` distinct tokens, used round-robin (verdict-cache hits after the first use).
    Repeated,
    /// Every call a token never used before; the run ends when `--pool` is used up.
    Fresh,
    /// Valid signatures under random kids no JWKS holds (an unknown-kid flood).
    RandomKid,
}

#[derive(Clone, Parser)]
struct RunArgs {
    /// What to drive.
    #[arg(long, value_enum, default_value_t = Target::Verify)]
    target: Target,
    /// The target's gRPC address (default: 50051 for verify/check, 50061 for orders, 50070
    /// for echo).
    #[arg(long)]
    addr: Option<String>,
    /// The emulator that mints the tokens.
    #[arg(long, default_value = "http://127.0.0.1:8787")]
    emulator: String,
    /// Closed loop: calls in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop: calls per second, started on schedule whatever the answers' latency
    /// (latency counted from the scheduled start, so queueing shows).
    #[arg(long)]
    rate: Option<u64>,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Which tokens.
    #[arg(long, value_enum, default_value_t = Tokens::Repeated)]
    tokens: Tokens,
    /// How many tokens to mint.
    #[arg(long, default_value_t = 1000)]
    pool: usize,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The server's Prometheus endpoint (memory, descriptors, tasks); `none` to skip.
    #[arg(long, default_value = "http://127.0.0.1:9090/metrics")]
    metrics: String,
    /// Read memory and descriptors of this local process instead (e.g. the echo server).
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds between server samples.
    #[arg(long, default_value_t = 10.0)]
    sample_every: f64,
    /// Pass/fail soak: zero errors, memory within 10 % of its post-warm-up level, no growth
    /// in tasks or descriptors. Exit status 1 on failure.
    #[arg(long)]
    soak: bool,
    /// Also print the report as one JSON line.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::ServeEcho { listen } => serve_echo(listen).await,
        Command::Body {
            target,
            emulator,
            out,
        } => write_body(target, emulator, &out).await,
        Command::Run(args) => run(args).await,
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === echo server ===

#[derive(Default)]
struct EchoService;

#[tonic::async_trait]
impl echo::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        request: Request<echo::EchoRequest>,
    ) -> Result<Response<echo::EchoResponse>, Status> {
        Ok(Response::new(echo::EchoResponse {
            token: request.into_inner().token,
        }))
    }
}

async fn serve_echo(listen: SocketAddr) -> Result<bool, BoxError> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "echo server on {} (pid {})",
        listener.local_addr()?,
        std::process::id()
    );
    // The same socket options as AuthService's own listener.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(echo::echo_server::EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(true)
}

// === tokens ===

/// `scripts/h2load.sh`'s body: one call of `target`, framed as gRPC puts it on the wire.
async fn write_body(
    target: Target,
    emulator: String,
    out: &std::path::Path,
) -> Result<bool, BoxError> {
    let args = RunArgs::parse_from(["run", "--pool", "1", "--emulator", &emulator]);
    let token = mint_pool(&args)
        .await?
        .pop()
        .ok_or("the emulator minted no token")?;
    if target == Target::Orders {
        return Err("orders: send the token as a header instead".into());
    }
    let (path, message) = (target.path(), request_message(target, &token));
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    body.extend_from_slice(&message);
    std::fs::write(out, body)?;
    println!("{path}");
    Ok(true)
}

async fn mint_pool(args: &RunArgs) -> Result<Vec<String>, BoxError> {
    let http = reqwest::Client::new();
    let url = format!("{}/emulator/tokens", args.emulator.trim_end_matches('/'));
    let started = Instant::now();
    let tokens: Vec<Result<String, BoxError>> = futures::stream::iter(0..args.pool)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let spec = serde_json::json!({
                    "user_id": format!("user_load{i:08}"),
                    "session_id": format!("sess_load{i:08}"),
                    "expires_in": 7200,
                });
                let answer: serde_json::Value = http
                    .post(&url)
                    .json(&spec)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                answer["jwt"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "the emulator answered no jwt".into())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut tokens = tokens.into_iter().collect::<Result<Vec<_>, _>>()?;
    if args.tokens == Tokens::RandomKid {
        // Same claims and signature, a kid no JWKS holds: the server must ask Clerk at most
        // once per cooldown, however many arrive.
        for t in &mut tokens {
            let mut parts = t.splitn(2, '.');
            let (_, rest) = (parts.next(), parts.next().unwrap_or_default().to_owned());
            let kid: String = (0..16)
                .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
                .collect();
            let header =
                serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": format!("ins_{kid}")});
            *t = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()));
        }
    }
    eprintln!(
        "minted {} tokens in {:.1} s",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(tokens)
}

async fn jwks_requests(args: &RunArgs) -> Option<u64> {
    let url = format!("{}/emulator/stats", args.emulator.trim_end_matches('/'));
    let v: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    v["jwks_requests"].as_u64()
}

// === the calls ===

/// A connection posting encoded requests: every target costs the load generator the same
/// per call (a copy of its prepared message out, an answer skipped in), so that the
/// throughputs compare the servers, not the client's work on their messages.
#[derive(Clone)]
struct Client {
    grpc: tonic::client::Grpc<Channel>,
    target: Target,
}

/// A token's call, prepared once: its target's request message, encoded, and for Orders
/// (which takes the token as a header) its `authorization` value.
#[derive(Clone)]
struct Prepared {
    message: bytes::Bytes,
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Prepared {
    fn new(target: Target, token: &str) -> Result<Self, BoxError> {
        let bearer = match target {
            Target::Orders => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| "the token is not a header value")?,
            ),
            _ => None,
        };
        Ok(Self {
            message: request_message(target, token).into(),
            bearer,
        })
    }
}

/// The outcome's label: `OK`, a gRPC code, or `DENIED_<http status>` for a `Check` denial.
type Outcome = String;

impl Client {
    async fn call(&mut self, p: &Prepared) -> Outcome {
        if let Err(e) = self.grpc.ready().await {
            return format!("CLIENT_NOT_READY: {e}");
        }
        let mut req = Request::new(Raw(p.message.clone()));
        if let Some(bearer) = &p.bearer {
            req.metadata_mut().insert("authorization", bearer.clone());
        }
        let path = http::uri::PathAndQuery::from_static(self.target.path());
        let result: Result<Option<Outcome>, Status> = if self.target == Target::Check {
            let codec = tonic_prost::ProstCodec::<Raw, CheckAnswer>::default();
            self.grpc.unary(req, path, codec).await.map(|r| {
                match r.into_inner().status.map(|s| s.code).unwrap_or_default() {
                    0 => None,
                    code => Some(format!("DENIED_{:?}", Code::from(code))),
                }
            })
        } else {
            let codec = tonic_prost::ProstCodec::<Raw, Ignored>::default();
            self.grpc.unary(req, path, codec).await.map(|_| None)
        };
        match result {
            Ok(None) => "OK".into(),
            Ok(Some(denied)) => denied,
            Err(s) => format!("{:?}", s.code()),
        }
    }
}

impl Target {
    /// The method a call of this target posts to.
    fn path(self) -> &'static str {
        match self {
            Target::Verify => "/clerk.auth.v1.AuthService/VerifyToken",
            Target::Check => "/envoy.service.auth.v3.Authorization/Check",
            Target::Echo => "/examples.echo.v1.Echo/Echo",
            Target::Orders => "/examples.orders.v1.Orders/ListOrders",
        }
    }
}

/// One call's request message for `target`, encoded (Orders takes the token as a header:
/// its message is empty).
fn request_message(target: Target, token: &str) -> Vec<u8> {
    use prost::Message as _;
    match target {
        Target::Verify => VerifyTokenRequest {
            token: token.to_owned(),
            ..Default::default()
        }
        .encode_to_vec(),
        Target::Check => check_request(token).encode_to_vec(),
        Target::Echo => echo::EchoRequest {
            token: token.to_owned(),
        }
        .encode_to_vec(),
        Target::Orders => orders::pb::ListOrdersRequest {}.encode_to_vec(),
    }
}

/// A request message already encoded: sent as it is.
#[derive(Clone, Debug, Default)]
struct Raw(bytes::Bytes);

impl prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = bytes::Bytes::new();
    }
}

/// An answer read for nothing but its arrival (every field skipped unread).
#[derive(Clone, PartialEq, prost::Message)]
struct Ignored {}

/// Of a `CheckResponse`, only `status.code` (allowed or denied); the header lists and
/// metadata are skipped unread.
#[derive(Clone, PartialEq, prost::Message)]
struct CheckAnswer {
    #[prost(message, optional, tag = "1")]
    status: Option<RpcCode>,
}

/// Of a `google.rpc.Status`, only `code`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcCode {
    #[prost(int32, tag = "1")]
    code: i32,
}

fn check_request(token: &str) -> CheckRequest {
    let headers = [
        (":method", "GET"),
        (":path", "/orders"),
        (":authority", "api.example.com"),
        ("authorization", &format!("Bearer {token}")),
        ("x-clerk-user-id", "user_spoofed"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "load".into(),
                    method: "GET".into(),
                    path: "/orders".into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn connect(args: &RunArgs) -> Result<Vec<Client>, BoxError> {
    let addr = args.addr.clone().unwrap_or_else(|| {
        match args.target {
            Target::Verify | Target::Check => "http://127.0.0.1:50051",
            Target::Orders => "http://127.0.0.1:50061",
            Target::Echo => "http://127.0.0.1:50070",
        }
        .to_owned()
    });
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        // One `connect()` is one HTTP/2 connection.
        let ch = Channel::from_shared(addr.clone())?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        clients.push(Client {
            grpc: tonic::client::Grpc::new(ch),
            target: args.target,
        });
    }
    Ok(clients)
}

// === server samples ===

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at: f64,
    rss: Option<f64>,
    fds: Option<f64>,
    tasks: Option<f64>,
    /// The server's CPU seconds (user + system).
    cpu: Option<f64>,
    /// This load generator's CPU seconds.
    own_cpu: Option<f64>,
}

/// User + system CPU seconds of a process (`/proc/<pid>/stat`, 100 ticks per second).
fn proc_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

async fn sample(args: &RunArgs, http: &reqwest::Client, at: f64) -> Sample {
    if let Some(pid) = args.pid {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kb| kb * 1024.0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.count() as f64);
        return Sample {
            at,
            rss,
            fds,
            tasks: None,
            cpu: proc_cpu(&pid.to_string()),
            own_cpu: proc_cpu("self"),
        };
    }
    if args.metrics == "none" {
        return Sample {
            at,
            own_cpu: proc_cpu("self"),
            ..Sample::default()
        };
    }
    let text = match http.get(&args.metrics).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let metric = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Sample {
        at,
        rss: metric("process_resident_memory_bytes"),
        fds: metric("process_open_fds"),
        tasks: metric("clerk_auth_runtime_alive_tasks"),
        cpu: metric("process_cpu_seconds_total"),
        own_cpu: proc_cpu("self"),
    }
}

// === the run ===

#[derive(Default)]
struct Recorder {
    latency: Option<Histogram<u64>>,
    outcomes: BTreeMap<Outcome, u64>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).ok(),
            outcomes: BTreeMap::new(),
        }
    }

    fn record(&mut self, started: Instant, outcome: Outcome) {
        let us = started.elapsed().as_micros().clamp(1, 60_000_000) as u64;
        if let Some(h) = &mut self.latency {
            let _ = h.record(us);
        }
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    fn merge(&mut self, other: Recorder) {
        if let (Some(a), Some(b)) = (&mut self.latency, &other.latency) {
            let _ = a.add(b);
        }
        for (k, v) in other.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
    }
}

struct Shared {
    tokens: Vec<Prepared>,
    fresh: bool,
    next: AtomicUsize,
    stop: AtomicBool,
    measuring: AtomicBool,
    exhausted: AtomicBool,
}

impl Shared {
    /// The next token, or `None` once a fresh pool is used up.
    fn token(&self) -> Option<&Prepared> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if self.fresh && i >= self.tokens.len() {
            self.exhausted.store(true, Ordering::Relaxed);
            return None;
        }
        Some(&self.tokens[i % self.tokens.len()])
    }
}

async fn closed_loop(shared: Arc<Shared>, clients: Vec<Client>, concurrency: usize) -> Recorder {
    let mut workers = Vec::new();
    for w in 0..concurrency.max(1) {
        let shared = shared.clone();
        let mut client = clients[w % clients.len()].clone();
        workers.push(tokio::spawn(async move {
            let mut rec = Recorder::new();
            while !shared.stop.load(Ordering::Relaxed) {
                let Some(token) = shared.token() else { break };
                let started = Instant::now();
                let outcome = client.call(token).await;
                if shared.measuring.load(Ordering::Relaxed) {
                    rec.record(started, outcome);
                }
            }
            rec
        }));
    }
    let mut total = Recorder::new();
    for w in workers {
        if let Ok(rec) = w.await {
            total.merge(rec);
        }
    }
    total
}

async fn open_loop(shared: Arc<Shared>, clients: Vec<Client>, rate: u64) -> Recorder {
    let total = Arc::new(Mutex::new(Recorder::new()));
    let runtime = tokio::runtime::Handle::current();
    // The schedule is kept by an OS thread sleeping to each call's due time (tokio's timer
    // ticks in milliseconds, which would batch calls and add up to a millisecond of our own
    // lateness to every latency).
    let scheduler = {
        let (shared, total) = (shared.clone(), total.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut inflight = Vec::new();
            for issued in 0u64.. {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                // Latency counts from when the call was due, not when it was sent.
                let due = start + Duration::from_secs_f64(issued as f64 / rate as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let Some(token) = shared.token() else { break };
                let token = token.clone();
                let mut client = clients[issued as usize % clients.len()].clone();
                let (shared, total) = (shared.clone(), total.clone());
                inflight.push(runtime.spawn(async move {
                    let outcome = client.call(&token).await;
                    if shared.measuring.load(Ordering::Relaxed) {
                        total.lock().expect("recorder").record(due, outcome);
                    }
                }));
                if issued % 1024 == 0 {
                    inflight.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                }
            }
            inflight
        })
    };
    let inflight = tokio::task::spawn_blocking(move || scheduler.join().unwrap_or_default())
        .await
        .unwrap_or_default();
    for t in inflight {
        let _ = t.await;
    }
    Arc::try_unwrap(total)
        .ok()
        .map(|m| m.into_inner().expect("recorder"))
        .unwrap_or_default()
}

fn mib(v: Option<f64>) -> String {
    v.map_or("-".into(), |b| format!("{:.1} MiB", b / 1048576.0))
}

fn num(v: Option<f64>) -> String {
    v.map_or("-".into(), |n| format!("{n:.0}"))
}

async fn run(args: RunArgs) -> Result<bool, BoxError> {
    if args.pool == 0 {
        return Err("--pool must be at least 1".into());
    }
    let tokens = mint_pool(&args)
        .await?
        .into_iter()
        .map(|token| Prepared::new(args.target, &token))
        .collect::<Result<_, _>>()?;
    let clients = connect(&args).await?;
    let http = reqwest::Client::new();
    let baseline = sample(&args, &http, 0.0).await;
    let jwks_before = jwks_requests(&args).await;
    let shared = Arc::new(Shared {
        tokens,
        fresh: args.tokens == Tokens::Fresh,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(args.warmup <= 0.0),
        exhausted: AtomicBool::new(false),
    });
    let load = {
        let (shared, clients) = (shared.clone(), clients.clone());
        match args.rate {
            Some(rate) => tokio::spawn(open_loop(shared, clients, rate.max(1))),
            None => tokio::spawn(closed_loop(shared, clients, args.concurrency)),
        }
    };
    let warmup = Duration::from_secs_f64(args.warmup.max(0.0));
    let measured = Duration::from_secs_f64(args.duration.max(0.1));
    tokio::time::sleep(warmup).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let measure_started = Instant::now();
    let mut samples = vec![sample(&args, &http, 0.0).await];
    let every = Duration::from_secs_f64(args.sample_every.max(0.5));
    let mut next_sample = every;
    while measure_started.elapsed() < measured && !load.is_finished() {
        // Short steps, so that a fresh pool running out ends the run at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let at = measure_started.elapsed();
        if at >= next_sample && at < measured {
            samples.push(sample(&args, &http, at.as_secs_f64()).await);
            next_sample += every;
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    let rec = load.await?;
    let elapsed = measure_started.elapsed().as_secs_f64();
    samples.push(sample(&args, &http, elapsed).await);
    let jwks_after = jwks_requests(&args).await;
    // Idle again, connections still open: tasks and descriptors should be back at baseline.
    let after = sample(&args, &http, elapsed).await;
    drop(clients);

    let ok = rec.outcomes.get("OK").copied().unwrap_or(0);
    let calls: u64 = rec.outcomes.values().sum();
    let errors = calls - ok;
    let q = |p: f64| rec.latency.as_ref().map_or(0, |h| h.value_at_quantile(p));
    let target = format!("{:?}", args.target).to_lowercase();
    let mode = match args.rate {
        Some(r) => format!("open loop {r}/s"),
        None => format!("closed loop, {} in flight", args.concurrency),
    };
    println!(
        "{target}: {mode}, {:?} tokens (pool {}), {} connections, {elapsed:.1} s measured after {:.1} s warm-up{}",
        args.tokens,
        args.pool,
        args.connections,
        args.warmup,
        if shared.exhausted.load(Ordering::Relaxed) {
            " (fresh pool used up)"
        } else {
            ""
        }
    );
    println!(
        "  calls {calls}  ok {ok}  throughput {:.0}/s (ok {:.0}/s)",
        calls as f64 / elapsed,
        ok as f64 / elapsed
    );
    println!(
        "  latency µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        rec.latency.as_ref().map_or(0, |h| h.max())
    );
    println!("  outcomes: {:?}", rec.outcomes);
    let last = samples.last().copied().unwrap_or_default();
    let per_call = |a: Option<f64>, b: Option<f64>| {
        a.zip(b)
            .filter(|_| calls > 0)
            .map(|(a, b)| (b - a) * 1e6 / calls as f64)
    };
    let server_cpu = per_call(samples[0].cpu, last.cpu);
    let client_cpu = per_call(samples[0].own_cpu, last.own_cpu);
    println!(
        "  CPU per call: server {} µs, load generator {} µs",
        num(server_cpu),
        num(client_cpu)
    );
    if let (Some(a), Some(b)) = (jwks_before, jwks_after) {
        println!("  JWKS requests during the run: {}", b - a);
    }
    let first = samples.first().copied().unwrap_or_default();
    let max_rss = samples
        .iter()
        .filter_map(|s| s.rss)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    println!(
        "  server: rss {} after warm-up, {} max, {} at end; fds {} → {}; tasks {} → {} (idle before → idle after)",
        mib(first.rss),
        mib(max_rss),
        mib(samples.last().and_then(|s| s.rss)),
        num(baseline.fds),
        num(after.fds),
        num(baseline.tasks),
        num(after.tasks),
    );
    if args.json {
        let report = serde_json::json!({
            "target": target, "mode": mode, "tokens": format!("{:?}", args.tokens),
            "seconds": elapsed, "calls": calls, "ok": ok,
            "throughput": calls as f64 / elapsed,
            "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999),
            "outcomes": rec.outcomes,
            "server_cpu_us_per_call": server_cpu, "client_cpu_us_per_call": client_cpu,
            "jwks_requests": jwks_before.zip(jwks_after).map(|(a, b)| b - a),
            "rss": samples.iter().map(|s| (s.at, s.rss)).collect::<Vec<_>>(),
            "fds": [baseline.fds, after.fds], "tasks": [baseline.tasks, after.tasks],
        });
        println!("{report}");
    }
    if !args.soak {
        return Ok(true);
    }
    let mut failures = Vec::new();
    if errors > 0 || calls == 0 {
        failures.push(format!("{errors} errors in {calls} calls"));
    }
    match (first.rss, max_rss) {
        (Some(a), Some(m)) if m > a * 1.10 => failures.push(format!(
            "memory grew {:.1} % after warm-up ({} → {})",
            (m / a - 1.0) * 100.0,
            mib(Some(a)),
            mib(Some(m))
        )),
        (None, _) => failures.push("no memory samples (--metrics or --pid)".into()),
        _ => {}
    }
    // A little slack: the sampler's own connection may or may not be open at a sample.
    if let (Some(a), Some(b)) = (baseline.fds, after.fds) {
        if b > a + 2.0 {
            failures.push(format!("file descriptors {a} → {b}"));
        }
    }
    if let (Some(a), Some(b)) = (baseline.tasks, after.tasks) {
        if b > a + 2.0 {
            failures.push(format!("tasks {a} → {b}"));
        }
    }
    if failures.is_empty() {
        println!("SOAK PASS");
        Ok(true)
    } else {
        println!("SOAK FAIL: {}", failures.join("; "));
        Ok(false)
    }
}
