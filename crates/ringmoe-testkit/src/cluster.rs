//! A ringmoe cluster on a [`TestNet`]: etcd on host 0, coordinators on the hosts after it
//! (sharing one job store, the first started is the leader, the others wait as standbys),
//! workers on the hosts after those, each started inside its namespace with `--addr` (and the
//! worker's `--data-host`) on its own address. Processes are [`Proc`]s (killed on drop), their
//! logs `DIR/coordinator-K.log` and `DIR/worker-W.log`, appended to across restarts.
//!
//! The binary is the caller's (`ringmoe`, as the integration tests and `scripts/chaos.sh` build
//! it); this module only starts and stops processes: talking to the cluster is the caller's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Etcd, Proc, TestNet};

/// The `config.json` of the random model the namespaced tests and the chaos run serve (a
/// Mixtral of hidden 128, 2 layers, 4 experts top-2, vocabulary 512, positions to 64K): small
/// enough for a 32K-token job in seconds on two cores. Write it with
/// `ringmoe_model::write_random_checkpoint` (seed [`CLUSTER_MODEL_SEED`]).
pub const CLUSTER_MODEL_CONFIG: &str = r#"{
    "architectures": ["MixtralForCausalLM"], "vocab_size": 512, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 65536, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
    "eos_token_id": 9999
}"#;

/// The weights' seed of that model.
pub const CLUSTER_MODEL_SEED: u64 = 7;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `ringmoe` binary.
    pub bin: PathBuf,
    /// `NAME=PATH` of the model the coordinators serve.
    pub model: String,
    pub coordinators: usize,
    pub workers: usize,
    /// Jobs wait until this many workers are live.
    pub min_workers: usize,
    /// The coordinators' leadership lease.
    pub leader_ttl_secs: u64,
    /// The workers' membership lease.
    pub worker_ttl_secs: u64,
    /// More arguments for every coordinator.
    pub coordinator_args: Vec<String>,
}

/// The running cluster (see the module docs).
pub struct NsCluster {
    pub spec: ClusterSpec,
    pub net: TestNet,
    pub etcd: Etcd,
    /// Coordinator `k`, `None` while stopped.
    pub coordinators: Vec<Option<Proc>>,
    /// Coordinator `k`'s gRPC address.
    pub addrs: Vec<String>,
    /// Worker `w`, `None` while stopped.
    pub workers: Vec<Option<Proc>>,
    /// Logs and the job store.
    pub dir: PathBuf,
}

/// Each process's gRPC port on its own address.
const COORDINATOR_PORT: u16 = 7070;
const WORKER_PORT: u16 = 7071;

impl NsCluster {
    /// Starts etcd and the coordinators; returns once the first leads (and so serves). Workers are
    /// the caller's to start: [`NsCluster::start_workers`], or [`NsCluster::spawn_worker`]
    /// with a [`NsCluster::worker_command`] of its own.
    pub fn start(spec: ClusterSpec, dir: &Path) -> std::io::Result<Self> {
        let net = TestNet::new(1 + spec.coordinators + spec.workers)?;
        let etcd = Etcd::start_in(&net, 0)?;
        let addrs = (0..spec.coordinators)
            .map(|k| format!("{}:{COORDINATOR_PORT}", net.hosts[1 + k].addr))
            .collect();
        let mut c = Self {
            coordinators: (0..spec.coordinators).map(|_| None).collect(),
            workers: (0..spec.workers).map(|_| None).collect(),
            addrs,
            spec,
            net,
            etcd,
            dir: dir.to_path_buf(),
        };
        for k in 0..c.spec.coordinators {
            let p = c.spawn_coordinator(k)?;
            if k == 0 {
                // The first leads before the others start, so they wait as standbys: every
                // coordinator binds its port at once ("listening on"), but a standby started
                // while the first still campaigns may win the election instead.
                p.line_after("listening on ", Duration::from_secs(30))?;
                p.log_line("elected leader", Duration::from_secs(30))?;
            }
            c.coordinators[k] = Some(p);
        }
        Ok(c)
    }

    /// Starts every worker with its plain command; returns once all listen.
    pub fn start_workers(&mut self) -> std::io::Result<()> {
        for w in 0..self.spec.workers {
            self.workers[w] = Some(self.spawn_worker(w, self.worker_command(w))?);
        }
        Ok(())
    }

    pub fn coordinator_host(&self, k: usize) -> usize {
        1 + k
    }

    pub fn worker_host(&self, w: usize) -> usize {
        1 + self.spec.coordinators + w
    }

    /// Worker `w`'s gRPC address on its own host.
    pub fn worker_addr(&self, w: usize) -> String {
        format!("{}:{WORKER_PORT}", self.net.hosts[self.worker_host(w)].addr)
    }

    /// Starts coordinator `k` (not waiting: a standby serves only once elected).
    pub fn spawn_coordinator(&self, k: usize) -> std::io::Result<Proc> {
        let s = &self.spec;
        let mut cmd = self
            .net
            .command(self.coordinator_host(k), &s.bin.to_string_lossy());
        cmd.args(["coordinator", "--addr", &self.addrs[k], "--cluster", "t"])
            .args(["--etcd", &self.etcd.endpoint()])
            .args(["--min-workers", &s.min_workers.to_string()])
            .args(["--leader-ttl-secs", &s.leader_ttl_secs.to_string()])
            .arg("--store")
            .arg(self.dir.join("store"))
            .args(["--model", &s.model])
            .args(&s.coordinator_args)
            .env("RUST_LOG", "info");
        Proc::spawn(&format!("coordinator-{k}"), cmd, &self.dir)
    }

    /// Worker `w`'s command: `--addr` and `--data-host` on its own address, its membership
    /// through etcd; callers may add arguments (`--advertise`) before [`NsCluster::spawn_worker`].
    pub fn worker_command(&self, w: usize) -> Command {
        let host = self.worker_host(w);
        let me = self.net.hosts[host].addr.to_string();
        let mut cmd = self.net.command(host, &self.spec.bin.to_string_lossy());
        cmd.args(["worker", "--etcd", &self.etcd.endpoint(), "--cluster", "t"])
            .args(["--lease-ttl-secs", &self.spec.worker_ttl_secs.to_string()])
            .args(["--addr", &self.worker_addr(w), "--data-host", &me])
            .env("RUST_LOG", "info");
        cmd
    }

    /// Starts worker `w` with `cmd` and waits until it listens.
    pub fn spawn_worker(&self, w: usize, cmd: Command) -> std::io::Result<Proc> {
        let p = Proc::spawn(&format!("worker-{w}"), cmd, &self.dir)?;
        p.line_after("listening on ", Duration::from_secs(30))?;
        Ok(p)
    }

    /// Everything `name` (`coordinator-0`, `worker-2`) logged so far, across restarts.
    pub fn log(&self, name: &str) -> std::io::Result<String> {
        std::fs::read_to_string(self.dir.join(format!("{name}.log")))
    }
}
