//! RabbitMQ sink (AMQP 0-9-1).
//!
//! - **Routing.** Every record is published to one durable topic exchange with the topic name as its
//!   routing key (`<topic_prefix>.<schema>.<table>`, outbox `outbox.event.<aggregatetype>`, the
//!   dead-letter topic for dead letters), so consumers bind queues with patterns such as `shop.#`. The
//!   value is the body (an empty body is the tombstone after a delete); the key travels in the
//!   `Tailgate-Key` header; the record's Kafka-style headers become AMQP headers; `message_id` is
//!   [`Encoder::record_id`] (`/t` appended for a tombstone) so consumers can drop repeats.
//! - **Exchange.** Looked up first (a passive declare needs no configure permission), declared
//!   (durable, topic) when missing if `declare_exchange = true`; otherwise a missing exchange is an
//!   error naming the fix.
//! - **Acknowledgement** is the publisher confirm: the broker took responsibility for the message
//!   (persistent, `delivery_mode = 2`, written to every durable queue it routes to). Messages are
//!   published `mandatory`, so one that no queue is bound for comes back (basic.return) instead of
//!   vanishing: that is an error naming the fix, or (`on_unroutable = "dead_letter"`) it is published
//!   again to the dead-letter routing key, and acknowledged only once that copy is confirmed. At most
//!   `max_in_flight` messages and `max_in_flight_bytes` bytes await their confirm; confirms feed the
//!   pipeline's [`AckTracker`] so a position is checkpointed only when everything before it is confirmed.
//! - **Failures.** A lost connection (broker restart, network) is re-established with backoff, and every
//!   unconfirmed message is published again, in order, on the new channel; meanwhile nothing new is
//!   read (backpressure). RabbitMQ has no de-duplication: a message that was stored but whose confirm was
//!   lost arrives twice (same `message_id`). A negative confirm (nack: a queue refused it, e.g. full with
//!   `x-overflow = reject-publish`) or a refused permission stops the run with the cause and the fix; no
//!   position past the record is checkpointed.
//!
//! [`AckTracker`]: tailgate_pipeline::AckTracker
//! [`Encoder::record_id`]: tailgate_pipeline::Encoder::record_id

mod publisher;
mod sink;

use serde::Deserialize;
use tailgate_pipeline::{BoxFuture, CheckResult, KeyError, Sink, SinkBuilder, SinkContext, SinkError, key_error};

pub use sink::RabbitmqSink;

/// `[sink]` with `type = "rabbitmq"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqConfig {
    /// `amqp://user:password@host:port/vhost` (the default vhost `/` is written `%2f`). Required.
    pub url: String,
    /// Default: the connector name. Routing keys are `<topic_prefix>.<schema>.<table>`.
    pub topic_prefix: Option<String>,
    /// The topic exchange records are published to. Default: the topic prefix.
    pub exchange: Option<String>,
    /// Declare the exchange (durable, type topic) when it is missing. Default true. When false, a
    /// missing exchange is an error naming the fix.
    #[serde(default = "yes")]
    pub declare_exchange: bool,
    /// A message no queue is bound for: `error` (default: the run stops, naming the routing key) or
    /// `dead_letter` (published to the dead-letter routing key instead; if that is unroutable too, the
    /// run stops).
    #[serde(default)]
    pub on_unroutable: OnUnroutable,
    /// Messages published and not yet confirmed, at most. Default 1024.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Bytes of records (key, value, headers) waiting in the sink or for their confirm, at most.
    /// Default 16777216 (16 MiB).
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// The largest record (key, value and headers); larger ones become dead letters. Default 16777216
    /// (16 MiB, RabbitMQ 4's default `max_message_size`).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnroutable {
    #[default]
    Error,
    DeadLetter,
}

fn yes() -> bool {
    true
}
fn default_max_in_flight() -> usize {
    1024
}
fn default_max_in_flight_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_max_record_bytes() -> usize {
    16 * 1024 * 1024
}

/// The section with its defaults resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub connection_name: String,
    pub exchange: String,
    pub declare_exchange: bool,
    pub on_unroutable: OnUnroutable,
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
}

impl RabbitmqConfig {
    pub fn settings(&self, connector: &str) -> Settings {
        let prefix = self.topic_prefix.as_deref().unwrap_or(connector);
        Settings {
            url: self.url.clone(),
            connection_name: format!("tailgate-{connector}"),
            exchange: self.exchange.clone().unwrap_or_else(|| prefix.to_owned()),
            declare_exchange: self.declare_exchange,
            on_unroutable: self.on_unroutable,
            max_in_flight: self.max_in_flight,
            max_in_flight_bytes: self.max_in_flight_bytes,
        }
    }
}

impl SinkBuilder for RabbitmqConfig {
    fn kind(&self) -> &'static str {
        "RabbitMQ"
    }

    fn validate(&self) -> Result<(), KeyError> {
        match self.url.parse::<lapin::uri::AMQPUri>() {
            Ok(uri) if uri.scheme == lapin::uri::AMQPScheme::AMQPS => {
                return Err(key_error(
                    "sink.url",
                    "amqps:// is not supported by this build yet; use amqp:// (e.g. through a TLS-terminating proxy)",
                ));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(key_error(
                    "sink.url",
                    format!("{e}; write it like \"amqp://guest:guest@127.0.0.1:5672/%2f\""),
                ));
            }
        }
        if let Some(exchange) = &self.exchange
            && (exchange.is_empty() || exchange.len() > 255)
        {
            return Err(key_error(
                "sink.exchange",
                "name a topic exchange of 1 to 255 bytes (the default exchange cannot route by pattern)",
            ));
        }
        if self.exchange.is_none() && self.topic_prefix.as_ref().is_some_and(|p| p.len() > 255) {
            return Err(key_error("sink.exchange", "the topic prefix is too long to name the exchange: set one"));
        }
        if self.max_in_flight == 0 {
            return Err(key_error("sink.max_in_flight", "must be at least 1"));
        }
        if self.max_in_flight_bytes < 64 * 1024 || self.max_in_flight_bytes > u32::MAX as usize / 2 {
            return Err(key_error("sink.max_in_flight_bytes", "must be between 65536 and 2147483647"));
        }
        if self.max_record_bytes < 1024 || self.max_record_bytes > 512 * 1024 * 1024 {
            return Err(key_error("sink.max_record_bytes", "must be between 1024 and 536870912"));
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
        tracing::info!(url = %redact(&settings.url), exchange = %settings.exchange, "sink: rabbitmq");
        Ok(Box::new(RabbitmqSink::new(settings, ctx)?))
    }

    fn check<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<CheckResult>> {
        let settings = self.settings(name);
        Box::pin(async move { publisher::check(&settings).await })
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> RabbitmqConfig {
        RabbitmqConfig {
            url: url.into(),
            topic_prefix: None,
            exchange: None,
            declare_exchange: true,
            on_unroutable: OnUnroutable::Error,
            max_in_flight: 1024,
            max_in_flight_bytes: 16 << 20,
            max_record_bytes: 16 << 20,
        }
    }

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        assert!(config("amqp://guest:guest@127.0.0.1:5672/%2f").validate().is_ok());
        assert_eq!(config("amqps://h/").validate().unwrap_err().key, "sink.url");
        assert_eq!(redact("amqp://u:secret@h:5672/%2f"), "amqp://u:***@h:5672/%2f");
        assert_eq!(redact("amqp://h:5672"), "amqp://h:5672");
    }

    #[test]
    fn exchange_defaults_to_the_prefix() {
        let s = config("amqp://h").settings("shop");
        assert_eq!(s.exchange, "shop");
        assert_eq!(s.connection_name, "tailgate-shop");
    }
}
