//! Filters, routing, masks, key overrides, SIGHUP reload, the outbox router and dead letters on
//! MySQL and MariaDB: the same rules as on PostgreSQL, over `database.table` names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tailgate_e2e::mysql::{MyScenario, Server};
use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

async fn filters_masks_keys_and_routes(server: Server) {
    let mut s = MyScenario::new(
        server,
        "filters",
        "CREATE TABLE customers (id int PRIMARY KEY, email varchar(100), ssn varchar(20), name varchar(100));
         CREATE TABLE orders_1 (id int PRIMARY KEY, total int);
         CREATE TABLE orders_2 (id int PRIMARY KEY, total int);
         CREATE TABLE audit_log (id int PRIMARY KEY, what varchar(10));",
    )
    .await;
    let (name, db) = (s.name.clone(), s.db.name.clone());
    let rules = format!(
        r#"
[filter]
include_tables = ["{db}\\.(customers|orders_\\d+|audit_.*)"]
exclude_tables = ["{db}\\.audit_.*"]
exclude_columns = ["{db}\\.customers\\.ssn"]
skip_operations = ["d", "t"]
[filter.mask_columns]
"{db}\\.customers\\.email" = "hash:pepper"
"{db}\\.customers\\.name" = "mask"
[filter.key_columns]
"{db}.customers" = ["email"]
[[route]]
match = "{name}\\.{db}\\.orders_(\\d+)"
topic = "{name}.{db}.orders"
"#
    );
    let mut tg = s.start("", &stdout_sink(), &rules).await;
    s.db.exec("INSERT INTO audit_log VALUES (1, 'x')").await;
    s.db.exec("INSERT INTO customers VALUES (1, 'ada@example.com', '123-45-6789', 'Ada')").await;
    s.db.exec("START TRANSACTION; INSERT INTO orders_1 VALUES (1, 10); INSERT INTO orders_2 VALUES (1, 20); COMMIT")
        .await;
    s.db.exec("DELETE FROM orders_1").await; // skipped
    s.db.exec("TRUNCATE TABLE orders_2").await; // skipped (the default)
    s.db.exec("INSERT INTO orders_2 VALUES (2, 21)").await;
    let records = wait_stdout(&mut tg, 4, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records_after = stdout_records(&tg.stdout);
    assert_eq!(records_after.len(), 4, "nothing else arrives: {records_after:#?}");

    let customer = &records[0];
    assert_eq!(customer["topic"], format!("{name}.{db}.customers"));
    let after = &customer["value"]["after"];
    assert!(after.get("ssn").is_none(), "excluded column: {after}");
    assert_eq!(after["name"], "***", "masked to the same length");
    let email = after["email"].as_str().unwrap();
    assert_eq!(email.len(), 64, "SHA-256 hex");
    assert_ne!(email, "ada@example.com");
    assert_eq!(customer["key"], serde_json::json!({"email": email}), "key override");
    for r in &records[1..] {
        assert_eq!(r["topic"], format!("{name}.{db}.orders"), "routed: {r}");
        assert_eq!(r["value"]["op"], "c");
    }
    assert_eq!(records[3]["value"]["after"]["id"], 2);
    s.finish(tg).await;
}

async fn sighup_reload_without_loss_or_repeat(server: Server) {
    let s =
        MyScenario::new(server, "reload", "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);")
            .await;
    let db = s.db.name.clone();
    let only_a = format!("[filter]\ninclude_tables = [\"{db}\\\\.a\"]\n");
    let both = format!("[filter]\ninclude_tables = [\"{db}\\\\.(a|b)\"]\n");
    let mut tg = s.start("", &stdout_sink(), &only_a).await;

    let mut writer_conn = s.db.another_connection().await;
    let writer = tokio::spawn(async move {
        for i in 0..60 {
            writer_conn
                .query_drop(format!(
                    "START TRANSACTION; INSERT INTO a VALUES ({i}); INSERT INTO b VALUES ({i}); COMMIT"
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A broken config is refused; the running rules stay.
    std::fs::write(s.dir.join("config.toml"), s.config("", &stdout_sink(), "[filter]\ninclude_tables = [\"(\"]\n"))
        .unwrap();
    signal(tg.pid(), "HUP");
    tg.wait_for_log("reload refused", Duration::from_secs(10)).await;
    std::fs::write(s.dir.join("config.toml"), s.config("", &stdout_sink(), &both)).unwrap();
    signal(tg.pid(), "HUP");
    tg.wait_for_log("reloaded", Duration::from_secs(10)).await;
    writer.await.unwrap();
    let mut last = s.db.another_connection().await;
    last.query_drop("INSERT INTO b VALUES (1000)").await.unwrap();

    let deadline = Instant::now() + WAIT;
    while !stdout_records(&tg.stdout).iter().any(|r| r["value"]["after"]["id"] == 1000) {
        assert!(Instant::now() < deadline, "b rows never arrived after the reload:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tg.wait_for_log("incremental snapshot done", WAIT).await;
    // The snapshot's last rows may still be on their way to stdout.
    let settle = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settle {
        let b: std::collections::BTreeSet<i64> = stdout_records(&tg.stdout)
            .iter()
            .filter(|r| r["topic"].as_str().is_some_and(|t| t.ends_with(".b")))
            .filter_map(|r| r["value"]["after"]["id"].as_i64())
            .collect();
        if (0..60).all(|i| b.contains(&i)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut a_ids: HashMap<i64, usize> = HashMap::new();
    let mut b_ids = Vec::new();
    let mut b_snapshot = std::collections::BTreeSet::new();
    for r in &stdout_records(&tg.stdout) {
        let id = r["value"]["after"]["id"].as_i64().unwrap();
        match r["topic"].as_str().unwrap().rsplit('.').next().unwrap() {
            "a" => *a_ids.entry(id).or_insert(0) += 1,
            // b's existing rows arrive once more by the incremental snapshot of a newly included
            // table (snapshot_new_tables, default true): op "r", checked below.
            "b" if r["value"]["op"] == "r" => {
                b_snapshot.insert(id);
            }
            "b" => b_ids.push(id),
            other => panic!("unexpected table {other}"),
        }
    }
    assert_eq!(a_ids.len(), 60, "every row of a, before and after the reload");
    assert!(a_ids.values().all(|n| *n == 1), "no row of a repeated by the reload");
    assert!(b_ids.len() < 61 && b_ids.contains(&1000), "b rows streamed only from the reload on: {b_ids:?}");
    let missing: Vec<i64> = (0..60).filter(|i| !b_ids.contains(i) && !b_snapshot.contains(i)).collect();
    assert!(missing.is_empty(), "b rows neither streamed nor snapshotted after the reload: {missing:?}");
    let first_b = *b_ids.iter().filter(|i| **i < 1000).min().unwrap_or(&60);
    let tail: Vec<i64> = b_ids.iter().copied().filter(|i| *i < 1000).collect();
    assert_eq!(tail, (first_b..60).collect::<Vec<_>>(), "rows of b after the switch are all there, in order");
    s.finish(tg).await;
}

/// The order service of docs/outbox.md on MySQL: business row + outbox row (inserted and deleted)
/// in one transaction; a JSON payload column (MariaDB's JSON is LONGTEXT holding JSON text).
async fn outbox_rows_become_events_in_per_aggregate_order(server: Server) {
    let _broker = broker_lock().read().await;
    let mut s = MyScenario::new(
        server,
        "outbox",
        "CREATE TABLE orders (id int PRIMARY KEY, total int);
         CREATE TABLE outbox (id varchar(36) PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
                              aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload json);",
    )
    .await;
    let (prefix, db) = (s.prefix.clone(), s.db.name.clone());
    let sink = format!("{}topic_partitions = 3\n", kafka_sink(&prefix));
    let outbox = format!(
        "[[outbox]]\ntable = \"{db}.outbox\"\ntopic = \"{prefix}.outbox.${{routedByValue}}\"\n\
         additional_fields = [\"type:header:eventType\"]\non_update = \"warn\"\n"
    );
    let tg = s.start("", &sink, &outbox).await;

    for seq in 0..20 {
        for order in 0..5 {
            let id = seq * 5 + order;
            s.db.exec(&format!(
                "START TRANSACTION;
                 INSERT INTO orders VALUES ({id}, {seq});
                 SET @event = UUID();
                 INSERT INTO outbox VALUES (@event, 'order', 'order-{order}', 'OrderCreated', '{{\"seq\": {seq}, \"order\": {order}}}');
                 DELETE FROM outbox WHERE id = @event;
                 COMMIT"
            ))
            .await;
        }
    }
    // An update of an outbox row is not published (on_update = warn).
    s.db.exec("INSERT INTO outbox VALUES (UUID(), 'order', 'order-0', 'Late', '{\"seq\": 20, \"order\": 0}')").await;
    s.db.exec("UPDATE outbox SET type = 'Changed'").await;

    let events = consume(&format!("{prefix}.outbox.order"), 101, Duration::from_secs(60));
    assert_eq!(events.len(), 101, "100 inserted+deleted in one transaction, 1 insert; no update, no delete");
    let mut partitions: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    let mut sequences: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &events {
        let key = e.key.as_ref().unwrap().as_str().unwrap().to_owned();
        assert!(key.starts_with("order-"), "key is the plain aggregate id: {key}");
        partitions.entry(key.clone()).or_default().insert(e.partition);
        let payload = e.value.as_ref().unwrap();
        assert!(payload.is_object(), "the JSON payload as JSON: {payload}");
        sequences.entry(key).or_default().push(payload["seq"].as_i64().unwrap());
        assert!(e.headers.iter().any(|(k, v)| k == "id" && v.len() == 36), "id header: {:?}", e.headers);
        assert!(e.headers.iter().any(|(k, v)| k == "eventType" && (v == "OrderCreated" || v == "Late")));
    }
    for (key, parts) in &partitions {
        assert_eq!(parts.len(), 1, "aggregate {key} spans partitions {parts:?}");
    }
    for (key, seqs) in &sequences {
        assert_eq!(seqs.len(), if key == "order-0" { 21 } else { 20 }, "{key}: {seqs:?}");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "aggregate {key} out of order: {seqs:?}");
    }
    // The outbox table's own change events are not emitted; the business table's are.
    assert!(consume(&s.topic("outbox"), 1, Duration::from_secs(3)).is_empty());
    assert_eq!(consume(&s.topic("orders"), 100, Duration::from_secs(30)).len(), 100);
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("UPDATE of an outbox row"), "on_update = warn logs: {log}");
    s.db.drop().await;
}

async fn undeliverable_records_go_to_the_dead_letter_topic(server: Server) {
    let _broker = broker_lock().read().await;
    let mut s = MyScenario::new(
        server,
        "dlq",
        "CREATE TABLE docs (id int PRIMARY KEY, body mediumtext);
         CREATE TABLE outbox (id varchar(36) PRIMARY KEY, aggregatetype varchar(255), aggregateid varchar(255),
                              type varchar(255), payload text);",
    )
    .await;
    let (prefix, db) = (s.prefix.clone(), s.db.name.clone());
    let port = free_port();
    let sink = format!("{}[sink.librdkafka]\n\"message.max.bytes\" = \"20000\"\n", kafka_sink(&prefix));
    let extra = format!(
        "[[outbox]]\ntable = \"{db}.outbox\"\ntopic = \"{prefix}.outbox.${{routedByValue}}\"\nrequire_json = true\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let tg = s.start("", &sink, &extra).await;
    s.db.exec("INSERT INTO docs VALUES (1, REPEAT('x', 50000))").await; // too large
    s.db.exec("INSERT INTO outbox VALUES ('e1', 'order', 'o-1', 'T', 'not json')").await; // invalid payload
    s.db.exec("INSERT INTO outbox VALUES ('e2', 'bad/topic', 'o-1', 'T', '{}')").await; // unroutable
    s.db.exec("INSERT INTO outbox VALUES ('e3', 'order', 'o-1', 'T', '{\"ok\": true}')").await; // fine
    s.db.exec("INSERT INTO docs VALUES (2, 'small')").await; // the stream goes on

    let dead = consume(&format!("{prefix}.dlq"), 3, Duration::from_secs(30));
    assert_eq!(dead.len(), 3, "{dead:#?}");
    let header = |r: &Record, name: &str| r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let causes: Vec<String> = dead.iter().map(|r| header(r, "tailgate.error.cause").unwrap_or_default()).collect();
    assert!(causes[0].contains("too large"), "{causes:?}");
    assert!(causes[1].contains("JSON"), "{causes:?}");
    assert!(causes[2].contains("topic"), "{causes:?}");
    for r in &dead {
        assert!(header(r, "tailgate.source.file").is_some_and(|f| !f.is_empty()), "{:?}", r.headers);
        assert!(header(r, "tailgate.source.pos").is_some_and(|p| p.parse::<u64>().is_ok()), "{:?}", r.headers);
        assert!(header(r, "tailgate.error.topic").is_some());
    }
    let fine = consume(&format!("{prefix}.outbox.order"), 1, Duration::from_secs(30));
    assert_eq!(fine.len(), 1);
    assert_eq!(fine[0].value, Some(serde_json::json!({"ok": true})), "JSON text in a TEXT column, expanded");
    let docs = consume(&s.topic("docs"), 1, Duration::from_secs(30));
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].after()["id"], 2);
    let (_, metrics) = http_get(port, "/metrics");
    let series = format!("tailgate_records_dead_lettered_total{{connector=\"{}\"}}", s.name);
    assert_eq!(metric(&metrics, &series), Some(3.0), "{metrics}");
    s.finish(tg).await;
}

tailgate_e2e::both_servers!(
    filters_masks_keys_and_routes,
    sighup_reload_without_loss_or_repeat,
    outbox_rows_become_events_in_per_aggregate_order,
    undeliverable_records_go_to_the_dead_letter_topic,
);
