//! Incremental snapshots on PostgreSQL: tables re-read in chunks while streaming goes on.
//!
//! The contract checked here: afterwards, every key's last event equals the row in the database (or
//! is a delete for a row that is gone), and no key's history goes backwards (a chunk row never
//! lands after a newer change of its key). A writer changes random keys throughout.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tailgate_e2e::*;

/// One event of a key: its operation and the row's version (`v`: after image, or before image for
/// a delete), and whether it came from an incremental snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) op: String,
    pub(crate) v: Option<i64>,
    pub(crate) incremental: bool,
}

/// Events per key (`id`), in delivery order; tombstones skipped.
pub(crate) fn history(values: impl Iterator<Item = serde_json::Value>) -> BTreeMap<i64, Vec<Step>> {
    let mut keys: BTreeMap<i64, Vec<Step>> = BTreeMap::new();
    for value in values {
        let Some(op) = value["op"].as_str() else { continue };
        let image = if op == "d" { &value["before"] } else { &value["after"] };
        let id = image["id"].as_i64().unwrap_or_else(|| panic!("no id in {value}"));
        keys.entry(id).or_default().push(Step {
            op: op.to_owned(),
            v: image["v"].as_i64(),
            incremental: value["source"]["snapshot"] == "incremental",
        });
    }
    keys
}

/// The rows of `table` now: id → v.
async fn rows(db: &TestDb, table: &str) -> HashMap<i64, i64> {
    let client = connect(&db.url()).await;
    client
        .query(&format!("SELECT id::bigint, v::bigint FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Checks the contract for one table: versions never go back, a deleted row never comes back with
/// the version it was deleted at, and each key ends in the database's state.
pub(crate) fn assert_converged(keys: &BTreeMap<i64, Vec<Step>>, db: &HashMap<i64, i64>) {
    let mut backwards = Vec::new();
    for (id, steps) in keys {
        for pair in steps.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let regress = match (a.v, b.v) {
                (Some(va), Some(vb)) => vb < va || (a.op == "d" && vb == va),
                _ => false,
            };
            if regress {
                backwards.push(format!("{id}: {a:?} then {b:?}"));
            }
        }
    }
    assert!(
        backwards.is_empty(),
        "{} keys went back in time, e.g. {:?}",
        backwards.len(),
        &backwards[..backwards.len().min(5)]
    );
    let mut wrong = Vec::new();
    for (id, v) in db {
        match keys.get(id).and_then(|s| s.last()) {
            Some(last) if last.op != "d" && last.v == Some(*v) => {}
            other => wrong.push(format!("{id}: database v={v}, last event {other:?}")),
        }
    }
    for (id, steps) in keys {
        if !db.contains_key(id) && steps.last().is_some_and(|s| s.op != "d") {
            wrong.push(format!("{id}: deleted in the database, last event {:?}", steps.last()));
        }
    }
    assert!(wrong.is_empty(), "{} keys differ from the database, e.g. {:?}", wrong.len(), &wrong[..wrong.len().min(5)]);
}

/// A writer changing random keys of `table` (ids up to `max_id`) until `stop`: updates, deletes and
/// upserts, five per transaction, each setting `v` from one sequence, so versions only grow.
fn spawn_writer(url: String, table: &'static str, max_id: u64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = connect(&url).await;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut transactions = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut sql = String::from("BEGIN;");
            for _ in 0..5 {
                let id = 1 + next() % max_id;
                sql.push_str(&match next() % 4 {
                    0 | 1 => format!("UPDATE {table} SET v = nextval('versions') WHERE id = {id};"),
                    2 => format!("DELETE FROM {table} WHERE id = {id};"),
                    _ => format!(
                        "INSERT INTO {table} VALUES ({id}, nextval('versions')) ON CONFLICT (id) DO UPDATE SET v = excluded.v;"
                    ),
                });
            }
            sql.push_str("COMMIT;");
            client.batch_execute(&sql).await.unwrap();
            transactions += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        transactions
    })
}

/// `tailgate snapshot --config <dir>/config.toml <args>`.
pub(crate) fn snapshot_cmd(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let config = dir.join("config.toml");
    let mut all = vec!["snapshot", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    tailgate_cmd(&all)
}

/// Waits until the slot confirmed everything written so far: the stream is drained.
async fn wait_drained(db: &TestDb, slot: &str) {
    let end = db.current_wal().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.confirmed_flush(slot).await.unwrap_or(0) < end {
        assert!(Instant::now() < deadline, "the stream did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn http_section(port: u16) -> String {
    format!("[http]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// The issue's acceptance test: 200k rows, a writer on random keys while the snapshot runs, Kafka.
#[tokio::test(flavor = "multi_thread")]
async fn incremental_snapshot_under_a_concurrent_writer_converges_to_the_database() {
    let _broker = broker_lock().read().await;
    let s = Scenario::new(
        "incr",
        "CREATE SEQUENCE versions START 1;
         CREATE TABLE t (id bigint PRIMARY KEY, v bigint NOT NULL);
         ALTER TABLE t REPLICA IDENTITY FULL;
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 200000) g;",
    )
    .await;
    let prefix = format!("incr{}", nonce());
    let port = free_port();
    let extra = format!("{}\n", http_section(port));
    let cfg = s
        .config(&kafka_sink(&prefix), &extra)
        .replace("status_interval_ms = 200", "status_interval_ms = 200\nsnapshot = \"never\"");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(s.db.url(), "t", 220_000, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let dir = s.dir.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || snapshot_cmd(&dir, &["--table", "public.t", "--wait"])).await.unwrap();
    let took = started.elapsed();
    assert_eq!(code, 0, "tailgate snapshot failed: {out}\n{err}\n{}", tg.log_text());
    assert!(out.contains("done"), "{out}");
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.await.unwrap();
    wait_drained(&s.db, &s.name).await;
    let (_, metrics) = http_get(port, "/metrics");
    let (status, body) = http_get(port, "/snapshots");
    assert_eq!(status, 200);
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["snapshots"][0]["state"], "done", "{body}");
    let (exit, log) = tg.stop().await;
    assert!(exit.success(), "{log}");
    let records = consume_all(&format!("{prefix}.public.t"), Duration::from_secs(3), Duration::from_secs(180));
    let keys = history(records.iter().filter_map(|r| r.value.clone()));
    let db = rows(&s.db, "t").await;
    assert_converged(&keys, &db);
    let reads = keys.values().flatten().filter(|s| s.incremental).count();
    let dropped = metric(&metrics, "tailgate_incremental_rows_dropped_total{connector=\"tg_incr\"}").unwrap_or(0.0);
    eprintln!(
        "incremental snapshot of 200k rows with a writer: {took:?} ({:.0} rows/s), {transactions} writer transactions, \
         {reads} rows read, {dropped} dropped for newer changes, retries {:?}",
        reads as f64 / took.as_secs_f64(),
        metric(&metrics, "tailgate_incremental_chunk_retries_total{connector=\"tg_incr\"}")
    );
    assert!(transactions > 100, "the writer ran alongside ({transactions} transactions)");
    assert!(reads >= 150_000, "the existing rows come from the snapshot ({reads})");
    s.db.drop().await;
}

/// `--where`, two tables at once, a table without a key refused (and accepted with key_columns),
/// pause, resume and cancel, and the HTTP routes.
#[tokio::test(flavor = "multi_thread")]
async fn filtered_snapshots_pause_resume_cancel_and_refusals() {
    let s = Scenario::new(
        "incrctl",
        "CREATE TABLE a (id int PRIMARY KEY, v int); INSERT INTO a SELECT g, 0 FROM generate_series(1, 3000) g;
         CREATE TABLE b (id int PRIMARY KEY, v int); INSERT INTO b SELECT g, 0 FROM generate_series(1, 2000) g;
         CREATE TABLE big (id int PRIMARY KEY, v int); INSERT INTO big SELECT g, 0 FROM generate_series(1, 100000) g;
         CREATE TABLE nokey (id int NOT NULL, v int); INSERT INTO nokey SELECT g, 0 FROM generate_series(1, 10) g;
         CREATE TABLE keyed (code int NOT NULL UNIQUE, v int); INSERT INTO keyed SELECT g, 0 FROM generate_series(1, 10) g;",
    )
    .await;
    let port = free_port();
    let extra = format!("{}[filter.key_columns]\n\"public.keyed\" = [\"code\"]\n", http_section(port));
    let cfg = s.config(&stdout_sink(), &extra).replace(
        "status_interval_ms = 200",
        "status_interval_ms = 200\nsnapshot = \"never\"\nincremental_chunk_rows = 100",
    );
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;

    // Refusals name the fix.
    let (code, _, err) = snapshot_cmd(&s.dir, &["--table", "public.nokey"]);
    assert_ne!(code, 0);
    assert!(err.contains("key_columns"), "{err}");
    let (code, _, err) = snapshot_cmd(&s.dir, &["--table", "public.missing"]);
    assert!(code != 0 && err.contains("does not exist"), "{err}");
    let (code, _, err) = snapshot_cmd(&s.dir, &["--table", "public.a", "--where", "no_such_column > 1"]);
    assert!(code != 0 && err.contains("no_such_column"), "{err}");

    // Two tables at once, filtered; and a table keyed by key_columns.
    let (code, out, err) =
        snapshot_cmd(&s.dir, &["--table", "public.a", "--table", "public.b", "--where", "id % 2 = 0", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = snapshot_cmd(&s.dir, &["--table", "public.keyed", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    let records = wait_stdout(&mut tg, 1500 + 1000 + 10, Duration::from_secs(30)).await;
    let reads = |topic: &str| -> Vec<i64> {
        let mut ids: Vec<i64> = records
            .iter()
            .filter(|r| r["topic"] == topic && r["value"]["source"]["snapshot"] == "incremental")
            .map(|r| r["value"]["after"]["id"].as_i64().or(r["value"]["after"]["code"].as_i64()).unwrap())
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(reads("tg_incrctl.public.a"), (1..=3000).filter(|i| i % 2 == 0).collect::<Vec<_>>());
    assert_eq!(reads("tg_incrctl.public.b"), (1..=2000).filter(|i| i % 2 == 0).collect::<Vec<_>>());
    assert_eq!(reads("tg_incrctl.public.keyed").len(), 10);
    let read = records.iter().find(|r| r["topic"] == "tg_incrctl.public.a").unwrap();
    assert_eq!(read["value"]["op"], "r", "incremental rows are reads: {read}");

    // Pause keeps the place; resume goes on; cancel stops for good.
    let (code, out, _) = snapshot_cmd(&s.dir, &["--table", "public.big"]);
    assert_eq!(code, 0);
    let id: String = out.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    let (code, _, err) = snapshot_cmd(&s.dir, &["--pause", &id]);
    assert_eq!(code, 0, "{err}");
    let count_big = || stdout_records(&tg.stdout).iter().filter(|r| r["topic"] == "tg_incrctl.public.big").count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused_at = count_big();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(count_big(), paused_at, "a paused snapshot reads nothing");
    assert!(paused_at < 100_000);
    let (_, body) = http_get(port, "/snapshots");
    assert!(body.contains("\"paused\""), "{body}");
    assert_eq!(snapshot_cmd(&s.dir, &["--resume", &id]).0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_big() < paused_at + 1000 {
        assert!(Instant::now() < deadline, "resume did not go on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out, err) = snapshot_cmd(&s.dir, &["--cancel", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cancelled"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled_at = count_big();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(count_big(), cancelled_at, "a cancelled snapshot reads nothing more");
    assert!(cancelled_at < 100_000, "cancelled before the end");
    assert!(snapshot_cmd(&s.dir, &["--resume", &id]).0 != 0, "a cancelled snapshot cannot be resumed");

    // The raw HTTP contract: JSON in, ids out; control routes refuse a token-less remote client
    // (checked in unit tests); GET lists.
    let (status, body) = http_request(port, "POST", "/snapshots", r#"{"tables": ["public.a"], "where": "id <= 10"}"#);
    assert_eq!(status, 201, "{body}");
    assert!(body.contains("\"ids\""), "{body}");
    let (status, body) = http_request(port, "POST", "/snapshots", r#"{"tables": []}"#);
    assert_eq!(status, 400, "{body}");
    s.finish(tg).await;
}

/// A table a reload newly includes is snapshotted (snapshot_new_tables), and so is one that a
/// restart with new rules includes.
#[tokio::test(flavor = "multi_thread")]
async fn newly_included_tables_are_snapshotted_on_reload_and_restart() {
    let s = Scenario::new(
        "incrnew",
        "CREATE TABLE a (id int PRIMARY KEY, v int); INSERT INTO a SELECT g, 0 FROM generate_series(1, 100) g;
         CREATE TABLE b (id int PRIMARY KEY, v int); INSERT INTO b SELECT g, 0 FROM generate_series(1, 500) g;
         CREATE TABLE c (id int PRIMARY KEY, v int); INSERT INTO c SELECT g, 0 FROM generate_series(1, 700) g;",
    )
    .await;
    let rules = |tables: &str| format!("[filter]\ninclude_tables = [\"public\\\\.({tables})\"]\n");
    let cfg = |tables: &str| s.config(&stdout_sink(), &rules(tables));
    let mut tg = Tailgate::start(&s.dir, &cfg("a"));
    tg.wait_streaming().await;
    let first = wait_stdout(&mut tg, 100, Duration::from_secs(30)).await;
    assert!(first.iter().all(|r| r["topic"] == "tg_incrnew.public.a"));
    // Reload with b included: its rows arrive as incremental reads.
    std::fs::write(s.dir.join("config.toml"), cfg("a|b")).unwrap();
    signal(tg.pid(), "HUP");
    tg.wait_for_log("newly included table", Duration::from_secs(20)).await;
    let records = wait_stdout(&mut tg, 600, Duration::from_secs(30)).await;
    let b: Vec<_> = records.iter().filter(|r| r["topic"] == "tg_incrnew.public.b").collect();
    assert_eq!(b.len(), 500);
    assert!(b.iter().all(|r| r["value"]["source"]["snapshot"] == "incremental"), "{:?}", b[0]);
    s.db.exec("INSERT INTO b VALUES (9999, 1)").await;
    wait_stdout(&mut tg, 601, Duration::from_secs(30)).await;
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    // Restart with c included too.
    let mut tg = Tailgate::start(&s.dir, &cfg("a|b|c"));
    tg.wait_for_log("newly included table", Duration::from_secs(30)).await;
    let records = wait_stdout(&mut tg, 700, Duration::from_secs(30)).await;
    let c = records.iter().filter(|r| r["topic"] == "tg_incrnew.public.c").count();
    assert_eq!(c, 700, "the restart snapshotted c");
    assert_eq!(records.iter().filter(|r| r["topic"] == "tg_incrnew.public.b").count(), 0, "b was not read again");
    s.finish(tg).await;
}

/// kill -9 in the middle of an incremental snapshot: the restart resumes it after the last
/// acknowledged chunk (not from the start), while streaming resumes where it was.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_snapshot_resumes_at_the_last_acknowledged_chunk() {
    let s = Scenario::new(
        "incrkill",
        "CREATE SEQUENCE versions START 1;
         CREATE TABLE t (id bigint PRIMARY KEY, v bigint NOT NULL);
         ALTER TABLE t REPLICA IDENTITY FULL;
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 60000) g;",
    )
    .await;
    let port = free_port();
    // Small chunks: the snapshot takes seconds, so the kill lands in its middle.
    let cfg = s.config(&stdout_sink(), &http_section(port)).replace(
        "status_interval_ms = 200",
        "status_interval_ms = 200\nsnapshot = \"never\"\nincremental_chunk_rows = 20",
    );
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(s.db.url(), "t", 65_000, stop.clone());
    assert_eq!(snapshot_cmd(&s.dir, &["--table", "public.t"]).0, 0);
    let reads =
        |path: &Path| stdout_records(path).iter().filter(|r| r["value"]["source"]["snapshot"] == "incremental").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reads(&tg.stdout) < 20_000 {
        assert!(Instant::now() < deadline, "the snapshot did not get going:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_out = tg.stdout.clone();
    let log = tg.kill9().await;
    let before_kill = reads(&first_out);
    assert!(!log.contains("incremental snapshot done"), "the snapshot ended before the kill: make it longer");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get(port, "/snapshots");
        if body.contains("\"done\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the snapshot did not finish after the restart: {body}\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_drained(&s.db, &s.name).await;
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    let after_restart = reads(&tg_out(&s.dir, 1));
    let all = stdout_records(&first_out).into_iter().chain(stdout_records(&tg_out(&s.dir, 1)));
    // The restart sends again the streamed changes that were not acknowledged before the kill: a
    // change seen before (same LSN, key and op) is such a duplicate, not a step back in time.
    let mut seen = std::collections::HashSet::new();
    let values = all.map(|r| r["value"].clone()).filter(|v| !v.is_null()).filter(|v| {
        let source = &v["source"];
        source["snapshot"] == "incremental" || {
            let image = if v["op"] == "d" { &v["before"] } else { &v["after"] };
            seen.insert((source["lsn"].as_u64(), image["id"].as_i64(), v["op"].as_str().map(str::to_owned)))
        }
    });
    let keys = history(values);
    assert_converged(&keys, &rows(&s.db, "t").await);
    eprintln!("kill -9 mid incremental snapshot: {before_kill} rows before, {after_restart} after the restart");
    // Starting over would read all 60k again; resuming repeats only what was emitted after the last
    // checkpoint written (offsets flush every 200 ms, and up to 4 chunks were in flight).
    assert!(
        after_restart < 60_000 - before_kill / 4,
        "the restart resumed the snapshot rather than starting over ({before_kill} before, {after_restart} after)"
    );
    s.db.drop().await;
}

/// The stdout file of the `n`-th tailgate started in `dir` (0-based).
pub(crate) fn tg_out(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut outs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "out"))
        .collect();
    outs.sort_by_key(|p| {
        p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.rsplit('-').next()?.parse::<u32>().ok())
    });
    outs[n].clone()
}

/// A user with SELECT and REPLICATION only, every session read-only: the snapshot writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_user_snapshots_incrementally() {
    let s = Scenario::new(
        "incrro",
        "CREATE SEQUENCE versions START 1;
         CREATE TABLE t (id bigint PRIMARY KEY, v bigint NOT NULL);
         ALTER TABLE t REPLICA IDENTITY FULL;
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 20000) g;
         CREATE PUBLICATION tg_incrro FOR TABLE t;",
    )
    .await;
    // Its own statement: a slot cannot be created in a transaction that wrote.
    s.db.exec("SELECT pg_create_logical_replication_slot('tg_incrro', 'pgoutput')").await;
    let admin = connect(&pg_admin_url()).await;
    let _ = admin.batch_execute("DROP ROLE IF EXISTS tg_reader").await;
    admin
        .batch_execute(
            "CREATE ROLE tg_reader LOGIN REPLICATION PASSWORD 'reader'; \
             ALTER ROLE tg_reader SET default_transaction_read_only = on",
        )
        .await
        .unwrap();
    s.db.exec("GRANT SELECT ON t TO tg_reader; REVOKE CREATE ON SCHEMA public FROM PUBLIC").await;
    let cfg = config(&s.name, &s.db.url_as("tg_reader", "reader"), &s.dir, &stdout_sink(), "").replace(
        "status_interval_ms = 200",
        "status_interval_ms = 200\nsnapshot = \"never\"\ncreate_publication = false",
    );
    let cfg = format!("{cfg}{}", http_section(free_port()));
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(s.db.url(), "t", 22_000, stop.clone());
    let dir = s.dir.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || snapshot_cmd(&dir, &["--table", "public.t", "--wait"])).await.unwrap();
    assert_eq!(code, 0, "{out}{err}\n{}", tg.log_text());
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_drained(&s.db, &s.name).await;
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    let keys =
        history(stdout_records(&tg_out(&s.dir, 0)).into_iter().map(|r| r["value"].clone()).filter(|v| !v.is_null()));
    assert_converged(&keys, &rows(&s.db, "t").await);
    s.db.drop().await;
    let _ = admin.batch_execute("DROP ROLE IF EXISTS tg_reader").await;
}

/// A raw HTTP request to 127.0.0.1:`port`: (status, body).
pub(crate) fn http_request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}
