//! A small userspace TCP proxy that makes one link slow or lossy (this kernel has no `netem`):
//! every connection to [`Proxy::addr`] is forwarded to one upstream address, through a shared
//! bandwidth cap, an added one-way latency, a switch that blackholes the link (bytes are held,
//! connections stay open and stall, as on a dead route) and a reset that cuts every
//! connection at once.
//!
//! Each direction of each connection has a reader thread, which stamps each chunk with the
//! time it may leave (now + latency), and a writer thread, which waits for that time, for the
//! link's token bucket (shared by all connections and both directions' own buckets), and while
//! the link is blackholed. The queue between them is bounded, so a capped link pushes back on
//! the sender as a real one does.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes read from a socket at once; the unit of pacing.
const CHUNK: usize = 16 << 10;
/// Chunks queued per direction between reading and writing (backpressure beyond this).
const QUEUE: usize = 64;

/// How the link behaves now (see the setters of [`Proxy`]).
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    /// Bytes per second per direction, `None`: uncapped.
    rate: Option<u64>,
    latency: Duration,
    blackhole: bool,
}

/// One direction's token bucket: when its link is next free.
#[derive(Debug)]
struct Bucket(Mutex<Instant>);

impl Bucket {
    /// Reserves the link for `bytes` at `rate` and returns when they have left it.
    fn reserve(&self, bytes: usize, rate: u64) -> Instant {
        let mut next = lock(&self.0);
        let start = (*next).max(Instant::now());
        *next = start + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        *next
    }
}

#[derive(Debug)]
struct Link {
    shape: Mutex<Shape>,
    /// Client-to-upstream and upstream-to-client.
    buckets: [Bucket; 2],
    /// Both sockets of every open connection (clones, by connection number), for
    /// [`Proxy::reset`]; a connection's entry goes when it ends.
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    next_conn: AtomicU64,
    forwarded: AtomicU64,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The proxy (see the module docs); stops and cuts its connections when dropped.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    upstream: SocketAddr,
    link: Arc<Link>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `listen` (port 0: a free one) and forwards to `upstream`, unshaped.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let link = Arc::new(Link {
            shape: Mutex::new(Shape::default()),
            buckets: [
                Bucket(Mutex::new(Instant::now())),
                Bucket(Mutex::new(Instant::now())),
            ],
            conns: Mutex::new(Vec::new()),
            forwarded: AtomicU64::new(0),
            next_conn: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let l = link.clone();
        let accept = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, upstream, l))?;
        Ok(Self {
            addr,
            upstream,
            link,
            accept: Some(accept),
        })
    }

    /// Caps each direction at `bytes_per_sec`, shared by all connections (`None`: uncapped).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        lock(&self.link.shape).rate = bytes_per_sec;
    }

    /// Delays every byte by `latency` each way.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.link.shape).latency = latency;
    }

    /// Holds every byte (both ways, open and new connections) while `on`; the bytes flow
    /// again, in order, once it is off.
    pub fn set_blackhole(&self, on: bool) {
        lock(&self.link.shape).blackhole = on;
    }

    /// Cuts every open connection at once (both ends see it close, with a reset where data
    /// was in flight); new connections are forwarded as before. Returns how many were cut.
    pub fn reset(&self) -> usize {
        let conns = std::mem::take(&mut *lock(&self.link.conns));
        for (_, a, b) in &conns {
            for s in [a, b] {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        conns.len()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        lock(&self.link.conns).len()
    }

    /// Bytes forwarded so far, both directions.
    pub fn forwarded(&self) -> u64 {
        self.link.forwarded.load(Ordering::Relaxed)
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.link.stop.store(true, Ordering::Relaxed);
        self.set_blackhole(false);
        // Wakes the accept loop, which sees the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.reset();
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, link: Arc<Link>) {
    for client in listener.incoming() {
        if link.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = client else { continue };
        let link = link.clone();
        // Connecting upstream may take a while (a blackholed route): not on the accept thread.
        let _ = std::thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || {
                if let Err(e) = connection(client, upstream, &link) {
                    eprintln!("proxy to {upstream}: {e}");
                }
            });
    }
}

fn connection(client: TcpStream, upstream: SocketAddr, link: &Arc<Link>) -> std::io::Result<()> {
    let server = TcpStream::connect_timeout(&upstream, Duration::from_secs(10))?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let n = link.next_conn.fetch_add(1, Ordering::Relaxed);
    lock(&link.conns).push((n, client.try_clone()?, server.try_clone()?));
    let up = pump(client.try_clone()?, server.try_clone()?, link.clone(), 0)?;
    let down = pump(server, client, link.clone(), 1)?;
    for t in up.into_iter().chain(down) {
        let _ = t.join();
    }
    // Ended: its sockets close once these clones go too.
    lock(&link.conns).retain(|(m, _, _)| *m != n);
    Ok(())
}

/// Starts the reader and writer threads of one direction, `from` → `to`.
fn pump(
    from: TcpStream,
    to: TcpStream,
    link: Arc<Link>,
    dir: usize,
) -> std::io::Result<[JoinHandle<()>; 2]> {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE);
    let l = link.clone();
    let reader = std::thread::Builder::new()
        .name("proxy-read".into())
        .spawn(move || read_side(from, tx, &l))?;
    let writer = std::thread::Builder::new()
        .name("proxy-write".into())
        .spawn(move || write_side(to, rx, &link, dir))?;
    Ok([reader, writer])
}

fn read_side(mut from: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, link: &Link) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let due = Instant::now() + lock(&link.shape).latency;
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    // The writer ends once it has delivered what was queued; then `to` is shut for writing.
}

fn write_side(mut to: TcpStream, rx: Receiver<(Instant, Vec<u8>)>, link: &Link, dir: usize) {
    while let Ok((due, bytes)) = rx.recv() {
        // Held while the link is blackholed (until the proxy stops).
        while lock(&link.shape).blackhole && !link.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        sleep_until(due);
        if let Some(rate) = lock(&link.shape).rate {
            sleep_until(link.buckets[dir].reserve(bytes.len(), rate));
        }
        if to.write_all(&bytes).is_err() {
            break;
        }
        link.forwarded
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// An echo server on a free loopback port.
    fn echo() -> std::io::Result<SocketAddr> {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = l.local_addr()?;
        std::thread::spawn(move || {
            for s in l.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let mut r = s;
                    let mut w = match r.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        Ok(addr)
    }

    fn proxy() -> std::io::Result<Proxy> {
        Proxy::start((Ipv4Addr::LOCALHOST, 0).into(), echo()?)
    }

    /// Sends `n` bytes and reads them back; the time it took.
    fn round_trip(s: &mut TcpStream, n: usize) -> std::io::Result<Duration> {
        let t = Instant::now();
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let mut w = s.try_clone()?;
        let sent = data.clone();
        let writer = std::thread::spawn(move || w.write_all(&sent));
        let mut back = vec![0u8; n];
        s.read_exact(&mut back)?;
        writer
            .join()
            .map_err(|_| std::io::Error::other("writer panicked"))??;
        assert_eq!(back, data, "the proxy changed the bytes");
        Ok(t.elapsed())
    }

    #[test]
    fn forwards_bytes_unchanged_and_caps_the_rate() -> std::io::Result<()> {
        let p = proxy()?;
        let mut s = TcpStream::connect(p.addr)?;
        let fast = round_trip(&mut s, 1 << 20)?;
        // 1 MiB each way at 4 MiB/s: at least ~0.25 s (both directions run at once).
        p.set_rate(Some(4 << 20));
        let slow = round_trip(&mut s, 1 << 20)?;
        assert!(
            slow >= Duration::from_millis(230),
            "capped: {slow:?} (uncapped {fast:?})"
        );
        // The counter follows each write, which the reader may see first.
        let end = Instant::now() + Duration::from_secs(5);
        while p.forwarded() < 4 << 20 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(p.forwarded() >= 4 << 20, "{} bytes counted", p.forwarded());
        Ok(())
    }

    #[test]
    fn adds_latency_each_way() -> std::io::Result<()> {
        let p = proxy()?;
        p.set_latency(Duration::from_millis(100));
        let mut s = TcpStream::connect(p.addr)?;
        let rtt = round_trip(&mut s, 10)?;
        assert!(rtt >= Duration::from_millis(200), "{rtt:?}");
        Ok(())
    }

    #[test]
    fn a_blackhole_stalls_and_heals_and_a_reset_cuts() -> std::io::Result<()> {
        let p = proxy()?;
        let mut s = TcpStream::connect(p.addr)?;
        round_trip(&mut s, 100)?;
        p.set_blackhole(true);
        s.write_all(b"held")?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut b = [0u8; 4];
        assert!(s.read_exact(&mut b).is_err(), "a blackholed link delivered");
        p.set_blackhole(false);
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.read_exact(&mut b)?;
        assert_eq!(&b, b"held", "held bytes arrive once healed");
        assert_eq!(p.reset(), 1);
        let mut rest = Vec::new();
        // The client sees its connection end (EOF or a reset), never a hang.
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
        // New connections go through; one that ends is forgotten (its sockets closed).
        let mut s2 = TcpStream::connect(p.addr)?;
        round_trip(&mut s2, 100)?;
        assert_eq!(p.open_connections(), 1);
        drop(s2);
        let end = Instant::now() + Duration::from_secs(5);
        while p.open_connections() > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(p.open_connections(), 0, "a closed connection is still held");
        Ok(())
    }
}
