//! Harness for tailgate's end-to-end tests: real PostgreSQL, a real Kafka broker, and the real
//! `tailgate` binary run as a child process (so that tests can SIGTERM and kill -9 it).
//!
//! Hosts come from the environment, with the local defaults of scripts/services.sh:
//! `TAILGATE_TEST_PG` (admin URL, default `postgres://postgres@127.0.0.1:5432`),
//! `TAILGATE_TEST_KAFKA` (default `127.0.0.1:9092`), `TAILGATE_BIN` (default: built from the workspace).
//!
//! Each test gets its own database, slot, publication and topic prefix, so tests run in parallel.
//! Waits poll observable state (rows in Kafka, lines in the log, slot positions) with a deadline;
//! there are no fixed sleeps standing in for synchronisation.

pub mod mysql;
pub mod sinks;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::{Client, NoTls};

pub fn pg_admin_url() -> String {
    std::env::var("TAILGATE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("TAILGATE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A short unique suffix, so that re-runs against a long-lived broker never see old topics.
pub fn nonce() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{:x}{:x}", t.as_secs() % 0x10_0000, t.subsec_micros())
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}. Did you run scripts/services.sh?"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Held shared by every PostgreSQL test ([`TestDb`]) and exclusively by those that restart the
/// server. Take [`broker_lock`] first when a test needs both.
pub fn pg_server_lock() -> &'static tokio::sync::RwLock<()> {
    static LOCK: OnceLock<tokio::sync::RwLock<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}

/// A test's hold on [`pg_server_lock`].
pub enum PgGuard {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>),
}

/// A database of its own for one test. Created fresh (a leftover from an earlier run is dropped
/// together with its slots).
pub struct TestDb {
    pub name: String,
    pub client: Client,
    _server: PgGuard,
}

impl TestDb {
    pub async fn new(test: &str) -> TestDb {
        Self::with_guard(test, PgGuard::Shared(pg_server_lock().read().await)).await
    }

    /// For tests that restart the server: no other PostgreSQL test runs meanwhile.
    pub async fn exclusive(test: &str) -> TestDb {
        Self::with_guard(test, PgGuard::Exclusive(pg_server_lock().write().await)).await
    }

    async fn with_guard(test: &str, guard: PgGuard) -> TestDb {
        let name = format!("tg_{test}");
        let admin = connect(&format!("{}/postgres", pg_admin_url())).await;
        drop_database(&admin, &name).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let client = connect(&self_url(&name)).await;
        TestDb { name, client, _server: guard }
    }

    /// Connects again (after a server restart).
    pub async fn reconnect(&mut self) {
        self.client = connect(&self.url()).await;
    }

    /// URL for this database as the admin user.
    pub fn url(&self) -> String {
        self_url(&self.name)
    }

    /// URL for this database as another user.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let base = pg_admin_url();
        let host = base.rsplit('@').next().unwrap_or("127.0.0.1:5432").to_owned();
        format!("postgres://{user}:{password}@{host}/{}", self.name)
    }

    pub async fn exec(&self, sql: &str) {
        self.client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// `confirmed_flush_lsn` of a slot as a number.
    pub async fn confirmed_flush(&self, slot: &str) -> Option<u64> {
        let row = self
            .client
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()?;
        row.get::<_, Option<i64>>(0).map(|v| v as u64)
    }

    pub async fn current_wal(&self) -> u64 {
        let row = self.client.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[]).await.unwrap();
        row.get::<_, i64>(0) as u64
    }

    pub async fn slot_active_pid(&self, slot: &str) -> Option<i32> {
        self.client
            .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .unwrap()
            .and_then(|r| r.get(0))
    }

    /// Drops the database and its slots (call at the end of a passing test).
    pub async fn drop(self) {
        let admin = connect(&format!("{}/postgres", pg_admin_url())).await;
        drop(self.client);
        drop_database(&admin, &self.name).await;
    }
}

fn self_url(db: &str) -> String {
    format!("{}/{db}", pg_admin_url())
}

async fn drop_database(admin: &Client, name: &str) {
    // Slots keep a database alive; a crashed run may leave an active walsender for a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid(); \
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{name}' AND NOT active;"
            ))
            .await;
        match admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("cannot drop database {name}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The tailgate binary, built once per test run.
pub fn tailgate_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("TAILGATE_BIN") {
            return PathBuf::from(bin);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "-p", "tailgate", "--bin", "tailgate"])
            .current_dir(&root)
            .status()
            .expect("cargo build");
        assert!(status.success(), "building tailgate failed");
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
        target.join("debug").join("tailgate")
    })
    .clone()
}

/// A scratch folder for one test's config, offsets and logs.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tailgate-e2e-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `tailgate` process.
pub struct Tailgate {
    child: Child,
    pub log: PathBuf,
    pub stdout: PathBuf,
}

impl Tailgate {
    /// Starts `tailgate run` with `config` written to `dir/config.toml`.
    pub fn start(dir: &Path, config: &str) -> Tailgate {
        Self::start_with_env(dir, config, &[])
    }

    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Tailgate {
        Self::spawn(dir, config, env, true)
    }

    /// Like [`Tailgate::start`], with stdout thrown away (for runs too large to keep).
    pub fn start_discarding_stdout(dir: &Path, config: &str) -> Tailgate {
        Self::spawn(dir, config, &[], false)
    }

    fn spawn(dir: &Path, config: &str, env: &[(&str, &str)], keep_stdout: bool) -> Tailgate {
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let n = std::fs::read_dir(dir).unwrap().count();
        let log = dir.join(format!("tailgate-{n}.log"));
        let stdout = dir.join(format!("tailgate-{n}.out"));
        let mut cmd = Command::new(tailgate_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,tailgate_postgres=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(if keep_stdout { Stdio::from(std::fs::File::create(&stdout).unwrap()) } else { Stdio::null() })
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn tailgate");
        Tailgate { child, log, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tailgate exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log within {timeout:?}:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How often `needle` occurs in the log so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// Waits until the log contains `needle` at least `n` times.
    pub async fn wait_for_log_count(&mut self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_count(needle) < n {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tailgate exited ({status}) before logging {needle:?} {n} times:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not {n} times in the log within {timeout:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for streaming to start.
    pub async fn wait_streaming(&mut self) {
        self.wait_for_log("streaming", Duration::from_secs(30)).await;
    }

    /// SIGTERM, then waits for the exit.
    pub async fn stop(mut self) -> (ExitStatus, String) {
        signal(self.child.id(), "TERM");
        let status = self.wait_exit(Duration::from_secs(60)).await;
        (status, self.log_text())
    }

    /// kill -9: no chance to drain or checkpoint.
    pub async fn kill9(mut self) -> String {
        self.child.kill().unwrap();
        let _ = self.child.wait();
        self.log_text()
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tailgate did not exit within {timeout:?}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tailgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal with kill(1): the workspace forbids unsafe code.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Runs `tailgate <args>` to completion; returns (exit code, stdout, stderr).
pub fn tailgate_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tailgate_bin()).args(args).env("NO_COLOR", "1").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One consumed Kafka record.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<serde_json::Value>,
    /// `None` for a tombstone.
    pub value: Option<serde_json::Value>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn op(&self) -> Option<&str> {
        self.value.as_ref()?.get("op")?.as_str()
    }
    pub fn after(&self) -> &serde_json::Value {
        &self.value.as_ref().expect("not a tombstone")["after"]
    }
    pub fn before(&self) -> &serde_json::Value {
        &self.value.as_ref().expect("not a tombstone")["before"]
    }
}

/// Reads `topic` from the beginning until at least `at_least` records arrived (or `timeout`), then
/// keeps reading briefly to catch extra records (duplicates would show up here).
pub fn consume(topic: &str, at_least: usize, timeout: Duration) -> Vec<Record> {
    consume_until(topic, timeout, |records, _| records >= at_least)
}

/// Reads `topic` from the beginning until nothing new arrived for `idle` (or `timeout`): for runs
/// whose record count is not known in advance. Call it once the producer has stopped.
pub fn consume_all(topic: &str, idle: Duration, timeout: Duration) -> Vec<Record> {
    consume_until(topic, timeout, |records, quiet| records > 0 && quiet >= idle)
}

/// Reads `topic` until `done(records so far, time since the last record)`, then keeps reading briefly
/// to catch extra records.
fn consume_until(topic: &str, timeout: Duration, done: impl Fn(usize, Duration) -> bool) -> Vec<Record> {
    consume_with(&[("bootstrap.servers", &kafka_brokers())], topic, timeout, done)
}

/// Reads `topic` from `at_least` records, with a consumer made of `settings` (`bootstrap.servers`
/// and, for a TLS broker, `security.protocol` and the `ssl.*` files).
pub fn consume_from(settings: &[(&str, &str)], topic: &str, at_least: usize, timeout: Duration) -> Vec<Record> {
    consume_with(settings, topic, timeout, |records, _| records >= at_least)
}

fn consume_with(
    settings: &[(&str, &str)],
    topic: &str,
    timeout: Duration,
    done: impl Fn(usize, Duration) -> bool,
) -> Vec<Record> {
    let mut client = ClientConfig::new();
    for (k, v) in settings {
        client.set(*k, *v);
    }
    let consumer: BaseConsumer = client
        .set("group.id", format!("tailgate-e2e-{}", nonce()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + timeout;
    // The topic may not exist yet (tailgate creates it on first use).
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        if let Ok(md) = md
            && let Some(t) = md.topics().iter().find(|t| t.name() == topic)
            && t.error().is_none()
            && !t.partitions().is_empty()
        {
            break t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut settle_until: Option<Instant> = None;
    let mut last_record = Instant::now();
    loop {
        if settle_until.is_none() && done(out.len(), last_record.elapsed()) {
            settle_until = Some(Instant::now() + Duration::from_millis(700));
        }
        let now = Instant::now();
        if now > deadline || settle_until.is_some_and(|s| now > s) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_record = Instant::now();
                let parse = |b: &[u8]| {
                    serde_json::from_slice(b)
                        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(b).into_owned()))
                };
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_owned(),
                                    x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(parse),
                    value: m.payload().map(parse),
                    headers,
                });
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {}
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    out
}

/// Reads the JSON lines of the stdout sink (complete lines only).
pub fn stdout_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Only complete lines: tailgate may be writing the next one right now.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Waits until the stdout sink has written `n` lines.
pub async fn wait_stdout(tg: &mut Tailgate, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = stdout_records(&tg.stdout);
        if records.len() >= n {
            return records;
        }
        if let Ok(Some(status)) = tg.child.try_wait() {
            panic!("tailgate exited ({status}) with {} of {n} records:\n{}", records.len(), tg.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records within {timeout:?}:\n{}",
            records.len(),
            tg.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A config for a test: PostgreSQL source on `db_url`, the given sink section, offsets in `dir`.
pub fn config(name: &str, db_url: &str, dir: &Path, sink: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[source]
type = "postgres"
url = "{db_url}"
slot = "{name}"
publication = "{name}"
status_interval_ms = 200
{sink}
[offsets]
path = "{offsets}"
flush_interval_ms = 200
{extra}
"#,
        offsets = dir.join("offsets.json").display()
    )
}

pub fn kafka_sink(prefix: &str) -> String {
    format!("[sink]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n", kafka_brokers())
}

pub fn stdout_sink() -> String {
    "[sink]\ntype = \"stdout\"\n".to_owned()
}

/// Tests that freeze the broker take this lock exclusively; every other Kafka test holds it shared.
pub fn broker_lock() -> &'static tokio::sync::RwLock<()> {
    static LOCK: OnceLock<tokio::sync::RwLock<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET `path` from 127.0.0.1:`port`; returns (status code, body). Status 0: connection refused.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A server that closes at once (over its connection cap) answers nothing: status 0.
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The value of a metric series in Prometheus text (`name{labels}` exactly as written).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

/// Pid of the tansu broker started by scripts/services.sh (tests freeze it with SIGSTOP).
pub fn tansu_pid() -> u32 {
    // The main broker only: the TLS tests' brokers (9192, 9194, 9196) run the same binary.
    let out = Command::new("pgrep").args(["-f", "tansu broker --listener-url tcp://127.0.0.1:9092"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("tansu is not running (scripts/services.sh)")
}

/// Peak resident memory of a process so far, in MiB (VmHWM), if it still runs.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The usual shape of a test: its own database with a schema, a scratch folder, and tailgate started
/// on it with a connector named `tg_<test>` (slot and publication of the same name).
pub struct Scenario {
    pub db: TestDb,
    pub dir: PathBuf,
    pub name: String,
}

impl Scenario {
    /// Creates database `tg_<test>` and runs `schema` in it.
    pub async fn new(test: &str, schema: &str) -> Scenario {
        let db = TestDb::new(test).await;
        if !schema.is_empty() {
            db.exec(schema).await;
        }
        Scenario { db, dir: scratch(test), name: format!("tg_{test}") }
    }

    /// The config for `sink` (a `[sink]` section) plus `extra` sections.
    pub fn config(&self, sink: &str, extra: &str) -> String {
        config(&self.name, &self.db.url(), &self.dir, sink, extra)
    }

    /// Starts tailgate and waits until it streams.
    pub async fn start(&self, sink: &str, extra: &str) -> Tailgate {
        let mut tg = Tailgate::start(&self.dir, &self.config(sink, extra));
        tg.wait_streaming().await;
        tg
    }

    /// Stops `tg` (asserting a clean exit) and drops the database.
    pub async fn finish(self, tg: Tailgate) {
        let (status, log) = tg.stop().await;
        assert!(status.success(), "tailgate did not stop cleanly: {log}");
        self.db.drop().await;
    }
}
