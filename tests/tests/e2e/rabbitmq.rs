//! The RabbitMQ sink against the real broker (127.0.0.1:5672, guest/guest, `TAILGATE_TEST_AMQP`), read
//! back from a durable queue bound to the exchange: every operation in order, the outbox, kill -9 and a
//! broker restart under a writer (nothing lost; RabbitMQ does not de-duplicate, so repeats are exact
//! copies, same `message_id`), and the errors for wrong credentials, a missing exchange and
//! unroutable messages.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(60);

fn amqp_url() -> String {
    std::env::var("TAILGATE_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Held shared by every RabbitMQ test, exclusively by the one that restarts the broker.
fn rabbit_lock() -> &'static tokio::sync::RwLock<()> {
    static LOCK: OnceLock<tokio::sync::RwLock<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}

fn rabbit_sink(prefix: &str, extra: &str) -> String {
    format!("[sink]\ntype = \"rabbitmq\"\nurl = \"{}\"\ntopic_prefix = \"{prefix}\"\n{extra}", amqp_url())
}

async fn channel() -> (Connection, Channel) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
            Ok(conn) => {
                let channel = conn.create_channel().await.expect("channel");
                return (conn, channel);
            }
            Err(e) if Instant::now() > deadline => panic!("RabbitMQ at {}: {e}", amqp_url()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Declares `exchange` (durable topic) and a durable queue of the same name bound to it by `pattern`.
async fn bind_queue(exchange: &str, pattern: &str) -> String {
    let (conn, ch) = channel().await;
    let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(exchange.into(), ExchangeKind::Topic, options, FieldTable::default()).await.unwrap();
    let queue = format!("q.{exchange}.{}", pattern.replace(['#', '*'], "_"));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(queue.as_str().into(), options, FieldTable::default()).await.unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.into(),
        pattern.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    queue
}

async fn cleanup(exchange: &str, queues: &[&str]) {
    let (conn, ch) = channel().await;
    for q in queues {
        let _ = ch.queue_delete((*q).into(), QueueDeleteOptions::default()).await;
    }
    let _ = ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()).await;
    let _ = conn.close(200, "ok".into()).await;
}

/// One message read back from a queue.
#[derive(Debug, Clone)]
struct Msg {
    routing_key: String,
    key: Option<serde_json::Value>,
    /// `None`: an empty body (a tombstone).
    value: Option<serde_json::Value>,
    message_id: String,
    persistent: bool,
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

/// Consumes `queue` until at least `at_least` messages arrived (or `timeout`), then briefly longer.
async fn read_queue(queue: &str, at_least: usize, timeout: Duration) -> Vec<Msg> {
    let (conn, ch) = channel().await;
    let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut consumer =
        ch.basic_consume(queue.into(), "tailgate-e2e".into(), options, FieldTable::default()).await.expect("consume");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut settle_until: Option<Instant> = None;
    loop {
        if out.len() >= at_least && settle_until.is_none() {
            settle_until = Some(Instant::now() + Duration::from_millis(1000));
        }
        let now = Instant::now();
        let until = settle_until.unwrap_or(deadline).min(deadline);
        if now >= until {
            break;
        }
        let Ok(Some(Ok(d))) = tokio::time::timeout(until - now, consumer.next()).await else { continue };
        let mut headers = BTreeMap::new();
        if let Some(table) = d.properties.headers() {
            for (k, v) in table {
                let text = match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    other => format!("{other:?}"),
                };
                headers.insert(k.to_string(), text);
            }
        }
        out.push(Msg {
            routing_key: d.routing_key.to_string(),
            key: headers.get("Tailgate-Key").map(|k| parse(k.as_bytes())),
            value: (!d.data.is_empty()).then(|| parse(&d.data)),
            message_id: d.properties.message_id().as_ref().map(ToString::to_string).unwrap_or_default(),
            persistent: *d.properties.delivery_mode() == Some(2),
            headers,
        });
    }
    let _ = conn.close(200, "ok".into()).await;
    out
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

/// Checks at-least-once delivery of ids 0..rows: none missing, first arrivals in commit order, and
/// every repeat an exact copy of an earlier message (same message_id). Gives the repeats.
fn check_all_arrived(msgs: &[Msg], rows: i64) -> usize {
    let mut seen: BTreeMap<i64, String> = BTreeMap::new();
    let mut last = -1;
    let mut repeats = 0;
    for m in msgs.iter().filter(|m| m.op() == "c") {
        let id = m.id();
        match seen.get(&id) {
            Some(message_id) => {
                assert_eq!(message_id, &m.message_id, "a repeat carries the same message_id");
                repeats += 1;
            }
            None => {
                assert!(id > last, "first arrivals in commit order: {id} after {last}");
                last = id;
                seen.insert(id, m.message_id.clone());
            }
        }
    }
    let missing: Vec<i64> = (0..rows).filter(|i| !seen.contains_key(i)).collect();
    assert!(missing.is_empty(), "{} rows missing, e.g. {:?}", missing.len(), &missing[..missing.len().min(10)]);
    repeats
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_every_operation_arrives_in_order_with_key_and_message_id() {
    let _rabbit = rabbit_lock().read().await;
    let s = Scenario::new("rabbit_ops", "CREATE TABLE customers (id int PRIMARY KEY, name text)").await;
    let prefix = format!("rabbitops{}", nonce());
    let queue = bind_queue(&prefix, &format!("{prefix}.#")).await;
    let tg = s.start(&rabbit_sink(&prefix, ""), "").await;
    s.db.exec("INSERT INTO customers VALUES (1, 'ada')").await;
    s.db.exec("UPDATE customers SET name = 'ada l.' WHERE id = 1").await;
    s.db.exec("UPDATE customers SET id = 2 WHERE id = 1").await;
    s.db.exec("DELETE FROM customers WHERE id = 2").await;

    let msgs = read_queue(&queue, 7, WAIT).await;
    let ops: Vec<&str> = msgs.iter().map(Msg::op).collect();
    assert_eq!(ops, ["c", "u", "d", "tombstone", "c", "d", "tombstone"], "{msgs:#?}");
    assert!(msgs.iter().all(|m| m.routing_key == format!("{prefix}.public.customers")), "{msgs:#?}");
    assert!(msgs.iter().all(|m| m.persistent), "persistent delivery mode");
    assert_eq!(msgs[0].key, Some(serde_json::json!({"id": 1})), "key in the Tailgate-Key header");
    assert_eq!(msgs[0].value.as_ref().unwrap()["after"], serde_json::json!({"id": 1, "name": "ada"}));
    assert_eq!(msgs[1].value.as_ref().unwrap()["after"]["name"], "ada l.");
    assert_eq!(msgs[3].key, Some(serde_json::json!({"id": 1})), "the tombstone keeps the key");
    assert!(msgs[3].message_id.ends_with("/t"), "{}", msgs[3].message_id);
    assert_eq!(msgs[4].key, Some(serde_json::json!({"id": 2})));
    let ids: BTreeSet<&str> = msgs.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids.len(), msgs.len(), "message_id unique per record");
    assert!(msgs[0].message_id.starts_with(&format!("{prefix}.public.customers/lsn ")), "{}", msgs[0].message_id);

    s.finish(tg).await;
    cleanup(&prefix, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_outbox_keeps_per_aggregate_order() {
    let _rabbit = rabbit_lock().read().await;
    let s = Scenario::new(
        "rabbit_outbox",
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
                              aggregateid text NOT NULL, type text NOT NULL, payload jsonb);",
    )
    .await;
    let prefix = format!("rabbitob{}", nonce());
    let queue = bind_queue(&prefix, &format!("{prefix}.outbox.*")).await;
    let outbox = format!(
        "[[outbox]]\ntable = \"public.outbox\"\ntopic = \"{prefix}.outbox.${{routedByValue}}\"\n\
         additional_fields = [\"type:header:eventType\"]\n\
         [[outbox]]\nmessage_prefix = \"outbox\"\ntopic = \"{prefix}.outbox.${{routedByValue}}\"\n"
    );
    let tg = s.start(&rabbit_sink(&prefix, ""), &outbox).await;
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

    let msgs = read_queue(&queue, 101, WAIT).await;
    let mut sequences: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.routing_key == format!("{prefix}.outbox.order")) {
        let key = m.key.as_ref().and_then(|k| k.as_str()).expect("aggregate id key").to_owned();
        sequences.entry(key).or_default().push(m.value.as_ref().unwrap()["seq"].as_i64().unwrap());
        assert_eq!(m.headers.get("eventType").map(String::as_str), Some("OrderCreated"));
        assert_eq!(Some(&m.message_id), m.headers.get("id"), "an outbox record's message_id is its event id");
    }
    assert_eq!(sequences.len(), 5, "{msgs:#?}");
    for (key, seqs) in &sequences {
        assert_eq!(seqs, &(0..20).collect::<Vec<_>>(), "aggregate {key} out of order");
    }
    let customer: Vec<&Msg> = msgs.iter().filter(|m| m.routing_key == format!("{prefix}.outbox.customer")).collect();
    assert_eq!(customer.len(), 1, "{msgs:#?}");
    assert_eq!(customer[0].key, Some(serde_json::json!("c-9")));
    assert_eq!(customer[0].value, Some(serde_json::json!({"name": "Ada"})));
    s.finish(tg).await;
    cleanup(&prefix, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_kill_9_mid_stream_loses_nothing() {
    let _rabbit = rabbit_lock().read().await;
    let s = Scenario::new("rabbit_kill9", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let prefix = format!("rabbitkill{}", nonce());
    let queue = bind_queue(&prefix, &format!("{prefix}.#")).await;
    let cfg = s.config(&rabbit_sink(&prefix, ""), "");
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
    let msgs = read_queue(&queue, 3000, WAIT).await;
    let repeats = check_all_arrived(&msgs, 3000);
    eprintln!("kill -9 x2: 3000 rows delivered, {repeats} repeated (after the last checkpoint)");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    s.db.drop().await;
    cleanup(&prefix, &[&queue]).await;
}

/// Starts the shared broker's application again whatever happens to the test.
struct RestartRabbit;

fn start_rabbit() {
    let _ = Command::new("rabbitmqctl").arg("start_app").output();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", 5672)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for RestartRabbit {
    fn drop(&mut self) {
        start_rabbit();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restarted_under_a_writer_loses_nothing_and_keeps_order() {
    let _rabbit = rabbit_lock().write().await;
    let s = Scenario::new("rabbit_restart", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let prefix = format!("rabbitrestart{}", nonce());
    let queue = bind_queue(&prefix, &format!("{prefix}.#")).await;
    let tg = s.start(&rabbit_sink(&prefix, ""), "").await;
    let writer = spawn_writer(s.db.url(), 3000);
    tokio::time::sleep(Duration::from_millis(800)).await;
    {
        let _restart = RestartRabbit;
        let stopped = Command::new("rabbitmqctl").arg("stop_app").output().unwrap();
        assert!(stopped.status.success(), "{stopped:?}");
        // Down while the writer goes on.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    writer.await.unwrap();
    let msgs = read_queue(&queue, 3000, WAIT).await;
    let repeats = check_all_arrived(&msgs, 3000);
    eprintln!("broker restart: 3000 rows delivered, {repeats} repeated (unconfirmed when the connection was lost)");
    let log = tg.log_text();
    assert!(log.contains("RabbitMQ connection lost"), "{log}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    s.db.drop().await;
    cleanup(&prefix, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_wrong_credentials_missing_exchange_and_unroutable_are_named_with_the_fix() {
    let _rabbit = rabbit_lock().read().await;
    let s = Scenario::new("rabbit_errors", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let check = |cfg: &str| {
        std::fs::write(s.dir.join("check.toml"), cfg).unwrap();
        tailgate_cmd(&["check", "--config", s.dir.join("check.toml").to_str().unwrap()])
    };

    // Wrong password.
    let prefix = format!("rabbiterr{}", nonce());
    let url = amqp_url().replacen("guest:guest", "guest:wrong", 1);
    let cfg = s.config(&format!("[sink]\ntype = \"rabbitmq\"\nurl = \"{url}\"\ntopic_prefix = \"{prefix}\"\n"), "");
    let (code, out, _) = check(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("FAILED") && out.contains("refused the credentials") && out.contains("sink.url"), "{out}");
    assert!(!out.contains("guest:wrong"), "the password is not shown: {out}");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    let status = tg.wait_exit(Duration::from_secs(30)).await;
    let log = tg.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("refused the credentials") && log.contains("Fix: correct the user and password"), "{log}");

    // A missing exchange, with declaring off.
    let cfg = s.config(&rabbit_sink(&prefix, "declare_exchange = false\n"), "");
    let (code, out, _) = check(&cfg);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("FAILED  exchange") && out.contains("declare_exchange = true"), "{out}");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    let status = tg.wait_exit(Duration::from_secs(30)).await;
    let log = tg.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("exchange \"{prefix}\" does not exist")) && log.contains("rabbitmqadmin"), "{log}");

    // The exchange is declared by tailgate, but no queue is bound: the run stops before the record.
    let cfg = s.config(&rabbit_sink(&prefix, ""), "");
    let (code, out, _) = check(&cfg);
    assert_eq!(code, 0, "{out}");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    s.db.exec("INSERT INTO t VALUES (1)").await;
    let status = tg.wait_exit(Duration::from_secs(30)).await;
    let log = tg.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("unroutable") && log.contains("bind a queue"), "{log}");

    // With on_unroutable = "dead_letter", it goes to the dead-letter routing key (bound here), and
    // nothing was lost meanwhile: the restart sends it again.
    let dlq = bind_queue(&prefix, &format!("{prefix}.dlq")).await;
    let tg = s.start(&rabbit_sink(&prefix, "on_unroutable = \"dead_letter\"\n"), "").await;
    s.db.exec("INSERT INTO t VALUES (2)").await;
    let msgs = read_queue(&dlq, 2, WAIT).await;
    assert_eq!(msgs.len(), 2, "{msgs:#?}");
    for (m, id) in msgs.iter().zip([1, 2]) {
        assert_eq!(m.routing_key, format!("{prefix}.dlq"));
        assert_eq!(m.id(), id);
        assert_eq!(m.headers.get("tailgate.error.cause").map(String::as_str), Some("unroutable"));
        assert_eq!(m.headers.get("tailgate.error.topic"), Some(&format!("{prefix}.public.t")));
    }
    s.finish(tg).await;
    cleanup(&prefix, &[&dlq]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_stopping_while_the_broker_is_down_gives_up_after_the_drain_timeout_and_loses_nothing() {
    let _rabbit = rabbit_lock().write().await;
    let s = Scenario::new("rabbit_drain", "CREATE TABLE t (id int PRIMARY KEY, pad text)").await;
    let prefix = format!("rabbitdrain{}", nonce());
    let queue = bind_queue(&prefix, &format!("{prefix}.#")).await;
    let cfg = s.config(&rabbit_sink(&prefix, ""), "");
    let mut tg = Tailgate::start(&s.dir, &cfg);
    tg.wait_streaming().await;
    {
        let _restart = RestartRabbit;
        let stopped = Command::new("rabbitmqctl").arg("stop_app").output().unwrap();
        assert!(stopped.status.success(), "{stopped:?}");
        s.db.exec("INSERT INTO t SELECT g, 'while down' FROM generate_series(0, 9) g").await;
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
    let tg = Tailgate::start(&s.dir, &cfg);
    let msgs = read_queue(&queue, 10, WAIT).await;
    check_all_arrived(&msgs, 10);
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    s.db.drop().await;
    cleanup(&prefix, &[&queue]).await;
}
