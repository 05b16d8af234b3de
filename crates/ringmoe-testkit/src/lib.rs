//! `ringmoe-testkit`: helpers the tests of several crates share (dev-dependency only; nothing
//! here ships in a binary).
//!
//! * [`fixture`] — the path of a tiny model under `tests/fixtures`;
//! * [`max_abs_diff`] — the largest element-wise difference of two vectors;
//! * [`cluster`] — a ringmoe cluster on a test network, one namespace per process;
//! * [`etcd`] — a real etcd on free loopback ports, plain or TLS;
//! * [`process`] — a child process killed on drop, its stdout lines readable as they come;
//! * [`netns`] — a test network: one network namespace per host, links to cut and heal;
//! * [`proxy`] — a userspace TCP proxy that makes a link slow, late, stalled or reset.

pub mod cluster;
pub mod etcd;
pub mod netns;
pub mod process;
pub mod proxy;

pub use cluster::{CLUSTER_MODEL_CONFIG, CLUSTER_MODEL_SEED, ClusterSpec, NsCluster};
pub use etcd::{Etcd, TlsFiles, make_certs, sign_cert};
pub use netns::TestNet;
pub use process::Proc;
pub use proxy::Proxy;

use std::path::{Path, PathBuf};

/// The committed fixture models (`scripts/make_fixtures.py`), one per architecture plus a bf16
/// checkpoint.
pub const MODEL_FIXTURES: [&str; 4] = [
    "mixtral-tiny",
    "mixtral-tiny-bf16",
    "qwen3-moe-tiny",
    "qwen2-moe-tiny",
];

/// One f32 fixture per architecture, plus the two with sliding windows of 16 tokens (their
/// reference prompts of 64 and 300 tokens cross the window): what the "every fixture" parity
/// tests of the single process, the ring and expert parallelism run.
pub const ARCH_FIXTURES: [&str; 5] = [
    "mixtral-tiny",
    "qwen3-moe-tiny",
    "qwen2-moe-tiny",
    "qwen2-moe-window",
    "mixtral-window",
];

/// A fixture model directory under the workspace's `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The largest `|a[i] - b[i]|`; panics (failing the test) when the lengths differ.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(
        a.len(),
        b.len(),
        "compared vectors differ in length: {} and {}",
        a.len(),
        b.len()
    );
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fixtures_are_where_the_helper_says() {
        assert!(super::fixture("mixtral-tiny").join("config.json").exists());
    }

    #[test]
    fn max_abs_diff_takes_the_largest_gap() {
        assert_eq!(
            super::max_abs_diff(&[1.0, -2.0, 3.0], &[1.5, 2.0, 3.0]),
            4.0
        );
    }
}
