//! The rules as written in the TOML file, and compiled: table filters, column exclusions and
//! masks, key overrides, routes, outbox tables, the dead-letter topic. Compiling validates
//! everything and names the offending key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use regex::Regex;
use serde::Deserialize;
use tailgate_core::{CapturedTables, Op};

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
    /// A row whose payload is NULL: `dead_letter` (default; nothing is silently published as a
    /// tombstone) or `tombstone` (a record with a null value, which deletes the aggregate's key from
    /// a compacted topic: Debezium's `route.tombstone.on.empty.payload = true`).
    #[serde(default = "d_null_payload")]
    pub null_payload: String,
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
fn d_null_payload() -> String {
    "dead_letter".into()
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
    /// `[dead_letter] on_error = "stop"`: halt before a record that cannot be delivered instead of
    /// dead-lettering it (strict per-key order; nothing after it is delivered).
    pub dead_letter_stop: bool,
}

/// A rule that cannot be compiled, named by its config key.
pub type RuleError = crate::config::KeyError;

fn rule_error(key: impl Into<String>, message: impl Into<String>) -> RuleError {
    crate::config::key_error(key, message)
}

// ---------------------------------------------------------------------------------------------
// Compiled rules.

#[derive(Debug, Clone)]
pub(crate) enum Mask {
    Hash { salt: String },
    Stars,
    Truncate(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnInvalid {
    Warn,
    Error,
    Fatal,
}

#[derive(Debug, Clone)]
pub(crate) enum Placement {
    Header,
    Envelope,
}

#[derive(Debug, Clone)]
pub(crate) struct AdditionalField {
    pub(crate) column: String,
    pub(crate) placement: Placement,
    pub(crate) name: String,
}

#[derive(Debug, Clone)]
pub(crate) struct OutboxRule {
    pub(crate) table: Option<String>,
    pub(crate) message_prefix: Option<String>,
    pub(crate) id: String,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) payload: String,
    pub(crate) topic: String,
    pub(crate) additional: Vec<AdditionalField>,
    pub(crate) on_update: OnInvalid,
    pub(crate) require_json: bool,
    pub(crate) null_payload_tombstone: bool,
}

impl OutboxRule {
    /// The table columns this rule reads, with the config key naming each: all must exist.
    pub(crate) fn columns(&self, index: usize) -> Vec<(String, &str)> {
        let key = |k: &str| format!("outbox[{index}].{k}");
        let mut columns = vec![
            (key("id"), self.id.as_str()),
            (key("aggregate_id"), self.aggregate_id.as_str()),
            (key("payload"), self.payload.as_str()),
        ];
        if self.routes_by_aggregate_type() {
            columns.push((key("aggregate_type"), self.aggregate_type.as_str()));
        }
        for (j, field) in self.additional.iter().enumerate() {
            columns.push((key(&format!("additional_fields[{j}]")), field.column.as_str()));
        }
        for name in template_names(&self.topic).filter(|n| *n != "routedByValue") {
            columns.push((key("topic"), name));
        }
        columns
    }

    /// Whether the topic template names the aggregate type (`${routedByValue}`).
    pub(crate) fn routes_by_aggregate_type(&self) -> bool {
        template_names(&self.topic).any(|n| n == "routedByValue")
    }
}

/// The `${name}`s of a topic template.
fn template_names(template: &str) -> impl Iterator<Item = &str> {
    template.split("${").skip(1).filter_map(|part| part.split_once('}').map(|(name, _)| name))
}

/// Compiled, validated rules.
#[derive(Debug, Clone)]
pub struct Rules {
    pub(crate) include: Vec<Regex>,
    pub(crate) exclude: Vec<Regex>,
    pub(crate) exclude_columns: Vec<Regex>,
    pub(crate) masks: Vec<(Regex, Mask)>,
    pub(crate) key_columns: HashMap<String, Vec<String>>,
    pub(crate) routes: Vec<(Regex, String)>,
    pub(crate) outboxes: Vec<OutboxRule>,
    pub skip_ops: HashSet<Op>,
    pub topic_prefix: String,
    pub dead_letter_topic: Arc<str>,
    /// `[dead_letter] on_error = "stop"`.
    pub dead_letter_stop: bool,
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
            let null_payload_tombstone = match o.null_payload.as_str() {
                "dead_letter" => false,
                "tombstone" => true,
                other => {
                    return Err(rule_error(
                        key("null_payload"),
                        format!("{other:?}: use \"dead_letter\" or \"tombstone\""),
                    ));
                }
            };
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
                null_payload_tombstone,
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
            dead_letter_stop: spec.dead_letter_stop,
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

    /// The key columns `[filter.key_columns]` names for `schema.table`, if any.
    pub fn key_columns(&self, qualified: &str) -> Option<&[String]> {
        self.key_columns.get(qualified).map(Vec::as_slice)
    }

    /// The table rules as patterns, to record in a checkpoint ([`CapturedTables`]).
    pub fn captured(&self) -> CapturedTables {
        CapturedTables {
            include: self.include.iter().map(|r| r.as_str().to_owned()).collect(),
            exclude: self.exclude.iter().map(|r| r.as_str().to_owned()).collect(),
            outbox: self.outboxes.iter().filter_map(|o| o.table.clone()).collect(),
        }
    }

    /// Whether `schema.table` was captured under recorded rules; `None` when a recorded pattern no
    /// longer compiles (it always did when recorded).
    pub fn captured_under(captured: &CapturedTables, qualified: &str) -> Option<bool> {
        if captured.outbox.iter().any(|t| t == qualified) {
            return Some(true);
        }
        let matches = |patterns: &[String]| -> Option<bool> {
            for p in patterns {
                if Regex::new(p).ok()?.is_match(qualified) {
                    return Some(true);
                }
            }
            Some(false)
        };
        Some((captured.include.is_empty() || matches(&captured.include)?) && !matches(&captured.exclude)?)
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

/// Kafka's topic name rules.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}
