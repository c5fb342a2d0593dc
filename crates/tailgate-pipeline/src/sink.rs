//! The sink contract.
//!
//! A sink accepts batches in order and acknowledges records asynchronously. It never reports a
//! position as acknowledged unless every record handed over before that position's `Item::Commit`
//! was durably accepted (Kafka: acknowledged with `acks=all`). On a definite delivery failure it
//! returns an error and reports no position past the failed record: the run stops and, on restart,
//! the source resumes from before it.

use std::sync::Arc;
use std::time::Duration;

use tailgate_core::{Event, Position};
use tokio_util::sync::CancellationToken;

use crate::check::CheckResult;
use crate::config::KeyError;
use crate::encode::EncoderOptions;
use crate::engine::BoxFuture;

/// A record whose bytes the transform stage produced itself (outbox events, dead letters).
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    pub topic: Arc<str>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub dead_letter: bool,
}

/// What the sink receives, in order.
#[derive(Debug, Clone)]
pub enum SinkItem {
    /// A change event to render as Debezium's envelope under `topic`.
    Change {
        topic: Arc<str>,
        event: Event,
    },
    Raw(RawRecord),
    /// As [`crate::Item::Commit`]: every record before it forms complete transactions.
    Commit(Checkpoint),
    /// From here on, records that cannot be delivered follow this policy (the rules were
    /// reloaded; this comes right after the commit where they took effect).
    DeadLetters(DeadLetterPolicy),
}

/// Where undeliverable records go, or whether the run stops before them (`[dead_letter]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPolicy {
    pub topic: Arc<str>,
    /// `on_error = "stop"`.
    pub stop: bool,
}

/// A commit marker as sinks see it: the source's position, numbered in the order the run handed
/// commits over. Progress is ordered by `seq`, never by comparing positions (a snapshot's markers
/// and the stream's positions are different kinds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub position: Position,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The destination is unreachable or refused the credentials at start (retried nowhere: the
    /// run cannot start). Names the cause and the fix.
    #[error("{0}")]
    Connect(String),
    /// The destination refused a record for good (e.g. too large, not authorised).
    #[error("delivery to topic {topic:?} failed for good: {reason}. {fix}")]
    Delivery { topic: String, reason: String, fix: &'static str },
    #[error("sink configuration: {0}")]
    Config(String),
    #[error("writing to {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl crate::engine::Classify for SinkError {
    fn class(&self) -> crate::engine::ErrorClass {
        use crate::engine::ErrorClass;
        match self {
            SinkError::Config(_) => ErrorClass::Config,
            SinkError::Connect(_) => ErrorClass::Prerequisite,
            SinkError::Delivery { .. } | SinkError::Io { .. } | SinkError::Other(_) => ErrorClass::Runtime,
        }
    }
}

/// A destination for records: Kafka, stdout, a message queue.
///
/// Contract, as the run loop relies on it:
/// - **Order.** `send` is called with batches in order. Records of one key (one topic, one key)
///   must reach the destination in the order given: per partition for Kafka, per subject or stream
///   elsewhere. A sink never reorders records across a [`SinkItem::Commit`].
/// - **Acknowledgement.** A position may be returned by `poll_acks` or `flush` only when every
///   record handed over before its [`SinkItem::Commit`] is durably accepted by the destination
///   (Kafka: `acks=all`; a queue: its publisher confirm). [`crate::AckTracker`] does the ordering.
///   Positions come back in the order their commits went in (`Checkpoint::seq` grows).
/// - **Promptness.** The run loop calls `poll_acks` after every batch and at least every 20 ms when
///   idle, and checkpoints what it returns at once: a sink hands back an acknowledgement at the first
///   `poll_acks` after the destination gave it, with no timer of its own (the last records of a
///   backlog are confirmed within milliseconds of being written).
/// - **Backpressure.** `send` may wait while the sink's bounded buffer is full; while it waits, the
///   source stops reading its log. Memory stays bounded whatever the destination's state.
/// - **Retries.** Transient failures (destination away, timeouts) are retried inside the sink,
///   forever unless the run is stopping (then for at most the drain timeout). A definite failure
///   (a record refused for good) is an error from `send`/`poll_acks`/`flush`, and no position past
///   that record is ever returned: the run stops, and a restart sends it again.
/// - **At least once.** After a crash the records after the last checkpoint are sent again; a sink
///   may use the source position to let the destination drop those duplicates (JetStream's
///   `Nats-Msg-Id`).
/// - **Shutdown.** `flush` is called once at the end (after the last `send`), waits up to `timeout`
///   for outstanding acknowledgements and returns the newest acknowledged position.
pub trait Sink: Send {
    /// Hands over a batch. May wait while the sink's bounded queue is full (backpressure).
    fn send(&mut self, batch: Vec<SinkItem>) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Serves pending acknowledgements; returns the newest fully acknowledged position, if it moved.
    fn poll_acks(&mut self) -> Result<Option<Checkpoint>, SinkError>;

    /// Waits up to `timeout` for everything handed over to be acknowledged; returns the newest fully
    /// acknowledged position, if it moved.
    fn flush(&mut self, timeout: Duration) -> BoxFuture<'_, Result<Option<Checkpoint>, SinkError>>;

    /// Records handed over and not yet acknowledged.
    fn in_flight(&self) -> usize;

    /// Totals since start.
    fn totals(&self) -> SinkTotals;
}

/// What the run gives a sink to build itself.
pub struct SinkContext {
    /// The connector's name (client ids, consumer-visible names).
    pub name: String,
    /// How records are rendered: envelopes, tombstones, size limit, dead letters.
    pub encoder: EncoderOptions,
    /// Cancelled when the run stops: waits on an unreachable destination give up after `drain_timeout`.
    pub shutdown: CancellationToken,
    pub drain_timeout: Duration,
}

/// A sink's `[sink]` config section: it validates itself, builds the sink and checks the
/// destination. The binary knows sinks only through this trait and the section's `type` tag.
pub trait SinkBuilder: Send + Sync {
    /// The sink's name for messages: "Kafka", "stdout".
    fn kind(&self) -> &'static str;

    /// What the TOML shape cannot check (values, combinations); errors name the key and the fix.
    fn validate(&self) -> Result<(), KeyError>;

    /// `topic_prefix`, if the section sets it (default: the connector's name).
    fn topic_prefix(&self) -> Option<&str>;

    /// The largest record the destination accepts (key, value and headers): larger ones become dead
    /// letters. `None`: no limit.
    fn max_record_bytes(&self) -> Option<usize>;

    fn build(&self, ctx: SinkContext) -> Result<Box<dyn Sink>, SinkError>;

    /// `tailgate check`: reachability, credentials, permissions; changes nothing.
    fn check<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<CheckResult>>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SinkTotals {
    /// Records acknowledged (events, tombstones, outbox records, dead letters).
    pub delivered: u64,
    /// Key and value bytes handed over.
    pub bytes: u64,
    /// Records handed to the dead-letter topic (decided upstream, or here for records too large).
    pub dead_lettered: u64,
}
