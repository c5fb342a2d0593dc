//! The pipeline side of the RabbitMQ sink: renders records, registers them with the [`AckTracker`],
//! and hands them to the publisher task through a bounded channel and a byte budget (backpressure:
//! `send` waits while either is exhausted). Confirms come back as sequence numbers in [`Shared`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tailgate_pipeline::{
    AckTracker, BoxFuture, Checkpoint, Encoder, Prepared, Sink, SinkContext, SinkError, SinkItem, SinkTotals,
};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Settings;

/// The header that carries the record's key.
pub const KEY_HEADER: &str = "Tailgate-Key";

/// What a record costs of the byte budget beyond its key, value and headers (properties, frames).
const RECORD_OVERHEAD: usize = 256;

/// AMQP carries properties (headers included) in one frame: far below the smallest frame_max a
/// broker negotiates (RabbitMQ's default is 128 KiB).
const MAX_HEADER_BYTES: usize = 96 * 1024;

/// A record on its way to the publisher task.
pub(crate) struct Outgoing {
    /// The [`AckTracker`] sequence number.
    pub seq: u64,
    pub routing_key: ShortString,
    pub payload: Bytes,
    pub properties: BasicProperties,
    /// Permits taken from the byte budget, given back when the record is confirmed.
    pub charge: u32,
    /// Already a dead letter: if it comes back unroutable, there is no further place for it.
    pub dead_letter: bool,
}

/// What the sink hands the publisher, in order.
// Records are the common case: boxing them would cost an allocation each, while the rare small
// variant wastes at most a channel's capacity of slots.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ToPublisher {
    Record(Outgoing),
    /// The dead-letter routing key from here on (`[dead_letter] topic` was reloaded).
    DeadLetterKey(ShortString),
}

/// State shared between the sink and its publisher task.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when confirms or a failure arrive.
    pub notify: Notify,
    /// Bytes of records handed over and not yet confirmed (see [`RECORD_OVERHEAD`]).
    pub budget: Semaphore,
}

#[derive(Default)]
struct State {
    acked: Vec<u64>,
    failure: Option<SinkError>,
    /// Unroutable messages sent to the dead-letter routing key instead.
    rerouted: u64,
}

impl Shared {
    fn new(budget: usize) -> Self {
        Shared { state: Mutex::new(State::default()), notify: Notify::new(), budget: Semaphore::new(budget) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave it inconsistent (plain pushes and takes).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Confirmed records, with their budget.
    pub fn acked(&self, seqs: impl IntoIterator<Item = u64>, permits: usize) {
        self.lock().acked.extend(seqs);
        self.budget.add_permits(permits);
        self.notify.notify_one();
    }

    pub fn rerouted(&self) {
        self.lock().rerouted += 1;
    }

    /// The publisher stopped for good: the sink reports `error` and waits for nothing more.
    pub fn fail(&self, error: SinkError) {
        self.lock().failure.get_or_insert(error);
        self.budget.close();
        self.notify.notify_one();
    }
}

pub struct RabbitmqSink {
    encoder: Encoder,
    tracker: AckTracker,
    tx: mpsc::Sender<ToPublisher>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// Topic to routing key, checked once per topic.
    routing_keys: HashMap<Arc<str>, ShortString>,
    /// Bodies are copied into this buffer and split off as shared `Bytes`: one allocation per chunk of
    /// records rather than one per record (they are kept until confirmed, for re-publishing).
    arena: BytesMut,
    drained: Vec<u64>,
    totals: SinkTotals,
    budget_cap: usize,
    stop: CancellationToken,
    drain_timeout: Duration,
    stopping_since: Option<Instant>,
    failed: bool,
}

impl RabbitmqSink {
    pub fn new(settings: Settings, ctx: SinkContext) -> Result<Self, SinkError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| SinkError::Other("the RabbitMQ sink must be built inside the tokio runtime".into()))?;
        let dead_letter_key = routing_key(&ctx.encoder.dead_letter_topic)?;
        let shared = Arc::new(Shared::new(settings.max_in_flight_bytes));
        let (tx, rx) = mpsc::channel(settings.max_in_flight);
        let budget_cap = settings.max_in_flight_bytes;
        let task = runtime.spawn(crate::publisher::run(settings, dead_letter_key, rx, shared.clone()));
        Ok(RabbitmqSink {
            encoder: Encoder::new(ctx.encoder),
            tracker: AckTracker::new(),
            tx,
            shared,
            task,
            routing_keys: HashMap::new(),
            arena: BytesMut::with_capacity(256 * 1024),
            drained: Vec::new(),
            totals: SinkTotals::default(),
            budget_cap,
            stop: ctx.shutdown,
            drain_timeout: ctx.drain_timeout,
            stopping_since: None,
            failed: false,
        })
    }

    /// Moves confirms into the tracker; reports the publisher's failure.
    fn take_acks(&mut self) -> Result<(), SinkError> {
        let mut state = self.shared.lock();
        std::mem::swap(&mut state.acked, &mut self.drained);
        self.totals.dead_lettered += std::mem::take(&mut state.rerouted);
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
            return Err(SinkError::Other("the RabbitMQ sink failed earlier (see the error above)".into()));
        }
        Ok(())
    }

    fn publisher_gone(&mut self) -> SinkError {
        match self.take_acks() {
            Err(e) => e,
            Ok(()) => SinkError::Other("the RabbitMQ publisher task ended unexpectedly".into()),
        }
    }

    fn stop_error(&self) -> SinkError {
        SinkError::Other(format!(
            "stopping while RabbitMQ does not confirm; {} record(s) unconfirmed stay uncheckpointed and will be sent \
             again on restart",
            self.tracker.in_flight()
        ))
    }

    fn routing_key(&mut self, topic: &Arc<str>) -> Result<ShortString, SinkError> {
        if let Some(key) = self.routing_keys.get(topic) {
            return Ok(key.clone());
        }
        let key = routing_key(topic)?;
        self.routing_keys.insert(topic.clone(), key.clone());
        Ok(key)
    }

    async fn send_batch(&mut self, batch: Vec<SinkItem>) -> Result<(), SinkError> {
        self.take_acks()?;
        self.encoder.begin_batch();
        for item in &batch {
            match item {
                SinkItem::Commit(position) => {
                    self.tracker.commit(position.clone());
                    // The encoder numbers records within their transaction (record ids): it must
                    // see every commit.
                    self.encoder.prepare(item)?;
                    continue;
                }
                SinkItem::DeadLetters(policy) => {
                    let key = routing_key(&policy.topic)?;
                    self.hand_over(ToPublisher::DeadLetterKey(key)).await?;
                }
                SinkItem::Change { .. } | SinkItem::Raw(_) => {}
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
        let routing_key = self.routing_key(&prepared.topic)?;
        let key = self.encoder.key();
        let value = if tombstone { None } else { self.encoder.value() }.unwrap_or_default();
        let extra: &[(String, Vec<u8>)] = if tombstone { &[] } else { self.encoder.headers() };
        let mut headers = FieldTable::default();
        let mut header_bytes = 0;
        if let Some(key) = key {
            header_bytes += KEY_HEADER.len() + key.len();
            headers.insert(ShortString::from(KEY_HEADER), AMQPValue::LongString(LongString::from(key)));
        }
        for (name, v) in extra {
            header_bytes += name.len() + v.len();
            headers.insert(header_name(name), AMQPValue::LongString(LongString::from(v.as_slice())));
        }
        if header_bytes > MAX_HEADER_BYTES {
            return Err(SinkError::Delivery {
                topic: prepared.topic.to_string(),
                reason: format!(
                    "the key and headers take {header_bytes} bytes; AMQP carries them in one frame (at most \
                     {MAX_HEADER_BYTES} here)"
                ),
                fix: "shorten the key or the outbox header columns ([[outbox]] additional placement), or route \
                      them into the payload",
            });
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(message_id(self.encoder.record_id(), tombstone))
            .with_timestamp((self.encoder.batch_time_ms() / 1000).max(0) as u64)
            .with_headers(headers);
        if !prepared.raw && !tombstone {
            properties = properties.with_content_type(ShortString::from("application/json"));
        }
        self.arena.extend_from_slice(value);
        let payload = self.arena.split().freeze();
        if self.arena.capacity() < 4096 {
            // A fresh chunk when this one is used up (the old one is freed with its records).
            self.arena.reserve(256 * 1024);
        }
        let key_len = key.map_or(0, <[u8]>::len);
        self.totals.bytes += (key_len + value.len()) as u64;
        if !tombstone {
            self.totals.dead_lettered += u64::from(prepared.dead_letter);
        }
        let charge = (header_bytes + value.len() + RECORD_OVERHEAD).min(self.budget_cap) as u32;
        if self.stop.is_cancelled() {
            self.stopping_since.get_or_insert_with(Instant::now);
        }
        let acquired = tokio::select! {
            biased;
            // Taken for good here; the publisher adds them back when the record is confirmed.
            permit = self.shared.budget.acquire_many(charge) => Some(permit.map(|p| p.forget()).is_ok()),
            () = drained(&self.stop, self.stopping_since, self.drain_timeout) => None,
        };
        match acquired {
            Some(true) => {}
            Some(false) => return Err(self.publisher_gone()),
            None => return Err(self.stop_error()),
        }
        let seq = self.tracker.register();
        let out = Outgoing { seq, routing_key, payload, properties, charge, dead_letter: prepared.dead_letter };
        self.hand_over(ToPublisher::Record(out)).await
    }

    async fn hand_over(&mut self, message: ToPublisher) -> Result<(), SinkError> {
        if self.stop.is_cancelled() {
            self.stopping_since.get_or_insert_with(Instant::now);
        }
        let sent = tokio::select! {
            biased;
            sent = self.tx.send(message) => Some(sent.is_ok()),
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
        Ok(self.tracker.take_checkpoint())
    }
}

/// The routing key for `topic`: the topic itself (AMQP short strings hold at most 255 bytes).
fn routing_key(topic: &str) -> Result<ShortString, SinkError> {
    ShortString::try_new(topic).map_err(|_| SinkError::Delivery {
        topic: topic.to_owned(),
        reason: format!("the topic is {} bytes; an AMQP routing key holds at most 255", topic.len()),
        fix: "shorten the topic with a [[route]] (or a shorter sink.topic_prefix)",
    })
}

/// A header name: at most 255 bytes (cut at a character boundary).
fn header_name(name: &str) -> ShortString {
    let mut end = name.len().min(255);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(&name[..end]).unwrap_or_default()
}

/// The AMQP `message_id`: the record id (`/t` appended for a tombstone), or `sha256:<hex>` of it when
/// it would be longer than a short string.
pub fn message_id(record_id: &str, tombstone: bool) -> ShortString {
    let suffix = if tombstone { "/t" } else { "" };
    if record_id.len() + suffix.len() <= 255 {
        let mut id = String::with_capacity(record_id.len() + suffix.len());
        id.push_str(record_id);
        id.push_str(suffix);
        if let Ok(id) = ShortString::try_new(id) {
            return id;
        }
    }
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(record_id.as_bytes());
    hasher.update(suffix.as_bytes());
    let mut id = String::with_capacity(7 + 64);
    id.push_str("sha256:");
    for b in hasher.finalize() {
        use std::fmt::Write as _;
        let _ = write!(id, "{b:02x}");
    }
    ShortString::try_new(id).unwrap_or_default()
}

/// Resolves once the run has been stopping for `drain` (counted from `since`, else from when the
/// stop is seen).
async fn drained(stop: &CancellationToken, since: Option<Instant>, drain: Duration) {
    stop.cancelled().await;
    let start = since.unwrap_or_else(Instant::now);
    tokio::time::sleep_until((start + drain).into()).await;
}

impl Drop for RabbitmqSink {
    fn drop(&mut self) {
        // The publisher reconnects forever; without its sink nobody would read its confirms.
        self.task.abort();
    }
}

impl Sink for RabbitmqSink {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_fit_a_short_string() {
        assert_eq!(message_id("shop.public.t/lsn 0/1/0", false).as_str(), "shop.public.t/lsn 0/1/0");
        assert_eq!(message_id("shop.public.t/lsn 0/1/0", true).as_str(), "shop.public.t/lsn 0/1/0/t");
        let long = "k".repeat(400);
        let id = message_id(&long, false);
        assert!(id.as_str().starts_with("sha256:") && id.as_str().len() == 71);
        assert_eq!(id, message_id(&long, false));
        assert_ne!(id, message_id(&long, true));
    }

    #[test]
    fn long_names_are_cut_or_refused() {
        assert_eq!(header_name(&"é".repeat(200)).as_str().len(), 254);
        assert!(routing_key(&"t".repeat(256)).is_err());
        assert!(routing_key("shop.public.orders").is_ok());
    }
}
