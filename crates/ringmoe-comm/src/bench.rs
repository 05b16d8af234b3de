//! Measurement loops shared by the criterion benchmarks and `ringmoe bench comm`: `all_to_all_v`
//! and ring `sendrecv` throughput, and a raw TCP stream on the same machine as the yardstick.
//!
//! Accounting (as nccl-tests' "bus bandwidth" counts bytes that cross links):
//! * `all_to_all_v` with per-rank buffer `S` split evenly over `N` ranks moves `N·(N−1)·S/N` bytes
//!   between ranks per call;
//! * one ring step moves `N·S` bytes.
//!
//! The loops move payloads without copying them: all-to-all sends back what it received (shapes
//! are uniform), the ring forwards the block it got, as ring attention does.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use crate::{Communicator, Kind, Payload, Result, Tag};

/// Seconds per `all_to_all_v` of `bytes_per_rank` (f32 payloads), over `iters` calls after one
/// warm-up call. Every rank must call this with the same arguments.
pub fn all_to_all_secs(comm: &Communicator, bytes_per_rank: usize, iters: u32) -> Result<f64> {
    let n = comm.world_size();
    let chunk = bytes_per_rank / 4 / n;
    let mut bufs: Vec<Payload> = (0..n)
        .map(|j| Payload::f32(vec![j as f32; chunk]))
        .collect();
    comm.barrier(Tag::new(0, 0, 0, Kind::Barrier))?;
    let mut t = Instant::now();
    for i in 0..=iters {
        if i == 1 {
            t = Instant::now();
        }
        bufs = comm.all_to_all_v(Tag::new(0, 0, i, Kind::AllToAll), bufs)?;
    }
    comm.barrier(Tag::new(0, 0, 1, Kind::Barrier))?;
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Seconds per ring step of `bytes_per_rank`, over `iters` steps after one warm-up step.
pub fn ring_secs(comm: &Communicator, bytes_per_rank: usize, iters: u32) -> Result<f64> {
    let (me, n) = (comm.rank(), comm.world_size());
    let mut block = Payload::f32(vec![me as f32; bytes_per_rank / 4]);
    if n == 1 {
        return Ok(0.0);
    }
    comm.barrier(Tag::new(0, 0, 0, Kind::Barrier))?;
    let mut t = Instant::now();
    for i in 0..=iters {
        if i == 1 {
            t = Instant::now();
        }
        block = comm.sendrecv(
            (me + 1) % n,
            block,
            (me + n - 1) % n,
            Tag::new(0, 0, i, Kind::Ring),
        )?;
    }
    comm.barrier(Tag::new(0, 0, 1, Kind::Barrier))?;
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Bytes that cross between ranks in one call.
pub fn all_to_all_bytes(world: usize, bytes_per_rank: usize) -> f64 {
    let chunk = (bytes_per_rank / 4 / world * 4) as f64;
    (world * (world - 1)) as f64 * chunk
}

pub fn ring_bytes(world: usize, bytes_per_rank: usize) -> f64 {
    if world < 2 {
        0.0
    } else {
        (world * (bytes_per_rank / 4 * 4)) as f64
    }
}

/// GB/s of one plain TCP connection on 127.0.0.1 copying `total` bytes in 1 MiB writes, with the
/// same socket settings as the TCP transport: the most the transport could hope for per link.
pub fn raw_tcp_gbps(total: usize, socket_buffer_bytes: usize) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        socket2::SockRef::from(&s).set_recv_buffer_size(socket_buffer_bytes)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = total;
        while left > 0 {
            let n = s.read(&mut buf[..left.min(1 << 20)])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
        }
        s.write_all(&[1])
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    socket2::SockRef::from(&s).set_send_buffer_size(socket_buffer_bytes)?;
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n])?;
        left -= n;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let secs = t.elapsed().as_secs_f64();
    reader
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    Ok(total as f64 / secs / 1e9)
}
