//! The NATS JetStream sink against the real server (127.0.0.1:4222, `TAILGATE_TEST_NATS`), read back
//! with a JetStream consumer: every operation in order, the outbox, kill -9 (nothing lost, nothing
//! stored twice thanks to `Nats-Msg-Id`), the server restarted under a writer, and the errors for
//! wrong credentials and a missing stream.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures_util::StreamExt;
use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(60);

fn nats_url() -> String {
    std::env::var("TAILGATE_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Held shared by every NATS test, exclusively by the one that restarts the server.
fn nats_lock() -> &'static tokio::sync::RwLock<()> {
    static LOCK: OnceLock<tokio::sync::RwLock<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}

fn nats_sink(prefix: &str, extra: &str) -> String {
    format!("[sink]\ntype = \"nats\"\nurl = \"{}\"\ntopic_prefix = \"{prefix}\"\n{extra}", nats_url())
}

/// One message read back from the stream.
#[derive(Debug, Clone)]
struct Msg {
    subject: String,
    key: Option<serde_json::Value>,
    /// `None`: an empty payload (a tombstone).
    value: Option<serde_json::Value>,
    msg_id: String,
    headers: BTreeMap<String, String>,
}

impl Msg {
    fn op(&self) -> &str {
        self.value.as_ref().and_then(|v| v["op"].as_str()).unwrap_or("tombstone")
    }
    fn id(&self) -> i64 {
        let v = self.value.as_ref().expect("not a tombstone");
        v["after"]["id"].as_i64().or_else(|| v["before"]["id"].as_i64()).expect("id")
    }
}

fn parse(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into()))
}

async fn jetstream() -> jetstream::Context {
    let client = async_nats::connect(nats_url()).await.expect("NATS at 127.0.0.1:4222 (TAILGATE_TEST_NATS)");
    jetstream::new(client)
}

/// Reads the whole stream from its start until at least `at_least` messages arrived (or `timeout`),
/// then briefly longer (duplicates would show up there).
async fn read_stream(stream: &str, at_least: usize, timeout: Duration) -> Vec<Msg> {
    let js = jetstream().await;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match js.get_stream(stream).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_) => return Vec::new(),
        }
    };
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: AckPolicy::None,
            deliver_policy: DeliverPolicy::All,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut out = Vec::new();
    let mut settle_until: Option<Instant> = None;
    loop {
        if out.len() >= at_least && settle_until.is_none() {
            settle_until = Some(Instant::now() + Duration::from_millis(1000));
        }
        let now = Instant::now();
        if now > deadline || settle_until.is_some_and(|s| now > s) {
            break;
        }
        let Ok(mut batch) = consumer.fetch().max_messages(1000).expires(Duration::from_millis(300)).messages().await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while let Some(Ok(m)) = batch.next().await {
            let mut headers = BTreeMap::new();
            if let Some(h) = &m.headers {
                for (name, values) in h.iter() {
                    let name: &str = name.as_ref();
                    headers.insert(name.to_owned(), values.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(","));
                }
            }
            out.push(Msg {
                subject: m.subject.to_string(),
                key: headers.get("Tailgate-Key").map(|k| parse(k.as_bytes())),
                value: (!m.payload.is_empty()).then(|| parse(&m.payload)),
                msg_id: headers.get("Nats-Msg-Id").cloned().unwrap_or_default(),
                headers,
            });
        }
    }
    out
}

async fn delete_stream(name: &str) {
    let _ = jetstream().await.delete_stream(name).await;
}

/// Inserts `rows` rows (ids 0..rows) in transactions of 50, one transaction every 40 ms.
fn spawn_writer(url: String, rows: i64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let db = connect(&url).await;
        for first in (0..rows).step_by(50) {
            let last = (first + 49).min(rows - 1);
            db.batch_execute(&format!(
                "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series({first}, {last}) g"
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    })
}

/// How often each created id arrived, and whether first arrivals came in commit (id) order.
fn created(records: &[Msg]) -> (BTreeMap<i64, usize>, bool) {
    let mut ids = BTreeMap::new();
    let mut in_order = true;
    let mut last = -1;
    for r in records.iter().filter(|r| r.op() == "c") {
        let id = r.id();
        let n = ids.entry(id).or_insert(0);
        if *n == 0 {
            in_order &= id > last;
            last = id;
        }
        *n += 1;
    }
    (ids, in_order)
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_every_operation_arrives_in_order_with_key_and_message_id() {
    let _nats = nats_lock().read().await;
    let s = Scenario::new(
        "nats_ops",
        "CREATE TABLE customers (id int PRIMARY KEY, name text); CREATE TABLE \"odd name\" (id int PRIMARY KEY);",
    )
    .await;
    let prefix = format!("natsops{}", nonce());
    let tg = s.start(&nats_sink(&prefix, ""), "").await;
    s.db.exec("INSERT INTO customers VALUES (1, 'ada')").await;
    s.db.exec("UPDATE customers SET name = 'ada l.' WHERE id = 1").await;
    s.db.exec("UPDATE customers SET id = 2 WHERE id = 1").await;
    s.db.exec("DELETE FROM customers WHERE id = 2").await;
    s.db.exec("INSERT INTO \"odd name\" VALUES (7)").await;

    let msgs = read_stream(&prefix, 7, WAIT).await;
    let customers: Vec<&Msg> = msgs.iter().filter(|m| m.subject == format!("{prefix}.public.customers")).collect();
    let ops: Vec<&str> = customers.iter().map(|m| m.op()).collect();
    assert_eq!(ops, ["c", "u", "d", "tombstone", "c", "d", "tombstone"], "{customers:#?}");
    assert_eq!(customers[0].key, Some(serde_json::json!({"id": 1})), "key in the Tailgate-Key header");
    assert_eq!(customers[0].value.as_ref().unwrap()["after"], serde_json::json!({"id": 1, "name": "ada"}));
    assert_eq!(customers[1].value.as_ref().unwrap()["after"]["name"], "ada l.");
    assert_eq!(customers[3].key, Some(serde_json::json!({"id": 1})), "the tombstone keeps the key");
    assert!(customers[3].msg_id.ends_with("/t"), "tombstone id: {}", customers[3].msg_id);
    assert_eq!(customers[6].key, Some(serde_json::json!({"id": 2})));
    // Every message has its own deterministic id.
    let ids: std::collections::BTreeSet<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), msgs.len(), "Nats-Msg-Id unique per record: {msgs:#?}");
    assert!(customers[0].msg_id.starts_with(&format!("{prefix}.public.customers/lsn ")), "{}", customers[0].msg_id);
    // A table name with a space: the subject token gets '_'.
    let odd: Vec<&Msg> = msgs.iter().filter(|m| m.subject == format!("{prefix}.public.odd_name")).collect();
    assert_eq!(odd.len(), 1, "{msgs:#?}");
    assert_eq!(odd[0].value.as_ref().unwrap()["source"]["table"], "odd name");

    s.finish(tg).await;
    delete_stream(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_outbox_keeps_per_aggregate_order_and_adds_subjects_outside_the_prefix() {
    let _nats = nats_lock().read().await;
    let s = Scenario::new(
        "nats_outbox",
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
                              aggregateid text NOT NULL, type text NOT NULL, payload jsonb);",
    )
    .await;
    let n = nonce();
    let prefix = format!("natsob{n}");
    // Table events under the prefix; message events on a subject outside it (added to the stream).
    let outbox = format!(
        "[[outbox]]\ntable = \"public.outbox\"\ntopic = \"{prefix}.outbox.${{routedByValue}}\"\n\
         additional_fields = [\"type:header:eventType\"]\n\
         [[outbox]]\nmessage_prefix = \"outbox\"\ntopic = \"events{n}.${{routedByValue}}\"\n"
    );
    let tg = s.start(&nats_sink(&prefix, ""), &outbox).await;
    for seq in 0..20 {
        let mut sql = String::from("BEGIN;");
        for order in 0..5 {
            sql.push_str(&format!(
                "WITH e AS (INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
                            VALUES ('order', 'order-{order}', 'OrderCreated', '{{\"seq\": {seq}}}') RETURNING id)
                 DELETE FROM outbox WHERE id IN (SELECT id FROM e);"
            ));
        }
        sql.push_str("COMMIT;");
        s.db.exec(&sql).await;
    }
    s.db.exec(
        r#"SELECT pg_logical_emit_message(true, 'outbox', '{"id":"m-1","aggregatetype":"customer","aggregateid":"c-9","type":"CustomerCreated","payload":{"name":"Ada"}}')"#,
    )
    .await;

    let msgs = read_stream(&prefix, 101, WAIT).await;
    let orders: Vec<&Msg> = msgs.iter().filter(|m| m.subject == format!("{prefix}.outbox.order")).collect();
    assert_eq!(orders.len(), 100, "{msgs:#?}");
    let mut sequences: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in &orders {
        let key = m.key.as_ref().and_then(|k| k.as_str()).expect("aggregate id key").to_owned();
        sequences.entry(key).or_default().push(m.value.as_ref().unwrap()["seq"].as_i64().unwrap());
        assert_eq!(m.headers.get("eventType").map(String::as_str), Some("OrderCreated"));
        assert_eq!(m.headers.get("id").map(String::len), Some(36), "the event id header");
        assert_eq!(Some(&m.msg_id), m.headers.get("id"), "an outbox record's Nats-Msg-Id is its event id");
    }
    assert_eq!(sequences.len(), 5);
    for (key, seqs) in &sequences {
        assert_eq!(seqs, &(0..20).collect::<Vec<_>>(), "aggregate {key} out of order");
    }
    let customer: Vec<&Msg> = msgs.iter().filter(|m| m.subject == format!("events{n}.customer")).collect();
    assert_eq!(customer.len(), 1, "{msgs:#?}");
    assert_eq!(customer[0].key, Some(serde_json::json!("c-9")));
    assert_eq!(customer[0].value, Some(serde_json::json!({"name": "Ada"})));
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("subject added to the JetStream stream"), "{log}");
    s.db.drop().await;
    delete_stream(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_kill_9_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let _nats = nats_lock().read().await;
    let s = Scenario::new("nats_kill9", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let prefix = format!("natskill{}", nonce());
    let cfg = s.config(&nats_sink(&prefix, ""), "");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    let writer = spawn_writer(s.db.url(), 3000);
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(600 + round * 300)).await;
        tg.kill9().await;
        tg = Tailgate::start(&s.dir, &cfg);
        tg.wait_streaming().await;
    }
    writer.await.unwrap();
    assert_every_row_once_in_order(&prefix, "kill -9").await;
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    s.db.drop().await;
    delete_stream(&prefix).await;
}

/// Reads the 3,000 rows of `spawn_writer` back from the stream and asserts that each was stored
/// exactly once (JetStream's duplicate window drops what is re-sent) and in commit order.
async fn assert_every_row_once_in_order(prefix: &str, after: &str) {
    let msgs = read_stream(prefix, 3000, WAIT).await;
    let (ids, in_order) = created(&msgs);
    let missing: Vec<i64> = (0..3000).filter(|i| !ids.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} rows missing after {after}, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let twice: Vec<i64> = ids.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    if let Some(first) = twice.first() {
        for m in msgs.iter().filter(|m| m.op() == "c" && m.id() == *first) {
            eprintln!("stored twice: Nats-Msg-Id {:?}, source {}", m.msg_id, m.value.as_ref().unwrap()["source"]);
        }
    }
    assert!(
        twice.is_empty(),
        "JetStream's duplicate window drops re-sent records; stored twice after {after}: {twice:?}"
    );
    assert!(in_order, "commit order kept across {after}");
}

/// Starts the shared NATS server again whatever happens to the test.
struct RestartNats;

/// Starts the shared server (as the machine does) and waits until it accepts connections.
fn start_nats() {
    let _ = Command::new("start-stop-daemon")
        .args(["--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server", "--"])
        .args(["-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server", "-l", "/var/log/nats-server.log"])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", 4222)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for RestartNats {
    fn drop(&mut self) {
        start_nats();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_server_restarted_under_a_writer_loses_nothing_and_keeps_order() {
    let _nats = nats_lock().write().await;
    let s = Scenario::new("nats_restart", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let prefix = format!("natsrestart{}", nonce());
    let tg = s.start(&nats_sink(&prefix, "ack_timeout_ms = 2000\n"), "").await;
    let writer = spawn_writer(s.db.url(), 3000);
    tokio::time::sleep(Duration::from_millis(800)).await;
    {
        let _restart = RestartNats;
        let stopped = Command::new("pkill").args(["-x", "nats-server"]).status().unwrap();
        assert!(stopped.success(), "nats-server was running");
        // Down while the writer goes on.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    writer.await.unwrap();
    assert_every_row_once_in_order(&prefix, "the server restart").await;
    let log = tg.log_text();
    assert!(log.contains("NATS connection lost"), "{log}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    s.db.drop().await;
    delete_stream(&prefix).await;
}

/// The connection is cut after the network lost what the sink sent for a while: the records lost on
/// the wire must be stored before any later one. (Before each client could log in only once, the
/// NATS client reconnected by itself and sent the records queued in it meanwhile at once, while the
/// lost ones were published again only after `ack_timeout_ms`: out of order, every time.)
#[tokio::test(flavor = "multi_thread")]
async fn nats_connection_cut_with_records_lost_on_the_wire_keeps_order() {
    let _nats = nats_lock().read().await;
    let s = Scenario::new("nats_cut", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let prefix = format!("natscut{}", nonce());
    let target = nats_url().trim_start_matches("nats://").to_owned();
    let proxy = tailgate_e2e::sinks::TcpProxy::start(target).await;
    let sink = format!(
        "[sink]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:{}\"\ntopic_prefix = \"{prefix}\"\nack_timeout_ms = 2000\n",
        proxy.port
    );
    let tg = s.start(&sink, "").await;
    let writer = spawn_writer(s.db.url(), 3000);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // What the sink publishes now is lost on the wire (no PubAck comes back)...
    proxy.set_swallow(true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // ...then the connection drops while the server stays reachable: the old client may reconnect
    // at once, and must not (its queue would go first).
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set_swallow(false);
    writer.await.unwrap();
    // Records lost on the wire are stored before later ones.
    assert_every_row_once_in_order(&prefix, "the cut").await;
    let log = tg.log_text();
    assert!(log.contains("NATS connected again with a fresh client"), "{log}");
    // The old client tried to log in again (the port stayed open) and was refused by the sink.
    assert!(log.contains("has logged in once"), "{log}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    s.db.drop().await;
    delete_stream(&prefix).await;
}

/// A NATS server of the test's own, with a user and password.
struct OwnServer {
    child: Child,
    port: u16,
}

impl OwnServer {
    fn start(dir: &std::path::Path) -> OwnServer {
        let port = free_port();
        let store = dir.join("nats-store");
        let child = Command::new("/usr/sbin/nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "--user", "tg", "--pass", "secret"])
            .arg("-sd")
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "own nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnServer { child, port }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_wrong_credentials_and_a_missing_stream_are_named_with_the_fix() {
    let _nats = nats_lock().read().await;
    let s = Scenario::new("nats_errors", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = OwnServer::start(&s.dir);

    // Wrong password.
    let sink = format!(
        "[sink]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:{}\"\nuser = \"tg\"\npassword = \"wrong\"\n",
        server.port
    );
    let cfg = s.config(&sink, "");
    std::fs::write(s.dir.join("check.toml"), &cfg).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", s.dir.join("check.toml").to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("FAILED") && out.contains("refused the credentials") && out.contains("sink.password"),
        "{out}"
    );
    let mut tg = Tailgate::start(&s.dir, &cfg);
    let status = tg.wait_exit(Duration::from_secs(30)).await;
    let log = tg.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("refused the credentials") && log.contains("Fix: correct sink.user and sink.password"),
        "{log}"
    );

    // Right password: works against the same server.
    let good = sink.replace("wrong", "secret");
    std::fs::write(s.dir.join("check.toml"), s.config(&good, "")).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", s.dir.join("check.toml").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");

    // A stream that is not there, with creation off.
    let stream = format!("missing{}", nonce());
    let sink = nats_sink("natsmissing", &format!("stream = \"{stream}\"\ncreate_stream = false\n"));
    let cfg = s.config(&sink, "");
    std::fs::write(s.dir.join("check.toml"), &cfg).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", s.dir.join("check.toml").to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("FAILED  stream") && out.contains("does not exist") && out.contains("create_stream = true"),
        "{out}"
    );
    let mut tg = Tailgate::start(&s.dir, &cfg);
    let status = tg.wait_exit(Duration::from_secs(30)).await;
    let log = tg.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!("JetStream stream \"{stream}\" does not exist")) && log.contains("nats stream add"),
        "{log}"
    );
    assert!(jetstream().await.get_stream(&stream).await.is_err(), "nothing was created");
    drop(server);
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_stopping_while_the_server_is_down_gives_up_after_the_drain_timeout_and_loses_nothing() {
    let _nats = nats_lock().write().await;
    let s = Scenario::new("nats_drain", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let prefix = format!("natsdrain{}", nonce());
    let cfg = s.config(&nats_sink(&prefix, ""), "");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    s.db.exec("INSERT INTO t VALUES (0, 'before')").await;
    assert_eq!(read_stream(&prefix, 1, WAIT).await.len(), 1);
    {
        let _restart = RestartNats;
        assert!(Command::new("pkill").args(["-x", "nats-server"]).status().unwrap().success());
        s.db.exec("INSERT INTO t SELECT g, 'while down' FROM generate_series(1, 10) g").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        signal(tg.pid(), "TERM");
        let started = Instant::now();
        let status = tg.wait_exit(Duration::from_secs(90)).await;
        let log = tg.log_text();
        assert!(!status.success(), "a stop that cannot drain is an error: {log}");
        // The run's error, or (when the idle replication connection was dropped meanwhile) its own line.
        assert!(log.contains("record(s) still unacknowledged after 30s"), "{log}");
        assert!(started.elapsed() >= Duration::from_secs(25), "waited for the drain timeout: {:?}", started.elapsed());
    }
    // Nothing was checkpointed past them: the next run delivers them.
    let tg = Tailgate::start(&s.dir, &cfg);
    let msgs = read_stream(&prefix, 11, WAIT).await;
    let (ids, in_order) = created(&msgs);
    assert_eq!(ids.keys().copied().collect::<Vec<_>>(), (0..=10).collect::<Vec<_>>(), "{msgs:#?}");
    assert!(ids.values().all(|n| *n == 1) && in_order, "{ids:?}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    s.db.drop().await;
    delete_stream(&prefix).await;
}
