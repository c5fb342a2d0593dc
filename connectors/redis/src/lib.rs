//! Redis Streams sink.
//!
//! Every record becomes one `XADD <topic> [MAXLEN ~ N] * key <key> value <value> headers <json> id
//! <record id>` on the stream named by its topic (a `null` key or value leaves its field out; a
//! tombstone is a record with `key` and no `value`; `headers` is a JSON object, present only when the
//! record has headers, as outbox records and dead letters do). Dead letters go to the dead-letter
//! stream like any record.
//!
//! Contract, on top of the [`Sink`] one:
//! - **Batches.** Records are written into one reused buffer as `MULTI`, the batch's `XADD`s and
//!   `EXEC`, sent by one writer task in one round trip. The transaction makes a batch all or nothing:
//!   after a connection is lost before its `EXEC` reply, the batch is sent again whole, so a repeat
//!   is always the whole batch again, in order (consumers that drop records whose `id` they have
//!   seen get every record once, in order).
//! - **Acknowledgement.** A batch's records are acknowledged when its `EXEC` reply came back without
//!   an error (and, with `wait_replicas`, when `WAIT` counted that many replicas). The reply means
//!   Redis applied the batch in memory; what survives a Redis crash is Redis's persistence
//!   configuration (docs/sinks.md: `appendonly yes` with `appendfsync always`).
//! - **Order.** One batch in flight at a time on one connection: records reach each stream in the
//!   order given, and batches in the order handed over.
//! - **Backpressure.** At most [`QUEUED_BATCHES`] sealed batches wait for the writer, each at most
//!   `max_batch_records` / `max_batch_bytes` (a single record larger than that goes alone); `send`
//!   waits while they are full.
//! - **Retries.** A lost connection, a timeout and the errors Redis gives while it cannot write for
//!   now (`OOM`, `LOADING`, `BUSY`, `MISCONF`, `READONLY`, `MASTERDOWN`, `TRYAGAIN`, `NOREPLICAS`,
//!   `CLUSTERDOWN`) are retried with exponential backoff (100 ms to 10 s) on a new connection, the
//!   unacknowledged batch first. Refused credentials, missing ACL permissions, a key of another type
//!   and Redis Cluster redirections are definite: the run stops naming the cause and the fix.

pub mod resp;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tailgate_core::envelope::write_str;
use tailgate_pipeline::{
    AckTracker, BoxFuture, CheckResult, Checkpoint, Encoder, KeyError, Sink, SinkBuilder, SinkContext, SinkError,
    SinkItem, SinkTotals, key_error,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::resp::{Connection, Reply, RespError};
use tailgate_pipeline::stopping::{Interrupted, Stopping};

/// Sealed batches waiting for the writer (besides the one it is sending and the one being filled).
pub const QUEUED_BATCHES: usize = 2;

/// `[sink]` with `type = "redis"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `host:port` of the Redis primary. Required.
    pub address: String,
    /// ACL user (Redis 6+). Default: none (`AUTH <password>` authenticates the `default` user).
    pub username: Option<String>,
    /// Default: none (no `AUTH`).
    pub password: Option<String>,
    /// Logical database (`SELECT`). Default 0.
    #[serde(default)]
    pub database: u32,
    /// Default: the connector name. Streams are `<topic_prefix>.<schema>.<table>`.
    pub topic_prefix: Option<String>,
    /// Trim each stream to about this many entries (`XADD … MAXLEN ~ N`). Default: none, streams
    /// grow until consumers trim them. Trimming drops the oldest entries whether or not they were
    /// read.
    pub maxlen: Option<u64>,
    /// Records per `MULTI`/`EXEC` round trip. Default 1000.
    #[serde(default = "default_batch_records")]
    pub max_batch_records: usize,
    /// Bytes per round trip (commands as sent). Default 1048576 (1 MiB).
    #[serde(default = "default_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Records whose key, value and headers are larger go to the dead-letter stream. Default
    /// 1000000. At most 536870912 (Redis's `proto-max-bulk-len` default).
    #[serde(default = "default_record_bytes")]
    pub max_record_bytes: usize,
    /// How long a connection attempt or a batch's reply may take before the connection is dropped
    /// and the batch sent again on a new one. Default 30000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// After each batch, `WAIT` until this many replicas have it before acknowledging. Default 0.
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long one `WAIT` may block (it is repeated until enough replicas confirm). Default 1000.
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
}

fn default_batch_records() -> usize {
    1000
}
fn default_batch_bytes() -> usize {
    1 << 20
}
fn default_record_bytes() -> usize {
    1_000_000
}
fn default_timeout_ms() -> u64 {
    30_000
}
fn default_wait_timeout_ms() -> u64 {
    1000
}

/// Redis refuses bulk strings over `proto-max-bulk-len` (512 MiB by default).
const PROTO_MAX_BULK_LEN: usize = 512 << 20;

impl SinkBuilder for RedisConfig {
    fn kind(&self) -> &'static str {
        "Redis"
    }

    fn validate(&self) -> Result<(), KeyError> {
        let address = self.address.trim();
        let port_ok =
            address.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(key_error(
                "sink.address",
                format!("{:?} is not host:port, e.g. \"127.0.0.1:6379\"", self.address),
            ));
        }
        if self.max_batch_records == 0 {
            return Err(key_error("sink.max_batch_records", "must be at least 1"));
        }
        if self.max_batch_bytes < 1024 {
            return Err(key_error("sink.max_batch_bytes", "must be at least 1024"));
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > PROTO_MAX_BULK_LEN {
            return Err(key_error(
                "sink.max_record_bytes",
                format!("must be between 1 and {PROTO_MAX_BULK_LEN} (Redis's proto-max-bulk-len)"),
            ));
        }
        if self.maxlen == Some(0) {
            return Err(key_error("sink.maxlen", "0 would trim every stream empty; remove the key to keep everything"));
        }
        if self.timeout_ms == 0 {
            return Err(key_error("sink.timeout_ms", "must be at least 1"));
        }
        if self.wait_replicas > 0 && self.wait_timeout_ms == 0 {
            return Err(key_error("sink.wait_timeout_ms", "must be at least 1 (0 would make WAIT block forever)"));
        }
        Ok(())
    }

    fn topic_prefix(&self) -> Option<&str> {
        self.topic_prefix.as_deref()
    }

    fn max_record_bytes(&self) -> Option<usize> {
        Some(self.max_record_bytes)
    }

    fn build(&self, ctx: SinkContext) -> Result<Box<dyn Sink>, SinkError> {
        info!(address = %self.address, "sink: redis");
        Ok(Box::new(RedisSink::new(self, ctx)))
    }

    fn check<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Vec<CheckResult>> {
        Box::pin(check(self))
    }
}

/// What the writer needs to talk to Redis.
#[derive(Debug, Clone)]
struct Server {
    address: String,
    username: Option<String>,
    password: Option<String>,
    database: u32,
    timeout: Duration,
    wait_replicas: u32,
    wait_timeout_ms: u64,
}

impl Server {
    fn from_config(c: &RedisConfig) -> Self {
        Server {
            address: c.address.trim().to_owned(),
            username: c.username.clone(),
            password: c.password.clone(),
            database: c.database,
            timeout: Duration::from_millis(c.timeout_ms),
            wait_replicas: c.wait_replicas,
            wait_timeout_ms: c.wait_timeout_ms,
        }
    }

    async fn connect(&self) -> Result<Connection, RespError> {
        Connection::open(&self.address, self.username.as_deref(), self.password.as_deref(), self.database, self.timeout)
            .await
    }

    fn who(&self) -> String {
        format!("user {:?}", self.username.as_deref().unwrap_or("default"))
    }
}

/// A batch as the writer sends it: `MULTI`, `commands` × `XADD`, `EXEC`.
struct Batch {
    buf: Vec<u8>,
    commands: usize,
    /// Sequence number (in the [`AckTracker`]) of the first record.
    first_seq: u64,
    /// `MAXLEN ~ N` arguments, rendered once.
    maxlen: Option<Arc<[u8]>>,
    /// Reused for each record's headers as JSON.
    headers: Vec<u8>,
}

impl Batch {
    fn new(buf: Vec<u8>, maxlen: Option<Arc<[u8]>>) -> Self {
        Batch { buf, commands: 0, first_seq: 0, maxlen, headers: Vec::new() }
    }

    /// Appends one `XADD` for record `seq`.
    fn push(
        &mut self,
        seq: u64,
        stream: &str,
        id: &[&[u8]],
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(String, Vec<u8>)],
    ) {
        if self.commands == 0 {
            self.first_seq = seq;
        }
        let fields = 1 + usize::from(key.is_some()) + usize::from(value.is_some()) + usize::from(!headers.is_empty());
        let buf = &mut self.buf;
        resp::array(buf, 3 + if self.maxlen.is_some() { 3 } else { 0 } + 2 * fields);
        resp::bulk(buf, b"XADD");
        resp::bulk(buf, stream.as_bytes());
        if let Some(n) = &self.maxlen {
            resp::bulk(buf, b"MAXLEN");
            resp::bulk(buf, b"~");
            resp::bulk(buf, n);
        }
        resp::bulk(buf, b"*");
        if let Some(k) = key {
            resp::bulk(buf, b"key");
            resp::bulk(buf, k);
        }
        if let Some(v) = value {
            resp::bulk(buf, b"value");
            resp::bulk(buf, v);
        }
        if !headers.is_empty() {
            self.headers.clear();
            self.headers.push(b'{');
            for (i, (k, v)) in headers.iter().enumerate() {
                if i > 0 {
                    self.headers.push(b',');
                }
                write_str(&mut self.headers, k);
                self.headers.push(b':');
                write_str(&mut self.headers, &String::from_utf8_lossy(v));
            }
            self.headers.push(b'}');
            resp::bulk(buf, b"headers");
            resp::bulk(buf, &self.headers);
        }
        resp::bulk(buf, b"id");
        resp::bulk_parts(buf, id);
        self.commands += 1;
    }
}

/// From the writer to the sink.
enum Report {
    /// Records `first_seq..first_seq + records` are in Redis; `buf` can be reused.
    Done { first_seq: u64, records: usize, buf: Vec<u8> },
    /// The writer stopped: a definite failure, or the drain timeout ran out.
    Failed(SinkError),
}

pub struct RedisSink {
    encoder: Encoder,
    tracker: AckTracker,
    current: Batch,
    /// Buffers back from the writer, for the next batches.
    spare: Vec<Vec<u8>>,
    max_batch_records: usize,
    max_batch_bytes: usize,
    queue: mpsc::Sender<Batch>,
    reports: mpsc::UnboundedReceiver<Report>,
    writer: JoinHandle<()>,
    totals: SinkTotals,
}

const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";

impl RedisSink {
    fn new(config: &RedisConfig, ctx: SinkContext) -> Self {
        let (queue, batches) = mpsc::channel(QUEUED_BATCHES);
        let (report_tx, reports) = mpsc::unbounded_channel();
        let stopping = Stopping::new(ctx.shutdown, ctx.drain_timeout);
        let writer = tokio::spawn(write_batches(Server::from_config(config), batches, report_tx, stopping));
        let maxlen: Option<Arc<[u8]>> = config.maxlen.map(|n| {
            let mut digits = Vec::new();
            resp::push_decimal(&mut digits, n);
            digits.into()
        });
        RedisSink {
            encoder: Encoder::new(ctx.encoder),
            tracker: AckTracker::new(),
            current: Batch::new(new_buffer(config.max_batch_bytes), maxlen),
            spare: Vec::new(),
            max_batch_records: config.max_batch_records,
            max_batch_bytes: config.max_batch_bytes,
            queue,
            reports,
            writer,
            totals: SinkTotals::default(),
        }
    }

    fn full(&self) -> bool {
        self.current.commands >= self.max_batch_records || self.current.buf.len() >= self.max_batch_bytes
    }

    /// Closes the current batch with `EXEC` and starts the next one.
    fn seal(&mut self) -> Batch {
        let buf = self.spare.pop().unwrap_or_else(|| new_buffer(self.max_batch_bytes));
        let next = Batch::new(buf, self.current.maxlen.clone());
        let mut batch = std::mem::replace(&mut self.current, next);
        batch.buf.extend_from_slice(EXEC);
        batch
    }

    /// Hands the current batch to the writer, waiting while the queue is full (backpressure).
    async fn hand_over(&mut self) -> Result<(), SinkError> {
        if self.current.commands == 0 {
            return Ok(());
        }
        let batch = self.seal();
        if self.queue.send(batch).await.is_err() {
            return Err(self.writer_failure());
        }
        Ok(())
    }

    /// Hands the current batch over if the queue has room; otherwise it keeps filling.
    fn try_hand_over(&mut self) -> Result<(), SinkError> {
        if self.current.commands == 0 {
            return Ok(());
        }
        match self.queue.clone().try_reserve_owned() {
            Ok(permit) => {
                permit.send(self.seal());
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.writer_failure()),
        }
    }

    /// The writer's own error once it has stopped.
    fn writer_failure(&mut self) -> SinkError {
        while let Ok(report) = self.reports.try_recv() {
            if let Report::Failed(e) = report {
                return e;
            }
        }
        SinkError::Other("the Redis writer stopped unexpectedly; nothing unacknowledged was checkpointed".into())
    }

    fn apply(&mut self, report: Report) -> Result<(), SinkError> {
        match report {
            Report::Done { first_seq, records, mut buf } => {
                for seq in first_seq..first_seq + records as u64 {
                    self.tracker.ack(seq);
                }
                self.totals.delivered += records as u64;
                // Keep a few buffers of the usual size; one grown by a huge record is let go.
                if self.spare.len() < QUEUED_BATCHES + 1 && buf.capacity() <= 2 * self.max_batch_bytes + 4096 {
                    buf.clear();
                    buf.extend_from_slice(MULTI);
                    self.spare.push(buf);
                }
                Ok(())
            }
            Report::Failed(e) => Err(e),
        }
    }

    fn serve_reports(&mut self) -> Result<(), SinkError> {
        while let Ok(report) = self.reports.try_recv() {
            self.apply(report)?;
        }
        Ok(())
    }

    async fn send_batch(&mut self, batch: Vec<SinkItem>) -> Result<(), SinkError> {
        self.encoder.begin_batch();
        for item in &batch {
            if let SinkItem::Commit(position) = item {
                self.tracker.commit(position.clone());
            }
            // Commits go through the encoder too: they restart the index in the record ids, which
            // must be the same when a transaction is sent again after a restart.
            let Some(prepared) = self.encoder.prepare(item)? else { continue };
            if self.full() {
                self.hand_over().await?;
            }
            let (key, value) = (self.encoder.key(), self.encoder.value());
            let id = self.encoder.record_id().as_bytes();
            let seq = self.tracker.register();
            self.current.push(seq, &prepared.topic, &[id], key, value, self.encoder.headers());
            self.totals.bytes += (key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len)) as u64;
            self.totals.dead_lettered += u64::from(prepared.dead_letter);
            if prepared.tombstone {
                let seq = self.tracker.register();
                self.current.push(seq, &prepared.topic, &[id, b"/t"], key, None, &[]);
                self.totals.bytes += key.map_or(0, <[u8]>::len) as u64;
            }
        }
        self.serve_reports()?;
        self.try_hand_over()
    }

    async fn flush_all(&mut self, timeout: Duration) -> Result<Option<Checkpoint>, SinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Waiting for room in the queue is bounded by the same deadline; a stopped writer's error
        // is the run's error.
        if let Ok(Err(e)) = tokio::time::timeout_at(deadline, self.hand_over()).await {
            return Err(e);
        }
        while self.tracker.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(report)) => self.apply(report)?,
                Ok(None) | Err(_) => break,
            }
        }
        self.serve_reports()?;
        Ok(self.tracker.take_checkpoint())
    }
}

fn new_buffer(max_batch_bytes: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(max_batch_bytes + 64 * 1024);
    buf.extend_from_slice(MULTI);
    buf
}

impl Drop for RedisSink {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

impl Sink for RedisSink {
    fn send(&mut self, batch: Vec<SinkItem>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(self.send_batch(batch))
    }

    fn poll_acks(&mut self) -> Result<Option<Checkpoint>, SinkError> {
        self.serve_reports()?;
        // Records left in the current batch while the queue was full go out as soon as it has room.
        self.try_hand_over()?;
        Ok(self.tracker.take_checkpoint())
    }

    fn flush(&mut self, timeout: Duration) -> BoxFuture<'_, Result<Option<Checkpoint>, SinkError>> {
        Box::pin(self.flush_all(timeout))
    }

    fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    fn totals(&self) -> SinkTotals {
        self.totals
    }
}

/// What a failed attempt means for the batch.
enum Attempt {
    /// Drop the connection and send the batch again after a backoff.
    Retry(String),
    /// Stop the run.
    Fatal(SinkError),
    GaveUp,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The writer task: sends batches one at a time, each until Redis has it, reconnecting as needed.
async fn write_batches(
    server: Server,
    mut batches: mpsc::Receiver<Batch>,
    reports: mpsc::UnboundedSender<Report>,
    mut stopping: Stopping,
) {
    let mut conn: Option<Connection> = None;
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    while let Some(batch) = batches.recv().await {
        loop {
            let outcome = match attempt(&server, &mut conn, &batch, &mut stopping).await {
                Ok(()) => {
                    if failures > 0 {
                        info!(address = %server.address, attempts = failures + 1, "Redis accepts writes again");
                    }
                    failures = 0;
                    backoff = BACKOFF_MIN;
                    break;
                }
                Err(outcome) => outcome,
            };
            conn = None;
            let reason = match outcome {
                Attempt::Retry(reason) => reason,
                Attempt::Fatal(e) => {
                    let _ = reports.send(Report::Failed(e));
                    return;
                }
                Attempt::GaveUp => {
                    let _ = reports.send(Report::Failed(gave_up(&server)));
                    return;
                }
            };
            failures += 1;
            warn!(address = %server.address, error = %reason, retry_in = ?backoff, records = batch.commands,
                "Redis did not take the batch; sending it again");
            if stopping.run(tokio::time::sleep(backoff), None).await.is_err() {
                let _ = reports.send(Report::Failed(gave_up(&server)));
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let done = Report::Done { first_seq: batch.first_seq, records: batch.commands, buf: batch.buf };
        if reports.send(done).is_err() {
            return;
        }
    }
}

fn gave_up(server: &Server) -> SinkError {
    SinkError::Other(format!(
        "stopping while Redis at {} does not take writes; unacknowledged records stay uncheckpointed and are sent \
         again on restart",
        server.address
    ))
}

/// One try at one batch: connect if needed, send it, read its replies (and `WAIT`).
async fn attempt(
    server: &Server,
    conn: &mut Option<Connection>,
    batch: &Batch,
    stopping: &mut Stopping,
) -> Result<(), Attempt> {
    let interrupted = |i: Interrupted, doing: &str| match i {
        Interrupted::GaveUp => Attempt::GaveUp,
        Interrupted::TimedOut => Attempt::Retry(format!("no answer within {:?} while {doing}", server.timeout)),
    };
    let c = match conn {
        Some(c) => c,
        None => {
            let opened = stopping.run(server.connect(), None).await.map_err(|i| interrupted(i, "connecting"))?;
            conn.insert(opened.map_err(|e| classify(server, batch, e, true))?)
        }
    };
    let exchange = async {
        c.write_all(&batch.buf).await?;
        c.transaction_replies(batch.commands).await
    };
    stopping
        .run(exchange, Some(server.timeout))
        .await
        .map_err(|i| interrupted(i, "waiting for the batch's reply"))?
        .map_err(|e| classify(server, batch, e, false))?;
    if server.wait_replicas > 0 {
        let mut timeout = Vec::new();
        resp::push_decimal(&mut timeout, server.wait_timeout_ms);
        let mut replicas = Vec::new();
        resp::push_decimal(&mut replicas, u64::from(server.wait_replicas));
        let args: [&[u8]; 3] = [b"WAIT", &replicas, &timeout];
        loop {
            let wait = c.call(&args);
            let limit = server.timeout + Duration::from_millis(server.wait_timeout_ms);
            let reply = stopping
                .run(wait, Some(limit))
                .await
                .map_err(|i| interrupted(i, "waiting for replicas"))?
                .map_err(|e| classify(server, batch, e, false))?;
            match reply {
                Reply::Int(n) if n >= i64::from(server.wait_replicas) => break,
                // WAIT covers every earlier write of this connection: ask again, do not resend.
                Reply::Int(n) => warn!(
                    confirmed = n,
                    wanted = server.wait_replicas,
                    "replicas have not confirmed the batch yet (sink.wait_replicas); waiting"
                ),
                Reply::Error(e) => return Err(classify(server, batch, RespError::Server(e), false)),
                other => return Err(Attempt::Retry(format!("WAIT answered {other:?}"))),
            }
        }
    }
    Ok(())
}

/// Sorts Redis's errors into retried and definite ones; definite ones name the fix.
fn classify(server: &Server, batch: &Batch, error: RespError, connecting: bool) -> Attempt {
    let stream = match &error {
        RespError::Command { index, .. } => resp::nth_key(&batch.buf, *index).unwrap_or_default(),
        _ => String::new(),
    };
    let code = error.code().unwrap_or_default().to_owned();
    let message = error.to_string();
    match error {
        RespError::Io(e) => Attempt::Retry(format!("{} ({})", e, server.address)),
        RespError::Protocol(p) => Attempt::Retry(p),
        RespError::Server(_) | RespError::Command { .. } => match code.as_str() {
            "OOM" | "LOADING" | "BUSY" | "MISCONF" | "READONLY" | "MASTERDOWN" | "TRYAGAIN" | "NOREPLICAS"
            | "CLUSTERDOWN" => Attempt::Retry(format!("{message}{}", transient_fix(&code))),
            "WRONGPASS" | "NOAUTH" => Attempt::Fatal(SinkError::Connect(format!(
                "Redis at {} refused the credentials of {}: {message}. Fix: set sink.username and sink.password to \
                 an ACL user of this server (sink.password alone authenticates the default user)",
                server.address,
                server.who()
            ))),
            "NOPERM" => Attempt::Fatal(SinkError::Delivery {
                topic: stream,
                reason: format!("Redis {} lacks a permission: {message}", server.who()),
                fix: "grant the ACL user the commands and keys it needs, e.g. ACL SETUSER <user> +xadd +multi +exec \
                      +ping +select +wait ~<topic_prefix>.*",
            }),
            "WRONGTYPE" => Attempt::Fatal(SinkError::Delivery {
                topic: stream,
                reason: format!("the key exists and is not a stream: {message}"),
                fix: "delete or rename that key, or choose another sink.topic_prefix or sink.database",
            }),
            "MOVED" | "ASK" | "CROSSSLOT" => Attempt::Fatal(SinkError::Delivery {
                topic: stream,
                reason: format!("Redis Cluster redirected the write: {message}"),
                fix: "Redis Cluster is not supported; point sink.address at a standalone (or Sentinel-managed) primary",
            }),
            _ if connecting => Attempt::Fatal(SinkError::Connect(format!(
                "Redis at {} refused the connection setup: {message}. Fix: check sink.username, sink.password and \
                 sink.database (databases other than 0 need a standalone server with enough `databases`)",
                server.address
            ))),
            _ => Attempt::Fatal(SinkError::Delivery {
                topic: stream,
                reason: format!("Redis refused the write: {message}"),
                fix: "see the Redis error above; the run stopped without checkpointing past this record",
            }),
        },
    }
}

fn transient_fix(code: &str) -> &'static str {
    match code {
        "OOM" => " (Redis is at maxmemory: let consumers trim the streams, set sink.maxlen, or raise maxmemory)",
        "MISCONF" => " (Redis cannot persist: see its log for the failing RDB/AOF write)",
        "READONLY" => " (this is a replica: point sink.address at the primary)",
        "NOREPLICAS" => " (fewer replicas than min-replicas-to-write are connected)",
        _ => "",
    }
}

/// `tailgate check`: connection and credentials, the server's role, and what its persistence
/// settings mean for acknowledged records. Writes nothing.
async fn check(config: &RedisConfig) -> Vec<CheckResult> {
    let server = Server { timeout: Duration::from_secs(5), ..Server::from_config(config) };
    let mut conn = match server.connect().await {
        Ok(c) => c,
        Err(RespError::Io(e)) => {
            return vec![CheckResult::failed(
                "redis",
                format!("{} did not answer: {e}. Fix: start Redis or correct sink.address", server.address),
            )];
        }
        Err(e) => {
            let detail = match classify(&server, &Batch::new(Vec::new(), None), e, true) {
                Attempt::Fatal(e) => e.to_string(),
                Attempt::Retry(r) => format!("{}: {r}", server.address),
                Attempt::GaveUp => String::new(),
            };
            return vec![CheckResult::failed("redis", detail)];
        }
    };
    let mut results =
        vec![CheckResult::ok("redis", format!("{} answered and accepted {}", server.address, server.who()))];
    match conn.call(&[b"ROLE"]).await {
        Ok(Reply::Array(Some(items))) => match items.first().map(Reply::text).as_deref() {
            Some("master") => {}
            Some(role) => results.push(CheckResult::failed(
                "redis role",
                format!("{} is a {role}, which refuses writes. Fix: point sink.address at the primary", server.address),
            )),
            None => {}
        },
        Ok(Reply::Error(e)) => {
            results.push(CheckResult::warn("redis role", format!("ROLE refused ({e}): not checked")))
        }
        Ok(_) => {}
        Err(e) => results.push(CheckResult::warn("redis role", format!("ROLE failed ({e}): not checked"))),
    }
    results.push(durability(&mut conn).await);
    results
}

/// Reads `INFO persistence` / `INFO memory` (and `CONFIG GET appendfsync` where allowed).
async fn durability(conn: &mut Connection) -> CheckResult {
    let info = |reply: Result<Reply, RespError>| match reply {
        Ok(Reply::Bulk(Some(text))) => String::from_utf8_lossy(&text).into_owned(),
        _ => String::new(),
    };
    let persistence = info(conn.call(&[b"INFO", b"persistence"]).await);
    let memory = info(conn.call(&[b"INFO", b"memory"]).await);
    let field = |text: &str, name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(|v| v.trim().to_owned())
    };
    let policy = field(&memory, "maxmemory_policy").unwrap_or_default();
    let maxmemory = field(&memory, "maxmemory").unwrap_or_default();
    if maxmemory != "0" && !maxmemory.is_empty() && policy != "noeviction" && !policy.is_empty() {
        return CheckResult::failed(
            "redis durability",
            format!(
                "maxmemory-policy is {policy}: Redis may evict whole streams when full, losing acknowledged records. \
                 Fix: CONFIG SET maxmemory-policy noeviction (a full Redis then refuses writes and tailgate waits)"
            ),
        );
    }
    match field(&persistence, "aof_enabled").as_deref() {
        Some("1") => {}
        Some(_) => {
            return CheckResult::warn(
                "redis durability",
                "appendonly is off: acknowledged records live in Redis's memory (and its last RDB snapshot) only; a \
                 Redis crash or restart loses them after tailgate has checkpointed past them. Fix: appendonly yes \
                 and appendfsync always (see docs/sinks.md)",
            );
        }
        None => return CheckResult::warn("redis durability", "INFO persistence not readable: not checked"),
    }
    let fsync = match conn.call(&[b"CONFIG", b"GET", b"appendfsync"]).await {
        Ok(Reply::Array(Some(items))) => items.get(1).map(Reply::text),
        _ => None,
    };
    match fsync.as_deref() {
        Some("always") => CheckResult::ok("redis durability", "appendonly yes, appendfsync always"),
        Some(other) => CheckResult::warn(
            "redis durability",
            format!(
                "appendonly yes, appendfsync {other}: a Redis crash loses nothing acknowledged, but an OS crash or \
                 power loss can lose the last second or so. Fix: appendfsync always"
            ),
        ),
        None => CheckResult::warn(
            "redis durability",
            "appendonly yes; appendfsync not readable (CONFIG GET refused): make sure it is \"always\"",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> RedisConfig {
        toml_like(&format!("address = \"127.0.0.1:6379\"\n{extra}"))
    }

    /// The section as the binary's loader reads it.
    fn toml_like(text: &str) -> RedisConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let c = config("");
        assert_eq!((c.max_batch_records, c.max_batch_bytes, c.max_record_bytes), (1000, 1 << 20, 1_000_000));
        assert_eq!((c.timeout_ms, c.wait_replicas, c.wait_timeout_ms, c.database), (30_000, 0, 1000, 0));
        assert!(toml::from_str::<RedisConfig>("address = \"a:1\"\nmax_len = 5").is_err(), "unknown keys are refused");
    }

    #[test]
    fn validation_names_the_key() {
        assert!(config("").validate().is_ok());
        assert_eq!(toml_like("address = \"localhost\"").validate().unwrap_err().key, "sink.address");
        assert_eq!(config("maxlen = 0").validate().unwrap_err().key, "sink.maxlen");
        assert_eq!(config("max_batch_records = 0").validate().unwrap_err().key, "sink.max_batch_records");
        assert_eq!(config("max_record_bytes = 600000000").validate().unwrap_err().key, "sink.max_record_bytes");
        let wait = config("wait_replicas = 1\nwait_timeout_ms = 0");
        assert_eq!(wait.validate().unwrap_err().key, "sink.wait_timeout_ms");
    }

    #[test]
    fn a_record_is_one_xadd_with_its_fields_and_id() {
        let mut batch = Batch::new(new_buffer(1024), Some(Arc::from(&b"100"[..])));
        let headers = vec![("id".to_owned(), b"e-1".to_vec())];
        batch.push(7, "p.outbox.order", &[b"e-1"], Some(b"order-1"), Some(b"{}"), &headers);
        batch.push(8, "p.public.t", &[b"p.public.t/lsn 0/1/0", b"/t"], Some(b"{\"id\":1}"), None, &[]);
        assert_eq!(batch.first_seq, 7);
        assert_eq!(batch.commands, 2);
        let mut expected = MULTI.to_vec();
        resp::command(
            &mut expected,
            &[
                b"XADD",
                b"p.outbox.order",
                b"MAXLEN",
                b"~",
                b"100",
                b"*",
                b"key",
                b"order-1",
                b"value",
                b"{}",
                b"headers",
                b"{\"id\":\"e-1\"}",
                b"id",
                b"e-1",
            ],
        );
        resp::command(
            &mut expected,
            &[
                b"XADD",
                b"p.public.t",
                b"MAXLEN",
                b"~",
                b"100",
                b"*",
                b"key",
                b"{\"id\":1}",
                b"id",
                b"p.public.t/lsn 0/1/0/t",
            ],
        );
        assert_eq!(String::from_utf8_lossy(&batch.buf), String::from_utf8_lossy(&expected));
        assert_eq!(resp::nth_key(&batch.buf, 1).as_deref(), Some("p.public.t"));
    }
}
