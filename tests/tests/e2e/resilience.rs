//! The promise: nothing committed is lost, whatever happens to tailgate, the broker or the slot.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tailgate_e2e::*;

/// Ids of the create events in `records`, with how often each arrived.
fn created_ids(records: &[Record]) -> BTreeMap<i64, usize> {
    let mut ids = BTreeMap::new();
    for r in records {
        if r.op() == Some("c") {
            *ids.entry(r.after()["id"].as_i64().unwrap()).or_insert(0) += 1;
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_any_moment_then_restart_loses_nothing() {
    let _broker = broker_lock().read().await;
    let db = TestDb::new("kill9").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let dir = scratch("kill9");
    let prefix = format!("kill{}", nonce());
    let cfg = config("tg_kill9", &db.url(), &dir, &kafka_sink(&prefix), "");
    let topic = format!("{prefix}.public.t");

    // The slot must exist before the writer starts (snapshot = "never" captures from its creation).
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    tg.kill9().await;

    // A writer commits 60 transactions of 50 rows while tailgate is killed twice mid-stream.
    let writer_db = connect(&db.url()).await;
    let writer = tokio::spawn(async move {
        for batch in 0..60 {
            let first = batch * 50;
            writer_db
                .batch_execute(&format!(
                    "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series({first}, {}) g",
                    first + 49
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    for round in 0..2 {
        let mut tg = Tailgate::start(&dir, &cfg);
        tg.wait_streaming().await;
        tokio::time::sleep(Duration::from_millis(700 + round * 300)).await;
        tg.kill9().await;
    }
    writer.await.unwrap();
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;

    let records = consume(&topic, 3000, Duration::from_secs(60));
    let ids = created_ids(&records);
    let missing: Vec<i64> = (0..3000).filter(|i| !ids.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} rows missing after kill -9, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let duplicates = ids.values().filter(|n| **n > 1).count();
    eprintln!("kill -9 x2: 3000 rows delivered, {duplicates} delivered twice (in flight at the kill)");
    // Per key, commit order: every key was written once, so each duplicate is an exact repeat.
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_stop_checkpoints_and_restart_sends_no_duplicates() {
    let _broker = broker_lock().read().await;
    let db = TestDb::new("graceful").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = scratch("graceful");
    let prefix = format!("grace{}", nonce());
    let cfg = config("tg_graceful", &db.url(), &dir, &kafka_sink(&prefix), "");
    let topic = format!("{prefix}.public.t");

    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t SELECT generate_series(1, 500)").await;
    assert_eq!(consume(&topic, 500, Duration::from_secs(30)).len(), 500);
    let (status, log) = tg.stop().await;
    assert!(status.success(), "SIGTERM exits 0: {log}");
    let offsets = std::fs::read_to_string(dir.join("offsets.json")).unwrap();
    assert!(offsets.contains("\"tg_graceful\""), "{offsets}");
    assert_eq!(db.slot_active_pid("tg_graceful").await, None, "the slot is released");

    db.exec("INSERT INTO t SELECT generate_series(501, 600)").await;
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    let records = consume(&topic, 600, Duration::from_secs(30));
    let ids = created_ids(&records);
    assert_eq!(ids.len(), 600);
    assert!(ids.values().all(|n| *n == 1), "a graceful stop must not cause duplicates");
    tg.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_down_then_up_delivers_everything_and_never_checkpoints_ahead() {
    // Freezes the shared broker: no other Kafka test may run meanwhile.
    let _broker = broker_lock().write().await;
    let db = TestDb::new("brokerdown").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = scratch("brokerdown");
    let prefix = format!("down{}", nonce());
    let cfg = config("tg_brokerdown", &db.url(), &dir, &kafka_sink(&prefix), "");
    let topic = format!("{prefix}.public.t");
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (0)").await;
    assert_eq!(consume(&topic, 1, Duration::from_secs(30)).len(), 1);

    let tansu = tansu_pid();
    signal(tansu, "STOP");
    let frozen = async {
        wait_checkpoint_stable(&db).await;
        // Where the transaction's rows end (its commit comes after): the slot may move up to there
        // (keepalives cover the WAL other tests' databases write meanwhile), never past it.
        let rows_end: i64 = db
            .client
            .query_one(
                "WITH ins AS (INSERT INTO t SELECT generate_series(1, 300) RETURNING 1) \
                 SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint FROM (SELECT count(*) FROM ins) inserted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let during = db.confirmed_flush("tg_brokerdown").await.unwrap();
        (rows_end as u64, during)
    }
    .await;
    signal(tansu, "CONT");
    let (rows_end, during) = frozen;
    assert!(during <= rows_end, "the slot must not pass unacknowledged rows ({during} > {rows_end})");

    let records = consume(&topic, 301, Duration::from_secs(60));
    let ids = created_ids(&records);
    assert_eq!(ids.len(), 301, "every row arrives once the broker is back");
    // And the checkpoint moves again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.confirmed_flush("tg_brokerdown").await.unwrap() <= during {
        assert!(Instant::now() < deadline, "checkpoint did not move after the broker returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

async fn wait_checkpoint_stable(db: &TestDb) -> u64 {
    let mut last = db.confirmed_flush("tg_brokerdown").await.unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let now = db.confirmed_flush("tg_brokerdown").await.unwrap();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connector_keeps_confirming_so_wal_is_not_pinned() {
    let db = TestDb::new("idle").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let other = TestDb::new("idle_other").await;
    other.exec("CREATE TABLE noise (v text)").await;
    let dir = scratch("idle");
    let mut tg = Tailgate::start(&dir, &config("tg_idle", &db.url(), &dir, &stdout_sink(), ""));
    tg.wait_streaming().await;
    // WAL grows through another database: nothing for our publication.
    other.exec("INSERT INTO noise SELECT repeat('n', 100) FROM generate_series(1, 2000)").await;
    let target = db.current_wal().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let confirmed = db.confirmed_flush("tg_idle").await.unwrap();
        if confirmed >= target {
            break;
        }
        assert!(Instant::now() < deadline, "slot stuck at {confirmed}, WAL at {target}:\n{}", tg.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stdout_records(&tg.stdout).is_empty());
    tg.stop().await;
    other.drop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_in_use_and_slot_dropped_are_refused_with_the_fix() {
    let db = TestDb::new("slots").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = scratch("slots");
    let cfg = config("tg_slots", &db.url(), &dir, &stdout_sink(), "");
    let mut first = Tailgate::start(&dir, &cfg);
    first.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (1)").await;
    wait_stdout(&mut first, 1, Duration::from_secs(20)).await;

    // A second connector on the same slot.
    let dir2 = scratch("slots2");
    let cfg2 = config("tg_slots", &db.url(), &dir2, &stdout_sink(), "");
    let mut second = Tailgate::start(&dir2, &cfg2);
    let status = second.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(3), "{}", second.log_text());
    assert!(second.log_text().contains("in use by another process"), "{}", second.log_text());

    let (status, _) = first.stop().await;
    assert!(status.success());

    // The slot disappears while a checkpoint exists: refuse, since changes may be lost.
    db.exec("SELECT pg_drop_replication_slot('tg_slots')").await;
    let mut third = Tailgate::start(&dir, &cfg);
    let status = third.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(3), "{}", third.log_text());
    let log = third.log_text();
    assert!(log.contains("does not exist") && log.contains("offsets reset"), "{log}");

    // The operator accepts the gap; the next run starts afresh.
    let config_path = dir.join("config.toml");
    let (code, out, err) = tailgate_cmd(&["offsets", "reset", "--config", config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, shown, _) = tailgate_cmd(&["offsets", "show", "--config", config_path.to_str().unwrap()]);
    assert!(shown.contains("\"position\":null"), "{shown}");
    let mut fourth = Tailgate::start(&dir, &cfg);
    fourth.wait_streaming().await;
    let (status, _) = fourth.stop().await;
    assert!(status.success());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_down_at_start_then_up_delivers_everything() {
    let _broker = broker_lock().write().await;
    let db = TestDb::new("downstart").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = scratch("downstart");
    let prefix = format!("downstart{}", nonce());
    let cfg = config("tg_downstart", &db.url(), &dir, &kafka_sink(&prefix), "");
    let tansu = tansu_pid();
    signal(tansu, "STOP");
    let mut tg = Tailgate::start(&dir, &cfg);
    let outcome = async {
        tg.wait_streaming().await;
        db.exec("INSERT INTO t SELECT generate_series(1, 50)").await;
        // The topic cannot even be created: tailgate waits and retries, it does not give up.
        tg.wait_for_log("cannot create topic yet; retrying", Duration::from_secs(40)).await;
        db.confirmed_flush("tg_downstart").await.unwrap()
    }
    .await;
    signal(tansu, "CONT");
    let flushed_while_down = outcome;
    let records = consume(&format!("{prefix}.public.t"), 50, Duration::from_secs(60));
    assert_eq!(created_ids(&records).len(), 50, "all rows arrive once the broker is up");
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.confirmed_flush("tg_downstart").await.unwrap() <= flushed_while_down {
        assert!(Instant::now() < deadline, "checkpoint did not move after the broker came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

/// Terminates the connector's walsender (what a failover, a server restart or a network cut does).
async fn terminate_walsender(db: &TestDb, slot: &str) -> bool {
    let row = db
        .client
        .query_one(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) > 0
}

/// A server-side loop commits single-row inserts while the walsender is terminated again and again:
/// every row arrives, exactly once (no crash, so no duplicate either). Decoded transactions used to be
/// dropped with the batch being filled when the termination arrived behind them in the stream, while
/// the reconnect started after them: rows vanished without an error.
#[tokio::test(flavor = "multi_thread")]
async fn walsender_terminated_over_and_over_while_a_server_loop_commits_loses_nothing() {
    const ROWS: i64 = 30_000;
    let s = Scenario::new(
        "storm",
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE PROCEDURE fill(a int, b int) LANGUAGE plpgsql AS $$
         BEGIN FOR i IN a..b LOOP INSERT INTO t VALUES (i); COMMIT; END LOOP; END $$;",
    )
    .await;
    let mut tg = s.start(&stdout_sink(), "").await;
    let writer_db = connect(&s.db.url()).await;
    let writer = tokio::spawn(async move { writer_db.batch_execute(&format!("CALL fill(1, {ROWS})")).await.unwrap() });
    let mut kills = 0;
    let mut pause = 150u64;
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        pause = 100 + (pause * 7919) % 400;
        let reconnects = tg.log_count("reconnecting");
        if terminate_walsender(&s.db, &s.name).await {
            kills += 1;
            tg.wait_for_log_count("reconnecting", reconnects + 1, Duration::from_secs(30)).await;
            // Reconnects that made no progress back off up to 30 s (a loaded machine decodes the
            // backlog slowly, and the next termination may land before the first message).
            tg.wait_for_log_count(": streaming", kills + 1, Duration::from_secs(45)).await;
        }
    }
    writer.await.unwrap();
    assert!(kills >= 3, "only {kills} terminations landed while the loop ran");
    // Whatever arrives within the deadline (a lost row never does), then a moment for extras.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stdout_records(&tg.stdout).len() < ROWS as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = stdout_records(&tg.stdout);
    let mut seen = BTreeMap::new();
    for r in &records {
        *seen.entry(r["value"]["after"]["id"].as_i64().unwrap()).or_insert(0) += 1;
    }
    let missing: Vec<i64> = (1..=ROWS).filter(|i| !seen.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{kills} terminations lost {} rows, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).take(10).collect();
    assert!(twice.is_empty(), "a reconnect repeated rows (no crash happened): {twice:?}");
    eprintln!("{kills} walsender terminations: {ROWS} rows, each exactly once");
    s.finish(tg).await;
}

/// The walsender is terminated in the middle of a large transaction, part of which was already handed
/// to the pipeline: the server sends the transaction again from its start, and what was handed over is
/// not sent twice (a key's history within one run never goes v1, v2, v1, v2).
#[tokio::test(flavor = "multi_thread")]
async fn reconnect_inside_a_large_transaction_resumes_exactly() {
    // Larger than the sink's queue (16 MiB) and the channel together, so that the source is blocked
    // inside the transaction when the walsender goes.
    const ROWS: i64 = 50_000;
    let broker = broker_lock().write().await;
    let db = TestDb::new("midtxn").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let dir = scratch("midtxn");
    let prefix = format!("midtxn{}", nonce());
    let cfg = config("tg_midtxn", &db.url(), &dir, &kafka_sink(&prefix), "");
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    // Rows v = 0 before the frozen broker; the big transaction moves every row to 1, then to 2.
    db.exec(&format!("INSERT INTO t SELECT g, 0 FROM generate_series(1, {ROWS}) g")).await;
    let topic = format!("{prefix}.public.t");
    assert_eq!(consume(&topic, ROWS as usize, Duration::from_secs(60)).len(), ROWS as usize);
    let tansu = tansu_pid();
    signal(tansu, "STOP");
    let thawed = async {
        db.exec("BEGIN; UPDATE t SET v = 1; UPDATE t SET v = 2; COMMIT").await;
        // The pipeline fills against the frozen broker: part of the transaction is handed over.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(terminate_walsender(&db, "tg_midtxn").await, "the walsender runs");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    .await;
    signal(tansu, "CONT");
    let () = thawed;
    tg.wait_for_log("reconnecting", Duration::from_secs(60)).await;
    let records = consume(&topic, 3 * ROWS as usize, Duration::from_secs(90));
    drop(broker);
    let mut history: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for r in &records {
        if let Some(v) = r.value.as_ref().and_then(|v| v["after"]["v"].as_i64()) {
            history.entry(r.after()["id"].as_i64().unwrap()).or_default().push(v);
        }
    }
    let wrong: Vec<_> = history.iter().filter(|(_, h)| h.as_slice() != [0, 1, 2]).take(5).collect();
    assert_eq!(history.len(), ROWS as usize, "every row");
    assert!(wrong.is_empty(), "a reconnect inside the transaction repeated part of it: {wrong:?}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}
