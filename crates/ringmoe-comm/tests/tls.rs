//! The data plane over TLS: every collective gives the reference result with mutually
//! authenticated TLS on every link; a rank without TLS, or with a certificate of another CA,
//! is refused at rendezvous.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use ringmoe_comm::local::{on_every_rank, tcp_group};
use ringmoe_comm::{Communicator, DataTls, TcpOptions, tcp, testkit};

fn data_tls(cert: &Path, key: &Path, ca: &Path) -> Result<DataTls> {
    let (server, client) = ringmoe_proto::tls::data_plane(&ringmoe_proto::tls::TlsFiles {
        cert: Some(cert.to_path_buf()),
        key: Some(key.to_path_buf()),
        ca: Some(ca.to_path_buf()),
    })?;
    Ok(DataTls { server, client })
}

fn opts(tls: Option<DataTls>) -> TcpOptions {
    TcpOptions {
        session: 7,
        token: [9; 32],
        connect_timeout: Duration::from_millis(1500),
        tls,
        ..TcpOptions::default()
    }
}

/// Rank `i` joins with `opts[i]`; the rendezvous result of every rank.
fn join_each(opts: &[TcpOptions]) -> Result<Vec<ringmoe_comm::Result<Communicator>>> {
    let listeners: Vec<TcpListener> = opts
        .iter()
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<_>>()?;
    let addrs = &addrs;
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .zip(opts)
            .enumerate()
            .map(|(rank, (l, o))| s.spawn(move || tcp(rank, l, addrs, o, Duration::from_secs(5))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    }))
}

#[test]
fn collectives_over_mutual_tls_match_the_reference_and_strangers_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ours = ringmoe_testkit::make_certs(&dir.path().join("ca"))?;
    let theirs = ringmoe_testkit::make_certs(&dir.path().join("other-ca"))?;
    // A data-plane certificate need not name the address dialled: this one names another host.
    let (cert, key) = ringmoe_testkit::sign_cert(&dir.path().join("ca"), "w", "DNS:w.example")?;
    let good = data_tls(&cert, &key, &ours.ca)?;
    let good2 = data_tls(&ours.server_cert, &ours.server_key, &ours.ca)?;

    let comms = tcp_group(3, &opts(Some(good.clone())), Duration::from_secs(10))?;
    for (r, res) in on_every_rank(&comms, |c| testkit::exercise_all(c, 11, 2))
        .into_iter()
        .enumerate()
    {
        res.map_err(|e| anyhow!("rank {r}: {e}"))?;
    }
    // Mixed certificates of the one CA are fine.
    let res = join_each(&[opts(Some(good.clone())), opts(Some(good2))])?;
    ensure!(res.iter().all(Result::is_ok), "two certificates of one CA");

    // One rank without TLS, or holding another CA's certificate: the group does not form, and
    // each rank says which peer it could not reach.
    let rogue = data_tls(&theirs.server_cert, &theirs.server_key, &theirs.ca)?;
    for (what, stranger) in [("plain TCP", None), ("another CA", Some(rogue))] {
        for pos in [0, 1] {
            let mut o = vec![opts(Some(good.clone())), opts(Some(good.clone()))];
            o[pos] = opts(stranger.clone());
            let res = join_each(&o)?;
            ensure!(
                res.iter().all(Result::is_err),
                "{what} as rank {pos}: a group formed"
            );
            for e in res.into_iter().filter_map(Result::err) {
                let e = e.to_string();
                ensure!(
                    e.contains("rank 0") || e.contains("peers did not connect"),
                    "{what} as rank {pos}: {e}"
                );
            }
        }
    }
    Ok(())
}
