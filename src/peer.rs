//! The caller's mTLS identity: the SPIFFE IDs (`spiffe://…` URI SANs) of the client certificate
//! the TLS handshake verified. Exposed to the layer's policy ([`crate::policy::Rule::peers`]),
//! to handlers ([`PeerIdentity`] in the request extensions) and to the identity-query
//! allowlist (entries starting with `spiffe://`).

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

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

/// The `spiffe://` URI SANs of a DER certificate (none if it does not parse).
pub fn spiffe_ids(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// The peer's IP, with or without TLS.
pub(crate) fn peer_ip(ext: &http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}
