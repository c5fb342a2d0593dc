//! `/metrics`, `/health` and `/ready` over plain HTTP/1.1.
//!
//! Three read-only GET routes for Prometheus and kubelet probes: a small hand-written server keeps
//! the binary free of a web framework. Each connection serves one request and closes. At most
//! [`MAX_CONNECTIONS`] are served at once (others are closed at once), and a connection gets
//! [`REQUEST_DEADLINE`] in all to send its request and take the answer: slow or idle clients cannot
//! hold the endpoint, or the process's file descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tailgate_pipeline::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// Connections served at the same time.
pub const MAX_CONNECTIONS: usize = 32;
/// How long one connection may take, from accept to the end of the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Binds `listen` and serves until the process ends.
pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>, ready_window: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    info!(listen = %listen, "serving /metrics, /health, /ready");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                // Out of file descriptors or similar: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%peer, "http: {MAX_CONNECTIONS} connections already served; closing this one");
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(REQUEST_DEADLINE, handle(stream, &metrics, ready_window)).await {
                    Ok(Err(e)) => debug!(error = %e, "http connection"),
                    Err(_) => debug!(%peer, "http connection closed after {REQUEST_DEADLINE:?}"),
                    Ok(Ok(())) => {}
                }
                drop(slot);
            });
        }
    });
    Ok(())
}

async fn handle(mut stream: TcpStream, metrics: &Metrics, ready_window: Duration) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read the request head (we ignore headers and bodies).
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && !buf[..len].windows(2).any(|w| w == b"\n\n") {
        if len == buf.len() {
            break;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render(ready_window)),
        ("GET", "/health") => match metrics.health() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
            Err(reason) => ("503 Service Unavailable", "text/plain", format!("{reason}\n")),
        },
        ("GET", "/ready") => match metrics.readiness(ready_window) {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(reason) => ("503 Service Unavailable", "text/plain", format!("not ready: {reason}\n")),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics, /health or /ready\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
