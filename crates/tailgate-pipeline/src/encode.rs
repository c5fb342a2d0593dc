//! From events to Kafka records: topic naming, keys, envelopes and tombstones.
//!
//! Topics are named as Debezium names them: `<topic_prefix>.<schema>.<table>` for row changes and
//! `<topic_prefix>.message` for logical decoding messages. A delete is followed by a tombstone
//! (same key, null value) when `tombstones` is on, so that compacted topics drop the row.

use std::collections::HashMap;
use std::sync::Arc;

use tailgate_core::envelope::{self, Now};
use tailgate_core::{Event, FormatOptions, Op, TableId};

#[derive(Debug, Clone)]
pub struct EncoderOptions {
    pub topic_prefix: String,
    pub tombstones: bool,
    pub format: FormatOptions,
}

/// A record ready for a sink. Borrowed from the encoder's reusable buffers.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    /// `None` is a tombstone.
    pub value: Option<&'a [u8]>,
}

pub struct Encoder {
    opts: EncoderOptions,
    topics: HashMap<TableId, Arc<str>>,
    message_topic: Arc<str>,
    key: Vec<u8>,
    value: Vec<u8>,
    has_key: bool,
    now: Now,
}

impl Encoder {
    pub fn new(opts: EncoderOptions) -> Self {
        let message_topic = format!("{}.message", opts.topic_prefix).into();
        Encoder {
            opts,
            topics: HashMap::new(),
            message_topic,
            key: Vec::with_capacity(256),
            value: Vec::with_capacity(4096),
            has_key: false,
            now: Now::system(),
        }
    }

    /// Stamps the processing time (`ts_ms`) used for the events of the next batch.
    pub fn begin_batch(&mut self) {
        self.now = Now::system();
    }

    /// The topic an event goes to.
    pub fn topic_for(&mut self, event: &Event) -> Arc<str> {
        match event {
            Event::Change(change) => {
                if let Some(t) = self.topics.get(&change.table.id) {
                    return t.clone();
                }
                let topic: Arc<str> =
                    format!("{}.{}.{}", self.opts.topic_prefix, change.table.id.schema, change.table.id.table).into();
                self.topics.insert(change.table.id.clone(), topic.clone());
                topic
            }
            Event::Message(_) => self.message_topic.clone(),
        }
    }

    /// Renders `event` into the encoder's buffers; read them with [`Encoder::key`] and
    /// [`Encoder::value`] until the next call.
    pub fn prepare(&mut self, event: &Event) -> Prepared {
        let topic = self.topic_for(event);
        self.key.clear();
        self.value.clear();
        let has_key = envelope::write_key(event, &mut self.key);
        envelope::write_envelope(event, &self.opts.format, self.now, &mut self.value);
        self.has_key = has_key;
        let is_delete = matches!(event, Event::Change(c) if c.op == Op::Delete);
        // A tombstone without a key would be meaningless to compaction; Debezium skips it too.
        Prepared { topic, tombstone: is_delete && self.opts.tombstones && has_key }
    }

    /// The key rendered by the last [`Encoder::prepare`] (`None`: the table has no key).
    pub fn key(&self) -> Option<&[u8]> {
        self.has_key.then_some(self.key.as_slice())
    }

    /// The envelope rendered by the last [`Encoder::prepare`].
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// Calls `emit` once per record of `event` (twice for a delete followed by its tombstone).
    pub fn encode(&mut self, event: &Event, mut emit: impl FnMut(Record<'_>)) {
        let prepared = self.prepare(event);
        let key = self.key();
        emit(Record { topic: &prepared.topic, key, value: Some(&self.value) });
        if prepared.tombstone {
            emit(Record { topic: &prepared.topic, key, value: None });
        }
    }
}

/// What [`Encoder::prepare`] decided for an event.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub topic: Arc<str>,
    /// A tombstone (same key, null value) must follow the record.
    pub tombstone: bool,
}

#[cfg(test)]
mod tests {
    use tailgate_core::{ChangeEvent, ColumnSchema, PgSource, SourceInfo, TableSchema, Value};

    use super::*;

    fn delete_event() -> Event {
        Event::Change(ChangeEvent {
            op: Op::Delete,
            table: Arc::new(TableSchema {
                id: TableId { schema: "public".into(), table: "t".into() },
                columns: vec![ColumnSchema { name: "id".into(), key: true }],
            }),
            before: Some(vec![Value::Int(7)]),
            after: None,
            source: SourceInfo::Postgres(PgSource {
                name: "n".into(),
                db: "d".into(),
                commit_ts_us: 0,
                txid: 1,
                lsn: 1,
                last_commit_lsn: None,
                snapshot: "false",
            }),
        })
    }

    fn records(tombstones: bool) -> Vec<(String, Option<Vec<u8>>, bool)> {
        let mut enc =
            Encoder::new(EncoderOptions { topic_prefix: "shop".into(), tombstones, format: FormatOptions::default() });
        let mut out = Vec::new();
        enc.encode(&delete_event(), |r| out.push((r.topic.to_owned(), r.key.map(<[u8]>::to_vec), r.value.is_some())));
        out
    }

    #[test]
    fn delete_is_followed_by_tombstone_with_same_key() {
        let out = records(true);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, "shop.public.t");
        assert!(out[0].2);
        assert_eq!(out[1].1.as_deref(), Some(&br#"{"id":7}"#[..]));
        assert!(!out[1].2, "second record is a tombstone");
    }

    #[test]
    fn tombstones_can_be_turned_off() {
        assert_eq!(records(false).len(), 1);
    }
}
