//! Initial snapshots of MySQL and MariaDB: existing rows first, then the binlog from the snapshot's
//! consistent point, with no gap and no duplicate at the seam, without locking writers out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tailgate_e2e::mysql::{MyScenario, Server};
use tailgate_e2e::*;

/// How often each id of `table` arrived as a read or a create, and how many reads there were.
fn ids_by_op(records: &[serde_json::Value], table: &str) -> (HashMap<String, usize>, usize) {
    let mut ids = HashMap::new();
    let mut reads = 0;
    for r in records.iter().filter(|r| r["topic"].as_str().is_some_and(|t| t.ends_with(&format!(".{table}")))) {
        let Some(v) = r["value"].as_object() else { continue };
        if v["op"] == "r" {
            reads += 1;
        }
        if v["op"] == "r" || v["op"] == "c" {
            *ids.entry(r["key"].to_string()).or_insert(0) += 1;
        }
    }
    (ids, reads)
}

async fn snapshot_then_stream_delivers_every_row_exactly_once(server: Server) {
    let mut s = MyScenario::new(
        server,
        "snapseam",
        "CREATE TABLE t (id int PRIMARY KEY, v varchar(40));
         CREATE TABLE nokey (v int);
         CREATE TABLE vacant (id int PRIMARY KEY);",
    )
    .await;
    s.db.insert_series("t", 30_000, "n, CONCAT('row ', n)").await;
    s.db.exec("INSERT INTO nokey VALUES (1), (2), (3)").await;
    let cfg = s.config("snapshot = \"initial\"\nsnapshot_fetch_rows = 2000", &stdout_sink(), "");
    // A writer inserts throughout the start. Its slowest write is printed as a measurement; what
    // is asserted is how the snapshot found its consistent point (no global read lock).
    let mut writer_conn = s.db.another_connection().await;
    let writer = tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        for i in 0..150 {
            let started = Instant::now();
            writer_conn.query_drop(format!("INSERT INTO t VALUES ({}, 'live')", 100_000 + i)).await.unwrap();
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest
    });
    let mut tg = Tailgate::start(&s.dir, &cfg);
    let slowest_write = writer.await.unwrap();
    let records = wait_stdout(&mut tg, 30_153, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = if stdout_records(&tg.stdout).len() > records.len() { stdout_records(&tg.stdout) } else { records };
    let (ids, reads) = ids_by_op(&records, "t");
    assert_eq!(ids.len(), 30_150, "every row, existing or new");
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id.clone()).collect();
    assert!(twice.is_empty(), "rows delivered twice at the seam: {:?}", &twice[..twice.len().min(10)]);
    assert!(reads >= 30_000, "existing rows come from the snapshot");
    let (nokey, _) = ids_by_op(&records, "nokey");
    assert_eq!(nokey.values().sum::<usize>(), 3, "a table without primary key is snapshotted too");
    assert!(records.iter().all(|r| !r["topic"].as_str().unwrap().ends_with(".vacant")));
    let marks: Vec<&str> = records
        .iter()
        .filter(|r| r["value"]["op"] == "r")
        .map(|r| r["value"]["source"]["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(marks.first(), Some(&"first"));
    assert_eq!(marks.last(), Some(&"last"));
    assert!(marks[1..marks.len() - 1].iter().all(|m| *m == "true"));
    // Debezium's snapshot `source`: the consistent point's coordinates, no GTID, server_id 0.
    let first_read = records.iter().find(|r| r["value"]["op"] == "r").unwrap();
    let source = &first_read["value"]["source"];
    assert_eq!((source["server_id"].as_i64(), source["row"].as_i64()), (Some(0), Some(0)), "{source}");
    assert!(source["file"].as_str().is_some_and(|f| !f.is_empty()) && source["pos"].as_i64() > Some(0), "{source}");
    let log = tg.log_text();
    let lock_free = match server {
        Server::Mariadb => "MariadbSnapshotStatus",
        Server::Mysql => "MysqlGtids",
    };
    assert!(log.contains(lock_free) && !log.contains("global read lock"), "a lock-free consistent point: {log}");
    eprintln!("{server:?}: slowest write during the snapshot: {slowest_write:?}");
    s.finish(tg).await;
}

async fn kill_9_mid_snapshot_resumes_from_the_last_delivered_page(server: Server) {
    const ROWS: usize = 200_000;
    let mut s = MyScenario::new(server, "snapkill", "CREATE TABLE t (id int PRIMARY KEY, pad varchar(200))").await;
    s.db.insert_series("t", ROWS as u64, "n, REPEAT('p', 100)").await;
    let cfg = s.config("snapshot = \"initial\"\nsnapshot_fetch_rows = 500", &stdout_sink(), "");
    let first = Tailgate::start(&s.dir, &cfg);
    // Kill -9 as soon as a page's progress reached the offsets file: mid-snapshot.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(s.dir.join("offsets.json")).unwrap_or_default().contains("mysql_snapshot") {
        assert!(Instant::now() < deadline, "no snapshot progress was checkpointed:\n{}", first.log_text());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_out = first.stdout.clone();
    first.kill9().await;
    let delivered_first = stdout_records(&first_out).len();
    assert!(delivered_first < ROWS, "the kill came too late to test a resume ({delivered_first} rows)");

    // A change after the crash comes from the binlog once the resumed snapshot is complete.
    s.db.exec(&format!("INSERT INTO t VALUES ({}, 'after the crash')", ROWS + 1)).await;
    let mut second = Tailgate::start(&s.dir, &cfg);
    second.wait_for_log("resuming an interrupted snapshot", Duration::from_secs(30)).await;
    second.wait_for_log("snapshot completed", Duration::from_secs(180)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = stdout_records(&first_out);
        all.extend(stdout_records(&second.stdout));
        let (ids, _) = ids_by_op(&all, "t");
        if ids.len() > ROWS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} rows after the resume:\n{}",
            ids.len(),
            ROWS + 1,
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let second_reads = stdout_records(&second.stdout).iter().filter(|r| r["value"]["op"] == "r").count();
    assert!(second_reads < ROWS, "the second run started over ({second_reads} rows read again)");
    eprintln!("{server:?}: first run delivered {delivered_first}, the resumed run read {second_reads}");
    s.finish(second).await;
}

/// `initial_only` exits after the snapshot (and has nothing to do the next time); once the binlog
/// position is purged, `initial` refuses while `when_needed` takes a new snapshot.
async fn initial_only_then_when_needed_after_a_purged_binlog(server: Server) {
    let mut s = MyScenario::exclusive(server, "snapmodes", "CREATE TABLE t (id int PRIMARY KEY)").await;
    s.db.insert_series("t", 500, "n").await;
    let with_mode = |s: &MyScenario, mode: &str| s.config(&format!("snapshot = \"{mode}\""), &stdout_sink(), "");
    let mut only = Tailgate::start(&s.dir, &with_mode(&s, "initial_only"));
    let status = only.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", only.log_text());
    assert_eq!(stdout_records(&only.stdout).len(), 500);
    let offsets = std::fs::read_to_string(s.dir.join("offsets.json")).unwrap();
    assert!(offsets.contains("\"type\": \"mysql\""), "the snapshot completed: {offsets}");
    let mut again = Tailgate::start(&s.dir, &with_mode(&s, "initial_only"));
    assert!(again.wait_exit(Duration::from_secs(30)).await.success(), "{}", again.log_text());
    assert_eq!(stdout_records(&again.stdout).len(), 0, "the snapshot is not taken twice");

    // A change lands in the binlog, which is purged before tailgate reads it.
    s.db.exec("INSERT INTO t VALUES (501)").await;
    let stored = s.stored_binlog_file();
    s.db.purge_binlogs_through(&stored).await;
    let mut refused = Tailgate::start(&s.dir, &with_mode(&s, "initial"));
    assert_eq!(refused.wait_exit(Duration::from_secs(30)).await.code(), Some(3), "{}", refused.log_text());
    assert!(refused.log_text().contains("when_needed"), "the error names the fix: {}", refused.log_text());
    let mut tg = Tailgate::start(&s.dir, &with_mode(&s, "when_needed"));
    tg.wait_streaming().await;
    let records = wait_stdout(&mut tg, 501, Duration::from_secs(30)).await;
    assert!(records.iter().all(|r| r["value"]["op"] == "r"), "a new snapshot with the purged change in it");
    s.db.exec("INSERT INTO t VALUES (502)").await;
    let records = wait_stdout(&mut tg, 502, Duration::from_secs(30)).await;
    assert_eq!(records[501]["value"]["op"], "c");
    s.finish(tg).await;
}

/// Keyset pages over every kind of key the snapshot resumes on (composite, text with non-ASCII,
/// binary, temporal), and one scan for a key it cannot page on (ENUM sorts by index): pages of 7
/// rows, every row exactly once.
async fn keys_of_every_kind_page_without_loss(server: Server) {
    let mut s = MyScenario::new(
        server,
        "snapkeys",
        "CREATE TABLE composite (a int, b varchar(20), v int, PRIMARY KEY (a, b));
         CREATE TABLE bin (k varbinary(8) PRIMARY KEY);
         CREATE TABLE tstamp (k datetime(6) PRIMARY KEY);
         CREATE TABLE en (k enum('zeta', 'alpha', 'mid') PRIMARY KEY);
         CREATE TABLE dec_key (k decimal(10, 3) PRIMARY KEY, u bigint unsigned);",
    )
    .await;
    s.db.insert_series("composite", 100, "n % 10, CONCAT('é', n), n").await;
    s.db.insert_series("bin", 50, "UNHEX(LPAD(HEX(n * 5), 4, '0'))").await;
    s.db.insert_series("tstamp", 30, "TIMESTAMP('2024-01-01 00:00:00') + INTERVAL n * 1500 MICROSECOND").await;
    s.db.exec("INSERT INTO en VALUES ('zeta'), ('alpha'), ('mid')").await;
    s.db.insert_series("dec_key", 20, "n / 8, 18446744073709551615 - n").await;
    let cfg = s.config("snapshot = \"initial_only\"\nsnapshot_fetch_rows = 7", &stdout_sink(), "");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    assert!(tg.wait_exit(Duration::from_secs(60)).await.success(), "{}", tg.log_text());
    let records = stdout_records(&tg.stdout);
    for (table, n) in [("composite", 100), ("bin", 50), ("tstamp", 30), ("en", 3), ("dec_key", 20)] {
        let (ids, _) = ids_by_op(&records, table);
        assert_eq!(ids.len(), n, "{table}: every row");
        assert!(ids.values().all(|c| *c == 1), "{table}: no row twice: {ids:?}");
    }
    let log = tg.log_text();
    assert!(log.contains("table=") && log.contains("read in one scan"), "the ENUM key is read in one scan: {log}");
}

async fn a_million_row_snapshot_keeps_memory_flat(server: Server) {
    let mut s = MyScenario::new(server, "snapbig", "CREATE TABLE big (id int PRIMARY KEY, n int, s varchar(20))").await;
    s.db.insert_series("big", 1_000_000, "n, n % 97, CONCAT('row ', n)").await;
    let port = free_port();
    let cfg =
        s.config("snapshot = \"initial_only\"", &stdout_sink(), &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"));
    let mut tg = Tailgate::start_discarding_stdout(&s.dir, &cfg);
    let pid = tg.pid();
    let mut peak = 0.0f64;
    let mut rows = 0.0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(rss) = peak_rss_mib(pid) {
        peak = peak.max(rss);
        if let Some(r) =
            metric(&http_get(port, "/metrics").1, &format!("tailgate_snapshot_rows_total{{connector=\"{}\"}}", s.name))
        {
            rows = r;
        }
        assert!(Instant::now() < deadline, "snapshot of 1M rows did not finish in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
        if matches!(std::fs::read_to_string(format!("/proc/{pid}/stat")), Ok(st) if st.contains(") Z ")) {
            break;
        }
    }
    let status = tg.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", tg.log_text());
    assert!(tg.log_text().contains("rows=1000000"), "all rows read: {}", tg.log_text());
    assert!(rows > 0.0, "progress metric moved");
    eprintln!("{server:?}: 1M-row snapshot, peak RSS {peak:.1} MiB");
    assert!(peak < 128.0, "peak RSS {peak:.1} MiB: memory must stay flat");
    s.db.drop().await;
}

/// `snapshot_parallel = 3`: three connections with one read view (aligned on the binlog position on
/// MariaDB, on the executed GTID set on MySQL) read whole tables at the same time, while a writer
/// inserts: every row exactly once.
async fn parallel_readers_share_one_read_view(server: Server) {
    let mut s = MyScenario::new(
        server,
        "snappar",
        "CREATE TABLE a (id int PRIMARY KEY, v varchar(20)); CREATE TABLE b LIKE a; CREATE TABLE c LIKE a;
         CREATE TABLE d LIKE a; CREATE TABLE nokey (v int)",
    )
    .await;
    for t in ["a", "b", "c", "d"] {
        s.db.insert_series(t, 20_000, "n, CONCAT('row ', n)").await;
    }
    s.db.exec("INSERT INTO nokey VALUES (1), (2)").await;
    let cfg = s.config("snapshot = \"initial\"\nsnapshot_parallel = 3\nsnapshot_fetch_rows = 1000", &stdout_sink(), "");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_for_log("snapshot started", Duration::from_secs(30)).await;
    let mut writer_conn = s.db.another_connection().await;
    let writer = tokio::spawn(async move {
        for i in 0..100 {
            writer_conn.query_drop(format!("INSERT INTO d VALUES ({}, 'live')", 100_000 + i)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    writer.await.unwrap();
    let records = wait_stdout(&mut tg, 80_102, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = if stdout_records(&tg.stdout).len() > records.len() { stdout_records(&tg.stdout) } else { records };
    for (table, n) in [("a", 20_000), ("b", 20_000), ("c", 20_000), ("d", 20_100)] {
        let (ids, _) = ids_by_op(&records, table);
        assert_eq!(ids.len(), n, "{server:?} table {table}: every row");
        assert!(ids.values().all(|k| *k == 1), "{server:?} table {table}: a row delivered twice");
    }
    let marks: Vec<&str> = records
        .iter()
        .filter(|r| r["value"]["op"] == "r")
        .map(|r| r["value"]["source"]["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(marks.iter().filter(|m| **m == "last").count(), 1, "one last");
    assert_eq!(marks.last(), Some(&"last"));
    let log = tg.log_text();
    assert!(log.contains("readers=3"), "{log}");
    s.finish(tg).await;
}

/// The snapshot's connection dies mid-table (KILL, as a failover or a proxy would): tailgate
/// reconnects in-process and goes on after the last page handed over, from the same consistent point.
async fn a_connection_lost_mid_snapshot_is_retried_in_process_without_loss(server: Server) {
    const ROWS: usize = 200_000;
    let mut s = MyScenario::new(
        server,
        "snaplost",
        "CREATE TABLE a (id int PRIMARY KEY, pad varchar(200)); CREATE TABLE b (id int PRIMARY KEY)",
    )
    .await;
    s.db.insert_series("a", ROWS as u64, "n, REPEAT('p', 100)").await;
    s.db.insert_series("b", 1000, "n").await;
    let cfg = s.config("snapshot = \"initial\"\nsnapshot_fetch_rows = 500", &stdout_sink(), "");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    // The whole table takes a fraction of a second to read: watch the processlist closely and
    // kill the SELECT once some rows are out (a cheap file-size check, not a parse of stdout).
    let deadline = Instant::now() + Duration::from_secs(60);
    let reader = loop {
        let written = std::fs::metadata(&tg.stdout).map_or(0, |m| m.len());
        if written > 200_000 {
            let ids: Vec<u64> = s
                .db
                .query(&format!(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = '{}' AND INFO LIKE 'SELECT %' AND ID <> CONNECTION_ID()",
                    s.db.name
                ))
                .await
                .iter()
                .map(|r| r.get(0).unwrap())
                .collect();
            assert!(ids.len() <= 1, "one snapshot SELECT: {ids:?}");
            if let Some(id) = ids.first() {
                break *id;
            }
        }
        let log = tg.log_text();
        assert!(!log.contains("snapshot completed"), "the snapshot ended before its SELECT could be killed:\n{log}");
        assert!(Instant::now() < deadline, "no snapshot SELECT seen:\n{log}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    s.db.exec(&format!("KILL {reader}")).await;
    tg.wait_for_log("reconnecting", Duration::from_secs(30)).await;
    tg.wait_for_log("snapshot completed", Duration::from_secs(120)).await;
    s.db.exec("INSERT INTO b VALUES (1001)").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = stdout_records(&tg.stdout);
        let (a, _) = ids_by_op(&records, "a");
        let (b, _) = ids_by_op(&records, "b");
        if a.len() == ROWS && b.len() == 1001 {
            break;
        }
        assert!(Instant::now() < deadline, "a: {} of {ROWS}, b: {} of 1001:\n{}", a.len(), b.len(), tg.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reads = stdout_records(&tg.stdout).iter().filter(|r| r["value"]["op"] == "r").count();
    assert!(reads < 2 * ROWS, "the retry went on after the last page, not from the start ({reads} reads)");
    s.finish(tg).await;
}

/// Wide rows (25 KB of text each, 100 MB per 4,000 rows) must not multiply memory: batches are cut at
/// a few MB of data, not only at `snapshot_fetch_rows` rows or `batch_size` events.
async fn wide_rows_keep_memory_flat_in_snapshot_and_stream(server: Server) {
    const ROWS: u64 = 4_000;
    let mut s = MyScenario::new(server, "snapwide", "CREATE TABLE wide (id int PRIMARY KEY, doc mediumtext)").await;
    s.db.insert_series("wide", ROWS, "n, REPEAT(LPAD(n, 32, 'abcdefgh'), 800)").await;
    let port = free_port();
    let cfg = s.config("snapshot = \"initial\"", &stdout_sink(), &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"));
    let tg = Tailgate::start_discarding_stdout(&s.dir, &cfg);
    let pid = tg.pid();
    let delivered = |port| {
        metric(&http_get(port, "/metrics").1, &format!("tailgate_records_delivered_total{{connector=\"{}\"}}", s.name))
    };
    let mut peak = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !tg.log_text().contains("snapshot completed") {
        peak = peak.max(peak_rss_mib(pid).unwrap_or(0.0));
        assert!(Instant::now() < deadline, "the snapshot did not finish:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tg.log_text().contains(&format!("rows={ROWS}")), "{}", tg.log_text());
    // One transaction of the same size, streamed.
    s.db.exec(&format!(
        "INSERT INTO wide SELECT id + {ROWS}, REPEAT(LPAD(id + {ROWS}, 32, 'abcdefgh'), 800) FROM wide"
    ))
    .await;
    while delivered(port).unwrap_or(0.0) < (2 * ROWS) as f64 {
        peak = peak.max(peak_rss_mib(pid).unwrap_or(0.0));
        assert!(Instant::now() < deadline, "the transaction was not delivered:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak = peak.max(peak_rss_mib(pid).unwrap_or(0.0));
    eprintln!("{server:?}: wide rows, peak RSS {peak:.1} MiB");
    assert!(peak < 120.0, "peak RSS {peak:.1} MiB for 100 MB of rows: memory must not follow the row width");
    s.finish(tg).await;
}

tailgate_e2e::both_servers!(
    snapshot_then_stream_delivers_every_row_exactly_once,
    a_connection_lost_mid_snapshot_is_retried_in_process_without_loss,
    parallel_readers_share_one_read_view,
    kill_9_mid_snapshot_resumes_from_the_last_delivered_page,
    initial_only_then_when_needed_after_a_purged_binlog,
    keys_of_every_kind_page_without_loss,
    a_million_row_snapshot_keeps_memory_flat,
    wide_rows_keep_memory_flat_in_snapshot_and_stream,
);
