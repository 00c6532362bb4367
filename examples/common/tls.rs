//! TLS towards AuthService for the examples with a delegated layer: `--auth-service https://…`
//! with `--tls-ca` (and `--tls-cert` / `--tls-key` for mTLS). Plaintext `http://` is for
//! loopback only: whoever can change AuthService's answers on the way can make any token valid
//! (the layer warns about a plaintext endpoint that is not loopback).
#![allow(dead_code)]

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// TLS flags for the AuthService connection.
#[derive(clap::Args, Debug, Default)]
pub struct AuthServiceTls {
    /// CA certificate (PEM) that AuthService's certificate chains to. Turns TLS on: use
    /// `https://` endpoints.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mTLS (with `--tls-key`).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The name AuthService's certificate is checked against (default: the endpoint's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
}

impl AuthServiceTls {
    /// The client TLS settings (`None` without `--tls-ca`).
    pub fn client_config(&self) -> Result<Option<ClientTlsConfig>, String> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() || self.tls_domain.is_some() {
                return Err("--tls-cert / --tls-domain need --tls-ca".into());
            }
            return Ok(None);
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(d) = &self.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        Ok(Some(tls))
    }
}
