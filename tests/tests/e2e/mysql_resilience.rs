//! MySQL and MariaDB sources under failure: kill -9, dropped connections, server restarts, purged
//! binlogs, wrong credentials and missing privileges, and what `tailgate check` says.

use std::collections::HashMap;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use tailgate_e2e::mysql::{MyScenario, Server, admin};
use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

fn created_ids(records: &[Record]) -> HashMap<i64, usize> {
    let mut ids = HashMap::new();
    for r in records {
        if r.op() == Some("c") {
            *ids.entry(r.after()["id"].as_i64().unwrap()).or_insert(0) += 1;
        }
    }
    ids
}

/// A writer inserting `batches` transactions of 50 rows, 40 ms apart, on its own connection.
async fn spawn_writer(s: &MyScenario, batches: i64) -> tokio::task::JoinHandle<()> {
    let mut conn = s.db.another_connection().await;
    tokio::spawn(async move {
        for batch in 0..batches {
            let values: Vec<String> =
                (batch * 50..batch * 50 + 50).map(|i| format!("({i}, REPEAT('x', 200))")).collect();
            conn.query_drop(format!("INSERT INTO t VALUES {}", values.join(","))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    })
}

async fn kill_9_twice_then_restart_loses_nothing(server: Server) {
    let _broker = broker_lock().read().await;
    let s = MyScenario::new(server, "kill9", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let cfg = s.config("", &kafka_sink(&s.prefix), "");
    // The first run records where the binlog was (snapshot = "never" captures from then on).
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");

    let writer = spawn_writer(&s, 60).await;
    for round in 0..2 {
        let mut tg = Tailgate::start(&s.dir, &cfg);
        tg.wait_streaming().await;
        tokio::time::sleep(Duration::from_millis(700 + round * 300)).await;
        tg.kill9().await;
    }
    writer.await.unwrap();
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    let resumed = tg.log_text();
    let records = consume(&s.topic("t"), 3000, Duration::from_secs(60));
    let ids = created_ids(&records);
    let missing: Vec<i64> = (0..3000).filter(|i| !ids.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} rows missing after kill -9, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let duplicates = ids.values().filter(|n| **n > 1).count();
    eprintln!("{server:?} kill -9 x2: 3000 rows delivered, {duplicates} delivered twice (in flight at the kill)");
    // A restart from a checkpoint with GTIDs asks the server for GTIDs.
    match server {
        Server::Mysql => assert!(resumed.contains("GTIDs not in"), "{resumed}"),
        Server::Mariadb => assert!(resumed.contains("after GTIDs"), "{resumed}"),
    }
    s.finish(tg).await;
}

/// The server drops the replication connection (KILL): tailgate reconnects, resumes where it was, and
/// the transaction cut in half is not sent twice.
async fn killed_connection_reconnects_without_loss_or_duplicates(server: Server) {
    let mut s = MyScenario::new(server, "reconnect", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let mut tg = s.start("", &stdout_sink(), "").await;
    let log = tg.log_text();
    let conn_id: u64 = log
        .split("connection_id=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no connection_id in {log}"));
    let writer = spawn_writer(&s, 40).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.db.exec(&format!("KILL {conn_id}")).await;
    writer.await.unwrap();
    tg.wait_for_log("reconnecting", WAIT).await;
    let records = wait_stdout(&mut tg, 2000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = if records.len() > 2000 { records } else { stdout_records(&tg.stdout) };
    let mut seen = HashMap::new();
    for r in &records {
        *seen.entry(r["value"]["after"]["id"].as_i64().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2000, "every row");
    assert!(seen.values().all(|n| *n == 1), "a reconnect adds no duplicates");
    s.finish(tg).await;
}

/// The server restarts mid-stream: tailgate rides it out and delivers everything.
async fn server_restart_mid_stream(server: Server) {
    let mut s = MyScenario::exclusive(server, "restart", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let mut tg = s.start("", &stdout_sink(), "").await;
    s.db.exec("INSERT INTO t VALUES (1, 'before')").await;
    wait_stdout(&mut tg, 1, WAIT).await;
    restart(server).await;
    let mut db = s.db.another_connection().await;
    db.query_drop("INSERT INTO t VALUES (2, 'after')").await.unwrap();
    tg.wait_for_log("reconnecting", WAIT).await;
    let records = wait_stdout(&mut tg, 2, Duration::from_secs(60)).await;
    assert_eq!(records[1]["value"]["after"]["pad"], "after");
    assert_eq!(records.len(), 2, "nothing twice");
    // The test's own connection died with the server.
    s.db.conn = db;
    s.finish(tg).await;
}

/// Restarts the server with the commands scripts/services.sh uses.
async fn restart(server: Server) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh");
    match server {
        Server::Mariadb => {
            let ok = std::process::Command::new("mariadb-admin").arg("shutdown").status().unwrap().success();
            assert!(ok, "mariadb-admin shutdown");
        }
        Server::Mysql => admin(server, "SHUTDOWN").await,
    }
    let target = match server {
        Server::Mariadb => "mariadb",
        Server::Mysql => "mysql",
    };
    let out = std::process::Command::new("bash").arg(&script).arg(target).output().unwrap();
    assert!(out.status.success(), "services.sh {target}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The binlog tailgate would resume from was purged while it was stopped: it refuses to start,
/// naming the fix, instead of skipping the gap.
async fn purged_position_is_an_error_naming_the_fix(server: Server) {
    let mut s = MyScenario::exclusive(server, "purged", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let cfg = s.config("", &stdout_sink(), "");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    s.db.exec("INSERT INTO t VALUES (1)").await;
    wait_stdout(&mut tg, 1, WAIT).await;
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    s.db.exec("INSERT INTO t VALUES (2)").await;
    let stored_file = s.stored_binlog_file();
    s.db.purge_binlogs_through(&stored_file).await;
    let mut tg = Tailgate::start(&s.dir, &cfg);
    let status = tg.wait_exit(WAIT).await;
    let log = tg.log_text();
    assert_eq!(status.code(), Some(3), "a prerequisite failure: {log}");
    assert!(log.contains("purged") && log.contains("offsets reset"), "{log}");
    let (code, out, _) = tailgate_cmd(&["check", "--config", s.dir.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("FAILED  stored position"), "{out}");
    s.db.drop().await;
}

/// Authentication straight on the replication protocol: caching_sha2_password's full exchange (RSA,
/// after FLUSH PRIVILEGES empties the server's cache), mysql_native_password, and a wrong password.
async fn replication_connection_authenticates(server: Server) {
    use tailgate_mysql::replication::{ConnInfo, ReplicationConnection};
    let _lock = tailgate_e2e::mysql::server_lock(server).read().await;
    admin(server, "FLUSH PRIVILEGES").await;
    let url = format!("mysql://tailgate_cdc:cdc-secret@{}", server.host_port());
    let info = ConnInfo::from_url(&url).unwrap();
    let mut conn = ReplicationConnection::connect(&info, Duration::from_secs(10)).await.expect("authenticates");
    conn.execute("SET @tailgate_test = 1").await.unwrap();
    conn.close().await;
    let bad = ConnInfo::from_url(&format!("mysql://tailgate_cdc:wrong@{}", server.host_port())).unwrap();
    let err = ReplicationConnection::connect(&bad, Duration::from_secs(10)).await.err().expect("refused").to_string();
    assert!(err.contains("tailgate_cdc") && err.contains("password"), "{err}");
}

async fn auth_and_privilege_failures_exit_3_with_the_fix(server: Server) {
    let s = MyScenario::new(server, "authfail", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let run = |url: String| {
        let cfg = tailgate_e2e::mysql::my_config(&s.name, &url, &s.dir, "snapshot = \"never\"", &stdout_sink(), "");
        let path = s.dir.join("bad.toml");
        std::fs::write(&path, cfg).unwrap();
        tailgate_cmd(&["run", "--config", path.to_str().unwrap()])
    };
    let (code, _, err) = run(s.db.url_as("tailgate_cdc", "wrong"));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("rejected the login") && err.contains("tailgate_cdc"), "{err}");
    let (code, _, err) = run(s.db.url_as("tailgate_norepl", "norepl-secret"));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("REPLICATION") && err.contains("GRANT"), "{err}");
    s.db.drop().await;
}

async fn check_reports_each_prerequisite(server: Server) {
    let s = MyScenario::new(server, "check", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let path = s.dir.join("config.toml");
    std::fs::write(&path, s.config("", &stdout_sink(), "")).unwrap();
    let (code, out, err) = tailgate_cmd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "ok      connection",
        "ok      log_bin: ON",
        "ok      binlog_format: ROW",
        "ok      binlog_row_image: FULL",
        "ok      binlog_row_metadata",
        "ok      privileges",
        "ok      server_id",
        "ok      binlog retention",
        "ok      database",
    ] {
        assert!(out.contains(line), "missing {line:?}:\n{out}");
    }
    // A user without replication rights, and the server's own server id.
    let cfg = tailgate_e2e::mysql::my_config(
        &s.name,
        &s.db.url_as("tailgate_norepl", "norepl-secret"),
        &s.dir,
        "snapshot = \"never\"\nserver_id = 1",
        &stdout_sink(),
        "",
    );
    std::fs::write(&path, cfg).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("FAILED  privileges") && out.contains("REPLICATION SLAVE"), "{out}");
    assert!(out.contains("FAILED  server_id"), "{out}");
    s.db.drop().await;
}

/// Two connectors with one server id would make the server drop one of them again and again: the
/// second refuses to start.
async fn server_id_clash_is_refused(server: Server) {
    let s = MyScenario::new(server, "clash", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let tg = s.start("server_id = 4242", &stdout_sink(), "").await;
    let other = s.dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let cfg = tailgate_e2e::mysql::my_config(
        "other",
        &s.db.url(),
        &other,
        "snapshot = \"never\"\nserver_id = 4242",
        &stdout_sink(),
        "",
    );
    let mut second = Tailgate::start(&other, &cfg);
    let status = second.wait_exit(WAIT).await;
    let log = second.log_text();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("server_id 4242 is already used"), "{log}");
    s.finish(tg).await;
}

/// The replication connection's id, from tailgate's newest "streaming" line.
fn dump_connection_id(tg: &Tailgate) -> u64 {
    let log = tg.log_text();
    log.rsplit("connection_id=")
        .next()
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no connection_id in {log}"))
}

/// `CREATE TABLE … SELECT` is one transaction: GTID, the DDL, its rows, XID on MySQL 8.0.21+, and a
/// group that is not standalone on MariaDB. Its DDL once ended the transaction for tailgate: the
/// checkpoint (with the transaction's GTID) could be written before the rows, and a restart by GTID
/// then skipped them all. Here the broker is frozen so that no row is acknowledged, tailgate is
/// killed, and every row must still arrive; before that, a replication connection killed in the
/// middle of such a transaction's rows loses and repeats nothing.
async fn create_table_select_is_one_transaction(server: Server) {
    const ROWS: u64 = 60_000;
    let _broker = broker_lock().write().await;
    let mut s = MyScenario::new(server, "ctas", "CREATE TABLE src (id int PRIMARY KEY, v varchar(20))").await;
    s.db.insert_series("src", ROWS, "n, 'x'").await;
    let sink = kafka_sink(&s.prefix);
    let mut tg = s.start("", &sink, "").await;
    s.db.exec("INSERT INTO src VALUES (0, 'first')").await;
    assert_eq!(consume(&s.topic("src"), 1, WAIT).len(), 1);
    let tansu = tansu_pid();

    // A connection killed while the source is blocked inside the transaction's rows.
    signal(tansu, "STOP");
    let ddl = "CREATE TABLE c1 (PRIMARY KEY (id)) SELECT id, v FROM src";
    let killed = async {
        s.db.exec(ddl).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let id = dump_connection_id(&tg);
        s.db.exec(&format!("KILL {id}")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    .await;
    signal(tansu, "CONT");
    let () = killed;
    tg.wait_for_log("reconnecting", Duration::from_secs(60)).await;
    let ids = created_ids(&consume(&s.topic("c1"), ROWS as usize + 1, Duration::from_secs(90)));
    assert_eq!(ids.len(), ROWS as usize + 1, "every row of the CREATE TABLE … SELECT");
    assert!(ids.values().all(|n| *n == 1), "a reconnect inside its rows repeated some");

    // kill -9 while none of the rows is acknowledged: nothing may have been checkpointed past them.
    // The table's topic exists beforehand, so that the sink is not held up creating it.
    s.db.exec("CREATE TABLE c2 (id int PRIMARY KEY, v varchar(20)); INSERT INTO c2 VALUES (-1, 'pre'); DROP TABLE c2")
        .await;
    assert_eq!(consume(&s.topic("c2"), 1, WAIT).len(), 1);
    signal(tansu, "STOP");
    let crashed = async {
        s.db.exec("CREATE TABLE c2 (PRIMARY KEY (id)) SELECT id, v FROM src WHERE id <= 5000").await;
        // Several offsets flushes (every 200 ms).
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    .await;
    let log = tg.kill9().await;
    signal(tansu, "CONT");
    let () = crashed;
    let tg = s.start("", &sink, "").await;
    let ids = created_ids(&consume(&s.topic("c2"), 5002, Duration::from_secs(60)));
    assert_eq!(ids.len(), 5002, "the rows of c2 after kill -9 and restart:\n{log}");
    s.finish(tg).await;
}

both_servers!(
    create_table_select_is_one_transaction,
    kill_9_twice_then_restart_loses_nothing,
    killed_connection_reconnects_without_loss_or_duplicates,
    server_restart_mid_stream,
    purged_position_is_an_error_naming_the_fix,
    replication_connection_authenticates,
    auth_and_privilege_failures_exit_3_with_the_fix,
    check_reports_each_prerequisite,
    server_id_clash_is_refused,
);
