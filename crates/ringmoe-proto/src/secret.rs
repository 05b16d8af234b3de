//! The shared cluster secret (`--cluster-secret-file`): how the coordinator and its workers
//! know each other without TLS. A worker's `Heartbeat` and every coordinator → worker call
//! (`WorkerService`) carry it in the `x-ringmoe-cluster-secret` metadata; the receiving
//! server's interceptor refuses a call without it (`UNAUTHENTICATED`, logged with the peer)
//! before any handler runs. Comparison is of SHA-256 digests, so its time says nothing about
//! the secret.
//!
//! The secret travels in the call's metadata: on a network an attacker can read, it needs the
//! transport encrypted (TLS, or a mesh that provides it).

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key the secret travels under.
pub const HEADER: &str = "x-ringmoe-cluster-secret";

/// Shortest secret accepted: a guessable one protects nothing.
pub const MIN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the cluster secret {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },

    #[error(
        "the cluster secret {path} must be at least {MIN_LEN} visible ASCII characters with no \
         spaces (e.g. `openssl rand -hex 32`)"
    )]
    Weak { path: String },

    #[error("the system's random source failed")]
    Random,
}

/// SHA-256 of `b` (what the cluster secret and client tokens are compared and stored as).
pub fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// 32 bytes from the system's random source (secrets, client tokens, data-plane tokens).
pub fn random_bytes() -> Result<[u8; 32], SecretError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SecretError::Random)?;
    Ok(b)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cluster secret both ends hold.
#[derive(Clone)]
pub struct ClusterSecret {
    value: AsciiMetadataValue,
    digest: [u8; 32],
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    fn new(text: &str, what: &str) -> Result<Self, SecretError> {
        let weak = || SecretError::Weak {
            path: what.to_string(),
        };
        if text.len() < MIN_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(weak());
        }
        Ok(Self {
            value: text.parse().map_err(|_| weak())?,
            digest: sha256(text.as_bytes()),
        })
    }

    /// The secret in `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let what = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: what.clone(),
            source,
        })?;
        Self::new(text.trim(), &what)
    }

    /// A fresh random secret, for a cluster in one process (`serve`): its loopback ports are
    /// then closed to every other process.
    pub fn random() -> Result<Self, SecretError> {
        Self::new(&hex(&random_bytes()?), "a random secret")
    }

    /// Whether `presented` is this secret.
    fn admits(&self, presented: &[u8]) -> bool {
        sha256(presented) == self.digest
    }
}

/// The metadata key of an elected coordinator's fencing token on its calls to workers.
pub const FENCE_HEADER: &str = "x-ringmoe-fence";

/// A client interceptor that puts the cluster secret, when there is one, on every call, and
/// the caller's fencing token when it has one (an elected coordinator: workers refuse calls
/// whose token is below the highest they have seen).
#[derive(Debug, Clone, Default)]
pub struct Credential {
    secret: Option<Arc<ClusterSecret>>,
    fence: u64,
}

impl Credential {
    pub fn new(secret: Option<ClusterSecret>) -> Self {
        Self {
            secret: secret.map(Arc::new),
            fence: 0,
        }
    }

    /// The same credential carrying fencing token `fence` (0: none).
    pub fn fenced(mut self, fence: u64) -> Self {
        self.fence = fence;
        self
    }
}

impl Interceptor for Credential {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(s) = &self.secret {
            req.metadata_mut().insert(HEADER, s.value.clone());
        }
        if self.fence > 0 {
            req.metadata_mut().insert(
                FENCE_HEADER,
                tonic::metadata::MetadataValue::from(self.fence),
            );
        }
        Ok(req)
    }
}

/// The fencing token a call carries (0 without one, or an unreadable one).
pub fn fence_of<T>(req: &Request<T>) -> u64 {
    req.metadata()
        .get(FENCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A server interceptor that admits only calls carrying the cluster secret (every call when
/// there is none). `what` names the service in the log line of a refusal.
#[derive(Debug, Clone)]
pub struct Gate {
    secret: Option<Arc<ClusterSecret>>,
    what: &'static str,
}

impl Gate {
    pub fn new(secret: Option<ClusterSecret>, what: &'static str) -> Self {
        Self {
            secret: secret.map(Arc::new),
            what,
        }
    }
}

impl Interceptor for Gate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(secret) = &self.secret else {
            return Ok(req);
        };
        let presented = req.metadata().get(HEADER).map(|v| v.as_bytes());
        if presented.is_some_and(|p| secret.admits(p)) {
            return Ok(req);
        }
        let peer = req
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let why = if presented.is_some() {
            "a wrong cluster secret"
        } else {
            "no cluster secret"
        };
        tracing::warn!(%peer, service = self.what, reason = why, "refused a call");
        Err(Status::unauthenticated(format!(
            "{why}: {} admits only members of this cluster (--cluster-secret-file)",
            self.what
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(gate: &mut Gate, cred: &mut Credential) -> Option<tonic::Code> {
        let req = cred.call(Request::new(())).ok()?;
        gate.call(req).err().map(|s| s.code())
    }

    #[test]
    fn only_the_same_secret_passes_the_gate() -> Result<(), SecretError> {
        let dir = std::env::temp_dir().join(format!("ringmoe-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| SecretError::Read {
            path: "tmp".into(),
            source,
        })?;
        let file = dir.join("secret");
        let write = |s: &str| {
            std::fs::write(&file, s).map_err(|source| SecretError::Read {
                path: "tmp".into(),
                source,
            })
        };
        write("0123456789abcdef0123\n")?;
        let s = ClusterSecret::from_file(&file)?;
        let mut gate = Gate::new(Some(s.clone()), "WorkerService");
        assert_eq!(call(&mut gate, &mut Credential::new(Some(s))), None);
        assert_eq!(
            call(
                &mut gate,
                &mut Credential::new(Some(ClusterSecret::random()?))
            ),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&mut gate, &mut Credential::default()),
            Some(tonic::Code::Unauthenticated)
        );
        // No secret configured: the gate is open, and a credential costs nothing.
        assert_eq!(
            call(&mut Gate::new(None, "x"), &mut Credential::default()),
            None
        );
        for weak in ["short", "with a space 0123456789", "ünïcode-0123456789"] {
            write(weak)?;
            assert!(matches!(
                ClusterSecret::from_file(&file),
                Err(SecretError::Weak { .. })
            ));
        }
        assert!(ClusterSecret::from_file(&dir.join("absent")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
