//! HTTP forward auth on the HTTP port (`/auth`, any method): what nginx `auth_request`,
//! ingress-nginx `auth-url`, Traefik `ForwardAuth` and Caddy `forward_auth` ask before they
//! let a request through — decided by exactly what decides Envoy's `Check`
//! (`ExtAuthz::judge`: the same route policy, canonical forms, token sources and audit).
//!
//! The original request is read from the headers the proxy sets, and only those
//! ([`ForwardedHeaders`], configuration): each must be there exactly once, or the request is
//! refused. The endpoint's own path and query are never read (Caddy appends the client's query
//! to it). A request that carries any spelling of an identity header (`X-Clerk-User-Id`,
//! `x_clerk_user_id`, …) is refused: the proxy passes the client's headers through, and some
//! proxies pass such headers on to the upstream too.
//!
//! Answers:
//! - **200**, with all five identity headers (`X-Clerk-User-Id`, `-Session-Id`, `-Org-Id`,
//!   `-Org-Role`, `-Org-Permissions`), empty when the identity has none, for the proxy to copy
//!   upstream (an empty value makes nginx remove the header; an absent one would leave some
//!   Caddy versions sending a placeholder);
//! - **401** with `WWW-Authenticate: Bearer` (`error="invalid_token"` for a bad token);
//! - **403** for the policy;
//! - **400** (a target that cannot be read one way only), **429** (rate limited), **503**
//!   (cannot decide): refusals everywhere — nginx turns anything but 2xx/401/403 into a 500,
//!   Traefik and Caddy pass the answer on. Never an allow.
//!
//! Bodies are terse JSON (`{"error": REASON}`): Traefik and Caddy show them to the client.

use axum::{
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use tonic::Code;

use crate::{
    error::AuthError,
    server::ext_authz::{ExtAuthz, Headers, IDENTITY_HEADERS},
    token::identity::Identity,
};

/// The path of the endpoint on the HTTP port.
pub const FORWARD_AUTH_PATH: &str = "/auth";

/// Which headers carry the original request: the ones the proxy in front sets itself (and so
/// overwrites when a client sends them). Configuration: `CLERK_AUTH_FORWARD_AUTH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedHeaders {
    /// nginx `auth_request`, configured as the README shows: `X-Original-Method`,
    /// `X-Original-Host` and `X-Original-URI` (`$request_method`, `$host`, `$request_uri`).
    /// nginx passes every client `X-Forwarded-*` header through, so none is read.
    Nginx,
    /// ingress-nginx `auth-url`: `X-Original-Method`, `X-Original-URL`
    /// (`$scheme://$http_host$request_uri`) for the target, and `X-Original-Host` (`$host`,
    /// set through the `auth-proxy-set-headers` ConfigMap) for the host. The URL's host is the
    /// client's `Host` header, not the host nginx routed by (an absolute-form request line
    /// wins there), so it must name the same host or the request is refused.
    IngressNginx,
    /// Traefik `ForwardAuth` and Caddy `forward_auth`, which set `X-Forwarded-Method`,
    /// `X-Forwarded-Host` and `X-Forwarded-Uri` themselves.
    Forwarded,
}

impl ForwardedHeaders {
    /// The names `CLERK_AUTH_FORWARD_AUTH` takes.
    pub const NAMES: [&'static str; 3] = ["nginx", "ingress-nginx", "forwarded"];

    /// `nginx`, `ingress-nginx` or `forwarded`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "nginx" => Some(Self::Nginx),
            "ingress-nginx" => Some(Self::IngressNginx),
            "forwarded" => Some(Self::Forwarded),
            _ => None,
        }
    }

    /// The client's address as the proxy saw it, for the per-source budget: `X-Real-IP`
    /// behind nginx (the README's snippet sets it, replacing the client's copy), the last
    /// `X-Forwarded-For` entry behind Traefik and Caddy (which add the address they saw).
    /// Absent or unreadable: no per-source account (the overall budget still applies). It
    /// never affects a decision, only whose budget a cache miss spends.
    fn client_ip(self, headers: &HeaderMap) -> Option<std::net::IpAddr> {
        let value = match self {
            Self::Nginx | Self::IngressNginx => headers.get("x-real-ip")?,
            Self::Forwarded => headers.get_all("x-forwarded-for").iter().next_back()?,
        };
        let last = value.to_str().ok()?.rsplit(',').next()?.trim();
        last.parse().ok()
    }

    /// The original request's host, path (with its query) and method.
    fn read(self, headers: &HeaderMap) -> Result<(&str, &str, &str), AuthError> {
        match self {
            Self::Nginx => Ok((
                one(headers, "x-original-host")?,
                one(headers, "x-original-uri")?,
                one(headers, "x-original-method")?,
            )),
            Self::IngressNginx => {
                let (url_host, target) = split_url(one(headers, "x-original-url")?)?;
                let host = one(headers, "x-original-host")?;
                let same = matches!(
                    (crate::canonical::host(url_host), crate::canonical::host(host)),
                    (Ok(a), Ok(b)) if a == b
                );
                if !same {
                    return Err(AuthError::InvalidRequest(
                        "X-Original-URL names another host than X-Original-Host",
                    ));
                }
                Ok((host, target, one(headers, "x-original-method")?))
            }
            Self::Forwarded => Ok((
                one(headers, "x-forwarded-host")?,
                one(headers, "x-forwarded-uri")?,
                one(headers, "x-forwarded-method")?,
            )),
        }
    }
}

/// The endpoint's settings.
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    /// Which headers carry the original request.
    pub headers: ForwardedHeaders,
}

/// The one value of `name`; missing, repeated or not visible ASCII is refused.
fn one<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, AuthError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v
            .to_str()
            .map_err(|_| AuthError::InvalidRequest("a forwarded request header is not ASCII")),
        (None, _) => Err(AuthError::InvalidRequest(
            "a header naming the original request is missing",
        )),
        (Some(_), Some(_)) => Err(AuthError::InvalidRequest(
            "a header naming the original request is repeated",
        )),
    }
}

/// `scheme://authority/path?query` → (authority, `/path?query`), without normalising
/// anything (the path is canonicalised, or refused, by the route policy).
fn split_url(url: &str) -> Result<(&str, &str), AuthError> {
    let bad = || AuthError::InvalidRequest("X-Original-URL is not an absolute http(s) URL");
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') || !target.starts_with('/') {
        return Err(bad());
    }
    Ok((authority, target))
}

/// Whether `name` (lower case) is a spelling of an identity header: `x`, `clerk`, … joined by
/// `-` or `_` in any mix.
fn is_identity_spelling(name: &str) -> bool {
    let canonical = name.replace('_', "-");
    IDENTITY_HEADERS.contains(&canonical.as_str())
}

/// The router for the HTTP port.
pub(crate) fn router(ext_authz: ExtAuthz, config: ForwardAuthConfig) -> Router {
    Router::new()
        .route(FORWARD_AUTH_PATH, axum::routing::any(check))
        .with_state((ext_authz, config))
}

async fn check(
    State((ext_authz, config)): State<(ExtAuthz, ForwardAuthConfig)>,
    headers: HeaderMap,
) -> Response {
    let decided = async {
        if headers.keys().any(|n| is_identity_spelling(n.as_str())) {
            return Err(AuthError::InvalidRequest(
                "the request carries an identity header of its own",
            ));
        }
        let (host, target, method) = config.headers.read(&headers)?;
        // Lower-case names, repeated headers joined as Envoy joins them (a second
        // `authorization` makes the credential unreadable, never "the last one wins").
        // As `Check` reads Envoy's raw values: bytes that are not UTF-8 are replaced (an app
        // cookie with an `é` does not refuse the request; a credential with them is refused
        // by the token's own checks).
        let values: Vec<(&str, std::borrow::Cow<'_, str>)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes())))
            .collect();
        let mut joined = Headers::joined(values.iter().map(|(k, v)| (*k, &**v)));
        if config.headers == ForwardedHeaders::IngressNginx {
            // Set by ingress-nginx itself (replacing any client copy): read above as the
            // target, not a client's attempt to name another one.
            joined.remove("x-original-url");
        }
        let client_ip = config.headers.client_ip(&headers);
        ext_authz
            .judge("ForwardAuth", host, target, method, &joined, client_ip)
            .await
    }
    .await;
    match decided {
        Ok(identity) => allowed(identity.as_deref()),
        Err(e) => denied(&e),
    }
}

fn allowed(identity: Option<&Identity>) -> Response {
    match identity_headers(identity) {
        Some(headers) => {
            let mut response = StatusCode::OK.into_response();
            response.headers_mut().extend(headers);
            response
        }
        // An identity value that cannot travel as a header: refused, never an allow
        // without it.
        None => denied(&AuthError::InvalidRequest(
            "the identity cannot be sent in headers",
        )),
    }
}

/// The five identity headers, empty where the identity has no value; `None` when a value
/// cannot be a header value.
fn identity_headers(identity: Option<&Identity>) -> Option<HeaderMap> {
    let org = identity.and_then(|i| i.organization.as_ref());
    let values = [
        identity.map(|i| i.user_id.clone()),
        identity.and_then(|i| i.session_id.clone()),
        org.map(|o| o.id.clone()),
        org.and_then(|o| o.role.clone()),
        org.map(|o| o.permissions.join(",")),
    ];
    let mut headers = HeaderMap::new();
    for (name, value) in IDENTITY_HEADERS.iter().zip(values) {
        let value = match value {
            Some(v) => HeaderValue::from_str(&v).ok()?,
            None => HeaderValue::from_static(""),
        };
        headers.insert(HeaderName::from_static(name), value);
    }
    Some(headers)
}

fn denied(err: &AuthError) -> Response {
    let code = err.code();
    let reason = err.reason_str();
    let status = match code {
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": reason }).to_string(),
    )
        .into_response();
    if code == Code::Unauthenticated {
        let challenge = if reason == "TOKEN_MISSING" {
            "Bearer"
        } else {
            "Bearer error=\"invalid_token\""
        };
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_spellings_are_recognised_in_any_mix() {
        for name in [
            "x-clerk-user-id",
            "x_clerk_user_id",
            "x-clerk_user-id",
            "x_clerk-org-permissions",
        ] {
            assert!(is_identity_spelling(name), "{name}");
        }
        for name in ["x-clerk-user", "x-clerk-user-id-2", "authorization"] {
            assert!(!is_identity_spelling(name), "{name}");
        }
    }

    #[test]
    fn client_addresses_are_the_ones_the_proxy_added() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        let fwd = ForwardedHeaders::Forwarded;
        assert_eq!(
            fwd.client_ip(&h(&[("x-forwarded-for", "203.0.113.9, 198.51.100.7")])),
            ip("198.51.100.7")
        );
        assert_eq!(
            fwd.client_ip(&h(&[
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-for", "2001:db8::1")
            ])),
            ip("2001:db8::1")
        );
        assert_eq!(
            ForwardedHeaders::Nginx.client_ip(&h(&[
                ("x-real-ip", "192.0.2.4"),
                ("x-forwarded-for", "203.0.113.9")
            ])),
            ip("192.0.2.4")
        );
        for bad in ["", "not-an-ip", "192.0.2.4:80", "192.0.2.4, "] {
            assert_eq!(
                fwd.client_ip(&h(&[("x-forwarded-for", bad)])),
                None,
                "{bad}"
            );
        }
        assert_eq!(ForwardedHeaders::Nginx.client_ip(&h(&[])), None);
    }

    #[test]
    fn original_urls_split_without_normalising() {
        assert_eq!(
            split_url("https://a.example/orders/../admin?x=1").unwrap(),
            ("a.example", "/orders/../admin?x=1")
        );
        assert_eq!(
            split_url("http://a.example:8080/").unwrap(),
            ("a.example:8080", "/")
        );
        for bad in [
            "a.example/x",
            "ftp://a.example/x",
            "https:///x",
            "https://user@a.example/x",
            "https://a.example",
            "https://a.example?x=1",
        ] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }
}
