//! The trained needle model (`tests/fixtures/needle-moe`, `scripts/train_needle.py`) through
//! `ringmoe eval niah`: a 64K-token needle case as generate jobs through `serve --workers 4`
//! finds the needle, and the cluster answers every case as the single process does; `eval nll`
//! scores the same document alike both ways.

#[allow(dead_code)]
mod common;

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use common::procs::start;
use ringmoe_testkit::fixture;

fn eval(args: &[&str], out: &Path) -> Result<serde_json::Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_ringmoe"))
        .args(["eval", "niah"])
        .args(args)
        .args(["--out", out.to_str().context("path")?])
        .output()?;
    ensure!(
        o.status.success(),
        "eval niah {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    ensure!(stdout.contains("recall"), "no summary line: {stdout}");
    Ok(serde_json::from_str(&std::fs::read_to_string(
        out.join("results.json"),
    )?)?)
}

/// One cell of results.json: (length, depth, answers, expected).
type Cell = (u64, f64, Vec<u64>, Vec<u64>);

fn answers(v: &serde_json::Value) -> Result<Vec<Cell>> {
    let ids = |x: &serde_json::Value| -> Vec<u64> {
        x.as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default()
    };
    v["cells"]
        .as_array()
        .context("cells")?
        .iter()
        .map(|c| {
            Ok((
                c["length"].as_u64().context("length")?,
                c["depth"].as_f64().context("depth")?,
                ids(&c["answers"]),
                ids(&c["expected"]),
            ))
        })
        .collect()
}

#[test]
fn a_64k_needle_through_serve_with_4_workers_is_found_as_in_one_process() -> Result<()> {
    let dir = fixture("needle-moe");
    let task = dir.join("needle.json");
    let (dir_s, task_s) = (
        dir.to_str().context("path")?,
        task.to_str().context("path")?,
    );
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("jobs");
    let model_arg = format!("needle={dir_s}");
    let (_serve, addr) = start(
        "serve",
        &[
            "serve",
            "--model",
            &model_arg,
            "--workers",
            "4",
            "--addr",
            "127.0.0.1:0",
            "--store",
            store.to_str().context("path")?,
        ],
        tmp.path(),
    )?;
    let cases = [
        "--lengths",
        "300,4K,64K",
        "--depths",
        "0,0.5,1",
        "--trials",
        "1",
        "--seed",
        "7",
    ];
    let mut cluster_args = vec!["--addr", addr.as_str(), "--task", task_s];
    cluster_args.extend(cases);
    let cluster = answers(&eval(&cluster_args, &tmp.path().join("cluster"))?)?;
    let mut local_args = vec!["--model", dir_s];
    local_args.extend(cases);
    let local = answers(&eval(&local_args, &tmp.path().join("local"))?)?;
    ensure!(
        cluster == local,
        "the cluster answered {cluster:?}, one process {local:?}"
    );
    ensure!(cluster.len() == 9, "{} cells", cluster.len());
    for (len, depth, got, want) in &cluster {
        if *len == 64 * 1024 && *depth == 0.5 {
            ensure!(
                got == want,
                "64K at depth 0.5: answered {got:?}, the needle holds {want:?}"
            );
        }
    }
    // eval nll: the same synthetic document scored as a job on the 4 workers and in one
    // process gives the same bucketed NLL.
    let nll = |args: &[&str], out: &Path| -> Result<Vec<f64>> {
        let o = Command::new(env!("CARGO_BIN_EXE_ringmoe"))
            .args(["eval", "nll", "--synthetic", "2K", "--segment", "128"])
            .args(args)
            .args(["--out", out.to_str().context("path")?])
            .output()?;
        ensure!(
            o.status.success(),
            "eval nll {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ensure!(out.join("nll.png").exists(), "no nll.png");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("nll.json"))?)?;
        ensure!(v["tokens"] == 2048, "{}", v["tokens"]);
        v["buckets"]
            .as_array()
            .context("buckets")?
            .iter()
            .map(|b| b["mean_nll"].as_f64().context("mean_nll"))
            .collect()
    };
    let remote = nll(
        &["--addr", &addr, "--task", task_s],
        &tmp.path().join("nll-cluster"),
    )?;
    let local = nll(&["--model", dir_s], &tmp.path().join("nll-local"))?;
    ensure!(remote.len() == local.len() && !local.is_empty());
    let d = remote
        .iter()
        .zip(&local)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    ensure!(
        d <= 1e-4,
        "bucketed NLL: cluster and one process differ by {d:e}"
    );
    Ok(())
}
