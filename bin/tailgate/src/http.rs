//! `/metrics`, `/health`, `/ready` and `/snapshots` over plain HTTP/1.1.
//!
//! Read-only GET routes for Prometheus and kubelet probes, and the incremental snapshot control
//! routes (`POST /snapshots`, `POST /snapshots/{id}/pause|resume`, `DELETE /snapshots/{id}`): a
//! small hand-written server keeps the binary free of a web framework. Each connection serves one
//! request and closes. At most [`MAX_CONNECTIONS`] are served at once (others are closed at once),
//! and a connection gets [`REQUEST_DEADLINE`] in all to send its request and take the answer: slow
//! or idle clients cannot hold the endpoint, or the process's file descriptors.
//!
//! The control routes run SQL predicates (`where`) against the source database: they answer
//! loopback clients only, unless `[http] token` is set, and then any client with
//! `Authorization: Bearer <token>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tailgate_pipeline::{ControlError, IncrementalControl, Metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// Connections served at the same time.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long one connection may take in all: a control request waits up to 10 s for the source.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);
/// The largest request (head and body) read.
const MAX_REQUEST: usize = 64 << 10;

/// What the endpoint serves.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    pub ready_window: Duration,
    pub incremental: Arc<IncrementalControl>,
    /// `[http] token`: required by the control routes when set.
    pub token: Option<String>,
}

/// Binds `listen` and serves until the process ends.
pub async fn serve(listen: SocketAddr, endpoint: Endpoint) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    info!(listen = %listen, "serving /metrics, /health, /ready, /snapshots");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let endpoint = Arc::new(endpoint);
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
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(CONNECTION_DEADLINE, handle(stream, peer, &endpoint)).await {
                    Ok(Err(e)) => debug!(error = %e, "http connection"),
                    Err(_) => debug!(%peer, "http connection closed after {CONNECTION_DEADLINE:?}"),
                    Ok(Ok(())) => {}
                }
                drop(slot);
            });
        }
    });
    Ok(())
}

/// A parsed request: method, path, headers (lower-case names), body.
struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if let Some(at) = buf.windows(2).position(|w| w == b"\n\n") {
            break at + 2;
        }
        if buf.len() >= MAX_REQUEST {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break buf.len();
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or("").to_owned(), first.next().unwrap_or("").to_owned());
    let path = path.split('?').next().unwrap_or("").to_owned();
    let mut length = 0usize;
    let mut authorization = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "authorization" => authorization = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    if head_end + length > MAX_REQUEST {
        return Ok(None);
    }
    let mut body = buf[head_end.min(buf.len())..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Some(Request { method, path, authorization, body }))
}

type Answer = (&'static str, &'static str, String);

async fn handle(mut stream: TcpStream, peer: SocketAddr, endpoint: &Endpoint) -> std::io::Result<()> {
    let request = match tokio::time::timeout(REQUEST_DEADLINE, read_request(&mut stream)).await {
        Ok(request) => request?,
        Err(_) => {
            debug!(%peer, "http request not received within {REQUEST_DEADLINE:?}");
            return Ok(());
        }
    };
    let (status, content_type, body) = match request {
        None => ("413 Payload Too Large", "text/plain", format!("requests are limited to {MAX_REQUEST} bytes\n")),
        Some(request) => route(&request, peer, endpoint).await,
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn route(request: &Request, peer: SocketAddr, endpoint: &Endpoint) -> Answer {
    let metrics = &endpoint.metrics;
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render(endpoint.ready_window)),
        ("GET", "/health") => match metrics.health() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
            Err(reason) => ("503 Service Unavailable", "text/plain", format!("{reason}\n")),
        },
        ("GET", "/ready") => match metrics.readiness(endpoint.ready_window) {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(reason) => ("503 Service Unavailable", "text/plain", format!("not ready: {reason}\n")),
        },
        ("GET", "/snapshots") => json("200 OK", &serde_json::json!({ "snapshots": endpoint.incremental.status() })),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics, /health, /ready or /snapshots\n".to_owned()),
        (method @ ("POST" | "DELETE"), path) if path == "/snapshots" || path.starts_with("/snapshots/") => {
            if let Some(refusal) = authorize(request, peer, endpoint) {
                return refusal;
            }
            control(method, path, &request.body, &endpoint.incremental).await
        }
        _ => ("405 Method Not Allowed", "text/plain", "GET, or POST/DELETE on /snapshots\n".to_owned()),
    }
}

/// The control routes: a token when one is configured, else a loopback client.
fn authorize(request: &Request, peer: SocketAddr, endpoint: &Endpoint) -> Option<Answer> {
    match &endpoint.token {
        Some(token) => {
            let presented = request.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer "));
            // Compare without short-circuiting on the first differing byte.
            let matches = presented.is_some_and(|p| {
                p.len() == token.len() && p.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            });
            (!matches).then(|| error("401 Unauthorized", "send Authorization: Bearer <[http] token>"))
        }
        None => (!peer.ip().is_loopback()).then(|| {
            error("403 Forbidden", "control routes answer this host only; set [http] token to allow other hosts")
        }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    tables: Vec<String>,
    #[serde(default, rename = "where")]
    filter: Option<String>,
}

async fn control(method: &str, path: &str, body: &[u8], incremental: &IncrementalControl) -> Answer {
    let rest = path.trim_start_matches("/snapshots").trim_start_matches('/');
    let outcome = match (method, rest.split_once('/').unwrap_or((rest, ""))) {
        ("POST", ("", "")) => {
            let request: StartRequest = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(e) => {
                    return error(
                        "400 Bad Request",
                        &format!("expected {{\"tables\": [\"schema.table\", …], \"where\": \"…\"}}: {e}"),
                    );
                }
            };
            if request.tables.is_empty() {
                return error("400 Bad Request", "name at least one table");
            }
            return match incremental.start(request.tables, request.filter.filter(|f| !f.trim().is_empty())).await {
                Ok(ids) => json("201 Created", &serde_json::json!({ "ids": ids })),
                Err(e) => control_error(e),
            };
        }
        (_, (id, action)) => {
            let Ok(id) = id.parse::<u64>() else { return error("404 Not Found", "no such snapshot route") };
            match (method, action) {
                ("POST", "pause") => incremental.pause(id).await,
                ("POST", "resume") => incremental.resume(id).await,
                ("DELETE", "") => incremental.cancel(id).await,
                _ => return error("404 Not Found", "POST /snapshots/{id}/pause|resume, DELETE /snapshots/{id}"),
            }
        }
    };
    match outcome {
        Ok(()) => json("200 OK", &serde_json::json!({ "snapshots": incremental.status() })),
        Err(e) => control_error(e),
    }
}

fn control_error(e: ControlError) -> Answer {
    match e {
        ControlError::NotStreaming => error("503 Service Unavailable", &e.to_string()),
        ControlError::Refused(why) => error("409 Conflict", &why),
    }
}

fn json(status: &'static str, value: &serde_json::Value) -> Answer {
    (status, "application/json", format!("{value}\n"))
}

fn error(status: &'static str, message: &str) -> Answer {
    json(status, &serde_json::json!({ "error": message }))
}
