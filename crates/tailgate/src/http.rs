//! `/metrics`, `/health` and `/ready` over plain HTTP/1.1.
//!
//! Three read-only GET routes for Prometheus and kubelet probes: a small hand-written server keeps
//! the binary free of a web framework. Each connection serves one request and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tailgate_pipeline::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// Binds `listen` and serves until the process ends.
pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>, ready_window: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    info!(listen = %listen, "serving /metrics, /health, /ready");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &metrics, ready_window).await {
                    debug!(error = %e, "http connection");
                }
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
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..])).await??;
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
