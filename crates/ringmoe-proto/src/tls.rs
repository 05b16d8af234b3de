//! TLS on ringmoe's gRPC hops (rustls, through tonic): `--tls-cert`, `--tls-key`, `--tls-ca`.
//!
//! A server with a certificate and key serves TLS only; with a CA as well it requires every
//! client to present a certificate that CA signed (mTLS). A process that is also a client (the
//! coordinator calling workers, a worker beating to the coordinator) presents its own
//! certificate and checks the server's against the same CA, so one certificate per process,
//! valid for both server and client use, is its identity both ways. A client alone (`submit`,
//! `health`) needs the CA, and its own certificate and key where the server requires them.
//! The server's certificate must name the host the client dials (a DNS name or IP address
//! SAN).

use std::path::{Path, PathBuf};

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{0}")]
    Flags(String),

    #[error("{addr}: {message}")]
    Endpoint { addr: String, message: String },
}

/// The PEM files of `--tls-cert`, `--tls-key` and `--tls-ca`.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
        return Err(TlsError::Read {
            what,
            path: path.to_path_buf(),
            source: std::io::Error::other("not a PEM file"),
        });
    }
    Ok(pem)
}

/// A process's TLS settings, read from its files once at start.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Its servers' settings (`None` for a client-only process).
    pub server: Option<ServerTlsConfig>,
    /// How it dials servers: verify them against the CA, present its identity if it has one.
    pub client: ClientTlsConfig,
}

impl TlsFiles {
    /// The settings these files make, or `None` when no TLS flag is given. A server needs a
    /// certificate and a key; a client needs the CA.
    pub fn load(&self, serves: bool) -> Result<Option<Tls>, TlsError> {
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some(Identity::from_pem(
                read("--tls-cert", c)?,
                read("--tls-key", k)?,
            )),
            (None, None) => None,
            _ => {
                return Err(TlsError::Flags(
                    "--tls-cert and --tls-key go together".into(),
                ));
            }
        };
        let ca = self
            .ca
            .as_deref()
            .map(|p| read("--tls-ca", p).map(Certificate::from_pem))
            .transpose()?;
        if identity.is_none() && ca.is_none() {
            return Ok(None);
        }
        let server = match (&identity, serves) {
            (Some(id), true) => {
                let mut s = ServerTlsConfig::new().identity(id.clone());
                if let Some(ca) = &ca {
                    s = s.client_ca_root(ca.clone());
                }
                Some(s)
            }
            (None, true) => {
                return Err(TlsError::Flags(
                    "a server needs --tls-cert and --tls-key for TLS".into(),
                ));
            }
            (_, false) => None,
        };
        let Some(ca) = ca else {
            return Err(TlsError::Flags(
                "--tls-ca is needed to check the servers this process connects to".into(),
            ));
        };
        let mut client = ClientTlsConfig::new().ca_certificate(ca);
        if let Some(id) = identity {
            client = client.identity(id);
        }
        Ok(Some(Tls { server, client }))
    }
}

/// `host:port` (or a URL) → an endpoint: `https://` with `tls`, `http://` without.
pub fn endpoint(addr: &str, tls: Option<&Tls>) -> Result<Endpoint, TlsError> {
    let url = match (addr.contains("://"), tls) {
        (true, _) => addr.to_string(),
        (false, Some(_)) => format!("https://{addr}"),
        (false, None) => format!("http://{addr}"),
    };
    let bad = |e: &dyn std::fmt::Display| TlsError::Endpoint {
        addr: addr.to_string(),
        message: e.to_string(),
    };
    let e = Channel::from_shared(url).map_err(|e| bad(&e))?;
    match tls {
        Some(t) => e.tls_config(t.client.clone()).map_err(|e| bad(&e)),
        None => Ok(e),
    }
}
