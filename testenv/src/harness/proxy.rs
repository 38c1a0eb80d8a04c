//! A byte-counting, pacing TCP proxy: bytes on the wire as a node's link would carry them.

use std::time::Duration;

/// A TCP proxy in front of a registry that counts the bytes it delivers to clients (bytes on the
/// wire as a node's link would carry them) and can pace them like a slow link.
pub struct CountingProxy {
    pub addr: String,
    delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections opened so far, and the number below which connections hang (a half-dead link).
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stalled_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on a free port and forwards every connection to `upstream`.
    pub async fn start(upstream: &str) -> CountingProxy {
        CountingProxy::start_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), upstream)
    }

    /// Forwards every connection `listener` accepts to `upstream` (the listener may be in another
    /// network namespace; connections to `upstream` are made from the caller's).
    pub fn start_on(listener: tokio::net::TcpListener, upstream: &str) -> CountingProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        let addr = listener.local_addr().unwrap().to_string();
        let delivered = std::sync::Arc::new(AtomicU64::new(0));
        let rate = std::sync::Arc::new(AtomicU64::new(0));
        let opened = std::sync::Arc::new(AtomicU64::new(0));
        let stalled_below = std::sync::Arc::new(AtomicU64::new(0));
        let (d, r, upstream) = (delivered.clone(), rate.clone(), upstream.to_string());
        let (o, stalled) = (opened.clone(), stalled_below.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (d, r, upstream, stalled) = (d.clone(), r.clone(), upstream.clone(), stalled.clone());
                let id = o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while id < stalled.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            let rate = r.load(Ordering::Relaxed);
                            if rate > 0 {
                                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            d.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    };
                    // Either direction ending ends the connection.
                    tokio::select! {
                        _ = up => {},
                        _ = down => {},
                    }
                });
            }
        });
        CountingProxy { addr, delivered, rate, opened, stalled_below, task }
    }

    /// Bytes delivered to clients so far (headers included).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Paces deliveries to `bytes_per_second` (0: as fast as possible).
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, std::sync::atomic::Ordering::Relaxed);
    }
}

impl CountingProxy {
    /// Every connection open now stops delivering, for good (a half-dead link: no error, no byte);
    /// connections opened later work.
    pub fn stall_open_connections(&self) {
        use std::sync::atomic::Ordering;
        self.stalled_below.store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
