//! The security flags of the cluster commands, parsed and applied: client tokens
//! (`--auth-tokens-file`, `ringmoe token new`), the cluster secret, TLS, upload bounds, and the
//! reload of token and certificate files on SIGHUP or change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ringmoe_coordinator::{Auth, CoordinatorConfig};
use ringmoe_proto::ServerOptions;
use ringmoe_proto::secret::ClusterSecret;

use crate::cluster_cmd::LimitOpts;

/// TLS on this process's gRPC hops (every server command, `submit`, `health`).
#[derive(Args, Clone, Debug)]
pub struct TlsOpts {
    /// PEM certificate of this process: served by its gRPC server, and presented as its client
    /// identity where a server requires one (mTLS). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA: the servers this process connects to must present a certificate it signed, and
    /// this process's server then requires one it signed from every client (mTLS).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

impl TlsOpts {
    /// The settings, `None` without TLS flags; `serves`: this process runs a server.
    pub(crate) fn load(&self, serves: bool) -> Result<Option<ringmoe_proto::tls::Tls>> {
        let files = ringmoe_proto::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        };
        Ok(files.load(serves)?)
    }

    /// Server options with this process's TLS, re-read on SIGHUP or when the files change
    /// (new connections, served and dialled, use the new certificate); call inside the runtime.
    pub(crate) fn server(&self, limits: &LimitOpts) -> Result<ServerOptions> {
        let tls = self.load(true)?;
        if let Some(t) = &tls {
            let files = t.files();
            let paths = [&files.cert, &files.key, &files.ca];
            let t = t.clone();
            reload_on_change(
                "TLS certificate",
                paths.into_iter().flatten().cloned().collect(),
                move || t.reload().map(|()| "new connections use it".to_string()),
            )?;
        }
        Ok(ServerOptions {
            tls,
            ..limits.server()
        })
    }
}

/// Client authentication on the job APIs (`coordinator` and `serve`).
#[derive(Args, Debug)]
pub struct AuthOpts {
    /// Admit only clients whose bearer token is listed here, one per line: `NAME sha256:HEX
    /// [admin] [max_input_tokens=N] [max_queued_jobs=N] [max_jobs_per_minute=N]` (HEX: the
    /// token's SHA-256; `ringmoe token new NAME` makes a token and its line). Each client sees
    /// only its own jobs (an `admin` one sees all). Re-read on SIGHUP and when the file changes.
    /// Unset: anyone who reaches the port is admitted.
    #[arg(long)]
    auth_tokens_file: Option<PathBuf>,
}

impl AuthOpts {
    /// Reads the tokens file (a bad one stops the server from starting) and re-reads it on
    /// every SIGHUP, and when the file changes (checked every 5 s: a Kubernetes ConfigMap or
    /// Secret volume is updated in place); call inside the runtime.
    pub(crate) fn open(&self) -> Result<Option<Arc<Auth>>> {
        let Some(path) = &self.auth_tokens_file else {
            return Ok(None);
        };
        let auth = Arc::new(Auth::open(path)?);
        tracing::info!(file = %path.display(), "client authentication on");
        let a = auth.clone();
        reload_on_change("tokens file", vec![path.clone()], move || {
            a.reload().map(|n| format!("{n} clients"))
        })?;
        Ok(Some(auth))
    }
}

/// Calls `reload` on every SIGHUP and whenever one of `files` changes (size or modification
/// time, checked every 5 s: a Kubernetes ConfigMap or Secret volume, a cert-manager renewal,
/// update the files in place), logging what happened; a failed reload keeps what is in force.
/// Call inside the runtime.
fn reload_on_change<E: std::fmt::Display>(
    what: &'static str,
    files: Vec<PathBuf>,
    reload: impl Fn() -> std::result::Result<String, E> + Send + 'static,
) -> Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let stamp = move || -> Vec<_> {
        files
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.len(), m.modified().ok()))
            })
            .collect()
    };
    tokio::spawn(async move {
        let mut seen = stamp();
        let mut poll = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                s = hup.recv() => if s.is_none() { break },
                _ = poll.tick() => {
                    if stamp() == seen {
                        continue;
                    }
                }
            }
            seen = stamp();
            match reload() {
                Ok(n) => tracing::info!(what, result = %n, "reloaded"),
                Err(e) => {
                    tracing::error!(what, error = %e, "not reloaded; the previous one stays in force")
                }
            }
        }
    });
    Ok(())
}

/// The coordinator ↔ worker credential (`coordinator` and `worker`).
/// The client's bearer token (`submit`, `status`).
#[derive(Args, Clone, Debug)]
pub struct ClientTokenOpts {
    /// A file holding this client's bearer token (for a coordinator with --auth-tokens-file);
    /// or the token itself in RINGMOE_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl ClientTokenOpts {
    /// `--token-file`'s content, else `RINGMOE_TOKEN`, else none.
    pub fn token(&self) -> Result<Option<String>> {
        Ok(match &self.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading --token-file {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("RINGMOE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        })
    }
}

#[derive(Args, Debug)]
pub struct ClusterSecretOpts {
    /// A file holding the cluster's shared secret (at least 16 visible ASCII characters, e.g.
    /// `openssl rand -hex 32`), the same on the coordinator and every worker: workers'
    /// heartbeats and the coordinator's calls to workers must carry it (others get
    /// UNAUTHENTICATED). Unset: the control plane admits anyone who reaches it.
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
}

impl ClusterSecretOpts {
    pub(crate) fn read(&self) -> Result<Option<ClusterSecret>> {
        self.cluster_secret_file
            .as_deref()
            .map(ClusterSecret::from_file)
            .transpose()
            .map_err(Into::into)
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// A fresh client token and its `--auth-tokens-file` line.
    New(TokenNewArgs),
}

#[derive(Args, Debug)]
pub struct TokenNewArgs {
    /// The client's name (letters, digits, - _ . @): the owner of its jobs.
    name: String,
    /// Write the token to this file (mode 0600) and print only the tokens-file line, so
    /// `ringmoe token new alice --token-out alice.token >> tokens` needs no copying.
    #[arg(long)]
    token_out: Option<PathBuf>,
}

/// `ringmoe token new`: without `--token-out`, the token on stdout's first line and its
/// tokens-file line on the second.
pub fn token_new(a: TokenNewArgs) -> Result<()> {
    let (token, line) = ringmoe_coordinator::auth::new_token(&a.name)?;
    // The line must parse as the server will read it (the name's characters).
    ringmoe_coordinator::auth::TokenTable::parse(&line, Path::new("the new line"))?;
    match &a.token_out {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating --token-out {}", path.display()))?;
            writeln!(f, "{token}")?;
            println!("{line}");
        }
        None => println!("{token}\n{line}"),
    }
    Ok(())
}

/// Bounds on uploads (`coordinator` and `serve`).
#[derive(Args, Debug)]
pub struct UploadOpts {
    /// Job uploads (`SubmitJob` streams) in progress at once; one more is refused
    /// (RESOURCE_EXHAUSTED) rather than queued.
    #[arg(long, default_value_t = 64)]
    max_uploads: usize,
    /// Longest pause, in seconds, between two messages of an upload before it is dropped
    /// (DEADLINE_EXCEEDED).
    #[arg(long, default_value_t = 60)]
    upload_idle_secs: u64,
}

impl UploadOpts {
    pub(crate) fn apply(&self, cfg: &mut CoordinatorConfig) {
        cfg.max_uploads = self.max_uploads.max(1);
        cfg.upload_idle = Duration::from_secs(self.upload_idle_secs.max(1));
    }
}
