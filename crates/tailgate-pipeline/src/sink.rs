//! The sink contract.
//!
//! A sink accepts batches in order and acknowledges records asynchronously. It never reports a
//! position as acknowledged unless every record handed over before that position's `Item::Commit`
//! was durably accepted (Kafka: acknowledged with `acks=all`). On a definite delivery failure it
//! returns an error and reports no position past the failed record: the run stops and, on restart,
//! the source resumes from before it.

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use tailgate_core::{Event, Position};

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

pub trait Sink: Send {
    /// Hands over a batch. May wait while the sink's bounded queue is full (backpressure).
    fn send(&mut self, batch: Vec<SinkItem>) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Serves pending acknowledgements; returns the newest fully acknowledged position, if it moved.
    fn poll_acks(&mut self) -> Result<Option<Checkpoint>, SinkError>;

    /// Waits up to `timeout` for everything handed over to be acknowledged; returns the newest fully
    /// acknowledged position, if it moved.
    fn flush(&mut self, timeout: Duration) -> impl Future<Output = Result<Option<Checkpoint>, SinkError>> + Send;

    /// Records handed over and not yet acknowledged.
    fn in_flight(&self) -> usize;

    /// Totals since start.
    fn totals(&self) -> SinkTotals;
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
