//! The deployment files parse and agree with the service: ports, probes, paths, fail-closed.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// A YAML node: the tree the assertions read, built from `saphyr_parser`'s events (an
/// event-based parser whose dependencies add no features to the crate's own graph). Plain
/// scalars resolve as YAML 1.2's core schema says; quoted and block scalars are strings.
#[derive(Debug, Clone, PartialEq)]
enum Yaml {
    Str(String),
    Int(i64),
    Real(f64),
    Bool(bool),
    Null,
    Array(Vec<Yaml>),
    Hash(Vec<(Yaml, Yaml)>),
    /// What indexing a missing key or index, or a node of another kind, gives.
    BadValue,
}

static BAD_VALUE: Yaml = Yaml::BadValue;

impl Yaml {
    fn plain(s: &str) -> Yaml {
        match s {
            "" | "~" | "null" | "Null" | "NULL" => return Yaml::Null,
            "true" | "True" | "TRUE" => return Yaml::Bool(true),
            "false" | "False" | "FALSE" => return Yaml::Bool(false),
            _ => {}
        }
        let int = if let Some(hex) = s.strip_prefix("0x") {
            i64::from_str_radix(hex, 16).ok()
        } else if let Some(oct) = s.strip_prefix("0o") {
            i64::from_str_radix(oct, 8).ok()
        } else {
            s.parse().ok()
        };
        if let Some(i) = int {
            return Yaml::Int(i);
        }
        let special = match s.trim_start_matches(['+', '-']) {
            ".inf" | ".Inf" | ".INF" => Some(f64::INFINITY),
            ".nan" | ".NaN" | ".NAN" => Some(f64::NAN),
            _ => None,
        };
        let real = special
            .map(|f| if s.starts_with('-') { -f } else { f })
            .or_else(|| {
                let numeric = s.bytes().any(|b| b.is_ascii_digit())
                    && s.bytes()
                        .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
                numeric.then(|| s.parse().ok()).flatten()
            });
        real.map_or_else(|| Yaml::Str(s.to_owned()), Yaml::Real)
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_i64(&self) -> Option<i64> {
        match self {
            Yaml::Int(i) => Some(*i),
            _ => None,
        }
    }
    fn as_bool(&self) -> Option<bool> {
        match self {
            Yaml::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn as_vec(&self) -> Option<&Vec<Yaml>> {
        match self {
            Yaml::Array(v) => Some(v),
            _ => None,
        }
    }
    fn is_badvalue(&self) -> bool {
        matches!(self, Yaml::BadValue)
    }
}

impl std::ops::Index<&str> for Yaml {
    type Output = Yaml;
    fn index(&self, key: &str) -> &Yaml {
        match self {
            Yaml::Hash(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map_or(&BAD_VALUE, |(_, v)| v),
            _ => &BAD_VALUE,
        }
    }
}

impl std::ops::Index<usize> for Yaml {
    type Output = Yaml;
    fn index(&self, i: usize) -> &Yaml {
        self.as_vec().and_then(|v| v.get(i)).unwrap_or(&BAD_VALUE)
    }
}

/// Every document of a YAML stream. Aliases resolve to their anchors' nodes (anchor id 0 is
/// "none"); tags and duplicate keys are refused (the deployment files have neither, and
/// ignoring either could misread a value).
fn load(text: &str) -> Result<Vec<Yaml>, String> {
    enum Open {
        Seq(usize, Vec<Yaml>),
        Map(usize, Vec<(Yaml, Yaml)>, Option<Yaml>),
    }
    let mut docs = Vec::new();
    let mut stack: Vec<Open> = Vec::new();
    let mut anchors: HashMap<usize, Yaml> = HashMap::new();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| e.to_string())?;
        if let Event::SequenceStart(_, Some(_))
        | Event::MappingStart(_, Some(_))
        | Event::Scalar(_, _, _, Some(_)) = event
        {
            return Err(format!("tags are not supported (at {span:?})"));
        }
        let (node, anchor) = match event {
            Event::SequenceStart(anchor, _) => {
                stack.push(Open::Seq(anchor, Vec::new()));
                continue;
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Open::Map(anchor, Vec::new(), None));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Open::Seq(anchor, items)) => (Yaml::Array(items), anchor),
                _ => return Err(format!("unbalanced sequence end at {span:?}")),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Open::Map(anchor, entries, None)) => (Yaml::Hash(entries), anchor),
                _ => return Err(format!("unbalanced mapping end at {span:?}")),
            },
            Event::Scalar(value, ScalarStyle::Plain, anchor, _) => (Yaml::plain(&value), anchor),
            Event::Scalar(value, _, anchor, _) => (Yaml::Str(value.into_owned()), anchor),
            Event::Alias(id) => (
                anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| format!("unknown alias at {span:?}"))?,
                0,
            ),
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart(_)
            | Event::DocumentEnd => continue,
        };
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => docs.push(node),
            Some(Open::Seq(_, items)) => items.push(node),
            Some(Open::Map(_, entries, key)) => match key.take() {
                None if entries.iter().any(|(k, _)| *k == node) => {
                    return Err(format!("duplicate key {node:?} at {span:?}"));
                }
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }
    if !stack.is_empty() {
        return Err("unterminated collection".into());
    }
    Ok(docs)
}

fn docs(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    load(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn one(path: &str) -> Yaml {
    docs(path).into_iter().next().unwrap()
}

#[test]
fn the_yaml_reader_resolves_scalars_and_refuses_what_it_cannot_read() {
    let d =
        load("a: 50051\nb: '50051'\nc: true\nd: [x, ~, -1.5]\ne: &e {f: 0x10}\ng: *e\n").unwrap();
    assert_eq!(d.len(), 1);
    let d = &d[0];
    assert_eq!(d["a"].as_i64(), Some(50051));
    assert_eq!(d["a"].as_str(), None);
    assert_eq!(d["b"].as_str(), Some("50051"));
    assert_eq!(d["c"].as_bool(), Some(true));
    assert_eq!(d["d"][0].as_str(), Some("x"));
    assert_eq!(d["d"][1], Yaml::Null);
    assert_eq!(d["d"][2], Yaml::Real(-1.5));
    assert!(d["d"][3].is_badvalue());
    assert_eq!(d["g"]["f"].as_i64(), Some(16));
    assert!(d["missing"]["deeper"].is_badvalue());
    assert_eq!(load("a: 1\n---\nb: 2\n").unwrap().len(), 2);
    assert!(load("a: 1\na: 2\n").unwrap_err().contains("duplicate key"));
    assert!(load("a: !!str 1\n").unwrap_err().contains("tags"));
    assert!(load("a: [1, 2\n").is_err());
}

#[test]
fn kubernetes_manifests_name_the_right_ports_and_probes() {
    let kustomization = one("deploy/kubernetes/kustomization.yaml");
    let resources: Vec<&str> = kustomization["resources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for r in &resources {
        assert!(!docs(&format!("deploy/kubernetes/{r}")).is_empty(), "{r}");
    }
    for kind in [
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "hpa.yaml",
        "configmap.yaml",
        "secret.yaml",
    ] {
        assert!(resources.contains(&kind), "{kind} not in kustomization");
    }

    let d = one("deploy/kubernetes/deployment.yaml");
    assert_eq!(d["kind"].as_str(), Some("Deployment"));
    let spec = &d["spec"]["template"]["spec"];
    assert_eq!(
        spec["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    let c = &spec["containers"][0];
    let ports: Vec<(String, i64)> = c["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    for port in [("grpc", 50051), ("webhooks", 8081), ("metrics", 9090)] {
        assert!(
            ports.contains(&(port.0.into(), port.1)),
            "{port:?} in {ports:?}"
        );
    }
    // Metrics are scraped from the metrics port, never the webhook port.
    let annotations = &d["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("9090"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    // gRPC health probe on the service the server reports; liveness on /livez.
    assert_eq!(c["readinessProbe"]["grpc"]["port"].as_i64(), Some(50051));
    assert_eq!(
        c["readinessProbe"]["grpc"]["service"].as_str(),
        Some(clerk_grpc_auth::server::SERVICE_NAME)
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/livez")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["port"].as_str(),
        Some("metrics"),
        "liveness on the metrics port"
    );
    let env_from: Vec<&str> = c["envFrom"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|e| {
            e["secretRef"]["name"]
                .as_str()
                .or(e["configMapRef"]["name"].as_str())
        })
        .collect();
    assert_eq!(env_from.len(), 2);

    let cm = one("deploy/kubernetes/configmap.yaml");
    assert_eq!(
        cm["data"]["CLERK_AUTH_LISTEN"].as_str(),
        Some("0.0.0.0:50051")
    );
    assert_eq!(
        cm["data"]["CLERK_AUTH_HTTP_LISTEN"].as_str(),
        Some("0.0.0.0:8081")
    );
    // With a metrics port the HTTP port serves webhooks only; no reflection in production.
    assert_eq!(
        cm["data"]["CLERK_AUTH_METRICS_LISTEN"].as_str(),
        Some("0.0.0.0:9090")
    );
    assert_eq!(cm["data"]["CLERK_AUTH_REFLECTION"].as_str(), Some("false"));
    // A full verdict cache plus a baseline must fit in the container's memory limit, or a
    // burst of distinct tokens gets the pod OOM-killed. An entry is 1 549 heap bytes for a
    // typical session token (`cargo bench -p clerk-grpc-auth-bench --bench verdict_memory`);
    // 2 KiB are counted for the allocator's own overhead and larger tokens.
    let capacity: u64 = cm["data"]["CLERK_AUTH_VERDICT_CACHE_CAPACITY"]
        .as_str()
        .expect("the verdict cache is sized explicitly")
        .parse()
        .unwrap();
    let limit = c["resources"]["limits"]["memory"].as_str().unwrap();
    let limit_mib: u64 = limit
        .strip_suffix("Mi")
        .expect("limit in Mi")
        .parse()
        .unwrap();
    assert!(
        capacity * 2 * 1024 + 96 * 1024 * 1024 <= limit_mib * 1024 * 1024,
        "{capacity} cached verdicts do not fit in {limit}"
    );
    let secret = one("deploy/kubernetes/secret.yaml");
    assert!(secret["stringData"]["CLERK_SECRET_KEY"]
        .as_str()
        .unwrap()
        .starts_with("sk_"));

    let services = docs("deploy/kubernetes/service.yaml");
    let service = |name: &str| {
        services
            .iter()
            .find(|s| s["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("Service {name}"))
    };
    let service_ports = |name: &str| -> Vec<(i64, String)> {
        service(name)["spec"]["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["port"].as_i64().unwrap(),
                    p["targetPort"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(services.len(), 4);
    // Each Service exposes one port, and says which.
    assert_eq!(service_ports("clerk-grpc-auth"), [(50051, "grpc".into())]);
    assert_eq!(
        service("clerk-grpc-auth-headless")["spec"]["clusterIP"].as_str(),
        Some("None")
    );
    assert_eq!(
        service_ports("clerk-grpc-auth-headless"),
        [(50051, "grpc".into())]
    );
    assert_eq!(
        service_ports("clerk-grpc-auth-webhooks"),
        [(8081, "webhooks".into())]
    );
    assert_eq!(
        service_ports("clerk-grpc-auth-metrics"),
        [(9090, "metrics".into())]
    );
    let metrics = &service("clerk-grpc-auth-metrics")["metadata"]["annotations"];
    assert_eq!(metrics["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(metrics["prometheus.io/port"].as_str(), Some("9090"));
    assert!(service("clerk-grpc-auth-webhooks")["metadata"]["annotations"].is_badvalue());
    // Every targetPort names a container port.
    for s in &services {
        for p in s["spec"]["ports"].as_vec().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert!(ports.iter().any(|(n, _)| n == target), "{target}");
        }
    }
    assert_eq!(
        one("deploy/kubernetes/pdb.yaml")["kind"].as_str(),
        Some("PodDisruptionBudget")
    );
    let hpa = one("deploy/kubernetes/hpa.yaml");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"].as_str(),
        d["metadata"]["name"].as_str()
    );
}

#[test]
fn istio_provider_points_at_the_service_and_fails_closed() {
    let mesh = one("deploy/istio/mesh-config.yaml");
    let p = &mesh["spec"]["meshConfig"]["extensionProviders"][0];
    let grpc = &p["envoyExtAuthzGrpc"];
    assert_eq!(grpc["port"].as_i64(), Some(50051));
    assert!(grpc["service"]
        .as_str()
        .unwrap()
        .starts_with("clerk-grpc-auth.clerk-auth.svc"));
    assert_eq!(grpc["failOpen"].as_bool(), Some(false));
    // Only fields Istio's gRPC provider has: header lists (HTTP provider fields) would be
    // refused, and a header allowlist would hide Origin / Sec-Fetch-* from Check.
    let Yaml::Hash(fields) = grpc else {
        panic!("envoyExtAuthzGrpc is not a mapping")
    };
    for (k, _) in fields {
        let k = k.as_str().unwrap();
        assert!(
            [
                "service",
                "port",
                "timeout",
                "failOpen",
                "clearRouteCache",
                "statusOnError",
                "includeRequestBodyInCheck"
            ]
            .contains(&k),
            "envoyExtAuthzGrpc has no field {k}"
        );
    }
    // The proxies read the path as clerk-grpc-auth does, and refuse what it would refuse.
    assert_eq!(
        mesh["spec"]["meshConfig"]["pathNormalization"]["normalization"].as_str(),
        Some("MERGE_SLASHES")
    );
    let filter = one("deploy/istio/envoy-filter.yaml");
    assert_eq!(filter["kind"].as_str(), Some("EnvoyFilter"));
    let patches = filter["spec"]["configPatches"].as_vec().unwrap();
    let contexts: Vec<&str> = patches
        .iter()
        .map(|p| p["match"]["context"].as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["SIDECAR_INBOUND", "GATEWAY"]);
    for p in patches {
        assert_eq!(
            p["match"]["listener"]["filterChain"]["filter"]["name"].as_str(),
            Some("envoy.filters.network.http_connection_manager")
        );
        assert_hardened_hcm(&p["patch"]["value"]["typed_config"]);
    }
    let policy = one("deploy/istio/authorization-policy.yaml");
    assert_eq!(policy["spec"]["action"].as_str(), Some("CUSTOM"));
    assert_eq!(
        policy["spec"]["provider"]["name"].as_str(),
        p["name"].as_str()
    );
}

/// The HTTP connection manager settings that make Envoy read a request as clerk-grpc-auth's
/// canonicalisation does (src/canonical.rs) and refuse underscore spellings of its headers.
fn assert_hardened_hcm(hcm: &Yaml) {
    assert_eq!(hcm["normalize_path"].as_bool(), Some(true));
    assert_eq!(hcm["merge_slashes"].as_bool(), Some(true));
    assert_eq!(
        hcm["path_with_escaped_slashes_action"].as_str(),
        Some("REJECT_REQUEST")
    );
    assert_eq!(hcm["strip_any_host_port"].as_bool(), Some(true));
    assert_eq!(hcm["strip_trailing_host_dot"].as_bool(), Some(true));
    assert_eq!(
        hcm["common_http_protocol_options"]["headers_with_underscores_action"].as_str(),
        Some("REJECT_REQUEST")
    );
}

#[test]
fn envoy_ext_authz_filter_is_fail_closed_and_targets_the_grpc_port() {
    let envoy = one("deploy/envoy/envoy.yaml");
    let listener = &envoy["static_resources"]["listeners"][0];
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    assert_hardened_hcm(hcm);
    let filters = hcm["http_filters"].as_vec().unwrap();
    let ext = filters
        .iter()
        .find(|f| f["name"].as_str() == Some("envoy.filters.http.ext_authz"))
        .expect("ext_authz filter");
    assert_eq!(
        filters.last().unwrap()["name"].as_str(),
        Some("envoy.filters.http.router"),
        "the router comes last"
    );
    let cfg = &ext["typed_config"];
    assert_eq!(cfg["failure_mode_allow"].as_bool(), Some(false));
    assert_eq!(cfg["transport_api_version"].as_str(), Some("V3"));
    let cluster_name = cfg["grpc_service"]["envoy_grpc"]["cluster_name"]
        .as_str()
        .unwrap();
    let cluster = envoy["static_resources"]["clusters"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some(cluster_name))
        .expect("the ext_authz cluster is defined");
    let addr = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ["address"]["socket_address"];
    assert_eq!(addr["port_value"].as_i64(), Some(50051));
    assert!(
        !cluster["typed_extension_protocol_options"].is_badvalue(),
        "the ext_authz cluster speaks HTTP/2"
    );
}

#[test]
fn dockerfile_is_multi_stage_and_non_root() {
    let text =
        std::fs::read_to_string(format!("{}/Dockerfile", env!("CARGO_MANIFEST_DIR"))).unwrap();
    assert_eq!(
        text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")),
        2
    );
    assert!(text.contains("USER nonroot"));
    assert!(text.contains("CLERK_AUTH_LISTEN=0.0.0.0:50051"));
    assert!(text.contains("CLERK_AUTH_HTTP_LISTEN=0.0.0.0:8081"));
    assert!(text.contains("CLERK_AUTH_METRICS_LISTEN=0.0.0.0:9090"));
    assert!(text.contains("EXPOSE 50051 8081 9090"));
    assert!(text.contains("CMD [\"serve\"]"));
}

/// The Traefik middleware (not run here: no Traefik package is reachable) asks `/auth`, lets
/// Traefik set the `X-Forwarded-*` headers itself, sends every client header to AuthService
/// (no `authRequestHeaders`) and copies exactly the five identity headers upstream.
#[test]
fn the_traefik_middleware_fails_closed_and_copies_the_identity_headers() {
    let d = one("deploy/traefik/clerk-auth.yml");
    let fa = &d["http"]["middlewares"]["clerk-auth"]["forwardAuth"];
    let address = fa["address"].as_str().unwrap();
    assert!(address.ends_with("/auth"), "{address}");
    assert_eq!(fa["trustForwardHeader"].as_bool(), Some(false));
    assert!(fa["authRequestHeaders"].is_badvalue());
    let copied: Vec<String> = fa["authResponseHeaders"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_ascii_lowercase())
        .collect();
    assert_eq!(
        copied,
        clerk_grpc_auth::server::ext_authz::IDENTITY_HEADERS.map(String::from)
    );
    assert_eq!(
        d["http"]["routers"]["api"]["middlewares"][0].as_str(),
        Some("clerk-auth")
    );
}
