//! Helpers for the Redis Streams and HTTP webhook sink tests: reading streams, freezing Redis, a TCP
//! proxy that can refuse connections, a webhook receiver that answers as told, a writer that
//! commits numbered rows and the check that every row arrived in per-key order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tailgate_redis::resp::{Connection, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub fn redis_address() -> String {
    std::env::var("TAILGATE_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into())
}

/// Tests that freeze Redis take this lock exclusively; every other Redis test holds it shared.
pub fn redis_lock() -> &'static tokio::sync::RwLock<()> {
    static LOCK: OnceLock<tokio::sync::RwLock<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}

pub async fn redis() -> Connection {
    Connection::open(&redis_address(), None, None, 0, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("Redis at {}: {e}. Did you run scripts/services.sh?", redis_address()))
}

pub async fn redis_cmd(args: &[&str]) -> Reply {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    redis().await.call(&args).await.unwrap()
}

/// One stream entry: its fields.
#[derive(Debug, Clone)]
pub struct Entry {
    pub fields: BTreeMap<String, String>,
}

impl Entry {
    pub fn json(&self, field: &str) -> Option<serde_json::Value> {
        self.fields.get(field).map(|v| serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone())))
    }
    pub fn id(&self) -> &str {
        &self.fields["id"]
    }
    pub fn op(&self) -> Option<String> {
        Some(self.json("value")?.get("op")?.as_str()?.to_owned())
    }
}

/// Every entry of `stream`, oldest first.
pub async fn xrange(stream: &str) -> Vec<Entry> {
    let reply = redis_cmd(&["XRANGE", stream, "-", "+"]).await;
    let Reply::Array(Some(items)) = reply else { return Vec::new() };
    items
        .into_iter()
        .map(|item| {
            let Reply::Array(Some(mut parts)) = item else { panic!("XRANGE entry {item:?}") };
            let Some(Reply::Array(Some(fields))) = parts.pop() else { panic!("XRANGE fields") };
            let fields = fields.chunks(2).map(|kv| (kv[0].text(), kv[1].text())).collect();
            Entry { fields }
        })
        .collect()
}

/// Waits until `stream` has at least `n` entries; returns them all.
pub async fn wait_stream(stream: &str, n: usize, timeout: Duration) -> Vec<Entry> {
    let deadline = Instant::now() + timeout;
    loop {
        let entries = xrange(stream).await;
        if entries.len() >= n {
            return entries;
        }
        assert!(Instant::now() < deadline, "{stream}: {} of {n} entries within {timeout:?}", entries.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn redis_pid() -> u32 {
    let info = redis_cmd(&["INFO", "server"]).await.text();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("process_id in INFO server")
}

/// Redis frozen with SIGSTOP until dropped (SIGCONT whatever happens in the test).
pub struct FrozenRedis(u32);

impl FrozenRedis {
    pub async fn freeze() -> FrozenRedis {
        let pid = redis_pid().await;
        crate::signal(pid, "STOP");
        FrozenRedis(pid)
    }
}

impl Drop for FrozenRedis {
    fn drop(&mut self) {
        crate::signal(self.0, "CONT");
    }
}

/// A TCP proxy to `target` on a port of its own. `set_up(false)` cuts every connection and closes
/// the port (connections are refused) until `set_up(true)`; `cut()` closes every connection and
/// goes on accepting new ones. `set_swallow(true)` throws away what clients send (as a network
/// losing it) while their connections stay up.
pub struct TcpProxy {
    pub port: u16,
    up: watch::Sender<bool>,
    cuts: watch::Sender<u64>,
    swallow: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: String) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, rx) = watch::channel(true);
        let swallow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cuts, cut_rx) = watch::channel(0u64);
        let task = tokio::spawn(proxy_loop(listener, port, target, rx, cut_rx, swallow.clone()));
        TcpProxy { port, up, cuts, swallow, task }
    }

    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }

    pub fn set_swallow(&self, swallow: bool) {
        self.swallow.store(swallow, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_loop(
    mut listener: TcpListener,
    port: u16,
    target: String,
    mut up: watch::Receiver<bool>,
    cuts: watch::Receiver<u64>,
    swallow: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => Some(accepted),
            _ = up.wait_for(|u| !*u) => None,
        };
        match accepted {
            Some(Ok((client, _))) => {
                let target = target.clone();
                let mut up = up.clone();
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                let swallow = swallow.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else { return };
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let upstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_client.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            if !swallow.load(std::sync::atomic::Ordering::SeqCst)
                                && to_server.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = upstream => {}
                        _ = tokio::io::copy(&mut from_server, &mut to_client) => {}
                        _ = up.wait_for(|u| !*u) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
            Some(Err(_)) => {}
            None => {
                drop(listener);
                let _ = up.wait_for(|u| *u).await;
                listener = loop {
                    match TcpListener::bind(("127.0.0.1", port)).await {
                        Ok(l) => break l,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
            }
        }
    }
}

/// How the webhook receiver answers a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Status(u16),
    /// Answers 200 after this long.
    Slow(Duration),
    /// Closes the connection without answering.
    Drop,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// What it answered (0: dropped the connection).
    pub status: u16,
    /// `X-Tailgate-Signature` matches the HMAC-SHA256 of the body under the receiver's secret.
    pub signature_ok: bool,
}

impl Received {
    pub fn records(&self) -> Vec<serde_json::Value> {
        match serde_json::from_slice(&self.body) {
            Ok(serde_json::Value::Array(records)) => records,
            other => panic!("body is not a JSON array: {other:?}"),
        }
    }
}

#[derive(Default)]
struct ReceiverState {
    answers: HashMap<String, Answer>,
    received: Vec<Received>,
}

/// A webhook receiver on 127.0.0.1: HTTP/1.1 with keep-alive, answering each path as told
/// (200 by default) and keeping every request.
pub struct Receiver {
    pub port: u16,
    secret: Vec<u8>,
    state: Arc<Mutex<ReceiverState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(secret: &str) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let secret = secret.as_bytes().to_vec();
        let task = tokio::spawn({
            let (state, secret) = (state.clone(), secret.clone());
            async move {
                while let Ok((conn, _)) = listener.accept().await {
                    tokio::spawn(serve(conn, state.clone(), secret.clone()));
                }
            }
        });
        Receiver { port, secret, state, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn answer(&self, path: &str, answer: Answer) {
        self.state.lock().unwrap().answers.insert(path.to_owned(), answer);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The records of the requests to `path` answered 200, in order.
    pub fn accepted(&self, path: &str) -> Vec<serde_json::Value> {
        self.received().iter().filter(|r| r.path == path && r.status == 200).flat_map(Received::records).collect()
    }

    /// Waits until requests to `path` answered 200 carried at least `n` records.
    pub async fn wait_accepted(&self, path: &str, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.accepted(path);
            if records.len() >= n {
                return records;
            }
            assert!(Instant::now() < deadline, "{path}: {} of {n} records within {timeout:?}", records.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn secret(&self) -> &[u8] {
        &self.secret
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a receiver verifies `X-Tailgate-Signature: sha256=<hex>` (docs/sinks.md): HMAC-SHA256 of the
/// raw body with the shared secret, compared in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else { return false };
    let Some(expected) = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

async fn serve(mut conn: TcpStream, state: Arc<Mutex<ReceiverState>>, secret: Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        // The head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 65536];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or_default().to_owned();
        let method = request_line.split_whitespace().next().unwrap_or_default().to_owned();
        let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        buf.drain(..head_end + 4);
        while buf.len() < length {
            let mut chunk = [0u8; 65536];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let answer = state.lock().unwrap().answers.get(&path).copied().unwrap_or(Answer::Ok);
        // `tailgate check` sends OPTIONS: answered like a POST only when credentials are refused.
        let answer = match answer {
            Answer::Status(401 | 403) => answer,
            _ if method == "OPTIONS" => Answer::Ok,
            _ => answer,
        };
        let status = match answer {
            Answer::Ok => 200,
            Answer::Status(s) => s,
            Answer::Slow(d) => {
                tokio::time::sleep(d).await;
                200
            }
            Answer::Drop => 0,
        };
        if method != "OPTIONS" {
            let signature_ok = headers.get("x-tailgate-signature").is_some_and(|h| verify_signature(&secret, &body, h));
            state.lock().unwrap().received.push(Received { path, headers, body, status, signature_ok });
        }
        if status == 0 {
            return;
        }
        let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 4\r\ncontent-type: text/plain\r\n\r\nnope");
        if conn.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Commits `steps` transactions into `t (id int PRIMARY KEY, v int)`: step `s` inserts rows
/// `s*rows..(s+1)*rows` with v = 0 and sets v = 1 on the rows of step `s-1`. Pauses between steps so
/// that faults land while it runs.
pub async fn write_steps(db_url: String, steps: i64, rows: i64, pause: Duration) {
    let client = crate::connect(&db_url).await;
    for s in 0..steps {
        client
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO t SELECT g, 0 FROM generate_series({}, {}) g;
                 UPDATE t SET v = 1 WHERE id >= {} AND id < {};
                 COMMIT;",
                s * rows,
                (s + 1) * rows - 1,
                (s - 1) * rows,
                s * rows
            ))
            .await
            .unwrap();
        tokio::time::sleep(pause).await;
    }
}

/// The events [`write_steps`] produced, as (record id, row id, op, v) in delivery order: checks that
/// every row arrived, that repeats (at least once) are whole repeats of earlier records, and that
/// per row the first delivery of each record comes in commit order (create, then update).
pub fn check_steps(events: &[(String, i64, String, i64)], steps: i64, rows: i64) {
    let mut seen = HashSet::new();
    let mut per_row: BTreeMap<i64, Vec<(String, i64)>> = BTreeMap::new();
    let mut repeats = 0;
    for (record_id, id, op, v) in events {
        if !seen.insert(record_id.clone()) {
            repeats += 1;
            continue;
        }
        per_row.entry(*id).or_default().push((op.clone(), *v));
    }
    for id in 0..steps * rows {
        let expected: Vec<(String, i64)> =
            if id < (steps - 1) * rows { vec![("c".into(), 0), ("u".into(), 1)] } else { vec![("c".into(), 0)] };
        assert_eq!(per_row.get(&id), Some(&expected), "row {id}: {:?}", per_row.get(&id));
    }
    assert_eq!(per_row.len() as i64, steps * rows, "no other rows");
    eprintln!("{} events, {} distinct, {repeats} repeated", events.len(), seen.len());
}
