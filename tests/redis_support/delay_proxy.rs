//! A TCP proxy in front of a Redis that adds a settable latency to every command: a Redis
//! that is slow now and then (a failover, a snapshot, a noisy neighbour) without being down.
//!
//! Client → Redis bytes are forwarded `delay` after they were read (the delay in force when
//! they were read), in order, so a pipelined connection keeps its throughput and every
//! command is late by exactly `delay`; Redis → client bytes pass straight through.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A running proxy; it stops accepting when dropped (connections end with their peers).
pub(crate) struct DelayProxy {
    port: u16,
    delay_ms: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// A proxy on a free loopback port in front of the Redis on `upstream_port`.
    pub(crate) async fn start(upstream_port: u16) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let port = listener.local_addr().expect("bound").port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = Arc::clone(&delay_ms);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let delay = Arc::clone(&delay);
                tokio::spawn(async move {
                    if let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                        relay(client, upstream, delay).await;
                    }
                });
            }
        });
        DelayProxy {
            port,
            delay_ms,
            accept,
        }
    }

    /// Its `redis://` URL.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sets the latency added to commands read from now on.
    pub(crate) fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, upstream: TcpStream, delay: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if upstream_write.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    let back = async move {
        let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
    };
    // Whichever direction ends first ends the relay (the peer closed or failed).
    tokio::select! {
        _ = async { tokio::join!(reader, writer) } => {}
        _ = back => {}
    }
}
