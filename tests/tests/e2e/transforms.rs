//! Filters, routing, masks, key overrides, the outbox router, dead letters and SIGHUP reload.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tailgate_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn filters_masks_keys_and_routes_shape_what_is_delivered() {
    let db = TestDb::new("filters").await;
    db.exec(
        "CREATE TABLE customers (id int PRIMARY KEY, email text, ssn text, name text);
         CREATE TABLE orders_1 (id int PRIMARY KEY, total int);
         CREATE TABLE orders_2 (id int PRIMARY KEY, total int);
         CREATE TABLE audit_log (id int PRIMARY KEY, what text);",
    )
    .await;
    let dir = scratch("filters");
    let rules = r#"
[filter]
include_tables = ["public\\.(customers|orders_\\d+|audit_.*)"]
exclude_tables = ["public\\.audit_.*"]
exclude_columns = ["public\\.customers\\.ssn"]
skip_operations = ["d", "t"]
[filter.mask_columns]
"public\\.customers\\.email" = "hash:pepper"
"public\\.customers\\.name" = "truncate:2"
[filter.key_columns]
"public.customers" = ["email"]
[[route]]
match = "tg_filters\\.public\\.orders_(\\d+)"
topic = "tg_filters.public.orders"
"#;
    let mut tg = Tailgate::start(&dir, &config("tg_filters", &db.url(), &dir, &stdout_sink(), rules));
    tg.wait_streaming().await;

    // The publication tailgate created covers exactly the included tables.
    let published: Vec<String> = db
        .client
        .query("SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'tg_filters' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(published, ["customers", "orders_1", "orders_2"]);

    db.exec("INSERT INTO audit_log VALUES (1, 'x')").await;
    db.exec("INSERT INTO customers VALUES (1, 'ada@example.com', '123-45-6789', 'Ada Lovelace')").await;
    db.exec("INSERT INTO orders_1 VALUES (1, 10); INSERT INTO orders_2 VALUES (1, 20);").await;
    db.exec("DELETE FROM orders_1").await; // skipped
    db.exec("UPDATE orders_2 SET total = 21").await;
    let records = wait_stdout(&mut tg, 4, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records_after = stdout_records(&tg.stdout);
    assert_eq!(records_after.len(), 4, "nothing else arrives: {records_after:#?}");

    let customer = &records[0];
    assert_eq!(customer["topic"], "tg_filters.public.customers");
    let after = &customer["value"]["after"];
    assert!(after.get("ssn").is_none(), "excluded column: {after}");
    assert_eq!(after["name"], "Ad");
    let email = after["email"].as_str().unwrap();
    assert_eq!(email.len(), 64, "SHA-256 hex");
    assert_ne!(email, "ada@example.com");
    assert_eq!(customer["key"], serde_json::json!({"email": email}), "key override");
    for r in &records[1..] {
        assert_eq!(r["topic"], "tg_filters.public.orders", "routed: {r}");
    }
    assert_eq!(records[3]["value"]["op"], "u");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reload_applies_new_rules_without_loss_or_repeat() {
    let db = TestDb::new("reload").await;
    db.exec("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);").await;
    let dir = scratch("reload");
    let only_a = "[filter]\ninclude_tables = [\"public\\\\.a\"]\n";
    let both = "[filter]\ninclude_tables = [\"public\\\\.(a|b)\"]\n";
    let mut tg = Tailgate::start(&dir, &config("tg_reload", &db.url(), &dir, &stdout_sink(), only_a));
    tg.wait_streaming().await;

    let writer_db = connect(&db.url()).await;
    let writer = tokio::spawn(async move {
        for i in 0..60 {
            writer_db.batch_execute(&format!("INSERT INTO a VALUES ({i}); INSERT INTO b VALUES ({i});")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A broken config is refused; the running rules stay.
    std::fs::write(
        dir.join("config.toml"),
        config("tg_reload", &db.url(), &dir, &stdout_sink(), "[filter]\ninclude_tables = [\"(\"]\n"),
    )
    .unwrap();
    signal(tg.pid(), "HUP");
    tg.wait_for_log("reload refused", Duration::from_secs(10)).await;
    std::fs::write(dir.join("config.toml"), config("tg_reload", &db.url(), &dir, &stdout_sink(), both)).unwrap();
    signal(tg.pid(), "HUP");
    tg.wait_for_log("reloaded", Duration::from_secs(10)).await;
    writer.await.unwrap();
    db.exec("INSERT INTO b VALUES (1000)").await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let records = stdout_records(&tg.stdout);
        if records.iter().any(|r| r["value"]["after"]["id"] == 1000) {
            break;
        }
        assert!(Instant::now() < deadline, "b rows never arrived after the reload:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tg.wait_for_log("incremental snapshot done", Duration::from_secs(20)).await;
    // The snapshot's last rows may still be on their way to stdout.
    let settle = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settle {
        let b: std::collections::BTreeSet<i64> = stdout_records(&tg.stdout)
            .iter()
            .filter(|r| r["topic"] == "tg_reload.public.b")
            .filter_map(|r| r["value"]["after"]["id"].as_i64())
            .collect();
        if (0..60).all(|i| b.contains(&i)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = stdout_records(&tg.stdout);
    let mut a_ids: HashMap<i64, usize> = HashMap::new();
    let mut b_ids = Vec::new();
    let mut b_snapshot = std::collections::BTreeSet::new();
    for r in &records {
        let id = r["value"]["after"]["id"].as_i64().unwrap();
        match r["topic"].as_str().unwrap() {
            "tg_reload.public.a" => *a_ids.entry(id).or_insert(0) += 1,
            // b's existing rows arrive once more by the incremental snapshot of a newly included
            // table (snapshot_new_tables, default true): op "r", checked below.
            "tg_reload.public.b" if r["value"]["op"] == "r" => {
                b_snapshot.insert(id);
            }
            "tg_reload.public.b" => b_ids.push(id),
            other => panic!("unexpected topic {other}"),
        }
    }
    assert_eq!(a_ids.len(), 60, "every row of a, before and after the reload");
    assert!(a_ids.values().all(|n| *n == 1), "no row of a repeated by the reload");
    assert!(b_ids.len() < 61 && b_ids.contains(&1000), "b rows streamed only from the reload on: {b_ids:?}");
    let missing: Vec<i64> = (0..60).filter(|i| !b_ids.contains(i) && !b_snapshot.contains(i)).collect();
    assert!(missing.is_empty(), "b rows neither streamed nor snapshotted after the reload: {missing:?}");
    // b's rows from the reload on form a contiguous tail: none lost after the switch.
    let first_b = *b_ids.iter().filter(|i| **i < 1000).min().unwrap_or(&60);
    let tail: Vec<i64> = b_ids.iter().copied().filter(|i| *i < 1000).collect();
    assert_eq!(tail, (first_b..60).collect::<Vec<_>>(), "rows of b after the switch are all there, in order");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

fn outbox_config(prefix: &str, extra: &str) -> String {
    format!(
        r#"[[outbox]]
table = "public.outbox"
topic = "{prefix}.outbox.${{routedByValue}}"
additional_fields = ["type:header:eventType"]
on_update = "warn"
[[outbox]]
message_prefix = "outbox"
topic = "{prefix}.outbox.${{routedByValue}}"
{extra}"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_rows_and_messages_become_events_in_per_aggregate_order() {
    let _broker = broker_lock().read().await;
    let db = TestDb::new("outbox").await;
    db.exec(
        "CREATE TABLE orders (id int PRIMARY KEY, total int);
         CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
                              aggregateid text NOT NULL, type text NOT NULL, payload jsonb);",
    )
    .await;
    let dir = scratch("outbox");
    let prefix = format!("ob{}", nonce());
    let sink = format!("{}topic_partitions = 3\n", kafka_sink(&prefix));
    let mut tg = Tailgate::start(&dir, &config("tg_outbox", &db.url(), &dir, &sink, &outbox_config(&prefix, "")));
    tg.wait_streaming().await;

    // The order service: business row + outbox row in one transaction; the outbox row is deleted in
    // the same transaction (no table bloat). 5 aggregates × 20 events.
    for seq in 0..20 {
        for order in 0..5 {
            let id = seq * 5 + order;
            db.exec(&format!(
                "BEGIN;
                 INSERT INTO orders VALUES ({id}, {seq});
                 WITH e AS (INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
                            VALUES ('order', 'order-{order}', 'OrderCreated', '{{\"seq\": {seq}, \"order\": {order}}}') RETURNING id)
                 DELETE FROM outbox WHERE id IN (SELECT id FROM e);
                 COMMIT;"
            ))
            .await;
        }
    }
    // Table-less outbox through a logical decoding message.
    db.exec(
        r#"SELECT pg_logical_emit_message(true, 'outbox', '{"id":"m-1","aggregatetype":"customer","aggregateid":"c-9","type":"CustomerCreated","payload":{"name":"Ada"}}')"#,
    )
    .await;
    // An update of an outbox row is not published (on_update = warn).
    db.exec("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'order-0', 'Late', '{\"seq\": 20, \"order\": 0}')").await;
    db.exec("UPDATE outbox SET type = 'Changed'").await;

    let events = consume(&format!("{prefix}.outbox.order"), 101, Duration::from_secs(60));
    assert_eq!(events.len(), 101, "100 inserted+deleted in one transaction, 1 insert; no update, no delete");
    let mut partitions: BTreeMap<String, std::collections::BTreeSet<i32>> = BTreeMap::new();
    let mut sequences: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &events {
        let key = e.key.as_ref().unwrap().as_str().unwrap().to_owned();
        assert!(key.starts_with("order-"), "key is the plain aggregate id: {key}");
        partitions.entry(key.clone()).or_default().insert(e.partition);
        sequences.entry(key).or_default().push(e.value.as_ref().unwrap()["seq"].as_i64().unwrap());
        assert!(
            e.headers.iter().any(|(k, v)| k == "id" && v.len() == 36),
            "id header is the event id: {:?}",
            e.headers
        );
        assert!(e.headers.iter().any(|(k, v)| k == "eventType" && (v == "OrderCreated" || v == "Late")));
    }
    for (key, parts) in &partitions {
        assert_eq!(parts.len(), 1, "aggregate {key} spans partitions {parts:?}");
    }
    for (key, seqs) in &sequences {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "aggregate {key} out of order: {seqs:?}");
    }
    assert!(
        partitions.values().flatten().collect::<std::collections::BTreeSet<_>>().len() > 1,
        "keys spread over partitions"
    );

    let customers = consume(&format!("{prefix}.outbox.customer"), 1, Duration::from_secs(30));
    assert_eq!(customers.len(), 1);
    assert_eq!(customers[0].key, Some(serde_json::json!("c-9")), "plain string key (not JSON)");
    assert_eq!(customers[0].value, Some(serde_json::json!({"name": "Ada"})));

    // The outbox table's own change events are not emitted; the business table's are.
    assert!(consume(&format!("{prefix}.public.outbox"), 1, Duration::from_secs(3)).is_empty());
    assert_eq!(consume(&format!("{prefix}.public.orders"), 100, Duration::from_secs(30)).len(), 100);
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("UPDATE of an outbox row"), "on_update = warn logs: {log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn undeliverable_records_go_to_the_dead_letter_topic_and_the_stream_goes_on() {
    let _broker = broker_lock().read().await;
    let db = TestDb::new("dlq").await;
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, body text);
         CREATE TABLE outbox (id text PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload text);",
    )
    .await;
    let dir = scratch("dlq");
    let prefix = format!("dlq{}", nonce());
    let port = free_port();
    let sink = format!("{}[sink.librdkafka]\n\"message.max.bytes\" = \"20000\"\n", kafka_sink(&prefix));
    let extra = format!(
        "[[outbox]]\ntable = \"public.outbox\"\ntopic = \"{prefix}.outbox.${{routedByValue}}\"\nrequire_json = true\n[http]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let mut tg = Tailgate::start(&dir, &config("tg_dlq", &db.url(), &dir, &sink, &extra));
    tg.wait_streaming().await;
    db.exec("INSERT INTO docs VALUES (1, repeat('x', 50000))").await; // too large
    db.exec("INSERT INTO outbox VALUES ('e1', 'order', 'o-1', 'T', 'not json')").await; // invalid payload
    db.exec("INSERT INTO outbox VALUES ('e2', 'bad/topic', 'o-1', 'T', '{}')").await; // unroutable
    db.exec("INSERT INTO docs VALUES (2, 'small')").await; // the stream goes on

    let dead = consume(&format!("{prefix}.dlq"), 3, Duration::from_secs(30));
    assert_eq!(dead.len(), 3, "{dead:#?}");
    let causes: Vec<String> = dead
        .iter()
        .map(|r| {
            r.headers.iter().find(|(k, _)| k == "tailgate.error.cause").map(|(_, v)| v.clone()).unwrap_or_default()
        })
        .collect();
    assert!(causes[0].contains("too large"), "{causes:?}");
    assert!(causes[1].contains("JSON"), "{causes:?}");
    assert!(causes[2].contains("topic"), "{causes:?}");
    for r in &dead {
        assert!(r.headers.iter().any(|(k, v)| k == "tailgate.source.lsn" && v.contains('/')), "{:?}", r.headers);
        assert!(r.headers.iter().any(|(k, _)| k == "tailgate.error.topic"));
    }
    let docs = consume(&format!("{prefix}.public.docs"), 1, Duration::from_secs(30));
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].after()["id"], 2);
    let (_, metrics) = http_get(port, "/metrics");
    assert_eq!(metric(&metrics, "tailgate_records_dead_lettered_total{connector=\"tg_dlq\"}"), Some(3.0), "{metrics}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

/// Outbox rows with a NULL where the router needs a value become dead letters naming the cause;
/// with `[dead_letter] on_error = "stop"` the connector halts before such a row instead, exits
/// non-zero naming it, and after the fix (here: switching to "continue") resumes with nothing lost
/// and the later rows of the same aggregate after it.
#[tokio::test(flavor = "multi_thread")]
async fn outbox_nulls_are_dead_lettered_or_stop_the_connector() {
    let s = Scenario::new(
        "outboxnull",
        "CREATE TABLE outbox (id text PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload text);",
    )
    .await;
    let outbox = "[[outbox]]\ntable = \"public.outbox\"\n";
    let stop = format!("{outbox}[dead_letter]\non_error = \"stop\"\n");
    let mut tg = s.start(&stdout_sink(), &stop).await;
    s.db.exec("INSERT INTO outbox VALUES ('e1', 'order', 'o-1', 'T', '{\"n\":1}')").await;
    wait_stdout(&mut tg, 1, Duration::from_secs(30)).await;
    s.db.exec("INSERT INTO outbox VALUES ('e2', 'order', NULL, 'T', '{\"n\":2}')").await;
    s.db.exec("INSERT INTO outbox VALUES ('e3', 'order', 'o-1', 'T', '{\"n\":3}')").await;
    let status = tg.wait_exit(Duration::from_secs(30)).await;
    let log = tg.log_text();
    assert!(!status.success(), "halts: {log}");
    assert!(log.contains("outbox aggregate id is NULL") && log.contains("on_error"), "{log}");
    let delivered = stdout_records(&tg.stdout);
    assert_eq!(delivered.len(), 1, "nothing after the bad row: {delivered:#?}");

    // The operator chooses to dead-letter it: the bad row goes to the DLQ, e3 follows it.
    let mut tg = s.start(&stdout_sink(), outbox).await;
    let records = wait_stdout(&mut tg, 2, Duration::from_secs(30)).await;
    assert_eq!(records[0]["topic"], format!("{}.dlq", s.name), "{records:#?}");
    assert_eq!(records[1]["topic"], "outbox.event.order");
    assert_eq!(records[1]["value"], serde_json::json!({"n": 3}));
    // And NULL aggregate type / payload, under the default policy.
    s.db.exec("INSERT INTO outbox VALUES ('e4', NULL, 'o-2', 'T', '{}'), ('e5', 'order', 'o-2', 'T', NULL)").await;
    let records = wait_stdout(&mut tg, 4, Duration::from_secs(30)).await;
    for r in &records[2..] {
        assert_eq!(r["topic"], format!("{}.dlq", s.name), "{r:#}");
        let cause = r["headers"]["tailgate.error.cause"].as_str().unwrap();
        assert!(cause.contains("aggregate type is NULL") || cause.contains("payload is NULL"), "{cause}");
    }
    s.finish(tg).await;
}
