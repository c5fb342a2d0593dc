//! The pipeline side of the NATS sink: renders records, registers them with the [`AckTracker`], and
//! hands them to the publisher task through a bounded channel and a byte budget (backpressure: `send`
//! waits while either is exhausted). Acknowledgements come back as sequence numbers in [`Shared`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::{HeaderMap, HeaderName, HeaderValue, Subject};
use bytes::{Bytes, BytesMut};
use tailgate_pipeline::{
    AckTracker, BoxFuture, Checkpoint, Encoder, Prepared, Sink, SinkContext, SinkError, SinkItem, SinkTotals,
};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Settings;
use crate::subject::{base64_value, header_name, header_text, msg_id, subject_for_topic};

/// The header that carries the record's key (`Tailgate-Key-Base64` when it is not header-safe text).
pub const KEY_HEADER: &str = "Tailgate-Key";

/// What a record costs of the byte budget beyond its key, value and headers (the message's own
/// bookkeeping), so that many tiny records are bounded too.
const RECORD_OVERHEAD: usize = 256;

/// A record on its way to the publisher task.
pub(crate) struct Outgoing {
    /// The [`AckTracker`] sequence number.
    pub seq: u64,
    pub subject: Subject,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// Permits taken from the byte budget, given back when the record is acknowledged.
    pub charge: u32,
}

/// State shared between the sink and its publisher task.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when acknowledgements or a failure arrive.
    pub notify: Notify,
    /// Bytes of records handed over and not yet acknowledged (see [`RECORD_OVERHEAD`]).
    pub budget: Semaphore,
}

#[derive(Default)]
struct State {
    acked: Vec<u64>,
    failure: Option<SinkError>,
    duplicates: u64,
}

impl Shared {
    fn new(budget: usize) -> Self {
        Shared { state: Mutex::new(State::default()), notify: Notify::new(), budget: Semaphore::new(budget) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave it inconsistent (plain pushes and takes).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acknowledged records, in any order, with their budget.
    pub fn acked(&self, seqs: impl IntoIterator<Item = u64>, permits: usize, duplicates: u64) {
        let mut state = self.lock();
        state.acked.extend(seqs);
        state.duplicates += duplicates;
        drop(state);
        self.budget.add_permits(permits);
        self.notify.notify_one();
    }

    /// The publisher stopped for good: the sink reports `error` and waits for nothing more.
    pub fn fail(&self, error: SinkError) {
        self.lock().failure.get_or_insert(error);
        self.budget.close();
        self.notify.notify_one();
    }
}

pub struct NatsSink {
    encoder: Encoder,
    tracker: AckTracker,
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// Topic to subject, computed once per topic.
    subjects: HashMap<Arc<str>, Subject>,
    /// Payloads are copied into this buffer and split off as shared `Bytes`: one allocation per
    /// chunk of records rather than one per record.
    arena: BytesMut,
    drained: Vec<u64>,
    totals: SinkTotals,
    duplicates: u64,
    budget_cap: usize,
    stop: CancellationToken,
    drain_timeout: Duration,
    stopping_since: Option<Instant>,
    /// A failure was reported: later calls say so instead of waiting.
    failed: bool,
}

impl NatsSink {
    pub fn new(settings: Settings, ctx: SinkContext) -> Result<Self, SinkError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| SinkError::Other("the NATS sink must be built inside the tokio runtime".into()))?;
        let shared = Arc::new(Shared::new(settings.max_in_flight_bytes));
        let (tx, rx) = mpsc::channel(settings.max_in_flight);
        let budget_cap = settings.max_in_flight_bytes;
        let task = runtime.spawn(crate::publisher::run(settings, rx, shared.clone()));
        Ok(NatsSink {
            encoder: Encoder::new(ctx.encoder),
            tracker: AckTracker::new(),
            tx,
            shared,
            task,
            subjects: HashMap::new(),
            arena: BytesMut::with_capacity(256 * 1024),
            drained: Vec::new(),
            totals: SinkTotals::default(),
            duplicates: 0,
            budget_cap,
            stop: ctx.shutdown,
            drain_timeout: ctx.drain_timeout,
            stopping_since: None,
            failed: false,
        })
    }

    /// Moves acknowledgements into the tracker; reports the publisher's failure.
    fn take_acks(&mut self) -> Result<(), SinkError> {
        let mut state = self.shared.lock();
        std::mem::swap(&mut state.acked, &mut self.drained);
        self.duplicates = state.duplicates;
        let failure = state.failure.take();
        drop(state);
        self.totals.delivered += self.drained.len() as u64;
        for seq in self.drained.drain(..) {
            self.tracker.ack(seq);
        }
        if let Some(failure) = failure {
            self.failed = true;
            return Err(failure);
        }
        if self.failed {
            return Err(SinkError::Other("the NATS sink failed earlier (see the error above)".into()));
        }
        Ok(())
    }

    /// The error for a record that cannot be handed over because the publisher stopped.
    fn publisher_gone(&mut self) -> SinkError {
        match self.take_acks() {
            Err(e) => e,
            Ok(()) => SinkError::Other("the NATS publisher task ended unexpectedly".into()),
        }
    }

    fn stop_error(&self) -> SinkError {
        SinkError::Other(format!(
            "stopping while NATS does not acknowledge; {} record(s) unacknowledged stay uncheckpointed and will be \
             sent again on restart (JetStream drops those it stored within the duplicate window)",
            self.tracker.in_flight()
        ))
    }

    fn subject(&mut self, topic: &Arc<str>) -> Subject {
        if let Some(s) = self.subjects.get(topic) {
            return s.clone();
        }
        let subject = Subject::from(subject_for_topic(topic));
        self.subjects.insert(topic.clone(), subject.clone());
        subject
    }

    async fn send_batch(&mut self, batch: Vec<SinkItem>) -> Result<(), SinkError> {
        self.take_acks()?;
        self.encoder.begin_batch();
        for item in &batch {
            if let SinkItem::Commit(position) = item {
                self.tracker.commit(position.clone());
                // The encoder numbers records within their transaction (record ids): it must see
                // every commit.
                self.encoder.prepare(item)?;
                continue;
            }
            let Some(prepared) = self.encoder.prepare(item)? else { continue };
            self.enqueue_record(&prepared, false).await?;
            if prepared.tombstone {
                self.enqueue_record(&prepared, true).await?;
            }
        }
        self.take_acks()
    }

    /// Builds the message for the record the encoder holds (or its tombstone) and hands it over.
    async fn enqueue_record(&mut self, prepared: &Prepared, tombstone: bool) -> Result<(), SinkError> {
        let subject = self.subject(&prepared.topic);
        let key = self.encoder.key();
        let value = if tombstone { None } else { self.encoder.value() };
        let extra: &[(String, Vec<u8>)] = if tombstone { &[] } else { self.encoder.headers() };
        let mut headers = HeaderMap::new();
        let id = msg_id(self.encoder.record_id(), tombstone);
        headers.insert(NATS_MESSAGE_ID, header_value(&id)?);
        if let Some(key) = key {
            append_header(&mut headers, KEY_HEADER, key)?;
        }
        for (name, v) in extra {
            append_header(&mut headers, &header_name(name), v)?;
        }
        let value = value.unwrap_or_default();
        self.arena.extend_from_slice(value);
        let payload = self.arena.split().freeze();
        if self.arena.capacity() < 4096 {
            // Let a fresh chunk start when this one is used up (the old one is freed with its records).
            self.arena.reserve(256 * 1024);
        }
        let key_len = key.map_or(0, <[u8]>::len);
        let header_len: usize = extra.iter().map(|(k, v)| k.len() + v.len()).sum();
        let size = key_len + value.len() + header_len + id.len();
        self.totals.bytes += (key_len + value.len()) as u64;
        if !tombstone {
            self.totals.dead_lettered += u64::from(prepared.dead_letter);
        }
        let charge = (size + RECORD_OVERHEAD).min(self.budget_cap) as u32;
        self.enqueue(Outgoing { seq: 0, subject, headers, payload, charge }).await
    }

    /// Waits for room (byte budget, then the channel), registers the record and hands it over.
    async fn enqueue(&mut self, mut out: Outgoing) -> Result<(), SinkError> {
        if self.stop.is_cancelled() {
            self.stopping_since.get_or_insert_with(Instant::now);
        }
        let acquired = tokio::select! {
            biased;
            // Taken for good here; the publisher adds them back when the record is acknowledged.
            permit = self.shared.budget.acquire_many(out.charge) => Some(permit.map(|p| p.forget()).is_ok()),
            () = drained(&self.stop, self.stopping_since, self.drain_timeout) => None,
        };
        match acquired {
            Some(true) => {}
            Some(false) => return Err(self.publisher_gone()),
            None => return Err(self.stop_error()),
        }
        out.seq = self.tracker.register();
        let sent = tokio::select! {
            biased;
            sent = self.tx.send(out) => Some(sent.is_ok()),
            () = drained(&self.stop, self.stopping_since, self.drain_timeout) => None,
        };
        match sent {
            Some(true) => Ok(()),
            Some(false) => Err(self.publisher_gone()),
            None => Err(self.stop_error()),
        }
    }

    async fn flush_all(&mut self, timeout: Duration) -> Result<Option<Checkpoint>, SinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.take_acks()?;
            if self.tracker.in_flight() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, self.shared.notify.notified()).await.is_err() {
                self.take_acks()?;
                break;
            }
        }
        if self.duplicates > 0 {
            tracing::info!(
                duplicates = self.duplicates,
                "JetStream dropped re-sent records it had already stored (duplicate window)"
            );
        }
        Ok(self.tracker.take_checkpoint())
    }
}

/// Resolves once the run has been stopping for `drain` (counted from `since`, else from when the
/// stop is seen).
async fn drained(stop: &CancellationToken, since: Option<Instant>, drain: Duration) {
    stop.cancelled().await;
    let start = since.unwrap_or_else(Instant::now);
    tokio::time::sleep_until((start + drain).into()).await;
}

fn header_value(text: &str) -> Result<HeaderValue, SinkError> {
    text.parse::<HeaderValue>().map_err(|e| SinkError::Other(format!("header value {text:?}: {e}")))
}

/// Appends a header, base64-encoding a value NATS cannot carry as text.
fn append_header(headers: &mut HeaderMap, name: &str, value: &[u8]) -> Result<(), SinkError> {
    let invalid = |e: &dyn std::fmt::Display| SinkError::Other(format!("header name {name:?}: {e}"));
    match header_text(value) {
        Some(text) => {
            let name: HeaderName = name.parse().map_err(|e| invalid(&e))?;
            headers.append(name, header_value(text)?);
        }
        None => {
            let name: HeaderName = format!("{name}-Base64").parse().map_err(|e| invalid(&e))?;
            headers.append(name, header_value(&base64_value(value))?);
        }
    }
    Ok(())
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        // The publisher retries forever; without its sink nobody would read its acknowledgements.
        self.task.abort();
    }
}

impl Sink for NatsSink {
    fn send(&mut self, batch: Vec<SinkItem>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(self.send_batch(batch))
    }

    fn poll_acks(&mut self) -> Result<Option<Checkpoint>, SinkError> {
        self.take_acks()?;
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
