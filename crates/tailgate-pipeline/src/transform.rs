//! Transforms between source and sink: which events reach Kafka, with which columns and key, under
//! which topic, and the transactional outbox router.
//!
//! ```text
//!  Item::Event ─▶ table included? ─▶ op skipped? ─▶ outbox table? ─yes─▶ outbox record (topic from
//!                     │ no              │ yes          │ no              template, key = aggregate id,
//!                  dropped           dropped           ▼                 value = payload, id header)
//!                                          columns excluded/masked, key overridden
//!                                          topic = route(<prefix>.<schema>.<table>)
//! ```
//!
//! Everything that depends only on a table's schema (inclusion, kept columns, masks, key, topic,
//! outbox column positions) is resolved once per schema version into a [`TablePlan`] and cached, so
//! the per-event work is a hash lookup and, only when columns change, a row rebuild.
//!
//! Contract: transforms never reorder events and never drop a commit marker, so checkpoints keep
//! their meaning. A record that can never be delivered (unroutable topic, outbox payload that is not
//! the JSON it must be) becomes a dead letter with headers naming the cause and source position.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use regex::Regex;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tailgate_core::envelope::{DecimalHandling, ValueFormat, write_value};
use tailgate_core::{ChangeEvent, ColumnSchema, Event, LogicalMessage, Op, SourceInfo, TableSchema, Value};

use crate::sink::{RawRecord, SinkItem};
use tracing::{error, warn};

// ---------------------------------------------------------------------------------------------
// Configuration, as written in the TOML file.

/// `[filter]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// Anchored regexes over `schema.table` (PostgreSQL) / `database.table` (MySQL); empty: all tables.
    #[serde(default)]
    pub include_tables: Vec<String>,
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    /// Anchored regexes over `schema.table.column`.
    #[serde(default)]
    pub exclude_columns: Vec<String>,
    /// Any of c, u, d, t. Default ["t"], as Debezium.
    #[serde(default = "default_skip_operations")]
    pub skip_operations: Vec<String>,
    /// Column regex → `hash:<salt>` (SHA-256 hex) | `mask` (`*` of the same length) | `truncate:<n>`.
    #[serde(default)]
    pub mask_columns: BTreeMap<String, String>,
    /// `schema.table` → key columns (tables without a primary key, or a business key).
    #[serde(default)]
    pub key_columns: BTreeMap<String, Vec<String>>,
}

impl Default for FilterSpec {
    fn default() -> Self {
        FilterSpec {
            include_tables: Vec::new(),
            exclude_tables: Vec::new(),
            exclude_columns: Vec::new(),
            skip_operations: default_skip_operations(),
            mask_columns: BTreeMap::new(),
            key_columns: BTreeMap::new(),
        }
    }
}

fn default_skip_operations() -> Vec<String> {
    vec!["t".into()]
}

/// `[[route]]`: topic routing by regex over the default topic; first match wins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Anchored regex over the default topic name.
    #[serde(rename = "match")]
    pub pattern: String,
    /// The topic; `$1`, `${name}` refer to capture groups.
    pub topic: String,
}

/// `[[outbox]]`: Debezium's outbox EventRouter, natively.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSpec {
    /// The outbox table, `schema.table`. Either this or `message_prefix`.
    pub table: Option<String>,
    /// PostgreSQL table-less outbox: logical decoding messages with this prefix whose content is a
    /// JSON object with the outbox columns.
    pub message_prefix: Option<String>,
    #[serde(default = "d_id")]
    pub id: String,
    #[serde(default = "d_aggregate_type")]
    pub aggregate_type: String,
    #[serde(default = "d_aggregate_id")]
    pub aggregate_id: String,
    /// The event type column (Debezium's `table.field.event.type`). Like Debezium, it is published
    /// only through `additional_fields`, e.g. `"type:header:eventType"`.
    #[serde(default = "d_event_type")]
    pub event_type: String,
    #[serde(default = "d_payload")]
    pub payload: String,
    /// Topic template: `${routedByValue}` is the aggregate type, `${column}` any column.
    #[serde(default = "d_topic")]
    pub topic: String,
    /// `column:header|envelope[:name]`, as Debezium's `table.fields.additional.placement`.
    #[serde(default)]
    pub additional_fields: Vec<String>,
    /// Outbox rows are insert-only: `warn` | `error` (log and skip) | `fatal` (stop).
    #[serde(default = "d_on_update")]
    pub on_update: String,
    /// The payload must be JSON (else: dead letter). Default false: any text is passed as is.
    #[serde(default)]
    pub require_json: bool,
}

fn d_id() -> String {
    "id".into()
}
fn d_aggregate_type() -> String {
    "aggregatetype".into()
}
fn d_aggregate_id() -> String {
    "aggregateid".into()
}
fn d_event_type() -> String {
    "type".into()
}
fn d_payload() -> String {
    "payload".into()
}
fn d_topic() -> String {
    "outbox.event.${routedByValue}".into()
}
fn d_on_update() -> String {
    "warn".into()
}

/// Everything the transform stage needs; replaced as a whole on reload.
#[derive(Debug, Clone, Default)]
pub struct TransformSpec {
    pub filter: FilterSpec,
    pub routes: Vec<RouteSpec>,
    pub outboxes: Vec<OutboxSpec>,
    pub topic_prefix: String,
    /// Dead-letter topic; default `<topic_prefix>.dlq`.
    pub dead_letter_topic: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct RuleError {
    pub key: String,
    pub message: String,
}

fn rule_error(key: impl Into<String>, message: impl Into<String>) -> RuleError {
    RuleError { key: key.into(), message: message.into() }
}

// ---------------------------------------------------------------------------------------------
// Compiled rules.

#[derive(Debug, Clone)]
enum Mask {
    Hash { salt: String },
    Stars,
    Truncate(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnInvalid {
    Warn,
    Error,
    Fatal,
}

#[derive(Debug, Clone)]
enum Placement {
    Header,
    Envelope,
}

#[derive(Debug, Clone)]
struct AdditionalField {
    column: String,
    placement: Placement,
    name: String,
}

#[derive(Debug, Clone)]
struct OutboxRule {
    table: Option<String>,
    message_prefix: Option<String>,
    id: String,
    aggregate_type: String,
    aggregate_id: String,
    payload: String,
    topic: String,
    additional: Vec<AdditionalField>,
    on_update: OnInvalid,
    require_json: bool,
}

/// Compiled, validated rules.
#[derive(Debug, Clone)]
pub struct Rules {
    include: Vec<Regex>,
    exclude: Vec<Regex>,
    exclude_columns: Vec<Regex>,
    masks: Vec<(Regex, Mask)>,
    key_columns: HashMap<String, Vec<String>>,
    routes: Vec<(Regex, String)>,
    outboxes: Vec<OutboxRule>,
    pub skip_ops: HashSet<Op>,
    pub topic_prefix: String,
    pub dead_letter_topic: Arc<str>,
}

fn anchored(key: String, pattern: &str) -> Result<Regex, RuleError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| rule_error(key, format!("invalid regex: {e}")))
}

impl Rules {
    pub fn compile(spec: &TransformSpec) -> Result<Rules, RuleError> {
        let f = &spec.filter;
        let list = |name: &str, patterns: &[String]| -> Result<Vec<Regex>, RuleError> {
            patterns.iter().enumerate().map(|(i, p)| anchored(format!("filter.{name}[{i}]"), p)).collect()
        };
        let mut masks = Vec::new();
        for (pattern, how) in &f.mask_columns {
            let key = format!("filter.mask_columns.\"{pattern}\"");
            let mask = if let Some(salt) = how.strip_prefix("hash:") {
                Mask::Hash { salt: salt.to_owned() }
            } else if how == "mask" {
                Mask::Stars
            } else if let Some(n) = how.strip_prefix("truncate:") {
                Mask::Truncate(
                    n.parse().map_err(|_| rule_error(&key, format!("{how:?}: truncate:<n> needs a number")))?,
                )
            } else {
                return Err(rule_error(key, format!("{how:?}: use \"hash:<salt>\", \"mask\" or \"truncate:<n>\"")));
            };
            masks.push((anchored(key, pattern)?, mask));
        }
        let mut skip_ops = HashSet::new();
        for code in &f.skip_operations {
            match Op::from_code(code) {
                Some(op @ (Op::Create | Op::Update | Op::Delete | Op::Truncate)) => {
                    skip_ops.insert(op);
                }
                _ => {
                    return Err(rule_error(
                        "filter.skip_operations",
                        format!("{code:?} is not one of \"c\", \"u\", \"d\", \"t\""),
                    ));
                }
            }
        }
        let routes = spec
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((anchored(format!("route[{i}].match"), &r.pattern)?, r.topic.clone())))
            .collect::<Result<Vec<_>, RuleError>>()?;
        let mut outboxes = Vec::new();
        for (i, o) in spec.outboxes.iter().enumerate() {
            let key = |k: &str| format!("outbox[{i}].{k}");
            if o.table.is_some() == o.message_prefix.is_some() {
                return Err(rule_error(key("table"), "set exactly one of `table` and `message_prefix`"));
            }
            let on_update = match o.on_update.as_str() {
                "warn" => OnInvalid::Warn,
                "error" => OnInvalid::Error,
                "fatal" => OnInvalid::Fatal,
                other => {
                    return Err(rule_error(
                        key("on_update"),
                        format!("{other:?}: use \"warn\", \"error\" or \"fatal\""),
                    ));
                }
            };
            let mut additional = Vec::new();
            for (j, field) in o.additional_fields.iter().enumerate() {
                let parts: Vec<&str> = field.split(':').collect();
                let placement = match parts.get(1).copied() {
                    Some("header") => Placement::Header,
                    Some("envelope") => Placement::Envelope,
                    _ => {
                        return Err(rule_error(
                            format!("outbox[{i}].additional_fields[{j}]"),
                            format!("{field:?}: use column:header[:name] or column:envelope[:name]"),
                        ));
                    }
                };
                let column = parts[0].to_owned();
                let name = parts.get(2).map_or_else(|| column.clone(), |n| (*n).to_owned());
                additional.push(AdditionalField { column, placement, name });
            }
            outboxes.push(OutboxRule {
                table: o.table.clone(),
                message_prefix: o.message_prefix.clone(),
                id: o.id.clone(),
                aggregate_type: o.aggregate_type.clone(),
                aggregate_id: o.aggregate_id.clone(),
                payload: o.payload.clone(),
                topic: o.topic.clone(),
                additional,
                on_update,
                require_json: o.require_json,
            });
        }
        Ok(Rules {
            include: list("include_tables", &f.include_tables)?,
            exclude: list("exclude_tables", &f.exclude_tables)?,
            exclude_columns: list("exclude_columns", &f.exclude_columns)?,
            masks,
            key_columns: f.key_columns.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            routes,
            outboxes,
            skip_ops,
            topic_prefix: spec.topic_prefix.clone(),
            dead_letter_topic: spec
                .dead_letter_topic
                .clone()
                .unwrap_or_else(|| format!("{}.dlq", spec.topic_prefix))
                .into(),
        })
    }

    /// Whether changes of `schema.table` are captured (outbox tables always are).
    pub fn table_included(&self, qualified: &str) -> bool {
        if self.outboxes.iter().any(|o| o.table.as_deref() == Some(qualified)) {
            return true;
        }
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(qualified)))
            && !self.exclude.iter().any(|r| r.is_match(qualified))
    }

    /// Whether the rules select tables at all (else every table is captured).
    pub fn filters_tables(&self) -> bool {
        !self.include.is_empty() || !self.exclude.is_empty()
    }

    /// The topic for `default`, after routes.
    pub fn route(&self, default: &str) -> String {
        for (pattern, template) in &self.routes {
            if let Some(caps) = pattern.captures(default) {
                let mut out = String::new();
                caps.expand(template, &mut out);
                return out;
            }
        }
        default.to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Output of the stage.

/// A definite failure decided by a rule (outbox `on_update = "fatal"`).
#[derive(Debug, thiserror::Error)]
#[error("outbox table {table}: {message}")]
pub struct TransformError {
    pub table: String,
    pub message: String,
}

/// Counts of one batch, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct TransformCounts {
    pub filtered: u64,
    pub dead_lettered: u64,
    pub outbox: u64,
}

// ---------------------------------------------------------------------------------------------
// Per-table plans.

#[derive(Debug)]
struct TablePlan {
    included: bool,
    outbox: Option<OutboxColumns>,
    topic: Arc<str>,
    /// `None`: rows pass unchanged.
    columns: Option<ColumnPlan>,
}

#[derive(Debug)]
struct ColumnPlan {
    schema: Arc<TableSchema>,
    keep: Vec<usize>,
    /// (position in the output row, mask)
    masks: Vec<(usize, Mask)>,
}

#[derive(Debug)]
struct OutboxColumns {
    rule: usize,
    id: Option<usize>,
    aggregate_type: Option<usize>,
    aggregate_id: Option<usize>,
    payload: Option<usize>,
    columns: HashMap<String, usize>,
}

/// Plans cached before the first prune.
const PLAN_CACHE_MIN: usize = 256;

pub struct Transformer {
    rules: Arc<Rules>,
    /// The plan of the last table seen: consecutive events mostly share a table, so most events
    /// skip the hash lookup.
    last: Option<(Arc<TableSchema>, Arc<TablePlan>)>,
    /// `skip_ops` as a bitmask over `Op` discriminants.
    skip_mask: u8,
    /// Keyed by schema address; the `Arc` is held so that the address stays unique.
    plans: HashMap<usize, (Arc<TableSchema>, Arc<TablePlan>)>,
    /// The cache size at which unused plans are dropped ([`Transformer::prune_plans`]).
    prune_at: usize,
    message_topic: Arc<str>,
}

impl Transformer {
    pub fn new(rules: Arc<Rules>) -> Self {
        let message_topic = rules.route(&format!("{}.message", rules.topic_prefix)).into();
        let skip_mask = rules.skip_ops.iter().fold(0u8, |m, op| m | op_bit(*op));
        Transformer { rules, last: None, skip_mask, plans: HashMap::new(), prune_at: PLAN_CACHE_MIN, message_topic }
    }

    /// Makes `self.last` the plan of `table`.
    fn select_plan(&mut self, table: &Arc<TableSchema>) {
        if let Some((last_table, _)) = &self.last
            && Arc::ptr_eq(last_table, table)
        {
            return;
        }
        let plan = self.lookup_plan(table);
        self.last = Some((table.clone(), plan));
    }

    fn lookup_plan(&mut self, table: &Arc<TableSchema>) -> Arc<TablePlan> {
        let addr = Arc::as_ptr(table) as usize;
        if let Some((_, plan)) = self.plans.get(&addr) {
            return plan.clone();
        }
        if self.plans.len() >= self.prune_at {
            self.prune_plans();
        }
        let plan = Arc::new(self.build_plan(table));
        self.plans.insert(addr, (table.clone(), plan.clone()));
        plan
    }

    /// Drops the plans of schemas nobody else holds any more: a source replaces its schemas on every
    /// reconnect, binlog rotation and DDL, so without this the cache grew for the life of the run.
    /// A schema still in use (by the source, or by events on their way) keeps its plan. The next
    /// prune waits until the cache has doubled again, so pruning costs O(1) per lookup on average.
    fn prune_plans(&mut self) {
        self.plans.retain(|_, (schema, _)| Arc::strong_count(schema) > 1);
        self.prune_at = (self.plans.len() * 2).max(PLAN_CACHE_MIN);
    }

    fn build_plan(&self, table: &TableSchema) -> TablePlan {
        let qualified = table.id.to_string();
        let rules = &self.rules;
        let outbox = rules.outboxes.iter().position(|o| o.table.as_deref() == Some(qualified.as_str())).map(|rule| {
            let o = &rules.outboxes[rule];
            let find = |name: &str| table.columns.iter().position(|c| c.name == name);
            OutboxColumns {
                rule,
                id: find(&o.id),
                aggregate_type: find(&o.aggregate_type),
                aggregate_id: find(&o.aggregate_id),
                payload: find(&o.payload),
                columns: table.columns.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect(),
            }
        });
        let topic = rules.route(&format!("{}.{}", rules.topic_prefix, qualified)).into();
        let keep: Vec<usize> = (0..table.columns.len())
            .filter(|&i| {
                let column = format!("{qualified}.{}", table.columns[i].name);
                !rules.exclude_columns.iter().any(|r| r.is_match(&column))
            })
            .collect();
        let key_override = rules.key_columns.get(&qualified);
        let masks: Vec<(usize, Mask)> = keep
            .iter()
            .enumerate()
            .filter_map(|(out, &i)| {
                let column = format!("{qualified}.{}", table.columns[i].name);
                rules.masks.iter().find(|(r, _)| r.is_match(&column)).map(|(_, m)| (out, m.clone()))
            })
            .collect();
        let columns = if keep.len() == table.columns.len() && masks.is_empty() && key_override.is_none() {
            None
        } else {
            let schema = Arc::new(TableSchema {
                id: table.id.clone(),
                columns: keep
                    .iter()
                    .map(|&i| {
                        let c = &table.columns[i];
                        let key = match key_override {
                            Some(cols) => cols.contains(&c.name),
                            None => c.key,
                        };
                        ColumnSchema { name: c.name.clone(), key }
                    })
                    .collect(),
            });
            Some(ColumnPlan { schema, keep, masks })
        };
        TablePlan { included: rules.table_included(&qualified), outbox, topic, columns }
    }

    /// Transforms one source item into zero or more sink items.
    pub fn apply(
        &mut self,
        event: Event,
        out: &mut Vec<SinkItem>,
        counts: &mut TransformCounts,
    ) -> Result<(), TransformError> {
        match event {
            Event::Message(m) => {
                match self.rules.outboxes.iter().position(|o| o.message_prefix.as_deref() == Some(m.prefix.as_str())) {
                    Some(rule) => self.outbox_message(rule, &m, out, counts),
                    None => out.push(SinkItem::Change { topic: self.message_topic.clone(), event: Event::Message(m) }),
                }
                Ok(())
            }
            Event::Change(mut change) => {
                self.select_plan(&change.table);
                let Some((_, plan)) = &self.last else { return Ok(()) };
                if !plan.included || self.skip_mask & op_bit(change.op) != 0 {
                    counts.filtered += 1;
                    return Ok(());
                }
                if let Some(outbox) = &plan.outbox {
                    return self.outbox_change(outbox, &change, out, counts);
                }
                if let Some(columns) = &plan.columns {
                    change.table = columns.schema.clone();
                    change.before = change.before.map(|row| project(row, columns));
                    change.after = change.after.map(|row| project(row, columns));
                }
                out.push(SinkItem::Change { topic: plan.topic.clone(), event: Event::Change(change) });
                Ok(())
            }
        }
    }

    fn outbox_change(
        &self,
        cols: &OutboxColumns,
        change: &ChangeEvent,
        out: &mut Vec<SinkItem>,
        counts: &mut TransformCounts,
    ) -> Result<(), TransformError> {
        let rule = &self.rules.outboxes[cols.rule];
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
        counts.outbox += 1;
        if record.dead_letter {
            counts.dead_lettered += 1;
        }
        out.push(SinkItem::Raw(record));
        Ok(())
    }

    fn outbox_message(
        &mut self,
        rule_index: usize,
        m: &LogicalMessage,
        out: &mut Vec<SinkItem>,
        counts: &mut TransformCounts,
    ) {
        let rule = &self.rules.outboxes[rule_index];
        counts.outbox += 1;
        let parsed: Result<serde_json::Map<String, serde_json::Value>, _> = serde_json::from_slice(&m.content);
        let Ok(object) = parsed else {
            counts.dead_lettered += 1;
            out.push(SinkItem::Raw(dead_letter(
                &self.rules.dead_letter_topic,
                None,
                Some(m.content.clone()),
                "outbox message content is not a JSON object",
                &rule.topic,
                &m.source,
            )));
            return;
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
        if record.dead_letter {
            counts.dead_lettered += 1;
        }
        out.push(SinkItem::Raw(record));
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

/// A dead letter: the original key and value (when there is one) under the dead-letter topic, with
/// headers naming the cause, the intended topic and the source position.
pub fn dead_letter(
    dlq: &Arc<str>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    cause: &str,
    intended_topic: &str,
    source: &SourceInfo,
) -> RawRecord {
    let mut headers = vec![
        ("tailgate.error.cause".to_owned(), cause.as_bytes().to_vec()),
        ("tailgate.error.topic".to_owned(), intended_topic.as_bytes().to_vec()),
    ];
    match source {
        SourceInfo::Postgres(pg) => {
            headers.push(("tailgate.source.lsn".to_owned(), tailgate_core::Lsn(pg.lsn).to_string().into_bytes()));
            headers.push(("tailgate.source.txid".to_owned(), pg.txid.to_string().into_bytes()));
        }
        SourceInfo::Mysql(my) => {
            headers.push(("tailgate.source.file".to_owned(), my.file.as_bytes().to_vec()));
            headers.push(("tailgate.source.pos".to_owned(), my.pos.to_string().into_bytes()));
            if let Some(gtid) = &my.gtid {
                headers.push(("tailgate.source.gtid".to_owned(), gtid.as_bytes().to_vec()));
            }
        }
    }
    RawRecord { topic: dlq.clone(), key, value, headers, dead_letter: true }
}

fn op_bit(op: Op) -> u8 {
    1 << (op as u8)
}

/// Kafka's topic name rules.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Keeps the planned columns, in place: `keep` is ascending, so each kept value moves left or
/// stays, and the row's allocation is reused.
fn project(mut row: Vec<Value>, plan: &ColumnPlan) -> Vec<Value> {
    if plan.keep.len() != row.len() {
        for (out, &i) in plan.keep.iter().enumerate() {
            row.swap(out, i);
        }
        row.truncate(plan.keep.len());
    }
    for (i, mask) in &plan.masks {
        row[*i] = apply_mask(&row[*i], mask);
    }
    row
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xF)] as char);
    }
    out
}

fn apply_mask(value: &Value, mask: &Mask) -> Value {
    if matches!(value, Value::Null | Value::Unavailable { .. }) {
        return value.clone();
    }
    let Some(text) = value_text(value) else { return value.clone() };
    match mask {
        Mask::Hash { salt } => {
            let mut h = Sha256::new();
            h.update(salt.as_bytes());
            h.update(text.as_bytes());
            Value::String(hex(&h.finalize()))
        }
        Mask::Stars => Value::String("*".repeat(text.chars().count())),
        Mask::Truncate(n) => match value {
            Value::String(s) => Value::String(s.chars().take(*n).collect()),
            other => other.clone(),
        },
    }
}

/// A value as plain text (strings unquoted), for keys, headers and masks.
fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::Null | Value::Unavailable { .. } => None,
        Value::String(s) => Some(s.clone()),
        Value::Decimal(d) => Some(d.text.clone()),
        other => {
            let mut out = Vec::new();
            write_value(&mut out, other, ValueFormat { decimals: DecimalHandling::String, ..ValueFormat::default() });
            Some(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

/// A value as JSON (decimals as their text).
fn value_json(value: &Value) -> Option<serde_json::Value> {
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
fn payload_bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Null | Value::Unavailable { .. } => None,
        Value::String(s) => Some(s.clone().into_bytes()),
        Value::Bytes(b) => Some(b.clone()),
        other => value_json(other).map(|j| j.to_string().into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use tailgate_core::{PgSource, TableId};

    use super::*;

    fn table(schema: &str, name: &str, columns: &[(&str, bool)]) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            id: TableId { schema: schema.into(), table: name.into() },
            columns: columns.iter().map(|(n, k)| ColumnSchema { name: (*n).into(), key: *k }).collect(),
        })
    }

    fn source() -> SourceInfo {
        SourceInfo::Postgres(PgSource {
            name: "shop".into(),
            db: "shop".into(),
            commit_ts_us: 0,
            txid: 9,
            lsn: 0x10,
            last_commit_lsn: None,
            snapshot: "false",
        })
    }

    fn insert(table: &Arc<TableSchema>, row: Vec<Value>) -> Event {
        Event::Change(ChangeEvent {
            op: Op::Create,
            table: table.clone(),
            before: None,
            after: Some(row),
            source: source(),
        })
    }

    fn transformer(toml_like: impl FnOnce(&mut TransformSpec)) -> Transformer {
        let mut spec = TransformSpec { topic_prefix: "shop".into(), ..Default::default() };
        toml_like(&mut spec);
        Transformer::new(Arc::new(Rules::compile(&spec).unwrap()))
    }

    fn run(t: &mut Transformer, event: Event) -> (Vec<SinkItem>, TransformCounts) {
        let mut out = Vec::new();
        let mut counts = TransformCounts::default();
        t.apply(event, &mut out, &mut counts).unwrap();
        (out, counts)
    }

    /// A source replaces its schemas (reconnects, rotations, DDL): plans of schemas nobody holds any
    /// more are dropped, so the cache stays bounded by the schemas in use; a live one keeps its plan.
    #[test]
    fn the_plan_cache_forgets_schemas_no_longer_in_use() {
        let mut t = transformer(|_| {});
        let live = table("public", "kept", &[("id", true)]);
        run(&mut t, insert(&live, vec![Value::Int(1)]));
        for i in 0..100_000 {
            // A new schema version per "reconnect", dropped by its source right after.
            let replaced = table("public", "t", &[("id", true)]);
            run(&mut t, insert(&replaced, vec![Value::Int(i)]));
        }
        assert!(t.plans.len() <= 2 * PLAN_CACHE_MIN, "{} plans cached", t.plans.len());
        let addr = Arc::as_ptr(&live) as usize;
        assert!(t.plans.contains_key(&addr), "the schema still in use keeps its plan");
    }

    #[test]
    fn include_and_exclude_are_anchored() {
        let rules = Rules::compile(&TransformSpec {
            filter: FilterSpec {
                include_tables: vec!["public\\.(orders|outbox)".into(), "audit\\..*".into()],
                exclude_tables: vec!["audit\\.secret".into()],
                ..Default::default()
            },
            topic_prefix: "shop".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(rules.table_included("public.orders"));
        assert!(!rules.table_included("public.orders_archive"), "anchored: no partial matches");
        assert!(!rules.table_included("xpublic.orders"));
        assert!(rules.table_included("audit.log"));
        assert!(!rules.table_included("audit.secret"));
    }

    #[test]
    fn columns_are_excluded_masked_and_the_key_overridden() {
        let customers = table(
            "public",
            "customers",
            &[("id", true), ("email", false), ("ssn", false), ("name", false), ("no", false)],
        );
        let mut t = transformer(|s| {
            s.filter.exclude_columns = vec!["public\\.customers\\.ssn".into()];
            s.filter.mask_columns.insert("public\\.customers\\.email".into(), "hash:pepper".into());
            s.filter.mask_columns.insert("public\\.customers\\.name".into(), "mask".into());
            s.filter.mask_columns.insert("public\\.customers\\.no".into(), "truncate:3".into());
            s.filter.key_columns.insert("public.customers".into(), vec!["no".into()]);
        });
        let row = vec![
            Value::Int(1),
            Value::String("a@b.c".into()),
            Value::String("123-45".into()),
            Value::String("Ada".into()),
            Value::String("ABCDEF".into()),
        ];
        let (out, _) = run(&mut t, insert(&customers, row));
        let SinkItem::Change { topic, event: Event::Change(c) } = &out[0] else { panic!() };
        assert_eq!(&**topic, "shop.public.customers");
        let names: Vec<_> = c.table.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "email", "name", "no"]);
        let after = c.after.as_ref().unwrap();
        // sha256("pepper" + "a@b.c")
        let mut h = Sha256::new();
        h.update(b"peppera@b.c");
        let expected: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect(); // independent of hex()
        assert_eq!(after[1], Value::String(expected));
        assert_eq!(after[2], Value::String("***".into()));
        assert_eq!(after[3], Value::String("ABC".into()));
        let keys: Vec<_> = c.table.columns.iter().filter(|c| c.key).map(|c| c.name.as_str()).collect();
        assert_eq!(keys, ["no"], "key override replaces the primary key");
    }

    #[test]
    fn routes_rewrite_topics_with_captures_first_match_wins() {
        let shard = table("public", "orders_7", &[("id", true)]);
        let mut t = transformer(|s| {
            s.routes = vec![
                RouteSpec { pattern: "shop\\.public\\.orders_(\\d+)".into(), topic: "shop.orders.shard$1".into() },
                RouteSpec { pattern: "shop\\..*".into(), topic: "everything".into() },
            ];
        });
        let (out, _) = run(&mut t, insert(&shard, vec![Value::Int(1)]));
        let SinkItem::Change { topic, .. } = &out[0] else { panic!() };
        assert_eq!(&**topic, "shop.orders.shard7");
    }

    #[test]
    fn skipped_operations_and_excluded_tables_are_counted_as_filtered() {
        let t1 = table("public", "audit_log", &[("id", true)]);
        let mut t = transformer(|s| s.filter.exclude_tables = vec!["public\\.audit_.*".into()]);
        let (out, counts) = run(&mut t, insert(&t1, vec![Value::Int(1)]));
        assert!(out.is_empty());
        assert_eq!(counts.filtered, 1);
    }

    fn outbox_table() -> Arc<TableSchema> {
        table(
            "public",
            "outbox",
            &[("id", true), ("aggregatetype", false), ("aggregateid", false), ("type", false), ("payload", false)],
        )
    }

    fn outbox_row(payload: &str) -> Vec<Value> {
        vec![
            Value::String("e-1".into()),
            Value::String("order".into()),
            Value::String("42".into()),
            Value::String("OrderCreated".into()),
            Value::String(payload.into()),
        ]
    }

    fn outbox_spec() -> OutboxSpec {
        toml_outbox("table = \"public.outbox\"\nadditional_fields = [\"type:header:eventType\"]")
    }

    /// An `[[outbox]]` entry as a user writes it.
    fn toml_outbox(text: &str) -> OutboxSpec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn outbox_insert_becomes_one_routed_record_keyed_by_aggregate() {
        let outbox = outbox_table();
        let mut t = transformer(|s| s.outboxes = vec![outbox_spec()]);
        let (out, counts) = run(&mut t, insert(&outbox, outbox_row(r#"{"total": 9.5}"#)));
        assert_eq!(counts.outbox, 1);
        let SinkItem::Raw(r) = &out[0] else { panic!("{out:?}") };
        assert_eq!(&*r.topic, "outbox.event.order");
        assert_eq!(r.key.as_deref(), Some(&b"42"[..]));
        assert_eq!(r.value.as_deref(), Some(&br#"{"total": 9.5}"#[..]));
        assert!(r.headers.contains(&("id".into(), b"e-1".to_vec())));
        assert!(r.headers.contains(&("eventType".into(), b"OrderCreated".to_vec())));
        // Deletes of outbox rows are ignored; its table events are never emitted.
        let delete = Event::Change(ChangeEvent {
            op: Op::Delete,
            table: outbox.clone(),
            before: Some(outbox_row("{}")),
            after: None,
            source: source(),
        });
        assert!(run(&mut t, delete).0.is_empty());
    }

    #[test]
    fn outbox_envelope_fields_wrap_the_payload() {
        let outbox = outbox_table();
        let spec = toml_outbox("table = \"public.outbox\"\nadditional_fields = [\"type:envelope:eventType\"]");
        let mut t = transformer(|s| s.outboxes = vec![spec]);
        let (out, _) = run(&mut t, insert(&outbox, outbox_row(r#"{"a":1}"#)));
        let SinkItem::Raw(r) = &out[0] else { panic!() };
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"eventType": "OrderCreated", "payload": {"a": 1}}));
    }

    #[test]
    fn invalid_outbox_payload_and_topic_become_dead_letters() {
        let outbox = outbox_table();
        let spec = toml_outbox("table = \"public.outbox\"\nrequire_json = true");
        let mut t = transformer(|s| s.outboxes = vec![spec]);
        let (out, counts) = run(&mut t, insert(&outbox, outbox_row("not json")));
        let SinkItem::Raw(r) = &out[0] else { panic!() };
        assert_eq!(&*r.topic, "shop.dlq");
        assert!(r.dead_letter);
        assert_eq!(counts.dead_lettered, 1);
        assert!(
            r.headers.iter().any(|(k, v)| k == "tailgate.error.cause" && String::from_utf8_lossy(v).contains("JSON"))
        );
        assert!(r.headers.iter().any(|(k, _)| k == "tailgate.source.lsn"));

        let mut row = outbox_row("{}");
        row[1] = Value::String("bad topic/name".into());
        let mut t = transformer(|s| s.outboxes = vec![outbox_spec()]);
        let (out, _) = run(&mut t, insert(&outbox, row));
        let SinkItem::Raw(r) = &out[0] else { panic!() };
        assert_eq!(&*r.topic, "shop.dlq");
    }

    #[test]
    fn outbox_update_follows_on_update() {
        let outbox = outbox_table();
        let update = || {
            Event::Change(ChangeEvent {
                op: Op::Update,
                table: outbox.clone(),
                before: None,
                after: Some(outbox_row("{}")),
                source: source(),
            })
        };
        let mut warn = transformer(|s| s.outboxes = vec![outbox_spec()]);
        assert!(run(&mut warn, update()).0.is_empty());
        let fatal_spec = toml_outbox("table = \"public.outbox\"\non_update = \"fatal\"");
        let mut fatal = transformer(|s| s.outboxes = vec![fatal_spec]);
        let mut out = Vec::new();
        assert!(fatal.apply(update(), &mut out, &mut TransformCounts::default()).is_err());
    }

    #[test]
    fn logical_message_outbox_routes_like_a_row() {
        let spec = toml_outbox("message_prefix = \"outbox\"");
        let mut t = transformer(|s| s.outboxes = vec![spec]);
        let message = |content: &str| {
            Event::Message(LogicalMessage {
                transactional: true,
                prefix: "outbox".into(),
                content: content.as_bytes().to_vec(),
                source: source(),
            })
        };
        let (out, _) = run(
            &mut t,
            message(r#"{"id":"m1","aggregatetype":"customer","aggregateid":"7","type":"Created","payload":{"x":1}}"#),
        );
        let SinkItem::Raw(r) = &out[0] else { panic!() };
        assert_eq!(&*r.topic, "outbox.event.customer");
        assert_eq!(r.key.as_deref(), Some(&b"7"[..]));
        assert_eq!(r.value.as_deref(), Some(&br#"{"x":1}"#[..]));
        let (out, counts) = run(&mut t, message("not json"));
        let SinkItem::Raw(r) = &out[0] else { panic!() };
        assert!(r.dead_letter);
        assert_eq!(counts.dead_lettered, 1);
    }

    #[test]
    fn bad_rules_name_the_key() {
        let err = Rules::compile(&TransformSpec {
            routes: vec![RouteSpec { pattern: "(".into(), topic: "x".into() }],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.key, "route[0].match");
        let mut spec = TransformSpec::default();
        spec.filter.mask_columns.insert("a".into(), "scramble".into());
        assert!(Rules::compile(&spec).unwrap_err().message.contains("hash:<salt>"));
    }
}
