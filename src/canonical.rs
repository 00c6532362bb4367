//! Canonical forms of what a caller shapes in a request — path, host, HTTP method, gRPC method
//! path — so that a rule is never chosen on a spelling that some upstream reads differently.
//!
//! Envoy's `normalize_path` and `merge_slashes` are off by default, and upstreams differ: some
//! decode escapes, merge slashes, resolve `..`, strip `;` parameters, treat `\` as `/` or fold
//! case. A route policy that matched the raw `:path` could be escaped by `/Admin`, `//admin`,
//! `/x/../admin`, `/%61dmin` or `/admin;x`. The rules below make the route chosen the one any
//! upstream could read the request as, or refuse the request.
//!
//! # Paths ([`path`])
//!
//! Refused with `PATH_NOT_CANONICAL` (HTTP 400 from `Check`):
//!
//! * a path not starting with `/` (`*`, the absolute form `http://h/admin`, empty), or longer
//!   than [`MAX_PATH`] (8 KiB) before its query;
//! * a raw `\` (some upstreams read it as `/`), `;` (path parameters, stripped by Tomcat, Jetty,
//!   Spring…), `#` (a fragment is never sent by a conforming client; an upstream keeping it in
//!   the path could resolve `/public#/../admin` to `/admin`), a space, a NUL or any control byte
//!   (0x00–0x1F, DEL);
//! * any byte outside ASCII, raw or percent-encoded (`%c0%ae`, `%ef%bc%8f`): upstreams that
//!   normalise Unicode (NFKC, "best fit") read fullwidth `／` as `/` and `．` as `.`, and
//!   over-long UTF-8 as ASCII, so keeping them encoded could select a looser rule;
//! * a malformed escape (`%`, `%4`, `%zz`);
//! * an escape of `/` or `\` (`%2F`, `%5C`, any case), of `;`, `?` or `#` (an upstream that
//!   decodes and parses again reads them as delimiters), of a control byte (`%00`, `%0a`, `%7f`),
//!   or anything left looking like an escape once every escape is decoded (`%252e`,
//!   `%25%36%31`: double decoding);
//! * dot segments that climb above the root (`/../admin`, `/%2e%2e/admin`): no legitimate
//!   client sends them, and a file-serving upstream could leave its root;
//! * a path whose **readings** select different rules (see below), including the readings of
//!   upstreams that trim segments: trailing dots and spaces dropped (Windows/IIS:
//!   `/admin./x`, `/admin%20/x`) and a last segment's extension dropped (Spring's suffix
//!   matching: `/admin.json` as `/admin`).
//!
//! The canonical path is then: the query (from the first `?`) dropped; escapes of unreserved
//! characters (`ALPHA DIGIT - . _ ~`, upper- or lower-case hex) decoded, so `%2e%2e` is `..`;
//! other escapes kept with upper-case hex (`%3a` → `%3A`); dot segments removed
//! (RFC 3986 §5.2.4); runs of `/` merged. The rule is chosen on it.
//!
//! **Readings.** An upstream may apply any part of that: decode or not, merge slashes or not,
//! remove dot segments or not (before or after merging), compare case-sensitively or not. The
//! route policy looks every such reading up, and a request for which two readings select
//! different rules is refused — `/admin/../public` (raw: `/admin`; canonical: `/public`),
//! `//admin` (raw: no `/admin` segment), `/%61dmin` (undecoded: no match) and `/Admin` (folded:
//! `/admin`) are refused when the rules differ, and pass when they agree (`/Public/x` with
//! both `/public` and the default public). Ordinary paths have one reading and pass.
//!
//! **Case.** By default, a path that selects a different rule when compared without regard to
//! case is refused (`/Admin/users` with `/admin` protected): a protected prefix is never
//! escaped by changing case, whatever the upstream does. Deployments whose upstreams are known
//! to be case-sensitive set `case_sensitive_paths = true` in the route policy; then only the
//! exact spelling is read.
//!
//! # Hosts ([`host`])
//!
//! From `http.host` (or `:authority`): lower-cased; one trailing dot removed
//! (`ops.example.com.`); a port removed when it is digits only and 1–65535; IPv6 literals
//! `[…]` parsed and written in their canonical form (`[::0001]` → `[::1]`). Refused with
//! `HOST_INVALID`: a non-numeric, empty, zero or too large port (`:abc`, `:`, `:0`, `:65536`),
//! userinfo (`a@host`), `%`, spaces, control bytes, any other character outside
//! `A-Z a-z 0-9 - _ .`, several colons outside brackets, an empty label (`a..b`, `.`), a label
//! over 63 or a name over 253 characters, a malformed IPv6 literal or zone. An empty host is
//! kept empty and matches only routes without a host. Route hosts are canonicalised the same
//! way when the policy is loaded (and refused there when invalid).
//!
//! # Origins ([`origin`])
//!
//! A browser's `Origin` header (and an authorized party compared with one) in the form
//! `scheme://host[:port]`: the scheme `http` or `https` (any case, written lower-case); the
//! host canonicalised as above (lower-cased, one trailing dot removed, IPv6 literals in
//! canonical form), never empty; the port digits only, 1–65535, written without leading zeros
//! and removed when it is the scheme's default (`:80` for `http`, `:443` for `https`). Refused
//! with `ORIGIN_INVALID`: `null` (sandboxed frames, `file:` pages, some redirects: no origin
//! to trust), any other scheme, a missing `//`, userinfo (`user@host`), a path — even `/` —, a
//! query or a fragment, whitespace or a control byte anywhere, any byte outside ASCII (an
//! internationalised name must come as its `xn--` form, as browsers send it), `%`, and
//! everything the host rules refuse. Several `Origin` headers on one request are refused by
//! the caller (the layer), never merged or picked from.
//!
//! # HTTP methods ([`method`])
//!
//! A method must be an RFC 9110 token (`!#$%&'*+-.^_`|~`, digits, letters; at most 32 bytes):
//! ` DELETE`, `DE LETE` or an empty method are refused with `METHOD_INVALID`. Route methods are
//! upper case; a request whose method selects a different rule once upper-cased (`delete`
//! with `DELETE` protected) is refused with `METHOD_INVALID` — some frameworks fold methods.
//!
//! # gRPC method paths ([`is_grpc_method_path`])
//!
//! The layer's per-method policy looks a rule up only for a path that is exactly
//! `/pkg.Service/Method`: a leading `/`, exactly two non-empty segments of `[A-Za-z0-9_.]`.
//! Anything else (`pkg.Service/Method` without its slash — grpc-go's CVE-2026-33186 —,
//! `//pkg.Service/Method`, a trailing `/`) is refused with `INVALID_ARGUMENT` /
//! `PATH_NOT_CANONICAL` before the policy is consulted.

use crate::error::{AuthError, Reason};

/// The longest HTTP method accepted.
const MAX_METHOD: usize = 32;

/// A request path in canonical form, with every reading of it an upstream could make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    canonical: String,
    readings: Vec<String>,
}

// === impl CanonicalPath ===

impl CanonicalPath {
    /// The canonical path (query dropped, unreserved escapes decoded, dot segments removed,
    /// slashes merged).
    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    /// Every distinct reading of the path (the canonical one first): with and without
    /// decoding, slash merging and dot removal. Case folding is the matcher's business.
    pub fn readings(&self) -> &[String] {
        &self.readings
    }
}

fn refuse<T>(reason: Reason, message: &'static str) -> Result<T, AuthError> {
    Err(AuthError::NotCanonical { reason, message })
}

fn bad_path<T>(message: &'static str) -> Result<T, AuthError> {
    refuse(Reason::PathNotCanonical, message)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Longest path (before the query) [`path`] reads, in bytes: nginx's default request-line
/// buffer is 8 KiB; each reading of a longer one costs work a client chose.
pub const MAX_PATH: usize = 8192;

/// Canonicalises a request path (`:path`, with its query), or refuses it (see the module docs).
pub fn path(raw: &str) -> Result<CanonicalPath, AuthError> {
    if !raw.starts_with('/') {
        return bad_path("the path does not start with /");
    }
    let target = raw.split('?').next().unwrap_or_default();
    if target.len() > MAX_PATH {
        return bad_path("the path is longer than 8 KiB");
    }
    let bytes = target.as_bytes();
    // The common case, a path already in canonical form (no escape, no `//`, no dot
    // segment): every reading but the trimmed ones is the path itself. Refused bytes are
    // refused here as below, in the same order and with the same messages.
    if !target.contains('%') {
        for &b in bytes {
            if let Some(refusal) = refused_byte(b) {
                return bad_path(refusal);
            }
        }
        if !target.contains("//") && !target.split('/').any(|s| s == "." || s == "..") {
            let canonical = target.to_owned();
            let mut readings = vec![canonical.clone()];
            trimmed_readings(&canonical, |s| {
                if !readings.contains(&s) {
                    readings.push(s);
                }
            });
            return Ok(CanonicalPath {
                canonical,
                readings,
            });
        }
    }
    path_in_full(target)
}

/// Why `b`, unescaped in a path, refuses it.
fn refused_byte(b: u8) -> Option<&'static str> {
    match b {
        0x80..=0xff => Some("the path holds a non-ASCII byte"),
        0x00..=0x1f | 0x7f => Some("the path holds a control byte"),
        b' ' => Some("the path holds a space"),
        b'\\' => Some("the path holds a backslash"),
        b';' => Some("the path holds a ; (path parameters)"),
        b'#' => Some("the path holds a fragment"),
        _ => None,
    }
}

/// [`path`] for any target (`raw` without its query, at most [`MAX_PATH`] bytes): every
/// reading computed.
fn path_in_full(target: &str) -> Result<CanonicalPath, AuthError> {
    let bytes = target.as_bytes();
    let mut decoded = String::with_capacity(target.len());
    // Every escape decoded once (what an upstream that decodes everything reads): an escape
    // left in it means the path was encoded twice (`%25%36%31` → `%61` → `a`).
    let mut once = Vec::with_capacity(target.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(refusal) = refused_byte(b) {
            return bad_path(refusal);
        }
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return bad_path("the path holds a malformed % escape");
                };
                let v = h * 16 + l;
                once.push(v);
                match v {
                    0x80..=0xff => return bad_path("the path holds an encoded non-ASCII byte"),
                    0x00..=0x1f | 0x7f => {
                        return bad_path("the path holds an encoded control byte")
                    }
                    b'/' | b'\\' => return bad_path("the path holds an encoded / or \\"),
                    b';' | b'?' | b'#' => return bad_path("the path holds an encoded ;, ? or #"),
                    b'%' if bytes.get(i + 3).copied().and_then(hex).is_some()
                        && bytes.get(i + 4).copied().and_then(hex).is_some() =>
                    {
                        return bad_path("the path is encoded twice (%25 starting an escape)")
                    }
                    v if is_unreserved(v) => decoded.push(char::from(v)),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        decoded.push('%');
                        decoded.push(char::from(HEX[usize::from(v >> 4)]));
                        decoded.push(char::from(HEX[usize::from(v & 15)]));
                    }
                }
                i += 3;
                continue;
            }
            b => {
                once.push(b);
                decoded.push(char::from(b));
            }
        }
        i += 1;
    }
    if once
        .windows(3)
        .any(|w| w[0] == b'%' && hex(w[1]).is_some() && hex(w[2]).is_some())
    {
        return bad_path("the path is encoded twice (an escape left after one decoding)");
    }
    let mut readings: Vec<String> = Vec::with_capacity(10);
    let mut add = |s: String| {
        if !readings.contains(&s) {
            readings.push(s);
        }
    };
    let Some(dotless) = remove_dot_segments(&decoded) else {
        return bad_path("the path climbs above the root");
    };
    let canonical = merge_slashes(&dotless);
    add(canonical.clone());
    // Without escapes the raw target is the decoded one: its readings are the same.
    let bases: &[&str] = if decoded == target {
        &[decoded.as_str()]
    } else {
        &[decoded.as_str(), target]
    };
    for &base in bases {
        let merged = merge_slashes(base);
        let (Some(dots), Some(merged_dots)) =
            (remove_dot_segments(base), remove_dot_segments(&merged))
        else {
            return bad_path("the path climbs above the root");
        };
        add(merge_slashes(&dots));
        add(merged_dots);
        add(dots);
        add(merged);
        add(base.to_owned());
    }
    trimmed_readings(&canonical, add);
    Ok(CanonicalPath {
        canonical,
        readings,
    })
}

/// The readings of upstreams that trim segments of `canonical`: Windows/IIS drop trailing
/// dots and spaces (`/admin./x`, `/admin%20/x`), Spring's suffix matching reads
/// `/admin.json` as `/admin`. Each goes to `add` (which drops those already read).
fn trimmed_readings(canonical: &str, mut add: impl FnMut(String)) {
    // Both trim only at a `.` or a `%20`: a path holding neither reads the same.
    if !canonical.contains('.') && !canonical.contains("%20") {
        return;
    }
    let trimmed: Vec<&str> = canonical
        .split('/')
        .map(|seg| {
            let mut t = seg;
            loop {
                let next = t.trim_end_matches('.');
                let next = next.strip_suffix("%20").unwrap_or(next);
                if next == t {
                    break;
                }
                t = next;
            }
            if t.is_empty() {
                seg
            } else {
                t
            }
        })
        .collect();
    add(trimmed.join("/"));
    if let Some((dir, last)) = canonical.rsplit_once('/') {
        if let Some((stem, _ext)) = last.rsplit_once('.') {
            if !stem.is_empty() && !stem.ends_with('.') {
                add(format!("{dir}/{stem}"));
            }
        }
    }
}

/// RFC 3986 §5.2.4 on an absolute path; `None` when a `..` climbs above the root.
fn remove_dot_segments(p: &str) -> Option<String> {
    let segments: Vec<&str> = p.strip_prefix('/').unwrap_or(p).split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, s) in segments.into_iter().enumerate() {
        match s {
            "." => {}
            ".." => {
                out.pop()?;
            }
            s => {
                out.push(s);
                continue;
            }
        }
        if i == last {
            out.push("");
        }
    }
    Some(format!("/{}", out.join("/")))
}

fn merge_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// Canonicalises a host (`http.host` / `:authority`), or refuses it with `HOST_INVALID` (see
/// the module docs). An empty host stays empty.
pub fn host(raw: &str) -> Result<String, AuthError> {
    let bad = |m| refuse(Reason::HostInvalid, m);
    if raw.is_empty() {
        return Ok(String::new());
    }
    if raw.len() > 300 {
        return bad("the host is too long");
    }
    let (name, port) = if let Some(rest) = raw.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return bad("the IPv6 literal has no ]");
        };
        let Ok(addr) = inner.parse::<std::net::Ipv6Addr>() else {
            return bad("the IPv6 literal is malformed");
        };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return bad("the IPv6 literal is followed by something else than a port"),
            },
        };
        (format!("[{addr}]"), port)
    } else {
        let (name, port) = match raw.split_once(':') {
            Some((_, p)) if p.contains(':') => return bad("the host holds several colons"),
            Some((n, p)) => (n, Some(p)),
            None => (raw, None),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return bad("the host name is empty");
        }
        if name.len() > 253 {
            return bad("the host name is too long");
        }
        for label in name.split('.') {
            if label.is_empty() {
                return bad("the host name has an empty label");
            }
            if label.len() > 63 {
                return bad("a host name label is too long");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad("the host name holds a character outside A-Z a-z 0-9 - _ .");
            }
        }
        (name.to_ascii_lowercase(), port)
    };
    if let Some(port) = port {
        let numeric =
            !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !numeric || !matches!(port.parse::<u32>(), Ok(1..=65535)) {
            return bad("the port is not a number from 1 to 65535");
        }
    }
    Ok(name)
}

/// The longest `Origin` accepted (a host name of 253 bytes, a scheme and a port).
const MAX_ORIGIN: usize = 300;

/// Canonicalises an `Origin` (or an authorized party) to `scheme://host[:port]`, or refuses
/// it with `ORIGIN_INVALID` (see [the module docs](self#origins-origin)). Takes bytes: a
/// header value may hold anything.
pub fn origin(raw: &[u8]) -> Result<String, AuthError> {
    let bad = |m| refuse(Reason::OriginInvalid, m);
    if raw.is_empty() {
        return bad("the Origin is empty");
    }
    if raw.len() > MAX_ORIGIN {
        return bad("the Origin is too long");
    }
    if !raw.iter().all(|b| b.is_ascii_graphic()) {
        return bad("the Origin holds whitespace, a control byte or a byte outside ASCII");
    }
    // ASCII graphic only: a valid &str.
    let raw = std::str::from_utf8(raw).map_err(|_| AuthError::NotCanonical {
        reason: Reason::OriginInvalid,
        message: "the Origin is not ASCII",
    })?;
    if raw.eq_ignore_ascii_case("null") {
        return bad("the Origin is null (an opaque origin cannot be authorized)");
    }
    let Some((scheme, authority)) = raw.split_once("://") else {
        return bad("the Origin is not scheme://host[:port]");
    };
    let (scheme, default_port) = if scheme.eq_ignore_ascii_case("https") {
        ("https", 443)
    } else if scheme.eq_ignore_ascii_case("http") {
        ("http", 80)
    } else {
        return bad("the Origin's scheme is not http or https");
    };
    if authority.bytes().any(|b| matches!(b, b'/' | b'?' | b'#')) {
        return bad("the Origin holds a path, a query or a fragment");
    }
    if authority.contains('@') {
        return bad("the Origin holds userinfo");
    }
    // The port: after the IPv6 literal's `]`, or after the one colon of a name.
    let (host_part, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((_, "")) => (authority, None),
            Some((inner, after)) => match after.strip_prefix(':') {
                Some(p) => (&authority[..inner.len() + 2], Some(p)),
                None => return bad("the Origin's IPv6 literal is followed by something else"),
            },
            None => return bad("the Origin's IPv6 literal has no ]"),
        },
        None => match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => return bad("the Origin holds several colons"),
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let host = host(host_part).map_err(|e| match e {
        AuthError::NotCanonical { message, .. } => AuthError::NotCanonical {
            reason: Reason::OriginInvalid,
            message,
        },
        other => other,
    })?;
    if host.is_empty() {
        return bad("the Origin's host is empty");
    }
    let port = match port {
        None => None,
        Some(p) => {
            let numeric = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
            match p.parse::<u32>() {
                Ok(n @ 1..=65535) if numeric => Some(n),
                _ => return bad("the Origin's port is not a number from 1 to 65535"),
            }
        }
    };
    Ok(match port {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Checks an HTTP method is an RFC 9110 token (as sent; see [`method_upper`]), or refuses it
/// with `METHOD_INVALID`.
pub fn method(raw: &str) -> Result<&str, AuthError> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if raw.is_empty() || raw.len() > MAX_METHOD || !raw.bytes().all(tchar) {
        return refuse(Reason::MethodInvalid, "the HTTP method is not a token");
    }
    Ok(raw)
}

/// The upper-case reading of a method (route methods are stored upper case).
pub fn method_upper(method: &str) -> std::borrow::Cow<'_, str> {
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        std::borrow::Cow::Owned(method.to_ascii_uppercase())
    } else {
        std::borrow::Cow::Borrowed(method)
    }
}

/// Whether `name` is a gRPC package-qualified service or method name: non-empty, of
/// `[A-Za-z0-9_.]` only.
pub fn is_grpc_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Whether `path` is exactly `/pkg.Service/Method` (see the module docs).
pub fn is_grpc_method_path(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .is_some_and(|(s, m)| is_grpc_name(s) && is_grpc_name(m))
}

/// Refuses a gRPC request path that is not exactly `/pkg.Service/Method`.
pub fn grpc_method_path(path: &str) -> Result<&str, AuthError> {
    if is_grpc_method_path(path) {
        Ok(path)
    } else {
        bad_path("the :path is not /pkg.Service/Method")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(r: Result<impl std::fmt::Debug, AuthError>) -> &'static str {
        match r {
            Ok(v) => panic!("expected a refusal, got {v:?}"),
            Err(e) => e.reason_str(),
        }
    }

    /// Every hostile Origin shape: `Ok(canonical)` or refused (`ORIGIN_INVALID`).
    #[test]
    fn origins_table() {
        let cases: &[(&[u8], Option<&str>)] = &[
            // ordinary origins, as browsers send them
            (b"https://app.example.com", Some("https://app.example.com")),
            (b"http://127.0.0.1:5173", Some("http://127.0.0.1:5173")),
            (b"http://localhost:3000", Some("http://localhost:3000")),
            (b"http://[::1]:8080", Some("http://[::1]:8080")),
            (
                b"https://xn--bcher-kva.example",
                Some("https://xn--bcher-kva.example"),
            ),
            // case
            (b"HTTPS://App.Example.COM", Some("https://app.example.com")),
            (b"hTTp://LOCALHOST:3000", Some("http://localhost:3000")),
            // trailing dot
            (b"https://app.example.com.", Some("https://app.example.com")),
            (
                b"https://app.example.com.:8443",
                Some("https://app.example.com:8443"),
            ),
            (b"https://app.example.com..", None),
            // default ports, leading zeros
            (
                b"https://app.example.com:443",
                Some("https://app.example.com"),
            ),
            (b"http://app.example.com:80", Some("http://app.example.com")),
            (
                b"http://app.example.com:443",
                Some("http://app.example.com:443"),
            ),
            (
                b"https://app.example.com:80",
                Some("https://app.example.com:80"),
            ),
            (
                b"https://app.example.com:0443",
                Some("https://app.example.com"),
            ),
            (b"http://[0:0::1]:80", Some("http://[::1]")),
            (b"https://app.example.com:", None),
            (b"https://app.example.com:0", None),
            (b"https://app.example.com:65536", None),
            (b"https://app.example.com:+443", None),
            (b"https://app.example.com:443:443", None),
            (b"https://app.example.com:4a3", None),
            // userinfo
            (b"https://user@app.example.com", None),
            (b"https://user:pass@app.example.com", None),
            (b"https://app.example.com@evil.example", None),
            // path, query, fragment
            (b"https://app.example.com/", None),
            (b"https://app.example.com/path", None),
            (b"https://app.example.com?x=1", None),
            (b"https://app.example.com#x", None),
            (b"https://app.example.com:443/", None),
            // null and other opaque / foreign schemes
            (b"null", None),
            (b"NULL", None),
            (b"file://", None),
            (b"chrome-extension://abcdef", None),
            (b"ftp://app.example.com", None),
            (b"javascript://app.example.com", None),
            (b"app.example.com", None),
            (b"//app.example.com", None),
            (b"https:app.example.com", None),
            (b"https:/app.example.com", None),
            (b"https://", None),
            (b"", None),
            // several origins in one value (a proxy that joined repeated headers)
            (b"https://app.example.com,https://evil.example", None),
            (b"https://app.example.com https://evil.example", None),
            // non-ASCII: raw UTF-8, Latin-1, a fullwidth dot
            ("https://bücher.example".as_bytes(), None),
            (b"https://b\xfccher.example", None),
            ("https://app\u{ff0e}example.com".as_bytes(), None),
            (b"https://app.example.com\x80", None),
            // whitespace and control bytes
            (b" https://app.example.com", None),
            (b"https://app.example.com ", None),
            (b"https://app.example.com\t", None),
            (b"https://app .example.com", None),
            (b"https://app.example.com\r\nx: y", None),
            (b"https://app.example.com\x00", None),
            // percent-encoding, odd characters, malformed IPv6
            (b"https://app%2eexample.com", None),
            (b"https://app.example.com%00", None),
            (b"https://app..example.com", None),
            (b"https://[::1", None),
            (b"https://[::1]x", None),
            (b"https://[zz::1]", None),
            (b"https://a\\b.example", None),
            (b"https://*.example.com", None),
        ];
        for (raw, want) in cases {
            let got = origin(raw);
            match want {
                Some(w) => assert_eq!(got.unwrap(), *w, "{:?}", String::from_utf8_lossy(raw)),
                None => assert_eq!(
                    reason(got),
                    "ORIGIN_INVALID",
                    "{:?}",
                    String::from_utf8_lossy(raw)
                ),
            }
        }
        let long = format!("https://{}.example", "a".repeat(300));
        assert_eq!(reason(origin(long.as_bytes())), "ORIGIN_INVALID");
        // Canonical forms are fixed points.
        for (raw, want) in cases {
            if let Some(w) = want {
                assert_eq!(origin(w.as_bytes()).unwrap(), *w, "{raw:?}");
            }
        }
    }

    /// Every attacker shape: `Ok(canonical)` or the refusal's reason.
    #[test]
    fn paths_table() {
        use Result::{Err as No, Ok as Is};
        let cases: &[(&str, Result<&str, &str>)] = &[
            // ordinary paths
            ("/", Is("/")),
            ("/public/a-b_c.~d", Is("/public/a-b_c.~d")),
            ("/admin/users", Is("/admin/users")),
            ("/admin/", Is("/admin/")),
            ("/orders?page=2", Is("/orders")),
            ("/a:b@c!$&'()*+,=", Is("/a:b@c!$&'()*+,=")),
            // the issue's escapes
            ("/Admin/users", Is("/Admin/users")), // the matcher folds case
            ("//admin/users", Is("/admin/users")),
            ("/x/../admin/users", Is("/admin/users")),
            ("/%61dmin/users", Is("/admin/users")),
            ("/admin;x/users", No("PATH_NOT_CANONICAL")),
            ("/admin%2Fusers", No("PATH_NOT_CANONICAL")),
            // double encoding hidden in escaped hex digits (security review)
            ("/%25%361dmin/users", No("PATH_NOT_CANONICAL")),
            ("/%256%31dmin/users", No("PATH_NOT_CANONICAL")),
            ("/%25%36%31dmin", No("PATH_NOT_CANONICAL")),
            ("/100%25", Is("/100%25")),
            ("/100%25x", Is("/100%25x")),
            // more
            ("/admin/./users", Is("/admin/users")),
            ("/admin/.", Is("/admin/")),
            ("/admin/x/..", Is("/admin/")),
            ("/%2e%2e/admin", No("PATH_NOT_CANONICAL")),
            ("/../admin", No("PATH_NOT_CANONICAL")),
            ("/a/../../admin", No("PATH_NOT_CANONICAL")),
            ("/admin/%2E%2E/public", Is("/public")),
            ("/admin/%2e%2E/public", Is("/public")),
            ("/public/../admin", Is("/admin")),
            ("/admin%2fusers", No("PATH_NOT_CANONICAL")),
            ("/admin%5Cusers", No("PATH_NOT_CANONICAL")),
            ("/admin%5cusers", No("PATH_NOT_CANONICAL")),
            ("/admin\\users", No("PATH_NOT_CANONICAL")),
            ("/admin%00", No("PATH_NOT_CANONICAL")),
            ("/admin\0", No("PATH_NOT_CANONICAL")),
            ("/admin%", No("PATH_NOT_CANONICAL")),
            ("/admin%4", No("PATH_NOT_CANONICAL")),
            ("/admin%zz", No("PATH_NOT_CANONICAL")),
            ("/admin%4g", No("PATH_NOT_CANONICAL")),
            ("/ADMIN", Is("/ADMIN")),
            ("/admin?x=/public", Is("/admin")),
            ("/public?/../admin", Is("/public")),
            ("/admin#/public", No("PATH_NOT_CANONICAL")),
            ("/public#/../admin", No("PATH_NOT_CANONICAL")),
            ("/%c0%ae%c0%ae/admin", No("PATH_NOT_CANONICAL")),
            ("/%ef%bc%8fadmin", No("PATH_NOT_CANONICAL")),
            ("/admin\u{ff0f}x", No("PATH_NOT_CANONICAL")),
            ("/caf\u{e9}", No("PATH_NOT_CANONICAL")),
            ("/admin\t", No("PATH_NOT_CANONICAL")),
            ("/admin\n", No("PATH_NOT_CANONICAL")),
            ("/admin%0a", No("PATH_NOT_CANONICAL")),
            ("/admin%0D%0Ax", No("PATH_NOT_CANONICAL")),
            ("/admin\x7f", No("PATH_NOT_CANONICAL")),
            ("/admin%7F", No("PATH_NOT_CANONICAL")),
            ("/admin users", No("PATH_NOT_CANONICAL")),
            ("/admin%3bx", No("PATH_NOT_CANONICAL")),
            ("/admin%3Fx", No("PATH_NOT_CANONICAL")),
            ("/admin%23x", No("PATH_NOT_CANONICAL")),
            ("/%252e%252e/admin", No("PATH_NOT_CANONICAL")),
            ("/a%3ab", Is("/a%3Ab")),
            ("/a%20b", Is("/a%20b")),
            ("/%7Euser", Is("/~user")),
            ("admin/users", No("PATH_NOT_CANONICAL")),
            ("*", No("PATH_NOT_CANONICAL")),
            ("http://h/admin", No("PATH_NOT_CANONICAL")),
            ("", No("PATH_NOT_CANONICAL")),
            ("?/admin", No("PATH_NOT_CANONICAL")),
        ];
        for (raw, want) in cases {
            match (path(raw), want) {
                (Ok(p), Ok(c)) => assert_eq!(p.as_str(), *c, "{raw:?}"),
                (Err(e), Err(r)) => {
                    assert_eq!(e.reason_str(), *r, "{raw:?}");
                    assert_eq!(e.code(), tonic::Code::InvalidArgument);
                }
                (got, want) => panic!("{raw:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    const ROUTES: &str = r#"
        [default]
        access = "public"

        [[routes]]
        path_prefix = "/admin"
        require = [{ role = "admin" }]

        [[routes]]
        host = "ops.example.com"
        path_prefix = "/"
        require = [{ role = "ops" }]

        [[routes]]
        path_prefix = "/orders"
        methods = ["DELETE"]
        require = [{ permission = "org:orders:delete" }]
    "#;

    /// The rule a request gets through the route policy, by name, or the refusal's reason.
    fn which(
        p: &crate::server::ext_authz::RoutePolicy,
        method: &str,
        host: &str,
        path: &str,
    ) -> Result<&'static str, &'static str> {
        let rule = p.rule_for(host, path, method).map_err(|e| e.reason_str())?;
        let check = rule.require.first();
        Ok(
            match (
                check.and_then(|c| c.role.as_deref()),
                check.and_then(|c| c.permission.as_deref()),
            ) {
                (None, None) => "public",
                (Some("admin"), _) => "admin",
                (Some("ops"), _) => "ops",
                (_, Some(_)) => "delete",
                _ => unreachable!(),
            },
        )
    }

    /// Every escape from the issue and the others found, each → the rule it must get (with
    /// `default = public`, `/admin` for admins, host `ops.example.com` for ops, `DELETE
    /// /orders` with a permission) or the refusal.
    #[test]
    fn rules_table() {
        use Result::{Err as No, Ok as Is};
        const API: &str = "api.example.com";
        const PATH: &str = "PATH_NOT_CANONICAL";
        const HOST: &str = "HOST_INVALID";
        const METHOD: &str = "METHOD_INVALID";
        let p = crate::server::ext_authz::RoutePolicy::from_toml(ROUTES, "t").unwrap();
        let cases: &[(&str, &str, &str, Result<&str, &str>)] = &[
            // legitimate requests
            ("GET", API, "/", Is("public")),
            ("GET", API, "/public/a-b_c.~d", Is("public")),
            ("GET", API, "/public/%7Euser", Is("public")),
            ("GET", API, "/administrator", Is("public")),
            ("GET", API, "/admin", Is("admin")),
            ("GET", API, "/admin/", Is("admin")),
            ("GET", API, "/admin/users", Is("admin")),
            ("GET", API, "/admin/./users", Is("admin")),
            ("GET", API, "/admin/x/..", Is("admin")),
            ("GET", API, "/admin?x=/public", Is("admin")),
            ("GET", API, "/public?x=/../admin", Is("public")),
            ("get", API, "/public", Is("public")),
            // the issue's escapes
            ("GET", API, "/Admin/users", No(PATH)),
            ("GET", API, "//admin/users", No(PATH)),
            ("GET", API, "/x/../admin/users", No(PATH)),
            ("GET", API, "/%61dmin/users", No(PATH)),
            ("GET", API, "/admin;x/users", No(PATH)),
            ("GET", API, "/admin%2Fusers", No(PATH)),
            ("GET", "ops.example.com.", "/x", Is("ops")),
            ("GET", "ops.example.com:abc", "/x", No(HOST)),
            // more paths
            ("GET", API, "/%2e%2e/admin", No(PATH)),
            ("GET", API, "/admin%2fusers", No(PATH)),
            ("GET", API, "/admin%5Cusers", No(PATH)),
            ("GET", API, "/admin\\users", No(PATH)),
            ("GET", API, "/admin%00", No(PATH)),
            ("GET", API, "/admin%", No(PATH)),
            ("GET", API, "/admin%zz", No(PATH)),
            ("GET", API, "/ADMIN", No(PATH)),
            ("GET", API, "/aDmIn/users", No(PATH)),
            ("GET", API, "/%41dmin/users", No(PATH)),
            ("GET", API, "/admin/%2E%2E/public", No(PATH)),
            ("GET", API, "/admin/../public", No(PATH)),
            ("GET", API, "/public/../admin", No(PATH)),
            ("GET", API, "/public/%2e%2e/admin", No(PATH)),
            ("GET", API, "/public//../admin", No(PATH)),
            ("GET", API, "/admin#/public", No(PATH)),
            ("GET", API, "/%c0%ae%c0%ae/admin", No(PATH)),
            ("GET", API, "/admin\t", No(PATH)),
            ("GET", API, "/admin\n", No(PATH)),
            ("GET", API, "/%252e%252e/admin", No(PATH)),
            ("GET", API, "*", No(PATH)),
            ("GET", API, "http://api.example.com/admin", No(PATH)),
            ("GET", API, "admin/users", No(PATH)),
            // hosts
            ("GET", "OPS.Example.com", "/x", Is("ops")),
            ("GET", "ops.example.com:8443", "/x", Is("ops")),
            ("GET", "ops.example.com.:8443", "/admin", Is("admin")),
            ("GET", "ops.example.com", "/Admin", No(PATH)),
            ("GET", "ops.example.com:", "/x", No(HOST)),
            ("GET", "a@ops.example.com", "/x", No(HOST)),
            ("GET", "ops..example.com", "/x", No(HOST)),
            ("GET", "ops.example.com:80:80", "/x", No(HOST)),
            ("GET", "ops.example.com%00", "/x", No(HOST)),
            // methods
            ("DELETE", API, "/orders/1", Is("delete")),
            ("GET", API, "/orders/1", Is("public")),
            ("delete", API, "/orders/1", No(METHOD)),
            ("Delete", API, "/orders/1", No(METHOD)),
            (" DELETE", API, "/orders/1", No(METHOD)),
            ("DELETE ", API, "/orders/1", No(METHOD)),
            ("", API, "/orders/1", No(METHOD)),
            ("DELETE", API, "/Orders/1", No(PATH)),
        ];
        for (method, host, path, want) in cases {
            assert_eq!(
                which(&p, method, host, path),
                *want,
                "{method:?} {host:?} {path:?}"
            );
        }
        // Upstreams known to be case-sensitive: only the exact spelling is read.
        let p = crate::server::ext_authz::RoutePolicy::from_toml(
            &format!("case_sensitive_paths = true\n{ROUTES}"),
            "t",
        )
        .unwrap();
        assert_eq!(which(&p, "GET", API, "/Admin/users"), Is("public"));
        assert_eq!(which(&p, "GET", API, "/admin/users"), Is("admin"));
        assert_eq!(which(&p, "GET", API, "//admin/users"), No(PATH));
    }

    /// The shortcut for paths already canonical reads every path exactly as the full
    /// algorithm does: same canonical form, same readings in the same order, same refusals.
    #[test]
    fn the_canonical_shortcut_reads_as_the_full_algorithm() {
        // Every path of up to four pieces over an alphabet of the shapes that matter (dots,
        // slashes, escapes, trailing dots and spaces, refused bytes, suffixes), and then some
        // pseudo-random longer ones.
        const PIECES: [&str; 16] = [
            "/", "a", "A", ".", "..", "admin", ".json", "%2e", "%20", "%41", "//", ";", " ", "\\",
            "~", "x.",
        ];
        let mut paths: Vec<String> = vec![String::new()];
        for _ in 0..4 {
            let next: Vec<String> = paths
                .iter()
                .flat_map(|p| PIECES.iter().map(move |x| format!("{p}{x}")))
                .collect();
            paths.extend(next);
        }
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            let mut p = String::new();
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                p.push_str(PIECES[(seed % 16) as usize]);
            }
            paths.push(p);
        }
        let mut shortcut = 0;
        for p in &paths {
            let p = format!("/{p}");
            let full = path_in_full(&p);
            assert_eq!(path(&p), full, "{p:?}");
            assert_eq!(path(&format!("{p}?q=%2e")), full, "{p:?} with a query");
            shortcut += usize::from(
                !p.contains('%') && !p.contains("//") && full.is_ok() && !p.contains("/."),
            );
        }
        assert!(shortcut > 1000, "only {shortcut} paths took the shortcut");
    }

    #[test]
    fn route_files_are_canonical() {
        use crate::server::ext_authz::RoutePolicy;
        for (text, needle) in [
            ("[[routes]]\npath_prefix = \"/a//b\"\n", "not canonical"),
            ("[[routes]]\npath_prefix = \"/a/../b\"\n", "not canonical"),
            ("[[routes]]\npath_prefix = \"/%61dmin\"\n", "not canonical"),
            ("[[routes]]\npath_prefix = \"/a?b\"\n", "not canonical"),
            ("[[routes]]\npath_prefix = \"/a;b\"\n", ";"),
            ("[[routes]]\npath_prefix = \"/a%2Fb\"\n", "encoded"),
            ("[[routes]]\nhost = \"ops.example.com:abc\"\n", "port"),
            ("[[routes]]\nhost = \"a..b\"\n", "empty label"),
            ("[[routes]]\nhost = \"\"\n", "empty"),
            ("[[routes]]\nmethods = [\" DELETE\"]\n", "method"),
            (
                "[[routes]]\npath_prefix = \"/admin\"\n[[routes]]\npath_prefix = \"/Admin\"\n",
                "only by case",
            ),
        ] {
            let e = RoutePolicy::from_toml(text, "r.toml")
                .expect_err(text)
                .to_string();
            assert!(e.contains(needle), "{text:?} → {e}");
        }
        // Hosts are canonicalised at load: the trailing dot, the port and the case go.
        let p = RoutePolicy::from_toml(
            "[default]\naccess = \"public\"\n[[routes]]\nhost = \"OPS.Example.com.:443\"\n",
            "r.toml",
        )
        .unwrap();
        assert!(!p
            .rule_for("ops.example.com", "/", "GET")
            .unwrap()
            .is_public());
        // With case-sensitive paths, prefixes differing by case are two routes.
        RoutePolicy::from_toml(
            "case_sensitive_paths = true\n[[routes]]\npath_prefix = \"/admin\"\n[[routes]]\npath_prefix = \"/Admin\"\n",
            "r.toml",
        )
        .unwrap();
    }

    #[test]
    fn readings_cover_what_upstreams_do() {
        let r = |p: &str| path(p).unwrap().readings().to_vec();
        assert_eq!(r("/orders"), ["/orders"]);
        // A last segment with an extension is also read without it (Spring suffix matching).
        assert_eq!(r("/public/a-b_c.~d"), ["/public/a-b_c.~d", "/public/a-b_c"]);
        for (p, reading) in [
            ("//admin/users", "//admin/users"),
            ("/x/../admin/users", "/x/../admin/users"),
            ("/%61dmin/users", "/%61dmin/users"),
            ("/admin/%2E%2E/public", "/admin/%2E%2E/public"),
            ("/admin/../public", "/admin/../public"),
            // merge then dots, dots then merge
            ("/a//../admin", "/admin"),
            ("/a//../admin", "/a/admin"),
            // segments trimmed (IIS) and a suffix dropped (Spring)
            ("/admin./users", "/admin/users"),
            ("/admin%20%20/users", "/admin/users"),
            ("/admin.%20./users", "/admin/users"),
            ("/admin.json", "/admin"),
        ] {
            assert!(r(p).iter().any(|x| x == reading), "{p}: {:?}", r(p));
        }
    }

    #[test]
    fn hosts_table() {
        let ok = [
            ("ops.example.com", "ops.example.com"),
            ("OPS.Example.COM", "ops.example.com"),
            ("ops.example.com.", "ops.example.com"),
            ("ops.example.com:8443", "ops.example.com"),
            ("ops.example.com.:443", "ops.example.com"),
            ("my_service", "my_service"),
            ("127.0.0.1:50051", "127.0.0.1"),
            ("[::1]", "[::1]"),
            ("[::0001]:8080", "[::1]"),
            ("[2001:DB8::1]", "[2001:db8::1]"),
            ("", ""),
        ];
        for (raw, want) in ok {
            assert_eq!(host(raw).unwrap(), want, "{raw:?}");
        }
        for raw in [
            "ops.example.com:abc",
            "ops.example.com:",
            "ops.example.com:0",
            "ops.example.com:65536",
            "ops.example.com:+80",
            "ops.example.com:080808",
            "ops.example.com:80:80",
            "a@ops.example.com",
            "ops%2eexample.com",
            "ops example.com",
            "ops.example.com\n",
            "ops.example.com\0",
            "a..b",
            ".",
            "..",
            "ops.example.com..",
            ".ops.example.com",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:abc",
            "[fe80::1%25eth0]",
            "[zz::1]",
            "ops.example.com/x",
            "ops.example.com\\x",
            "ops.ex\u{e4}mple.com",
            "*.example.com",
        ] {
            assert_eq!(reason(host(raw)), "HOST_INVALID", "{raw:?}");
        }
        assert_eq!(reason(host(&"a".repeat(64))), "HOST_INVALID");
        assert_eq!(
            reason(host(&["a"; 130].join("."))),
            "HOST_INVALID",
            "over 253"
        );
    }

    #[test]
    fn methods_table() {
        for m in ["GET", "DELETE", "delete", "PROPFIND", "M-SEARCH"] {
            assert_eq!(method(m).unwrap(), m);
        }
        for m in [
            "", " DELETE", "DELETE ", "DE LETE", "DELETE\0", "GET\n", "DÉLETE", "(GET)",
        ] {
            assert_eq!(reason(method(m)), "METHOD_INVALID", "{m:?}");
        }
        assert_eq!(reason(method(&"A".repeat(33))), "METHOD_INVALID");
        assert_eq!(method_upper("delete"), "DELETE");
        assert_eq!(method_upper("DELETE"), "DELETE");
    }

    #[test]
    fn grpc_method_paths() {
        for p in [
            "/examples.orders.v1.Orders/DeleteOrder",
            "/Svc/M",
            "/grpc.health.v1.Health/Check",
            "/a_b.C/d_e",
        ] {
            assert!(is_grpc_method_path(p), "{p}");
        }
        for p in [
            "examples.orders.v1.Orders/DeleteOrder",
            "//examples.orders.v1.Orders/DeleteOrder",
            "/examples.orders.v1.Orders/DeleteOrder/",
            "/examples.orders.v1.Orders//DeleteOrder",
            "/examples.orders.v1.Orders/Delete/Order",
            "/examples.orders.v1.Orders",
            "/examples.orders.v1.Orders/",
            "//DeleteOrder",
            "/",
            "",
            "/a-b/C",
            "/a b/C",
            "/a%2eb/C",
            "/a.B/C?x",
            "/a.B/C\0",
        ] {
            assert!(!is_grpc_method_path(p), "{p}");
            assert_eq!(reason(grpc_method_path(p)), "PATH_NOT_CANONICAL", "{p}");
        }
    }
}
