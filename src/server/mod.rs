//! Wiring of the AuthService server: key store and its refresher, verifier, health (tied to key
//! availability), reflection (v1 and v1alpha), graceful shutdown with a drain deadline.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use clerk_grpc_auth::{verify::jwks::KeySource, secret::Secret, server::{serve, ServerConfig}};
//! let config = ServerConfig::new(KeySource::Remote {
//!     url: "https://api.clerk.com/v1/jwks".parse()?,
//!     bearer: Some(Secret::new(std::env::var("CLERK_SECRET_KEY")?)),
//! });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! serve(config, listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! Layer: the top, the `server` feature. May import everything but `emulator`.

pub mod access;
pub mod config;
mod drain;
pub mod events;
pub mod ext_authz;
pub mod forward_auth;
pub(crate) mod metrics;
pub mod service;
pub mod telemetry;
pub(crate) mod webhook;

use std::{future::Future, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    clerk::{
        api::{BackendApi, BackendApiConfig, ClerkApi},
        budget::BudgetConfig,
        directory::{Directory, DirectoryConfig},
        machines::MachineConfig,
        svix::{SvixVerifier, WebhookSecretError},
    },
    secret::Secret,
    server::{
        access::{Access, AccessConfig},
        events::{Events, RedisConfig, RedisError},
        ext_authz::{ExtAuthz, RoutePolicy},
        metrics::{Metrics, Observer},
        service::{
            watch::{WatchConfig, WatchHub},
            AuthServiceImpl, Forwarders, IdentityQueries,
        },
    },
    verify::{
        jwks::{KeySource, KeyStore, KeyStoreConfig},
        settings::VerifierSettings,
    },
    TokenVerifier, TokenVerifierConfig,
};

/// The fully-qualified service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "clerk.auth.v1.AuthService";

/// Everything the server needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where keys come from.
    pub key_source: KeySource,
    /// Key refresh timing and limits (default `KeyStoreConfig::default()`: refresh every
    /// 5 min, unknown-kid refetch at most every 10 s, last good keys used for 1 h of failures).
    pub key_store: KeyStoreConfig,
    /// Validation and verdict cache (default `TokenVerifierConfig::default()`: 5 s clock skew,
    /// no `azp`/`iss`/`aud` pinning, 100 000 cached verdicts).
    pub verifier: TokenVerifierConfig,
    /// Opaque machine tokens through the Backend API (`None`: refused with
    /// `FAILED_PRECONDITION` / `SECRET_KEY_MISSING`).
    pub machine: Option<MachineConfig>,
    /// Identity queries (users, memberships, sessions) through the Backend API (`None`: those
    /// RPCs answer FAILED_PRECONDITION / `SECRET_KEY_MISSING`).
    pub identity: Option<IdentityConfig>,
    /// Who may ask what: the identity-query allowlist, AuthService's own machine id, which
    /// user tokens may call identity queries and with which OAuth scopes
    /// ([`crate::server::access`]). Default: session tokens speak for their user, nobody is trusted.
    pub access: AccessConfig,
    /// Clerk webhooks on the HTTP port (`CLERK_WEBHOOK_SIGNING_SECRET`; default: off).
    pub webhook: Option<WebhookConfig>,
    /// Share revocations and invalidations between replicas (`CLERK_AUTH_REDIS_URL`;
    /// default: this replica alone). Connected when the server starts.
    pub redis: Option<RedisConfig>,
    /// How long a revoked session is remembered (the longest session-token lifetime;
    /// default 24 h).
    pub revocation_ttl: Duration,
    /// The most revoked sessions remembered at once; past it the oldest is evicted (default
    /// 1 000 000).
    pub revocation_capacity: u64,
    /// Rules for Envoy's `Check` by host, path prefix and method (default: a valid session
    /// token everywhere).
    pub route_policy: RoutePolicy,
    /// HTTP forward auth at `/auth` on the HTTP port (nginx `auth_request`, ingress-nginx,
    /// Traefik, Caddy), decided by the same [`RoutePolicy`] as `Check` (`None`: off).
    pub forward_auth: Option<forward_auth::ForwardAuthConfig>,
    /// TLS / mTLS for the gRPC port (`None`: plaintext).
    pub tls: Option<TlsConfig>,
    /// How long in-flight calls may finish after a shutdown signal (streams and idle
    /// connections do not wait for it). Defaults to 10 s.
    pub shutdown_grace: Duration,
    /// What this replica may spend at the Backend API, shared by identity queries and
    /// machine-token verification (replica-wide rate, reserve strangers cannot spend; default
    /// `BudgetConfig::default()`: 20 calls/s, burst 40, half reserved, 5 calls/s and burst 20
    /// per identity-query caller).
    pub budget: BudgetConfig,
    /// Callers allowed to set `VerifyTokenRequest.client_ip` (the delegated layers): machine
    /// ids (`mch_…`, their M2M token in the call's `authorization`) and SPIFFE IDs
    /// (`spiffe://…`, their mTLS certificate). Anyone else's `client_ip` is ignored and the
    /// call is counted under its own address. Default: none.
    pub forwarders: Vec<String>,
    /// Limits of `WatchRevocations` streams (default `WatchConfig::default()`: 1024 streams,
    /// 8 per connection, 30 s write timeout).
    pub watch: WatchConfig,
    /// Serve gRPC server reflection v1 and v1alpha (`CLERK_AUTH_REFLECTION`; default on). Off:
    /// reflection calls are `UNIMPLEMENTED`; health and the services are unaffected.
    pub reflection: bool,
}

/// The ports an [`AuthServer`] serves on.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (AuthService, Envoy `Check`, health, reflection).
    pub grpc: TcpListener,
    /// The HTTP port (`CLERK_AUTH_HTTP_LISTEN`): Clerk webhooks; also `/metrics`, `/livez` and
    /// `/readyz` when there is no metrics port.
    pub http: Option<TcpListener>,
    /// The metrics port (`CLERK_AUTH_METRICS_LISTEN`): `/metrics`, `/livez`, `/readyz` only.
    /// With it, the HTTP port serves webhooks only.
    pub metrics: Option<TcpListener>,
}

/// TLS for the gRPC port; mTLS when a client CA is given.
#[derive(Clone)]
pub struct TlsConfig {
    /// The server certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// The server's private key (PEM). Never printed.
    pub key_pem: Vec<u8>,
    /// Client certificates must chain to this CA (PEM): mTLS.
    pub client_ca_pem: Option<Vec<u8>>,
    /// With a client CA: also accept clients without a certificate (default: required).
    pub client_auth_optional: bool,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mtls", &self.client_ca_pem.is_some())
            .field("client_auth_optional", &self.client_auth_optional)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// The tonic server configuration.
    pub fn to_tonic(&self) -> tonic::transport::ServerTlsConfig {
        let mut t = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem),
        );
        if let Some(ca) = &self.client_ca_pem {
            t = t
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(self.client_auth_optional);
        }
        t
    }
}

/// Identity-query settings.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The Backend API client.
    pub backend: BackendApiConfig,
    /// Caches.
    pub directory: DirectoryConfig,
}

/// Webhook settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `whsec_…`.
    pub signing_secret: Secret,
    /// Largest distance between a delivery's timestamp and now (default 5 min).
    pub tolerance: Duration,
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The HTTP client for Clerk could not be built.
    #[error("building the HTTP client failed")]
    HttpClient(#[source] reqwest::Error),
    /// Redis could not be reached.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// The webhook signing secret is unusable.
    #[error(transparent)]
    Webhook(#[from] WebhookSecretError),
    /// The HTTP port failed.
    #[error("HTTP server error")]
    Http(#[source] std::io::Error),
    /// The access rules are inconsistent (see [`crate::server::access::Access::new`]).
    #[error("access configuration: {0}")]
    Access(String),
    /// Reflection could not be built from the descriptor set.
    #[error("building the reflection service failed")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The gRPC transport failed.
    #[error("gRPC transport error")]
    Transport(#[source] tonic::transport::Error),
}

/// A built server: its verifier and key store (for embedding and tests), ready to serve.
#[derive(Debug)]
pub struct AuthServer {
    verifier: TokenVerifier,
    clerk_api: ClerkApi,
    route_policy: RoutePolicy,
    forward_auth: Option<forward_auth::ForwardAuthConfig>,
    tls: Option<TlsConfig>,
    directory: Option<Directory>,
    access: Access,
    forwarders: Vec<String>,
    webhook: Option<SvixVerifier>,
    redis: Option<RedisConfig>,
    shutdown_grace: Duration,
    watch: WatchHub,
    reflection: bool,
}

// === impl ServerConfig ===

impl ServerConfig {
    /// A configuration with defaults (each field's doc states its own) for everything but the
    /// key source. [`config::ServeConfig::from_lookup`] builds one from the environment.
    pub fn new(key_source: KeySource) -> Self {
        Self::with_verifier(VerifierSettings::new(key_source))
    }

    /// The verifier's part from `v` (key source, key store, verifier, machine tokens, Backend
    /// API budget, revocations); defaults for the rest.
    pub(crate) fn with_verifier(v: VerifierSettings) -> Self {
        Self {
            key_source: v.key_source,
            key_store: v.key_store,
            verifier: v.verifier,
            machine: v.machine,
            identity: None,
            access: AccessConfig::default(),
            webhook: None,
            redis: None,
            revocation_ttl: v.revocation_ttl,
            revocation_capacity: v.revocation_capacity,
            route_policy: RoutePolicy::default(),
            forward_auth: None,
            tls: None,
            shutdown_grace: Duration::from_secs(10),
            budget: v.budget,
            forwarders: Vec::new(),
            watch: WatchConfig::default(),
            reflection: true,
        }
    }
}

// === impl AuthServer ===

impl AuthServer {
    /// Builds the verifier and key store. Nothing is fetched until [`AuthServer::serve`].
    pub fn build(config: ServerConfig) -> Result<Self, ServerError> {
        let access = Access::new(config.access).map_err(ServerError::Access)?;
        if access.machine_id().is_none() && config.forwarders.iter().any(|f| f.starts_with("mch_"))
        {
            tracing::warn!(
                "CLERK_AUTH_CLIENT_IP_FORWARDERS names machines but CLERK_AUTH_MACHINE_ID is not \
                 set: their client_ip is never believed"
            );
        }
        if access.revoke_requires_mtls()
            && config
                .tls
                .as_ref()
                .is_none_or(|t| t.client_ca_pem.is_none())
        {
            tracing::warn!(
                "CLERK_AUTH_REVOKE_REQUIRES_MTLS is set but mTLS is off (CLERK_AUTH_TLS_CLIENT_CA): \
                 RevokeSession is refused to everyone"
            );
        }
        // One client for every call to Clerk: one HTTP client (the JWKS key store's too), one
        // budget and one Retry-After per Clerk for identity queries, machine tokens and any
        // M2M token source built on it ([`AuthServer::clerk_api`]).
        let api = ClerkApi::with_http(
            crate::clerk::api::http_client().map_err(ServerError::HttpClient)?,
            config.budget.clone(),
        );
        let directory = config.identity.as_ref().map(|i| {
            Directory::new(
                BackendApi::new(i.backend.clone(), &api),
                i.directory.clone(),
            )
        });
        let webhook = config
            .webhook
            .as_ref()
            .map(|w| SvixVerifier::new(&w.signing_secret, w.tolerance))
            .transpose()?;
        // The same wiring as `TokenVerifier::start` (the refresher is spawned by `serve`).
        let verifier = TokenVerifier::assemble(
            VerifierSettings {
                key_source: config.key_source,
                key_store: config.key_store,
                verifier: config.verifier,
                machine: config.machine,
                budget: config.budget,
                revocation_ttl: config.revocation_ttl,
                revocation_capacity: config.revocation_capacity,
            },
            &api,
        );
        Ok(Self {
            verifier,
            clerk_api: api,
            route_policy: config.route_policy,
            forward_auth: config.forward_auth,
            tls: config.tls,
            directory,
            access,
            forwarders: config.forwarders,
            webhook,
            redis: config.redis,
            shutdown_grace: config.shutdown_grace,
            watch: WatchHub::new(config.watch),
            reflection: config.reflection,
        })
    }

    /// The identity-query directory, when configured.
    pub fn directory(&self) -> Option<&Directory> {
        self.directory.as_ref()
    }

    /// The verifier the server uses.
    pub fn verifier(&self) -> &TokenVerifier {
        &self.verifier
    }

    /// The Backend API client every path of this server calls Clerk through (identity
    /// queries, machine-token verification, the JWKS key store's HTTP client). An
    /// [`M2mTokenSource`](crate::credentials::m2m::M2mTokenSource) built on it shares its
    /// `Retry-After` gate and budget.
    pub fn clerk_api(&self) -> &ClerkApi {
        &self.clerk_api
    }

    /// The `WatchRevocations` streams (limits and counters).
    pub fn watch(&self) -> &WatchHub {
        &self.watch
    }

    /// Serves on `listener` until `shutdown` completes, then drains in-flight calls for at most
    /// the grace period. The key refresher runs for exactly as long.
    ///
    /// The drain waits for calls, not connections: streams end as it begins
    /// (`WatchRevocations` with `UNAVAILABLE` / `AUTH_SERVICE_UNAVAILABLE`, any other — health
    /// `Watch`, reflection — with `UNAVAILABLE`: reconnect), and idle connections (HTTP/2 or
    /// keep-alive HTTP/1, an HTTP/2 connection that never sent its preface, or one that went
    /// silent) do not hold it: once no call is in flight and no connection has written for a
    /// second, it is done. A slow reader still receiving its answer is waited for, trailers
    /// included. Connections left when it is done (or when the grace period runs out) are
    /// ended. It ends with an `info` line `stopped` and the drain's duration; a `warn` when the
    /// grace period ran out.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        self.serve_with_http(listener, None, shutdown).await
    }

    /// Connects what must be connected (Redis) and returns the events hub: publish revocations
    /// from your own code through it, or wait until the Redis subscription is up before serving
    /// ([`AuthServer::serve_with_events`]). [`AuthServer::serve_with_http`] calls it for you.
    pub async fn events(&self) -> Result<Events, ServerError> {
        let revocations = self.verifier.revocations().clone();
        Ok(match &self.redis {
            Some(r) => Events::with_redis(revocations, self.directory.clone(), r.clone()).await?,
            None => Events::local(revocations, self.directory.clone()),
        })
    }

    /// As [`AuthServer::serve`], plus the HTTP port (webhooks) on `http` when given.
    pub async fn serve_with_http(
        self,
        listener: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let events = self.events().await?;
        self.serve_with_events(listener, http, events, shutdown)
            .await
    }

    /// As [`AuthServer::serve_with_http`] with an events hub made by [`AuthServer::events`].
    pub async fn serve_with_events(
        self,
        listener: TcpListener,
        http: Option<TcpListener>,
        events: Events,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let listeners = Listeners {
            grpc: listener,
            http,
            metrics: None,
        };
        self.serve_on(listeners, events, shutdown).await
    }

    /// Serves on every port of `listeners` with an events hub made by [`AuthServer::events`]:
    /// gRPC; the HTTP port (webhooks); the metrics port (`/metrics`, `/livez`, `/readyz`).
    /// Without a metrics port the HTTP port serves both, as before (with a warning when
    /// webhooks are on: opening it to Clerk opens the metrics too).
    pub async fn serve_on(
        self,
        listeners: Listeners,
        events: Events,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Listeners {
            grpc: listener,
            http,
            metrics: metrics_listener,
        } = listeners;
        let stop = CancellationToken::new();
        let subscriber = tokio::spawn(events.clone().run(stop.clone()));
        let metrics = Metrics::with_events(
            self.verifier.clone(),
            self.directory.clone(),
            Some(self.watch.clone()),
            Some(events.clone()),
        );
        let observer = Observer::new(Some(metrics.clone()));
        let ops = ops_router(
            metrics.clone(),
            self.verifier.keys().clone(),
            events.clone(),
        );
        let webhooks = self
            .webhook
            .clone()
            .map(|v| crate::server::webhook::router(v, events.clone()));
        if self.forward_auth.is_some() && self.route_policy.has_host_routes() {
            tracing::warn!(
                "forward auth with host routes: a host route is only as strict as the proxy's \
                 virtual hosts (a catch-all server block or site lets the client name the host)"
            );
        }
        let forward_auth = self.forward_auth.clone().map(|c| {
            forward_auth::router(
                ExtAuthz::new(self.verifier.clone(), self.route_policy.clone())
                    .with_observer(observer.clone()),
                c,
            )
        });
        let serve_http = |l: TcpListener, app: axum::Router| {
            let stopped = stop.clone();
            tokio::spawn(async move {
                axum::serve(l, app)
                    .with_graceful_shutdown(async move { stopped.cancelled().await })
                    .await
            })
        };
        let mut http_tasks = Vec::new();
        let split = metrics_listener.is_some();
        if let Some(l) = metrics_listener {
            http_tasks.push(serve_http(l, ops.clone()));
        }
        if let Some(l) = http {
            let mut app = if split { axum::Router::new() } else { ops };
            if let Some(w) = webhooks {
                if !split {
                    tracing::warn!(
                        "/metrics, /livez and /readyz are served on the webhook port \
                         (CLERK_AUTH_HTTP_LISTEN): whoever may reach the webhooks may read them; \
                         set CLERK_AUTH_METRICS_LISTEN to serve them on a port of their own"
                    );
                }
                app = app.merge(w);
            }
            if let Some(f) = forward_auth {
                app = app.merge(f);
            }
            http_tasks.push(serve_http(l, app));
        }
        let keys = self.verifier.keys().clone();
        let refresher = tokio::spawn(keys.clone().run(stop.clone()));

        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let health_task = spawn_health(keys, reporter, stop.clone());

        let (reflection_v1, reflection_v1alpha) = if self.reflection {
            let v1 = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(ext_authz::FILE_DESCRIPTOR_SET)
                .build_v1()
                .map_err(ServerError::Reflection)?;
            let v1alpha = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(ext_authz::FILE_DESCRIPTOR_SET)
                .build_v1alpha()
                .map_err(ServerError::Reflection)?;
            (Some(v1), Some(v1alpha))
        } else {
            (None, None)
        };

        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let watch = self.watch.clone();
        let drain = drain::Drain::default();
        let draining = drain.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutdown signal received; draining in-flight calls");
            // Streams never end by themselves: end them now (their clients reconnect,
            // elsewhere or later) so that the drain does not wait for the grace period.
            // Revocation streams end with their own reason; any other stream (health
            // `Watch`, reflection) with `UNAVAILABLE`.
            watch.shutdown();
            draining.start();
            let _ = drain_tx.send(());
        };
        let grace = self.shutdown_grace;
        // HTTP/2 keepalive: a peer that stops answering (a frozen client holding revocation
        // streams) loses its connection, and with it what the server buffered for it.
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(tls) = &self.tls {
            builder = builder
                .tls_config(tls.to_tonic())
                .map_err(ServerError::Transport)?;
        }
        let server = builder
            .layer(drain.layer())
            .add_service(health_service)
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .add_service(
                self.auth_service(events)
                    .with_observer(observer.clone())
                    .into_server(),
            )
            .add_service(
                ExtAuthz::new(self.verifier.clone(), self.route_policy.clone())
                    .with_observer(observer)
                    .into_server(),
            )
            .serve_with_incoming_shutdown(
                {
                    let drain = drain.clone();
                    futures::StreamExt::map(
                        TcpIncoming::from(listener)
                            .with_nodelay(Some(true))
                            .with_keepalive(Some(Duration::from_secs(60))),
                        move |accepted| accepted.map(|io| drain.io(io)),
                    )
                },
                signal,
            );
        // Once the drain has begun, the server future ends when every connection is closed
        // (those that never spoke at once, the others once their calls are answered and
        // written; streams end as the drain begins). The stop is also done once no call is in
        // flight and nothing has been written for a moment (idle connections whose peers never
        // close do not hold it), and at the latest when the grace period is over. Then every
        // connection left is ended: nothing outlives this function.
        let quiet = {
            let drain = drain.clone();
            async move {
                if drain_rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
                tokio::time::timeout(grace, drain.quiet(drain::QUIET))
                    .await
                    .is_ok()
            }
        };
        let result = tokio::select! {
            r = server => r.map_err(ServerError::Transport),
            in_time = quiet => {
                if !in_time {
                    tracing::warn!(
                        ?grace,
                        calls = drain.in_flight(),
                        connections = drain.connections(),
                        "drain deadline passed; dropping remaining calls and connections"
                    );
                }
                Ok(())
            }
        };
        drain.kill();
        stop.cancel();
        let _ = refresher.await;
        let _ = health_task.await;
        let _ = subscriber.await;
        // The HTTP ports stop accepting and finish their requests in flight (idle keep-alive
        // connections close at once), within what is left of the grace period.
        // At least a second, even after a gRPC drain that used the whole grace period (so the
        // stop may run that much past it): an idle port is not cut off before its task has run.
        let left = grace
            .saturating_sub(drain.elapsed().unwrap_or_default())
            .max(Duration::from_secs(1));
        for t in http_tasks {
            let abort = t.abort_handle();
            match tokio::time::timeout(left, t).await {
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "HTTP port failed"),
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(
                        ?grace,
                        "HTTP drain deadline passed; dropping remaining requests"
                    );
                    abort.abort();
                }
            }
        }
        if let Some(drain) = drain.elapsed() {
            tracing::info!(?drain, "stopped");
        }
        result
    }

    fn auth_service(&self, events: Events) -> AuthServiceImpl {
        let identity = self.directory.as_ref().map(|d| IdentityQueries {
            directory: d.clone(),
        });
        AuthServiceImpl::with_events(self.verifier.clone(), events, identity)
            .with_access(self.access.clone())
            .with_forwarders(Forwarders::new(self.forwarders.iter().cloned()))
            .with_watch(self.watch.clone())
    }
}

/// Builds and serves; see [`AuthServer::serve`].
pub async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    AuthServer::build(config)?.serve(listener, shutdown).await
}

fn spawn_health(
    keys: KeyStore,
    reporter: HealthReporter,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let mut rx = keys.serving();
    tokio::spawn(async move {
        loop {
            let serving = *rx.borrow_and_update();
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(SERVICE_NAME, status).await;
            reporter.set_service_status("", status).await;
            tracing::info!(serving, "health status");
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    })
}

/// `/metrics` (Prometheus text), `/livez` (the process answers) and `/readyz`: 503 while no
/// keys are usable; else 200 — `ready`, or, while revocation sharing through Redis is down,
/// `ready (degraded: …)` (verification still works here, so the replica is not taken out of
/// rotation; alert on `clerk_auth_redis_subscribed` instead).
fn ops_router(metrics: Metrics, keys: KeyStore, events: Events) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let usable = keys.is_usable();
                let shared = events.sharing().subscribed;
                async move {
                    match (usable, shared) {
                        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "keys unavailable"),
                        (true, true) => (StatusCode::OK, "ready"),
                        (true, false) => (
                            StatusCode::OK,
                            "ready (degraded: not subscribed to Redis; revocations made on \
                             other replicas are not received)",
                        ),
                    }
                }
            }),
        )
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, so a signal
/// that arrives after the call and before the future is first polled is not lost: call it first
/// thing at startup.
///
/// # Panics
///
/// Outside a tokio runtime with its I/O driver enabled (the signal handlers need it).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    // Registered now, not when first polled: a SIGTERM that arrives while the server is still
    // starting stops it gracefully instead of killing the process.
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = term => {},
                () = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
