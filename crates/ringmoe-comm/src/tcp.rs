//! The TCP transport: one connection per pair of ranks, length-prefixed frames (`wire.rs`),
//! `TCP_NODELAY`, large socket buffers.
//!
//! Each communicator owns a small tokio runtime (its own threads, so busy compute threads can never
//! starve socket I/O). Per peer, a writer task drains a queue of posted messages and a reader task
//! parses frames into that peer's inbox; the blocking side only touches queues. Rendezvous: every
//! rank listens; rank `i` connects to each `j < i` and accepts from each `j > i`; both sides
//! exchange a hello naming rank, world size and session, so strays and other clusters are refused.
//!
//! With [`DataTls`] every connection is TLS 1.3 first (the connecting rank is the client), both
//! sides presenting a certificate the cluster CA signed, and the hello travels inside it.

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc as tokio_mpsc;
use tokio::task::JoinHandle;

use crate::payload::Data;
use crate::transport::{Message, Transport};
use crate::wire::{self, HELLO_LEN, Hello, ReadError};
use crate::{CommError, Communicator, Result};

/// Settings of the TCP transport.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long rendezvous may take (peers may start at different times).
    pub connect_timeout: Duration,
    /// Socket send and receive buffer sizes.
    pub socket_buffer_bytes: usize,
    /// Largest payload a frame may announce; larger ones are refused before allocation.
    pub max_frame_bytes: u64,
    /// Identifies one communicator group; peers with another session are refused.
    pub session: u64,
    /// The group's secret (a job's data-plane token): a peer whose hello lacks it is refused
    /// before any frame is read. All zeros where every peer is trusted (tests, one machine).
    pub token: [u8; 32],
    /// I/O threads of the transport's runtime.
    pub io_threads: usize,
    /// TLS on every connection (`None`: plain TCP, the token the only check).
    pub tls: Option<DataTls>,
    /// How long sent data may stay unacknowledged before the connection is dropped
    /// (`TCP_USER_TIMEOUT`): a peer cut off by the network, whose process lives on, closes
    /// no connection, and without this a rank would wait out the whole receive timeout.
    /// A peer that is merely slow still acknowledges (its kernel does), so this never fires
    /// for it. `None`: the kernel's default (about 15 minutes of retransmissions).
    pub unacked_timeout: Option<Duration>,
}

/// TLS settings of the data plane: `server` for connections this rank accepts (it must require
/// client certificates), `client` for those it makes. Every rank of a group must use TLS or none
/// does: a plain peer's hello is not a TLS handshake and is refused.
#[derive(Debug, Clone)]
pub struct DataTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// A byte stream a link runs over: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One peer's connection after rendezvous.
enum Conn {
    Plain(TcpStream),
    Tls(Box<dyn Io>),
}

impl Conn {
    fn io(&mut self) -> &mut dyn Io {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.as_mut(),
        }
    }
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(30),
            socket_buffer_bytes: 8 << 20,
            max_frame_bytes: 16 << 30,
            session: 0,
            token: [0; 32],
            io_threads: 2,
            tls: None,
            unacked_timeout: Some(Duration::from_secs(20)),
        }
    }
}

/// Payload buffers whose frames were sent, kept for reuse by incoming frames of the same dtype and
/// length. A fresh multi-megabyte buffer is new mmap'd memory that the kernel faults in page by page
/// while `read` fills it; recycling makes ring steps and uniform all-to-alls allocation-free.
#[derive(Default)]
struct BufferPool {
    free: Mutex<Vec<Data>>,
}

impl BufferPool {
    const MAX_BUFFERS: usize = 16;
    /// At most this many bytes are kept idle, so a ring of very large K/V blocks cannot pin memory.
    const MAX_BYTES: usize = 1 << 30;
    /// Buffers smaller than this are cheap to allocate and not worth pooling.
    const MIN_BYTES: usize = 256 << 10;

    fn take(&self, dtype: ringmoe_core::DType, len: usize) -> Data {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        match free
            .iter()
            .position(|d| d.dtype() == dtype && d.len() == len)
        {
            Some(i) => free.swap_remove(i),
            None => Data::zeroed(dtype, len),
        }
    }

    fn give(&self, data: Data) {
        let bytes = data.as_bytes().len();
        if !(Self::MIN_BYTES..=Self::MAX_BYTES).contains(&bytes) {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.push(data);
        // Evict the oldest buffers beyond the count and byte limits.
        let mut held: usize = free.iter().map(|d| d.as_bytes().len()).sum();
        while free.len() > Self::MAX_BUFFERS || held > Self::MAX_BYTES {
            held -= free.remove(0).as_bytes().len();
        }
    }
}

struct Link {
    writer: Option<tokio_mpsc::UnboundedSender<Message>>,
}

struct Tcp {
    rank: usize,
    world: usize,
    rt: Option<tokio::runtime::Runtime>,
    links: Mutex<Vec<Option<Link>>>,
    inboxes: Vec<Option<Mutex<std_mpsc::Receiver<Result<Message>>>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Each writer reports here when its queue is drained and its socket half closed.
    writers_done: Mutex<std_mpsc::Receiver<()>>,
    drain_timeout: Duration,
}

/// Joins the TCP group: `listener` is this rank's bound socket and `peers[j]` rank j's address
/// (this rank's own entry is ignored). Blocks until every peer is connected or the connect timeout
/// passes.
pub fn tcp(
    rank: usize,
    listener: std::net::TcpListener,
    peers: &[SocketAddr],
    opts: &TcpOptions,
    timeout: Duration,
) -> Result<Communicator> {
    let world = peers.len();
    let rv = |reason: String| CommError::Rendezvous { rank, reason };
    if rank >= world {
        return Err(rv(format!("rank {rank} is outside a world of {world}")));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.io_threads.max(1))
        .thread_name(format!("ringmoe-comm-{rank}"))
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| rv(format!("cannot start I/O runtime: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| rv(format!("listener: {e}")))?;
    let streams = rt.block_on(rendezvous(rank, world, listener, peers, opts))?;

    let (done_tx, done_rx) = std_mpsc::channel();
    let pool = Arc::new(BufferPool::default());
    let mut links = Vec::with_capacity(world);
    let mut inboxes = Vec::with_capacity(world);
    let mut tasks = Vec::new();
    for (peer, stream) in streams.into_iter().enumerate() {
        let Some(stream) = stream else {
            links.push(None);
            inboxes.push(None);
            continue;
        };
        let (wtx, wrx) = tokio_mpsc::unbounded_channel();
        let (itx, irx) = std_mpsc::channel();
        let (done, max) = (done_tx.clone(), opts.max_frame_bytes);
        match stream {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                tasks.push(rt.spawn(writer(w, wrx, done, pool.clone())));
                tasks.push(rt.spawn(reader(rank, peer, r, itx, max, pool.clone())));
            }
            Conn::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                tasks.push(rt.spawn(writer(w, wrx, done, pool.clone())));
                tasks.push(rt.spawn(reader(rank, peer, r, itx, max, pool.clone())));
            }
        }
        links.push(Some(Link { writer: Some(wtx) }));
        inboxes.push(Some(Mutex::new(irx)));
    }
    let t = Tcp {
        rank,
        world,
        rt: Some(rt),
        links: Mutex::new(links),
        inboxes,
        tasks: Mutex::new(tasks),
        writers_done: Mutex::new(done_rx),
        drain_timeout: timeout,
    };
    Ok(Communicator::new(Box::new(t), timeout))
}

fn configure(stream: &TcpStream, opts: &TcpOptions) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    sock.set_send_buffer_size(opts.socket_buffer_bytes)?;
    sock.set_recv_buffer_size(opts.socket_buffer_bytes)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(opts.unacked_timeout)?;
    Ok(())
}

async fn rendezvous(
    rank: usize,
    world: usize,
    listener: std::net::TcpListener,
    peers: &[SocketAddr],
    opts: &TcpOptions,
) -> Result<Vec<Option<Conn>>> {
    let rv = |reason: String| CommError::Rendezvous { rank, reason };
    let deadline = Instant::now() + opts.connect_timeout;
    let me = Hello {
        rank: rank as u32,
        world: world as u32,
        session: opts.session,
        token: opts.token,
    };
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| rv(format!("listener: {e}")))?;
    let mut streams: Vec<Option<Conn>> = (0..world).map(|_| None).collect();

    // Connect to every lower rank, retrying while it may still be starting.
    let mut connects = Vec::new();
    for (j, addr) in peers.iter().enumerate().take(rank) {
        let addr = *addr;
        let opts = opts.clone();
        connects.push(tokio::spawn(async move {
            loop {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        configure(&s, &opts).map_err(|e| (j, format!("rank {j} at {addr}: {e}")))?;
                        let mut s = match &opts.tls {
                            None => Conn::Plain(s),
                            Some(t) => {
                                // The peer's certificate is checked against the CA, not
                                // against this address (see `DataTls`).
                                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                                let tls = tokio_rustls::TlsConnector::from(t.client.clone())
                                    .connect(name, s)
                                    .await
                                    .map_err(|e| (j, format!("TLS with rank {j} at {addr}: {e}")))?;
                                Conn::Tls(Box::new(tls))
                            }
                        };
                        let io = s.io();
                        let mut b = [0u8; HELLO_LEN];
                        let greeted = async {
                            io.write_all(&me.encode()).await?;
                            io.flush().await?;
                            io.read_exact(&mut b).await
                        };
                        match greeted.await {
                            Ok(_) => {}
                            // A proxy or load balancer in between accepts before the peer
                            // listens, then drops the connection: try again while there is time.
                            Err(_) if Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            Err(e) => return Err((j, format!("hello with rank {j} at {addr}: {e}"))),
                        }
                        let h = Hello::decode(&b).map_err(|e| (j, format!("rank {j} at {addr}: {e}")))?;
                        if h != (Hello { rank: j as u32, ..me }) || !h.same_token(&me) {
                            return Err((j, format!("{addr} answered as {h:?}, expected rank {j} of {world} in session {}", me.session)));
                        }
                        return Ok((j, s));
                    }
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err((j, format!("rendezvous: cannot connect to rank {j} at {addr}: {e}"))),
                }
            }
        }));
    }

    // Accept every higher rank. Each connection's hello is read in its own task, so a stray that
    // never speaks cannot delay the real peers; invalid or duplicate hellos are dropped.
    let (found_tx, mut found_rx) = tokio_mpsc::unbounded_channel::<(usize, Conn)>();
    let conf = opts.clone();
    let acceptor = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let (found, conf) = (found_tx.clone(), conf.clone());
            tokio::spawn(async move {
                let greet = async move {
                    configure(&s, &conf).ok()?;
                    let mut s = match conf.tls {
                        None => Conn::Plain(s),
                        Some(t) => Conn::Tls(Box::new(
                            tokio_rustls::TlsAcceptor::from(t.server)
                                .accept(s)
                                .await
                                .ok()?,
                        )),
                    };
                    let mut b = [0u8; HELLO_LEN];
                    s.io().read_exact(&mut b).await.ok()?;
                    Some((Hello::decode(&b).ok()?, s))
                };
                if let Ok(Some((h, s))) = tokio::time::timeout(Duration::from_secs(10), greet).await
                {
                    let j = h.rank as usize;
                    if h.world as usize == world
                        && h.session == me.session
                        && h.same_token(&me)
                        && j > rank
                        && j < world
                    {
                        let _ = found.send((j, s));
                    }
                }
            });
        }
    });
    let mut pending = world - 1 - rank;
    while pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (j, mut s) = match tokio::time::timeout(left, found_rx.recv()).await {
            Ok(Some(x)) => x,
            _ => {
                acceptor.abort();
                // Blames the lowest missing rank: with a link cut to one peer, that is it.
                let missing: Vec<usize> = (rank + 1..world)
                    .filter(|&j| streams[j].is_none())
                    .collect();
                return Err(CommError::PeerLost {
                    rank,
                    peer: missing.first().copied().unwrap_or(world - 1),
                    reason: format!(
                        "rendezvous: rank(s) {missing:?} did not connect within {:?}",
                        opts.connect_timeout
                    ),
                });
            }
        };
        if streams[j].is_some() {
            continue;
        }
        let io = s.io();
        io.write_all(&me.encode())
            .await
            .map_err(|e| rv(format!("hello to rank {j}: {e}")))?;
        io.flush()
            .await
            .map_err(|e| rv(format!("hello to rank {j}: {e}")))?;
        streams[j] = Some(s);
        pending -= 1;
    }
    acceptor.abort();
    for c in connects {
        let (j, s) = c
            .await
            .map_err(|e| rv(e.to_string()))?
            .map_err(|(peer, reason)| CommError::PeerLost { rank, peer, reason })?;
        streams[j] = Some(s);
    }
    Ok(streams)
}

async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: tokio_mpsc::UnboundedReceiver<Message>,
    done: std_mpsc::Sender<()>,
    pool: Arc<BufferPool>,
) {
    while let Some(msg) = rx.recv().await {
        // A TLS stream may hold the end of a record until flushed (a no-op on plain TCP).
        if wire::write_frame(&mut w, &msg).await.is_err() || w.flush().await.is_err() {
            break;
        }
        pool.give(msg.payload.data);
    }
    let _ = w.shutdown().await;
    let _ = done.send(());
}

async fn reader<R: AsyncRead + Unpin>(
    rank: usize,
    peer: usize,
    mut r: R,
    inbox: std_mpsc::Sender<Result<Message>>,
    max: u64,
    pool: Arc<BufferPool>,
) {
    loop {
        match wire::read_frame(&mut r, max, |dtype, len| pool.take(dtype, len)).await {
            Ok(m) => {
                if inbox.send(Ok(m)).is_err() {
                    return;
                }
            }
            Err(ReadError::Closed(reason)) => {
                let _ = inbox.send(Err(CommError::PeerLost { rank, peer, reason }));
                return;
            }
            Err(ReadError::Invalid(reason)) => {
                let _ = inbox.send(Err(CommError::BadFrame { rank, peer, reason }));
                return;
            }
        }
    }
}

impl Transport for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn post(&self, peer: usize, msg: Message) -> Result<()> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let lost = |reason: &str| CommError::PeerLost {
            rank: self.rank,
            peer,
            reason: reason.into(),
        };
        match links
            .get(peer)
            .and_then(Option::as_ref)
            .and_then(|l| l.writer.as_ref())
        {
            Some(tx) => tx.send(msg).map_err(|_| lost("connection closed")),
            None => Err(lost("link is shut down")),
        }
    }

    fn next(&self, peer: usize, timeout: Duration) -> Result<Message> {
        let inbox = self
            .inboxes
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or(CommError::BadPeer {
                rank: self.rank,
                peer,
                world: self.world,
            })?;
        let rx = inbox.lock().unwrap_or_else(|p| p.into_inner());
        match rx.recv_timeout(timeout) {
            Ok(m) => m,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(CommError::Timeout {
                rank: self.rank,
                peer,
                tag: crate::Tag::new(0, 0, 0, crate::Kind::Data),
                timeout,
            }),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(CommError::PeerLost {
                rank: self.rank,
                peer,
                reason: "connection closed".into(),
            }),
        }
    }

    fn shutdown(&self) {
        // Abort: drop queued sends, close every socket now, so peers see EOF immediately.
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
            .for_each(|l| *l = None);
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }

    fn name(&self) -> &'static str {
        "tcp"
    }
}

impl Drop for Tcp {
    fn drop(&mut self) {
        // Graceful close: let writers flush what was posted, then stop everything.
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let open = links
            .iter()
            .flatten()
            .filter(|l| l.writer.is_some())
            .count();
        links.iter_mut().flatten().for_each(|l| l.writer = None);
        drop(links);
        let done = self.writers_done.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + self.drain_timeout;
        for _ in 0..open {
            if done
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
            {
                break;
            }
        }
        drop(done);
        self.shutdown();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
