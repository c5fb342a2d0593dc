//! What metrics cost per event, next to what delivering an event costs anyway.
//!
//! `cargo bench -p tailgate-pipeline --bench accounting` renders the same batches three ways and
//! prints nanoseconds per event: the filter alone (what the run loop did before metrics), the
//! transform stage with metrics accounting (`Stage::process` + `Metrics::apply_batch`, default rules),
//! and the envelope encoding
//! every delivered event needs. Wall-clock drains on a 2-core machine vary by tens of percent from run
//! to run, so the overhead is measured here, in isolation.

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use tailgate_core::{
    ChangeEvent, ColumnSchema, Decimal, Event, Lsn, Op, PgSourceBlock, Position, SourceInfo, TableId, TableSchema,
    Value,
};
use tailgate_pipeline::runtime::Stage;
use tailgate_pipeline::{Encoder, EncoderOptions, Item, Metrics, Rules, SinkItem, TransformSpec};

fn batch(table: &Arc<TableSchema>, n: usize) -> Vec<Item> {
    let mut items = Vec::with_capacity(n + n / 1000 + 1);
    for i in 0..n {
        items.push(Item::Event(Event::Change(ChangeEvent {
            op: Op::Create,
            table: table.clone(),
            before: None,
            after: Some(vec![
                Value::Int(i as i64),
                Value::Int(7),
                Value::Decimal(Decimal { text: "123.45".into(), declared_scale: Some(2) }),
                Value::String("new".into()),
                Value::String("2026-11-22T08:09:30.692006Z".into()),
            ]),
            source: SourceInfo::Postgres(PgSourceBlock {
                name: "bench".into(),
                db: "bench".into(),
                commit_ts_us: 1_795_334_660_886_408,
                txid: 731,
                lsn: 35_314_184 + i as u64,
                last_commit_lsn: Some(35_314_000),
                snapshot: "false",
            }),
        })));
        if i % 1000 == 999 {
            items.push(Item::Commit(Position::postgres(Lsn(40_000_000 + i as u64))));
        }
    }
    items
}

/// Nanoseconds to push `batches` copies of `template` through a transform stage with `spec`.
fn time_stage(spec: &TransformSpec, template: &[Item], batches: usize, metrics: Option<&Metrics>) -> f64 {
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Rules::compile(spec).unwrap()));
    let mut stage = Stage::new(rx);
    let inputs: Vec<Vec<Item>> = (0..batches).map(|_| template.to_vec()).collect();
    let start = Instant::now();
    for batch in inputs {
        let (items, counts) = stage.process(batch).unwrap();
        if let Some(m) = metrics {
            m.apply_batch(&counts);
        }
        black_box(&items);
        stage.pending_commits.clear();
    }
    start.elapsed().as_nanos() as f64
}

fn main() {
    let table = Arc::new(TableSchema {
        id: TableId { schema: "public".into(), table: "orders".into() },
        columns: ["id", "customer_id", "total", "status", "created_at"]
            .iter()
            .enumerate()
            .map(|(i, n)| ColumnSchema { name: (*n).into(), key: i == 0 })
            .collect(),
    });
    let skip: HashSet<Op> = HashSet::from([Op::Truncate]);
    let metrics = Metrics::new("bench");
    let (batches, size) = (200, 2048);
    let template = batch(&table, size);
    let events = (batches * size) as f64;

    let inputs: Vec<_> = (0..batches).map(|_| template.clone()).collect();
    let start = Instant::now();
    for mut b in inputs {
        b.retain(|item| !matches!(item, Item::Event(Event::Change(c)) if skip.contains(&c.op)));
        black_box(&b);
    }
    let filter_only = start.elapsed().as_nanos() as f64 / events;

    let default_rules = TransformSpec { topic_prefix: "bench".into(), ..Default::default() };
    let with_metrics = time_stage(&default_rules, &template, batches, Some(&metrics)) / events;
    // The rules of the filter benchmark: 1 of 10 tables included, a route, an excluded column (the row
    // is rebuilt); then also a masked column.
    let mut spec = default_rules.clone();
    spec.filter.include_tables = vec!["public\\.orders".into()];
    spec.filter.exclude_columns = vec!["public\\.orders\\.created_at".into()];
    spec.routes =
        vec![tailgate_pipeline::RouteSpec { pattern: "bench\\.public\\.(.*)".into(), topic: "bench.$1.v2".into() }];
    let with_rules = time_stage(&spec, &template, batches, None) / events;
    spec.filter.mask_columns.insert("public\\.orders\\.status".into(), "hash:salt".into());
    let with_mask = time_stage(&spec, &template, batches, None) / events;

    let mut encoder = Encoder::new(EncoderOptions {
        tombstones: true,
        format: Default::default(),
        max_record_bytes: Some(1_000_000),
        dead_letter_topic: "bench.dlq".into(),
        stop_on_dead_letter: false,
    });
    let routed: Vec<SinkItem> = template
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(SinkItem::Change { topic: "bench.public.orders".into(), event: e.clone() }),
            Item::Commit(_) => None,
        })
        .collect();
    let mut bytes = 0usize;
    let start = Instant::now();
    for _ in 0..batches {
        encoder.begin_batch();
        for item in &routed {
            encoder.encode(item, |r, _| bytes += r.value.map_or(0, <[u8]>::len)).expect("no limit is reached");
        }
    }
    let encode = start.elapsed().as_nanos() as f64 / events;
    black_box(bytes);

    println!("filter only (before metrics):   {filter_only:7.1} ns/event");
    println!("transform stage + metrics:      {with_metrics:7.1} ns/event");
    println!("  + include, route, exclude column: {with_rules:7.1} ns/event");
    println!("  + and a SHA-256 masked column:   {with_mask:7.1} ns/event");
    println!("envelope encoding (every event): {encode:7.1} ns/event");
    println!(
        "transform + metrics overhead: {:.1} ns/event = {:.2}% of encoding alone",
        with_metrics - filter_only,
        (with_metrics - filter_only) / encode * 100.0
    );
    println!(
        "rules overhead over the default stage: {:.1} ns/event = {:.2}% of encoding alone",
        with_rules - with_metrics,
        (with_rules - with_metrics) / encode * 100.0
    );
}
