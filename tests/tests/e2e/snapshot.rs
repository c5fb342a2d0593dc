//! Initial snapshots: existing rows first, then changes, with no gap and no duplicate at the seam.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tailgate_e2e::*;

fn ids_by_op(records: &[serde_json::Value], table: &str) -> (HashMap<i64, usize>, usize) {
    let mut ids = HashMap::new();
    let mut snapshot_reads = 0;
    for r in records.iter().filter(|r| r["topic"].as_str().is_some_and(|t| t.ends_with(table))) {
        let Some(v) = r["value"].as_object() else { continue };
        if v["op"] == "r" {
            snapshot_reads += 1;
        }
        if v["op"] == "r" || v["op"] == "c" {
            let id = v["after"]["id"].as_i64().unwrap_or_else(|| panic!("no integer id in {r}"));
            *ids.entry(id).or_insert(0) += 1;
        }
    }
    (ids, snapshot_reads)
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_stream_delivers_every_row_exactly_once_without_locking_writers_out() {
    let db = TestDb::new("snapseam").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 30000) g;
         CREATE TABLE nokey (v int); INSERT INTO nokey VALUES (1), (2), (3);
         CREATE TABLE empty (id int PRIMARY KEY);",
    )
    .await;
    let dir = scratch("snapseam");
    let cfg = config("tg_snapseam", &db.url(), &dir, &stdout_sink(), "").replace(
        "status_interval_ms = 200",
        "status_interval_ms = 200\nsnapshot = \"initial\"\nsnapshot_fetch_rows = 2000",
    );
    // A writer inserts throughout the start. After each insert it checks that no tailgate session
    // holds a lock stronger than ACCESS SHARE (the one a plain SELECT takes) on the captured tables:
    // a lock-free snapshot never blocks writers (catalog locks, e.g. from CREATE PUBLICATION, block
    // no writer). The write latency is printed as a measurement, not asserted.
    let writer_db = connect(&db.url()).await;
    let writer = tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        let mut blocking_locks = Vec::new();
        for i in 0..150 {
            let started = Instant::now();
            writer_db.batch_execute(&format!("INSERT INTO t VALUES ({}, 'live')", 100_000 + i)).await.unwrap();
            slowest = slowest.max(started.elapsed());
            let rows = writer_db
                .query(
                    "SELECT l.mode FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE a.application_name = 'tailgate' AND a.datname = current_database() \
                     AND l.relation IN ('t'::regclass, 'nokey'::regclass, 'empty'::regclass) \
                     AND l.mode <> 'AccessShareLock'",
                    &[],
                )
                .await
                .unwrap();
            blocking_locks.extend(rows.iter().map(|r| r.get::<_, String>(0)));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (slowest, blocking_locks)
    });
    let mut tg = Tailgate::start(&dir, &cfg);
    let (slowest_write, blocking_locks) = writer.await.unwrap();
    let records = wait_stdout(&mut tg, 30_153, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = if stdout_records(&tg.stdout).len() > records.len() { stdout_records(&tg.stdout) } else { records };
    let (ids, reads) = ids_by_op(&records, ".public.t");
    assert_eq!(ids.len(), 30_150, "every row, existing or new");
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    assert!(twice.is_empty(), "rows delivered twice at the seam: {:?}", &twice[..twice.len().min(10)]);
    assert!(reads >= 30_000, "existing rows come from the snapshot");
    let nokey_rows = records.iter().filter(|r| r["topic"] == "tg_snapseam.public.nokey").count();
    assert_eq!(nokey_rows, 3, "a table without primary key is snapshotted too");
    assert!(records.iter().all(|r| r["topic"] != "tg_snapseam.public.empty"));
    let marks: Vec<&str> = records
        .iter()
        .filter(|r| r["value"]["op"] == "r")
        .map(|r| r["value"]["source"]["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(marks.first(), Some(&"first"));
    assert_eq!(marks.last(), Some(&"last"));
    assert!(marks[1..marks.len() - 1].iter().all(|m| *m == "true"));
    assert!(blocking_locks.is_empty(), "tailgate held locks that block writers: {blocking_locks:?}");
    eprintln!("slowest write during the snapshot: {slowest_write:?}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_readers_share_the_snapshot_and_deliver_every_row_once() {
    let db = TestDb::new("snappar").await;
    let mut schema = String::new();
    for t in ["a", "b", "c", "d"] {
        schema += &format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v text); INSERT INTO {t} SELECT g, 'row ' || g FROM generate_series(1, 20000) g;"
        );
    }
    db.exec(&format!(
        "{schema} CREATE TABLE e (id int PRIMARY KEY); CREATE TABLE nokey (v int); INSERT INTO nokey VALUES (1), (2);"
    ))
    .await;
    let dir = scratch("snappar");
    let cfg = config("tg_snappar", &db.url(), &dir, &stdout_sink(), "").replace(
        "status_interval_ms = 200",
        "status_interval_ms = 200\nsnapshot_parallel = 3\nsnapshot_fetch_rows = 1000",
    );
    let writer_db = connect(&db.url()).await;
    let writer = tokio::spawn(async move {
        for i in 0..100 {
            writer_db.batch_execute(&format!("INSERT INTO d VALUES ({}, 'live')", 100_000 + i)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut tg = Tailgate::start(&dir, &cfg);
    writer.await.unwrap();
    let records = wait_stdout(&mut tg, 80_102, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = if stdout_records(&tg.stdout).len() > records.len() { stdout_records(&tg.stdout) } else { records };
    for (table, n) in [("a", 20_000), ("b", 20_000), ("c", 20_000), ("d", 20_100)] {
        let (ids, _) = ids_by_op(&records, &format!(".public.{table}"));
        assert_eq!(ids.len(), n, "table {table}: every row");
        assert!(ids.values().all(|k| *k == 1), "table {table}: a row delivered twice");
    }
    assert_eq!(records.iter().filter(|r| r["topic"] == "tg_snappar.public.nokey").count(), 2);
    let marks: Vec<&str> = records
        .iter()
        .filter(|r| r["value"]["op"] == "r")
        .map(|r| r["value"]["source"]["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(marks.iter().filter(|m| **m == "first").count(), 1, "one first");
    assert_eq!(marks.iter().filter(|m| **m == "last").count(), 1, "one last");
    assert_eq!(marks.last(), Some(&"last"), "the last snapshot record is marked last");
    let log = tg.log_text();
    assert!(log.contains("readers=3"), "{log}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_snapshot_killed_resumes_without_the_tables_already_done() {
    let db = TestDb::new("snapparkill").await;
    const ROWS: usize = 60_000;
    let mut schema = String::new();
    for t in ["a", "b", "c", "d"] {
        schema += &format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, pad text); INSERT INTO {t} SELECT g, repeat('p', 100) FROM generate_series(1, {ROWS}) g;"
        );
    }
    db.exec(&schema).await;
    let dir = scratch("snapparkill");
    let cfg = config("tg_snapparkill", &db.url(), &dir, &stdout_sink(), "").replace(
        "status_interval_ms = 200",
        "status_interval_ms = 200\nsnapshot_parallel = 2\nsnapshot_fetch_rows = 500",
    );
    let first = Tailgate::start(&dir, &cfg);
    // Kill -9 once a finished table reached the offsets file.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(dir.join("offsets.json")).unwrap_or_default().contains("\"public.") {
        assert!(Instant::now() < deadline, "no finished table was checkpointed:\n{}", first.log_text());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_out = first.stdout.clone();
    first.kill9().await;
    let delivered_first = stdout_records(&first_out).len();
    assert!(delivered_first < 4 * ROWS, "the kill came too late to test a resume");

    let mut second = Tailgate::start(&dir, &cfg);
    second.wait_for_log("snapshot completed", Duration::from_secs(120)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = stdout_records(&first_out);
        all.extend(stdout_records(&second.stdout));
        let complete = ["a", "b", "c", "d"].iter().all(|t| ids_by_op(&all, &format!(".public.{t}")).0.len() == ROWS);
        if complete {
            break;
        }
        assert!(Instant::now() < deadline, "rows missing after the resume:\n{}", second.log_text());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let second_reads = stdout_records(&second.stdout).iter().filter(|r| r["value"]["op"] == "r").count();
    assert!(second_reads <= 3 * ROWS, "a finished table was read again ({second_reads} rows)");
    let (status, log) = second.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_lost_mid_snapshot_is_retried_in_process_without_loss() {
    let db = TestDb::new("snaplost").await;
    const ROWS: usize = 200_000;
    db.exec(&format!(
        "CREATE TABLE a (id int PRIMARY KEY, pad text); INSERT INTO a SELECT g, repeat('p', 100) FROM generate_series(1, {ROWS}) g;
         CREATE TABLE b (id int PRIMARY KEY); INSERT INTO b SELECT generate_series(1, 1000);"
    ))
    .await;
    let dir = scratch("snaplost");
    let cfg = config("tg_snaplost", &db.url(), &dir, &stdout_sink(), "")
        .replace("status_interval_ms = 200", "status_interval_ms = 200\nsnapshot_fetch_rows = 500");
    let mut tg = Tailgate::start(&dir, &cfg);
    // Once rows flow, terminate the connection that reads them (the COPY), as a network failure or
    // a restarted pooler would. The table takes a fraction of a second to read: watch closely, with a
    // cheap file-size check rather than a parse of stdout.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::fs::metadata(&tg.stdout).map_or(0, |m| m.len()) > 200_000 {
            let terminated = db
                .client
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'tailgate' AND datname = current_database() AND query LIKE 'COPY%'",
                    &[],
                )
                .await
                .unwrap();
            assert!(terminated.len() <= 1, "one snapshot COPY connection");
            if terminated.len() == 1 {
                break;
            }
        }
        let log = tg.log_text();
        assert!(!log.contains("snapshot completed"), "the snapshot ended before its COPY could be terminated:\n{log}");
        assert!(Instant::now() < deadline, "no snapshot COPY seen:\n{log}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The replication connection still exports the snapshot: the read goes on in it.
    tg.wait_for_log("reading on from the same snapshot", Duration::from_secs(30)).await;
    tg.wait_for_log("snapshot completed", Duration::from_secs(120)).await;
    db.exec("INSERT INTO b VALUES (1001)").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = stdout_records(&tg.stdout);
        let (a, _) = ids_by_op(&records, ".public.a");
        let (b, _) = ids_by_op(&records, ".public.b");
        if a.len() == ROWS && b.len() == 1001 {
            break;
        }
        assert!(Instant::now() < deadline, "a: {} of {ROWS}, b: {} of 1001:\n{}", a.len(), b.len(), tg.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Exactly once: what was sent ends at a marker, and the retry reads on from it in the same
    // snapshot (no repeat within one run).
    let reads = stdout_records(&tg.stdout).iter().filter(|r| r["value"]["op"] == "r").count();
    assert_eq!(reads, ROWS + 1000, "every row read exactly once despite the lost reader");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains("resuming an interrupted snapshot"), "no fresh snapshot was needed: {log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_snapshot_resumes_from_the_last_delivered_page() {
    let db = TestDb::new("snapkill").await;
    const ROWS: usize = 300_000;
    db.exec(&format!("CREATE TABLE t (id int PRIMARY KEY, pad text); INSERT INTO t SELECT g, repeat('p', 100) FROM generate_series(1, {ROWS}) g;"))
        .await;
    let dir = scratch("snapkill");
    let cfg = config("tg_snapkill", &db.url(), &dir, &stdout_sink(), "")
        .replace("status_interval_ms = 200", "status_interval_ms = 200\nsnapshot_fetch_rows = 500");
    let first = Tailgate::start(&dir, &cfg);
    // Kill -9 as soon as a page's progress reached the offsets file: mid-snapshot.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(dir.join("offsets.json")).unwrap_or_default().contains("postgres_snapshot") {
        assert!(Instant::now() < deadline, "no snapshot progress was checkpointed:\n{}", first.log_text());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_out = first.stdout.clone();
    first.kill9().await;
    let delivered_first = stdout_records(&first_out).len();
    assert!(delivered_first < ROWS, "the kill came too late to test a resume ({delivered_first} rows)");

    db.exec(&format!("INSERT INTO t VALUES ({}, 'after the crash')", ROWS + 1)).await;
    let mut second = Tailgate::start(&dir, &cfg);
    second.wait_for_log("resuming an interrupted snapshot", Duration::from_secs(30)).await;
    second.wait_for_log("snapshot completed", Duration::from_secs(120)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut all;
    loop {
        all = stdout_records(&first_out);
        all.extend(stdout_records(&second.stdout));
        let (ids, _) = ids_by_op(&all, ".public.t");
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
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let second_reads = stdout_records(&second.stdout).iter().filter(|r| r["value"]["op"] == "r").count();
    assert!(second_reads < ROWS, "the second run started over ({second_reads} rows read again)");
    eprintln!("first run delivered {delivered_first}, the resumed run read {second_reads}");
    let (status, log) = second.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn initial_only_exits_after_the_snapshot_and_when_needed_snapshots_again_after_a_dropped_slot() {
    let db = TestDb::new("snapmodes").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 500);").await;
    let dir = scratch("snapmodes");
    let with_mode = |mode: &str| {
        config("tg_snapmodes", &db.url(), &dir, &stdout_sink(), "")
            .replace("status_interval_ms = 200", &format!("status_interval_ms = 200\nsnapshot = \"{mode}\""))
    };
    let mut only = Tailgate::start(&dir, &with_mode("initial_only"));
    let status = only.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", only.log_text());
    assert_eq!(stdout_records(&only.stdout).len(), 500);
    let offsets = std::fs::read_to_string(dir.join("offsets.json")).unwrap();
    assert!(offsets.contains("\"type\": \"postgres\""), "the snapshot completed: {offsets}");
    // Again: the snapshot is done, so there is nothing to do (it exits instead of streaming).
    let mut twice = Tailgate::start(&dir, &with_mode("initial_only"));
    let status = twice.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", twice.log_text());
    assert!(stdout_records(&twice.stdout).is_empty(), "{}", twice.log_text());
    assert!(twice.log_text().contains("nothing to do"), "{}", twice.log_text());

    // The slot disappears. `initial` refuses (changes may be lost); `when_needed` snapshots again.
    db.exec("SELECT pg_drop_replication_slot('tg_snapmodes')").await;
    db.exec("INSERT INTO t VALUES (501)").await;
    let mut refused = Tailgate::start(&dir, &with_mode("initial"));
    assert_eq!(refused.wait_exit(Duration::from_secs(30)).await.code(), Some(3), "{}", refused.log_text());
    let mut again = Tailgate::start(&dir, &with_mode("when_needed"));
    again.wait_streaming().await;
    let records = wait_stdout(&mut again, 501, Duration::from_secs(30)).await;
    assert!(records.iter().all(|r| r["value"]["op"] == "r"));
    db.exec("INSERT INTO t VALUES (502)").await;
    let records = wait_stdout(&mut again, 502, Duration::from_secs(30)).await;
    assert_eq!(records[501]["value"]["op"], "c");
    let (status, log) = again.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_snapshot_keeps_memory_flat() {
    let db = TestDb::new("snapbig").await;
    db.exec("CREATE TABLE big (id int PRIMARY KEY, n int, s text); INSERT INTO big SELECT g, g % 97, 'row ' || g FROM generate_series(1, 1000000) g;")
        .await;
    let dir = scratch("snapbig");
    let port = free_port();
    let cfg =
        config("tg_snapbig", &db.url(), &dir, &stdout_sink(), &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"))
            .replace("status_interval_ms = 200", "status_interval_ms = 200\nsnapshot = \"initial_only\"");
    let mut tg = Tailgate::start_discarding_stdout(&dir, &cfg);
    let pid = tg.pid();
    let mut peak = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut rows = 0.0;
    while let Some(rss) = peak_rss_mib(pid) {
        peak = peak.max(rss);
        if let Some(r) = metric(&http_get(port, "/metrics").1, "tailgate_snapshot_rows_total{connector=\"tg_snapbig\"}")
        {
            rows = r;
        }
        assert!(Instant::now() < deadline, "snapshot of 1M rows did not finish in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
        if matches!(std::fs::read_to_string(format!("/proc/{pid}/stat")), Ok(s) if s.contains(") Z ")) {
            break;
        }
    }
    let status = tg.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", tg.log_text());
    assert!(tg.log_text().contains("rows=1000000"), "all rows read: {}", tg.log_text());
    assert!(rows > 0.0, "progress metric moved");
    eprintln!("1M-row snapshot: peak RSS {peak:.1} MiB");
    assert!(peak < 128.0, "peak RSS {peak:.1} MiB: memory must stay flat");
    db.drop().await;
}

/// Wide rows (25 KB of text each, 100 MB per 4,000 rows) must not multiply memory: batches are cut at
/// a few MB of log data, not only at `snapshot_fetch_rows` rows (snapshot) or `batch_size` events
/// (streaming), both of which would hold the whole table or transaction here.
#[tokio::test(flavor = "multi_thread")]
async fn wide_rows_keep_memory_flat_in_snapshot_and_stream() {
    const ROWS: i64 = 4_000;
    let db = TestDb::new("snapwide").await;
    let wide = |from: i64| {
        format!(
            "INSERT INTO wide SELECT g, repeat(md5(g::text), 800) FROM generate_series({from}, {}) g",
            from + ROWS - 1
        )
    };
    db.exec(&format!("CREATE TABLE wide (id int PRIMARY KEY, doc text); {}", wide(1))).await;
    let dir = scratch("snapwide");
    let cfg = config("tg_snapwide", &db.url(), &dir, &stdout_sink(), "");
    let tg = Tailgate::start_discarding_stdout(&dir, &cfg);
    let pid = tg.pid();
    let mut peak = 0.0f64;
    let sample = |peak: &mut f64| *peak = peak.max(peak_rss_mib(pid).unwrap_or(0.0));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !tg.log_text().contains("snapshot completed") {
        sample(&mut peak);
        assert!(Instant::now() < deadline, "the snapshot did not finish:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tg.log_text().contains(&format!("rows={ROWS}")), "{}", tg.log_text());
    let snapshot_peak = peak;
    // One transaction of the same size, streamed.
    db.exec(&wide(ROWS + 1)).await;
    let end = db.current_wal().await;
    while db.confirmed_flush("tg_snapwide").await.unwrap_or(0) < end {
        sample(&mut peak);
        assert!(Instant::now() < deadline, "the transaction was not delivered:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sample(&mut peak);
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    eprintln!("wide rows: peak RSS {snapshot_peak:.1} MiB in the snapshot, {peak:.1} MiB overall");
    assert!(peak < 120.0, "peak RSS {peak:.1} MiB for 100 MB of rows: memory must not follow the row width");
    db.drop().await;
}
