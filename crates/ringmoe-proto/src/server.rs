//! What every ringmoe gRPC server has: explicit message size limits, `grpc.health.v1` and server
//! reflection, graceful shutdown.

use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::tls::Tls;
use crate::{ServeError, proto};

/// Settings shared by the coordinator's and the workers' servers and their clients.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest gRPC message accepted or sent, in bytes. Bulk data is chunked well below it.
    pub max_message_bytes: usize,
    /// TLS for this process's server and for the connections it makes (`--tls-*`); `None`:
    /// plaintext.
    pub tls: Option<Tls>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            tls: None,
        }
    }
}

/// Locks a mutex in a gRPC handler; a poisoned one (a panic elsewhere) becomes an internal
/// error for this request, not a panic that takes the server down.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, tonic::Status> {
    m.lock()
        .map_err(|_| tonic::Status::internal("internal state poisoned by an earlier panic"))
}

/// `host:port` → `http://host:port`; a URL stays as it is.
pub fn http_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Concurrent streams one HTTP/2 connection may open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Serves `routes` plus health (each of `services` reported serving) and reflection on
/// `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: Routes,
    services: &[&str],
    tls: Option<&Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for s in services {
        reporter
            .set_service_status(*s, ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError(format!("reflection: {e}")))?;
    let routes = routes.add_service(health).add_service(reflection);
    // A client may not open streams without bound on one connection (each costs the server
    // a task and buffers), and dead connections are found by keepalive, not kept forever.
    let mut builder = Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)));
    let router = builder.add_routes(routes);
    match tls.filter(|t| t.server().is_some()) {
        None => router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown,
            )
            .await
            .map_err(|e| ServeError(e.to_string())),
        Some(t) => router
            .serve_with_incoming_shutdown(tls_incoming(listener, t.clone()), shutdown)
            .await
            .map_err(|e| ServeError(e.to_string())),
    }
}

/// Connections accepted on `listener` after their TLS handshake (gRPC: HTTP/2 by ALPN, client
/// certificates as `tls` requires).
fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: Tls,
) -> impl tokio_stream::Stream<
    Item = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(tls_accept(listener, move || tls.server()))
        .map(|(s, _)| Ok(s))
}

/// Connections accepted on `listener` after their TLS handshake, each with the settings
/// `config` gives when it arrived (so a reload applies to new connections at once; `None`
/// stops accepting). Handshakes run on tasks of their own, bounded in time: a client that
/// stalls one delays nobody else.
pub fn tls_accept(
    listener: tokio::net::TcpListener,
    config: impl Fn() -> Option<std::sync::Arc<rustls::ServerConfig>> + Send + 'static,
) -> tokio::sync::mpsc::Receiver<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    std::net::SocketAddr,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(cfg) = config() else { return };
            if tx.is_closed() {
                return;
            }
            let tx = tx.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                let hs =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
                match hs.await {
                    Ok(Ok(s)) => {
                        let _ = tx.send((s, peer)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
