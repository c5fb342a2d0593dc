//! The MySQL side of the harness: both servers scripts/services.sh runs, a database of its own per
//! test, and tailgate configs for them.
//!
//! Hosts come from the environment, with the local defaults of scripts/services.sh:
//! `TAILGATE_TEST_MARIADB` (default `mysql://root@127.0.0.1:3306`) and `TAILGATE_TEST_MYSQL`
//! (default `mysql://root@127.0.0.1:3307`, MySQL 9.7 with GTIDs).
//!
//! Tests that change a server's global settings (row metadata, compression), purge its binlogs or
//! restart it take [`server_lock`] exclusively; every other test of that server holds it shared.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Row};

use crate::{Tailgate, nonce, scratch};

/// The two servers every MySQL test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Mariadb,
    Mysql,
}

impl Server {
    pub fn admin_url(self) -> String {
        match self {
            Server::Mariadb => {
                std::env::var("TAILGATE_TEST_MARIADB").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
            }
            Server::Mysql => {
                std::env::var("TAILGATE_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3307".into())
            }
        }
    }

    /// `host:port` of the server.
    pub fn host_port(self) -> String {
        let url = self.admin_url();
        url.rsplit('@').next().unwrap_or("127.0.0.1:3306").trim_end_matches('/').to_owned()
    }

    /// The `connector` name in events.
    pub fn connector(self) -> &'static str {
        match self {
            Server::Mariadb => "mariadb",
            Server::Mysql => "mysql",
        }
    }

    /// A short tag for names: `ma` or `my`.
    pub fn tag(self) -> &'static str {
        match self {
            Server::Mariadb => "ma",
            Server::Mysql => "my",
        }
    }

    pub async fn connect(self) -> Conn {
        connect(&self.admin_url()).await
    }
}

pub async fn connect(url: &str) -> Conn {
    let opts = Opts::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    Conn::new(opts).await.unwrap_or_else(|e| panic!("cannot connect to {url}: {e}. Did you run scripts/services.sh?"))
}

/// Held shared by ordinary tests and exclusively by those that change the server for everyone.
pub fn server_lock(server: Server) -> &'static tokio::sync::RwLock<()> {
    static MARIADB: OnceLock<tokio::sync::RwLock<()>> = OnceLock::new();
    static MYSQL: OnceLock<tokio::sync::RwLock<()>> = OnceLock::new();
    match server {
        Server::Mariadb => MARIADB.get_or_init(|| tokio::sync::RwLock::new(())),
        Server::Mysql => MYSQL.get_or_init(|| tokio::sync::RwLock::new(())),
    }
}

/// A database of its own for one test on one server.
pub struct MyDb {
    pub server: Server,
    pub name: String,
    pub conn: Conn,
}

impl MyDb {
    /// Creates `tg_<tag>_<test>` afresh (a leftover from an earlier run is dropped first).
    pub async fn new(server: Server, test: &str) -> MyDb {
        let name = format!("tg_{}_{test}", server.tag());
        let mut conn = server.connect().await;
        conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`")).await.unwrap();
        conn.query_drop(format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4")).await.unwrap();
        conn.query_drop(format!("USE `{name}`")).await.unwrap();
        MyDb { server, name, conn }
    }

    /// The database's URL as root.
    pub fn url(&self) -> String {
        format!("{}/{}", self.server.admin_url(), self.name)
    }

    /// The database's URL as another user.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("mysql://{user}:{password}@{}/{}", self.server.host_port(), self.name)
    }

    /// Runs one or more `;`-separated statements.
    pub async fn exec(&mut self, sql: &str) {
        self.conn.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn query(&mut self, sql: &str) -> Vec<Row> {
        self.conn.query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Inserts rows `1..=n` (at most 1,000,000) into `table`: `select` is the row, in terms of `n`
    /// (e.g. `"n, MD5(n)"`). Both servers, without recursion limits.
    pub async fn insert_series(&mut self, table: &str, n: u64, select: &str) {
        assert!(n <= 1_000_000, "insert_series makes at most a million rows");
        self.exec(&format!(
            "INSERT INTO {table} WITH RECURSIVE d(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM d WHERE k < 999) \
             SELECT {select} FROM (SELECT a.k * 1000 + b.k + 1 AS n FROM d a, d b) s WHERE n <= {n} ORDER BY n"
        ))
        .await;
    }

    /// The binlog file the server writes now.
    pub async fn current_binlog(&mut self) -> String {
        let row: Option<Row> = match self.conn.query_first("SHOW BINARY LOG STATUS").await {
            Ok(r) => r,
            Err(_) => self.conn.query_first("SHOW MASTER STATUS").await.unwrap(),
        };
        row.unwrap().get(0).unwrap()
    }

    /// Starts a new binlog file and purges every older one, until `file` is gone: MariaDB keeps a
    /// file some replica still reads (the dump thread of a connector killed by an earlier test
    /// lingers until its next heartbeat).
    pub async fn purge_binlogs_through(&mut self, file: &str) {
        self.exec("FLUSH BINARY LOGS").await;
        let current = self.current_binlog().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            self.exec(&format!("PURGE BINARY LOGS TO '{current}'")).await;
            let logs: Vec<String> =
                self.query("SHOW BINARY LOGS").await.into_iter().map(|r| r.get::<String, _>(0).unwrap()).collect();
            if !logs.iter().any(|l| l == file) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{file} was not purged: {logs:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// A new connection to this database (for writers running beside the test).
    pub async fn another_connection(&self) -> Conn {
        let mut conn = self.server.connect().await;
        conn.query_drop(format!("USE `{}`", self.name)).await.unwrap();
        conn
    }

    pub async fn drop(mut self) {
        let _ = self.conn.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name)).await;
        let _ = self.conn.disconnect().await;
    }
}

/// A MySQL source config: `db_url`, the given sink section, offsets in `dir`, `extra` sections.
/// `source_extra` lines go into `[source]`.
pub fn my_config(name: &str, db_url: &str, dir: &Path, source_extra: &str, sink: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[source]
type = "mysql"
url = "{db_url}"
heartbeat_interval_ms = 1000
{source_extra}
{sink}
[offsets]
path = "{offsets}"
flush_interval_ms = 200
{extra}
"#,
        offsets = dir.join("offsets.json").display()
    )
}

/// The usual shape of a MySQL test: its own database on `server` with a schema, a scratch folder,
/// and a connector named after both.
pub struct MyScenario {
    pub db: MyDb,
    pub dir: PathBuf,
    pub name: String,
    /// A topic prefix unique to this run.
    pub prefix: String,
    _lock: ServerGuard,
}

/// This test's hold on [`server_lock`].
pub enum ServerGuard {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>),
}

impl MyScenario {
    pub async fn new(server: Server, test: &str, schema: &str) -> MyScenario {
        let lock = ServerGuard::Shared(server_lock(server).read().await);
        Self::with_lock(server, test, schema, lock).await
    }

    /// For tests that change the server for everyone (global settings, purges, restarts).
    pub async fn exclusive(server: Server, test: &str, schema: &str) -> MyScenario {
        let lock = ServerGuard::Exclusive(server_lock(server).write().await);
        Self::with_lock(server, test, schema, lock).await
    }

    async fn with_lock(server: Server, test: &str, schema: &str, lock: ServerGuard) -> MyScenario {
        let mut db = MyDb::new(server, test).await;
        if !schema.is_empty() {
            db.exec(schema).await;
        }
        let name = db.name.clone();
        MyScenario {
            dir: scratch(&name),
            prefix: format!("{}{}", name.replace('_', ""), nonce()),
            name,
            db,
            _lock: lock,
        }
    }

    pub fn server(&self) -> Server {
        self.db.server
    }

    /// The config; `source_extra` lines go into `[source]` (default snapshot = "never").
    pub fn config(&self, source_extra: &str, sink: &str, extra: &str) -> String {
        let source_extra = if source_extra.contains("snapshot") {
            source_extra.to_owned()
        } else {
            format!("snapshot = \"never\"\n{source_extra}")
        };
        my_config(&self.name, &self.db.url(), &self.dir, &source_extra, sink, extra)
    }

    /// Starts tailgate and waits until it streams.
    pub async fn start(&self, source_extra: &str, sink: &str, extra: &str) -> Tailgate {
        let mut tg = Tailgate::start(&self.dir, &self.config(source_extra, sink, extra));
        tg.wait_streaming().await;
        tg
    }

    /// The topic of `table` in this scenario's database.
    pub fn topic(&self, table: &str) -> String {
        format!("{}.{}.{table}", self.prefix, self.db.name)
    }

    /// The binlog file of the position stored in this scenario's offsets file.
    pub fn stored_binlog_file(&self) -> String {
        let offsets = std::fs::read_to_string(self.dir.join("offsets.json")).unwrap();
        let stored: serde_json::Value = serde_json::from_str(&offsets).unwrap();
        stored["connectors"][self.name.as_str()]["position"]["file"].as_str().unwrap().to_owned()
    }

    /// Stops `tg` (asserting a clean exit) and drops the database.
    pub async fn finish(self, tg: Tailgate) {
        let (status, log) = tg.stop().await;
        assert!(status.success(), "tailgate did not stop cleanly: {log}");
        self.db.drop().await;
    }
}

/// Runs `sql` on a server as root with no database (settings, purges).
pub async fn admin(server: Server, sql: &str) {
    let mut conn = server.connect().await;
    conn.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.disconnect().await;
}

/// Global settings changed by a test, put back to the values scripts/services.sh configures when the
/// guard drops, even when the test panics: a setting left behind would fail other tests.
pub struct GlobalSettings {
    server: Server,
    restore: &'static str,
}

impl GlobalSettings {
    /// Runs `change` (`SET GLOBAL ...`) now and `restore` when dropped.
    pub async fn set(server: Server, change: &str, restore: &'static str) -> GlobalSettings {
        admin(server, change).await;
        GlobalSettings { server, restore }
    }
}

impl Drop for GlobalSettings {
    fn drop(&mut self) {
        let (server, restore) = (self.server, self.restore);
        // Drop cannot await: restore on a thread with its own runtime.
        let restored = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(admin(server, restore))
        })
        .join();
        if restored.is_err() {
            eprintln!("could not restore {restore:?} on {server:?}");
        }
    }
}

/// Waits until `f` holds, polling every 100 ms.
pub async fn eventually<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Generates `#[tokio::test]`s named `mariadb` and `mysql` in a module named after an
/// `async fn(Server)`, so every scenario runs against both servers.
#[macro_export]
macro_rules! both_servers {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[tokio::test(flavor = "multi_thread")]
                async fn mariadb() {
                    super::$test($crate::mysql::Server::Mariadb).await
                }
                #[tokio::test(flavor = "multi_thread")]
                async fn mysql() {
                    super::$test($crate::mysql::Server::Mysql).await
                }
            }
        )*
    };
}
