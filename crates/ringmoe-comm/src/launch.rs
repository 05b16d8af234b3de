//! Starting ranks as separate OS processes on one machine (tests, `ringmoe bench comm`).
//!
//! Race-free port choice: each child binds `127.0.0.1:0` itself and prints `PORT <p>`; the parent
//! collects every port and writes `PEERS a:p,b:p,...` to each child's stdin. After that, each
//! child's stdout lines are available to the parent through a channel.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Child side: binds a loopback port, announces it, and waits for the peer list.
pub fn join_from_parent() -> std::io::Result<(TcpListener, Vec<SocketAddr>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "PORT {port}")?;
        out.flush()?;
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let peers = line
        .trim()
        .strip_prefix("PEERS ")
        .ok_or_else(|| bad(format!("expected a PEERS line, got {line:?}")))?
        .split(',')
        .map(|a| {
            a.parse()
                .map_err(|e| bad(format!("peer address {a:?}: {e}")))
        })
        .collect::<std::io::Result<_>>()?;
    Ok((listener, peers))
}

/// Child side, all of it: [`join_from_parent`], then the TCP rendezvous with the peers.
pub fn join_tcp(
    rank: usize,
    opts: &crate::TcpOptions,
    timeout: Duration,
) -> crate::Result<crate::Communicator> {
    let (listener, peers) = join_from_parent().map_err(|e| crate::CommError::Rendezvous {
        rank,
        reason: format!("talking to the parent process: {e}"),
    })?;
    crate::tcp(rank, listener, &peers, opts, timeout)
}

/// Parent side: one started rank.
#[derive(Debug)]
pub struct RankProcess {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl RankProcess {
    /// The next stdout line, waiting at most `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The first line starting with one of `prefixes` before `deadline`, skipping others.
    pub fn line_starting(&self, prefixes: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.next_line(deadline.saturating_duration_since(Instant::now()))?;
            if prefixes.iter().any(|p| line.starts_with(p)) {
                return Some(line);
            }
        }
    }
}

impl Drop for RankProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `n` ranks of `program` with `args(rank)`, wires their addresses and returns them.
pub fn spawn_ranks(
    program: &std::path::Path,
    n: usize,
    args: impl Fn(usize) -> Vec<String>,
) -> std::io::Result<Vec<RankProcess>> {
    let mut ranks = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    for r in 0..n {
        let mut child = Command::new(program)
            .args(args(r))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let rank = RankProcess { child, lines: rx };
        let first = rank.next_line(Duration::from_secs(30)).unwrap_or_default();
        let port: u16 = first
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                std::io::Error::other(format!("rank {r} did not announce a port (said {first:?})"))
            })?;
        ports.push(port);
        ranks.push(rank);
    }
    let peers = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    for r in &mut ranks {
        let stdin = r
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no stdin"))?;
        writeln!(stdin, "PEERS {peers}")?;
        stdin.flush()?;
    }
    Ok(ranks)
}
