//! Client authentication for the job APIs (gRPC `JobService` and the OpenAI-compatible HTTP
//! API): bearer tokens checked against the tokens file (`--auth-tokens-file`), and who may see
//! which job.
//!
//! The file holds one client (a tenant) per line, `NAME sha256:HEX [admin] [max_input_tokens=N]
//! [max_queued_jobs=N] [max_jobs_per_minute=N]`, where HEX is the SHA-256 of the client's token: the file holds no
//! secret, so it can live in a ConfigMap. `#` starts a comment. [`new_token`] makes a token and
//! its line (`ringmoe token new NAME`). [`Auth::reload`] re-reads the file (on SIGHUP): a file
//! that does not parse keeps the table in force, so a bad edit never locks every client out.
//!
//! A job belongs to the tenant that submitted it: only that tenant (or an `admin` one) can
//! watch, read, cancel or list it; to anyone else it does not exist (`NOT_FOUND`). Without a
//! tokens file every caller is [`Caller::Anyone`] and sees every job, as before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ringmoe_proto::secret::hex;
use tonic::Status;
use tracing::warn;

/// One client of the job APIs, as its line in the tokens file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// Sees and may cancel every tenant's jobs.
    pub admin: bool,
    /// Most input tokens one of its jobs may have (beside the cluster's K/V capacity).
    pub max_input_tokens: Option<u64>,
    /// Most of its jobs queued or running at once.
    pub max_queued_jobs: Option<usize>,
    /// Most jobs it may submit in any 60 s.
    pub max_jobs_per_minute: Option<usize>,
}

/// Who is calling, once the request passed authentication.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No tokens file: authentication is off and every caller sees every job.
    Anyone,
    Tenant(Arc<Tenant>),
}

impl Caller {
    /// The owner recorded on the jobs this caller submits.
    pub fn owner(&self) -> Option<String> {
        match self {
            Self::Anyone => None,
            Self::Tenant(t) => Some(t.name.clone()),
        }
    }

    /// Whether this caller may see a job submitted by `owner`.
    pub fn sees(&self, owner: Option<&str>) -> bool {
        match self {
            Self::Anyone => true,
            Self::Tenant(t) => t.admin || owner == Some(t.name.as_str()),
        }
    }

    pub fn tenant(&self) -> Option<&Tenant> {
        match self {
            Self::Anyone => None,
            Self::Tenant(t) => Some(t),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}, line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("making a token: the system's random source failed")]
    Random,
}

type Digest = [u8; 32];

fn sha256(token: &str) -> Digest {
    ringmoe_proto::secret::sha256(token.as_bytes())
}

fn unhex(s: &str) -> Option<Digest> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The tenants of one reading of the tokens file, by the SHA-256 of their token.
#[derive(Debug, Default)]
pub struct TokenTable {
    by_digest: HashMap<Digest, Arc<Tenant>>,
}

impl TokenTable {
    /// Parses a tokens file's text; `path` names it in errors. Every line is checked: a
    /// malformed line, a repeated name or token, or an unknown option is an error naming the
    /// line.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AuthError> {
        let mut by_digest = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (i, raw) in text.lines().enumerate() {
            let bad = |message: String| AuthError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let name = words.next().unwrap_or_default();
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(bad(format!(
                    "the client name '{name}' may hold only letters, digits and - _ . @"
                )));
            }
            let digest = words
                .next()
                .and_then(|h| h.strip_prefix("sha256:"))
                .ok_or_else(|| bad(format!("'{name}' needs its token's hash as sha256:HEX")))?;
            let digest = unhex(digest).ok_or_else(|| {
                bad(format!(
                    "'{name}': sha256: takes 64 hex digits (the SHA-256 of the token)"
                ))
            })?;
            let mut tenant = Tenant {
                name: name.to_string(),
                admin: false,
                max_input_tokens: None,
                max_queued_jobs: None,
                max_jobs_per_minute: None,
            };
            for w in words {
                let number = |v: &str| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad(format!("'{w}': a positive whole number")))
                };
                match w.split_once('=') {
                    None if w == "admin" => tenant.admin = true,
                    Some(("max_input_tokens", v)) => tenant.max_input_tokens = Some(number(v)?),
                    Some(("max_queued_jobs", v)) => {
                        tenant.max_queued_jobs = Some(number(v)? as usize)
                    }
                    Some(("max_jobs_per_minute", v)) => {
                        tenant.max_jobs_per_minute = Some(number(v)? as usize)
                    }
                    _ => {
                        return Err(bad(format!(
                            "unknown option '{w}' (known: admin, max_input_tokens=N, \
                             max_queued_jobs=N, max_jobs_per_minute=N)"
                        )));
                    }
                }
            }
            if !names.insert(name.to_string()) {
                return Err(bad(format!("the client '{name}' is listed twice")));
            }
            if by_digest.insert(digest, Arc::new(tenant)).is_some() {
                return Err(bad(format!(
                    "'{name}' has the same token as an earlier client"
                )));
            }
        }
        Ok(Self { by_digest })
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    fn tenant(&self, token: &str) -> Option<Arc<Tenant>> {
        self.by_digest.get(&sha256(token)).cloned()
    }
}

/// The tokens file in force, re-read by [`Auth::reload`].
#[derive(Debug)]
pub struct Auth {
    path: PathBuf,
    table: RwLock<Arc<TokenTable>>,
}

impl Auth {
    /// Reads `path`; an unreadable or malformed file is an error (the server must not start
    /// open to everyone because of a typo).
    pub fn open(path: &Path) -> Result<Self, AuthError> {
        Ok(Self {
            path: path.to_path_buf(),
            table: RwLock::new(Arc::new(Self::read(path)?)),
        })
    }

    fn read(path: &Path) -> Result<TokenTable, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        TokenTable::parse(&text, path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file; on success the new table applies to every request from now on and
    /// the number of clients is returned. On error the old table stays in force.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let t = Self::read(&self.path)?;
        let n = t.len();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
        Ok(n)
    }

    fn current(&self) -> Arc<TokenTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The tenant holding `token`, if any.
    pub fn tenant(&self, token: &str) -> Option<Arc<Tenant>> {
        self.current().tenant(token)
    }

    /// Authenticates an `authorization` header value (`Bearer TOKEN`); `peer` names the caller
    /// in the log line of a refusal.
    pub fn check(&self, header: Option<&str>, peer: &str) -> Result<Caller, Status> {
        let why = match header.map(|h| h.trim()) {
            None | Some("") => "no bearer token (authorization: Bearer TOKEN)",
            Some(h) => match h
                .strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
            {
                None => "the authorization header is not 'Bearer TOKEN'",
                Some(token) => match self.tenant(token.trim()) {
                    Some(t) => return Ok(Caller::Tenant(t)),
                    None => "an unknown token",
                },
            },
        };
        warn!(peer, reason = why, "refused an unauthenticated client");
        Err(Status::unauthenticated(format!(
            "{why}: this server admits only clients listed in its tokens file"
        )))
    }
}

/// Who a request comes from: with `auth`, its bearer token must be known; without, anyone.
pub fn authenticate(
    auth: Option<&Auth>,
    header: Option<&str>,
    peer: &str,
) -> Result<Caller, Status> {
    match auth {
        None => Ok(Caller::Anyone),
        Some(a) => a.check(header, peer),
    }
}

/// A gRPC interceptor that authenticates every request and records its [`Caller`] in the
/// request's extensions for the handlers.
pub(crate) fn interceptor(
    auth: Option<Arc<Auth>>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, Status> + Clone {
    move |mut req: tonic::Request<()>| {
        let peer = req
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let caller = authenticate(auth.as_deref(), header, &peer)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller [`interceptor`] recorded on a request.
pub(crate) fn caller_of<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the request passed no authentication step"))
}

/// Each client's submissions of the last minute, for `max_jobs_per_minute`.
#[derive(Debug, Default)]
pub struct SubmissionRate {
    recent: std::sync::Mutex<HashMap<String, std::collections::VecDeque<std::time::Instant>>>,
}

impl SubmissionRate {
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

    /// Counts one submission by `tenant` at `now`, or refuses it (`RESOURCE_EXHAUSTED`, saying
    /// when the next one is allowed) when the tenant's last minute is full.
    pub fn admit(&self, tenant: &Tenant, now: std::time::Instant) -> Result<(), Status> {
        let Some(most) = tenant.max_jobs_per_minute else {
            return Ok(());
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let times = recent.entry(tenant.name.clone()).or_default();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= Self::WINDOW)
        {
            times.pop_front();
        }
        if times.len() >= most {
            let wait = times
                .front()
                .map_or(Self::WINDOW, |t| Self::WINDOW.saturating_sub(now - *t));
            return Err(Status::resource_exhausted(format!(
                "client '{}' submitted {} jobs in the last minute, its limit \
                 (max_jobs_per_minute={most}); the next is allowed in {} s",
                tenant.name,
                times.len(),
                wait.as_secs() + 1
            )));
        }
        times.push_back(now);
        Ok(())
    }
}

/// A fresh token for `name` and its tokens-file line: 32 random bytes from the system's
/// source, hex, behind a `rmk_` prefix (so a leaked one is recognisable in a scan).
pub fn new_token(name: &str) -> Result<(String, String), AuthError> {
    let bytes = ringmoe_proto::secret::random_bytes().map_err(|_| AuthError::Random)?;
    let token = format!("rmk_{}", hex(&bytes));
    let line = format!("{name} sha256:{}", hex(&sha256(&token)));
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Result<TokenTable, AuthError> {
        TokenTable::parse(text, Path::new("tokens"))
    }

    #[test]
    fn a_new_token_authenticates_as_its_line_says() -> anyhow::Result<()> {
        let (ta, la) = new_token("alice")?;
        let (tb, lb) = new_token("bob")?;
        anyhow::ensure!(ta != tb && ta.starts_with("rmk_") && ta.len() == 4 + 64);
        let t = table(&format!(
            "# clients\n{la} max_input_tokens=100 max_queued_jobs=2\n\n{lb} admin  # ops\n"
        ))?;
        let a = t
            .tenant(&ta)
            .ok_or_else(|| anyhow::anyhow!("alice unknown"))?;
        assert_eq!(
            *a,
            Tenant {
                name: "alice".into(),
                admin: false,
                max_input_tokens: Some(100),
                max_queued_jobs: Some(2),
                max_jobs_per_minute: None,
            }
        );
        let b = t
            .tenant(&tb)
            .ok_or_else(|| anyhow::anyhow!("bob unknown"))?;
        assert!(b.admin && b.max_input_tokens.is_none());
        assert!(t.tenant("rmk_wrong").is_none());
        assert!(t.tenant(&ta[..ta.len() - 1]).is_none());
        Ok(())
    }

    #[test]
    fn a_client_submits_at_most_its_rate_in_any_minute() {
        let t = Tenant {
            name: "a".into(),
            admin: false,
            max_input_tokens: None,
            max_queued_jobs: None,
            max_jobs_per_minute: Some(2),
        };
        let free = Tenant {
            max_jobs_per_minute: None,
            ..t.clone()
        };
        let rate = SubmissionRate::default();
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        assert!(rate.admit(&t, at(0)).is_ok() && rate.admit(&t, at(10)).is_ok());
        let e = rate.admit(&t, at(20)).err();
        assert_eq!(
            e.as_ref().map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted)
        );
        assert!(e.is_some_and(|s| s.message().contains("allowed in 41 s")));
        // The first submission leaves the window at 60 s.
        assert!(rate.admit(&t, at(60)).is_ok());
        assert!(rate.admit(&t, at(65)).is_err());
        for _ in 0..100 {
            assert!(rate.admit(&free, at(65)).is_ok());
        }
    }

    #[test]
    fn the_sha256_is_the_standard_one() {
        // FIPS 180-2's "abc" vector: a line written by `sha256sum` matches.
        assert_eq!(
            hex(&sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn malformed_lines_are_refused_with_the_line_named() {
        let h = "0".repeat(64);
        let cases = [
            (
                "alice".to_string(),
                "line 1: 'alice' needs its token's hash",
            ),
            (format!("alice sha256:{}", &h[1..]), "64 hex digits"),
            (format!("alice sha256:{}zz", &h[2..]), "64 hex digits"),
            (format!("al/ice sha256:{h}"), "may hold only"),
            (format!("a sha256:{h} quota=3"), "unknown option 'quota=3'"),
            (format!("a sha256:{h} max_queued_jobs=0"), "positive whole"),
            (
                format!("a sha256:{h}\n#\nb sha256:{h}"),
                "line 3: 'b' has the same token",
            ),
            (
                format!("a sha256:{h}\na sha256:{}", "1".repeat(64)),
                "line 2: the client 'a' is listed twice",
            ),
        ];
        for (text, want) in cases {
            let e = table(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want), "{text:?}: {want:?} not in {e:?}");
        }
    }

    #[test]
    fn callers_see_their_own_jobs_and_admins_every_job() {
        let t = |name: &str, admin| {
            Caller::Tenant(Arc::new(Tenant {
                name: name.into(),
                admin,
                max_input_tokens: None,
                max_queued_jobs: None,
                max_jobs_per_minute: None,
            }))
        };
        assert!(t("a", false).sees(Some("a")));
        assert!(!t("a", false).sees(Some("b")));
        assert!(!t("a", false).sees(None));
        assert!(t("ops", true).sees(Some("b")) && t("ops", true).sees(None));
        assert!(Caller::Anyone.sees(Some("b")));
    }

    #[test]
    fn headers_are_checked_and_a_bad_reload_keeps_the_old_table() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokens");
        let (ta, la) = new_token("alice")?;
        std::fs::write(&path, format!("{la}\n"))?;
        let auth = Auth::open(&path)?;
        let code = |h: Option<&str>| auth.check(h, "test").err().map(|s| s.code());
        assert!(matches!(
            auth.check(Some(&format!("Bearer {ta}")), "test")?,
            Caller::Tenant(t) if t.name == "alice"
        ));
        for bad in [None, Some(""), Some(ta.as_str()), Some("Bearer rmk_00")] {
            assert_eq!(code(bad), Some(tonic::Code::Unauthenticated), "{bad:?}");
        }
        let (tb, lb) = new_token("bob")?;
        std::fs::write(&path, format!("{lb}\n"))?;
        assert_eq!(auth.reload()?, 1);
        assert!(auth.tenant(&ta).is_none() && auth.tenant(&tb).is_some());
        std::fs::write(&path, "bob sha256:nothex\n")?;
        assert!(auth.reload().is_err());
        assert!(auth.tenant(&tb).is_some(), "a bad file replaced the table");
        assert!(Auth::open(&dir.path().join("absent")).is_err());
        Ok(())
    }
}
