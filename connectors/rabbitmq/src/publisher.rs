//! The publisher task: owns the AMQP connection and a confirm-mode channel, publishes records in
//! order (mandatory, persistent), reads the confirms, and re-publishes what was not confirmed after
//! the connection was lost.
//!
//! lapin queues a message's frames on the first poll of `basic_publish` and assigns its delivery tag
//! there, so each publish is polled once right away (frames leave in call order) and its completion
//! and confirm are polled later: up to `max_in_flight` messages are in the air at once, without a
//! round trip per message. Confirms resolve in publish order; the window is scanned from its front.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind, PublisherConfirm,
};
use tailgate_pipeline::{CheckResult, SinkError};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::sink::{Outgoing, Shared, ToPublisher};
use crate::{OnUnroutable, Settings, redact};

const MAX_BACKOFF: Duration = Duration::from_secs(5);

type Publishing = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

enum Stage {
    /// Frames queued; waiting for them to be written.
    Publishing(Publishing),
    /// Written; waiting for the broker's confirm.
    Confirming(PublisherConfirm),
    Confirmed,
}

/// A record published and not yet confirmed.
struct InFlight {
    seq: u64,
    routing_key: ShortString,
    payload: Bytes,
    properties: BasicProperties,
    charge: u32,
    dead_letter: bool,
    stage: Stage,
}

#[allow(clippy::large_enum_variant)] // one on the stack at a time
enum Wake {
    Scan(Result<Scan, SinkError>),
    Message(Option<ToPublisher>),
}

/// Where one record stands.
enum Outcome {
    /// Confirmed (`true`: just now).
    Confirmed(bool),
    Pending,
    /// Came back unroutable (reply code and text).
    Returned(String),
    Nack,
    Failed(lapin::Error),
}

fn poll_record(record: &mut InFlight, cx: &mut Context<'_>) -> Outcome {
    loop {
        match &mut record.stage {
            Stage::Confirmed => return Outcome::Confirmed(false),
            Stage::Publishing(publishing) => match publishing.as_mut().poll(cx) {
                Poll::Ready(Ok(confirm)) => record.stage = Stage::Confirming(confirm),
                Poll::Ready(Err(e)) => return Outcome::Failed(e),
                Poll::Pending => return Outcome::Pending,
            },
            Stage::Confirming(confirm) => {
                return match Pin::new(confirm).poll(cx) {
                    Poll::Ready(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => {
                        record.stage = Stage::Confirmed;
                        Outcome::Confirmed(true)
                    }
                    Poll::Ready(Ok(Confirmation::Ack(Some(returned)))) => {
                        Outcome::Returned(format!("{} {}", returned.reply_code, returned.reply_text))
                    }
                    Poll::Ready(Ok(Confirmation::Nack(_))) => Outcome::Nack,
                    Poll::Ready(Err(e)) => Outcome::Failed(e),
                    Poll::Pending => Outcome::Pending,
                };
            }
        }
    }
}

/// What came of scanning the window.
enum Scan {
    /// Confirms arrived (or nothing is pending).
    Progress,
    /// The connection or channel failed: reconnect and publish the unconfirmed again.
    Lost(String),
}

/// What a step that may be retried gives: done, or a transient reason to try again.
enum Attempt<T> {
    Done(T),
    Retry(String),
}

pub(crate) async fn run(
    settings: Settings,
    dead_letter_key: ShortString,
    mut rx: mpsc::Receiver<ToPublisher>,
    shared: Arc<Shared>,
) {
    let outcome = match Publisher::start(settings, dead_letter_key, shared.clone()).await {
        Ok(publisher) => publisher.run(&mut rx).await,
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        shared.fail(e);
    }
    // Only now does the sink see its channel closed: the failure is there to report.
    drop(rx);
}

struct Publisher {
    settings: Settings,
    exchange: ShortString,
    dead_letter_key: ShortString,
    shared: Arc<Shared>,
    connection: Connection,
    channel: Channel,
    window: VecDeque<InFlight>,
}

impl Publisher {
    async fn start(
        settings: Settings,
        dead_letter_key: ShortString,
        shared: Arc<Shared>,
    ) -> Result<Publisher, SinkError> {
        let exchange = ShortString::try_new(settings.exchange.clone())
            .map_err(|e| SinkError::Config(format!("sink.exchange: {e}")))?;
        let (connection, channel) = connect_retrying(&settings, &exchange).await?;
        Ok(Publisher { settings, exchange, dead_letter_key, shared, connection, channel, window: VecDeque::new() })
    }

    async fn run(mut self, rx: &mut mpsc::Receiver<ToPublisher>) -> Result<(), SinkError> {
        let mut closed = false;
        loop {
            while !closed && self.window.len() < self.settings.max_in_flight {
                match rx.try_recv() {
                    Ok(message) => self.take(message),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            if closed && self.window.is_empty() {
                let _ = self.connection.close(200, ShortString::from("tailgate stopped")).await;
                return Ok(());
            }
            let room = !closed && self.window.len() < self.settings.max_in_flight;
            let wake = tokio::select! {
                biased;
                scan = std::future::poll_fn(|cx| self.scan(cx)) => Wake::Scan(scan),
                message = rx.recv(), if room => Wake::Message(message),
            };
            match wake {
                Wake::Scan(scan) => {
                    if let Scan::Lost(why) = scan? {
                        self.recover(why).await?;
                    }
                }
                Wake::Message(Some(message)) => self.take(message),
                Wake::Message(None) => closed = true,
            }
        }
    }

    fn take(&mut self, message: ToPublisher) {
        match message {
            ToPublisher::Record(out) => self.publish_new(out),
            ToPublisher::DeadLetterKey(key) => self.dead_letter_key = key,
        }
    }

    fn publish_new(&mut self, out: Outgoing) {
        let Outgoing { seq, routing_key, payload, properties, charge, dead_letter } = out;
        let mut record =
            InFlight { seq, routing_key, payload, properties, charge, dead_letter, stage: Stage::Confirmed };
        record.stage = start_publish(&self.channel, &self.exchange, &record);
        self.window.push_back(record);
    }

    /// Advances the window from its front; `Pending` until a confirm, a return or a failure arrives.
    fn scan(&mut self, cx: &mut Context<'_>) -> Poll<Result<Scan, SinkError>> {
        let mut progress = false;
        let mut index = 0;
        while index < self.window.len() {
            match poll_record(&mut self.window[index], cx) {
                Outcome::Confirmed(now) => {
                    progress |= now;
                    index += 1;
                }
                Outcome::Pending => break,
                // Published again to the dead-letter routing key: polled again as a new publish.
                Outcome::Returned(why) => self.unroutable(index, &why)?,
                Outcome::Nack => {
                    let record = &self.window[index];
                    return Poll::Ready(Err(SinkError::Delivery {
                        topic: record.routing_key.to_string(),
                        reason: format!(
                            "RabbitMQ refused the message (negative confirm) on exchange {:?}",
                            self.settings.exchange
                        ),
                        fix: "a queue it routes to is full with x-overflow = reject-publish, or could not store it: \
                              make room (consumers, max-length) and check the broker log; the restart sends it again",
                    }));
                }
                Outcome::Failed(e) => return Poll::Ready(lost_or_definite(&e, "publishing")),
            }
        }
        if self.release() > 0 {
            progress = true;
        }
        if progress { Poll::Ready(Ok(Scan::Progress)) } else { Poll::Pending }
    }

    /// A message came back unroutable: published again to the dead-letter routing key, or an error.
    fn unroutable(&mut self, index: usize, why: &str) -> Result<(), SinkError> {
        let dead_letter_key = self.dead_letter_key.clone();
        let record = &mut self.window[index];
        if self.settings.on_unroutable == OnUnroutable::Error || record.dead_letter {
            let (reason, fix) = if record.dead_letter {
                (
                    format!(
                        "RabbitMQ returned the dead letter as unroutable ({why}): no queue is bound to exchange {:?} \
                         for the dead-letter routing key",
                        self.settings.exchange
                    ),
                    "bind a queue for the dead-letter routing key ([dead_letter] topic), or give the exchange an \
                     alternate-exchange",
                )
            } else {
                (
                    format!(
                        "RabbitMQ returned the message as unroutable ({why}): no queue is bound to exchange {:?} for \
                         this routing key",
                        self.settings.exchange
                    ),
                    "bind a queue for it (e.g. binding key \"<topic_prefix>.#\"), give the exchange an \
                     alternate-exchange, or set sink.on_unroutable = \"dead_letter\"",
                )
            };
            return Err(SinkError::Delivery { topic: record.routing_key.to_string(), reason, fix });
        }
        warn!(routing_key = %record.routing_key, "unroutable message sent to the dead-letter routing key");
        let mut headers = record.properties.headers().clone().unwrap_or_default();
        headers.insert(ShortString::from("tailgate.error.cause"), long("unroutable"));
        headers.insert(ShortString::from("tailgate.error.topic"), long(record.routing_key.as_str()));
        record.properties = record.properties.clone().with_headers(headers);
        record.routing_key = dead_letter_key;
        record.dead_letter = true;
        record.stage = start_publish(&self.channel, &self.exchange, record);
        self.shared.rerouted();
        Ok(())
    }

    /// Hands the confirmed prefix of the window back to the sink; gives how many.
    fn release(&mut self) -> u64 {
        let mut permits = 0usize;
        let mut first = None;
        let mut count = 0u64;
        while self.window.front().is_some_and(|r| matches!(r.stage, Stage::Confirmed)) {
            if let Some(r) = self.window.pop_front() {
                first.get_or_insert(r.seq);
                count += 1;
                permits += r.charge as usize;
            }
        }
        if let Some(first) = first {
            self.shared.acked(first..first + count, permits);
        }
        count
    }

    /// Reconnects, then publishes every unconfirmed record again, in order, on the new channel.
    async fn recover(&mut self, why: String) -> Result<(), SinkError> {
        let unconfirmed = self.window.iter().filter(|r| !matches!(r.stage, Stage::Confirmed)).count();
        warn!(cause = %why, unconfirmed, "RabbitMQ connection lost; reconnecting, then publishing the unconfirmed again");
        let (connection, channel) = connect_retrying(&self.settings, &self.exchange).await?;
        // Whatever was pending on the old channel is abandoned with it (a channel-level failure
        // leaves the old connection open: it is closed).
        let old = std::mem::replace(&mut self.connection, connection);
        self.channel = channel;
        close(&old, "replaced").await;
        for index in 0..self.window.len() {
            if !matches!(self.window[index].stage, Stage::Confirmed) {
                let stage = start_publish(&self.channel, &self.exchange, &self.window[index]);
                self.window[index].stage = stage;
            }
        }
        info!(republished = unconfirmed, "RabbitMQ reconnected");
        Ok(())
    }
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// Queues the message's frames now (the first poll of `basic_publish` does that, in call order) and
/// gives what is left to wait for.
fn start_publish(channel: &Channel, exchange: &ShortString, record: &InFlight) -> Stage {
    let channel = channel.clone();
    let exchange = exchange.clone();
    let routing_key = record.routing_key.clone();
    let payload = record.payload.clone();
    let properties = record.properties.clone();
    let mut publishing: Publishing = Box::pin(async move {
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        channel.basic_publish(exchange, routing_key, options, &payload, properties).await
    });
    let mut cx = Context::from_waker(Waker::noop());
    match publishing.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(confirm)) => Stage::Confirming(confirm),
        // Refused at once (channel closed): the next scan sees it again and reconnects.
        Poll::Ready(Err(e)) => {
            Stage::Publishing(Box::pin(std::future::ready(Err::<PublisherConfirm, lapin::Error>(e))))
        }
        Poll::Pending => Stage::Publishing(publishing),
    }
}

/// A lapin error on a publish or confirm: the connection is gone (reconnect), or the broker refused
/// for a reason reconnecting will not fix.
fn lost_or_definite(error: &lapin::Error, doing: &str) -> Result<Scan, SinkError> {
    if let ErrorKind::ProtocolError(amqp) = error.kind() {
        match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return Err(SinkError::Connect(format!(
                    "RabbitMQ refused the publish: {}. Fix: grant the user write permission on the exchange \
                     (rabbitmqctl set_permissions -p <vhost> <user> <configure> <write> <read>)",
                    amqp.get_message()
                )));
            }
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                return Err(SinkError::Connect(format!(
                    "RabbitMQ: {}. The exchange was deleted while tailgate ran. Fix: declare it again (or restart \
                     with sink.declare_exchange = true)",
                    amqp.get_message()
                )));
            }
            AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR) => {
                return Err(SinkError::Other(format!(
                    "RabbitMQ closed the connection: {} (a message it could not take; check max_message_size and \
                     the broker log)",
                    amqp.get_message()
                )));
            }
            _ => {}
        }
    }
    Ok(Scan::Lost(format!("{doing}: {error}")))
}

async fn connect_retrying(settings: &Settings, exchange: &ShortString) -> Result<(Connection, Channel), SinkError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match connect_once(settings, exchange).await? {
            Attempt::Done(pair) => return Ok(pair),
            Attempt::Retry(why) => {
                warn!(url = %redact(&settings.url), error = %why, retry_in = ?backoff, "RabbitMQ unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Connects, makes sure the exchange is there, and opens a confirm-mode channel.
async fn connect_once(
    settings: &Settings,
    exchange: &ShortString,
) -> Result<Attempt<(Connection, Channel)>, SinkError> {
    let connection = match connect(settings).await? {
        Attempt::Done(c) => c,
        Attempt::Retry(why) => return Ok(Attempt::Retry(why)),
    };
    let outcome = set_up(settings, exchange, &connection).await;
    if !matches!(outcome, Ok(Attempt::Done(_))) {
        close(&connection, "setup failed").await;
    }
    outcome.map(|attempt| match attempt {
        Attempt::Done(channel) => Attempt::Done((connection, channel)),
        Attempt::Retry(why) => Attempt::Retry(why),
    })
}

/// Closes a connection tailgate no longer uses (best effort: it may be dead already).
async fn close(connection: &Connection, why: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, ShortString::from(why))).await;
}

/// Makes sure the exchange is there and opens the confirm-mode channel.
async fn set_up(
    settings: &Settings,
    exchange: &ShortString,
    connection: &Connection,
) -> Result<Attempt<Channel>, SinkError> {
    let retry = |e: lapin::Error| Attempt::Retry(e.to_string());
    let ready = if settings.declare_exchange {
        declare_exchange(connection, exchange).await
    } else {
        exchange_exists(connection, exchange).await
    };
    match ready {
        Ok(true) => {}
        Ok(false) if settings.declare_exchange => {
            return Err(SinkError::Connect(format!(
                "RabbitMQ exchange {:?} does not exist and this user may not declare it (no configure permission). \
                 Fix: declare it (durable, type topic), or grant the user configure permission on it",
                settings.exchange
            )));
        }
        Ok(false) => return Err(missing_exchange(settings)),
        Err(e) => {
            if let Some(definite) = definite_error(&e, settings) {
                return Err(definite);
            }
            return Ok(retry(e));
        }
    }
    let channel = match connection.create_channel().await {
        Ok(c) => c,
        Err(e) => return Ok(retry(e)),
    };
    if let Err(e) = channel.confirm_select(ConfirmSelectOptions::default()).await {
        return Ok(retry(e));
    }
    Ok(Attempt::Done(channel))
}

async fn connect(settings: &Settings) -> Result<Attempt<Connection>, SinkError> {
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(settings.connection_name.as_str()));
    let attempt = tokio::time::timeout(Duration::from_secs(10), Connection::connect(&settings.url, properties)).await;
    match attempt {
        Ok(Ok(connection)) => Ok(Attempt::Done(connection)),
        Ok(Err(e)) => match definite_error(&e, settings) {
            Some(definite) => Err(definite),
            None => Ok(Attempt::Retry(e.to_string())),
        },
        Err(_) => Ok(Attempt::Retry("no answer within 10s".into())),
    }
}

/// Declares the exchange (durable, topic; a no-op when it exists so). Without configure permission,
/// falls back to looking it up: whether it is there.
async fn declare_exchange(connection: &Connection, exchange: &ShortString) -> lapin::Result<bool> {
    let channel = connection.create_channel().await?;
    let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    match channel.exchange_declare(exchange.clone(), ExchangeKind::Topic, options, FieldTable::default()).await {
        Ok(()) => {
            let _ = channel.close(200, ShortString::from("declared")).await;
            Ok(true)
        }
        Err(e) if is_soft(&e, AMQPSoftError::ACCESSREFUSED) => exchange_exists(connection, exchange).await,
        Err(e) => Err(e),
    }
}

/// A passive declare: whether the exchange exists (needs no configure permission). The channel is
/// closed by the broker when it does not, so a fresh one is used.
async fn exchange_exists(connection: &Connection, exchange: &ShortString) -> lapin::Result<bool> {
    let channel = connection.create_channel().await?;
    let options = ExchangeDeclareOptions { passive: true, durable: true, ..ExchangeDeclareOptions::default() };
    match channel.exchange_declare(exchange.clone(), ExchangeKind::Topic, options, FieldTable::default()).await {
        Ok(()) => {
            let _ = channel.close(200, ShortString::from("checked")).await;
            Ok(true)
        }
        Err(e) if is_soft(&e, AMQPSoftError::NOTFOUND) => Ok(false),
        Err(e) => Err(e),
    }
}

fn is_soft(error: &lapin::Error, soft: AMQPSoftError) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Soft(soft))
}

/// Errors that reconnecting cannot fix, with the fix.
fn definite_error(error: &lapin::Error, settings: &Settings) -> Option<SinkError> {
    let url = redact(&settings.url);
    let ErrorKind::ProtocolError(amqp) = error.kind() else {
        // Some brokers drop the connection after a failed login instead of saying why.
        return None;
    };
    let message = amqp.get_message();
    Some(match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            if message.as_str().contains("Login was refused") || message.as_str().contains("login") =>
        {
            SinkError::Connect(format!(
                "RabbitMQ at {url} refused the credentials: {message}. Fix: correct the user and password in sink.url"
            ))
        }
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => SinkError::Connect(format!(
            "RabbitMQ at {url}: {message}. Fix: grant the user access to the vhost (rabbitmqctl set_permissions -p \
             <vhost> <user> ...), or correct the vhost in sink.url"
        )),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => SinkError::Connect(format!(
            "RabbitMQ at {url}: {message}. Fix: grant the user configure permission on exchange {:?}, or declare it \
             yourself",
            settings.exchange
        )),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => SinkError::Connect(format!(
            "RabbitMQ: {message}. Fix: exchange {:?} exists with another type or durability; tailgate needs a durable \
             topic exchange: name another one in sink.exchange",
            settings.exchange
        )),
        _ => return None,
    })
}

fn missing_exchange(settings: &Settings) -> SinkError {
    SinkError::Connect(format!(
        "RabbitMQ exchange {:?} does not exist, and sink.declare_exchange = false. Fix: declare it (rabbitmqadmin \
         declare exchange name={} type=topic durable=true), or set sink.declare_exchange = true",
        settings.exchange, settings.exchange
    ))
}

/// `tailgate check`: broker reachable, credentials and vhost accepted, the exchange there (or
/// declarable). Changes nothing.
pub(crate) async fn check(settings: &Settings) -> Vec<CheckResult> {
    let url = redact(&settings.url);
    let connection = match connect(settings).await {
        Ok(Attempt::Done(c)) => c,
        Ok(Attempt::Retry(why)) => {
            return vec![CheckResult::failed(
                "rabbitmq",
                format!("{url} did not answer: {why}. Fix: start the broker or correct sink.url"),
            )];
        }
        Err(e) => return vec![CheckResult::failed("rabbitmq", e.to_string())],
    };
    let mut results = vec![CheckResult::ok("rabbitmq", format!("{url} accepted the credentials"))];
    let exchange = match ShortString::try_new(settings.exchange.clone()) {
        Ok(e) => e,
        Err(e) => {
            results.push(CheckResult::failed("exchange", format!("sink.exchange: {e}")));
            return results;
        }
    };
    match exchange_exists(&connection, &exchange).await {
        Ok(true) => results.push(CheckResult::ok("exchange", format!("{:?} exists", settings.exchange))),
        Ok(false) if settings.declare_exchange => results.push(CheckResult::ok(
            "exchange",
            format!(
                "{:?} does not exist yet; tailgate will declare it (durable, topic), which needs configure permission",
                settings.exchange
            ),
        )),
        Ok(false) => results.push(CheckResult::failed("exchange", missing_exchange(settings).to_string())),
        Err(e) => results.push(CheckResult::failed("exchange", format!("cannot look it up: {e}"))),
    }
    let _ = connection.close(200, ShortString::from("check done")).await;
    results
}
