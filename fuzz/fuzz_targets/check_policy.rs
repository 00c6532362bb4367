//! `Check` request handling's pure parts: route-policy files and route matching on arbitrary
//! hosts, paths and methods.
#![no_main]

use clerk_grpc_auth::server::ext_authz::RoutePolicy;
use libfuzzer_sys::fuzz_target;

const ROUTES: &str = r#"
[[routes]]
path_prefix = "/public"
access = "public"
[[routes]]
host = "admin.example.com"
path_prefix = "/orders"
methods = ["DELETE"]
require = [{ permission = "org:orders:delete" }]
"#;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Arbitrary policy files: an error, never a panic.
    let _ = RoutePolicy::from_toml(s, "fuzz");
    let policy = RoutePolicy::from_toml(ROUTES, "routes").expect("routes");
    let mut parts = s.splitn(3, ' ');
    let (method, host, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let _ = policy.rule_for(host, path, method);
});
