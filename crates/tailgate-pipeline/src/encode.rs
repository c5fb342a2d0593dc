//! From sink items to record bytes: Debezium envelopes, keys, tombstones, and dead letters for
//! records too large to deliver.
//!
//! Topics are decided upstream by the transform stage. A delete is followed by a tombstone (same
//! key, null value) when `tombstones` is on, so that compacted topics drop the row. Rendering writes
//! into buffers reused from record to record.

use std::sync::Arc;

use tailgate_core::envelope::{Now, Renderer};
use tailgate_core::{Event, FormatOptions, Op};

use crate::sink::{SinkError, SinkItem};
use crate::transform::dead_letter;

#[derive(Debug, Clone)]
pub struct EncoderOptions {
    pub tombstones: bool,
    pub format: FormatOptions,
    /// Records whose key and value exceed this go to `dead_letter_topic` instead (Kafka would refuse
    /// them for good). `None`: no limit.
    pub max_record_bytes: Option<usize>,
    pub dead_letter_topic: Arc<str>,
    /// `[dead_letter] on_error = "stop"`: a record too large fails the run instead of becoming a
    /// dead letter.
    pub stop_on_dead_letter: bool,
}

/// A record ready for a sink. Borrowed from the encoder's reusable buffers.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    /// `None` is a tombstone.
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
}

/// What [`Encoder::prepare`] decided for an item.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub topic: Arc<str>,
    /// A tombstone (same key, null value) must follow the record.
    pub tombstone: bool,
    /// The record is a dead letter (counted by the sink).
    pub dead_letter: bool,
    /// Key and value were produced upstream (outbox, dead letters): not necessarily JSON.
    pub raw: bool,
    /// The record replaces one too large to deliver.
    pub oversized: bool,
}

pub struct Encoder {
    opts: EncoderOptions,
    key: Vec<u8>,
    value: Vec<u8>,
    has_key: bool,
    has_value: bool,
    headers: Vec<(String, Vec<u8>)>,
    now: Now,
    renderer: Renderer,
    /// The topic and size of the last record found too large (for the error under `stop`).
    intended: String,
    oversize_bytes: usize,
    /// The last record's id (see [`Encoder::record_id`]).
    id: String,
    /// Records rendered since the last commit: the index of the next one in its transaction.
    txn_index: u64,
}

impl Encoder {
    pub fn new(opts: EncoderOptions) -> Self {
        Encoder {
            opts,
            key: Vec::with_capacity(256),
            value: Vec::with_capacity(4096),
            has_key: false,
            has_value: true,
            headers: Vec::new(),
            now: Now::system(),
            renderer: Renderer::default(),
            intended: String::new(),
            oversize_bytes: 0,
            id: String::with_capacity(64),
            txn_index: 0,
        }
    }

    /// Stamps the processing time (`ts_ms`) used for the events of the next batch.
    /// The processing time of the current batch, milliseconds since the epoch (the records' timestamp).
    pub fn batch_time_ms(&self) -> i64 {
        self.now.unix_micros / 1000
    }

    pub fn begin_batch(&mut self) {
        self.now = Now::system();
    }

    /// Renders a `Change` or `Raw` item into the encoder's buffers; read them with [`Encoder::key`],
    /// [`Encoder::value`] and [`Encoder::headers`] until the next call. `None` for commits. An error
    /// only for a record too large under `on_error = "stop"`.
    pub fn prepare(&mut self, item: &SinkItem) -> Result<Option<Prepared>, SinkError> {
        let prepared = self.prepare_record(item);
        match &prepared {
            Some(p) if p.dead_letter && p.oversized && self.opts.stop_on_dead_letter => Err(SinkError::Delivery {
                topic: self.intended.clone(),
                reason: format!(
                    "a record of {} bytes is over the limit of {} bytes, and [dead_letter] on_error = \"stop\" halts \
                     before it (nothing after it is delivered)",
                    self.oversize_bytes,
                    self.opts.max_record_bytes.unwrap_or_default()
                ),
                fix: "raise the limit (message.max.bytes in [sink.librdkafka] and on the broker), exclude the large \
                      column, or set on_error = \"continue\" to dead-letter such records",
            }),
            _ => Ok(prepared),
        }
    }

    /// A deterministic id of the record [`Encoder::prepare`] rendered last, the same whenever the
    /// record is sent again (after a crash the stream resumes at a transaction's start and renders
    /// its records in the same order): destinations with a de-duplication window (JetStream's
    /// `Nats-Msg-Id`, an idempotency key) drop the repeats. A change: its source position and its
    /// index in the transaction (PostgreSQL `lsn 0/16B3748/3`, MySQL `binlog.000003:4711:0/3`); a
    /// snapshot read: its table and key; an outbox record: its event id (the `id` header); a dead
    /// letter: its source position and index, marked `dlq`. The tombstone after a delete adds `/t`.
    pub fn record_id(&self) -> &str {
        &self.id
    }

    fn set_id(&mut self, item: &SinkItem, index: u64) {
        use std::fmt::Write as _;
        self.id.clear();
        match item {
            SinkItem::Change { topic, event } => {
                let source = event.source();
                let snapshot = match source {
                    tailgate_core::SourceInfo::Postgres(pg) => pg.snapshot != "false",
                    tailgate_core::SourceInfo::Mysql(my) => my.snapshot != "false",
                };
                if snapshot {
                    // Snapshot reads share one position: the row's key names them (a resumed
                    // snapshot starts at another row, so an index would not be stable).
                    let _ = write!(self.id, "{topic}/snapshot/{}", String::from_utf8_lossy(&self.key));
                } else {
                    let _ = match source {
                        tailgate_core::SourceInfo::Postgres(pg) => {
                            write!(self.id, "{topic}/lsn {}/{index}", tailgate_core::Lsn(pg.lsn))
                        }
                        tailgate_core::SourceInfo::Mysql(my) => {
                            write!(self.id, "{topic}/{}:{}:{}/{index}", my.file, my.pos, my.row)
                        }
                    };
                }
            }
            SinkItem::Raw(record) => {
                let header = |name: &str| record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
                match (record.dead_letter, header("id")) {
                    (false, Some(id)) => self.id.push_str(&String::from_utf8_lossy(id)),
                    _ => {
                        let _ = write!(self.id, "{}/dlq", record.topic);
                        for (k, v) in &record.headers {
                            if let Some(name) = k.strip_prefix("tailgate.source.") {
                                let _ = write!(self.id, " {name}={}", String::from_utf8_lossy(v));
                            }
                        }
                        let _ = write!(self.id, "/{index}");
                    }
                }
            }
            SinkItem::Commit(_) | SinkItem::DeadLetters(_) => {}
        }
    }

    fn prepare_record(&mut self, item: &SinkItem) -> Option<Prepared> {
        self.key.clear();
        self.value.clear();
        self.headers.clear();
        if let SinkItem::Change { .. } | SinkItem::Raw(_) = item {
            let index = self.txn_index;
            self.txn_index += 1;
            // The key is rendered below; snapshot ids need it, so the id is set after it.
            let prepared = self.prepare_inner(item);
            self.set_id(item, index);
            return prepared;
        }
        if let SinkItem::Commit(_) = item {
            self.txn_index = 0;
        }
        self.prepare_inner(item)
    }

    fn prepare_inner(&mut self, item: &SinkItem) -> Option<Prepared> {
        let prepared = match item {
            SinkItem::Commit(_) => return None,
            SinkItem::DeadLetters(policy) => {
                self.opts.dead_letter_topic = policy.topic.clone();
                self.opts.stop_on_dead_letter = policy.stop;
                return None;
            }
            SinkItem::Change { topic, event } => {
                self.has_key = self.renderer.write_key(event, &self.opts.format, &mut self.key);
                // Far over the limit before rendering (a 1 GB value): never render it at all.
                if let (Some(max), Event::Change(change)) = (self.opts.max_record_bytes, event) {
                    let at_least = change.min_json_len();
                    if at_least > max {
                        return Some(self.oversized_dead_letter(topic, event, at_least));
                    }
                }
                self.renderer.write_envelope(event, &self.opts.format, self.now, &mut self.value);
                self.has_value = true;
                let is_delete = matches!(event, Event::Change(c) if c.op == Op::Delete);
                // A tombstone without a key would be meaningless to compaction; Debezium skips it too.
                let tombstone = is_delete && self.opts.tombstones && self.has_key;
                if self.oversized() {
                    let size = self.key.len() + self.value.len();
                    return Some(self.oversized_dead_letter(topic, event, size));
                }
                Prepared { topic: topic.clone(), tombstone, dead_letter: false, raw: false, oversized: false }
            }
            SinkItem::Raw(record) => {
                self.has_key = record.key.is_some();
                self.key.extend_from_slice(record.key.as_deref().unwrap_or_default());
                self.has_value = record.value.is_some();
                self.value.extend_from_slice(record.value.as_deref().unwrap_or_default());
                self.headers.extend(record.headers.iter().cloned());
                if self.oversized() {
                    // Too large for its topic, or a dead letter too large for the dead-letter topic
                    // (its payload is the row): the record is replaced by a description of it, which
                    // fits, and goes to the dead-letter topic with the cause in its headers.
                    let size = self.record_size();
                    self.value.clear();
                    self.value.extend_from_slice(self.oversize_description(&record.topic, size).as_bytes());
                    self.has_value = true;
                    if !record.dead_letter {
                        self.headers.push(("tailgate.error.cause".into(), b"record too large".to_vec()));
                        self.headers.push(("tailgate.error.topic".into(), record.topic.as_bytes().to_vec()));
                    }
                    self.truncate_headers();
                    self.note_oversize(&record.topic, size);
                    return Some(Prepared {
                        topic: self.opts.dead_letter_topic.clone(),
                        tombstone: false,
                        dead_letter: true,
                        raw: true,
                        oversized: true,
                    });
                }
                Prepared {
                    topic: record.topic.clone(),
                    tombstone: false,
                    dead_letter: record.dead_letter,
                    raw: true,
                    oversized: false,
                }
            }
        };
        Some(prepared)
    }

    /// Key, value and headers: what the broker counts against its record size limit.
    fn record_size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.key.len() + self.value.len() + headers
    }

    fn oversized(&self) -> bool {
        self.opts.max_record_bytes.is_some_and(|max| self.record_size() > max)
    }

    /// Header values of a replacement record are cut to 1 KiB each, so that it always fits.
    fn truncate_headers(&mut self) {
        for (_, v) in &mut self.headers {
            v.truncate(1024);
        }
    }

    fn oversize_description(&self, topic: &str, size: usize) -> String {
        serde_json::json!({
            "cause": "record too large",
            "topic": topic,
            "size": size,
            "limit": self.opts.max_record_bytes,
        })
        .to_string()
    }

    /// Replaces an oversized envelope by a small dead letter describing it (the original cannot be
    /// delivered anywhere); the key and the source position identify the row.
    fn note_oversize(&mut self, topic: &str, size: usize) {
        self.intended = topic.to_owned();
        self.oversize_bytes = size;
    }

    fn oversized_dead_letter(&mut self, topic: &Arc<str>, event: &Event, size: usize) -> Prepared {
        self.note_oversize(topic, size);
        let description = self.oversize_description(topic, size);
        let letter = dead_letter(
            &self.opts.dead_letter_topic,
            None,
            Some(description.into_bytes()),
            "record too large",
            topic,
            event.source(),
        );
        self.value.clear();
        self.value.extend_from_slice(letter.value.as_deref().unwrap_or_default());
        self.has_value = true;
        self.headers = letter.headers;
        Prepared { topic: letter.topic, tombstone: false, dead_letter: true, raw: true, oversized: true }
    }

    /// The key rendered by the last [`Encoder::prepare`] (`None`: no key).
    pub fn key(&self) -> Option<&[u8]> {
        self.has_key.then_some(self.key.as_slice())
    }

    /// The value rendered by the last [`Encoder::prepare`] (`None`: a null value).
    pub fn value(&self) -> Option<&[u8]> {
        self.has_value.then_some(self.value.as_slice())
    }

    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// Calls `emit` once per record of `item` (twice for a delete followed by its tombstone).
    pub fn encode(&mut self, item: &SinkItem, mut emit: impl FnMut(Record<'_>, &Prepared)) -> Result<(), SinkError> {
        let Some(prepared) = self.prepare(item)? else { return Ok(()) };
        let key = self.key();
        emit(Record { topic: &prepared.topic, key, value: self.value(), headers: &self.headers }, &prepared);
        if prepared.tombstone {
            emit(Record { topic: &prepared.topic, key, value: None, headers: &[] }, &prepared);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tailgate_core::{ChangeEvent, ColumnSchema, PgSourceBlock, SourceInfo, TableId, TableSchema, Value};

    use crate::sink::{DeadLetterPolicy, RawRecord};

    use super::*;

    fn delete_event(note: &str) -> SinkItem {
        SinkItem::Change {
            topic: "shop.public.t".into(),
            event: Event::Change(ChangeEvent {
                op: Op::Delete,
                table: Arc::new(TableSchema {
                    id: TableId { schema: "public".into(), table: "t".into() },
                    columns: vec![
                        ColumnSchema { name: "id".into(), key: true },
                        ColumnSchema { name: "note".into(), key: false },
                    ],
                }),
                before: Some(vec![Value::Int(7), Value::String(note.into())]),
                after: None,
                source: SourceInfo::Postgres(PgSourceBlock {
                    name: "n".into(),
                    db: "d".into(),
                    commit_ts_us: 0,
                    txid: 1,
                    lsn: 1,
                    last_commit_lsn: None,
                    snapshot: "false",
                }),
            }),
        }
    }

    fn encoder(tombstones: bool, max: Option<usize>) -> Encoder {
        Encoder::new(EncoderOptions {
            tombstones,
            format: FormatOptions::default(),
            max_record_bytes: max,
            dead_letter_topic: "shop.dlq".into(),
            stop_on_dead_letter: false,
        })
    }

    /// (topic, key, has value, header names)
    type Rendered = (String, Option<Vec<u8>>, bool, Vec<String>);

    fn records(enc: &mut Encoder, item: &SinkItem) -> Vec<Rendered> {
        let mut out = Vec::new();
        let _ = enc.encode(item, |r, _| {
            out.push((
                r.topic.to_owned(),
                r.key.map(<[u8]>::to_vec),
                r.value.is_some(),
                r.headers.iter().map(|(k, _)| k.clone()).collect(),
            ))
        });
        out
    }

    #[test]
    fn delete_is_followed_by_tombstone_with_same_key() {
        let out = records(&mut encoder(true, None), &delete_event("x"));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, "shop.public.t");
        assert!(out[0].2);
        assert_eq!(out[1].1.as_deref(), Some(&br#"{"id":7}"#[..]));
        assert!(!out[1].2, "second record is a tombstone");
    }

    #[test]
    fn tombstones_can_be_turned_off() {
        assert_eq!(records(&mut encoder(false, None), &delete_event("x")).len(), 1);
    }

    #[test]
    fn oversized_record_becomes_a_dead_letter_with_cause_and_position() {
        let mut enc = encoder(true, Some(600));
        let out = records(&mut enc, &delete_event(&"x".repeat(1000)));
        assert_eq!(out.len(), 1, "no tombstone for a dead letter");
        assert_eq!(out[0].0, "shop.dlq");
        for h in ["tailgate.error.cause", "tailgate.error.topic", "tailgate.source.lsn"] {
            assert!(out[0].3.iter().any(|k| k == h), "missing header {h}: {:?}", out[0].3);
        }
        assert!(enc.value().unwrap().len() < 600);
        // Small records pass.
        assert_eq!(records(&mut enc, &delete_event("x"))[0].0, "shop.public.t");
    }

    /// A value far over the limit is dead-lettered without being rendered: the encoder's buffers
    /// never grow to its size.
    #[test]
    fn a_huge_value_is_dead_lettered_without_rendering_it() {
        let mut enc = encoder(true, Some(1 << 20));
        let out = records(&mut enc, &delete_event(&"x".repeat(64 << 20)));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "shop.dlq");
        assert!(enc.value.capacity() < 1 << 20, "rendered {} bytes", enc.value.capacity());
        let text = String::from_utf8_lossy(&enc.value).into_owned();
        assert!(text.contains("record too large"), "{text}");
    }

    /// A dead letter is size-checked too, headers counted: one too large for the dead-letter topic
    /// is replaced by its description (it would otherwise stop the connector on every restart).
    #[test]
    fn an_oversized_dead_letter_is_replaced_by_its_description() {
        let mut enc = encoder(true, Some(2000));
        let letter = RawRecord {
            topic: "outbox.event.order".into(),
            key: Some(b"42".to_vec()),
            value: Some(vec![b'p'; 1500]),
            headers: vec![
                ("tailgate.error.cause".into(), b"payload is not JSON".to_vec()),
                ("big".into(), vec![b'h'; 4000]),
            ],
            dead_letter: true,
        };
        let out = records(&mut enc, &SinkItem::Raw(letter));
        assert_eq!(out[0].0, "shop.dlq");
        assert!(enc.record_size() <= 2000, "{} bytes", enc.record_size());
        assert!(String::from_utf8_lossy(&enc.value).contains("record too large"));
        assert!(out[0].3.iter().any(|k| k == "tailgate.error.cause"));
    }

    /// A reload's dead-letter topic applies to oversized records from the item on.
    #[test]
    fn the_dead_letter_topic_follows_a_reload() {
        let mut enc = encoder(true, Some(600));
        let policy = |stop| SinkItem::DeadLetters(DeadLetterPolicy { topic: "shop.dlq2".into(), stop });
        assert!(records(&mut enc, &policy(false)).is_empty());
        let out = records(&mut enc, &delete_event(&"x".repeat(1000)));
        assert_eq!(out[0].0, "shop.dlq2");
        // on_error = "stop": the run fails before the record, naming the limit and the fix.
        assert!(records(&mut enc, &policy(true)).is_empty());
        let err = enc.prepare(&delete_event(&"x".repeat(1000))).unwrap_err().to_string();
        assert!(err.contains("over the limit of 600 bytes") && err.contains("on_error"), "{err}");
        assert!(enc.prepare(&delete_event("small")).unwrap().is_some(), "records that fit still go");
    }

    /// Record ids are the same whenever a transaction is rendered again, and distinct within it.
    #[test]
    fn record_ids_are_deterministic_and_distinct() {
        let mut enc = encoder(true, None);
        let mut ids = Vec::new();
        let commit = SinkItem::Commit(crate::sink::Checkpoint {
            seq: 1,
            position: tailgate_core::Position::postgres(tailgate_core::Lsn(9)),
        });
        for _ in 0..2 {
            for item in [&delete_event("a"), &delete_event("b"), &commit] {
                if enc.prepare(item).unwrap().is_some() {
                    ids.push(enc.record_id().to_owned());
                }
            }
        }
        assert_eq!(
            ids,
            [
                "shop.public.t/lsn 0/1/0",
                "shop.public.t/lsn 0/1/1",
                "shop.public.t/lsn 0/1/0",
                "shop.public.t/lsn 0/1/1"
            ]
        );
        let outbox = RawRecord {
            topic: "outbox.event.order".into(),
            key: Some(b"42".to_vec()),
            value: Some(b"{}".to_vec()),
            headers: vec![("id".into(), b"e-17".to_vec())],
            dead_letter: false,
        };
        enc.prepare(&SinkItem::Raw(outbox)).unwrap();
        assert_eq!(enc.record_id(), "e-17", "an outbox record is named by its event id");
    }
}
