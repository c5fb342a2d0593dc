//! The fault-injection suite: for PostgreSQL, MariaDB and MySQL 9.7, a writer commits changes while
//! tailgate is killed, the broker frozen, the replication connection killed on the server (also while
//! the broker is frozen), the database server restarted, and the rules reloaded before a reconnect,
//! in a random order. Then, from what Kafka holds:
//!
//! - every committed (key, version) arrived: each row is inserted (v = 0), updated twice (v = 1, 2),
//!   and every tenth row deleted;
//! - the last record of every key is its final state (v = 2, or the delete's tombstone);
//! - no duplicate and no step back in a key's history, except across a `kill -9` (what was in flight
//!   may come again after the restart);
//! - rows of a table that a reload included arrive after a reconnect (the reconnect must not fall back
//!   to the rules tailgate started with);
//! - peak memory stays under [`RSS_BOUND_MIB`].
//!
//! The writer's transactions hold 1 to 2,000 rows; a server-side loop adds single-row transactions.
//! Every statement is idempotent (conditional updates, progress kept in the database), so a writer
//! retrying after a server restart commits each version exactly once whatever it saw.
//!
//! Size: `TAILGATE_FAULT_ROWS` rows per engine (default 20,000 from the client plus a twentieth from
//! the loop; each row makes 3 to 4 changes), written over at least `TAILGATE_FAULT_SECS` seconds
//! (default 20, so that the faults land while the writer runs). For a soak run, e.g.
//! `TAILGATE_FAULT_ROWS=330000 TAILGATE_FAULT_SECS=0` (over a million changes per engine): the faults
//! repeat in rounds until the writers are done. `TAILGATE_FAULT_SEED` fixes the order of the faults.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tailgate_e2e::mysql::{MyDb, Server, server_lock};
use tailgate_e2e::*;

/// Peak resident memory tailgate may reach under this load and these faults.
const RSS_BOUND_MIB: f64 = 200.0;
/// The server-side loop's rows start here (the client's start at 1).
const LOOP_BASE: i64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Postgres,
    Mariadb,
    Mysql,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill9,
    FreezeBroker,
    KillReplication,
    KillReplicationWhileFrozen,
    RestartServer,
    ReloadThenReconnect,
}

const ROUND: [Fault; 7] = [
    Fault::Kill9,
    Fault::FreezeBroker,
    Fault::KillReplication,
    Fault::KillReplicationWhileFrozen,
    Fault::RestartServer,
    Fault::ReloadThenReconnect,
    Fault::Kill9,
];

/// A tiny deterministic generator (xorshift): the seed is printed, so a failing order can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A transaction size: mostly small, sometimes up to 2,000 rows.
    fn txn_rows(&mut self) -> i64 {
        match self.below(10) {
            0..=3 => 1 + self.below(5) as i64,
            4..=6 => 5 + self.below(95) as i64,
            7..=8 => 100 + self.below(400) as i64,
            _ => 500 + self.below(1501) as i64,
        }
    }
}

/// One engine's database, as the writer and the faults see it.
struct Target {
    engine: Engine,
    /// Admin URL of this test's database.
    url: String,
    /// Database name (MySQL: the topic's middle part; PostgreSQL: its own database).
    db: String,
}

impl Target {
    fn schema_name(&self) -> &str {
        match self.engine {
            Engine::Postgres => "public",
            _ => &self.db,
        }
    }

    fn include(&self, tables: &str) -> String {
        format!("[filter]\ninclude_tables = [\"{}\\\\.({tables})\"]\n", self.schema_name())
    }
}

/// A connection that survives server restarts by reconnecting, for idempotent statements.
enum Conn {
    Pg(tokio_postgres::Client),
    My(mysql_async::Conn),
}

impl Conn {
    async fn open(target: &Target) -> Option<Conn> {
        match target.engine {
            Engine::Postgres => {
                let (client, conn) = tokio_postgres::connect(&target.url, tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Some(Conn::Pg(client))
            }
            _ => {
                let opts = mysql_async::Opts::from_url(&target.url).ok()?;
                mysql_async::Conn::new(opts).await.ok().map(Conn::My)
            }
        }
    }

    async fn exec(&mut self, sql: &str) -> Result<(), String> {
        use mysql_async::prelude::Queryable;
        match self {
            Conn::Pg(c) => c.batch_execute(sql).await.map_err(|e| e.to_string()),
            Conn::My(c) => c.query_drop(sql).await.map_err(|e| e.to_string()),
        }
    }

    async fn scalar(&mut self, sql: &str) -> Result<i64, String> {
        use mysql_async::prelude::Queryable;
        match self {
            Conn::Pg(c) => c.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0)).map_err(|e| e.to_string()),
            Conn::My(c) => c.query_first::<i64, _>(sql).await.map(Option::unwrap_or_default).map_err(|e| e.to_string()),
        }
    }
}

/// Runs `sql` until it succeeds, reconnecting after failures (the server may be restarting).
async fn until_done(target: &Target, conn: &mut Option<Conn>, sql: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if conn.is_none() {
            *conn = Conn::open(target).await;
        }
        if let Some(c) = conn {
            match c.exec(sql).await {
                Ok(()) => return,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{sql} kept failing: {e}");
                    *conn = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scalar_until_done(target: &Target, sql: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(mut c) = Conn::open(target).await
            && let Ok(v) = c.scalar(sql).await
        {
            return v;
        }
        assert!(Instant::now() < deadline, "{sql} kept failing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn schema_sql(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => {
            "CREATE TABLE f (id bigint PRIMARY KEY, v int NOT NULL, pad text);
             CREATE TABLE g (id bigint PRIMARY KEY);
             CREATE TABLE loop_progress (k int PRIMARY KEY, last bigint NOT NULL);
             CREATE PROCEDURE loop_rows(a bigint, b bigint) LANGUAGE plpgsql AS $$
             DECLARE start bigint;
             BEGIN
               SELECT COALESCE(max(last) + 1, a) INTO start FROM loop_progress WHERE k = 1;
               FOR i IN GREATEST(start, a)..b LOOP
                 INSERT INTO f VALUES (i, 0, 'loop') ON CONFLICT DO NOTHING; COMMIT;
                 UPDATE f SET v = 1 WHERE id = i AND v = 0; COMMIT;
                 UPDATE f SET v = 2 WHERE id = i AND v = 1; COMMIT;
                 IF i % 10 = 0 THEN DELETE FROM f WHERE id = i; END IF;
                 INSERT INTO loop_progress VALUES (1, i) ON CONFLICT (k) DO UPDATE SET last = i; COMMIT;
               END LOOP;
             END $$;"
        }
        _ => {
            "CREATE TABLE f (id bigint PRIMARY KEY, v int NOT NULL, pad text);
             CREATE TABLE g (id bigint PRIMARY KEY);
             CREATE TABLE loop_progress (k int PRIMARY KEY, last bigint NOT NULL);
             CREATE PROCEDURE loop_rows(a bigint, b bigint)
             BEGIN
               DECLARE i bigint;
               SELECT COALESCE(MAX(last) + 1, a) INTO i FROM loop_progress WHERE k = 1;
               SET i = GREATEST(i, a);
               WHILE i <= b DO
                 INSERT IGNORE INTO f VALUES (i, 0, 'loop');
                 UPDATE f SET v = 1 WHERE id = i AND v = 0;
                 UPDATE f SET v = 2 WHERE id = i AND v = 1;
                 START TRANSACTION;
                 IF i % 10 = 0 THEN DELETE FROM f WHERE id = i; END IF;
                 INSERT INTO loop_progress VALUES (1, i) ON DUPLICATE KEY UPDATE last = i;
                 COMMIT;
                 SET i = i + 1;
               END WHILE;
             END"
        }
    }
}

/// One writer step: insert batch `s`, move batch `s-1` to v = 1 and `s-2` to v = 2, delete every
/// tenth row of `s-3`, all in one transaction. Batches are `bounds[s]..bounds[s+1]`.
fn step_sql(engine: Engine, bounds: &[i64], s: usize) -> String {
    let range = |b: usize| (bounds[b], bounds[b + 1] - 1);
    let mut sql = String::new();
    sql.push_str(match engine {
        Engine::Postgres => "BEGIN;",
        _ => "START TRANSACTION;",
    });
    if s + 1 < bounds.len() {
        let (a, b) = range(s);
        sql.push_str(&match engine {
            Engine::Postgres => format!(
                "INSERT INTO f SELECT g, 0, repeat('x', 40) FROM generate_series({a}, {b}) g ON CONFLICT DO NOTHING;"
            ),
            _ => format!(
                "INSERT IGNORE INTO f WITH RECURSIVE s(n) AS (SELECT {a} UNION ALL SELECT n + 1 FROM s WHERE n < {b}) \
                 SELECT n, 0, REPEAT('x', 40) FROM s;"
            ),
        });
    }
    if s >= 1 && s < bounds.len() {
        let (a, b) = range(s - 1);
        sql.push_str(&format!("UPDATE f SET v = 1 WHERE id BETWEEN {a} AND {b} AND v = 0;"));
    }
    if s >= 2 && s - 1 < bounds.len() {
        let (a, b) = range(s - 2);
        sql.push_str(&format!("UPDATE f SET v = 2 WHERE id BETWEEN {a} AND {b} AND v = 1;"));
    }
    if s >= 3 && s - 2 < bounds.len() {
        let (a, b) = range(s - 3);
        sql.push_str(&format!("DELETE FROM f WHERE id BETWEEN {a} AND {b} AND id % 10 = 0;"));
    }
    sql.push_str("COMMIT;");
    sql
}

/// What the writers committed, for the checks.
struct Written {
    /// Client rows `1..client_end`, loop rows `LOOP_BASE..loop_end`.
    client_end: i64,
    loop_end: i64,
}

/// The client writer: steps until every batch went through all its versions. MySQL's recursive
/// CTE needs its depth limit raised for 2,000-row batches.
async fn client_writer(target: Arc<Target>, rows: i64, seed: u64, at_least: Duration) -> i64 {
    let mut rng = Rng(seed | 1);
    let mut bounds = vec![1i64];
    while *bounds.last().unwrap() <= rows {
        let next = bounds.last().unwrap() + rng.txn_rows();
        bounds.push(next);
    }
    let steps = bounds.len() + 3;
    let pace = at_least / steps as u32;
    let mut conn = None;
    for s in 0..steps {
        let started = Instant::now();
        let mut sql = step_sql(target.engine, &bounds, s);
        if target.engine != Engine::Postgres {
            sql = format!("SET SESSION cte_max_recursion_depth = 10000;{sql}");
            if target.engine == Engine::Mariadb {
                sql = sql.replace(
                    "SET SESSION cte_max_recursion_depth = 10000;",
                    "SET SESSION max_recursive_iterations = 10000;",
                );
            }
        }
        until_done(&target, &mut conn, &sql).await;
        tokio::time::sleep(pace.saturating_sub(started.elapsed())).await;
    }
    *bounds.last().unwrap()
}

/// The server-side loop: single-row transactions, in chunks so that a restart costs little.
async fn loop_writer(target: Arc<Target>, rows: i64) -> i64 {
    let mut conn = None;
    let end = LOOP_BASE + rows;
    let mut a = LOOP_BASE;
    while a < end {
        let b = (a + 100).min(end) - 1;
        until_done(&target, &mut conn, &format!("CALL loop_rows({a}, {b})")).await;
        a = b + 1;
    }
    end
}

/// Inserts into `g` (not captured until a reload includes it) until `stop`.
async fn g_writer(target: Arc<Target>, stop: Arc<AtomicBool>, last: Arc<AtomicI64>) {
    let mut conn = None;
    let mut id = 1i64;
    while !stop.load(Ordering::Relaxed) {
        let sql = match target.engine {
            Engine::Postgres => format!("INSERT INTO g VALUES ({id}) ON CONFLICT DO NOTHING"),
            _ => format!("INSERT IGNORE INTO g VALUES ({id})"),
        };
        until_done(&target, &mut conn, &sql).await;
        last.store(id, Ordering::Relaxed);
        id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One record of `f` as the checks need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Row(i64),
    Deleted,
    Tombstone,
}

/// Reads `topic` (one partition) from its start, incrementally: `records` holds (offset, id, version)
/// of everything read so far. The end of the topic is where nothing more arrives for a moment: the
/// broker's high watermark (tansu's) lags behind what it serves, so it cannot tell.
struct TopicReader {
    consumer: BaseConsumer,
    records: Vec<(i64, i64, Version)>,
}

impl TopicReader {
    fn new(topic: &str) -> TopicReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", format!("tailgate-faults-{}", nonce()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        TopicReader { consumer, records: Vec::new() }
    }

    /// Reads until nothing new arrived for `idle`; returns the offset after the last record.
    fn catch_up(&mut self, idle: Duration) -> i64 {
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < idle {
            let Some(message) = self.consumer.poll(Duration::from_millis(100)) else { continue };
            // The topic may not exist yet.
            let Ok(m) = message else { continue };
            quiet_since = Instant::now();
            let key: serde_json::Value = serde_json::from_slice(m.key().expect("keyed")).unwrap();
            let id = key["id"].as_i64().expect("id key");
            let version = match m.payload() {
                None => Version::Tombstone,
                Some(p) => {
                    let v: serde_json::Value = serde_json::from_slice(p).unwrap();
                    match v["op"].as_str() {
                        Some("d") => Version::Deleted,
                        _ => Version::Row(v["after"]["v"].as_i64().unwrap_or(-1)),
                    }
                }
            };
            self.records.push((m.offset(), id, version));
        }
        self.records.last().map_or(0, |(o, _, _)| o + 1)
    }
}

/// The faults, applied to one running connector.
struct Run {
    engine: Engine,
    dir: std::path::PathBuf,
    config: String,
    tg: Option<Tailgate>,
    reader: TopicReader,
    /// End offsets of the topic right after each kill -9: duplicates may only straddle these.
    crash_marks: Vec<i64>,
    peak_rss: f64,
    /// `g`'s last id when the reload took effect; `None` before.
    g_mark: Option<i64>,
    slot: String,
}

impl Run {
    fn tg(&mut self) -> &mut Tailgate {
        self.tg.as_mut().expect("tailgate runs")
    }

    fn sample_rss(&mut self) {
        if let Some(rss) = self.tg.as_ref().and_then(|t| peak_rss_mib(t.pid())) {
            self.peak_rss = self.peak_rss.max(rss);
        }
    }

    async fn start(&mut self) {
        let mut tg = Tailgate::start(&self.dir, &self.config);
        tg.wait_streaming().await;
        self.tg = Some(tg);
    }

    async fn kill9(&mut self) {
        self.sample_rss();
        if let Some(tg) = self.tg.take() {
            tg.kill9().await;
        }
        // Whatever the dead producer had sent is in the topic once it stays quiet for a moment.
        let reader = &mut self.reader;
        let mark = tokio::task::block_in_place(|| reader.catch_up(Duration::from_millis(1500)));
        self.crash_marks.push(mark);
        self.start().await;
    }

    /// Kills the replication connection on the server; returns once tailgate streams again.
    async fn kill_replication(&mut self, target: &Target) {
        let before = self.kill_replication_only(target).await;
        self.await_reconnect(before).await;
    }

    /// Kills the replication connection on the server; returns the log counts to wait on.
    async fn kill_replication_only(&mut self, target: &Target) -> (usize, usize) {
        let before = (self.tg().log_count("reconnecting"), self.tg().log_count(": streaming"));
        match self.engine {
            Engine::Postgres => {
                let sql = format!(
                    "SELECT count(pg_terminate_backend(active_pid))::bigint FROM pg_replication_slots WHERE slot_name = '{}' AND active_pid IS NOT NULL",
                    self.slot
                );
                scalar_until_done(target, &sql).await;
            }
            _ => {
                let log = self.tg().log_text();
                let id: u64 = log
                    .rsplit("connection_id=")
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no connection_id in {log}"));
                let mut conn = None;
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), until_done(target, &mut conn, &format!("KILL {id}")))
                        .await;
            }
        }
        before
    }

    /// Waits until tailgate noticed the lost connection and streams again.
    async fn await_reconnect(&mut self, (reconnects, streams): (usize, usize)) {
        self.tg().wait_for_log_count("reconnecting", reconnects + 1, Duration::from_secs(60)).await;
        self.wait_streaming_again(streams).await;
    }

    async fn wait_streaming_again(&mut self, streams_before: usize) {
        self.tg().wait_for_log_count(": streaming", streams_before + 1, Duration::from_secs(90)).await;
    }
}

async fn restart_server(engine: Engine) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh");
    match engine {
        Engine::Postgres => {
            let out = std::process::Command::new("bash")
                .args(["-c", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -n | tail -1) main restart -m fast"])
                .output()
                .unwrap();
            assert!(out.status.success(), "PostgreSQL restart: {}", String::from_utf8_lossy(&out.stderr));
        }
        Engine::Mariadb => {
            let ok = std::process::Command::new("mariadb-admin").arg("shutdown").status().unwrap().success();
            assert!(ok, "mariadb-admin shutdown");
        }
        Engine::Mysql => tailgate_e2e::mysql::admin(Server::Mysql, "SHUTDOWN").await,
    }
    let target = match engine {
        Engine::Postgres => "postgres",
        Engine::Mariadb => "mariadb",
        Engine::Mysql => "mysql",
    };
    let out = std::process::Command::new("bash").arg(&script).arg(target).output().unwrap();
    assert!(out.status.success(), "services.sh {target}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Freezes the broker for `secs`, optionally killing the replication connection meanwhile; the
/// broker is thawed whatever happens.
struct Frozen(u32);

impl Frozen {
    fn new() -> Frozen {
        let pid = tansu_pid();
        signal(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

async fn fault_suite(engine: Engine) {
    let _broker = broker_lock().write().await;
    let rows: i64 = std::env::var("TAILGATE_FAULT_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let secs: u64 = std::env::var("TAILGATE_FAULT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let seed: u64 = std::env::var("TAILGATE_FAULT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    eprintln!("{engine:?}: fault suite with {rows} rows, TAILGATE_FAULT_SEED={seed}");
    let test = "faults";
    // The database, its lock, and what the writers connect to.
    let (target, mut pg_db, my_db, _my_lock) = match engine {
        Engine::Postgres => {
            let db = TestDb::exclusive(test).await;
            db.exec(schema_sql(engine)).await;
            let target = Target { engine, url: db.url(), db: db.name.clone() };
            (target, Some(db), None, None)
        }
        Engine::Mariadb | Engine::Mysql => {
            let server = if engine == Engine::Mariadb { Server::Mariadb } else { Server::Mysql };
            let lock = server_lock(server).write().await;
            let mut db = MyDb::new(server, test).await;
            db.exec(schema_sql(engine)).await;
            let target = Target { engine, url: db.url(), db: db.name.clone() };
            (target, None, Some(db), Some(lock))
        }
    };
    let target = Arc::new(target);
    let name = match engine {
        Engine::Postgres => "tg_faults".to_owned(),
        _ => target.db.clone(),
    };
    let dir = scratch(&format!("faults_{engine:?}"));
    let prefix = format!("faults{}{}", format!("{engine:?}").to_lowercase(), nonce());
    let sink = kafka_sink(&prefix);
    let make_config = |tables: &str| match engine {
        Engine::Postgres => config(&name, &target.url, &dir, &sink, &target.include(tables)),
        _ => tailgate_e2e::mysql::my_config(
            &name,
            &target.url,
            &dir,
            "snapshot = \"never\"",
            &sink,
            &target.include(tables),
        ),
    };
    let topic = format!("{prefix}.{}.f", target.schema_name());
    let g_topic = format!("{prefix}.{}.g", target.schema_name());
    let mut run = Run {
        engine,
        dir: dir.clone(),
        config: make_config("f"),
        tg: None,
        reader: TopicReader::new(&topic),
        crash_marks: Vec::new(),
        peak_rss: 0.0,
        g_mark: None,
        slot: name.clone(),
    };
    run.start().await;

    let client = tokio::spawn(client_writer(target.clone(), rows, seed, Duration::from_secs(secs)));
    let looped = tokio::spawn(loop_writer(target.clone(), (rows / 20).max(10)));
    let g_stop = Arc::new(AtomicBool::new(false));
    let g_last = Arc::new(AtomicI64::new(0));
    let g = tokio::spawn(g_writer(target.clone(), g_stop.clone(), g_last.clone()));

    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut applied = Vec::new();
    let mut round = 0;
    while round == 0 || !client.is_finished() || !looped.is_finished() {
        let mut faults = ROUND.to_vec();
        for i in (1..faults.len()).rev() {
            faults.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for fault in faults {
            tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
            let started = Instant::now();
            run.sample_rss();
            match fault {
                Fault::Kill9 => run.kill9().await,
                Fault::FreezeBroker => {
                    let frozen = Frozen::new();
                    tokio::time::sleep(Duration::from_millis(2000 + rng.below(3000))).await;
                    drop(frozen);
                }
                Fault::KillReplication => run.kill_replication(&target).await,
                Fault::KillReplicationWhileFrozen => {
                    let frozen = Frozen::new();
                    // Let the pipeline fill up against the frozen broker first. A source blocked on a
                    // full pipeline may notice the lost connection only once the broker is back.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    let before = run.kill_replication_only(&target).await;
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    drop(frozen);
                    run.await_reconnect(before).await;
                }
                Fault::RestartServer => {
                    let streams = run.tg().log_count(": streaming");
                    restart_server(engine).await;
                    run.wait_streaming_again(streams).await;
                }
                Fault::ReloadThenReconnect => {
                    if run.g_mark.is_none() {
                        run.config = make_config("f|g");
                        std::fs::write(dir.join("config.toml"), &run.config).unwrap();
                        let reloads = run.tg().log_count("reloaded");
                        signal(run.tg().pid(), "HUP");
                        run.tg().wait_for_log_count("reloaded", reloads + 1, Duration::from_secs(30)).await;
                        run.g_mark = Some(g_last.load(Ordering::Relaxed));
                    }
                    run.kill_replication(&target).await;
                }
            }
            applied.push((fault, started.elapsed()));
        }
        round += 1;
    }
    let client_end = client.await.unwrap();
    let loop_end = looped.await.unwrap();
    // `g` keeps going a moment after the last fault, so rows after the reconnect exist.
    tokio::time::sleep(Duration::from_millis(500)).await;
    g_stop.store(true, Ordering::Relaxed);
    g.await.unwrap();
    let g_end = g_last.load(Ordering::Relaxed);
    let written = Written { client_end, loop_end };
    eprintln!("{engine:?}: faults applied: {applied:?}");

    // Everything committed must arrive; the final states tell when it has.
    let expected_keys = (written.client_end - 1) + (written.loop_end - LOOP_BASE);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut still_since = Instant::now();
    let mut last: HashMap<i64, Version> = HashMap::new();
    let mut scanned = 0;
    loop {
        run.sample_rss();
        let reader = &mut run.reader;
        let before = reader.records.len();
        tokio::task::block_in_place(|| reader.catch_up(Duration::from_millis(500)));
        for (_, id, v) in &reader.records[scanned..] {
            last.insert(*id, *v);
        }
        scanned = reader.records.len();
        let done = last.iter().filter(|(id, v)| **v == final_version(**id)).count() as i64;
        if done >= expected_keys {
            break;
        }
        if reader.records.len() != before {
            still_since = Instant::now();
        }
        // Nothing new for a while: report what is missing (check_history names it).
        if Instant::now() > deadline || still_since.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{engine:?}: only {done} of {expected_keys} keys reached their final state in Kafka (seed {seed})"
            );
            check_history(engine, &run.reader.records, &written, &run.crash_marks, seed);
            panic!("{engine:?}: keys missing their final state, yet every version arrived?");
        }
    }
    // A moment more, so that duplicates arriving late would be seen too.
    let reader = &mut run.reader;
    tokio::task::block_in_place(|| reader.catch_up(Duration::from_secs(1)));
    let records = std::mem::take(&mut run.reader.records);
    run.sample_rss();
    let (status, log) = run.tg.take().unwrap().stop().await;
    assert!(status.success(), "{log}");

    check_history(engine, &records, &written, &run.crash_marks, seed);
    let g_records = consume(&g_topic, 1, Duration::from_secs(20));
    if let Some(mark) = run.g_mark {
        let got: std::collections::HashSet<i64> =
            g_records.iter().filter_map(|r| r.key.as_ref()?["id"].as_i64()).collect();
        let missing: Vec<i64> = (mark + 1..=g_end).filter(|id| !got.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{engine:?}: {} rows of g, included by a reload, are missing after the reconnect, e.g. {:?} (seed {seed})",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    assert!(
        run.peak_rss < RSS_BOUND_MIB,
        "{engine:?}: peak RSS {:.0} MiB over the {RSS_BOUND_MIB} MiB bound",
        run.peak_rss
    );
    eprintln!(
        "{engine:?}: {} records for {expected_keys} keys, {} kill -9, peak RSS {:.0} MiB: nothing lost",
        records.len(),
        run.crash_marks.len(),
        run.peak_rss
    );
    if let Some(mut db) = pg_db.take() {
        db.reconnect().await;
        db.drop().await;
    }
    if let Some(mut db) = my_db {
        // The test's own connection may have died with a server restart.
        db.conn = db.another_connection().await;
        db.drop().await;
    }
}

/// What the last record of a key must be.
fn final_version(id: i64) -> Version {
    if id % 10 == 0 { Version::Tombstone } else { Version::Row(2) }
}

/// The history checks: every (key, version) arrived; the last record of each key is its final
/// state; within a crash epoch, a key's records never repeat and never go back.
fn check_history(engine: Engine, records: &[(i64, i64, Version)], written: &Written, crash_marks: &[i64], seed: u64) {
    let rank = |v: Version| match v {
        Version::Row(n) => n,
        Version::Deleted => 3,
        Version::Tombstone => 4,
    };
    let epoch = |offset: i64| crash_marks.iter().filter(|m| **m <= offset).count();
    let mut per_key: BTreeMap<i64, Vec<(i64, Version)>> = BTreeMap::new();
    for (offset, id, v) in records {
        per_key.entry(*id).or_default().push((*offset, *v));
    }
    let keys = (1..written.client_end).chain(LOOP_BASE..written.loop_end);
    let mut problems = Vec::new();
    let mut duplicates = 0usize;
    for id in keys {
        let history = per_key.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let mut wanted = vec![Version::Row(0), Version::Row(1), Version::Row(2)];
        if id % 10 == 0 {
            wanted.extend([Version::Deleted, Version::Tombstone]);
        }
        for w in &wanted {
            if !history.iter().any(|(_, v)| v == w) {
                problems.push(format!("key {id}: {w:?} never arrived (history {history:?})"));
            }
        }
        if history.last().map(|(_, v)| *v) != Some(final_version(id)) {
            problems.push(format!("key {id}: last record is not the final state (history {history:?})"));
        }
        for pair in history.windows(2) {
            let ((o1, v1), (o2, v2)) = (pair[0], pair[1]);
            if rank(v2) <= rank(v1) {
                duplicates += 1;
                if epoch(o1) == epoch(o2) {
                    problems.push(format!(
                        "key {id}: {v2:?} at offset {o2} after {v1:?} at {o1} with no crash between (history {history:?})"
                    ));
                }
            }
        }
        if problems.len() > 20 {
            break;
        }
    }
    assert!(problems.is_empty(), "{engine:?} (seed {seed}, crashes at {crash_marks:?}):\n{}", problems.join("\n"));
    eprintln!("{engine:?}: {duplicates} repeated records, all right after a kill -9");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_under_every_fault_loses_nothing() {
    fault_suite(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_under_every_fault_loses_nothing() {
    fault_suite(Engine::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_under_every_fault_loses_nothing() {
    fault_suite(Engine::Mysql).await;
}
