//! The caller's mTLS identity: the SPIFFE IDs (`spiffe://…` URI SANs) of the client certificate
//! the TLS handshake verified. Exposed to the layer's policy ([`crate::authz::policy::Rule::peers`]),
//! to handlers ([`PeerIdentity`] in the request extensions) and to the identity-query
//! allowlist (entries starting with `spiffe://`).

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The SPIFFE IDs of the verified client certificate (empty without mTLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// `spiffe://trust-domain/path` URIs from the leaf certificate's SANs.
    pub spiffe_ids: Vec<String>,
}

impl PeerIdentity {
    /// From the connection info tonic records for a TLS connection.
    pub fn from_extensions(ext: &http::Extensions) -> Self {
        let certs = ext
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        let Some(certs) = certs else {
            return Self::default();
        };
        let Some(leaf) = certs.first() else {
            return Self::default();
        };
        Self {
            spiffe_ids: spiffe_ids(leaf.as_ref()),
        }
    }

    /// From a tonic request (its TLS connection info).
    pub fn from_request<T>(request: &tonic::Request<T>) -> Self {
        match request.peer_certs() {
            Some(certs) => Self {
                spiffe_ids: certs
                    .first()
                    .map(|leaf| spiffe_ids(leaf.as_ref()))
                    .unwrap_or_default(),
            },
            None => Self::default(),
        }
    }

    /// Whether any of the peer's SPIFFE IDs is in `allowed`.
    pub fn any_in<'a>(&self, allowed: impl IntoIterator<Item = &'a String>) -> bool {
        allowed
            .into_iter()
            .any(|a| self.spiffe_ids.iter().any(|s| s == a))
    }
}

/// The SPIFFE ID of a DER certificate, as an X.509-SVID carries it: **exactly one** URI SAN,
/// and that URI a well-formed SPIFFE ID ([`is_spiffe_id`]). A certificate with no URI SAN,
/// several (an attacker's `spiffe://…` beside the allowlisted one), a malformed one, or that
/// does not parse, has none: its holder is no SPIFFE peer at all.
///
/// Without the `mtls` feature no certificate is read and this is always empty: a rule naming
/// peers is then refused when its policy is built ([`crate::authz::policy`]).
#[cfg(feature = "mtls")]
pub fn spiffe_ids(der: &[u8]) -> Vec<String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return Vec::new();
    };
    // Several SAN extensions are an error here (x509-parser refuses duplicates).
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(u), None) if is_spiffe_id(u) => vec![u.to_owned()],
        _ => Vec::new(),
    }
}

/// Without the `mtls` feature no certificate is read: no caller has a SPIFFE ID.
#[cfg(not(feature = "mtls"))]
pub fn spiffe_ids(_der: &[u8]) -> Vec<String> {
    Vec::new()
}

/// Whether `id` is a SPIFFE ID as the SPIFFE spec defines it: `spiffe://`, a trust domain of
/// lower-case letters, digits, `.`, `-` and `_`, then an optional path of non-empty segments of
/// letters, digits, `.`, `-` and `_` (no `.` or `..` segment, no trailing `/`); no port,
/// userinfo, query or fragment; at most 2 048 bytes.
pub fn is_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    if id.len() > 2048 {
        return false;
    }
    let (domain, path) = rest
        .split_once('/')
        .map_or((rest, None), |(d, p)| (d, Some(p)));
    let domain_ok = !domain.is_empty()
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    let path_ok = path.is_none_or(|p| {
        p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        })
    });
    domain_ok && path_ok
}

/// The peer's IP, with or without TLS.
#[cfg_attr(not(feature = "layer"), allow(dead_code))]
pub(crate) fn peer_ip(ext: &http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    #[test]
    fn a_certificate_speaks_for_exactly_one_spiffe_id() {
        const A: &str = "spiffe://cluster.local/ns/apps/sa/billing";
        assert_eq!(spiffe_ids(&cert(vec![uri(A)])), [A]);
        // With DNS names beside it: still one URI SAN.
        let dns = SanType::DnsName("billing.apps".try_into().unwrap());
        assert_eq!(spiffe_ids(&cert(vec![dns.clone(), uri(A)])), [A]);
        // An attacker's URI beside the allowlisted one (either order): no identity.
        for sans in [
            vec![uri("spiffe://evil.example/x"), uri(A)],
            vec![uri(A), uri("spiffe://evil.example/x")],
            vec![uri(A), uri("https://example.com/")],
            vec![uri(A), uri(A)],
        ] {
            assert!(spiffe_ids(&cert(sans.clone())).is_empty(), "{sans:?}");
        }
        assert!(spiffe_ids(&cert(vec![dns])).is_empty());
        assert!(spiffe_ids(&cert(vec![])).is_empty());
        assert!(spiffe_ids(b"not a certificate").is_empty());
        // One URI, but not a SPIFFE ID.
        assert!(spiffe_ids(&cert(vec![uri("spiffe://Cluster.local/x")])).is_empty());
    }

    #[test]
    fn spiffe_id_shapes() {
        for ok in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/apps/sa/billing",
            "spiffe://td_1-a.b/a.b-c_d",
        ] {
            assert!(is_spiffe_id(ok), "{ok}");
        }
        for bad in [
            "spiffe://",
            "spiffe:///x",
            "spiffe://Cluster.local/x",
            "spiffe://td:8443/x",
            "spiffe://user@td/x",
            "spiffe://td/x/",
            "spiffe://td//x",
            "spiffe://td/./x",
            "spiffe://td/../x",
            "spiffe://td/x?y",
            "spiffe://td/x#y",
            "spiffe://td/x%2Fy",
            "SPIFFE://td/x",
            "https://td/x",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
        assert!(!is_spiffe_id(&format!("spiffe://td/{}", "a".repeat(2040))));
    }
}
