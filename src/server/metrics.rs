//! Prometheus metrics (`GET /metrics` on the HTTP port): decisions by method, outcome and
//! reason; decisions of routes naming a rule (Envoy `clerk_rule`) by rule and outcome;
//! decision latency histograms; key-set age, JWKS fetches and failures; verdict,
//! machine-token and identity cache counters; Backend API calls, errors and 429s; revoked
//! sessions held, evicted and refused; `WatchRevocations` streams, their buffers and the
//! subscribers dropped.
//!
//! Hot-path counters are the components' own atomics, read at scrape time by a collector;
//! only the decision counter and the latency histogram are updated per call.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{
    clerk::directory::Directory,
    error::AuthError,
    server::{events::Events, service::watch::WatchHub},
    TokenVerifier,
};

type DecisionLabels = [(&'static str, &'static str); 3];
type MethodLabels = [(&'static str, &'static str); 1];
type RouteRuleLabels = [(&'static str, String); 3];

/// The server's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    route_rules: Family<RouteRuleLabels, Counter>,
    /// For each of [`HOT_METHODS`]: its `allowed`/`OK` counter and its latency histogram,
    /// resolved once (members of the families above), so that an allowed call on the hot
    /// path hashes no label set.
    hot: Vec<(Counter, Histogram)>,
}

/// The methods every request may pass through: their allowed decisions are counted
/// through handles resolved when the metrics are built.
const HOT_METHODS: [&str; 3] = ["VerifyToken", "Check", "ForwardAuth"];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[derive(Debug)]
struct Stats {
    verifier: TokenVerifier,
    directory: Option<Directory>,
    watch: Option<WatchHub>,
    events: Option<Events>,
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = e.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for Stats {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let keys = self.verifier.keys();
        let k = keys.stats();
        gauge(
            &mut e,
            "clerk_auth_key_set_age_seconds",
            "Seconds since the key set was last confirmed (-1 before the first load)",
            keys.key_set_age().map_or(-1.0, |a| a.as_secs_f64()),
        )?;
        gauge(
            &mut e,
            "clerk_auth_keys_usable",
            "1 while verification keys are usable",
            if keys.is_usable() { 1.0 } else { 0.0 },
        )?;
        counter(
            &mut e,
            "clerk_auth_jwks_fetches",
            "JWKS requests made",
            k.fetches,
        )?;
        counter(
            &mut e,
            "clerk_auth_jwks_fetch_failures",
            "JWKS requests that failed",
            k.fetch_failures,
        )?;
        counter(
            &mut e,
            "clerk_auth_jwks_unknown_kid_refetches",
            "JWKS fetches caused by an unknown kid",
            k.unknown_kid_refetches,
        )?;
        counter(
            &mut e,
            "clerk_auth_jwks_unknown_kid_suppressed",
            "Unknown-kid lookups answered without a fetch (cooldown or negative cache)",
            k.unknown_kid_suppressed,
        )?;
        let r = self.verifier.revocations().stats();
        gauge(
            &mut e,
            "clerk_auth_revocations",
            "Revoked sessions remembered now",
            r.entries as f64,
        )?;
        counter(
            &mut e,
            "clerk_auth_revocations_evicted",
            "Revocations evicted (oldest first) because the revoked-session set was full",
            r.evicted,
        )?;
        counter(
            &mut e,
            "clerk_auth_revocations_refused",
            "Revocations refused because the id is not a plausible Clerk session id",
            r.refused,
        )?;
        let v = self.verifier.stats();
        counter(
            &mut e,
            "clerk_auth_verdict_cache_hits",
            "Verifications answered from the verdict cache",
            v.cache_hits,
        )?;
        counter(
            &mut e,
            "clerk_auth_full_verifications",
            "Verifications that checked a signature (verdict cache misses)",
            v.full_verifications,
        )?;
        if let Some(m) = self.verifier.machine() {
            // One budget for every Backend API path (the server shares it).
            let b = m.budget().stats();
            counter(
                &mut e,
                "clerk_auth_bapi_budget_refused_strangers",
                "Backend API calls for sources never seen with a valid token refused by the replica-wide budget",
                b.refused_strangers,
            )?;
            counter(
                &mut e,
                "clerk_auth_bapi_budget_refused_known",
                "Backend API calls for identity queries or known sources refused by the replica-wide budget",
                b.refused_known,
            )?;
            counter(
                &mut e,
                "clerk_auth_bapi_budget_suspended",
                "Backend API calls refused without a request while Clerk's Retry-After ran",
                b.suspended,
            )?;
            let m = m.stats();
            counter(
                &mut e,
                "clerk_auth_machine_api_calls",
                "Backend API machine-token verify calls",
                m.api_calls,
            )?;
            counter(
                &mut e,
                "clerk_auth_machine_cache_hits",
                "Machine-token verdicts from the cache",
                m.cache_hits,
            )?;
            counter(
                &mut e,
                "clerk_auth_machine_negative_hits",
                "Machine-token refusals from the negative cache",
                m.negative_hits,
            )?;
            counter(
                &mut e,
                "clerk_auth_machine_rate_limited",
                "Machine-token verifications refused by a rate limit",
                m.rate_limited,
            )?;
            counter(
                &mut e,
                "clerk_auth_machine_clerk_429s",
                "429 answers from Clerk to machine-token verifications",
                m.clerk_429s,
            )?;
        }
        if let Some(d) = &self.directory {
            let b = d.api().stats();
            counter(
                &mut e,
                "clerk_auth_backend_api_requests",
                "Backend API requests for identity queries (retries included)",
                b.requests,
            )?;
            counter(
                &mut e,
                "clerk_auth_backend_api_errors",
                "Identity queries that failed at the Backend API",
                b.errors,
            )?;
            counter(
                &mut e,
                "clerk_auth_backend_api_429s",
                "429 answers from the Backend API to identity queries",
                b.rate_limited,
            )?;
            counter(
                &mut e,
                "clerk_auth_backend_api_suspended",
                "Identity queries refused without a request while a 429's Retry-After ran",
                b.suspended,
            )?;
            let c = d.stats();
            counter(
                &mut e,
                "clerk_auth_identity_cache_hits",
                "Identity queries answered from the cache",
                c.hits,
            )?;
            counter(
                &mut e,
                "clerk_auth_identity_cache_misses",
                "Identity queries that went to the Backend API",
                c.misses,
            )?;
        }
        if let Some(w) = &self.watch {
            watch_metrics(&mut e, &w.stats())?;
        }
        if let Some(ev) = &self.events {
            sharing_metrics(&mut e, &ev.sharing())?;
        }
        process_gauges(&mut e)
    }
}

/// Revocation sharing through Redis (only when Redis is configured).
fn sharing_metrics(
    e: &mut DescriptorEncoder<'_>,
    s: &crate::server::events::SharingStatus,
) -> std::fmt::Result {
    if !s.configured {
        return Ok(());
    }
    gauge(
        e,
        "clerk_auth_redis_subscribed",
        "1 while this replica receives other replicas' revocations through Redis",
        if s.subscribed { 1.0 } else { 0.0 },
    )?;
    counter(
        e,
        "clerk_auth_redis_malformed",
        "Redis messages and stored keys skipped as malformed (too large, not UTF-8 or JSON, not a Clerk id)",
        s.malformed,
    )?;
    gauge(
        e,
        "clerk_auth_redis_pending_events",
        "Events made here that wait for Redis to be shared",
        s.pending as f64,
    )?;
    counter(
        e,
        "clerk_auth_redis_pending_dropped",
        "Events dropped (oldest first) because too many waited for Redis",
        s.pending_dropped,
    )
}

/// `WatchRevocations`: streams, what they buffer, and the subscribers dropped.
fn watch_metrics(
    e: &mut DescriptorEncoder<'_>,
    w: &crate::server::service::watch::WatchStats,
) -> std::fmt::Result {
    gauge(
        e,
        "clerk_auth_watch_streams",
        "WatchRevocations streams open now",
        w.active as f64,
    )?;
    counter(
        e,
        "clerk_auth_watch_streams_opened",
        "WatchRevocations streams opened",
        w.opened,
    )?;
    gauge(
        e,
        "clerk_auth_watch_buffered_revocations",
        "Revoked ids held in WatchRevocations stream buffers now (pages and encoded messages)",
        w.buffered as f64,
    )?;
    gauge(
        e,
        "clerk_auth_watch_buffered_revocations_peak",
        "The most revoked ids ever held in WatchRevocations stream buffers at once",
        w.buffered_peak as f64,
    )?;
    counter(
        e,
        "clerk_auth_watch_refused_limit",
        "WatchRevocations streams refused because a stream limit was reached",
        w.refused_limit,
    )?;
    counter(
        e,
        "clerk_auth_watch_dropped_lagged",
        "WatchRevocations subscribers dropped for lagging behind the live revocations",
        w.dropped_lagged,
    )?;
    counter(
        e,
        "clerk_auth_watch_dropped_write_timeout",
        "WatchRevocations subscribers dropped because nothing could be written for the write timeout",
        w.dropped_write_timeout,
    )?;
    counter(
        e,
        "clerk_auth_watch_ended_token_expired",
        "WatchRevocations streams ended because the caller's token expired",
        w.ended_token_expired,
    )?;
    counter(
        e,
        "clerk_auth_watch_resyncs",
        "Replays of stored revocations walked by WatchRevocations subscribers",
        w.resyncs,
    )
}

/// Process and runtime gauges for leak checks (soak tests, dashboards): resident memory, open
/// file descriptors, live tokio tasks. Linux `/proc` values are skipped where unavailable.
fn process_gauges(e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    if let Some(rss) = resident_bytes() {
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            rss as f64,
        )?;
    }
    if let Some(cpu) = cpu_seconds() {
        let c = ConstCounter::new(cpu);
        let m = e.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            c.metric_type(),
        )?;
        c.encode(m)?;
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            e,
            "process_open_fds",
            "Open file descriptors",
            fds.count() as f64,
        )?;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        gauge(
            e,
            "clerk_auth_runtime_alive_tasks",
            "Tokio tasks alive in the server's runtime",
            rt.metrics().num_alive_tasks() as f64,
        )?;
    }
    Ok(())
}

/// User + system CPU seconds from `/proc/self/stat` (fields 14 and 15, in clock ticks of
/// 1/100 s, the value of `CLK_TCK` on Linux).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields are counted after its `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident set size: `VmRSS` of `/proc/self/status` (kB).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `Some(s)` unless `s` is empty.
fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl Metrics {
    /// Metrics over `verifier` (and `directory` when identity queries are on).
    pub fn new(verifier: TokenVerifier, directory: Option<Directory>) -> Self {
        Self::with_watch(verifier, directory, None)
    }

    /// As [`Metrics::new`], plus the `WatchRevocations` streams of `watch`.
    pub fn with_watch(
        verifier: TokenVerifier,
        directory: Option<Directory>,
        watch: Option<WatchHub>,
    ) -> Self {
        Self::with_events(verifier, directory, watch, None)
    }

    /// As [`Metrics::with_watch`], plus how `events` shares revocations through Redis
    /// (`clerk_auth_redis_*`, when Redis is configured).
    pub fn with_events(
        verifier: TokenVerifier,
        directory: Option<Directory>,
        watch: Option<WatchHub>,
        events: Option<Events>,
    ) -> Self {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "clerk_auth_decisions",
            "Decisions by method, outcome and reason",
            decisions.clone(),
        );
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            // 50 µs … ~1.6 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.000_05, 2.0, 16,
            ))
        });
        registry.register(
            "clerk_auth_decision_duration_seconds",
            "Time to decide, by method",
            latency.clone(),
        );
        let route_rules = Family::<RouteRuleLabels, Counter>::default();
        registry.register(
            "clerk_auth_route_rule_decisions",
            "Check decisions for routes naming a rule (Envoy context_extensions clerk_rule), by \
             surface, rule and outcome; rule \"(invalid)\" when the name was refused",
            route_rules.clone(),
        );
        registry.register_collector(Box::new(Stats {
            verifier,
            directory,
            watch,
            events,
        }));
        let hot = HOT_METHODS
            .iter()
            .map(|&method| {
                (
                    decisions
                        .get_or_create(&[
                            ("method", method),
                            ("outcome", "allowed"),
                            ("reason", "OK"),
                        ])
                        .clone(),
                    latency.get_or_create(&[("method", method)]).clone(),
                )
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                registry,
                decisions,
                latency,
                route_rules,
                hot,
            }),
        }
    }

    /// Records one decision.
    pub fn record(&self, method: &'static str, result: Result<(), &AuthError>, elapsed: Duration) {
        if result.is_ok() {
            if let Some(i) = HOT_METHODS.iter().position(|&m| m == method) {
                let (allowed, latency) = &self.inner.hot[i];
                allowed.inc();
                latency.observe(elapsed.as_secs_f64());
                return;
            }
        }
        let (outcome, reason) = match result {
            Ok(()) => ("allowed", "OK"),
            Err(e) => (outcome_of(e), e.reason_str()),
        };
        self.inner
            .decisions
            .get_or_create(&[("method", method), ("outcome", outcome), ("reason", reason)])
            .inc();
        self.inner
            .latency
            .get_or_create(&[("method", method)])
            .observe(elapsed.as_secs_f64());
    }

    /// Records one decision for a route naming `rule` (a policy rule name, or `(invalid)`).
    pub fn record_route_rule(
        &self,
        method: &'static str,
        rule: &str,
        result: Result<(), &AuthError>,
    ) {
        let outcome = result.map_or_else(outcome_of, |()| "allowed");
        self.inner
            .route_rules
            .get_or_create(&[
                ("method", method.to_owned()),
                ("rule", rule.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.inner.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn outcome_of(e: &AuthError) -> &'static str {
    match e {
        AuthError::Rejected(_) => "unauthenticated",
        AuthError::Denied(_) => "denied",
        AuthError::InvalidRequest(_) | AuthError::NotCanonical { .. } => "invalid",
        AuthError::NotFound => "not_found",
        AuthError::RateLimited { .. } | AuthError::LimitReached { .. } => "rate_limited",
        AuthError::Misconfigured(_) => "misconfigured",
        AuthError::Unavailable(_) => "unavailable",
    }
}

/// Where every decision goes: the metrics (when enabled) and the audit log — one structured
/// line per decision on the tracing target `clerk_grpc_auth::audit` with who (user, session,
/// organization, machine, token fingerprint), what (method and target), the verdict and the
/// reason. Never the token itself.
#[derive(Clone, Debug, Default)]
pub struct Observer {
    metrics: Option<Metrics>,
}

/// Longest request field written to an audit line, in bytes; a longer one is cut (at a
/// character boundary) and says how many bytes were left out.
pub(crate) const MAX_AUDIT_FIELD: usize = 256;

fn bounded(field: &str) -> std::borrow::Cow<'_, str> {
    if field.len() <= MAX_AUDIT_FIELD {
        return field.into();
    }
    let mut end = MAX_AUDIT_FIELD;
    while !field.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…(+{} bytes)", &field[..end], field.len() - end).into()
}

/// The audit log's tracing target.
pub(crate) const AUDIT_TARGET: &str = "clerk_grpc_auth::audit";

impl Observer {
    /// An observer feeding `metrics`.
    pub fn new(metrics: Option<Metrics>) -> Self {
        Self { metrics }
    }

    /// Records one decision of `Check` or forward auth: as [`Observer::decision`], with the
    /// rule the proxy's route named (`rule`: a policy rule name, `(invalid)` when refused) in
    /// the audit line and in `clerk_auth_route_rule_decisions`.
    pub fn route_decision(
        &self,
        method: &'static str,
        what: &str,
        rule: Option<&str>,
        identity: Option<&crate::Identity>,
        result: Result<(), &AuthError>,
        elapsed: Duration,
    ) {
        if let (Some(m), Some(rule)) = (&self.metrics, rule) {
            m.record_route_rule(method, rule, result);
        }
        self.emit(method, what, rule, identity, None, result, elapsed);
    }

    /// Records one decision; `token` is the digest of the token it was about, whose
    /// fingerprint the audit line shows.
    pub fn decision(
        &self,
        method: &'static str,
        what: &str,
        identity: Option<&crate::Identity>,
        token: Option<&crate::secret::TokenDigest>,
        result: Result<(), &AuthError>,
        elapsed: Duration,
    ) {
        self.emit(method, what, None, identity, token, result, elapsed);
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        method: &'static str,
        what: &str,
        rule: Option<&str>,
        identity: Option<&crate::Identity>,
        token: Option<&crate::secret::TokenDigest>,
        result: Result<(), &AuthError>,
        elapsed: Duration,
    ) {
        if let Some(m) = &self.metrics {
            m.record(method, result, elapsed);
        }
        let (verdict, reason) = match result {
            Ok(()) => ("allow", "OK"),
            Err(e) => (outcome_of(e), e.reason_str()),
        };
        // Empty fields are left out (an `Option` records nothing when `None`). `what` is the
        // caller's request field: bounded, so one request cannot write a megabyte line.
        let what = bounded(what);
        tracing::info!(
            target: AUDIT_TARGET,
            method,
            what = non_empty(&what),
            rule = rule.map(bounded).as_deref(),
            verdict,
            reason,
            user = identity.and_then(|i| non_empty(&i.user_id)),
            session = identity.and_then(|i| i.session_id.as_deref()),
            org = identity
                .and_then(|i| i.organization.as_ref())
                .map(|o| o.id.as_str()),
            machine = identity
                .and_then(|i| i.machine.as_ref())
                .and_then(|m| m.machine_id.as_deref()),
            token = token.map(|d| d.fingerprint()).as_ref().map(|f| f.as_str()),
            elapsed_us = elapsed.as_micros() as u64,
            "decision"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_fields_are_bounded_at_a_character_boundary() {
        assert_eq!(bounded("user_1"), "user_1");
        let exact = "a".repeat(MAX_AUDIT_FIELD);
        assert_eq!(bounded(&exact), exact);
        // 255 ASCII bytes then a 3-byte character across the limit: cut before it.
        let s = format!("{}€{}", "a".repeat(MAX_AUDIT_FIELD - 1), "b".repeat(10));
        let b = bounded(&s);
        assert_eq!(
            b,
            format!("{}…(+13 bytes)", "a".repeat(MAX_AUDIT_FIELD - 1))
        );
    }
}
