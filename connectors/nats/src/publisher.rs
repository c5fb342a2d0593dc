//! The publisher task: owns the NATS connection, publishes records in order with a reply subject
//! per record, reads the PubAcks, and re-publishes what was not acknowledged after a failure.
//!
//! A JetStream publish is a core NATS publish whose reply subject receives the PubAck (or a 503 "no
//! responders" status when no stream is listening). Every record gets `<inbox>.<seq>` as its reply
//! subject; one subscription on `<inbox>.*` receives them all, so a PubAck names its record without
//! a request/response round trip per record. At most `max_in_flight` records wait for their PubAck.
//!
//! Order: records are published in the order handed over; after a failure (no PubAck within
//! `ack_timeout`, a 503 while JetStream restarts, a transient refusal, a lost connection) every
//! unacknowledged record is re-published, in order, once the stream answers again. A lost connection
//! is never resumed: its client logs in only once ([`crate::login`]), so what was queued in it dies
//! with it, and a fresh client publishes the unacknowledged records before anything newer.
//! JetStream drops those it had stored already (same `Nats-Msg-Id` within the duplicate window) and
//! acknowledges them as duplicates. On one
//! server JetStream stores publishes of one connection in order, and a lost connection loses a suffix
//! of them, so re-publishing keeps per-subject order. (In a cluster, a record refused during a leader
//! change while a later one was stored would be stored after it.)

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State as ConnState;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, HeaderMap, Message, StatusCode, Subject};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{FutureExt as _, StreamExt as _};
use serde::Deserialize;
use tailgate_pipeline::{CheckResult, SinkError};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::login::{Credentials, LoginOnce, login_once};
use crate::sink::{Outgoing, Shared};
use crate::subject::matches;
use crate::{HEADER_ROOM, Retention, Settings, Storage};

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A record published and not yet acknowledged.
struct InFlight {
    seq: u64,
    subject: Subject,
    reply: Subject,
    headers: HeaderMap,
    payload: Bytes,
    charge: u32,
    sent: Instant,
    acked: bool,
}

/// Why unacknowledged records are published again.
enum Trouble {
    Timeout,
    NoResponders,
    Refused(String),
    /// The connection died (its client is done: see [`crate::login`]).
    Lost,
}

impl fmt::Display for Trouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trouble::Timeout => write!(f, "no PubAck within the ack timeout (server away or slow)"),
            Trouble::NoResponders => write!(f, "no responders: JetStream is not answering for the stream yet"),
            Trouble::Refused(why) => write!(f, "JetStream refused a record for now: {why}"),
            Trouble::Lost => write!(f, "the connection to NATS was lost"),
        }
    }
}

/// One client's connection events, as it reports them from its own task.
#[derive(Default)]
struct Events {
    /// A server error retrying cannot fix (credentials, permissions), with its fix.
    fatal: Mutex<Option<String>>,
    /// The connection is gone (the client will not log in again).
    lost: AtomicBool,
    notify: Notify,
}

impl Events {
    fn on(&self, event: Event) {
        use async_nats::ServerError;
        let fatal = match event {
            Event::Disconnected => {
                warn!("NATS connection lost; connecting a fresh client (records wait, nothing is lost)");
                self.lost.store(true, Ordering::Release);
                self.notify.notify_one();
                None
            }
            Event::Connected => {
                debug!("NATS connected");
                None
            }
            Event::ServerError(ServerError::AuthorizationViolation) => Some(
                "NATS refused the credentials (authorization violation). Fix: correct sink.user and sink.password \
                 (or sink.token, sink.credentials_file), or the server's authorization"
                    .to_owned(),
            ),
            Event::ServerError(ServerError::Other(text)) if text.to_lowercase().contains("permissions violation") => {
                Some(format!(
                    "NATS refused: {text}. Fix: allow this user to publish to the stream's subjects and to \
                     $JS.API.>, and to subscribe to _INBOX.>"
                ))
            }
            Event::SlowConsumer(_) => {
                warn!("NATS dropped acknowledgements (slow consumer); the records concerned are published again");
                None
            }
            other => {
                debug!(event = %other, "NATS event");
                None
            }
        };
        if let Some(message) = fatal {
            self.fatal.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(message);
            self.notify.notify_one();
        }
    }

    fn check(&self) -> Result<(), SinkError> {
        match self.fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(message) => Err(SinkError::Connect(message)),
            None => Ok(()),
        }
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// What a step that may be retried gives: done, or a transient reason to try again.
enum Attempt<T> {
    Done(T),
    Retry(String),
}

/// Runs the publisher until the sink drops its channel (or aborts the task); a definite failure is
/// handed to the sink through `shared`.
pub(crate) async fn run(settings: Settings, mut rx: mpsc::Receiver<Outgoing>, shared: Arc<Shared>) {
    let outcome = match Publisher::start(settings, shared.clone()).await {
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
    credentials: Credentials,
    shared: Arc<Shared>,
    /// The current client's events, client, JetStream context and PubAck subscription: all replaced
    /// together when the connection is lost.
    events: Arc<Events>,
    client: Client,
    js: async_nats::jetstream::Context,
    acks: async_nats::Subscriber,
    /// `<inbox>.` — reply subjects are this plus the record's sequence number.
    reply_prefix: String,
    /// Reply subjects are written here and split off (one allocation per chunk).
    reply_buf: BytesMut,
    window: VecDeque<InFlight>,
    /// The stream's subject patterns, as the server last reported them.
    stream_subjects: Vec<String>,
    /// Subjects known to be covered by the stream.
    covered: HashSet<String>,
    trouble: Option<Trouble>,
    /// The current client is not the one the window's unacknowledged records went out on: they must
    /// be published again before anything newer goes out (until then new records only join the
    /// window). Set by every reconnect, cleared by the re-publication in [`Publisher::recover`].
    stale: bool,
    /// When the last fresh client connected, and the pause before the next one: a server that takes
    /// connections and drops them at once is not hammered.
    last_reconnect: Option<Instant>,
    reconnect_backoff: Duration,
    /// PubAcks that reported a duplicate, not yet passed on.
    duplicates: u64,
}

/// PubAck, or the JetStream error in its place.
#[derive(Deserialize)]
struct PubAck<'a> {
    #[serde(default)]
    duplicate: bool,
    #[serde(borrow)]
    error: Option<ApiError<'a>>,
}

#[derive(Deserialize)]
struct ApiError<'a> {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(borrow, default)]
    description: Option<std::borrow::Cow<'a, str>>,
}

impl Publisher {
    async fn start(settings: Settings, shared: Arc<Shared>) -> Result<Publisher, SinkError> {
        let credentials = Credentials::load(&settings)?;
        let (client, events) = connect_retrying(&settings, &credentials).await?;
        check_max_payload(&settings, client.server_info().max_payload)?;
        let js = async_nats::jetstream::new(client.clone());
        let reply_prefix = format!("{}.", client.new_inbox());
        let acks = subscribe_acks(&client, &reply_prefix).await?;
        let mut publisher = Publisher {
            settings,
            credentials,
            shared,
            events,
            client,
            js,
            acks,
            reply_prefix,
            reply_buf: BytesMut::with_capacity(64 * 1024),
            window: VecDeque::new(),
            stream_subjects: Vec::new(),
            covered: HashSet::new(),
            trouble: None,
            stale: false,
            last_reconnect: None,
            reconnect_backoff: MIN_BACKOFF,
            duplicates: 0,
        };
        publisher.stream_subjects = publisher.until_done("the stream", |p| Box::pin(p.ensure_stream())).await?;
        Ok(publisher)
    }

    /// Whether the current client's connection is gone (it will not come back: see [`crate::login`]).
    fn client_lost(&self) -> bool {
        self.events.lost() || self.client.connection_state() != ConnState::Connected
    }

    /// Replaces a client whose connection was lost by a fresh one, subscribed to the same reply
    /// subjects (records keep theirs when published again), and marks the window for re-publication.
    async fn reconnect(&mut self) -> Result<(), SinkError> {
        self.stale = true;
        if self.last_reconnect.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            tokio::time::sleep(self.reconnect_backoff).await;
            self.reconnect_backoff = (self.reconnect_backoff * 2).min(MAX_BACKOFF);
        } else {
            self.reconnect_backoff = MIN_BACKOFF;
        }
        if self.settings.auth.credentials_file.is_some() {
            // A renewed .creds file (a new JWT) is taken by the next client.
            match Credentials::load(&self.settings) {
                Ok(credentials) => self.credentials = credentials,
                Err(e) => warn!(error = %e, "NATS: keeping the credentials read before"),
            }
        }
        let (client, events) = connect_retrying(&self.settings, &self.credentials).await?;
        self.last_reconnect = Some(Instant::now());
        self.acks = subscribe_acks(&client, &self.reply_prefix).await?;
        self.js = async_nats::jetstream::new(client.clone());
        self.client = client;
        self.events = events;
        info!(url = %self.settings.url, "NATS connected again with a fresh client");
        Ok(())
    }

    /// Repeats `step` with backoff while it asks to retry (the sink gives up on its side after the
    /// drain timeout when the run is stopping, and aborts this task).
    async fn until_done<T>(
        &mut self,
        what: &str,
        mut step: impl for<'a> FnMut(
            &'a mut Publisher,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Attempt<T>, SinkError>> + Send + 'a>,
        >,
    ) -> Result<T, SinkError> {
        let mut backoff = MIN_BACKOFF;
        loop {
            self.events.check()?;
            if self.client_lost() {
                self.reconnect().await?;
            }
            if self.client.connection_state() == ConnState::Connected {
                match step(self).await? {
                    Attempt::Done(value) => return Ok(value),
                    Attempt::Retry(why) => warn!(error = %why, retry_in = ?backoff, "NATS: {what} not ready; retrying"),
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Looks the stream up, creating it when missing (if allowed); gives its subjects.
    async fn ensure_stream(&mut self) -> Result<Attempt<Vec<String>>, SinkError> {
        let name = &self.settings.stream;
        let error = match self.js.get_stream(name).await {
            Ok(stream) => {
                let config = &stream.cached_info().config;
                if config.duplicate_window.is_zero() {
                    warn!(stream = %name, "the stream has no duplicate window: re-sent records are stored twice");
                }
                return Ok(Attempt::Done(config.subjects.clone()));
            }
            Err(e) => e,
        };
        match error.kind() {
            GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND => {}
            GetStreamErrorKind::JetStream(e) => return jetstream_error(&e),
            GetStreamErrorKind::Request => return Ok(Attempt::Retry(jetstream_silent(&error))),
            // The connection died under the request: a fresh client tries again.
            _ if self.client_lost() => return Ok(Attempt::Retry(format!("looking the stream up: {error}"))),
            _ => return Err(SinkError::Config(format!("stream {name:?}: {error}. Fix: correct sink.stream"))),
        }
        if !self.settings.create_stream {
            return Err(missing_stream(&self.settings));
        }
        match self.js.create_stream(stream_config(&self.settings)).await {
            Ok(stream) => {
                let config = &stream.cached_info().config;
                info!(stream = %name, subjects = ?config.subjects, "JetStream stream created");
                Ok(Attempt::Done(config.subjects.clone()))
            }
            Err(e) => match e.kind() {
                CreateStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP => {
                    Err(SinkError::Connect(format!(
                        "cannot create stream {name:?}: its subjects {:?} overlap another stream's. Fix: set \
                         sink.subjects (and sink.topic_prefix) to subjects no other stream takes, or point \
                         sink.stream at the stream that takes them",
                        self.settings.subjects
                    )))
                }
                CreateStreamErrorKind::JetStream(err) => jetstream_error(&err),
                CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => {
                    Ok(Attempt::Retry(format!("creating the stream: {e}")))
                }
                _ if self.client_lost() => Ok(Attempt::Retry(format!("creating the stream: {e}"))),
                _ => Err(SinkError::Connect(format!("cannot create stream {name:?}: {e}"))),
            },
        }
    }

    /// Makes sure the stream takes `subject`: adds it to the stream's subjects when allowed.
    async fn cover(&mut self, subject: &Subject) -> Result<(), SinkError> {
        if self.stream_subjects.iter().any(|p| matches(p, subject)) {
            self.covered.insert(subject.to_string());
            return Ok(());
        }
        if !self.settings.create_stream {
            return Err(SinkError::Delivery {
                topic: subject.to_string(),
                reason: format!(
                    "stream {:?} does not take this subject (its subjects: {:?}), and sink.create_stream = false",
                    self.settings.stream, self.stream_subjects
                ),
                fix: "add a pattern covering the subject to the stream (nats stream edit <stream> --subjects ...) \
                      and to sink.subjects, or set sink.create_stream = true to let tailgate add it",
            });
        }
        let subject = subject.clone();
        self.stream_subjects = self
            .until_done("adding a subject to the stream", move |p| {
                let subject = subject.clone();
                Box::pin(async move { p.add_subject(&subject).await })
            })
            .await?;
        Ok(())
    }

    async fn add_subject(&mut self, subject: &Subject) -> Result<Attempt<Vec<String>>, SinkError> {
        let name = self.settings.stream.clone();
        let mut config = match self.js.get_stream(&name).await {
            Ok(stream) => stream.cached_info().config.clone(),
            Err(e) => {
                return match e.kind() {
                    GetStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                        // Deleted meanwhile: created again with the configured subjects.
                        self.ensure_stream().await
                    }
                    GetStreamErrorKind::JetStream(err) => jetstream_error(&err),
                    _ => Ok(Attempt::Retry(jetstream_silent(&e))),
                };
            }
        };
        if config.subjects.iter().any(|p| matches(p, subject)) {
            return Ok(Attempt::Done(config.subjects));
        }
        config.subjects.push(subject.to_string());
        match self.js.update_stream(&config).await {
            Ok(info) => {
                info!(stream = %name, subject = %subject, "subject added to the JetStream stream");
                Ok(Attempt::Done(info.config.subjects))
            }
            Err(e) => match e.kind() {
                CreateStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP => {
                    Err(SinkError::Delivery {
                        topic: subject.to_string(),
                        reason: format!("another stream takes this subject, so stream {name:?} cannot"),
                        fix: "route the topic to a subject under the stream's subjects ([[route]]), or remove the \
                              subject from the other stream",
                    })
                }
                CreateStreamErrorKind::JetStream(err) => jetstream_error(&err),
                _ => Ok(Attempt::Retry(format!("updating the stream: {e}"))),
            },
        }
    }

    async fn run(mut self, rx: &mut mpsc::Receiver<Outgoing>) -> Result<(), SinkError> {
        let mut closed = false;
        loop {
            // Publish what is waiting while the window has room.
            while !closed && self.window.len() < self.settings.max_in_flight {
                match rx.try_recv() {
                    Ok(out) => self.publish_new(out).await?,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            // Trouble first, before waiting: a client replaced on the way (while covering a subject)
            // leaves the window to re-publish, and its new client has nothing to wake us with.
            if self.stale {
                self.trouble = Some(Trouble::Lost);
            }
            if self.trouble.is_some() {
                // Recovery may fail again (the new client lost too): go on until it went through.
                while let Some(trouble) = self.trouble.take() {
                    self.recover(trouble).await?;
                }
                continue;
            }
            if closed && self.window.is_empty() {
                return Ok(());
            }
            let room = !closed && self.window.len() < self.settings.max_in_flight;
            let deadline = self.window.front().map(|r| r.sent + self.settings.ack_timeout);
            let far = Instant::now() + Duration::from_secs(3600);
            let wake = tokio::select! {
                biased;
                msg = self.acks.next() => Wake::Ack(msg),
                () = self.events.notify.notified() => Wake::Event,
                out = rx.recv(), if room => Wake::Record(out),
                () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => Wake::Timeout,
            };
            match wake {
                Wake::Ack(Some(msg)) => {
                    self.on_ack(&msg)?;
                    // Take every PubAck already there before releasing them together.
                    while let Some(Some(msg)) = self.acks.next().now_or_never() {
                        self.on_ack(&msg)?;
                    }
                    self.release();
                }
                // The client is done (it ends its subscriptions when its connection is lost).
                Wake::Ack(None) => {
                    self.trouble = Some(Trouble::Lost);
                }
                Wake::Event => {
                    self.events.check()?;
                    if self.events.lost() {
                        self.trouble = Some(Trouble::Lost);
                    }
                }
                Wake::Record(Some(out)) => self.publish_new(out).await?,
                Wake::Record(None) => closed = true,
                Wake::Timeout => {
                    self.trouble.get_or_insert(Trouble::Timeout);
                }
            }
            // Trouble raised here is handled at the top of the loop.
        }
    }

    async fn publish_new(&mut self, out: Outgoing) -> Result<(), SinkError> {
        if !self.covered.contains(out.subject.as_str()) {
            self.cover(&out.subject).await?;
        }
        self.reply_buf.put_slice(self.reply_prefix.as_bytes());
        self.reply_buf.put_slice(itoa::Buffer::new().format(out.seq).as_bytes());
        let reply = Subject::try_from(self.reply_buf.split().freeze())
            .map_err(|e| SinkError::Other(format!("reply subject: {e}")))?;
        if self.reply_buf.capacity() < 256 {
            self.reply_buf.reserve(64 * 1024);
        }
        let record = InFlight {
            seq: out.seq,
            subject: out.subject,
            reply,
            headers: out.headers,
            payload: out.payload,
            charge: out.charge,
            sent: Instant::now(),
            acked: false,
        };
        // While the window waits for re-publication, a new record only joins it: sent now, it could be
        // stored ahead of older records of its key.
        if !self.stale && !publish(&self.client, &record).await? {
            self.stale = true;
            self.trouble = Some(Trouble::Lost);
        }
        // In the window either way: a record not sent now is published with the rest, in order.
        self.window.push_back(record);
        Ok(())
    }

    fn on_ack(&mut self, msg: &Message) -> Result<(), SinkError> {
        let Some(seq) = msg.subject.strip_prefix(self.reply_prefix.as_str()).and_then(|s| s.parse::<u64>().ok()) else {
            return Ok(());
        };
        let Some(front) = self.window.front().map(|r| r.seq) else { return Ok(()) };
        // Older than the window: a second PubAck for a record acknowledged already.
        let Some(record) = seq.checked_sub(front).and_then(|i| self.window.get_mut(i as usize)) else {
            return Ok(());
        };
        if let Some(status) = msg.status {
            if status == StatusCode::NO_RESPONDERS {
                self.trouble.get_or_insert(Trouble::NoResponders);
            } else {
                self.trouble.get_or_insert(Trouble::Refused(format!(
                    "status {status} {}",
                    msg.description.as_deref().unwrap_or_default()
                )));
            }
            return Ok(());
        }
        let ack: PubAck<'_> = match serde_json::from_slice(&msg.payload) {
            Ok(ack) => ack,
            Err(e) => {
                let text = String::from_utf8_lossy(&msg.payload);
                self.trouble.get_or_insert(Trouble::Refused(format!("unreadable PubAck {text:?}: {e}")));
                return Ok(());
            }
        };
        let Some(error) = ack.error else {
            record.acked = true;
            if ack.duplicate {
                self.duplicates += 1;
                debug!(seq, "JetStream: duplicate dropped");
            }
            return Ok(());
        };
        let description = error.description.as_deref().unwrap_or("(no description)");
        let code = ErrorCode(error.err_code);
        let transient = error.code == 503
            || [
                ErrorCode::CLUSTER_NOT_AVAILABLE,
                ErrorCode::CLUSTER_NOT_LEADER,
                ErrorCode::STREAM_STORE_FAILED,
                ErrorCode::INSUFFICIENT_RESOURCES,
                ErrorCode::STORAGE_RESOURCES_EXCEEDED,
                ErrorCode::MEMORY_RESOURCES_EXCEEDED,
                ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
            ]
            .contains(&code);
        if transient {
            // A full stream (limits with discard = new) or storage: wait and publish again.
            self.trouble.get_or_insert(Trouble::Refused(format!("{description} (error code {})", error.err_code)));
            return Ok(());
        }
        let fix = match code {
            ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM => {
                "raise the stream's max_msg_size (nats stream edit), or lower sink.max_record_bytes so that larger \
                 records become dead letters"
            }
            ErrorCode::STREAM_SEALED => "the stream is sealed: point sink.stream at a writable stream",
            _ => {
                "check the stream's configuration and the server log; the run stopped without checkpointing past \
                  this record"
            }
        };
        Err(SinkError::Delivery {
            topic: record.subject.to_string(),
            reason: format!("JetStream refused the record: {description} (error code {})", error.err_code),
            fix,
        })
    }

    /// Hands the acknowledged prefix of the window back to the sink. (Records acknowledged behind an
    /// unacknowledged one wait: the tracker would hold their commit anyway.)
    fn release(&mut self) {
        let mut permits = 0usize;
        let mut first = None;
        let mut count = 0u64;
        while self.window.front().is_some_and(|r| r.acked) {
            if let Some(r) = self.window.pop_front() {
                first.get_or_insert(r.seq);
                count += 1;
                permits += r.charge as usize;
            }
        }
        if let Some(first) = first {
            self.shared.acked(first..first + count, permits, std::mem::take(&mut self.duplicates));
        }
    }

    /// Waits until the stream answers again, then publishes every unacknowledged record again, in order.
    async fn recover(&mut self, trouble: Trouble) -> Result<(), SinkError> {
        let unacked = self.window.iter().filter(|r| !r.acked).count();
        warn!(cause = %trouble, unacked, "NATS: publishing unacknowledged records again, in order");
        match trouble {
            Trouble::Timeout => {}
            // A fresh client first, unless one replaced the lost one already (the old one may not
            // log in again).
            Trouble::Lost if self.client_lost() => self.reconnect().await?,
            Trouble::Lost => {}
            // Refused or not answering right now: give JetStream a moment.
            Trouble::NoResponders | Trouble::Refused(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
        self.stream_subjects = self.until_done("the stream", |p| Box::pin(p.ensure_stream())).await?;
        // The stream may have been created afresh: subjects added before are added again.
        self.covered.clear();
        let subjects: Vec<Subject> = {
            let mut seen = HashSet::new();
            self.window.iter().filter(|r| seen.insert(r.subject.as_str())).map(|r| r.subject.clone()).collect()
        };
        for subject in &subjects {
            self.cover(subject).await?;
        }
        if self.client_lost() {
            // Lost again while getting the stream ready: start over with a fresh client.
            self.trouble = Some(Trouble::Lost);
            return Ok(());
        }
        self.stale = false;
        let now = Instant::now();
        for record in self.window.iter_mut().filter(|r| !r.acked) {
            record.sent = now;
            if !publish(&self.client, record).await? {
                // Lost again: everything from here on is published after the next reconnect.
                self.stale = true;
                self.trouble = Some(Trouble::Lost);
                break;
            }
        }
        Ok(())
    }
}

enum Wake {
    Ack(Option<Message>),
    Event,
    Record(Option<Outgoing>),
    Timeout,
}

/// Hands a record to the client: `false` when the client is done (its connection was lost).
async fn publish(client: &Client, record: &InFlight) -> Result<bool, SinkError> {
    let published = client
        .publish_with_reply_and_headers(
            record.subject.clone(),
            record.reply.clone(),
            record.headers.clone(),
            record.payload.clone(),
        )
        .await;
    let Err(e) = published else { return Ok(true) };
    use async_nats::client::PublishErrorKind;
    Err(match e.kind() {
        PublishErrorKind::Send => return Ok(false),
        PublishErrorKind::MaxPayloadExceeded => SinkError::Delivery {
            topic: record.subject.to_string(),
            reason: format!("the message is over the server's max_payload: {e}"),
            fix: "lower sink.max_record_bytes (larger records become dead letters) or raise max_payload on the server",
        },
        _ => SinkError::Delivery {
            topic: record.subject.to_string(),
            reason: format!("cannot publish: {e}"),
            fix: "check the subject and the server log",
        },
    })
}

fn stream_config(settings: &Settings) -> StreamConfig {
    StreamConfig {
        name: settings.stream.clone(),
        subjects: settings.subjects.clone(),
        retention: match settings.retention {
            Retention::Limits => RetentionPolicy::Limits,
            Retention::Interest => RetentionPolicy::Interest,
            Retention::Workqueue => RetentionPolicy::WorkQueue,
        },
        storage: match settings.storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        },
        num_replicas: settings.replicas,
        duplicate_window: settings.duplicate_window,
        max_age: settings.max_age,
        max_bytes: settings.max_bytes,
        description: Some("change events from tailgate".into()),
        ..StreamConfig::default()
    }
}

fn missing_stream(settings: &Settings) -> SinkError {
    SinkError::Connect(format!(
        "JetStream stream {:?} does not exist, and sink.create_stream = false. Fix: create it (nats stream add {} \
         --subjects {:?} --dupe-window {}s), or set sink.create_stream = true",
        settings.stream,
        settings.stream,
        settings.subjects.join(","),
        settings.duplicate_window.as_secs()
    ))
}

/// A JetStream API error: definite when it names a setup problem, else worth retrying.
fn jetstream_error<T>(e: &async_nats::jetstream::Error) -> Result<Attempt<T>, SinkError> {
    match e.error_code() {
        ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT => Err(SinkError::Connect(
            format!("{e}. Fix: enable JetStream on the server (nats-server -js) and for this account"),
        )),
        ErrorCode::CLUSTER_NOT_AVAILABLE | ErrorCode::CLUSTER_NOT_LEADER => Ok(Attempt::Retry(e.to_string())),
        _ if e.code() >= 500 => Ok(Attempt::Retry(e.to_string())),
        _ => Err(SinkError::Connect(format!("JetStream refused: {e}. Fix: check sink.stream and the stream settings"))),
    }
}

fn jetstream_silent(e: &dyn std::fmt::Display) -> String {
    format!(
        "JetStream does not answer ({e}); is JetStream enabled (nats-server -js) and may this user publish to \
         $JS.API.>?"
    )
}

fn check_max_payload(settings: &Settings, max_payload: usize) -> Result<(), SinkError> {
    if max_payload < settings.max_record_bytes + HEADER_ROOM {
        return Err(SinkError::Config(format!(
            "sink.max_record_bytes = {} but the server accepts at most {max_payload} bytes per message \
             (max_payload), {HEADER_ROOM} of which tailgate keeps for its headers. Fix: set sink.max_record_bytes \
             to at most {}, or raise max_payload on the server",
            settings.max_record_bytes,
            max_payload.saturating_sub(HEADER_ROOM)
        )));
    }
    Ok(())
}

/// The client's options: it logs in once ([`crate::login`]) and reports to `events`.
fn options(settings: &Settings, credentials: &Credentials, once: LoginOnce, events: &Arc<Events>) -> ConnectOptions {
    let events = events.clone();
    login_once(credentials.clone(), once)
        .name(&settings.client_name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        // PubAcks of a full window and of its re-publication fit without a slow-consumer drop.
        .subscription_capacity((settings.max_in_flight * 4).max(65_536))
        .event_callback(move |event| {
            let events = events.clone();
            async move { events.on(event) }
        })
}

/// Connects a fresh client, retrying with backoff while the server is unreachable.
async fn connect_retrying(settings: &Settings, credentials: &Credentials) -> Result<(Client, Arc<Events>), SinkError> {
    let mut backoff = MIN_BACKOFF;
    loop {
        match connect_once(settings, credentials).await? {
            Attempt::Done(connected) => return Ok(connected),
            Attempt::Retry(why) => {
                warn!(url = %settings.url, error = %why, retry_in = ?backoff, "NATS unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Subscribes to every reply subject: `<reply_prefix><seq>`.
async fn subscribe_acks(client: &Client, reply_prefix: &str) -> Result<async_nats::Subscriber, SinkError> {
    client
        .subscribe(format!("{reply_prefix}*"))
        .await
        .map_err(|e| SinkError::Other(format!("cannot subscribe to the acknowledgement inbox: {e}")))
}

async fn connect_once(
    settings: &Settings,
    credentials: &Credentials,
) -> Result<Attempt<(Client, Arc<Events>)>, SinkError> {
    let events = Arc::new(Events::default());
    let once = LoginOnce::default();
    let options = options(settings, credentials, once.clone(), &events);
    match options.connect(settings.url.as_str()).await {
        Ok(client) => {
            once.close();
            Ok(Attempt::Done((client, events)))
        }
        Err(e) => match e.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                Err(SinkError::Connect(format!(
                    "NATS at {} refused the credentials ({e}). Fix: correct sink.user and sink.password (or \
                     sink.token, sink.credentials_file)",
                    settings.url
                )))
            }
            ConnectErrorKind::ServerParse => Err(SinkError::Config(format!(
                "sink.url {:?}: {e}. Fix: write it like \"nats://127.0.0.1:4222\"",
                settings.url
            ))),
            ConnectErrorKind::Tls => Err(SinkError::Connect(format!(
                "TLS with NATS at {} failed: {e}. Fix: check the server's certificate",
                settings.url
            ))),
            _ => Ok(Attempt::Retry(e.to_string())),
        },
    }
}

/// `tailgate check`: server reachable, credentials accepted, JetStream enabled, the stream there (or
/// creatable). Changes nothing.
pub(crate) async fn check(settings: &Settings) -> Vec<CheckResult> {
    let credentials = match Credentials::load(settings) {
        Ok(credentials) => credentials,
        Err(e) => return vec![CheckResult::failed("nats", e.to_string())],
    };
    let (client, events) =
        match tokio::time::timeout(Duration::from_secs(10), connect_once(settings, &credentials)).await {
            Ok(Ok(Attempt::Done(connected))) => connected,
            Ok(Ok(Attempt::Retry(why))) => {
                return vec![CheckResult::failed(
                    "nats",
                    format!("{} did not answer: {why}. Fix: start the server or correct sink.url", settings.url),
                )];
            }
            Ok(Err(e)) => return vec![CheckResult::failed("nats", e.to_string())],
            Err(_) => {
                return vec![CheckResult::failed(
                    "nats",
                    format!("{} did not answer within 10s. Fix: start the server or correct sink.url", settings.url),
                )];
            }
        };
    let info = client.server_info();
    let mut results = vec![CheckResult::ok(
        "nats",
        format!("{} answered (server {}, max_payload {} bytes)", settings.url, info.version, info.max_payload),
    )];
    if let Err(e) = check_max_payload(settings, info.max_payload) {
        results.push(CheckResult::failed("nats", e.to_string()));
    }
    let js = async_nats::jetstream::new(client.clone());
    // The account's JetStream info, read loosely (its shape changes between server versions).
    match js.request::<_, _, serde_json::Value>("INFO", &()).await {
        Ok(info) if info.get("error").is_none() => results.push(CheckResult::ok(
            "jetstream",
            format!("enabled ({} stream(s) in the account)", info["streams"].as_u64().unwrap_or_default()),
        )),
        Ok(info) => {
            results.push(CheckResult::failed(
                "jetstream",
                format!(
                    "{}. Fix: enable JetStream on the server (nats-server -js) and for this account",
                    info["error"]["description"].as_str().unwrap_or("JetStream refused")
                ),
            ));
            return finish_check(results, &events);
        }
        Err(e) => {
            results.push(CheckResult::failed("jetstream", jetstream_silent(&e)));
            return finish_check(results, &events);
        }
    }
    let name = &settings.stream;
    match js.get_stream(name).await {
        Ok(stream) => {
            let config = &stream.cached_info().config;
            let detail = format!(
                "{name:?} exists (subjects {:?}, duplicate window {}s, {} replica(s))",
                config.subjects,
                config.duplicate_window.as_secs(),
                config.num_replicas
            );
            if config.duplicate_window.is_zero() {
                results.push(CheckResult::warn(
                    "stream",
                    format!("{detail}: no duplicate window, so re-sent records are stored twice"),
                ));
            } else {
                results.push(CheckResult::ok("stream", detail));
            }
        }
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                if settings.create_stream {
                    results.push(CheckResult::ok(
                        "stream",
                        format!(
                            "{name:?} does not exist yet; tailgate will create it with subjects {:?}",
                            settings.subjects
                        ),
                    ));
                } else {
                    results.push(CheckResult::failed("stream", missing_stream(settings).to_string()));
                }
            }
            _ => results.push(CheckResult::failed("stream", format!("cannot look up stream {name:?}: {e}"))),
        },
    }
    finish_check(results, &events)
}

fn finish_check(mut results: Vec<CheckResult>, events: &Events) -> Vec<CheckResult> {
    if let Err(e) = events.check() {
        results.push(CheckResult::failed("nats permissions", e.to_string()));
    }
    results
}
