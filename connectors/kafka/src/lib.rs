//! Kafka sink on librdkafka.
//!
//! - Idempotent producer, `acks=all`, `murmur2_random` partitioning (a key lands on the partition the
//!   Java clients would choose), a bounded producer queue, and no message timeout: while the broker is
//!   away, records wait in the bounded queue, the queue fills, the pipeline stops reading the log, and
//!   everything resumes by itself when the broker returns.
//! - Delivery reports carry each record's sequence number (no allocation per record); they feed the
//!   pipeline's [`AckTracker`], which releases a commit position only when every record before it is
//!   acknowledged. A definite delivery failure stops the run without any checkpoint past it.
//! - Topics are created through the admin API the first time they are seen (brokers such as tansu do
//!   not create topics on produce).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use serde::Deserialize;
use tailgate_pipeline::{
    AckTracker, BoxFuture, CheckResult, Checkpoint, Encoder, KeyError, Sink, SinkBuilder, SinkContext, SinkError,
    SinkItem, SinkTotals, key_error,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod security;

/// `[sink]` with `type = "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Default: the connector name. Topics are `<topic_prefix>.<schema>.<table>`.
    pub topic_prefix: Option<String>,
    /// Partitions of the topics tailgate creates. Default 1.
    #[serde(default = "one")]
    pub topic_partitions: i32,
    /// Replication factor of the topics tailgate creates. Default 1.
    #[serde(default = "one")]
    pub topic_replication_factor: i32,
    /// librdkafka settings, over tailgate's defaults. Settings that would weaken delivery
    /// (`enable.idempotence` off, `acks` other than all) are refused unless `unsafe_overrides`.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
    /// Accept `[sink.librdkafka]` settings that can lose or reorder records. Default false.
    #[serde(default)]
    pub unsafe_overrides: bool,
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl` (librdkafka's `security.protocol`).
    pub security_protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER`; required with a `sasl_*` protocol.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    /// Write it as `${file:/run/secrets/kafka_password}` or `${ENV_VAR}`, never in the file itself.
    pub sasl_password: Option<String>,
    /// PEM file of the CA(s) that signed the brokers' certificates. Default: the system's roots.
    pub ssl_ca_location: Option<String>,
    /// Client certificate (PEM) for brokers that require mutual TLS, with `ssl_key_location`.
    pub ssl_certificate_location: Option<String>,
    pub ssl_key_location: Option<String>,
    /// Password of an encrypted `ssl_key_location`.
    pub ssl_key_password: Option<String>,
}

fn one() -> i32 {
    1
}

/// What the sink needs at run time: the section plus the client id (from the connector's name).
#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    pub brokers: String,
    pub client_id: String,
    /// Partitions of topics tailgate creates.
    pub topic_partitions: i32,
    /// Replication factor of topics tailgate creates.
    pub topic_replication_factor: i32,
    /// librdkafka settings, applied over tailgate's defaults.
    pub librdkafka: BTreeMap<String, String>,
    /// `security.protocol`, `sasl.*` and `ssl.*` from the first-class keys (validated); applied to
    /// the producer and the admin client alike.
    pub security: Vec<(&'static str, String)>,
}

impl KafkaConfig {
    fn sink_config(&self, connector: &str) -> KafkaSinkConfig {
        KafkaSinkConfig {
            brokers: self.brokers.clone(),
            client_id: format!("tailgate-{connector}"),
            topic_partitions: self.topic_partitions,
            topic_replication_factor: self.topic_replication_factor,
            librdkafka: self.librdkafka.clone(),
            security: security::librdkafka_settings(self),
        }
    }
}

impl SinkBuilder for KafkaConfig {
    fn kind(&self) -> &'static str {
        "Kafka"
    }

    fn validate(&self) -> Result<(), KeyError> {
        if self.brokers.trim().is_empty() {
            return Err(key_error("sink.brokers", "name at least one broker, e.g. \"127.0.0.1:9092\""));
        }
        if self.topic_partitions < 1 {
            return Err(key_error("sink.topic_partitions", "must be at least 1"));
        }
        // What tailgate's promise rests on: acknowledged by every in-sync replica, written once and
        // in order per partition.
        let weakening = [
            ("enable.idempotence", &["true"][..], "duplicates and reordering on producer retries"),
            ("acks", &["all", "-1"][..], "records acknowledged before they are replicated, lost with a broker"),
        ];
        for (setting, safe, risk) in weakening {
            if let Some(value) = self.librdkafka.get(setting)
                && !safe.contains(&value.as_str())
                && !self.unsafe_overrides
            {
                return Err(key_error(
                    format!("sink.librdkafka.\"{setting}\""),
                    format!(
                        "{value:?} weakens delivery ({risk}). Fix: remove it (tailgate sets {setting} = {:?}), or set \
                         sink.unsafe_overrides = true to accept the risk",
                        safe[0]
                    ),
                ));
            }
        }
        security::validate(self)
    }

    fn topic_prefix(&self) -> Option<&str> {
        self.topic_prefix.as_deref()
    }

    /// librdkafka's `message.max.bytes` (1,000,000 unless set in `[sink.librdkafka]`).
    fn max_record_bytes(&self) -> Option<usize> {
        Some(self.librdkafka.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(1_000_000))
    }

    fn build(&self, ctx: SinkContext) -> Result<Box<dyn Sink>, SinkError> {
        let config = self.sink_config(&ctx.name);
        tracing::info!(brokers = %config.brokers, "sink: kafka");
        Ok(Box::new(KafkaSink::new(config, Encoder::new(ctx.encoder), ctx.shutdown, ctx.drain_timeout)?))
    }

    fn check<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<CheckResult>> {
        let config = self.sink_config(name);
        let connection = security::describe(self);
        Box::pin(async move {
            let brokers = config.brokers.clone();
            match tokio::task::spawn_blocking(move || probe_brokers(&config, Duration::from_secs(5))).await {
                Ok(Ok(n)) => {
                    vec![CheckResult::ok("kafka", format!("{brokers} answered over {connection} ({n} broker(s))"))]
                }
                Ok(Err(e)) => vec![CheckResult::failed(
                    "kafka",
                    format!("{brokers} did not answer over {connection}: {e}. Fix: {}", security::fix_for(&e)),
                )],
                Err(e) => vec![CheckResult::failed("kafka", e.to_string())],
            }
        })
    }
}

/// tailgate's producer defaults; `[sink.librdkafka]` may override any of them.
pub fn default_producer_settings() -> Vec<(&'static str, &'static str)> {
    vec![
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("partitioner", "murmur2_random"),
        ("compression.type", "lz4"),
        // Infinite: never give up on a record while the broker is away; backpressure instead.
        ("message.timeout.ms", "0"),
        // Bounded queue: librdkafka's 1 GiB default would defeat flat memory.
        ("queue.buffering.max.kbytes", "16384"),
        ("queue.buffering.max.messages", "100000"),
        ("linger.ms", "5"),
        ("batch.size", "1000000"),
        // Topics are looked up, then created with the configured partitions: a metadata request
        // must not make the broker create them with its own defaults.
        ("allow.auto.create.topics", "false"),
    ]
}

pub fn client_config(config: &KafkaSinkConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers);
    cc.set("client.id", &config.client_id);
    for (k, v) in default_producer_settings() {
        cc.set(k, v);
    }
    for (k, v) in &config.security {
        cc.set(*k, v);
    }
    for (k, v) in &config.librdkafka {
        cc.set(k, v);
    }
    cc
}

/// Delivery reports as librdkafka hands them over, drained by the sink after each poll.
#[derive(Default)]
struct Deliveries {
    acked: Vec<u64>,
    failure: Option<SinkError>,
}

/// Only the sink's own thread polls the producer, so this lock is never contended.
#[derive(Default)]
pub struct DeliveryContext {
    deliveries: Mutex<Deliveries>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let mut d = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => d.acked.push(seq as u64),
            Err((error, message)) => {
                if d.failure.is_none() {
                    d.failure = Some(delivery_error(message.topic(), error));
                }
            }
        }
    }
}

fn delivery_error(topic: &str, error: &KafkaError) -> SinkError {
    let code = error.rdkafka_error_code();
    let fix = match code {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
            "raise the topic's max.message.bytes (and the broker's message.max.bytes), or exclude the large column"
        }
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => "grant this client WRITE on the topic",
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => "create the topic, or let tailgate create it",
        Some(RDKafkaErrorCode::MessageTimedOut) => {
            "the broker stayed unreachable longer than message.timeout.ms; remove that override (tailgate waits forever by default)"
        }
        _ => "check the broker logs; the run stopped without checkpointing past this record",
    };
    SinkError::Delivery { topic: topic.to_owned(), reason: error.to_string(), fix }
}

pub struct KafkaSink {
    producer: BaseProducer<DeliveryContext>,
    admin: AdminClient<DefaultClientContext>,
    config: KafkaSinkConfig,
    encoder: Encoder,
    tracker: AckTracker,
    known_topics: HashSet<Arc<str>>,
    /// Cancelled when the run is stopping: waits on an unreachable broker give up after `drain_timeout`.
    stop: CancellationToken,
    drain_timeout: Duration,
    drained: Vec<u64>,
    totals: SinkTotals,
}

impl KafkaSink {
    pub fn new(
        config: KafkaSinkConfig,
        encoder: Encoder,
        stop: CancellationToken,
        drain_timeout: Duration,
    ) -> Result<Self, SinkError> {
        let cc = client_config(&config);
        let producer: BaseProducer<DeliveryContext> = cc
            .create_with_context(DeliveryContext::default())
            .map_err(|e| SinkError::Config(format!("{e}. Fix: check [sink.librdkafka] settings")))?;
        let mut admin_cc = ClientConfig::new();
        admin_cc.set("bootstrap.servers", &config.brokers);
        admin_cc.set("client.id", &config.client_id);
        admin_cc.set("allow.auto.create.topics", "false");
        for (k, v) in &config.security {
            admin_cc.set(*k, v);
        }
        for (k, v) in &config.librdkafka {
            if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
                admin_cc.set(k, v);
            }
        }
        let admin: AdminClient<DefaultClientContext> =
            admin_cc.create().map_err(|e| SinkError::Config(format!("admin client: {e}")))?;
        Ok(KafkaSink {
            producer,
            admin,
            config,
            encoder,
            tracker: AckTracker::new(),
            known_topics: HashSet::new(),
            stop,
            drain_timeout,
            drained: Vec::new(),
            totals: SinkTotals::default(),
        })
    }

    /// Creates `topic` unless it exists (looked up first, so that a user without CREATE rights on
    /// the cluster can produce to topics made for it); retries with backoff while the broker is
    /// unreachable.
    async fn ensure_topic(&mut self, topic: &Arc<str>) -> Result<(), SinkError> {
        // A metadata request blocks for a moment (once per new topic): let the runtime know.
        let exists = tokio::task::block_in_place(|| {
            let metadata = self.producer.client().fetch_metadata(Some(topic), Duration::from_secs(5));
            metadata.is_ok_and(|m| {
                m.topics().iter().any(|t| t.name() == &**topic && t.error().is_none() && !t.partitions().is_empty())
            })
        });
        if exists {
            self.known_topics.insert(topic.clone());
            return Ok(());
        }
        let new_topic = NewTopic::new(
            topic,
            self.config.topic_partitions,
            TopicReplication::Fixed(self.config.topic_replication_factor),
        );
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let mut backoff = Duration::from_millis(200);
        let mut stopping_since: Option<Instant> = None;
        loop {
            let outcome = self.admin.create_topics([&new_topic], &opts).await;
            let error = match outcome {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(_)) => {
                        info!(topic = %topic, partitions = self.config.topic_partitions, "topic created");
                        break;
                    }
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => break,
                    Some(Err((_, code))) if is_definite_admin_error(code) => {
                        return Err(SinkError::Delivery {
                            topic: topic.to_string(),
                            reason: format!("cannot create the topic: {code}"),
                            fix: "create the topic yourself, or grant this client CREATE on the cluster",
                        });
                    }
                    Some(Err((_, code))) => code.to_string(),
                    None => "no result".to_owned(),
                },
                Err(e) => e.to_string(),
            };
            self.check_stop(&mut stopping_since, "creating a topic")?;
            warn!(topic = %topic, error = %error, retry_in = ?backoff, "cannot create topic yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            self.serve_deliveries()?;
        }
        self.known_topics.insert(topic.clone());
        Ok(())
    }

    fn check_stop(&self, stopping_since: &mut Option<Instant>, doing: &str) -> Result<(), SinkError> {
        if self.stop.is_cancelled() {
            let since = stopping_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.drain_timeout {
                return Err(SinkError::Other(format!(
                    "stopping while the broker is unreachable ({doing}); {} record(s) unacknowledged stay uncheckpointed and will be sent again on restart",
                    self.tracker.in_flight()
                )));
            }
        }
        Ok(())
    }

    /// Serves delivery reports and moves acknowledgements into the tracker.
    fn serve_deliveries(&mut self) -> Result<(), SinkError> {
        self.producer.poll(Duration::ZERO);
        let mut d = self.producer.context().deliveries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(failure) = d.failure.take() {
            return Err(failure);
        }
        std::mem::swap(&mut d.acked, &mut self.drained);
        drop(d);
        self.totals.delivered += self.drained.len() as u64;
        for seq in self.drained.drain(..) {
            self.tracker.ack(seq);
        }
        Ok(())
    }
}

fn is_definite_admin_error(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::PolicyViolation
    )
}

/// Enqueues one record, waiting (and serving acknowledgements) while librdkafka's queue is full.
#[allow(clippy::too_many_arguments)]
async fn produce(
    producer: &BaseProducer<DeliveryContext>,
    tracker: &mut AckTracker,
    stop: &CancellationToken,
    drain_timeout: Duration,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
    timestamp_ms: i64,
) -> Result<(), SinkError> {
    let seq = tracker.register();
    // An explicit timestamp (the batch's) spares librdkafka a clock read per record.
    let mut record: BaseRecord<'_, [u8], [u8], usize> =
        BaseRecord::with_opaque_to(topic, seq as usize).timestamp(timestamp_ms);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(v) = value {
        record = record.payload(v);
    }
    if !headers.is_empty() {
        let owned = headers.iter().fold(OwnedHeaders::new_with_capacity(headers.len()), |h, (k, v)| {
            h.insert(Header { key: k, value: Some(v) })
        });
        record = record.headers(owned);
    }
    let mut stopping_since: Option<Instant> = None;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                // Backpressure: wait in librdkafka until delivery reports make room. Its poll returns
                // as soon as one arrives (a fixed sleep would idle this thread while the queue
                // drains). Acks are applied by the caller's next serve_deliveries; they are
                // buffered in the context meanwhile.
                producer.poll(Duration::from_millis(10));
                if stop.is_cancelled() {
                    let since = stopping_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= drain_timeout {
                        return Err(SinkError::Other(format!(
                            "stopping while the broker is unreachable; {} record(s) unacknowledged stay uncheckpointed and will be sent again on restart",
                            tracker.in_flight()
                        )));
                    }
                }
                // Let the runtime run other tasks between waits (the poll above blocked this thread).
                tokio::task::yield_now().await;
            }
            Err((error, _)) => return Err(delivery_error(topic, &error)),
        }
    }
}

impl Sink for KafkaSink {
    fn send(&mut self, batch: Vec<SinkItem>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(self.send_batch(batch))
    }

    fn poll_acks(&mut self) -> Result<Option<Checkpoint>, SinkError> {
        self.serve_deliveries()?;
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

impl KafkaSink {
    async fn send_batch(&mut self, batch: Vec<SinkItem>) -> Result<(), SinkError> {
        self.encoder.begin_batch();
        for item in &batch {
            if let SinkItem::Commit(position) = item {
                self.tracker.commit(position.clone());
                continue;
            }
            let Some(prepared) = self.encoder.prepare(item)? else { continue };
            if !self.known_topics.contains(&prepared.topic) {
                self.ensure_topic(&prepared.topic).await?;
            }
            let key = self.encoder.key();
            let value = self.encoder.value();
            let headers = self.encoder.headers();
            let size = (key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len)) as u64;
            self.totals.bytes += size + if prepared.tombstone { key.map_or(0, <[u8]>::len) as u64 } else { 0 };
            self.totals.dead_lettered += u64::from(prepared.dead_letter);
            let (producer, tracker) = (&self.producer, &mut self.tracker);
            let ts = self.encoder.batch_time_ms();
            produce(producer, tracker, &self.stop, self.drain_timeout, &prepared.topic, key, value, headers, ts)
                .await?;
            if prepared.tombstone {
                produce(producer, tracker, &self.stop, self.drain_timeout, &prepared.topic, key, None, &[], ts).await?;
            }
        }
        self.serve_deliveries()
    }

    async fn flush_all(&mut self, timeout: Duration) -> Result<Option<Checkpoint>, SinkError> {
        let deadline = Instant::now() + timeout;
        while self.tracker.in_flight() > 0 && Instant::now() < deadline {
            self.serve_deliveries()?;
            if self.tracker.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        self.serve_deliveries()?;
        Ok(self.tracker.take_checkpoint())
    }
}

/// Checks that the brokers answer a metadata request (for `tailgate check`).
/// Asks the brokers for their metadata over the configured protocol. A failure carries what
/// librdkafka reported on the way (TLS handshake, SASL authentication), not only the timeout.
pub fn probe_brokers(config: &KafkaSinkConfig, timeout: Duration) -> Result<usize, String> {
    let producer: BaseProducer<ProbeContext> =
        client_config(config).create_with_context(ProbeContext::default()).map_err(|e| e.to_string())?;
    match producer.client().fetch_metadata(None, timeout) {
        Ok(metadata) => Ok(metadata.brokers().len()),
        Err(e) => {
            // Errors and log lines arrive as events: serve them before reading what was reported.
            producer.poll(Duration::from_millis(100));
            let context = producer.context();
            let taken = |slot: &Mutex<Option<String>>| slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            let reported = taken(&context.first_error).or_else(|| taken(&context.first_warning));
            Err(match reported {
                Some(reason) => format!("{e} ({reason})"),
                None => e.to_string(),
            })
        }
    }
}

/// Keeps the first error librdkafka reports while probing: "all brokers down" alone would hide a
/// certificate or authentication failure.
#[derive(Default)]
struct ProbeContext {
    first_error: Mutex<Option<String>>,
    first_warning: Mutex<Option<String>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(if reason.is_empty() { error.to_string() } else { reason.to_owned() });
        }
    }

    /// librdkafka reports some connection failures (a TLS peer that closes the handshake) only as
    /// log lines: keep the first warning as the reason when no error came.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, _fac: &str, log_message: &str) {
        if (level as i32) <= (rdkafka::config::RDKafkaLogLevel::Warning as i32) {
            let mut first = self.first_warning.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(log_message.to_owned());
            }
        }
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}
