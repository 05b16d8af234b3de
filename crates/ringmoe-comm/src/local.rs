//! Several ranks inside this process: TCP communicators on 127.0.0.1 connected from threads, and
//! running a closure on every rank at once. For tests, benchmarks and single-host tools; a real
//! deployment starts one process per rank (see `launch.rs`).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use crate::{CommError, Communicator, Result, TcpOptions, tcp};

/// `n` TCP communicators on free 127.0.0.1 ports, rank `i` at index `i`.
pub fn tcp_group(n: usize, opts: &TcpOptions, timeout: Duration) -> Result<Vec<Communicator>> {
    let bind_err = |e: std::io::Error| CommError::Rendezvous {
        rank: 0,
        reason: format!("binding 127.0.0.1:0: {e}"),
    };
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .map_err(bind_err)?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<_>>()
        .map_err(bind_err)?;
    let addrs = &addrs;
    on_each(listeners.into_iter().enumerate().collect(), |(rank, l)| {
        tcp(rank, l, addrs, opts, timeout)
    })
    .into_iter()
    .collect()
}

/// Runs `f` on every rank at once (one thread each) and returns the results by rank. A panic in
/// any rank is re-raised here.
pub fn on_every_rank<T: Send>(
    comms: &[Communicator],
    f: impl Fn(&Communicator) -> T + Sync,
) -> Vec<T> {
    on_each(comms.iter().collect(), f)
}

fn on_each<I: Send, T: Send>(items: Vec<I>, f: impl Fn(I) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items.into_iter().map(|i| s.spawn(move || f(i))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}
