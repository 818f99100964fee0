//! A recording proxy on loopback for the privacy guard: one per site, it
//! forwards every connection to the aggregator unchanged and writes every
//! byte the site sent on it to `DIR/conn-<n>.bin` (the aggregator's
//! answers are forwarded, not kept). The files are the exact wire bytes:
//! HTTP/1.1 requests one after another.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use super::{SimulateError, io_error};

/// A running proxy; dropping it stops accepting.
pub struct Recorder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`,
    /// recording into `dir` (created).
    ///
    /// # Errors
    /// [`SimulateError::Io`] when the folder or the socket cannot be made.
    pub fn start(upstream: SocketAddr, dir: &Path) -> Result<Self, SimulateError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io_error(dir))?;
        let addr = listener.local_addr().map_err(io_error(dir))?;
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicUsize::new(0));
        let dir: PathBuf = dir.to_path_buf();
        let stopping = Arc::clone(&stop);
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let file = dir.join(format!("conn-{n:05}.bin"));
                std::thread::spawn(move || {
                    if let Err(e) = relay(client, upstream, &file) {
                        tracing::debug!("recording proxy: {e}");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// The address sites connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
    }
}

/// Forwards one connection both ways; what the client sends is also
/// appended to `file`.
fn relay(client: TcpStream, upstream: SocketAddr, file: &Path) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    let (mut client_read, mut server_write) = (client.try_clone()?, server.try_clone()?);
    let (mut server_read, mut client_write) = (server, client);
    let mut record = std::fs::File::create(file)?;
    let answers = std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_read, &mut client_write);
        let _ = client_write.shutdown(Shutdown::Write);
    });
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = client_read.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        record.write_all(&buffer[..n])?;
        server_write.write_all(&buffer[..n])?;
    }
    record.sync_all()?;
    let _ = server_write.shutdown(Shutdown::Write);
    let _ = answers.join();
    Ok(())
}
