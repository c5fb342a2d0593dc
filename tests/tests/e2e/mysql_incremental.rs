//! Incremental snapshots on MariaDB and MySQL (GTIDs): tables re-read in chunks while streaming goes
//! on, read-only. The contract is PostgreSQL's (see `incremental.rs`): afterwards every key's last
//! event equals the row in the database, and no key's history goes backwards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tailgate_e2e::mysql::{MyScenario, Server};
use tailgate_e2e::*;

use crate::incremental::{Step, assert_converged, history, http_section, snapshot_cmd, tg_out};

tailgate_e2e::both_servers!(
    incremental_snapshot_under_a_concurrent_writer_converges,
    filtered_snapshots_two_tables_pause_cancel_and_refusals,
    kill_9_mid_snapshot_resumes_at_the_last_acknowledged_chunk,
    newly_included_tables_are_snapshotted_on_reload_and_restart,
);

/// The `[source]` lines of these tests: no initial snapshot, and `extra`.
fn source(extra: &str) -> String {
    format!("snapshot = \"never\"\n{extra}")
}

/// The events of `table` in a stdout sink's output, read line by line (the files are large), as
/// key histories. Streamed changes already in `seen` (by binlog file, position and row) are skipped:
/// a restart after kill -9 sends again what was not acknowledged.
fn table_history(out: &Path, table: &str, seen: &mut HashSet<(String, u64, u64)>) -> BTreeMap<i64, Vec<Step>> {
    let file = std::io::BufReader::new(std::fs::File::open(out).unwrap());
    let values = file.lines().map_while(Result::ok).filter(|l| !l.trim().is_empty()).filter_map(|line| {
        let record: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let value = record.get("value")?;
        let source = &value["source"];
        if source["table"] != table {
            return None;
        }
        if source["snapshot"] == "false" {
            let at = (
                source["file"].as_str().unwrap_or_default().to_owned(),
                source["pos"].as_u64().unwrap_or_default(),
                source["row"].as_u64().unwrap_or_default(),
            );
            if !seen.insert(at) {
                return None;
            }
        }
        Some(value.clone())
    });
    history(values)
}

/// Merges the histories of consecutive runs (the first run's events first).
fn merged(runs: Vec<BTreeMap<i64, Vec<Step>>>) -> BTreeMap<i64, Vec<Step>> {
    let mut all: BTreeMap<i64, Vec<Step>> = BTreeMap::new();
    for run in runs {
        for (id, steps) in run {
            all.entry(id).or_default().extend(steps);
        }
    }
    all
}

/// The rows of `table` now: id → v.
async fn rows(s: &mut MyScenario, table: &str) -> HashMap<i64, i64> {
    let rows: Vec<(i64, i64)> = s.db.conn.query(format!("SELECT id, v FROM {table}")).await.unwrap();
    rows.into_iter().collect()
}

/// A writer changing random keys of `table` (ids up to `max_id`) until `stop`: updates, deletes and
/// upserts, ten per transaction, each setting `v` from a counter that only grows (one writer, so
/// versions grow in commit order).
async fn spawn_writer(
    s: &MyScenario,
    table: &'static str,
    max_id: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let mut conn = s.db.another_connection().await;
    tokio::spawn(async move {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut version = 1u64;
        let mut transactions = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut sql = String::from("START TRANSACTION;");
            for _ in 0..10 {
                let id = 1 + next() % max_id;
                version += 1;
                sql.push_str(&match next() % 4 {
                    0 | 1 => format!("UPDATE {table} SET v = {version} WHERE id = {id};"),
                    2 => format!("DELETE FROM {table} WHERE id = {id};"),
                    _ => format!("INSERT INTO {table} VALUES ({id}, {version}) ON DUPLICATE KEY UPDATE v = {version};"),
                });
            }
            sql.push_str("COMMIT");
            conn.query_drop(&sql).await.unwrap();
            transactions += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        transactions
    })
}

/// Waits until every change made so far reached `out`: writes a row to `fence` and waits for its
/// event (the newest line, so only the file's end is read).
async fn wait_drained(s: &mut MyScenario, out: &Path, n: u32) {
    s.db.exec(&format!("INSERT INTO fence VALUES ({n})")).await;
    let needle = "\"table\":\"fence\"";
    let id = format!("\"id\":{n}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut file = std::fs::File::open(out).unwrap();
        let len = file.metadata().unwrap().len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 << 10))).unwrap();
        let mut tail = String::new();
        let _ = file.read_to_string(&mut tail);
        if tail.lines().any(|l| l.contains(needle) && l.contains(&id)) {
            return;
        }
        assert!(Instant::now() < deadline, "the stream did not drain (no fence {n} in {})", out.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tailgate snapshot` on a blocking thread (it waits for the answer).
async fn snapshot(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let dir: PathBuf = dir.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        snapshot_cmd(&dir, &args)
    })
    .await
    .unwrap()
}

/// Incremental reads of `table` in a stdout output.
fn reads(out: &Path, table: &str) -> usize {
    let file = std::io::BufReader::new(std::fs::File::open(out).unwrap());
    let mark = format!("\"table\":\"{table}\"");
    file.lines()
        .map_while(Result::ok)
        .filter(|l| l.contains("\"snapshot\":\"incremental\"") && l.contains(&mark))
        .count()
}

/// How long the incremental reads of `table` took, by their `source.ts_us` (the moment each chunk was
/// emitted): the first `first` reads, and the rest.
fn read_spans(out: &Path, table: &str, first: usize) -> (Duration, Duration) {
    let file = std::io::BufReader::new(std::fs::File::open(out).unwrap());
    let mark = format!("\"table\":\"{table}\"");
    let mut spans = [(u64::MAX, 0u64), (u64::MAX, 0u64)];
    let mut n = 0;
    for line in file.lines().map_while(Result::ok) {
        if !line.contains("\"snapshot\":\"incremental\"") || !line.contains(&mark) {
            continue;
        }
        // The first ts_us of a line is the source block's.
        let ts: u64 = line
            .split("\"ts_us\":")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|digits| digits.parse().ok())
            .unwrap_or_else(|| panic!("no ts_us in {line}"));
        let span = &mut spans[usize::from(n >= first)];
        span.0 = span.0.min(ts);
        span.1 = span.1.max(ts);
        n += 1;
    }
    let length = |(from, to): (u64, u64)| Duration::from_micros(to.saturating_sub(from));
    (length(spans[0]), length(spans[1]))
}

/// The acceptance test: 200k rows, a writer on random keys while the snapshot runs; every key ends
/// in the database's state and no key goes back. A 50k-row filtered snapshot before the writer
/// starts measures the rate without it.
async fn incremental_snapshot_under_a_concurrent_writer_converges(server: Server) {
    let mut s = MyScenario::new(
        server,
        "incr",
        "CREATE TABLE t (id bigint PRIMARY KEY, v bigint NOT NULL); CREATE TABLE fence (id int PRIMARY KEY);",
    )
    .await;
    s.db.insert_series("t", 200_000, "n, 0").await;
    let port = free_port();
    let tg = s.start(&source(""), &stdout_sink(), &http_section(port)).await;
    let db_t = format!("{}.t", s.db.name);

    let started = Instant::now();
    let (code, out, err) = snapshot(&s.dir, &["--table", &db_t, "--where", "id <= 50000", "--wait"]).await;
    let quiet = started.elapsed();
    assert_eq!(code, 0, "{out}{err}\n{}", tg.log_text());

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&s, "t", 220_000, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (code, out, err) = snapshot(&s.dir, &["--table", &db_t, "--wait"]).await;
    let busy = started.elapsed();
    assert_eq!(code, 0, "tailgate snapshot failed: {out}\n{err}\n{}", tg.log_text());
    assert!(out.contains("done"), "{out}");
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.await.unwrap();
    let stdout = tg.stdout.clone();
    wait_drained(&mut s, &stdout, 1).await;
    let (_, metrics) = http_get(port, "/metrics");
    let (status, body) = http_get(port, "/snapshots");
    assert_eq!(status, 200);
    assert!(body.matches("\"done\"").count() == 2, "{body}");
    let keys = table_history(&stdout, "t", &mut HashSet::new());
    let db = rows(&mut s, "t").await;
    assert_converged(&keys, &db);
    let read = keys.values().flatten().filter(|step| step.incremental).count();
    let series = |name: &str| metric(&metrics, &format!("{name}{{connector=\"{}\"}}", s.name)).unwrap_or(-1.0);
    // `--wait` polls once a second: the chunks' own times measure the rate.
    let (quiet_span, busy_span) = read_spans(&stdout, "t", 50_000);
    eprintln!(
        "{server:?} incremental snapshot (debug build, stdout sink): 50k rows alone in {quiet_span:?} ({:.0} rows/s; \
         --wait returned after {quiet:?}); 200k rows with a writer in {busy_span:?} ({:.0} rows/s; --wait: {busy:?}; \
         {transactions} writer transactions); {read} rows read in all, {} dropped for newer changes, {} chunk retries",
        50_000.0 / quiet_span.as_secs_f64().max(0.001),
        (read - 50_000) as f64 / busy_span.as_secs_f64().max(0.001),
        series("tailgate_incremental_rows_dropped_total"),
        series("tailgate_incremental_chunk_retries_total"),
    );
    assert!(transactions > 100, "the writer ran alongside ({transactions} transactions)");
    assert!(read >= 50_000 + 150_000, "the existing rows come from the snapshots ({read})");
    s.finish(tg).await;
}

/// `--where`, two tables at once, a table keyed by `[filter.key_columns]`, refusals that name the
/// fix, pause and cancel.
async fn filtered_snapshots_two_tables_pause_cancel_and_refusals(server: Server) {
    let mut s = MyScenario::new(
        server,
        "incrctl",
        "CREATE TABLE a (id int PRIMARY KEY, v int);
         CREATE TABLE b (id int PRIMARY KEY, v int);
         CREATE TABLE big (id int PRIMARY KEY, v int);
         CREATE TABLE nokey (id int NOT NULL, v int);
         CREATE TABLE keyed (code int NOT NULL UNIQUE, v int);
         CREATE TABLE floaty (f double PRIMARY KEY);",
    )
    .await;
    s.db.insert_series("a", 3000, "n, 0").await;
    s.db.insert_series("b", 2000, "n, 0").await;
    s.db.insert_series("big", 100_000, "n, 0").await;
    s.db.insert_series("nokey", 10, "n, 0").await;
    s.db.insert_series("keyed", 10, "n, 0").await;
    let db = s.db.name.clone();
    let port = free_port();
    let extra = format!("{}[filter.key_columns]\n\"{db}.keyed\" = [\"code\"]\n", http_section(port));
    let mut tg = s.start(&source("incremental_chunk_rows = 100"), &stdout_sink(), &extra).await;
    let table = |t: &str| format!("{db}.{t}");

    // Refusals name the fix.
    let (code, _, err) = snapshot(&s.dir, &["--table", &table("nokey")]).await;
    assert!(code != 0 && err.contains("key_columns"), "{err}");
    let (code, _, err) = snapshot(&s.dir, &["--table", &table("missing")]).await;
    assert!(code != 0 && err.contains("does not exist"), "{err}");
    let (code, _, err) = snapshot(&s.dir, &["--table", &table("a"), "--where", "no_such_column > 1"]).await;
    assert!(code != 0 && err.contains("no_such_column"), "{err}");
    let (code, _, err) = snapshot(&s.dir, &["--table", &table("a"), "--where", "1) -- "]).await;
    assert!(code != 0 && err.contains("one SQL expression"), "{err}");
    let (code, _, err) = snapshot(&s.dir, &["--table", &table("floaty")]).await;
    assert!(code != 0 && err.contains("cannot be ordered"), "{err}");
    let (code, _, err) = snapshot(&s.dir, &["--table", "mysql.user"]).await;
    assert!(code != 0 && err.contains("never captured"), "{err}");
    let (code, _, err) = snapshot(&s.dir, &["--table", "elsewhere.t"]).await;
    assert!(code != 0 && err.contains("outside database"), "{err}");

    // Two tables at once, filtered; and a table keyed by key_columns.
    let (code, out, err) =
        snapshot(&s.dir, &["--table", &table("a"), "--table", &table("b"), "--where", "id % 2 = 0", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = snapshot(&s.dir, &["--table", &table("keyed"), "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let records = wait_stdout(&mut tg, 1500 + 1000 + 10, Duration::from_secs(30)).await;
    let read_ids = |t: &str| -> Vec<i64> {
        let mut ids: Vec<i64> = records
            .iter()
            .filter(|r| r["value"]["source"]["table"] == t && r["value"]["source"]["snapshot"] == "incremental")
            .map(|r| r["value"]["after"]["id"].as_i64().or(r["value"]["after"]["code"].as_i64()).unwrap())
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(read_ids("a"), (1..=3000).filter(|i| i % 2 == 0).collect::<Vec<_>>());
    assert_eq!(read_ids("b"), (1..=2000).filter(|i| i % 2 == 0).collect::<Vec<_>>());
    assert_eq!(read_ids("keyed"), (1..=10).collect::<Vec<_>>());
    let read = records.iter().find(|r| r["value"]["source"]["table"] == "a").unwrap();
    assert_eq!(read["value"]["op"], "r", "incremental rows are reads: {read}");
    assert_eq!(read["value"]["source"]["connector"], server.connector());

    // Pause keeps the place; resume goes on; cancel stops for good.
    let (code, out, err) = snapshot(&s.dir, &["--table", &table("big")]).await;
    assert_eq!(code, 0, "{out}{err}");
    let id: String = out.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    assert_eq!(snapshot(&s.dir, &["--pause", &id]).await.0, 0);
    let stdout = tg.stdout.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused_at = reads(&stdout, "big");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reads(&stdout, "big"), paused_at, "a paused snapshot reads nothing");
    assert!(paused_at < 100_000);
    assert_eq!(snapshot(&s.dir, &["--resume", &id]).await.0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while reads(&stdout, "big") < paused_at + 500 {
        assert!(Instant::now() < deadline, "resume did not go on");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, out, err) = snapshot(&s.dir, &["--cancel", &id]).await;
    assert_eq!(code, 0, "{out}{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled_at = reads(&stdout, "big");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reads(&stdout, "big"), cancelled_at, "a cancelled snapshot reads nothing more");
    eprintln!("{server:?} pause/cancel: paused at {paused_at} rows, cancelled at {cancelled_at} of 100000");
    assert!(cancelled_at < 100_000, "cancelled before the end ({cancelled_at})");
    s.finish(tg).await;
}

/// kill -9 in the middle of an incremental snapshot, under a writer: the restart resumes it after the
/// last acknowledged chunk (not from the start), while streaming resumes where it was.
async fn kill_9_mid_snapshot_resumes_at_the_last_acknowledged_chunk(server: Server) {
    let mut s = MyScenario::new(
        server,
        "incrkill",
        "CREATE TABLE t (id bigint PRIMARY KEY, v bigint NOT NULL); CREATE TABLE fence (id int PRIMARY KEY);",
    )
    .await;
    s.db.insert_series("t", 30_000, "n, 0").await;
    let port = free_port();
    let cfg = s.config(&source("incremental_chunk_rows = 200"), &stdout_sink(), &http_section(port));
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&s, "t", 32_000, stop.clone()).await;
    let (code, out, err) = snapshot(&s.dir, &["--table", &format!("{}.t", s.db.name)]).await;
    assert_eq!(code, 0, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reads(&tg.stdout, "t") < 10_000 {
        assert!(Instant::now() < deadline, "the snapshot did not get going:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_out = tg.stdout.clone();
    tg.kill9().await;
    let before_kill = reads(&first_out, "t");
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
    let second_out = tg_out(&s.dir, 1);
    wait_drained(&mut s, &second_out, 1).await;
    let after_restart = reads(&second_out, "t");
    let mut seen = HashSet::new();
    let first = table_history(&first_out, "t", &mut seen);
    let keys = merged(vec![first, table_history(&second_out, "t", &mut seen)]);
    assert_converged(&keys, &rows(&mut s, "t").await);
    eprintln!(
        "{server:?} kill -9 mid incremental snapshot: {before_kill} rows before, {after_restart} after the restart"
    );
    // Starting over would read all 30k again; resuming repeats only what was emitted after the last
    // checkpoint written (offsets flush every 200 ms, and up to 4 chunks were in flight).
    assert!(
        after_restart < 30_000 - before_kill / 4,
        "the restart resumed the snapshot rather than starting over ({before_kill} before, {after_restart} after)"
    );
    s.finish(tg).await;
}

/// A table a reload newly includes is snapshotted (snapshot_new_tables), and so is one that a
/// restart with new rules includes; tables already captured are not read again.
async fn newly_included_tables_are_snapshotted_on_reload_and_restart(server: Server) {
    let mut s = MyScenario::new(
        server,
        "incrnew",
        "CREATE TABLE a (id int PRIMARY KEY, v int);
         CREATE TABLE b (id int PRIMARY KEY, v int);
         CREATE TABLE c (id int PRIMARY KEY, v int);",
    )
    .await;
    s.db.insert_series("a", 100, "n, 0").await;
    s.db.insert_series("b", 500, "n, 0").await;
    s.db.insert_series("c", 700, "n, 0").await;
    let db = s.db.name.clone();
    let configs: Vec<String> = ["a", "a|b", "a|b|c"]
        .iter()
        .map(|tables| {
            let rules = format!("[filter]\ninclude_tables = [\"{db}\\\\.({tables})\"]\n");
            // The initial snapshot reads a.
            s.config("snapshot = \"initial\"", &stdout_sink(), &rules)
        })
        .collect();
    let cfg = |tables: &str| configs[tables.matches('|').count()].clone();
    let mut tg = Tailgate::start(&s.dir, &cfg("a"));
    tg.wait_streaming().await;
    let first = wait_stdout(&mut tg, 100, Duration::from_secs(30)).await;
    assert!(first.iter().all(|r| r["value"]["source"]["table"] == "a"));
    // Reload with b included: its rows arrive as incremental reads.
    std::fs::write(s.dir.join("config.toml"), cfg("a|b")).unwrap();
    signal(tg.pid(), "HUP");
    tg.wait_for_log("newly included table", Duration::from_secs(20)).await;
    let records = wait_stdout(&mut tg, 600, Duration::from_secs(30)).await;
    let b: Vec<_> = records.iter().filter(|r| r["value"]["source"]["table"] == "b").collect();
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
    let c = records.iter().filter(|r| r["value"]["source"]["table"] == "c").count();
    assert_eq!(c, 700, "the restart snapshotted c");
    assert_eq!(records.iter().filter(|r| r["value"]["source"]["table"] == "b").count(), 0, "b was not read again");
    s.finish(tg).await;
}
