//! Wrong tags, dtypes and sizes, foreign and corrupt frames, silent and vanished peers: each is an
//! error naming what happened, within the timeout, and leaves the communicator poisoned.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ringmoe_comm::wire::{Hello, MAGIC, VERSION};
use ringmoe_comm::{CommError, Kind, Payload, Tag, TcpOptions, in_process, tcp};
use ringmoe_core::DType;

fn tag(step: u32) -> Tag {
    Tag::new(5, 1, step, Kind::Data)
}

#[test]
fn unexpected_tag_dtype_and_shape_are_named_and_poison() -> Result<()> {
    let mut c = in_process(2, Duration::from_secs(2));
    let (b, a) = (c.pop().expect("rank 1"), c.pop().expect("rank 0"));
    b.send(0, tag(1), Payload::f32(vec![1.0; 3]))?;
    let e = a.recv(1, tag(2)).unwrap_err().to_string();
    ensure!(
        e.contains(
            "expected Data(job 5, layer 1, step 2) but Data(job 5, layer 1, step 1) arrived"
        ),
        "{e}"
    );
    let e = a.recv(1, tag(1)).unwrap_err();
    ensure!(matches!(e, CommError::Poisoned { .. }), "{e}");

    let mut c = in_process(2, Duration::from_secs(2));
    let (b, a) = (c.pop().expect("rank 1"), c.pop().expect("rank 0"));
    b.send(0, tag(1), Payload::f32(vec![1.0; 3]))?;
    let e = a
        .recv_expect(1, tag(1), DType::BF16, &[3])
        .unwrap_err()
        .to_string();
    ensure!(e.contains("expected BF16[3] but F32[3] arrived"), "{e}");
    b.send(0, tag(2), Payload::f32(vec![1.0; 3])).ok();
    Ok(())
}

#[test]
fn silent_peer_times_out_and_exited_peer_is_reported_at_once() -> Result<()> {
    let mut c = in_process(3, Duration::from_millis(300));
    let (r2, r1, r0) = (
        c.pop().expect("2"),
        c.pop().expect("1"),
        c.pop().expect("0"),
    );
    let t = Instant::now();
    let e = r0.recv(1, tag(0)).unwrap_err();
    ensure!(matches!(e, CommError::Timeout { peer: 1, .. }), "{e}");
    ensure!(t.elapsed() < Duration::from_secs(2));
    ensure!(
        e.to_string()
            .contains("waiting for Data(job 5, layer 1, step 0) from peer 1"),
        "{e}"
    );
    drop(r2);
    let t = Instant::now();
    let e = r1.recv(2, tag(0)).unwrap_err();
    ensure!(
        matches!(e, CommError::PeerLost { peer: 2, .. })
            && t.elapsed() < Duration::from_millis(200),
        "{e}"
    );
    Ok(())
}

/// A poisoned rank closes its links, so a rank waiting on it fails now rather than at its timeout.
#[test]
fn poison_propagates_without_waiting_for_timeouts() -> Result<()> {
    let mut c = in_process(3, Duration::from_secs(20));
    let (r2, r1, r0) = (
        c.pop().expect("2"),
        c.pop().expect("1"),
        c.pop().expect("0"),
    );
    let t = Instant::now();
    std::thread::scope(|s| {
        // r0 waits on r1; r1 waits on r2, which dies.
        let h0 = s.spawn(|| r0.recv(1, tag(0)));
        let h1 = s.spawn(|| r1.recv(2, tag(0)));
        std::thread::sleep(Duration::from_millis(50));
        drop(r2);
        let e1 = h1.join().expect("join");
        let e0 = h0.join().expect("join");
        assert!(
            matches!(e1, Err(CommError::PeerLost { peer: 2, .. })),
            "{e1:?}"
        );
        assert!(
            matches!(e0, Err(CommError::PeerLost { peer: 1, .. })),
            "{e0:?}"
        );
    });
    ensure!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    Ok(())
}

/// Rank 1 is a hand-written socket: a correct hello, then bytes that are not a frame.
fn fake_peer_sends(bytes: Vec<u8>) -> Result<CommError> {
    let l0 = TcpListener::bind("127.0.0.1:0")?;
    let l1 = TcpListener::bind("127.0.0.1:0")?;
    let addrs: Vec<SocketAddr> = vec![l0.local_addr()?, l1.local_addr()?];
    let a0 = addrs[0];
    let fake = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(a0)?;
        s.write_all(
            &Hello {
                rank: 1,
                world: 2,
                session: 3,
                token: [0; 32],
            }
            .encode(),
        )?;
        let mut reply = [0u8; ringmoe_comm::wire::HELLO_LEN];
        s.read_exact(&mut reply)?;
        s.write_all(&bytes)?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    });
    let opts = TcpOptions {
        session: 3,
        connect_timeout: Duration::from_secs(5),
        ..TcpOptions::default()
    };
    let c0 = tcp(0, l0, &addrs, &opts, Duration::from_secs(3))?;
    let e = c0
        .recv(1, tag(0))
        .err()
        .context("a bad frame must fail the receive")?;
    let _ = fake.join();
    Ok(e)
}

#[test]
fn corrupt_and_foreign_frames_are_errors_naming_the_fault() -> Result<()> {
    let e = fake_peer_sends(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec())?.to_string();
    ensure!(
        e.contains("corrupt or foreign frame from peer 1: bad frame magic"),
        "{e}"
    );

    // A frame whose announced size disagrees with its shape.
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC.to_le_bytes());
    f.extend_from_slice(&[VERSION, 0, Kind::Data as u8, 1]);
    f.extend_from_slice(&5u64.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&10u64.to_le_bytes());
    f.extend_from_slice(&12u64.to_le_bytes());
    let e = fake_peer_sends(f)?.to_string();
    ensure!(
        e.contains("payload of 12 bytes does not match F32[10]"),
        "{e}"
    );

    // The peer vanishes mid-frame.
    let e = fake_peer_sends(MAGIC.to_le_bytes()[..3].to_vec())?;
    ensure!(matches!(e, CommError::PeerLost { peer: 1, .. }), "{e}");
    Ok(())
}

#[test]
fn rendezvous_ignores_strays_other_sessions_and_wrong_tokens() -> Result<()> {
    let l0 = TcpListener::bind("127.0.0.1:0")?;
    let l1 = TcpListener::bind("127.0.0.1:0")?;
    let addrs = vec![l0.local_addr()?, l1.local_addr()?];
    let token = [7u8; 32];
    // A stray that speaks HTTP, a peer from another session, and one that guessed the session
    // but not the job's token all knock first.
    let mut stray = TcpStream::connect(addrs[0])?;
    stray.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
    let knock = |session: u64, token: [u8; 32]| -> Result<TcpStream> {
        let mut s = TcpStream::connect(addrs[0])?;
        s.write_all(
            &Hello {
                rank: 1,
                world: 2,
                session,
                token,
            }
            .encode(),
        )?;
        Ok(s)
    };
    let _other = knock(999, token)?;
    let mut wrong = [7u8; 32];
    wrong[31] = 8;
    let mut guesser = knock(4, wrong)?;
    guesser.set_read_timeout(Some(Duration::from_secs(10)))?;
    let opts = TcpOptions {
        session: 4,
        token,
        connect_timeout: Duration::from_secs(10),
        ..TcpOptions::default()
    };
    let (c0, c1) = std::thread::scope(|s| {
        let a = &addrs;
        let h1 = s.spawn(|| tcp(1, l1, a, &opts, Duration::from_secs(5)));
        let c0 = tcp(0, l0, a, &opts, Duration::from_secs(5));
        (c0, h1.join().expect("join"))
    });
    let (c0, c1) = (c0?, c1?);
    c1.send(0, tag(0), Payload::f32(vec![2.0]))?;
    ensure!(c0.recv(1, tag(0))?.into_f32() == Some(vec![2.0]));
    // The guesser got no hello back: its connection was dropped unanswered.
    let mut b = [0u8; 1];
    ensure!(
        matches!(guesser.read(&mut b), Ok(0) | Err(_)),
        "a peer without the token was answered"
    );
    Ok(())
}

/// Without CUDA, forming an NCCL group over a CPU communicator fails on every rank with a clear
/// error instead of hanging or panicking.
#[test]
fn nccl_join_without_cuda_fails_cleanly_on_every_rank() -> Result<()> {
    let comms = in_process(3, Duration::from_secs(5));
    // The NCCL communicator is bound to its thread (not Send), so only the outcome leaves it.
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    ringmoe_comm::nccl::join(c, 0, Duration::from_secs(5))
                        .err()
                        .map(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("join").unwrap_or_default())
            .collect()
    });
    for e in &errs {
        ensure!(e.contains("NCCL transport unavailable"), "{e}");
    }
    Ok(())
}

/// Rank 0 sits behind a proxy (as behind a Service or load balancer) that accepts rank 1's
/// connection before rank 0 listens, then drops it: rank 1 tries again and both ranks meet.
/// A rank 0 that never comes is blamed by name once the rendezvous time is up.
#[test]
fn rendezvous_through_a_proxy_waits_for_the_peer_behind_it() -> Result<()> {
    let behind = TcpListener::bind("127.0.0.1:0")?;
    let target = behind.local_addr()?;
    drop(behind);
    let proxy = ringmoe_testkit::Proxy::start("127.0.0.1:0".parse()?, target)?;
    let l1 = TcpListener::bind("127.0.0.1:0")?;
    let addrs = vec![proxy.addr, l1.local_addr()?];
    let opts = TcpOptions {
        connect_timeout: Duration::from_secs(10),
        ..TcpOptions::default()
    };
    let (o, a) = (opts.clone(), addrs.clone());
    let one = std::thread::spawn(move || tcp(1, l1, &a, &o, Duration::from_secs(5)));
    // Rank 1 meets only the proxy for a while.
    std::thread::sleep(Duration::from_millis(500));
    let l0 = TcpListener::bind(target)?;
    let c0 = tcp(0, l0, &addrs, &opts, Duration::from_secs(5))?;
    let c1 = one
        .join()
        .map_err(|_| anyhow::anyhow!("rank 1 panicked"))??;
    c1.send(0, tag(7), Payload::f32(vec![1.0, 2.0]))?;
    ensure!(c0.recv(1, tag(7))?.into_f32() == Some(vec![1.0, 2.0]));

    // Nobody ever listens behind it: rank 1 gives up, naming rank 0.
    let l1 = TcpListener::bind("127.0.0.1:0")?;
    let addrs = vec![proxy.addr, l1.local_addr()?];
    let opts = TcpOptions {
        connect_timeout: Duration::from_millis(800),
        ..TcpOptions::default()
    };
    let e = tcp(1, l1, &addrs, &opts, Duration::from_secs(1))
        .err()
        .context("rank 1 must fail without rank 0")?;
    ensure!(
        matches!(e, CommError::PeerLost { peer: 0, .. }) && e.lost_peer() == Some(0),
        "{e}"
    );
    Ok(())
}
