//! What arrives in Kafka for each kind of change.

use std::time::Duration;

use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_arrives_in_commit_order_with_debezium_envelope() {
    let _broker = broker_lock().read().await;
    let db = TestDb::new("ops").await;
    db.exec(
        "CREATE TABLE customers (id int PRIMARY KEY, name text);
         CREATE TABLE orders (id int PRIMARY KEY, customer int, total numeric(10,2));
         CREATE TABLE nokey (v text);",
    )
    .await;
    let dir = scratch("ops");
    let prefix = format!("ops{}", nonce());
    let mut tg = Tailgate::start(&dir, &config("tg_ops", &db.url(), &dir, &kafka_sink(&prefix), ""));
    tg.wait_streaming().await;

    db.exec("INSERT INTO customers VALUES (1, 'ada')").await;
    // One transaction over two tables: both events, in statement order, before the next transaction.
    db.exec(
        "BEGIN; INSERT INTO orders VALUES (10, 1, 99.90); UPDATE customers SET name = 'ada l.' WHERE id = 1; COMMIT;",
    )
    .await;
    db.exec("UPDATE customers SET id = 2 WHERE id = 1").await; // primary key change
    db.exec("DELETE FROM orders WHERE id = 10").await;
    db.exec("INSERT INTO nokey VALUES ('x')").await;
    db.exec("TRUNCATE orders").await; // skipped by default, as Debezium

    let customers = consume(&format!("{prefix}.public.customers"), 5, WAIT);
    let orders = consume(&format!("{prefix}.public.orders"), 3, WAIT);
    let nokey = consume(&format!("{prefix}.public.nokey"), 1, WAIT);

    let ops: Vec<_> = customers.iter().map(|r| r.op().unwrap_or("tombstone")).collect();
    assert_eq!(ops, ["c", "u", "d", "tombstone", "c"], "customers: {customers:#?}");
    assert_eq!(customers[0].key, Some(serde_json::json!({"id": 1})));
    let create = customers[0].value.as_ref().unwrap();
    assert_eq!(create["after"], serde_json::json!({"id": 1, "name": "ada"}));
    assert_eq!(create["before"], serde_json::Value::Null);
    let source = &create["source"];
    assert_eq!(source["connector"], "postgresql");
    assert_eq!(source["name"], "tg_ops");
    assert_eq!(source["db"], "tg_ops");
    assert_eq!(source["schema"], "public");
    assert_eq!(source["table"], "customers");
    assert_eq!(source["snapshot"], "false");
    for field in ["version", "ts_ms", "sequence", "txId", "lsn", "xmin"] {
        assert!(source.get(field).is_some(), "source.{field} missing: {source}");
    }
    for field in ["ts_ms", "transaction"] {
        assert!(create.get(field).is_some(), "{field} missing");
    }
    // The update of the two-table transaction shares its txId with the order insert.
    assert_eq!(
        customers[1].value.as_ref().unwrap()["source"]["txId"],
        orders[0].value.as_ref().unwrap()["source"]["txId"]
    );
    assert_eq!(customers[1].after()["name"], "ada l.");
    // Key change: delete of the old key, its tombstone, create of the new key.
    assert_eq!(customers[2].key, Some(serde_json::json!({"id": 1})));
    assert_eq!(customers[2].before()["id"], 1);
    assert!(customers[3].value.is_none());
    assert_eq!(customers[4].key, Some(serde_json::json!({"id": 2})));
    assert_eq!(customers[4].after()["name"], "ada l.");

    let ops: Vec<_> = orders.iter().map(|r| r.op().unwrap_or("tombstone")).collect();
    assert_eq!(ops, ["c", "d", "tombstone"], "truncate is skipped by default: {orders:#?}");
    assert_eq!(orders[0].after()["total"], "JwY=", "numeric(10,2) 99.90 as Debezium's precise bytes");

    assert_eq!(nokey.len(), 1);
    assert_eq!(nokey[0].key, None, "a table without primary key has a null key");
    assert_eq!(nokey[0].after()["v"], "x");

    // Commit order across transactions: LSNs only grow.
    let lsns: Vec<u64> =
        customers.iter().filter_map(|r| r.value.as_ref()).map(|v| v["source"]["lsn"].as_u64().unwrap()).collect();
    assert!(lsns.windows(2).all(|w| w[0] <= w[1]), "{lsns:?}");

    let (status, log) = tg.stop().await;
    assert!(status.success(), "graceful stop exits 0: {log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_is_emitted_when_not_skipped_and_messages_are_delivered() {
    let s = Scenario::new("trunc", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut tg = s.start(&stdout_sink(), "[filter]\nskip_operations = []\n").await;
    s.db.exec("INSERT INTO t VALUES (1); TRUNCATE t;").await;
    s.db.exec("SELECT pg_logical_emit_message(true, 'audit', 'hello')").await;
    let records = wait_stdout(&mut tg, 3, Duration::from_secs(20)).await;
    assert_eq!(records[0]["value"]["op"], "c");
    assert_eq!(records[1]["value"]["op"], "t");
    assert_eq!(records[1]["value"]["before"], serde_json::Value::Null);
    assert_eq!(records[2]["topic"], "tg_trunc.message");
    assert_eq!(records[2]["value"]["op"], "m");
    assert_eq!(records[2]["value"]["message"]["prefix"], "audit");
    assert_eq!(records[2]["value"]["message"]["content"], "aGVsbG8=");
    assert_eq!(records[2]["key"], serde_json::json!({"prefix": "audit"}));
    s.finish(tg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_is_the_debezium_placeholder_not_a_value() {
    let s = Scenario::new(
        "toast",
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, blob bytea);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL, ALTER COLUMN blob SET STORAGE EXTERNAL;",
    )
    .await;
    let mut tg = s.start(&stdout_sink(), "").await;
    s.db.exec("INSERT INTO docs VALUES (1, 't', repeat('x', 10000), decode(repeat('ab', 10000), 'hex'))").await;
    s.db.exec("UPDATE docs SET title = 't2' WHERE id = 1").await;
    s.db.exec("UPDATE docs SET body = 'short' WHERE id = 1").await;
    let records = wait_stdout(&mut tg, 3, Duration::from_secs(20)).await;
    assert_eq!(records[0]["value"]["after"]["body"].as_str().unwrap().len(), 10000);
    let after = &records[1]["value"]["after"];
    assert_eq!(after["title"], "t2");
    assert_eq!(after["body"], "__debezium_unavailable_value");
    assert_eq!(
        after["blob"], "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==",
        "bytea placeholder is base64 of the placeholder bytes"
    );
    assert_eq!(records[2]["value"]["after"]["body"], "short");
    s.finish(tg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alter_table_mid_stream_changes_the_columns_of_later_events_only() {
    let s = Scenario::new("alter", "CREATE TABLE t (id int PRIMARY KEY, a text, b text)").await;
    let mut tg = s.start(&stdout_sink(), "").await;
    for sql in [
        "INSERT INTO t VALUES (1, 'a1', 'b1')",
        "ALTER TABLE t ADD COLUMN c int DEFAULT 7",
        "INSERT INTO t VALUES (2, 'a2', 'b2', 8)",
        "ALTER TABLE t DROP COLUMN a",
        "INSERT INTO t VALUES (3, 'b3', 9)",
        "ALTER TABLE t ALTER COLUMN c TYPE text",
        "INSERT INTO t VALUES (4, 'b4', 'ten')",
    ] {
        s.db.exec(sql).await;
    }
    let records = wait_stdout(&mut tg, 4, Duration::from_secs(20)).await;
    let after = |i: usize| records[i]["value"]["after"].clone();
    assert_eq!(after(0), serde_json::json!({"id": 1, "a": "a1", "b": "b1"}));
    assert_eq!(after(1), serde_json::json!({"id": 2, "a": "a2", "b": "b2", "c": 8}));
    assert_eq!(after(2), serde_json::json!({"id": 3, "b": "b3", "c": 9}));
    assert_eq!(after(3), serde_json::json!({"id": 4, "b": "b4", "c": "ten"}));
    s.finish(tg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_identity_full_gives_before_images_and_primary_key_keys() {
    let s = Scenario::new("full", "CREATE TABLE t (id int PRIMARY KEY, v text); ALTER TABLE t REPLICA IDENTITY FULL;")
        .await;
    let mut tg = s.start(&stdout_sink(), "").await;
    s.db.exec("INSERT INTO t VALUES (1, 'a'); UPDATE t SET v = 'b'; DELETE FROM t;").await;
    let records = wait_stdout(&mut tg, 4, Duration::from_secs(20)).await;
    assert_eq!(records[1]["value"]["before"], serde_json::json!({"id": 1, "v": "a"}));
    assert_eq!(records[1]["key"], serde_json::json!({"id": 1}), "key is the primary key, not every column");
    assert_eq!(records[2]["value"]["before"], serde_json::json!({"id": 1, "v": "b"}));
    assert_eq!(records[3]["value"], serde_json::Value::Null);
    s.finish(tg).await;
}
