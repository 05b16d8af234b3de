//! Membership against a real etcd, started by the test.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ringmoe_cluster::membership::etcd::{EtcdMembership, EtcdOptions};
use ringmoe_cluster::membership::{MemberEvent, Membership, WorkerRecord};
use ringmoe_cluster::testkit::Etcd;

fn rec(id: &str) -> WorkerRecord {
    WorkerRecord {
        id: id.into(),
        addr: format!("127.0.0.1:{}", 1000 + id.len()),
        device: "cpu".into(),
        kv_budget_bytes: 1 << 30,
    }
}

async fn next(
    rx: &mut tokio::sync::mpsc::Receiver<MemberEvent>,
    within: Duration,
) -> Result<MemberEvent> {
    tokio::time::timeout(within, rx.recv())
        .await
        .context("no membership event in time")?
        .context("watch closed")
}

#[test]
fn etcd_membership_registers_watches_and_expires_leases() -> Result<()> {
    let etcd = Etcd::start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let opts = EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            cluster: "t".into(),
            user: None,
        };
        let m = EtcdMembership::connect(opts.clone()).await?;
        let (now, mut rx) = m.watch().await?;
        ensure!(now.is_empty(), "{now:?}");
        let reg = m.register(rec("a"), Duration::from_secs(1)).await?;
        ensure!(next(&mut rx, Duration::from_secs(2)).await? == MemberEvent::Put(rec("a")));
        // Kept alive well past its TTL.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        ensure!(m.list().await? == vec![rec("a")]);
        ensure!(!reg.is_lost());
        // A dropped registration leaves at once.
        drop(reg);
        ensure!(next(&mut rx, Duration::from_secs(2)).await? == MemberEvent::Removed("a".into()));
        // A record whose owner died (a lease nobody renews) goes when the lease ends.
        let mut c = opts.connect().await?;
        let lease = c.lease_grant(1, None).await?.id();
        let value = serde_json::to_string(&rec("dead"))?;
        c.put(
            opts.key("workers/dead"),
            value,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await?;
        let t = Instant::now();
        ensure!(next(&mut rx, Duration::from_secs(2)).await? == MemberEvent::Put(rec("dead")));
        ensure!(
            next(&mut rx, Duration::from_secs(4)).await? == MemberEvent::Removed("dead".into())
        );
        let took = t.elapsed();
        ensure!(
            took < Duration::from_millis(2500),
            "removed after {took:?} for a 1 s lease"
        );
        anyhow::Ok(())
    })
}
