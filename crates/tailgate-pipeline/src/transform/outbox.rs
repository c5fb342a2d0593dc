//! The transactional outbox router (Debezium's EventRouter): an outbox table's insert, or a
//! logical decoding message with the outbox prefix, becomes one record on the topic its template
//! names, keyed by the aggregate id, valued by the payload, with the event id in the `id` header.

use std::collections::HashMap;
use std::sync::Arc;

use tailgate_core::envelope::{DecimalHandling, ValueFormat, write_value};
use tailgate_core::{ChangeEvent, LogicalMessage, Op, SourceInfo, TableSchema, Value};
use tracing::{error, warn};

use super::columns::value_text;
use super::dead_letter::dead_letter;
use super::rules::{OnInvalid, OutboxRule, Placement, valid_topic};
use super::{TransformCounts, TransformError, Transformer};
use crate::sink::{RawRecord, SinkItem};

#[derive(Debug)]
pub(crate) struct OutboxColumns {
    pub(crate) rule: usize,
    pub(crate) id: Option<usize>,
    pub(crate) aggregate_type: Option<usize>,
    pub(crate) aggregate_id: Option<usize>,
    pub(crate) payload: Option<usize>,
    pub(crate) columns: HashMap<String, usize>,
    /// Configured columns the table lacks: a config error, reported at the table's first event.
    pub(crate) missing: Option<String>,
}

/// The configured columns `table` does not have, as an error message naming keys and the fix.
pub(crate) fn missing_columns(rule: &OutboxRule, index: usize, table: &TableSchema) -> Option<String> {
    let names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
    missing_of(rule, index, &names)
}

fn missing_of(rule: &OutboxRule, index: usize, names: &[&str]) -> Option<String> {
    let missing: Vec<String> = rule
        .columns(index)
        .into_iter()
        .filter(|(_, column)| !names.contains(column))
        .map(|(key, column)| format!("`{key}` = {column:?}"))
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "config error: the outbox table has no column for {} (its columns: {}). Fix: correct the config, then \
         reload (SIGHUP) or restart; nothing of this table is delivered until then",
        missing.join(", "),
        names.join(", ")
    ))
}

impl super::Rules {
    /// The outbox tables the rules name (`schema.table`).
    pub fn outbox_tables(&self) -> impl Iterator<Item = &str> {
        self.outboxes.iter().filter_map(|o| o.table.as_deref())
    }

    /// What is wrong with the outbox rule of `table` given the table's `columns`, if anything (see
    /// [`Rules::outbox_tables`]): checked at start and on reload, before any event.
    pub fn missing_outbox_columns(&self, table: &str, columns: &[String]) -> Option<String> {
        let index = self.outboxes.iter().position(|o| o.table.as_deref() == Some(table))?;
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        missing_of(&self.outboxes[index], index, &names)
    }
}

impl Transformer {
    pub(super) fn outbox_change(
        &self,
        cols: &OutboxColumns,
        change: &ChangeEvent,
        out: &mut Vec<SinkItem>,
        counts: &mut TransformCounts,
    ) -> Result<(), TransformError> {
        let rule = &self.rules.outboxes[cols.rule];
        if let Some(message) = &cols.missing {
            return Err(TransformError { table: change.table.id.to_string(), message: message.clone() });
        }
        match change.op {
            Op::Create | Op::Read => {}
            // The recommended pattern inserts and deletes in one transaction: deletes are ignored.
            Op::Delete | Op::Truncate => return Ok(()),
            Op::Update => {
                let message = "an UPDATE of an outbox row (outbox rows are insert-only); the update is not published";
                return match rule.on_update {
                    OnInvalid::Warn => {
                        warn!(table = %change.table.id, "{message}");
                        Ok(())
                    }
                    OnInvalid::Error => {
                        error!(table = %change.table.id, "{message}");
                        Ok(())
                    }
                    OnInvalid::Fatal => {
                        Err(TransformError { table: change.table.id.to_string(), message: message.into() })
                    }
                };
            }
        }
        let Some(row) = &change.after else { return Ok(()) };
        let text = |i: Option<usize>| i.and_then(|i| value_text(&row[i]));
        let fields = OutboxFields {
            id: text(cols.id),
            aggregate_type: text(cols.aggregate_type),
            aggregate_id: text(cols.aggregate_id),
            payload: cols.payload.map(|i| payload_bytes(&row[i])).unwrap_or(None),
            lookup: &|name: &str| cols.columns.get(name).and_then(|&i| value_json(&row[i])),
        };
        let record = build_outbox(rule, &fields, &change.source, &self.rules.dead_letter_topic);
        self.push_outbox(record, &change.table.id.to_string(), out, counts)
    }

    /// Counts and pushes an outbox record, or stops before a dead letter (`on_error = "stop"`).
    fn push_outbox(
        &self,
        record: RawRecord,
        table: &str,
        out: &mut Vec<SinkItem>,
        counts: &mut TransformCounts,
    ) -> Result<(), TransformError> {
        if record.dead_letter && self.rules.dead_letter_stop {
            return Err(stop_before(&record, table));
        }
        counts.outbox += 1;
        if record.dead_letter {
            counts.dead_lettered += 1;
        }
        out.push(SinkItem::Raw(record));
        Ok(())
    }

    pub(super) fn outbox_message(
        &mut self,
        rule_index: usize,
        m: &LogicalMessage,
        out: &mut Vec<SinkItem>,
        counts: &mut TransformCounts,
    ) -> Result<(), TransformError> {
        let rule = &self.rules.outboxes[rule_index];
        let table = format!("logical messages with prefix {:?}", m.prefix);
        let parsed: Result<serde_json::Map<String, serde_json::Value>, _> = serde_json::from_slice(&m.content);
        let Ok(object) = parsed else {
            let letter = dead_letter(
                &self.rules.dead_letter_topic,
                None,
                Some(m.content.clone()),
                "outbox message content is not a JSON object",
                &rule.topic,
                &m.source,
            );
            return self.push_outbox(letter, &table, out, counts);
        };
        let text = |name: &str| {
            object.get(name).and_then(|v| match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            })
        };
        let payload = object.get(&rule.payload).and_then(|v| match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone().into_bytes()),
            other => Some(other.to_string().into_bytes()),
        });
        let fields = OutboxFields {
            id: text(&rule.id),
            aggregate_type: text(&rule.aggregate_type),
            aggregate_id: text(&rule.aggregate_id),
            payload,
            lookup: &|name: &str| object.get(name).cloned().filter(|v| !v.is_null()),
        };
        let record = build_outbox(rule, &fields, &m.source, &self.rules.dead_letter_topic);
        self.push_outbox(record, &table, out, counts)
    }
}

/// The error that halts the run before an undeliverable record (`[dead_letter] on_error = "stop"`).
fn stop_before(record: &RawRecord, table: &str) -> TransformError {
    let header = |name: &str| {
        record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let position: Vec<String> = record
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("tailgate.source."))
        .map(|(k, v)| format!("{}={}", &k["tailgate.source.".len()..], String::from_utf8_lossy(v)))
        .collect();
    TransformError {
        table: table.to_owned(),
        message: format!(
            "a record cannot be delivered ({}; meant for topic {}; at {}), and [dead_letter] on_error = \"stop\" \
             halts before it: nothing after it is delivered. Fix: correct the row at its source (then skip past it \
             with `tailgate offsets reset`), or set on_error = \"continue\" to send it to the dead-letter topic",
            header("tailgate.error.cause").unwrap_or_default(),
            header("tailgate.error.topic").unwrap_or_default(),
            position.join(" "),
        ),
    }
}

struct OutboxFields<'a> {
    id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    payload: Option<Vec<u8>>,
    lookup: &'a dyn Fn(&str) -> Option<serde_json::Value>,
}

fn build_outbox(rule: &OutboxRule, f: &OutboxFields<'_>, source: &SourceInfo, dlq: &Arc<str>) -> RawRecord {
    let key = f.aggregate_id.clone().map(String::into_bytes);
    // Topic from the template.
    let mut topic = String::new();
    let mut rest = rule.topic.as_str();
    while let Some(start) = rest.find("${") {
        topic.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else { break };
        let name = &rest[start + 2..start + end];
        let value = if name == "routedByValue" {
            f.aggregate_type.clone()
        } else {
            (f.lookup)(name).map(|v| match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            })
        };
        topic.push_str(&value.unwrap_or_default());
        rest = &rest[start + end + 1..];
    }
    topic.push_str(rest);
    // A NULL where the router needs a value: never a keyless record spread over partitions (per-
    // aggregate order lost), never a record on `outbox.event.`, never a silent tombstone.
    let null = if f.id.is_none() {
        Some("outbox event id is NULL")
    } else if f.aggregate_id.is_none() {
        Some("outbox aggregate id is NULL")
    } else if f.aggregate_type.is_none() && rule.routes_by_aggregate_type() {
        Some("outbox aggregate type is NULL")
    } else if f.payload.is_none() && !rule.null_payload_tombstone {
        Some("outbox payload is NULL (null_payload = \"tombstone\" publishes it as a tombstone)")
    } else {
        None
    };
    if let Some(cause) = null {
        return dead_letter(dlq, key, f.payload.clone(), cause, &topic, source);
    }
    if !valid_topic(&topic) {
        return dead_letter(
            dlq,
            key,
            f.payload.clone(),
            "outbox topic is not a valid Kafka topic name",
            &topic,
            source,
        );
    }
    let payload_json: Option<serde_json::Value> = f.payload.as_deref().and_then(|p| serde_json::from_slice(p).ok());
    if rule.require_json && f.payload.is_some() && payload_json.is_none() {
        return dead_letter(
            dlq,
            key,
            f.payload.clone(),
            "outbox payload is not valid JSON (require_json = true)",
            &topic,
            source,
        );
    }
    let mut headers = Vec::new();
    if let Some(id) = &f.id {
        headers.push(("id".to_owned(), id.clone().into_bytes()));
    }
    let mut envelope = serde_json::Map::new();
    for field in &rule.additional {
        let value = (f.lookup)(&field.column);
        match field.placement {
            Placement::Header => {
                if let Some(v) = value {
                    let text = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    headers.push((field.name.clone(), text.into_bytes()));
                }
            }
            Placement::Envelope => {
                envelope.insert(field.name.clone(), value.unwrap_or(serde_json::Value::Null));
            }
        }
    }
    let value = if envelope.is_empty() {
        f.payload.clone()
    } else {
        let payload = match (&payload_json, &f.payload) {
            (Some(json), _) => json.clone(),
            (None, Some(raw)) => serde_json::Value::String(String::from_utf8_lossy(raw).into_owned()),
            (None, None) => serde_json::Value::Null,
        };
        envelope.insert("payload".into(), payload);
        Some(serde_json::Value::Object(envelope).to_string().into_bytes())
    };
    RawRecord { topic: topic.into(), key, value, headers, dead_letter: false }
}

/// A value as JSON (decimals as their text).
pub(crate) fn value_json(value: &Value) -> Option<serde_json::Value> {
    match value {
        Value::Null | Value::Unavailable { .. } => None,
        other => {
            let mut out = Vec::new();
            write_value(&mut out, other, ValueFormat { decimals: DecimalHandling::String, ..ValueFormat::default() });
            serde_json::from_slice(&out).ok()
        }
    }
}

/// The outbox payload's bytes: text (JSON or not) as is, binary as is, anything else as JSON.
pub(crate) fn payload_bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Null | Value::Unavailable { .. } => None,
        Value::String(s) => Some(s.clone().into_bytes()),
        Value::Bytes(b) => Some(b.clone()),
        other => value_json(other).map(|j| j.to_string().into_bytes()),
    }
}
