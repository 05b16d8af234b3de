//! The durable job store: one directory per job under `DIR/jobs/`, holding
//!
//! * `input.bin` — the token ids, u32 little-endian;
//! * `spec.json` — what to do with them ([`JobSpec`]);
//! * `state.json` — where the job is ([`JobState`]), rewritten on every coarse transition
//!   (queued, running with attempt n, retrying, done, failed, cancelled) — never for per-layer
//!   or per-token progress, which only travels on the coordinator's watch channels;
//! * `result.json` — the result, once there is one (the coordinator's `JobOutput`).
//!
//! Every file is written to a temporary name, fsynced, renamed over the final name, and the
//! directory is fsynced, so a crash leaves either the old or the new file, never a torn one.
//! [`JobStore::create`] returns only after the input, the spec and the `Queued` state are durable:
//! the coordinator acknowledges a job after that call, so an acknowledged job survives a crash.
//! A job directory without a state file is a job whose creation did not finish (never
//! acknowledged); [`JobStore::open`] removes it.
//!
//! On [`JobStore::open`], jobs that were running (loading, prefill, decode) go back to `Queued`
//! — they re-run from the start, as the job's partial results lived on workers — and finished jobs
//! stay as they are.
//!
//! **Fencing.** Coordinators elected in turn share one store. [`JobStore::open_fenced`] raises
//! the store's fence (`DIR/fence`) to the new leader's token, refusing a token below it; every
//! later write of a fenced store first checks the fence, under a lock (`DIR/fence.lock`: shared
//! by writers, exclusive while the fence is raised) so no write of an old leader can land after
//! a newer leader raised it. A refused write is [`StoreError::Fenced`], and counted.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub type JobId = u64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("job store {path}: {msg}")]
    Corrupt { path: PathBuf, msg: String },

    #[error("job {0} is not in the store")]
    UnknownJob(JobId),

    #[error("job {id}: cannot go from {from} to {to}")]
    Transition { id: JobId, from: String, to: String },

    #[error(
        "job store {path}: a newer leader (fencing token {current}) owns it; this \
         coordinator's token {token} is stale, so its write was refused"
    )]
    Fenced {
        path: PathBuf,
        token: u64,
        current: u64,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a job asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum JobMode {
    /// Continue the input by up to `max_new_tokens` tokens.
    Generate {
        max_new_tokens: u32,
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
    /// Negative log-likelihood of every token given its prefix.
    Score,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The model the job runs on, as the cluster names it.
    pub model: String,
    #[serde(flatten)]
    pub mode: JobMode,
    /// `dense`, `a-shape` or `vertical-slash`.
    pub attention: String,
    /// Higher runs first.
    pub priority: i32,
    /// The client (tenant) that submitted it, when clients authenticate: only it (or an admin)
    /// sees the job. Absent in jobs stored before authentication existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl JobSpec {
    /// What stands for a job whose `spec.json` cannot be read: no model, no owner (so only an
    /// admin or an unauthenticated coordinator lists it).
    fn damaged() -> Self {
        Self {
            model: String::new(),
            mode: JobMode::Score,
            attention: "dense".into(),
            priority: 0,
            owner: None,
        }
    }
}

/// Where a job is. Transitions: queued → running (attempt n) → done, with retrying → running
/// again after a lost worker, failed or cancelled possible from any unfinished state, and (on
/// restart only) running → queued. `Loading`, `Prefill` and `Decode` are the finer phases a
/// watcher sees; the coordinator publishes them without storing them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    Queued,
    /// A run of the job (attempt 0 first, then one per retry) was started on the workers.
    Running {
        attempt: u32,
    },
    Loading,
    Prefill {
        layer: u32,
        layers: u32,
    },
    Decode {
        token: u32,
        tokens: u32,
    },
    /// A worker was lost; the job runs again (attempt `attempt`) on the workers left.
    Retrying {
        attempt: u32,
        reason: String,
    },
    Done,
    Failed {
        message: String,
    },
    Cancelled,
}

impl JobState {
    pub fn is_finished(&self) -> bool {
        matches!(self, Self::Done | Self::Failed { .. } | Self::Cancelled)
    }

    pub fn is_running(&self) -> bool {
        matches!(
            self,
            Self::Running { .. }
                | Self::Loading
                | Self::Prefill { .. }
                | Self::Decode { .. }
                | Self::Retrying { .. }
        )
    }

    fn rank(&self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Loading | Self::Retrying { .. } | Self::Running { .. } => 1,
            Self::Prefill { .. } => 2,
            Self::Decode { .. } => 3,
            Self::Done | Self::Failed { .. } | Self::Cancelled => 4,
        }
    }

    fn name(&self) -> String {
        match self {
            Self::Prefill { layer, layers } => format!("prefill (layer {layer} of {layers})"),
            Self::Decode { token, tokens } => format!("decode (token {token} of {tokens})"),
            Self::Retrying { attempt, .. } => format!("retrying (attempt {attempt})"),
            Self::Running { attempt } => format!("running (attempt {attempt})"),
            other => format!("{other:?}").to_lowercase(),
        }
    }

    /// Whether a job in `self` may move to `to`: forward only (progress within a phase counts),
    /// never out of a finished state.
    fn may_become(&self, to: &JobState) -> bool {
        if self.is_finished() {
            return false;
        }
        let retry = matches!(to, JobState::Retrying { .. }) && self.is_running();
        retry || to.is_finished() || to.rank() >= self.rank()
    }
}

/// A job as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Number of input tokens (the tokens themselves stay on disk until [`JobStore::input`]).
    pub input_len: usize,
}

/// What [`JobStore::open`] found.
#[derive(Debug)]
pub struct Recovered {
    /// Every complete job, by id; running ones are back in `Queued`.
    pub jobs: Vec<StoredJob>,
    /// Ids of the jobs that were running and were re-queued.
    pub requeued: Vec<JobId>,
    /// Job directories removed because their creation never finished (no state file).
    pub discarded: Vec<PathBuf>,
    /// Jobs whose files are damaged (unreadable spec, state or input), with what is wrong.
    /// They are in `jobs` as failed with that reason, and their files are left as found for
    /// the operator: one damaged job never stops the coordinator from starting.
    pub damaged: Vec<(JobId, String)>,
}

/// A stored job's state and input length in tokens (its spec was read first).
fn state_and_len(dir: &Path) -> Result<(JobState, u64)> {
    let state: JobState = read_json(&dir.join("state.json"))?;
    let input = dir.join("input.bin");
    let len = fs::metadata(&input).map_err(io(&input))?.len();
    if len % 4 != 0 {
        return Err(StoreError::Corrupt {
            path: input,
            msg: format!("{len} bytes is not a whole number of u32 token ids"),
        });
    }
    Ok((state, len / 4))
}

/// The job store. Its methods do blocking file I/O: call them off the async threads
/// (`spawn_blocking`), as the coordinator does.
#[derive(Debug)]
pub struct JobStore {
    jobs_dir: PathBuf,
    next: Mutex<JobId>,
    /// fsync calls made so far (files and directories), for the per-job cost in logs and tests.
    fsyncs: AtomicU64,
    /// The leader's fence, when the store is shared by elected coordinators.
    fence: Option<Fence>,
}

/// A leader's fencing token in a store, and the writes it had refused.
#[derive(Debug)]
struct Fence {
    dir: PathBuf,
    token: u64,
    refused: AtomicU64,
}

impl Fence {
    fn lock_file(dir: &Path) -> Result<File> {
        let path = dir.join("fence.lock");
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))
    }

    /// The token the store is fenced at now (0: never fenced).
    fn current(dir: &Path) -> Result<u64> {
        let path = dir.join("fence");
        match fs::read_to_string(&path) {
            Ok(t) => t.trim().parse().map_err(|e| StoreError::Corrupt {
                path,
                msg: format!("not a fencing token: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Raises the store's fence to `token` (refused when a newer leader's is there already).
    fn raise(dir: &Path, token: u64, fsyncs: &AtomicU64) -> Result<Self> {
        let lock = Self::lock_file(dir)?;
        let lock_path = dir.join("fence.lock");
        lock.lock().map_err(io(&lock_path))?;
        let current = Self::current(dir)?;
        if current > token {
            return Err(StoreError::Fenced {
                path: dir.to_path_buf(),
                token,
                current,
            });
        }
        write_durable(&dir.join("fence"), token.to_string().as_bytes(), fsyncs)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            token,
            refused: AtomicU64::new(0),
        })
    }

    /// Holds the fence lock shared while a write happens, once the fence is still this one's.
    fn check(&self) -> Result<File> {
        let lock = Self::lock_file(&self.dir)?;
        lock.lock_shared()
            .map_err(io(&self.dir.join("fence.lock")))?;
        let current = Self::current(&self.dir)?;
        if current > self.token {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Fenced {
                path: self.dir.clone(),
                token: self.token,
                current,
            });
        }
        Ok(lock)
    }
}

/// Writes `bytes` to `path` atomically and durably (temp file, fsync, rename, fsync dir).
fn write_durable(path: &Path, bytes: &[u8], fsyncs: &AtomicU64) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fsyncs.fetch_add(1, Ordering::Relaxed);
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir, fsyncs)
}

fn sync_dir(dir: &Path, fsyncs: &AtomicU64) -> Result<()> {
    fsyncs.fetch_add(1, Ordering::Relaxed);
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain data types of this module always serialise.
    serde_json::to_vec_pretty(v).unwrap_or_default()
}

impl JobStore {
    /// Opens (creating if needed) the store in `dir` and recovers its jobs.
    pub fn open(dir: &Path) -> Result<(Self, Recovered)> {
        Self::open_with(dir, None)
    }

    /// Opens the store as the elected leader holding fencing token `token`: raises the fence
    /// first (refused when a newer leader raised it higher), so from then on no write of an
    /// earlier leader lands, and checks it before each of its own writes.
    pub fn open_fenced(dir: &Path, token: u64) -> Result<(Self, Recovered)> {
        Self::open_with(dir, Some(token))
    }

    /// The fencing token this store was opened with (0: unfenced). The leader presents the
    /// same token to its workers.
    pub fn fence_token(&self) -> u64 {
        self.fence.as_ref().map_or(0, |f| f.token)
    }

    /// Writes refused because a newer leader fenced the store.
    pub fn stale_writes_refused(&self) -> u64 {
        self.fence
            .as_ref()
            .map_or(0, |f| f.refused.load(Ordering::Relaxed))
    }

    /// The fence lock held (shared) for one write, or the refusal of a stale leader's write.
    fn guard(&self) -> Result<Option<File>> {
        self.fence.as_ref().map(Fence::check).transpose()
    }

    fn open_with(dir: &Path, token: Option<u64>) -> Result<(Self, Recovered)> {
        let jobs_dir = dir.join("jobs");
        fs::create_dir_all(&jobs_dir).map_err(io(&jobs_dir))?;
        let fence = token
            .map(|t| Fence::raise(dir, t, &AtomicU64::new(0)))
            .transpose()?;
        let mut recovered = Recovered {
            jobs: Vec::new(),
            requeued: Vec::new(),
            discarded: Vec::new(),
            damaged: Vec::new(),
        };
        let mut max_id = 0;
        let fsyncs = AtomicU64::new(0);
        for entry in fs::read_dir(&jobs_dir).map_err(io(&jobs_dir))? {
            let path = entry.map_err(io(&jobs_dir))?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<JobId>().ok())
            else {
                continue; // not a job directory
            };
            max_id = max_id.max(id);
            if !path.join("state.json").exists() {
                fs::remove_dir_all(&path).map_err(io(&path))?;
                recovered.discarded.push(path);
                continue;
            }
            let (spec, rest) = match read_json::<JobSpec>(&path.join("spec.json")) {
                Ok(spec) => (Some(spec), state_and_len(&path)),
                Err(e) => (None, Err(e)),
            };
            let (spec, (mut state, len)) = match (spec, rest) {
                (Some(spec), Ok(rest)) => (spec, rest),
                (spec, Err(e)) => {
                    let message = format!("the job's files are damaged: {e}");
                    recovered.damaged.push((id, e.to_string()));
                    recovered.jobs.push(StoredJob {
                        id,
                        spec: spec.unwrap_or_else(JobSpec::damaged),
                        state: JobState::Failed { message },
                        input_len: 0,
                    });
                    continue;
                }
                // A spec that could not be read is an error above.
                (None, Ok(_)) => continue,
            };
            if state.is_running() {
                state = JobState::Queued;
                let _held = fence.as_ref().map(Fence::check).transpose()?;
                write_durable(&path.join("state.json"), &to_json(&state), &fsyncs)?;
                recovered.requeued.push(id);
            }
            recovered.jobs.push(StoredJob {
                id,
                spec,
                state,
                input_len: len as usize,
            });
        }
        sync_dir(&jobs_dir, &fsyncs)?;
        recovered.jobs.sort_by_key(|j| j.id);
        recovered.requeued.sort_unstable();
        recovered.damaged.sort_by_key(|d| d.0);
        Ok((
            Self {
                jobs_dir,
                next: Mutex::new(max_id + 1),
                fsyncs,
                fence,
            },
            recovered,
        ))
    }

    fn job_dir(&self, id: JobId) -> PathBuf {
        self.jobs_dir.join(id.to_string())
    }

    /// Stores a new job durably in `Queued` and returns its id; acknowledge it only after this.
    pub fn create(&self, spec: &JobSpec, tokens: &[u32]) -> Result<JobId> {
        let _held = self.guard()?;
        let id = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let id = *next;
            *next += 1;
            id
        };
        let dir = self.job_dir(id);
        fs::create_dir(&dir).map_err(io(&dir))?;
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let f = &self.fsyncs;
        write_durable(&dir.join("input.bin"), &bytes, f)?;
        write_durable(&dir.join("spec.json"), &to_json(spec), f)?;
        // The state file last: its presence marks a complete, acknowledged job.
        write_durable(&dir.join("state.json"), &to_json(&JobState::Queued), f)?;
        sync_dir(&self.jobs_dir, f)?;
        Ok(id)
    }

    pub fn state(&self, id: JobId) -> Result<JobState> {
        let path = self.job_dir(id).join("state.json");
        if !path.exists() {
            return Err(StoreError::UnknownJob(id));
        }
        read_json(&path)
    }

    /// Records a transition durably; refuses to move backwards or out of a finished state.
    pub fn set_state(&self, id: JobId, to: JobState) -> Result<()> {
        let _held = self.guard()?;
        let from = self.state(id)?;
        if !from.may_become(&to) {
            return Err(StoreError::Transition {
                id,
                from: from.name(),
                to: to.name(),
            });
        }
        write_durable(
            &self.job_dir(id).join("state.json"),
            &to_json(&to),
            &self.fsyncs,
        )
    }

    /// fsync calls this store has made since it was opened.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// The job's input tokens.
    pub fn input(&self, id: JobId) -> Result<Vec<u32>> {
        let path = self.job_dir(id).join("input.bin");
        if !path.exists() {
            return Err(StoreError::UnknownJob(id));
        }
        let bytes = fs::read(&path).map_err(io(&path))?;
        if bytes.len() % 4 != 0 {
            return Err(StoreError::Corrupt {
                path,
                msg: format!(
                    "{} bytes is not a whole number of u32 token ids",
                    bytes.len()
                ),
            });
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Stores the job's result (the coordinator's `JobOutput`; any serialisable value).
    pub fn put_result<T: Serialize>(&self, id: JobId, result: &T) -> Result<()> {
        let dir = self.job_dir(id);
        if !dir.join("state.json").exists() {
            return Err(StoreError::UnknownJob(id));
        }
        let _held = self.guard()?;
        write_durable(&dir.join("result.json"), &to_json(result), &self.fsyncs)
    }

    /// The job's stored result, read as `T`; `None` before there is one.
    pub fn result<T: DeserializeOwned>(&self, id: JobId) -> Result<Option<T>> {
        let path = self.job_dir(id).join("result.json");
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            model: "qwen3-moe-tiny".into(),
            mode: JobMode::Generate {
                max_new_tokens: 8,
                temperature: 0.0,
                top_p: 1.0,
                seed: 3,
            },
            attention: "dense".into(),
            priority: 0,
            owner: None,
        }
    }

    #[test]
    fn transitions_only_move_forward() {
        let p = |layer| JobState::Prefill { layer, layers: 4 };
        assert!(JobState::Queued.may_become(&JobState::Loading));
        assert!(p(1).may_become(&p(2)));
        assert!(p(3).may_become(&JobState::Decode {
            token: 0,
            tokens: 5
        }));
        assert!(p(3).may_become(&JobState::Cancelled));
        assert!(
            !JobState::Decode {
                token: 0,
                tokens: 5
            }
            .may_become(&p(0))
        );
        assert!(!JobState::Done.may_become(&JobState::Queued));
        assert!(!JobState::Cancelled.may_become(&JobState::Done));
    }

    #[test]
    fn spec_json_is_flat_and_readable() {
        let v = serde_json::to_value(spec()).unwrap();
        assert_eq!(v["mode"], "generate");
        assert_eq!(v["max_new_tokens"], 8);
        let back: JobSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, spec());
    }
}
