//! `ringmoe status`: the cluster as the coordinator sees it — workers and their state, the
//! expert placement of each model, measured and expected expert load, the queue and the
//! autoscaling signal — as a table, or as JSON (`--json`, keys fixed for tools).

use anyhow::Result;
use clap::Args;
use ringmoe_proto::client;
use ringmoe_proto::proto;
use serde_json::json;

use crate::cluster_cmd::{LimitOpts, runtime};
use crate::security_opts::{ClientTokenOpts, TlsOpts};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The coordinator's address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// Print one JSON object with the keys `workers`, `placements`, `expert_imbalance`,
    /// `desired_workers`, `queued_jobs`, `queued_tokens`, `running_jobs`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    token: ClientTokenOpts,
    #[command(flatten)]
    limits: LimitOpts,
    #[command(flatten)]
    tls: TlsOpts,
}

pub fn status(a: StatusArgs) -> Result<()> {
    let token = a.token.token()?;
    let tls = a.tls.load(false)?;
    let s = runtime()?.block_on(async {
        let mut c = client::connect_with(
            &a.addr,
            a.limits.max_message_bytes,
            token.as_deref(),
            tls.as_ref(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", a.addr, e.message()))?;
        c.get_cluster_status(proto::ClusterStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| anyhow::anyhow!("{}: {}", a.addr, e.message()))
    })?;
    if a.json {
        println!("{}", to_json(&s));
    } else {
        print!("{}", table(&s));
    }
    Ok(())
}

/// The `--json` form (its keys are a contract: tools and the tests read them).
pub fn to_json(s: &proto::ClusterStatus) -> serde_json::Value {
    json!({
        "workers": s.workers.iter().map(|w| json!({
            "id": w.id,
            "address": w.addr,
            "device": w.device,
            "state": w.state,
            "group": w.group,
            "kv_budget_bytes": w.kv_budget_bytes,
            "expected_load": w.expected_load,
            "measured_load": w.measured_load,
        })).collect::<Vec<_>>(),
        "placements": s.placements.iter().map(|p| json!({
            "model": p.model,
            "version": p.version,
            "group": p.group,
            "workers": p.workers,
            "expert_imbalance": p.expert_imbalance,
            "planned_imbalance": p.planned_imbalance,
            "rebalances": p.rebalances,
            "rebalancing_to": (p.rebalancing_to > 0).then_some(p.rebalancing_to),
            "measured_version": p.measured_version,
        })).collect::<Vec<_>>(),
        "expert_imbalance": s.expert_imbalance,
        "desired_workers": s.desired_workers,
        "queued_jobs": s.queued_jobs,
        "queued_tokens": s.queued_tokens,
        "running_jobs": s.running_jobs,
    })
}

fn table(s: &proto::ClusterStatus) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "jobs: {} running, {} queued ({} tokens); desired workers: {}; expert imbalance: {:.2}",
        s.running_jobs, s.queued_jobs, s.queued_tokens, s.desired_workers, s.expert_imbalance
    );
    let _ = writeln!(
        o,
        "\n{:<24} {:<8} {:<9} {:>5} {:>12} {:>12}",
        "WORKER", "DEVICE", "STATE", "GROUP", "EXPECTED", "MEASURED"
    );
    for w in &s.workers {
        let _ = writeln!(
            o,
            "{:<24} {:<8} {:<9} {:>5} {:>12.0} {:>12.0}",
            w.id, w.device, w.state, w.group, w.expected_load, w.measured_load
        );
    }
    let _ = writeln!(
        o,
        "\n{:<16} {:>7} {:>5} {:>9} {:>8} {:>10}  WORKERS",
        "MODEL", "VERSION", "GROUP", "MEASURED", "PLANNED", "REBALANCES"
    );
    for p in &s.placements {
        let to = if p.rebalancing_to > 0 {
            format!(" → v{} loading", p.rebalancing_to)
        } else {
            String::new()
        };
        let _ = writeln!(
            o,
            "{:<16} {:>7} {:>5} {:>9.2} {:>8.2} {:>10}  {}{to}",
            p.model,
            p.version,
            p.group,
            p.expert_imbalance,
            p.planned_imbalance,
            p.rebalances,
            p.workers.join(",")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_has_exactly_the_documented_keys() {
        let s = proto::ClusterStatus {
            workers: vec![proto::WorkerStatus {
                id: "w0".into(),
                state: "ready".into(),
                ..Default::default()
            }],
            placements: vec![proto::ModelPlacement {
                model: "m".into(),
                version: 3,
                ..Default::default()
            }],
            expert_imbalance: 1.5,
            desired_workers: 4,
            queued_jobs: 2,
            queued_tokens: 100,
            running_jobs: 1,
        };
        let v = to_json(&s);
        let mut keys: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "desired_workers",
                "expert_imbalance",
                "placements",
                "queued_jobs",
                "queued_tokens",
                "running_jobs",
                "workers"
            ]
        );
        assert_eq!(v["workers"][0]["state"], "ready");
        assert_eq!(v["placements"][0]["version"], 3);
        assert!(v["placements"][0]["rebalancing_to"].is_null());
        assert!(table(&s).contains("desired workers: 4"));
    }
}
