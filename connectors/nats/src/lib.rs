//! NATS JetStream sink.
//!
//! - **Subjects.** A record goes to the subject named after its topic (`<topic_prefix>.<schema>.<table>`,
//!   outbox `outbox.event.<aggregatetype>`, the dead-letter topic for dead letters): dots stay subject
//!   tokens, characters subjects cannot hold become `_` ([`subject`]). The value is the payload (an empty
//!   payload is the tombstone after a delete); the key travels in the `Tailgate-Key` header; the record's
//!   Kafka-style headers become NATS headers.
//! - **Stream.** One stream takes every subject. It is created when missing (`create_stream = true`,
//!   with the configured subjects, retention, storage, replicas and duplicate window), and a subject it
//!   does not cover yet (a route or an outbox topic outside the prefix) is added to it; with
//!   `create_stream = false` either is an error naming the fix.
//! - **Acknowledgement** is JetStream's PubAck: the record is stored in the stream (replicated to
//!   `replicas` servers). Records are published asynchronously, at most `max_in_flight` records and
//!   `max_in_flight_bytes` bytes awaiting their PubAck; PubAcks feed the pipeline's [`AckTracker`] so a
//!   position is checkpointed only when everything before it is stored.
//! - **De-duplication.** Each record carries `Nats-Msg-Id` = [`Encoder::record_id`] (`/t` appended for a
//!   tombstone): JetStream drops a message whose id it stored within the stream's duplicate window
//!   (default 2 minutes) and acknowledges it as a duplicate. Re-publishing after a lost connection and
//!   re-sending after a crash (the records after the last checkpoint) therefore store nothing twice as
//!   long as they happen within the window: exactly-once publication within the window, at-least-once
//!   beyond it.
//! - **Failures.** A lost connection is re-established by the client; records without a PubAck after
//!   `ack_timeout_ms`, or refused as "no responders" (JetStream not ready), are re-published in order
//!   once the stream answers again, the duplicate window dropping those that were stored. Meanwhile
//!   nothing new is read (backpressure). A refusal that retrying cannot fix (a record over the stream's
//!   size limit, a permissions violation, refused credentials) stops the run with the cause and the fix;
//!   no position past the record is ever checkpointed.
//!
//! [`AckTracker`]: tailgate_pipeline::AckTracker
//! [`Encoder::record_id`]: tailgate_pipeline::Encoder::record_id

mod login;
mod publisher;
mod sink;
pub mod subject;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tailgate_pipeline::{BoxFuture, CheckResult, KeyError, Sink, SinkBuilder, SinkContext, SinkError, key_error};

pub use sink::NatsSink;

/// Room left for what the sink adds to a record (`Nats-Msg-Id`, header framing) under the server's
/// `max_payload`.
pub const HEADER_ROOM: usize = 4096;

/// `[sink]` with `type = "nats"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:port`, several separated by commas. Required.
    pub url: String,
    /// Default: the connector name. Subjects are `<topic_prefix>.<schema>.<table>`.
    pub topic_prefix: Option<String>,
    /// User and password, when the server asks for them (also possible in the URL:
    /// `nats://user:password@host`, percent-encoded).
    pub user: Option<String>,
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// A `.creds` file (JWT and nkey seed) for decentralized authentication.
    pub credentials_file: Option<PathBuf>,
    /// The JetStream stream. Default: the topic prefix, with `.`, `*`, `>`, `/`, `\` and whitespace
    /// replaced by `_`.
    pub stream: Option<String>,
    /// The stream's subjects when tailgate creates it. Default `["<topic_prefix>.>"]`.
    pub subjects: Option<Vec<String>>,
    /// Create the stream when it is missing, and add a subject it does not cover. Default true. When
    /// false, a missing stream or an uncovered subject is an error naming the fix.
    #[serde(default = "yes")]
    pub create_stream: bool,
    /// Retention of a created stream: `limits` (default), `interest` or `workqueue`.
    #[serde(default)]
    pub retention: Retention,
    /// Storage of a created stream: `file` (default) or `memory`.
    #[serde(default)]
    pub storage: Storage,
    /// Replicas of a created stream. Default 1.
    #[serde(default = "one")]
    pub replicas: usize,
    /// The created stream's duplicate window, in seconds: a re-sent record within it is dropped by its
    /// `Nats-Msg-Id`. Default 120.
    #[serde(default = "default_duplicate_window_s")]
    pub duplicate_window_s: u64,
    /// Maximum age of a created stream's messages, in seconds. Default 0 (unlimited).
    #[serde(default)]
    pub max_age_s: u64,
    /// Maximum size of a created stream, in bytes. Default -1 (unlimited).
    #[serde(default = "minus_one")]
    pub max_bytes: i64,
    /// Records published and not yet acknowledged, at most. Default 4096 (PubAcks come back one round
    /// trip later: the window is what keeps the stream busy).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Bytes of records (key, value, headers) waiting in the sink or for their PubAck, at most.
    /// Default 16777216 (16 MiB).
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// A record without PubAck after this long is published again (in order with those after it).
    /// Default 5000.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// The largest record (key, value and headers); larger ones become dead letters. Must leave 4 KiB
    /// under the server's `max_payload`. Default 1044480 (1 MiB − 4 KiB, for the server default
    /// `max_payload` of 1 MiB).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    #[default]
    Limits,
    Interest,
    Workqueue,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    #[default]
    File,
    Memory,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn minus_one() -> i64 {
    -1
}
fn default_duplicate_window_s() -> u64 {
    120
}
fn default_max_in_flight() -> usize {
    4096
}
fn default_max_in_flight_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_ack_timeout_ms() -> u64 {
    5000
}
fn default_max_record_bytes() -> usize {
    1024 * 1024 - HEADER_ROOM
}

/// The section with its defaults resolved, for the sink and `check`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub client_name: String,
    pub auth: Auth,
    pub stream: String,
    pub subjects: Vec<String>,
    pub create_stream: bool,
    pub retention: Retention,
    pub storage: Storage,
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub max_age: Duration,
    pub max_bytes: i64,
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    pub ack_timeout: Duration,
    pub max_record_bytes: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub credentials_file: Option<PathBuf>,
}

impl NatsConfig {
    /// The topic prefix in force: the section's, else the connector's name.
    fn prefix<'a>(&'a self, connector: &'a str) -> &'a str {
        self.topic_prefix.as_deref().unwrap_or(connector)
    }

    pub fn settings(&self, connector: &str) -> Settings {
        let prefix = self.prefix(connector);
        Settings {
            url: self.url.clone(),
            client_name: format!("tailgate-{connector}"),
            auth: Auth {
                user: self.user.clone(),
                password: self.password.clone(),
                token: self.token.clone(),
                credentials_file: self.credentials_file.clone(),
            },
            stream: self.stream.clone().unwrap_or_else(|| subject::stream_name_for(prefix)),
            subjects: self
                .subjects
                .clone()
                .unwrap_or_else(|| vec![format!("{}.>", subject::subject_for_topic(prefix))]),
            create_stream: self.create_stream,
            retention: self.retention,
            storage: self.storage,
            replicas: self.replicas,
            duplicate_window: Duration::from_secs(self.duplicate_window_s),
            max_age: Duration::from_secs(self.max_age_s),
            max_bytes: self.max_bytes,
            max_in_flight: self.max_in_flight,
            max_in_flight_bytes: self.max_in_flight_bytes,
            ack_timeout: Duration::from_millis(self.ack_timeout_ms),
            max_record_bytes: self.max_record_bytes,
        }
    }
}

impl SinkBuilder for NatsConfig {
    fn kind(&self) -> &'static str {
        "NATS JetStream"
    }

    fn validate(&self) -> Result<(), KeyError> {
        if self.url.trim().is_empty() {
            return Err(key_error("sink.url", "name at least one server, e.g. \"nats://127.0.0.1:4222\""));
        }
        for url in self.url.split(',') {
            if url.trim().parse::<async_nats::ServerAddr>().is_err() {
                return Err(key_error(
                    "sink.url",
                    format!("{:?} is not a server address like \"nats://127.0.0.1:4222\"", url.trim()),
                ));
            }
        }
        if self.password.is_some() != self.user.is_some() {
            return Err(key_error("sink.user", "set sink.user and sink.password together"));
        }
        let methods = [self.user.is_some(), self.token.is_some(), self.credentials_file.is_some()];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(key_error(
                "sink.token",
                "choose one authentication: sink.user/sink.password, sink.token or sink.credentials_file",
            ));
        }
        if let Some(stream) = &self.stream
            && !subject::valid_stream_name(stream)
        {
            return Err(key_error(
                "sink.stream",
                format!("{stream:?} is not a stream name (no '.', '*', '>', '/', '\\' or whitespace)"),
            ));
        }
        if let Some(subjects) = &self.subjects {
            if subjects.is_empty() {
                return Err(key_error("sink.subjects", "name at least one subject, e.g. [\"shop.>\"]"));
            }
            if let Some(bad) = subjects.iter().find(|s| !subject::valid_subject_pattern(s)) {
                return Err(key_error(
                    "sink.subjects",
                    format!("{bad:?} is not a subject pattern (dot-separated tokens; '>' only last)"),
                ));
            }
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(key_error("sink.replicas", "must be between 1 and 5"));
        }
        if self.duplicate_window_s == 0 {
            return Err(key_error(
                "sink.duplicate_window_s",
                "must be at least 1: the window is what drops re-sent records (120 is JetStream's default)",
            ));
        }
        if self.max_bytes == 0 || self.max_bytes < -1 {
            return Err(key_error("sink.max_bytes", "use -1 (unlimited) or a positive size"));
        }
        if self.max_in_flight == 0 {
            return Err(key_error("sink.max_in_flight", "must be at least 1"));
        }
        if self.max_in_flight_bytes < 64 * 1024 || self.max_in_flight_bytes > u32::MAX as usize / 2 {
            return Err(key_error("sink.max_in_flight_bytes", "must be between 65536 and 2147483647"));
        }
        if self.ack_timeout_ms < 100 {
            return Err(key_error("sink.ack_timeout_ms", "must be at least 100"));
        }
        if self.max_record_bytes < 1024 {
            return Err(key_error("sink.max_record_bytes", "must be at least 1024"));
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
        let settings = self.settings(&ctx.name);
        tracing::info!(url = %settings.url, stream = %settings.stream, "sink: nats jetstream");
        Ok(Box::new(NatsSink::new(settings, ctx)?))
    }

    fn check<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<CheckResult>> {
        let settings = self.settings(name);
        Box::pin(async move { publisher::check(&settings).await })
    }
}
