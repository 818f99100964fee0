//! The listening side: binding, the async runtime, and the accept loop.
//!
//! At most [`ConnectionLimits::max_connections`] connections are open at
//! once; further ones wait in the kernel's listen backlog, holding nothing
//! of ours. Each connection gets [`ConnectionLimits::header_timeout`] to
//! send a request head and a read buffer of
//! [`ConnectionLimits::read_buffer_bytes`] (larger heads are refused,
//! bodies stream through it). On SIGINT or SIGTERM the loop stops
//! accepting, lets requests in progress finish (up to
//! [`ConnectionLimits::shutdown_grace`]), then returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::response::HttpResponse;

/// The most a connection buffers while reading a request by default
/// (hyper's `max_buf_size`; its own default is about 400 KiB): request
/// heads larger than this are refused, bodies stream through it.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// How long requests in progress may take to finish at shutdown by
/// default.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why a server could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Binding, the runtime, a signal handler or the socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HttpError {
    let what = what.into();
    move |source| HttpError::Io { what, source }
}

/// What every connection is served under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections at once.
    pub max_connections: usize,
    /// Time for a client to send a request head.
    pub header_timeout: Duration,
    /// The read buffer per connection, bytes (the largest request head).
    pub read_buffer_bytes: usize,
    /// How long requests in progress may take to finish at shutdown.
    pub shutdown_grace: Duration,
}

/// Binds `listen` (`ADDR:PORT`; port 0 takes any free port) for the
/// runtime to serve: non-blocking, so that it can be registered with tokio
/// later.
///
/// # Errors
/// [`HttpError::Io`] naming the address.
pub fn bind(listen: &str) -> Result<std::net::TcpListener, HttpError> {
    let listener = std::net::TcpListener::bind(listen).map_err(io(format!("binding {listen}")))?;
    listener
        .set_nonblocking(true)
        .map_err(io("configuring the socket"))?;
    Ok(listener)
}

/// The multi-threaded runtime a server runs on: two async worker threads
/// (named `oxbox-http`) and at most `max_blocking_threads` on the blocking
/// pool.
///
/// # Errors
/// [`HttpError::Io`].
pub fn runtime(max_blocking_threads: usize) -> Result<tokio::runtime::Runtime, HttpError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(max_blocking_threads)
        .thread_name("oxbox-http")
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))
}

/// Installs a handler for `kind` on `runtime` (before the server says it
/// listens, so that a signal sent at once is handled rather than fatal).
///
/// # Errors
/// [`HttpError::Io`] naming the signal (`name`).
pub fn install_signal(
    runtime: &tokio::runtime::Runtime,
    kind: SignalKind,
    name: &str,
) -> Result<Signal, HttpError> {
    let _context = runtime.enter();
    signal(kind).map_err(io(format!("installing the {name} handler")))
}

/// SIGINT and SIGTERM: [`ShutdownSignals::received`] is the shutdown
/// future a server passes to [`serve`].
#[derive(Debug)]
pub struct ShutdownSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignals {
    /// Installs both handlers on `runtime`.
    ///
    /// # Errors
    /// [`HttpError::Io`].
    pub fn install(runtime: &tokio::runtime::Runtime) -> Result<Self, HttpError> {
        Ok(Self {
            interrupt: install_signal(runtime, SignalKind::interrupt(), "SIGINT")?,
            terminate: install_signal(runtime, SignalKind::terminate(), "SIGTERM")?,
        })
    }

    /// Completes when either signal arrives.
    pub async fn received(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` completes (for a
/// server, [`ShutdownSignals::received`]), then drains: stops accepting and
/// lets the requests in progress finish, up to
/// [`ConnectionLimits::shutdown_grace`]. Each request goes to `handler`
/// with the peer's address; the number of open connections is kept in
/// `open_connections`.
///
/// # Errors
/// [`HttpError::Io`] when the socket cannot be registered with the
/// runtime. Failed accepts (out of descriptors and the like) are logged and
/// retried after a short pause; they do not stop the server.
pub async fn serve<H, F>(
    listener: std::net::TcpListener,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    open_connections: Gauge,
    handler: H,
) -> Result<(), HttpError>
where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    serve_with_tls(listener, limits, None, shutdown, open_connections, handler).await
}

/// [`serve`], over TLS when `tls` is given ([`crate::tls::acceptor`]): the
/// handshake must complete within [`ConnectionLimits::header_timeout`],
/// like a request head; a failed handshake closes the connection.
///
/// # Errors
/// As [`serve`].
pub async fn serve_with_tls<H, F>(
    listener: std::net::TcpListener,
    limits: ConnectionLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    open_connections: Gauge,
    handler: H,
) -> Result<(), HttpError>
where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    // Polled until it completes, then never again (the loop breaks).
    let mut shutdown = std::pin::pin!(shutdown);
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(io("registering the socket"))?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // A free connection slot first: at the cap, new connections wait in
        // the kernel's listen backlog, holding nothing of ours.
        let slot = tokio::select! {
            slot = Arc::clone(&connections).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let response = handler(peer, request);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let builder = {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.read_buffer_bytes);
            builder
        };
        let open = OpenConnection::new(open_connections.clone(), slot);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(connection).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            let connection =
                                builder.serve_connection(TokioIo::new(stream), service);
                            watcher.watch(connection).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!("TLS handshake with {peer} failed: {e}");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake with {peer} timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection ended: {e}");
            }
            drop(open);
        });
    }
    tracing::info!("shutting down: draining requests in progress");
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in progress after {:?}; exiting",
            limits.shutdown_grace
        );
    }
    Ok(())
}

/// A connection's slot under `max_connections`, counted in the
/// open-connections gauge while held.
struct OpenConnection {
    gauge: Gauge,
    _slot: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(gauge: Gauge, slot: OwnedSemaphorePermit) -> Self {
        gauge.inc();
        Self { gauge, _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use hyper::StatusCode;

    use super::*;

    fn request(addr: SocketAddr, path: &str) -> std::net::TcpStream {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        stream
    }

    fn reply(mut stream: std::net::TcpStream) -> String {
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read the reply");
        text
    }

    /// A request is answered by the handler; at shutdown a request in
    /// progress still gets its answer, then `serve` returns and the
    /// open-connections gauge is back to zero.
    #[test]
    fn requests_are_served_and_a_request_in_progress_is_drained_at_shutdown() {
        let runtime = runtime(4).expect("runtime");
        let listener = bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = ConnectionLimits {
            max_connections: 4,
            header_timeout: Duration::from_secs(5),
            read_buffer_bytes: READ_BUFFER_BYTES,
            shutdown_grace: Duration::from_secs(20),
        };
        let gauge = Gauge::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let started_tx = Arc::new(std::sync::Mutex::new(started_tx));
        let handler = move |_peer, request: Request<Incoming>| {
            let started = Arc::clone(&started_tx);
            async move {
                if request.uri().path() == "/slow" {
                    if let Ok(tx) = started.lock() {
                        let _ = tx.send(());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                crate::response::json(
                    StatusCode::OK,
                    &serde_json::json!({ "path": request.uri().path() }),
                )
            }
        };
        let server = runtime.spawn(serve(
            listener,
            limits,
            async move {
                let _ = stopped.await;
            },
            gauge.clone(),
            handler,
        ));
        let fast = reply(request(addr, "/fast"));
        assert!(fast.starts_with("HTTP/1.1 200"), "{fast}");
        assert!(fast.ends_with(r#"{"path":"/fast"}"#), "{fast}");
        let slow = request(addr, "/slow");
        started_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the slow request reached the handler");
        stop.send(()).expect("stop");
        let slow = reply(slow);
        assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
        assert!(slow.ends_with(r#"{"path":"/slow"}"#), "{slow}");
        let result = runtime.block_on(server).expect("server task");
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(gauge.get(), 0);
        // Nothing listens any more.
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
