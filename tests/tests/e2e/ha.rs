//! High availability, with real processes: several instances of one connector share the offsets
//! table in the source database; one streams, the others stand by. With a writer running:
//! - `kill -9` of the leader: a standby streams within seconds, nothing is lost;
//! - the leader frozen (SIGSTOP) longer than the lease: a standby takes over; woken up (SIGCONT), the
//!   old leader steps down without checkpointing (its writes are fenced);
//! - a rolling restart of three instances loses nothing;
//! - an instance started from an empty work directory resumes from the shared store.
//!
//! Takeover times are printed; `TAILGATE_HA_TAKEOVERS` repeats the kill -9 takeover for a report.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tailgate_e2e::mysql::{MyDb, Server, my_config, server_lock};
use tailgate_e2e::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Postgres,
    Mariadb,
    Mysql,
}

/// Seconds a frozen leader keeps the lease in these tests.
const LEASE_S: u64 = 4;

struct Cluster {
    engine: Engine,
    name: String,
    url: String,
    offsets_table: String,
    root: PathBuf,
}

impl Cluster {
    /// The config of instance `instance` (its own work directory: nothing local is shared).
    fn config(&self, instance: &str) -> (PathBuf, String) {
        let dir = self.root.join(instance);
        std::fs::create_dir_all(&dir).unwrap();
        let extra = format!("[ha]\nlease_s = {LEASE_S}\nmax_stall_s = 120\ninstance = \"{instance}\"\n",);
        let offsets = format!("store = \"database\"\ntable = \"{}\"\n", self.offsets_table);
        let text = match self.engine {
            Engine::Postgres => config(&self.name, &self.url, &dir, &stdout_sink(), &extra)
                .replace("[source]\n", "[source]\nsnapshot = \"never\"\n"),
            _ => my_config(&self.name, &self.url, &dir, "snapshot = \"never\"", &stdout_sink(), &extra),
        };
        // The shared store replaces the offsets file.
        let text = text.replace("[offsets]\n", &format!("[offsets]\n{offsets}"));
        (dir, text)
    }

    fn start(&self, instance: &str) -> Tailgate {
        let (dir, text) = self.config(instance);
        Tailgate::start(&dir, &text)
    }
}

/// Inserts ids 1.. into `t`, one per transaction, until stopped; the last id committed.
fn spawn_writer(
    engine: Engine,
    url: String,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut id = 1i64;
        while !stop.load(Ordering::Relaxed) {
            let ok = match engine {
                Engine::Postgres => {
                    let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    tokio::spawn(conn);
                    let mut ok = true;
                    while ok && !stop.load(Ordering::Relaxed) {
                        ok = client.execute("INSERT INTO t VALUES ($1)", &[&(id as i32)]).await.is_ok();
                        if ok {
                            last.store(id, Ordering::Relaxed);
                            id += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    ok
                }
                _ => {
                    use mysql_async::prelude::Queryable;
                    // The server may be restarting (other tests): retry the connection.
                    let Ok(mut conn) = mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap()).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let mut ok = true;
                    while ok && !stop.load(Ordering::Relaxed) {
                        ok = conn.exec_drop("INSERT INTO t VALUES (?)", (id,)).await.is_ok();
                        if ok {
                            last.store(id, Ordering::Relaxed);
                            id += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    ok
                }
            };
            if !ok {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    })
}

/// Waits until `tg` leads (its log says so); the time it took.
async fn wait_leader(tg: &mut Tailgate, nth: usize, timeout: Duration) -> Duration {
    let started = Instant::now();
    tg.wait_for_log_count("leader: streaming", nth, timeout).await;
    started.elapsed()
}

async fn ha_suite(engine: Engine) {
    // Database objects per engine; the writer, and what the instances share.
    let takeovers: usize = std::env::var("TAILGATE_HA_TAKEOVERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let (_pg, _my, _lock, cluster) = match engine {
        Engine::Postgres => {
            let db = TestDb::new("ha").await;
            db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
            let cluster = Cluster {
                engine,
                name: "tg_ha".into(),
                url: db.url(),
                offsets_table: "tailgate_ha.offsets".into(),
                root: scratch("ha_pg"),
            };
            (Some(db), None, None, cluster)
        }
        Engine::Mariadb | Engine::Mysql => {
            let server = if engine == Engine::Mariadb { Server::Mariadb } else { Server::Mysql };
            let lock = server_lock(server).read().await;
            let mut db = MyDb::new(server, "ha").await;
            db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
            let cluster = Cluster {
                engine,
                name: db.name.clone(),
                url: db.url(),
                offsets_table: format!("{}.tailgate_offsets", db.name),
                root: scratch(&format!("ha_{}", server.tag())),
            };
            (None, Some(db), Some(lock), cluster)
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicI64::new(0));

    // a leads, b stands by; the writer runs throughout.
    let mut a = cluster.start("a");
    wait_leader(&mut a, 1, Duration::from_secs(30)).await;
    // The slot exists (snapshot = "never" captures from its creation) once the source streams.
    a.wait_for_log("source: streaming", Duration::from_secs(30)).await;
    let mut b = cluster.start("b");
    b.wait_for_log("standby", Duration::from_secs(30)).await;
    let writer = spawn_writer(engine, cluster.url.clone(), stop.clone(), last.clone());
    let mut gone = Vec::new();

    // kill -9 of the leader: the standby streams within seconds.
    let mut times = Vec::new();
    let (mut leader, mut standby) = (a, b);
    let mut standby_leads = 1;
    for round in 0..takeovers {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed = Instant::now();
        gone.push(leader.kill9().await);
        // Until the source streams again (not just until the lease is won).
        let streams = standby.log_count("source: streaming");
        standby.wait_for_log_count("leader: streaming", standby_leads, Duration::from_secs(30)).await;
        standby.wait_for_log_count("source: streaming", streams + 1, Duration::from_secs(30)).await;
        times.push(killed.elapsed());
        // The killed one comes back as the standby (from its own, untouched directory).
        let next = cluster.start(if round % 2 == 0 { "a" } else { "b" });
        leader = standby;
        standby = next;
        standby.wait_for_log("standby", Duration::from_secs(30)).await;
        standby_leads = standby.log_count("leader: streaming") + 1;
    }
    times.sort();
    eprintln!(
        "{engine:?}: kill -9 takeover p50 {:?}, max {:?} over {} takeover(s)",
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
    assert!(times[times.len() - 1] < Duration::from_secs(5), "a standby must stream within 5 s: {times:?}");

    // Frozen longer than the lease: the standby takes over; thawed, the old leader steps down.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signal(leader.pid(), "STOP");
    let frozen = Instant::now();
    let streams = standby.log_count("source: streaming");
    standby.wait_for_log_count("leader: streaming", standby_leads, Duration::from_secs(60)).await;
    standby.wait_for_log_count("source: streaming", streams + 1, Duration::from_secs(60)).await;
    let freeze_takeover = frozen.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signal(leader.pid(), "CONT");
    let mut old = leader;
    // It notices through its lease or through a refused (fenced) checkpoint, whichever comes first.
    let deadline = Instant::now() + Duration::from_secs(30);
    let marker = loop {
        let log = old.log_text();
        if let Some(m) = ["stepping down", "took over connector"].into_iter().find(|m| log.contains(m)) {
            break m;
        }
        assert!(Instant::now() < deadline, "the thawed leader did not step down:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stepped = old.log_text();
    let after = stepped.split(marker).nth(1).unwrap_or("");
    assert!(!after.contains("final checkpoint written"), "the old leader checkpointed after stepping down:\n{stepped}");
    old.wait_for_log("standby", Duration::from_secs(30)).await;
    eprintln!("{engine:?}: freeze takeover after {freeze_takeover:?} (lease {LEASE_S} s)");
    let leader = standby;

    // Rolling restart: the old leader (now standby) is replaced, then the leader itself.
    let (status, _) = old.stop().await;
    assert!(status.success());
    let mut c = cluster.start("c");
    c.wait_for_log("standby", Duration::from_secs(30)).await;
    let (status, log) = leader.stop().await;
    assert!(status.success(), "{log}");
    gone.push(log);
    wait_leader(&mut c, 1, Duration::from_secs(30)).await;
    // A fresh host: an empty work directory, everything from the shared store.
    let _ = std::fs::remove_dir_all(cluster.root.join("d"));
    let mut d = cluster.start("d");
    d.wait_for_log("standby", Duration::from_secs(30)).await;

    // Stop writing; everything committed arrives (in the union of all instances' outputs).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let last = last.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    let outputs: Vec<PathBuf> = std::fs::read_dir(&cluster.root)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "out"))
        .collect();
    let missing = loop {
        let mut seen = BTreeSet::new();
        for out in &outputs {
            for r in stdout_records(out) {
                if let Some(id) = r["value"]["after"]["id"].as_i64() {
                    seen.insert(id);
                }
            }
        }
        let missing: Vec<i64> = (1..=last).filter(|id| !seen.contains(id)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "{engine:?}: {} of {last} rows lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let total: usize = outputs.iter().map(|o| stdout_records(o).len()).sum();
    eprintln!(
        "{engine:?}: {last} rows, {} delivered in all ({} repeated around takeovers)",
        total,
        total as i64 - last
    );
    let (status, log) = c.stop().await;
    assert!(status.success(), "{log}");
    let (status, _) = d.stop().await;
    assert!(status.success());
    drop(gone);
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_standby_takes_over_without_loss() {
    ha_suite(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_standby_takes_over_without_loss() {
    ha_suite(Engine::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_standby_takes_over_without_loss() {
    ha_suite(Engine::Mysql).await;
}

/// Runs `scripts/services.sh <args>`.
fn services(args: &[&str]) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh");
    let out = std::process::Command::new("bash").arg(&script).args(args).output().unwrap();
    assert!(out.status.success(), "services.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Puts the MySQL servers back as the other tests expect them, whatever happens: the primary
/// running on 3307, no replica.
struct RestoreMysql;

impl Drop for RestoreMysql {
    fn drop(&mut self) {
        services(&["mysql"]);
        services(&["mysql-replica-stop"]);
    }
}

/// Polls `sql` on `url` until it returns 1.
async fn until_one(url: &str, sql: &str, timeout: Duration) {
    use mysql_async::prelude::Queryable;
    let deadline = Instant::now() + Duration::from_secs(timeout.as_secs());
    loop {
        if let Ok(mut conn) = mysql_async::Conn::new(mysql_async::Opts::from_url(url).unwrap()).await
            && conn.query_first::<i64, _>(sql).await.ok().flatten() == Some(1)
        {
            return;
        }
        assert!(Instant::now() < deadline, "{sql} on {url} never returned 1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// MySQL failover with GTIDs: the primary stops mid-stream, its replica is promoted, and tailgate
/// (with both in its host list) goes on from the replica by GTID set with nothing lost and nothing
/// twice. A replica that lags behind the checkpoint is refused, naming why.
#[tokio::test(flavor = "multi_thread")]
async fn mysql_failover_to_a_promoted_replica_loses_nothing() {
    use mysql_async::prelude::Queryable;
    let _lock = server_lock(Server::Mysql).write().await;
    services(&["mysql-replica-start"]);
    let _restore = RestoreMysql;
    let primary = Server::Mysql.admin_url();
    let replica = "mysql://root@127.0.0.1:3308".to_owned();
    let mut db = MyDb::new(Server::Mysql, "failover").await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    until_one(
        &replica,
        &format!("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{}'", db.name),
        Duration::from_secs(30),
    )
    .await;

    let dir = scratch("failover_my");
    let url = format!("mysql://root@127.0.0.1:3307,127.0.0.1:3308/{}", db.name);
    let cfg = my_config(&db.name, &url, &dir, "snapshot = \"never\"", &stdout_sink(), "");
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    for batch in 0..10 {
        let values: Vec<String> = (batch * 50 + 1..=batch * 50 + 50).map(|i| format!("({i})")).collect();
        db.exec(&format!("INSERT INTO t VALUES {}", values.join(","))).await;
    }
    wait_stdout(&mut tg, 500, Duration::from_secs(30)).await;
    // The replica has everything, then the primary goes away and the replica is promoted.
    let executed: String = db.conn.query_first("SELECT @@GLOBAL.gtid_executed").await.unwrap().unwrap();
    until_one(&replica, &format!("SELECT GTID_SUBSET('{executed}', @@GLOBAL.gtid_executed)"), Duration::from_secs(30))
        .await;
    tailgate_e2e::mysql::admin(Server::Mysql, "SHUTDOWN").await;
    let mut promoted =
        mysql_async::Conn::new(mysql_async::Opts::from_url(&format!("{replica}/{}", db.name)).unwrap()).await.unwrap();
    promoted.query_drop("STOP REPLICA; RESET REPLICA ALL").await.unwrap();
    for batch in 10..20 {
        let values: Vec<String> = (batch * 50 + 1..=batch * 50 + 50).map(|i| format!("({i})")).collect();
        promoted.query_drop(format!("INSERT INTO t VALUES {}", values.join(","))).await.unwrap();
    }
    tg.wait_for_log("using this one", Duration::from_secs(60)).await;
    let records = wait_stdout(&mut tg, 1000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = if records.len() > 1000 { records } else { stdout_records(&tg.stdout) };
    let ids: BTreeSet<i64> = records.iter().filter_map(|r| r["value"]["after"]["id"].as_i64()).collect();
    assert_eq!(ids.len(), 1000, "every row, from both servers");
    assert_eq!(records.len(), 1000, "nothing twice across the failover");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");

    // The checkpoint now holds the promoted server's transactions: the old primary (back, without
    // them) is refused, naming why.
    services(&["mysql"]);
    let old_only =
        my_config(&db.name, &format!("{primary}/{}", db.name), &dir, "snapshot = \"never\"", &stdout_sink(), "");
    let mut tg = Tailgate::start(&dir, &old_only);
    let status = tg.wait_exit(Duration::from_secs(60)).await;
    let log = tg.log_text();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("has not executed everything the stored checkpoint"), "{log}");
    drop(promoted);
    db.conn = tailgate_e2e::mysql::connect(&primary).await;
    db.drop().await;
}
