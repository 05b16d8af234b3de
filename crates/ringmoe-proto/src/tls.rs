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
use std::sync::{Arc, RwLock};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

/// What one reading of the files made.
#[derive(Debug)]
struct Loaded {
    /// The server's rustls settings (`None` for a client-only process).
    server: Option<Arc<rustls::ServerConfig>>,
    /// The same certificate for HTTP/1.1 clients, none of whom is asked for a certificate
    /// (the OpenAI-compatible API authenticates by bearer token).
    http: Option<Arc<rustls::ServerConfig>>,
    /// How the process dials servers: check them against the CA, present its identity.
    client: ClientTlsConfig,
}

/// A process's TLS settings, re-read from its files by [`Tls::reload`] (on SIGHUP or when the
/// files change: cert-manager renews certificates in place). New connections use the newest
/// reading; established ones keep theirs.
#[derive(Debug, Clone)]
pub struct Tls {
    files: TlsFiles,
    serves: bool,
    loaded: Arc<RwLock<Arc<Loaded>>>,
}

impl Tls {
    fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The client settings in force.
    pub fn client(&self) -> ClientTlsConfig {
        self.current().client.clone()
    }

    /// The server settings in force, for a connection being accepted.
    pub fn server(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.current().server.clone()
    }

    /// The HTTP API's server settings in force, for a connection being accepted.
    pub fn http_server(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.current().http.clone()
    }

    /// Re-reads the files; on success new connections use them, on error (a half-written file,
    /// a key that does not match) the settings in force stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = self.files.read(self.serves)?.ok_or_else(|| {
            TlsError::Flags("the TLS files no longer name a certificate or a CA".into())
        })?;
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    /// The files these settings come from (their modification times tell when to reload).
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn bad(what: &str, e: &dyn std::fmt::Display) -> TlsError {
    TlsError::Flags(format!("{what}: {e}"))
}

type KeyPair = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// The certificate chain and private key of `--tls-cert`/`--tls-key` (PEM).
fn identity(cert: &[u8], key: &[u8]) -> Result<KeyPair, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("--tls-cert", &e))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("--tls-key", &e))?;
    Ok((certs, key))
}

/// The certificates of `--tls-ca` (PEM) as trust anchors.
fn roots(ca: &[u8]) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots
            .add(c.map_err(|e| bad("--tls-ca", &e))?)
            .map_err(|e| bad("--tls-ca", &e))?;
    }
    Ok(Arc::new(roots))
}

/// A rustls server configuration: `cert`/`key` served, clients required to present a
/// certificate `ca` signed when it is given (mTLS), the protocols `alpn` offered.
fn server_config(
    cert: &[u8],
    key: &[u8],
    ca: Option<&[u8]>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = identity(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?;
    let builder = match ca {
        Some(ca) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider)
                    .build()
                    .map_err(|e| bad("--tls-ca", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| bad("--tls-cert/--tls-key", &e))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

impl TlsFiles {
    /// The settings these files make, or `None` when no TLS flag is given. A server needs a
    /// certificate and a key; a client needs the CA.
    pub fn load(&self, serves: bool) -> Result<Option<Tls>, TlsError> {
        Ok(self.read(serves)?.map(|l| Tls {
            files: self.clone(),
            serves,
            loaded: Arc::new(RwLock::new(Arc::new(l))),
        }))
    }

    fn read(&self, serves: bool) -> Result<Option<Loaded>, TlsError> {
        let pair = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((read("--tls-cert", c)?, read("--tls-key", k)?)),
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
            .map(|p| read("--tls-ca", p))
            .transpose()?;
        if pair.is_none() && ca.is_none() {
            return Ok(None);
        }
        let (server, http) = match (&pair, serves) {
            (Some((c, k)), true) => (
                Some(server_config(c, k, ca.as_deref(), &[b"h2"])?),
                Some(server_config(c, k, None, &[b"http/1.1"])?),
            ),
            (None, true) => {
                return Err(TlsError::Flags(
                    "a server needs --tls-cert and --tls-key for TLS".into(),
                ));
            }
            (_, false) => (None, None),
        };
        let Some(ca) = ca else {
            return Err(TlsError::Flags(
                "--tls-ca is needed to check the servers this process connects to".into(),
            ));
        };
        let mut client = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((c, k)) = pair {
            client = client.identity(Identity::from_pem(c, k));
        }
        Ok(Some(Loaded {
            server,
            http,
            client,
        }))
    }
}

/// The data plane's TLS settings, from the files as they are now (each job reads them, so a job
/// started after a rotation uses the new certificate): a server that requires a client
/// certificate the CA signed, and a client that presents this process's certificate and accepts
/// a server certificate the CA signed whatever names it carries. Data-plane addresses are pod or
/// host IPs that no certificate need name; the job's token, checked inside the channel, says
/// which job a connection belongs to. Needs all three files.
pub fn data_plane(
    files: &TlsFiles,
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), TlsError> {
    let (Some(cert), Some(key), Some(ca)) = (&files.cert, &files.key, &files.ca) else {
        return Err(TlsError::Flags(
            "data-plane TLS needs --tls-cert, --tls-key and --tls-ca".into(),
        ));
    };
    let (cert, key, ca) = (
        read("--tls-cert", cert)?,
        read("--tls-key", key)?,
        read("--tls-ca", ca)?,
    );
    let server = server_config(&cert, &key, Some(&ca), &[])?;
    let (certs, key) = identity(&cert, &key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SignedByCa {
        roots: roots(&ca)?,
        provider: provider.clone(),
    });
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .map_err(|e| bad("--tls-cert/--tls-key", &e))?;
    Ok((server, Arc::new(client)))
}

/// Accepts a server certificate that chains to the CA (validity, usage and signatures checked
/// as usual) without matching its names to the address dialled.
#[derive(Debug)]
struct SignedByCa {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SignedByCa {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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
        Some(t) => e.tls_config(t.client()).map_err(|e| bad(&e)),
        None => Ok(e),
    }
}

/// Checks that `cert` (a peer's certificate, DER) names `host` as a client dialing `host`
/// would: a DNS-name SAN matching a name, an IP-address SAN matching an address. The
/// coordinator holds a worker's heartbeat to this, so a worker certificate signed by the
/// cluster CA for one host cannot register another host's address.
pub fn certificate_names(
    cert: &rustls::pki_types::CertificateDer<'_>,
    host: &str,
) -> Result<(), String> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| format!("{host:?} is not a DNS name or an IP address: {e}"))?;
    let cert = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|e| format!("the certificate is not valid for {host}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A self-signed certificate with `san` (an openssl `subjectAltName` value).
    fn cert(dir: &Path, san: &str) -> Result<CertificateDer<'static>, Box<dyn std::error::Error>> {
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=worker", "-addext"])
            .arg(format!("subjectAltName={san}"))
            .arg("-keyout")
            .arg(dir.join("k.pem"))
            .arg("-out")
            .arg(dir.join("c.pem"))
            .output()?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into());
        }
        Ok(CertificateDer::from_pem_slice(&std::fs::read(
            dir.join("c.pem"),
        )?)?)
    }

    #[test]
    fn a_certificate_names_only_the_hosts_in_its_sans() -> TestResult {
        let dir = std::env::temp_dir().join(format!("ringmoe-tls-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let c = cert(&dir, "IP:10.0.0.7,DNS:worker-3.ringmoe.svc,IP:::1");
        let _ = std::fs::remove_dir_all(&dir);
        let c = c?;
        for ok in ["10.0.0.7", "worker-3.ringmoe.svc", "[::1]", "::1"] {
            certificate_names(&c, ok).map_err(|e| format!("{ok}: {e}"))?;
        }
        for no in [
            "10.0.0.8",
            "127.0.0.1",
            "worker-4.ringmoe.svc",
            "worker",
            "not a host!",
        ] {
            if certificate_names(&c, no).is_ok() {
                return Err(format!("{no} passed").into());
            }
        }
        Ok(())
    }
}
