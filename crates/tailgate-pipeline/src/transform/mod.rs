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
//!
//! Layout: [`rules`] compiles the TOML rules (`[filter]`, `[[route]]`, `[[outbox]]`,
//! `[dead_letter]`); this module applies them per event through cached per-table plans;
//! `columns` projects and masks rows; `outbox` is the outbox event router; `dead_letter` builds
//! the records that cannot be delivered where they were meant to go.

mod columns;
mod dead_letter;
mod outbox;
pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;

use tailgate_core::{ColumnSchema, Event, Op, TableSchema};

use crate::sink::SinkItem;
use columns::{ColumnPlan, project};
pub use dead_letter::dead_letter;
use outbox::OutboxColumns;
use rules::Mask;
pub use rules::{FilterSpec, OutboxSpec, RouteSpec, RuleError, Rules, TransformSpec, valid_topic};

/// A definite failure decided by the rules: an outbox column the table does not have, an outbox
/// `on_update = "fatal"`, or a record that cannot be delivered under `[dead_letter] on_error =
/// "stop"`. The run stops before the event; nothing after it is delivered.
#[derive(Debug, thiserror::Error)]
#[error("{table}: {message}")]
pub struct TransformError {
    /// The table (or logical message prefix) of the event.
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

#[derive(Debug)]
struct TablePlan {
    included: bool,
    outbox: Option<OutboxColumns>,
    topic: Arc<str>,
    /// `None`: rows pass unchanged.
    columns: Option<ColumnPlan>,
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
                missing: outbox::missing_columns(o, rule, table),
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
                    None => {
                        out.push(SinkItem::Change { topic: self.message_topic.clone(), event: Event::Message(m) });
                        Ok(())
                    }
                }
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
}

fn op_bit(op: Op) -> u8 {
    1 << (op as u8)
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};
    use tailgate_core::{ChangeEvent, LogicalMessage, PgSourceBlock, SourceInfo, TableId, Value};

    use super::*;

    fn table(schema: &str, name: &str, columns: &[(&str, bool)]) -> Arc<TableSchema> {
        Arc::new(TableSchema {
            id: TableId { schema: schema.into(), table: name.into() },
            columns: columns.iter().map(|(n, k)| ColumnSchema { name: (*n).into(), key: *k }).collect(),
        })
    }

    fn source() -> SourceInfo {
        SourceInfo::Postgres(PgSourceBlock {
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

    /// A configured column the table does not have is a config error naming the key and the
    /// table's columns (it used to yield tombstones, or keyless records spread over partitions).
    #[test]
    fn an_outbox_column_missing_from_the_table_stops_with_the_key_named() {
        let outbox = outbox_table();
        let spec = toml_outbox("table = \"public.outbox\"\npayload = \"paylod\"");
        let mut t = transformer(|s| s.outboxes = vec![spec]);
        let mut out = Vec::new();
        let err = t
            .apply(insert(&outbox, outbox_row("{}")), &mut out, &mut TransformCounts::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`outbox[0].payload` = \"paylod\"") && err.contains("id, aggregatetype"), "{err}");
        assert!(out.is_empty());
    }

    /// NULL where the router needs a value: a dead letter with the cause, never a keyless record,
    /// a record on `outbox.event.` or a silent tombstone.
    #[test]
    fn outbox_rows_with_null_fields_become_dead_letters() {
        let outbox = outbox_table();
        let mut t = transformer(|s| s.outboxes = vec![outbox_spec()]);
        for (column, cause) in [
            (0, "outbox event id is NULL"),
            (1, "outbox aggregate type is NULL"),
            (2, "outbox aggregate id is NULL"),
            (4, "outbox payload is NULL"),
        ] {
            let mut row = outbox_row("{}");
            row[column] = Value::Null;
            let (out, counts) = run(&mut t, insert(&outbox, row));
            let SinkItem::Raw(r) = &out[0] else { panic!("{out:?}") };
            assert!(r.dead_letter && &*r.topic == "shop.dlq", "{r:?}");
            let header = r.headers.iter().find(|(k, _)| k == "tailgate.error.cause").unwrap();
            assert!(String::from_utf8_lossy(&header.1).starts_with(cause), "{cause}: {header:?}");
            assert_eq!(counts.dead_lettered, 1);
        }
        // Unless asked for: a NULL payload as a tombstone (Debezium's route.tombstone.on.empty.payload).
        let spec = toml_outbox("table = \"public.outbox\"\nnull_payload = \"tombstone\"");
        let mut t = transformer(|s| s.outboxes = vec![spec]);
        let mut row = outbox_row("{}");
        row[4] = Value::Null;
        let (out, _) = run(&mut t, insert(&outbox, row));
        let SinkItem::Raw(r) = &out[0] else { panic!() };
        assert!(!r.dead_letter && r.value.is_none() && r.key.as_deref() == Some(&b"42"[..]), "{r:?}");
    }

    /// `[dead_letter] on_error = "stop"`: the run halts before the bad record, naming its cause and
    /// position; nothing after it goes through.
    #[test]
    fn on_error_stop_halts_before_an_undeliverable_record() {
        let outbox = outbox_table();
        let mut t = transformer(|s| {
            s.outboxes = vec![outbox_spec()];
            s.dead_letter_stop = true;
        });
        let mut row = outbox_row("{}");
        row[2] = Value::Null;
        let mut out = Vec::new();
        let err = t.apply(insert(&outbox, row), &mut out, &mut TransformCounts::default()).unwrap_err().to_string();
        assert!(err.contains("outbox aggregate id is NULL") && err.contains("lsn=0/10"), "{err}");
        assert!(err.contains("on_error = \"continue\""), "names the fix: {err}");
        assert!(out.is_empty());
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
