//! HTTP webhook sink: batches of records POSTed as a JSON array.
//!
//! The body is `[{"id": …, "topic": …, "key": …, "value": …, "headers": {…}}, …]`: `id` is the
//! record's deterministic id ([`Encoder::record_id`], `/t` appended for the tombstone after a
//! delete), `key` and `value` are the Debezium key and envelope (`null` value: a tombstone); outbox
//! payloads and dead letters are embedded as JSON when they are JSON, else as a string; `headers`
//! only when the record has some.
//!
//! Each request carries `Content-Type: application/json`, `Idempotency-Key` (the SHA-256 of the
//! batch's record ids: the same whenever the same records are sent again as one batch),
//! `X-Tailgate-Records` (the count), `X-Tailgate-Signature: sha256=<hex HMAC-SHA256 of the body>`
//! when `secret` is set, and the configured `headers`.
//!
//! Contract, on top of the [`Sink`] one:
//! - **Order.** One request in flight at a time per connector: batches reach the receiver in order,
//!   and a batch is sent only after the one before it was accepted.
//! - **Acknowledgement.** A 2xx answer acknowledges every record of the batch.
//! - **Retries.** Connection errors, timeouts, 5xx, 408 and 429 (honouring `Retry-After`) are retried
//!   with exponential backoff, forever while the run goes on and for at most the drain timeout once
//!   it is stopping. The same body and `Idempotency-Key` are sent each time.
//! - **Refusals.** Any other 4xx refuses the batch for good. Records the receiver refuses (400, 409,
//!   410, 422 and other 4xx) go to `dead_letter_url` when it is set (with `X-Tailgate-Refused-Status`),
//!   and the run goes on; without it the run stops, naming the status and the fix, and nothing past
//!   the batch is checkpointed. Answers that say the endpoint or its configuration is wrong (3xx,
//!   401, 403, 404, 405, 407, 413, 414, 415, 431) stop the run even with a dead-letter URL:
//!   dead-lettering every record because of a wrong URL or token would empty the stream into it.
//! - **Dead letters.** Records the pipeline dead-letters (too large, unroutable outbox rows) go to
//!   `dead_letter_url` when set, else to `url` like any record (their `topic` is the dead-letter
//!   topic). A batch never mixes destinations.
//! - **Backpressure.** At most [`QUEUED_BATCHES`] sealed batches wait for the writer, each at most
//!   `max_batch_records` / `max_batch_bytes` (a single record larger than that goes alone).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tailgate_core::envelope::write_str;
use tailgate_pipeline::{
    AckTracker, BoxFuture, CheckResult, Checkpoint, Encoder, KeyError, Sink, SinkBuilder, SinkContext, SinkError,
    SinkItem, SinkTotals, key_error,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use tailgate_pipeline::stopping::{Interrupted, Stopping};

/// Sealed batches waiting for the writer (besides the one in flight and the one being filled).
pub const QUEUED_BATCHES: usize = 2;

/// `[sink]` with `type = "http"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Where batches are POSTed (`http://` or `https://`). Required.
    pub url: String,
    /// Where refused batches and dead letters go. Default: none (a refused batch stops the run;
    /// dead letters go to `url`).
    pub dead_letter_url: Option<String>,
    /// Default: the connector name. Topics are `<topic_prefix>.<schema>.<table>`.
    pub topic_prefix: Option<String>,
    /// Records per request. Default 500.
    #[serde(default = "default_batch_records")]
    pub max_batch_records: usize,
    /// Body bytes per request (a single larger record goes alone). Default 1048576 (1 MiB).
    #[serde(default = "default_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Records whose key, value and headers are larger go to the dead letters. Default 1000000.
    #[serde(default = "default_record_bytes")]
    pub max_record_bytes: usize,
    /// One request, from connecting to the end of the answer. Default 30000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// First wait before a retry; doubled up to `retry_backoff_max_ms`. Default 100.
    #[serde(default = "default_backoff_min_ms")]
    pub retry_backoff_ms: u64,
    /// Longest wait between retries. Default 30000.
    #[serde(default = "default_backoff_max_ms")]
    pub retry_backoff_max_ms: u64,
    /// Key of the `X-Tailgate-Signature` HMAC-SHA256. Default: none (no signature header).
    pub secret: Option<String>,
    /// Extra request headers (e.g. `Authorization`). Default: none.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_batch_records() -> usize {
    500
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
fn default_backoff_min_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    30_000
}

/// Headers tailgate sets itself: configuring them would break the signature or the contract.
const RESERVED: [&str; 6] =
    ["content-type", "content-length", "idempotency-key", "x-tailgate-signature", "x-tailgate-records", "host"];

impl HttpSinkConfig {
    fn header_map(&self) -> Result<HeaderMap, KeyError> {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            let key = format!("sink.headers.{name:?}");
            let header =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| key_error(&key, "not a valid HTTP header name"))?;
            if RESERVED.contains(&header.as_str()) || header.as_str().starts_with("x-tailgate-") {
                return Err(key_error(&key, "tailgate sets this header itself; remove it"));
            }
            let mut value =
                HeaderValue::from_str(value).map_err(|_| key_error(&key, "not a valid HTTP header value"))?;
            value.set_sensitive(true);
            map.insert(header, value);
        }
        Ok(map)
    }

    fn client(&self, timeout: Duration) -> Result<reqwest::Client, SinkError> {
        reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A redirected POST may become a GET or lose its body: a redirect is a configuration error.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tailgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Config(format!("HTTP client: {e}")))
    }
}

fn valid_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

impl SinkBuilder for HttpSinkConfig {
    fn kind(&self) -> &'static str {
        "HTTP"
    }

    fn validate(&self) -> Result<(), KeyError> {
        if !valid_url(&self.url) {
            return Err(key_error("sink.url", format!("{:?} is not an http:// or https:// URL", self.url)));
        }
        if let Some(dlq) = &self.dead_letter_url {
            if !valid_url(dlq) {
                return Err(key_error("sink.dead_letter_url", format!("{dlq:?} is not an http:// or https:// URL")));
            }
            if dlq == &self.url {
                return Err(key_error(
                    "sink.dead_letter_url",
                    "must differ from sink.url (a refused batch would be refused again)",
                ));
            }
        }
        if self.max_batch_records == 0 {
            return Err(key_error("sink.max_batch_records", "must be at least 1"));
        }
        if self.max_batch_bytes < 1024 {
            return Err(key_error("sink.max_batch_bytes", "must be at least 1024"));
        }
        if self.max_record_bytes == 0 {
            return Err(key_error("sink.max_record_bytes", "must be at least 1"));
        }
        if self.timeout_ms == 0 {
            return Err(key_error("sink.timeout_ms", "must be at least 1"));
        }
        if self.retry_backoff_ms == 0 || self.retry_backoff_max_ms < self.retry_backoff_ms {
            return Err(key_error("sink.retry_backoff_ms", "must be at least 1 and at most sink.retry_backoff_max_ms"));
        }
        if self.secret.as_deref() == Some("") {
            return Err(key_error("sink.secret", "an empty secret signs nothing; remove the key or set a secret"));
        }
        self.header_map()?;
        Ok(())
    }

    fn topic_prefix(&self) -> Option<&str> {
        self.topic_prefix.as_deref()
    }

    fn max_record_bytes(&self) -> Option<usize> {
        Some(self.max_record_bytes)
    }

    fn build(&self, ctx: SinkContext) -> Result<Box<dyn Sink>, SinkError> {
        info!(url = %self.url, dead_letter_url = ?self.dead_letter_url, "sink: http");
        Ok(Box::new(HttpSink::new(self, ctx)?))
    }

    fn check<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Vec<CheckResult>> {
        Box::pin(check(self))
    }
}

/// Where a batch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Main,
    DeadLetter,
}

/// A batch being filled, then sent: the JSON array, the ids joined by newlines (for the
/// idempotency key), and which records it holds.
struct Batch {
    body: Vec<u8>,
    ids: Vec<u8>,
    records: usize,
    first_seq: u64,
    dest: Dest,
    /// Where the last record starts in `body` (at its separating comma) and in `ids`, and its
    /// sequence number: a record that overfills the batch moves to the next one.
    last_body_mark: usize,
    last_ids_mark: usize,
    last_seq: u64,
}

impl Batch {
    /// A batch for `dest` in `body` and `ids` (buffers of earlier batches, cleared here).
    fn new(dest: Dest, mut body: Vec<u8>, mut ids: Vec<u8>) -> Self {
        body.clear();
        body.push(b'[');
        ids.clear();
        Batch { body, ids, records: 0, first_seq: 0, dest, last_body_mark: 0, last_ids_mark: 0, last_seq: 0 }
    }
}

/// Closes `batch` into a request; gives back its ids buffer for reuse.
fn seal(mut batch: Batch) -> (Request, Vec<u8>) {
    batch.body.push(b']');
    let request = Request {
        key: idempotency_key(&batch.ids),
        body: Bytes::from(batch.body),
        records: batch.records,
        first_seq: batch.first_seq,
        dest: batch.dest,
    };
    (request, batch.ids)
}

/// A record as the encoder rendered it, with its sequence number.
struct RecordRef<'a> {
    seq: u64,
    /// The record id and a suffix (`/t` for a tombstone).
    id: (&'a str, &'static str),
    topic: &'a str,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: &'a [(String, Vec<u8>)],
    raw: bool,
}

/// Appends `record` to `batch`'s JSON array and its id to the batch's ids.
fn push_into(batch: &mut Batch, record: &RecordRef<'_>) {
    batch.last_body_mark = batch.body.len();
    batch.last_ids_mark = batch.ids.len();
    batch.last_seq = record.seq;
    if batch.records == 0 {
        batch.first_seq = record.seq;
    } else {
        batch.body.push(b',');
    }
    let out = &mut batch.body;
    out.extend_from_slice(b"{\"id\":");
    write_str(out, record.id.0);
    if !record.id.1.is_empty() {
        // Inside the closing quote: the suffix needs no escaping.
        out.pop();
        out.extend_from_slice(record.id.1.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"topic\":");
    write_str(out, record.topic);
    out.extend_from_slice(b",\"key\":");
    push_json_or_string(out, record.key, record.raw);
    out.extend_from_slice(b",\"value\":");
    push_json_or_string(out, record.value, record.raw);
    if !record.headers.is_empty() {
        out.extend_from_slice(b",\"headers\":{");
        for (i, (k, v)) in record.headers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, k);
            out.push(b':');
            write_str(out, &String::from_utf8_lossy(v));
        }
        out.push(b'}');
    }
    out.push(b'}');
    batch.ids.extend_from_slice(record.id.0.as_bytes());
    batch.ids.extend_from_slice(record.id.1.as_bytes());
    batch.ids.push(b'\n');
    batch.records += 1;
}

/// Envelopes are JSON by construction; raw keys and values (outbox, dead letters) are embedded as
/// JSON when they are, else as a JSON string (an aggregate id, a text payload).
fn push_json_or_string(out: &mut Vec<u8>, bytes: Option<&[u8]>, raw: bool) {
    match bytes {
        None => out.extend_from_slice(b"null"),
        Some(b) if !raw || serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok() => out.extend_from_slice(b),
        Some(b) => write_str(out, &String::from_utf8_lossy(b)),
    }
}

/// The hex SHA-256 of the batch's record ids, one per line.
fn idempotency_key(ids: &[u8]) -> String {
    hex(&Sha256::digest(ids))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// A sealed batch as the writer sends it.
struct Request {
    body: Bytes,
    key: String,
    records: usize,
    first_seq: u64,
    dest: Dest,
}

enum Report {
    /// Records `first_seq..first_seq + records` were accepted (`dead_lettered` of them by the
    /// dead-letter URL after a refusal).
    Done {
        first_seq: u64,
        records: usize,
        dead_lettered: usize,
        body: Option<Vec<u8>>,
    },
    Failed(SinkError),
}

pub struct HttpSink {
    encoder: Encoder,
    tracker: AckTracker,
    current: Batch,
    /// Buffers of batches the receiver took, for the next ones.
    spare_bodies: Vec<Vec<u8>>,
    spare_ids: Vec<Vec<u8>>,
    has_dead_letter_url: bool,
    max_batch_records: usize,
    max_batch_bytes: usize,
    queue: mpsc::Sender<Request>,
    reports: mpsc::UnboundedReceiver<Report>,
    writer: JoinHandle<()>,
    totals: SinkTotals,
}

impl HttpSink {
    fn new(config: &HttpSinkConfig, ctx: SinkContext) -> Result<Self, SinkError> {
        let headers = config.header_map().map_err(|e| SinkError::Config(format!("{}: {}", e.key, e.message)))?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let mac = match &config.secret {
            Some(secret) => Some(
                Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                    .map_err(|e| SinkError::Config(format!("sink.secret: {e}")))?,
            ),
            None => None,
        };
        let endpoint = Endpoint {
            client: config.client(timeout)?,
            url: config.url.clone(),
            dead_letter_url: config.dead_letter_url.clone(),
            headers,
            mac,
            backoff_min: Duration::from_millis(config.retry_backoff_ms),
            backoff_max: Duration::from_millis(config.retry_backoff_max_ms),
        };
        let (queue, requests) = mpsc::channel(QUEUED_BATCHES);
        let (report_tx, reports) = mpsc::unbounded_channel();
        let stopping = Stopping::new(ctx.shutdown, ctx.drain_timeout);
        let writer = tokio::spawn(write_batches(endpoint, requests, report_tx, stopping));
        let capacity = config.max_batch_bytes.min(1 << 20) + 1024;
        Ok(HttpSink {
            encoder: Encoder::new(ctx.encoder),
            tracker: AckTracker::new(),
            current: Batch::new(Dest::Main, Vec::with_capacity(capacity), Vec::with_capacity(4096)),
            spare_bodies: Vec::new(),
            spare_ids: Vec::new(),
            has_dead_letter_url: config.dead_letter_url.is_some(),
            max_batch_records: config.max_batch_records,
            max_batch_bytes: config.max_batch_bytes,
            queue,
            reports,
            writer,
            totals: SinkTotals::default(),
        })
    }

    fn capacity(&self) -> usize {
        self.max_batch_bytes.min(1 << 20) + 1024
    }

    /// A new batch in buffers of earlier ones when there are some.
    fn new_batch(&mut self, dest: Dest) -> Batch {
        let body = self.spare_bodies.pop().unwrap_or_else(|| Vec::with_capacity(self.capacity()));
        let ids = self.spare_ids.pop().unwrap_or_else(|| Vec::with_capacity(4096));
        Batch::new(dest, body, ids)
    }

    /// Closes the current batch and starts the next one for `dest`.
    fn seal(&mut self, dest: Dest) -> Request {
        let next = self.new_batch(dest);
        let (request, ids) = seal(std::mem::replace(&mut self.current, next));
        self.spare_ids.push(ids);
        request
    }

    /// Hands the current batch to the writer, waiting while the queue is full (backpressure).
    async fn hand_over(&mut self, next_dest: Dest) -> Result<(), SinkError> {
        if self.current.records == 0 {
            self.current.dest = next_dest;
            return Ok(());
        }
        let request = self.seal(next_dest);
        if self.queue.send(request).await.is_err() {
            return Err(self.writer_failure());
        }
        Ok(())
    }

    /// Hands the current batch over if the queue has room; otherwise it keeps filling.
    fn try_hand_over(&mut self) -> Result<(), SinkError> {
        if self.current.records == 0 {
            return Ok(());
        }
        match self.queue.clone().try_reserve_owned() {
            Ok(permit) => {
                let dest = self.current.dest;
                permit.send(self.seal(dest));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.writer_failure()),
        }
    }

    fn writer_failure(&mut self) -> SinkError {
        while let Ok(report) = self.reports.try_recv() {
            if let Report::Failed(e) = report {
                return e;
            }
        }
        SinkError::Other("the HTTP writer stopped unexpectedly; nothing unacknowledged was checkpointed".into())
    }

    fn apply(&mut self, report: Report) -> Result<(), SinkError> {
        match report {
            Report::Done { first_seq, records, dead_lettered, body } => {
                // Keep a few bodies of the usual size (one grown by a huge record is let go): no
                // allocation per batch, and no freed megabytes piling up in other threads' heaps.
                if let Some(body) = body
                    && self.spare_bodies.len() <= QUEUED_BATCHES
                    && body.capacity() <= 2 * self.capacity()
                {
                    self.spare_bodies.push(body);
                }
                for seq in first_seq..first_seq + records as u64 {
                    self.tracker.ack(seq);
                }
                self.totals.delivered += records as u64;
                self.totals.dead_lettered += dead_lettered as u64;
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

    /// Moves the last record of the current batch (which took the body over `max_batch_bytes`)
    /// into a new batch, and hands the full one over.
    async fn split_last(&mut self) -> Result<(), SinkError> {
        let dest = self.current.dest;
        let mut next = self.new_batch(dest);
        let (body_mark, ids_mark) = (self.current.last_body_mark, self.current.last_ids_mark);
        // Past the comma that separated it from the record before.
        next.body.extend_from_slice(&self.current.body[body_mark + 1..]);
        next.ids.extend_from_slice(&self.current.ids[ids_mark..]);
        next.records = 1;
        next.first_seq = self.current.last_seq;
        self.current.body.truncate(body_mark);
        self.current.ids.truncate(ids_mark);
        self.current.records -= 1;
        let full = std::mem::replace(&mut self.current, next);
        let (request, ids) = seal(full);
        self.spare_ids.push(ids);
        if self.queue.send(request).await.is_err() {
            return Err(self.writer_failure());
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
            let dest = if prepared.dead_letter && self.has_dead_letter_url { Dest::DeadLetter } else { Dest::Main };
            if self.current.dest != dest || self.current.records >= self.max_batch_records {
                self.hand_over(dest).await?;
            }
            let encoder = &self.encoder;
            let (key, value) = (encoder.key(), encoder.value());
            let size = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
            self.totals.bytes += size as u64 + if prepared.tombstone { key.map_or(0, <[u8]>::len) as u64 } else { 0 };
            self.totals.dead_lettered += u64::from(prepared.dead_letter);
            // Rendered into `current` first; a record that overfills it moves to the next batch.
            let seq = self.tracker.register();
            let record = RecordRef {
                seq,
                id: (encoder.record_id(), ""),
                topic: &prepared.topic,
                key,
                value,
                headers: encoder.headers(),
                raw: prepared.raw,
            };
            push_into(&mut self.current, &record);
            if self.current.records >= 2 && self.current.body.len() + 1 > self.max_batch_bytes {
                self.split_last().await?;
            }
            if prepared.tombstone {
                if self.current.records >= self.max_batch_records {
                    self.hand_over(dest).await?;
                }
                let encoder = &self.encoder;
                let seq = self.tracker.register();
                let record = RecordRef {
                    seq,
                    id: (encoder.record_id(), "/t"),
                    topic: &prepared.topic,
                    key: encoder.key(),
                    value: None,
                    headers: &[],
                    raw: prepared.raw,
                };
                push_into(&mut self.current, &record);
                if self.current.records >= 2 && self.current.body.len() + 1 > self.max_batch_bytes {
                    self.split_last().await?;
                }
            }
        }
        self.serve_reports()?;
        self.try_hand_over()
    }

    async fn flush_all(&mut self, timeout: Duration) -> Result<Option<Checkpoint>, SinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let dest = self.current.dest;
        // Waiting for room in the queue is bounded by the same deadline; a stopped writer's error
        // is the run's error.
        if let Ok(Err(e)) = tokio::time::timeout_at(deadline, self.hand_over(dest)).await {
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

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

impl Sink for HttpSink {
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

/// The receiver as the writer sees it.
struct Endpoint {
    client: reqwest::Client,
    url: String,
    dead_letter_url: Option<String>,
    headers: HeaderMap,
    /// Keyed once; cloned per request.
    mac: Option<Hmac<Sha256>>,
    backoff_min: Duration,
    backoff_max: Duration,
}

/// How an answer (or its absence) is handled.
enum Outcome {
    Accepted,
    /// Retry after at least this long (`Retry-After`), or the backoff.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The receiver refuses these records for good (dead-letter them if possible).
    Refused {
        status: StatusCode,
        detail: String,
    },
    /// The endpoint or its configuration is wrong: stop whatever the dead-letter setting.
    Misconfigured {
        status: StatusCode,
        detail: String,
        fix: &'static str,
    },
}

impl Endpoint {
    async fn post(&self, url: &str, request: &Request, refused: Option<StatusCode>) -> Outcome {
        let mut builder = self
            .client
            .post(url)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &request.key)
            .header("X-Tailgate-Records", request.records.to_string())
            .body(request.body.clone());
        if let Some(mac) = &self.mac {
            let mut mac = mac.clone();
            mac.update(&request.body);
            builder = builder.header("X-Tailgate-Signature", format!("sha256={}", hex(&mac.finalize().into_bytes())));
        }
        if let Some(status) = refused {
            builder = builder.header("X-Tailgate-Refused-Status", status.as_u16().to_string());
        }
        let response = match builder.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Retry { reason: describe(&e), after: None },
        };
        let status = response.status();
        if status.is_success() {
            // Read the answer to its end so that the connection can be reused.
            return match response.bytes().await {
                Ok(_) => Outcome::Accepted,
                // Accepted all the same: the status line is the receiver's word.
                Err(e) => {
                    warn!(error = %describe(&e), "the receiver's answer broke off after its 2xx status; counted as accepted");
                    Outcome::Accepted
                }
            };
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(300)));
        let location =
            response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let detail = excerpt(response).await;
        match status.as_u16() {
            408 | 429 | 500..=599 => Outcome::Retry { reason: format!("{status}: {detail}"), after: retry_after },
            300..=399 => Outcome::Misconfigured {
                status,
                detail: format!("redirects to {}", location.as_deref().unwrap_or("(no Location)")),
                fix: "set the URL to where it redirects (redirects are not followed: a POST could lose its body)",
            },
            401 | 403 | 407 => Outcome::Misconfigured {
                status,
                detail,
                fix: "the receiver refuses tailgate's credentials: set them in [sink.headers] (e.g. Authorization)",
            },
            404 | 405 | 414 => {
                Outcome::Misconfigured { status, detail, fix: "the URL does not take POSTs: correct it" }
            }
            413 | 431 => Outcome::Misconfigured {
                status,
                detail,
                fix: "the batch is larger than the receiver takes: lower sink.max_batch_bytes (and sink.max_record_bytes) \
                      or raise the receiver's limit",
            },
            415 => Outcome::Misconfigured {
                status,
                detail,
                fix: "the receiver does not take application/json: tailgate only sends JSON",
            },
            400..=499 => Outcome::Refused { status, detail },
            _ => Outcome::Retry { reason: format!("unexpected status {status}: {detail}"), after: retry_after },
        }
    }
}

/// The start of an error answer's body, on one line, for messages.
async fn excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < 512 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text: String = String::from_utf8_lossy(&body).chars().filter(|c| !c.is_control()).take(300).collect();
    if text.trim().is_empty() { "(empty body)".to_owned() } else { text }
}

/// reqwest's error with its causes (its own Display omits them: "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if e.is_timeout() {
        text.push_str(" (sink.timeout_ms)");
    }
    text
}

/// The writer task: one request in flight at a time, each batch until the receiver takes it.
async fn write_batches(
    endpoint: Endpoint,
    mut requests: mpsc::Receiver<Request>,
    reports: mpsc::UnboundedSender<Report>,
    mut stopping: Stopping,
) {
    while let Some(request) = requests.recv().await {
        let report = match deliver(&endpoint, &request, &mut stopping).await {
            Ok(dead_lettered) => {
                // The body's buffer goes back to the sink once the client let go of it.
                let body = request.body.try_into_mut().ok().map(Vec::from);
                Report::Done { first_seq: request.first_seq, records: request.records, dead_lettered, body }
            }
            Err(e) => {
                let _ = reports.send(Report::Failed(e));
                return;
            }
        };
        if reports.send(report).is_err() {
            return;
        }
    }
}

/// Sends one batch until it is accepted (by `url`, or by `dead_letter_url` after a refusal);
/// returns how many of its records were dead-lettered by a refusal.
async fn deliver(endpoint: &Endpoint, request: &Request, stopping: &mut Stopping) -> Result<usize, SinkError> {
    let (mut url, mut refused, mut dead_lettered) = match (request.dest, &endpoint.dead_letter_url) {
        (Dest::DeadLetter, Some(dlq)) => (dlq.as_str(), None, 0),
        _ => (endpoint.url.as_str(), None, 0),
    };
    let mut backoff = endpoint.backoff_min;
    let mut failures = 0u32;
    loop {
        let outcome = match stopping.run(endpoint.post(url, request, refused), None).await {
            Ok(o) => o,
            Err(Interrupted::GaveUp | Interrupted::TimedOut) => return Err(gave_up(url)),
        };
        match outcome {
            Outcome::Accepted => {
                if failures > 0 {
                    info!(url, attempts = failures + 1, "the receiver accepted the batch");
                }
                return Ok(dead_lettered);
            }
            Outcome::Retry { reason, after } => {
                failures += 1;
                let wait = after.map_or(backoff, |a| a.max(backoff));
                warn!(url, error = %reason, retry_in = ?wait, records = request.records,
                    "the receiver did not take the batch; sending it again");
                if stopping.run(tokio::time::sleep(wait), None).await.is_err() {
                    return Err(gave_up(url));
                }
                backoff = (backoff * 2).min(endpoint.backoff_max);
            }
            Outcome::Misconfigured { status, detail, fix } => {
                return Err(SinkError::Delivery {
                    topic: format!("(webhook {url})"),
                    reason: format!("the receiver answered {status}: {detail}"),
                    fix,
                });
            }
            Outcome::Refused { status, detail } => match (&endpoint.dead_letter_url, refused) {
                (Some(dlq), None) if request.dest == Dest::Main => {
                    warn!(url, %status, detail = %detail, records = request.records, dead_letter_url = %dlq,
                        "the receiver refused the batch; sending its records to the dead-letter URL");
                    url = dlq.as_str();
                    refused = Some(status);
                    dead_lettered = request.records;
                    backoff = endpoint.backoff_min;
                }
                _ => {
                    return Err(SinkError::Delivery {
                        topic: format!("(webhook {url})"),
                        reason: format!(
                            "the receiver refused a batch of {} record(s) for good with {status}: {detail}",
                            request.records
                        ),
                        fix: if endpoint.dead_letter_url.is_some() {
                            "the dead-letter URL refused the records too: fix the receivers; the run stopped \
                             without checkpointing past the batch, which is sent again on restart"
                        } else {
                            "fix the receiver (or the records it refuses), or set sink.dead_letter_url to send refused \
                             batches there and go on; the run stopped without checkpointing past the batch, which is \
                             sent again on restart"
                        },
                    });
                }
            },
        }
    }
}

fn gave_up(url: &str) -> SinkError {
    SinkError::Other(format!(
        "stopping while {url} does not take the batch; unacknowledged records stay uncheckpointed and are sent again \
         on restart"
    ))
}

/// `tailgate check`: each URL answers an `OPTIONS` request (with the configured headers) and does
/// not refuse the credentials. What it cannot see without sending records: whether the receiver
/// accepts them and verifies the signature.
async fn check(config: &HttpSinkConfig) -> Vec<CheckResult> {
    let headers = match config.header_map() {
        Ok(h) => h,
        Err(e) => return vec![CheckResult::failed("http", format!("{}: {}", e.key, e.message))],
    };
    let client = match config.client(Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => return vec![CheckResult::failed("http", e.to_string())],
    };
    let mut results = Vec::new();
    let urls = std::iter::once(("http", "sink.url", &config.url))
        .chain(config.dead_letter_url.iter().map(|u| ("http dead letters", "sink.dead_letter_url", u)));
    for (name, key, url) in urls {
        let answer = client.request(reqwest::Method::OPTIONS, url).headers(headers.clone()).send().await;
        results.push(match answer {
            Err(e) => CheckResult::failed(
                name,
                format!("{url} did not answer: {}. Fix: start the receiver or correct {key}", describe(&e)),
            ),
            Ok(r) => match r.status().as_u16() {
                401 | 403 | 407 => CheckResult::failed(
                    name,
                    format!(
                        "{url} refused the credentials ({}). Fix: set them in [sink.headers] (e.g. Authorization)",
                        r.status()
                    ),
                ),
                300..=399 => CheckResult::failed(
                    name,
                    format!(
                        "{url} redirects ({}); redirects are not followed. Fix: set {key} to the final URL",
                        r.status()
                    ),
                ),
                404 => CheckResult::warn(
                    name,
                    format!("{url} answered 404 to OPTIONS: check the path (some receivers route only POST)"),
                ),
                500..=599 => CheckResult::warn(
                    name,
                    format!(
                        "{url} answered {} to OPTIONS: it may be unwell (batches are retried until it accepts)",
                        r.status()
                    ),
                ),
                _ => CheckResult::ok(
                    name,
                    format!("{url} answered {} (records and the signature are checked only by sending)", r.status()),
                ),
            },
        });
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(id: &'a str, key: Option<&'a [u8]>, value: Option<&'a [u8]>, raw: bool) -> RecordRef<'a> {
        RecordRef { seq: 0, id: (id, ""), topic: "t", key, value, headers: &[], raw }
    }

    #[test]
    fn a_batch_is_a_json_array_of_records_with_their_ids() {
        let mut batch = Batch::new(Dest::Main, Vec::new(), Vec::new());
        push_into(&mut batch, &record("lsn 0/1/0", Some(br#"{"id":1}"#), Some(br#"{"op":"d"}"#), false));
        let tombstone =
            RecordRef { id: ("lsn 0/1/0", "/t"), value: None, ..record("", Some(br#"{"id":1}"#), None, false) };
        push_into(&mut batch, &tombstone);
        push_into(&mut batch, &record("ev-1", Some(b"order-7"), Some(b"not json"), true));
        let (request, _) = seal(batch);
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!([
                {"id": "lsn 0/1/0", "topic": "t", "key": {"id": 1}, "value": {"op": "d"}},
                {"id": "lsn 0/1/0/t", "topic": "t", "key": {"id": 1}, "value": null},
                {"id": "ev-1", "topic": "t", "key": "order-7", "value": "not json"},
            ])
        );
        assert_eq!(request.records, 3);
        assert_eq!(request.key, idempotency_key(b"lsn 0/1/0\nlsn 0/1/0/t\nev-1\n"));
        assert_eq!(request.key.len(), 64);
    }

    #[test]
    fn signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn reserved_and_invalid_headers_are_refused_by_key() {
        let mut config: HttpSinkConfig =
            serde_json::from_value(serde_json::json!({"url": "http://127.0.0.1:1/x"})).unwrap();
        assert!(config.validate().is_ok());
        config.headers.insert("X-Tailgate-Signature".into(), "x".into());
        assert!(config.validate().unwrap_err().key.contains("X-Tailgate-Signature"));
        config.headers.clear();
        config.headers.insert("Bad Name".into(), "x".into());
        assert!(config.validate().is_err());
        config.headers.clear();
        config.url = "ftp://x".into();
        assert_eq!(config.validate().unwrap_err().key, "sink.url");
    }
}
