//! What arrives in Kafka for each kind of change on MySQL and MariaDB, including schema changes
//! and compressed binlogs.

use std::time::Duration;

use serde_json::json;
use tailgate_e2e::mysql::{GlobalSettings, MyScenario, Server};
use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

async fn every_operation_arrives_in_commit_order(server: Server) {
    let _broker = broker_lock().read().await;
    let mut s = MyScenario::new(
        server,
        "ops",
        "CREATE TABLE customers (id int PRIMARY KEY, name varchar(50));
         CREATE TABLE orders (id int PRIMARY KEY, customer int, total decimal(10,2));
         CREATE TABLE nokey (v varchar(10));",
    )
    .await;
    let tg = s.start("", &kafka_sink(&s.prefix), "").await;

    s.db.exec("INSERT INTO customers VALUES (1, 'ada')").await;
    // One transaction over two tables: both events, in statement order.
    s.db.exec(
        "BEGIN; INSERT INTO orders VALUES (10, 1, 99.90); UPDATE customers SET name = 'ada l.' WHERE id = 1; COMMIT",
    )
    .await;
    s.db.exec("UPDATE customers SET id = 2 WHERE id = 1").await; // primary key change
    s.db.exec("DELETE FROM orders WHERE id = 10").await;
    s.db.exec("INSERT INTO nokey VALUES ('x')").await;
    s.db.exec("TRUNCATE orders").await; // skipped by default, as Debezium

    let customers = consume(&s.topic("customers"), 5, WAIT);
    let orders = consume(&s.topic("orders"), 3, WAIT);
    let nokey = consume(&s.topic("nokey"), 1, WAIT);

    let ops: Vec<_> = customers.iter().map(|r| r.op().unwrap_or("tombstone")).collect();
    assert_eq!(ops, ["c", "u", "d", "tombstone", "c"], "customers: {customers:#?}");
    assert_eq!(customers[0].key, Some(json!({"id": 1})));
    let create = customers[0].value.as_ref().unwrap();
    assert_eq!(create["after"], json!({"id": 1, "name": "ada"}));
    let source = &create["source"];
    assert_eq!(source["connector"], server.connector());
    assert_eq!(source["name"], s.name.as_str());
    assert_eq!(source["db"], s.db.name.as_str());
    assert_eq!(source["table"], "customers");
    assert_eq!(source["snapshot"], "false");
    assert_eq!(source["server_id"], 1);
    assert_eq!(source["row"], 0);
    let gtid = source["gtid"].as_str().expect("both servers have GTIDs here");
    match server {
        Server::Mysql => assert!(gtid.contains(':'), "MySQL GTID uuid:n: {gtid}"),
        Server::Mariadb => assert_eq!(gtid.split('-').count(), 3, "MariaDB GTID domain-server-seq: {gtid}"),
    }
    assert!(source["file"].as_str().is_some_and(|f| !f.is_empty()));
    assert!(source["pos"].as_u64().is_some_and(|p| p > 4));
    // The two-table transaction shares its GTID.
    assert_eq!(
        customers[1].value.as_ref().unwrap()["source"]["gtid"],
        orders[0].value.as_ref().unwrap()["source"]["gtid"]
    );
    assert_eq!(customers[1].before()["name"], "ada", "full before image");
    assert_eq!(customers[1].after()["name"], "ada l.");
    // Key change: delete of the old key, its tombstone, create of the new key.
    assert_eq!(customers[2].key, Some(json!({"id": 1})));
    assert!(customers[3].value.is_none());
    assert_eq!(customers[4].key, Some(json!({"id": 2})));

    let ops: Vec<_> = orders.iter().map(|r| r.op().unwrap_or("tombstone")).collect();
    assert_eq!(ops, ["c", "d", "tombstone"], "truncate is skipped by default: {orders:#?}");
    assert_eq!(orders[0].after()["total"], "JwY=", "decimal(10,2) 99.90 as Debezium's precise bytes");

    assert_eq!(nokey.len(), 1);
    assert_eq!(nokey[0].key, None, "a table without primary key has a null key");

    // Commit order: (file, pos) only grows across the customers' events.
    let coords: Vec<(String, u64)> = customers
        .iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| (v["source"]["file"].as_str().unwrap().to_owned(), v["source"]["pos"].as_u64().unwrap()))
        .collect();
    assert!(coords.windows(2).all(|w| w[0] <= w[1]), "binlog coordinates grow: {coords:?}");
    s.finish(tg).await;
}

/// Multi-row statements number their rows; TRUNCATE arrives when not skipped; `include_query` fills
/// `source.query`; transaction metadata names the GTID.
async fn rows_truncate_and_query(server: Server) {
    let mut s = MyScenario::new(server, "query", "CREATE TABLE t (id int PRIMARY KEY, v varchar(10))").await;
    let mut tg = s
        .start(
            "include_query = true",
            &stdout_sink(),
            "[filter]\nskip_operations = []\n[format]\ntransaction_metadata = true",
        )
        .await;
    // MySQL logs statements only for sessions with binlog_rows_query_log_events on.
    if server == Server::Mysql {
        s.db.exec("SET SESSION binlog_rows_query_log_events = ON").await;
    }
    s.db.exec("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')").await;
    s.db.exec("TRUNCATE TABLE t").await;
    let records = wait_stdout(&mut tg, 4, WAIT).await;
    let rows: Vec<u64> = records[..3].iter().map(|r| r["value"]["source"]["row"].as_u64().unwrap()).collect();
    assert_eq!(rows, [0, 1, 2], "rows of one statement are numbered");
    let first = &records[0]["value"];
    assert_eq!(first["source"]["query"], "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')");
    assert_eq!(first["transaction"]["id"], first["source"]["gtid"], "transaction id is the GTID");
    let truncate = &records[3]["value"];
    assert_eq!(truncate["op"], "t", "{records:#?}");
    assert_eq!(truncate["source"]["table"], "t");
    assert!(records[3]["key"].is_null(), "a truncate has no key");
    s.finish(tg).await;
}

/// MariaDB's compressed binlog events (log_bin_compress), which Debezium cannot read, and MySQL's
/// binlog transaction compression (zstd TRANSACTION_PAYLOAD events).
async fn compressed_binlog_events(server: Server) {
    let s = MyScenario::exclusive(server, "compress", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let mut tg = s.start("include_query = true", &stdout_sink(), "").await;
    let compress = match server {
        Server::Mariadb => Some(
            GlobalSettings::set(
                server,
                "SET GLOBAL log_bin_compress = ON, GLOBAL log_bin_compress_min_len = 10",
                "SET GLOBAL log_bin_compress = OFF, GLOBAL log_bin_compress_min_len = 256",
            )
            .await,
        ),
        Server::Mysql => None,
    };
    // Fresh sessions see the global setting.
    use mysql_async::prelude::Queryable;
    let mut writer = s.db.another_connection().await;
    if server == Server::Mysql {
        writer.query_drop("SET SESSION binlog_transaction_compression = ON").await.unwrap();
    }
    let (file, pos) = binlog_end(&mut writer).await;
    let long = "compressible ".repeat(200);
    writer.query_drop(format!("INSERT INTO t VALUES (1, '{long}'), (2, 'short')")).await.unwrap();
    writer.query_drop(format!("UPDATE t SET v = '{long}x' WHERE id = 2")).await.unwrap();
    writer.query_drop("DELETE FROM t WHERE id = 1").await.unwrap();
    let records = wait_stdout(&mut tg, 5, WAIT).await;
    drop(compress);
    // The server really wrote compressed events.
    let events: Vec<(String, u64, String)> = writer
        .query(format!("SHOW BINLOG EVENTS IN '{file}' FROM {pos}"))
        .await
        .unwrap()
        .into_iter()
        .map(|r: mysql_async::Row| (r.get(0).unwrap(), r.get(1).unwrap(), r.get(2).unwrap()))
        .collect();
    let compressed = events.iter().filter(|e| e.2.contains("compressed") || e.2 == "Transaction_payload").count();
    assert!(compressed >= 3, "expected compressed events: {events:?}");

    let ops: Vec<&str> = records.iter().map(|r| r["value"]["op"].as_str().unwrap_or("tombstone")).collect();
    assert_eq!(ops, ["c", "c", "u", "d", "tombstone"], "{records:#?}");
    assert_eq!(records[0]["value"]["after"]["v"], long.as_str());
    assert_eq!(records[2]["value"]["after"]["v"], format!("{long}x").as_str());
    assert_eq!(records[3]["value"]["before"]["v"], long.as_str());
    if server == Server::Mariadb {
        // The statement (ANNOTATE_ROWS) came compressed-free alongside the compressed rows.
        assert!(records[0]["value"]["source"]["query"].as_str().is_some_and(|q| q.starts_with("INSERT INTO t")));
    }
    s.finish(tg).await;
}

/// One large compressed transaction (MySQL's zstd TRANSACTION_PAYLOAD) streams with flat memory:
/// its events are inflated and handed over batch by batch, not inflated and pushed whole (1M rows
/// used to take hundreds of MB, and a payload over 1 GiB stopped the connector for good).
/// `TAILGATE_BIG_TXN_ROWS` sets the size (default 1,000,000).
#[tokio::test(flavor = "multi_thread")]
async fn a_large_compressed_transaction_streams_with_flat_memory() {
    let rows: u64 = std::env::var("TAILGATE_BIG_TXN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let server = Server::Mysql;
    let s = MyScenario::new(server, "bigzstd", "CREATE TABLE t (id int PRIMARY KEY, v varchar(40))").await;
    let port = free_port();
    let mut tg = Tailgate::start_discarding_stdout(
        &s.dir,
        &s.config("", &stdout_sink(), &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n")),
    );
    tg.wait_streaming().await;
    use mysql_async::prelude::Queryable;
    let mut writer = s.db.another_connection().await;
    writer.query_drop("SET SESSION binlog_transaction_compression = ON").await.unwrap();
    let (file, pos) = binlog_end(&mut writer).await;
    let mut db = tailgate_e2e::mysql::MyDb { conn: writer, server, name: s.db.name.clone() };
    db.insert_series("t", rows, "n, LPAD(n, 40, 'compressible ')").await;
    let events: Vec<String> = db
        .conn
        .query(format!("SHOW BINLOG EVENTS IN '{file}' FROM {pos}"))
        .await
        .unwrap()
        .into_iter()
        .map(|r: mysql_async::Row| r.get(2).unwrap())
        .collect();
    assert!(events.iter().any(|e| e == "Transaction_payload"), "not compressed: {events:?}");
    let series = format!("tailgate_events_read_total{{connector=\"{}\"}}", s.name);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut peak: f64 = 0.0;
    loop {
        peak = peak.max(peak_rss_mib(tg.pid()).unwrap_or(0.0));
        let read = metric(&http_get(port, "/metrics").1, &series).unwrap_or(0.0);
        if read >= rows as f64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{read} of {rows} events after 300 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    peak = peak.max(peak_rss_mib(tg.pid()).unwrap_or(0.0));
    eprintln!("{rows}-row compressed transaction: peak RSS {peak:.1} MiB");
    assert!(peak < 100.0, "peak RSS {peak:.1} MiB for one {rows}-row compressed transaction: memory must stay flat");
    drop(db);
    s.finish(tg).await;
}

/// Columns added, dropped and moved while streaming: every row arrives under the names it had when
/// it was written.
async fn alter_table_mid_stream(server: Server) {
    let mut s = MyScenario::new(server, "alter", "CREATE TABLE t (id int PRIMARY KEY, a varchar(10), b int)").await;
    let mut tg = s.start("", &stdout_sink(), "").await;
    s.db.exec("INSERT INTO t VALUES (1, 'one', 10)").await;
    s.db.exec("ALTER TABLE t ADD COLUMN c varchar(10) DEFAULT 'cc'").await;
    s.db.exec("INSERT INTO t VALUES (2, 'two', 20, 'c2')").await;
    s.db.exec("ALTER TABLE t DROP COLUMN a").await;
    s.db.exec("INSERT INTO t VALUES (3, 30, 'c3')").await;
    // Same types reordered: only names tell them apart.
    s.db.exec("ALTER TABLE t ADD COLUMN d varchar(10) FIRST").await;
    s.db.exec("INSERT INTO t (id, b, c, d) VALUES (4, 40, 'c4', 'd4')").await;
    s.db.exec("ALTER TABLE t MODIFY c varchar(10) AFTER d").await;
    s.db.exec("UPDATE t SET c = 'c4b' WHERE id = 4").await;
    let records = wait_stdout(&mut tg, 5, WAIT).await;
    let after = |i: usize| records[i]["value"]["after"].clone();
    assert_eq!(after(0), json!({"id": 1, "a": "one", "b": 10}));
    assert_eq!(after(1), json!({"id": 2, "a": "two", "b": 20, "c": "c2"}));
    assert_eq!(after(2), json!({"id": 3, "b": 30, "c": "c3"}));
    assert_eq!(after(3), json!({"d": "d4", "id": 4, "b": 40, "c": "c4"}));
    assert_eq!(after(4), json!({"d": "d4", "c": "c4b", "id": 4, "b": 40}));
    // Column order in the JSON follows the table at the time of each row (read from the raw line:
    // serde_json sorts keys).
    let text = std::fs::read_to_string(&tg.stdout).unwrap();
    let line = text.lines().nth(4).unwrap();
    let after = &line[line.find("\"after\"").unwrap()..];
    let at = |k: &str| after.find(&format!("\"{k}\":")).unwrap();
    assert!(at("d") < at("c") && at("c") < at("id") && at("id") < at("b"), "{line}");
    s.finish(tg).await;
}

/// Without binlog_row_metadata = FULL, names come from information_schema and are refreshed on DDL;
/// rows written before a schema change that no longer match their table stop the connector with the
/// fix instead of landing under wrong names.
async fn without_full_metadata(server: Server) {
    let mut s = MyScenario::exclusive(
        server,
        "nolog",
        "CREATE TABLE t (id int PRIMARY KEY, a varchar(10), e enum('x','y'), u int unsigned)",
    )
    .await;
    let minimal = GlobalSettings::set(
        server,
        "SET GLOBAL binlog_row_metadata = 'MINIMAL'",
        "SET GLOBAL binlog_row_metadata = 'FULL'",
    )
    .await;
    let mut tg = s.start("", &stdout_sink(), "").await;
    s.db.exec("INSERT INTO t VALUES (1, 'one', 'y', 4294967295)").await;
    s.db.exec("ALTER TABLE t ADD COLUMN b int").await;
    s.db.exec("INSERT INTO t VALUES (2, 'two', 'x', 1, 22)").await;
    let records = wait_stdout(&mut tg, 2, WAIT).await;
    assert_eq!(records[0]["value"]["after"], json!({"id": 1, "a": "one", "e": "y", "u": 4294967295u64}));
    assert_eq!(records[1]["value"]["after"], json!({"id": 2, "a": "two", "e": "x", "u": 1, "b": 22}));
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");

    // Rows written while tailgate was stopped, then the table changed shape: they cannot be named.
    s.db.exec("INSERT INTO t VALUES (3, 'three', 'x', 3, 33)").await;
    s.db.exec("ALTER TABLE t DROP COLUMN a").await;
    let mut tg = Tailgate::start(&s.dir, &s.config("", &stdout_sink(), ""));
    let status = tg.wait_exit(WAIT).await;
    drop(minimal);
    let log = tg.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("binlog_row_metadata = FULL"), "the error names the fix: {log}");
    assert_eq!(stdout_records(&tg.stdout).len(), 0, "nothing decoded under wrong names");
    s.db.drop().await;
}

/// The end of the binlog now: (file, position).
async fn binlog_end(conn: &mut mysql_async::Conn) -> (String, u64) {
    use mysql_async::prelude::Queryable;
    let row: mysql_async::Row = match conn.query_first("SHOW BINARY LOG STATUS").await {
        Ok(Some(r)) => r,
        _ => conn.query_first("SHOW MASTER STATUS").await.unwrap().unwrap(),
    };
    (row.get(0).unwrap(), row.get(1).unwrap())
}

both_servers!(
    every_operation_arrives_in_commit_order,
    rows_truncate_and_query,
    compressed_binlog_events,
    alter_table_mid_stream,
    without_full_metadata,
);
