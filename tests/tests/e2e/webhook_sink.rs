//! The HTTP webhook sink against a receiver inside the test (tailgate_e2e::sinks::Receiver) that
//! verifies the HMAC signature and answers 200, 4xx, 5xx, slowly, or drops the connection on
//! command; a TCP proxy in front of it refuses connections for a while.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tailgate_e2e::sinks::*;
use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "s3cret";

fn webhook_sink(url: &str, prefix: &str, extra: &str) -> String {
    format!(
        "[sink]\ntype = \"http\"\nurl = \"{url}\"\ntopic_prefix = \"{prefix}\"\nsecret = \"{SECRET}\"\n\
         retry_backoff_max_ms = 500\n{extra}"
    )
}

fn step_events(records: &[serde_json::Value]) -> Vec<(String, i64, String, i64)> {
    records
        .iter()
        .filter_map(|r| {
            let row = &r["value"]["after"];
            Some((
                r["id"].as_str()?.to_owned(),
                row["id"].as_i64()?,
                r["value"]["op"].as_str()?.to_owned(),
                row["v"].as_i64()?,
            ))
        })
        .collect()
}

/// Waits until the accepted records hold `n` distinct ids.
async fn wait_distinct(receiver: &Receiver, path: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let records = receiver.accepted(path);
        let distinct = records.iter().map(|r| r["id"].to_string()).collect::<std::collections::HashSet<_>>().len();
        if distinct >= n {
            return records;
        }
        assert!(std::time::Instant::now() < deadline, "{path}: {distinct} of {n} distinct records");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_every_operation_arrives_in_order_signed_with_ids_and_idempotency_keys() {
    let receiver = Receiver::start(SECRET).await;
    let s = Scenario::new("hook_ops", "CREATE TABLE customers (id int PRIMARY KEY, name text)").await;
    let prefix = format!("hops{}", nonce());
    let tg = s
        .start(&webhook_sink(&receiver.url("/hook"), &prefix, "[sink.headers]\nAuthorization = \"Bearer t0ken\"\n"), "")
        .await;
    s.db.exec("INSERT INTO customers VALUES (1, 'ada')").await;
    s.db.exec("UPDATE customers SET name = 'ada l.' WHERE id = 1").await;
    s.db.exec("UPDATE customers SET id = 2 WHERE id = 1").await;
    s.db.exec("DELETE FROM customers WHERE id = 2").await;

    let records = receiver.wait_accepted("/hook", 7, WAIT).await;
    let ops: Vec<_> = records.iter().map(|r| r["value"]["op"].as_str().unwrap_or("tombstone")).collect();
    assert_eq!(ops, ["c", "u", "d", "tombstone", "c", "d", "tombstone"], "{records:#?}");
    assert!(records.iter().all(|r| r["topic"] == format!("{prefix}.public.customers")));
    assert_eq!(records[0]["key"], serde_json::json!({"id": 1}));
    assert_eq!(records[0]["value"]["after"], serde_json::json!({"id": 1, "name": "ada"}));
    assert_eq!(records[3]["value"], serde_json::Value::Null);
    assert_eq!(records[3]["id"].as_str().unwrap(), format!("{}/t", records[2]["id"].as_str().unwrap()));

    for request in receiver.received() {
        assert!(request.signature_ok, "the receiver verifies X-Tailgate-Signature: {:?}", request.headers);
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(request.headers["authorization"], "Bearer t0ken");
        let ids: String = request.records().iter().map(|r| format!("{}\n", r["id"].as_str().unwrap())).collect();
        let key: String = Sha256::digest(ids.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(request.headers["idempotency-key"], key, "the key is the SHA-256 of the batch's record ids");
        assert_eq!(request.headers["x-tailgate-records"], request.records().len().to_string());
    }
    // A body signed with another secret does not verify.
    let any = &receiver.received()[0];
    assert!(!verify_signature(b"other", &any.body, &any.headers["x-tailgate-signature"]));
    s.finish(tg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_outbox_events_keep_per_aggregate_order_and_dead_letters_go_to_their_url() {
    let receiver = Receiver::start(SECRET).await;
    let s = Scenario::new(
        "hook_outbox",
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
                              aggregateid text NOT NULL, type text NOT NULL, payload jsonb);",
    )
    .await;
    let prefix = format!("hob{}", nonce());
    let outbox = format!("[[outbox]]\ntable = \"public.outbox\"\ntopic = \"{prefix}.outbox.${{routedByValue}}\"\n");
    let sink = webhook_sink(
        &receiver.url("/hook"),
        &prefix,
        &format!("dead_letter_url = \"{}\"\nmax_batch_records = 7\n", receiver.url("/dlq")),
    );
    let tg = s.start(&sink, &outbox).await;
    for seq in 0..20 {
        let mut sql = String::from("BEGIN;");
        for order in 0..5 {
            sql.push_str(&format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
                 VALUES ('order', 'order-{order}', 'OrderCreated', '{{\"seq\": {seq}, \"order\": {order}}}');"
            ));
        }
        sql.push_str("DELETE FROM outbox; COMMIT;");
        s.db.exec(&sql).await;
    }
    s.db.exec(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'order-0', 'Broken', NULL)",
    )
    .await;
    s.db.exec(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'order-0', 'Late', '{\"seq\": 20}')",
    )
    .await;
    let events = receiver.wait_accepted("/hook", 101, WAIT).await;
    assert_eq!(events.len(), 101);
    let mut sequences: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for e in &events {
        let key = e["key"].as_str().expect("the plain aggregate id, as a string").to_owned();
        assert_eq!(e["id"], e["headers"]["id"], "an outbox record's id is its event id");
        sequences.entry(key).or_default().push(e["value"]["seq"].as_i64().unwrap());
    }
    for (key, seqs) in &sequences {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "aggregate {key} out of order: {seqs:?}");
    }
    assert_eq!(sequences["order-0"].last(), Some(&20));
    let dead = receiver.wait_accepted("/dlq", 1, WAIT).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0]["topic"], format!("{prefix}.dlq"));
    assert!(receiver.received().iter().all(|r| r.signature_ok));
    s.finish(tg).await;
}

const STEPS: i64 = 40;
const ROWS: i64 = 50;

#[tokio::test(flavor = "multi_thread")]
async fn webhook_kill9_mid_stream_loses_nothing() {
    let receiver = Receiver::start(SECRET).await;
    let s = Scenario::new("hook_kill9", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("hk{}", nonce());
    let sink = webhook_sink(&receiver.url("/hook"), &prefix, "max_batch_records = 64\n");
    let tg = s.start(&sink, "").await;
    let writer = tokio::spawn(write_steps(s.db.url(), STEPS, ROWS, Duration::from_millis(50)));
    receiver.wait_accepted("/hook", 300, WAIT).await;
    tg.kill9().await;
    let mut tg = Tailgate::start(&s.dir, &s.config(&sink, ""));
    tg.wait_streaming().await;
    writer.await.unwrap();
    let records = wait_distinct(&receiver, "/hook", (STEPS * ROWS + (STEPS - 1) * ROWS) as usize).await;
    check_steps(&step_events(&records), STEPS, ROWS);
    s.finish(tg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_receiver_refusing_failing_slow_and_dropping_mid_stream_loses_nothing() {
    let receiver = Receiver::start(SECRET).await;
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", receiver.port)).await;
    let s = Scenario::new("hook_outage", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("ho{}", nonce());
    let url = format!("http://127.0.0.1:{}/hook", proxy.port);
    let sink = webhook_sink(&url, &prefix, "max_batch_records = 64\ntimeout_ms = 1000\n");
    let mut tg = s.start(&sink, "").await;
    let writer = tokio::spawn(write_steps(s.db.url(), STEPS, ROWS, Duration::from_millis(50)));
    receiver.wait_accepted("/hook", 200, WAIT).await;
    let retried = "the receiver did not take the batch; sending it again";
    // Connections refused.
    proxy.set_up(false);
    tg.wait_for_log_count(retried, 1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_up(true);
    // 5xx, then answers slower than timeout_ms, then connections dropped without an answer.
    for answer in [Answer::Status(503), Answer::Slow(Duration::from_millis(1500)), Answer::Drop] {
        let before = tg.log_count(retried);
        receiver.answer("/hook", answer);
        tg.wait_for_log_count(retried, before + 2, Duration::from_secs(20)).await;
    }
    receiver.answer("/hook", Answer::Ok);
    writer.await.unwrap();
    let records = wait_distinct(&receiver, "/hook", (STEPS * ROWS + (STEPS - 1) * ROWS) as usize).await;
    check_steps(&step_events(&records), STEPS, ROWS);
    let log = tg.log_text();
    assert!(log.contains("503"), "{log}");
    assert!(log.contains("sink.timeout_ms"), "a timeout names the key: {log}");
    // A batch answered 503 was sent again as it was: the same idempotency key was accepted later.
    let received = receiver.received();
    let failed = received.iter().find(|r| r.status == 503).expect("a 503");
    assert!(
        received.iter().any(|r| r.status == 200 && r.headers["idempotency-key"] == failed.headers["idempotency-key"]),
        "the refused batch was retried whole"
    );
    s.finish(tg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_refused_batches_go_to_the_dead_letter_url_and_the_run_goes_on() {
    let receiver = Receiver::start(SECRET).await;
    let s = Scenario::new("hook_refused_dlq", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("hrd{}", nonce());
    let sink =
        webhook_sink(&receiver.url("/hook"), &prefix, &format!("dead_letter_url = \"{}\"\n", receiver.url("/dlq")));
    let mut tg = s.start(&sink, "").await;
    receiver.answer("/hook", Answer::Status(422));
    s.db.exec("INSERT INTO t VALUES (1, 0)").await;
    let dead = receiver.wait_accepted("/dlq", 1, WAIT).await;
    assert_eq!(dead[0]["value"]["after"], serde_json::json!({"id": 1, "v": 0}));
    let request = receiver.received().into_iter().find(|r| r.path == "/dlq").unwrap();
    assert_eq!(request.headers["x-tailgate-refused-status"], "422");
    assert!(request.signature_ok);
    tg.wait_for_log("sending its records to the dead-letter URL", WAIT).await;
    receiver.answer("/hook", Answer::Ok);
    s.db.exec("INSERT INTO t VALUES (2, 0)").await;
    let records = receiver.wait_accepted("/hook", 1, WAIT).await;
    assert_eq!(records[0]["value"]["after"], serde_json::json!({"id": 2, "v": 0}));
    s.finish(tg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_refused_batch_without_dead_letter_url_stops_naming_status_and_fix_then_resends() {
    let receiver = Receiver::start(SECRET).await;
    let s = Scenario::new("hook_refused_stop", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("hrs{}", nonce());
    let sink = webhook_sink(&receiver.url("/hook"), &prefix, "");
    let mut tg = s.start(&sink, "").await;
    receiver.answer("/hook", Answer::Status(400));
    s.db.exec("INSERT INTO t VALUES (1, 0)").await;
    let status = tg.wait_exit(WAIT).await;
    assert!(!status.success());
    let log = tg.log_text();
    assert!(log.contains("400") && log.contains("sink.dead_letter_url"), "names the status and the fix: {log}");
    // Nothing was checkpointed past the refused record: once accepted, it arrives.
    receiver.answer("/hook", Answer::Ok);
    let mut tg = Tailgate::start(&s.dir, &s.config(&sink, ""));
    tg.wait_streaming().await;
    let records = receiver.wait_accepted("/hook", 1, WAIT).await;
    assert_eq!(records[0]["value"]["after"], serde_json::json!({"id": 1, "v": 0}));
    s.finish(tg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_refused_credentials_and_unreachable_urls_name_the_fix() {
    let receiver = Receiver::start(SECRET).await;
    let s = Scenario::new("hook_auth", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("ha{}", nonce());
    receiver.answer("/hook", Answer::Status(401));
    // Even with a dead-letter URL: a 401 says nothing about the records.
    let sink =
        webhook_sink(&receiver.url("/hook"), &prefix, &format!("dead_letter_url = \"{}\"\n", receiver.url("/dlq")));
    let config = s.dir.join("check.toml");
    std::fs::write(&config, s.config(&sink, "")).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("FAILED  http:") && out.contains("[sink.headers]"), "{out}");
    assert!(out.contains("ok      http dead letters:"), "{out}");

    let mut tg = Tailgate::start(&s.dir, &s.config(&sink, ""));
    tg.wait_streaming().await;
    s.db.exec("INSERT INTO t VALUES (1, 0)").await;
    let status = tg.wait_exit(WAIT).await;
    assert!(!status.success());
    let log = tg.log_text();
    assert!(log.contains("401") && log.contains("[sink.headers]"), "{log}");
    assert!(receiver.accepted("/dlq").is_empty(), "nothing dead-lettered on a credentials error");

    // Nobody listening: check names the URL and the fix.
    let closed = format!("http://127.0.0.1:{}/hook", free_port());
    std::fs::write(&config, s.config(&webhook_sink(&closed, &prefix, ""), "")).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("did not answer") && out.contains("correct sink.url"), "{out}");
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_receiver_down_holds_memory_bounded_and_a_stop_gives_up_after_the_drain_timeout() {
    let receiver = Receiver::start(SECRET).await;
    let s = Scenario::new("hook_backpressure", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("hbp{}", nonce());
    let port = free_port();
    let sink = webhook_sink(&receiver.url("/hook"), &prefix, "");
    let metrics = format!("[http]\nlisten = \"127.0.0.1:{port}\"\n");
    receiver.answer("/hook", Answer::Status(503));
    let mut tg = s.start(&sink, &metrics).await;
    s.db.exec("INSERT INTO t SELECT g, 0 FROM generate_series(1, 20000) g").await;
    tg.wait_for_log_count("the receiver did not take the batch; sending it again", 3, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Backpressure: the sink holds at most its queue (2 sealed batches, the one in flight, the one
    // being filled: 4 × 500 records); the rest waits in PostgreSQL.
    let (_, text) = http_get(port, "/metrics");
    let series = format!("tailgate_in_flight_records{{connector=\"{}\"}}", s.name);
    let in_flight = metric(&text, &series).unwrap_or_else(|| panic!("no {series} in {text}"));
    assert!(in_flight > 0.0 && in_flight <= 2000.0, "in flight: {in_flight}");
    let rss = peak_rss_mib(tg.pid()).unwrap();
    assert!(rss < 64.0, "peak RSS {rss} MiB");

    // Stopping while the receiver still refuses: retried for the drain timeout (30 s), then the run
    // ends with an error and no checkpoint past what was not accepted.
    let started = std::time::Instant::now();
    let (status, log) = tg.stop().await;
    assert!(!status.success(), "{log}");
    assert!(started.elapsed() >= Duration::from_secs(25), "gave up after {:?}", started.elapsed());
    assert!(log.contains("stopping while") && log.contains("sent again on restart"), "{log}");

    receiver.answer("/hook", Answer::Ok);
    let tg = Tailgate::start(&s.dir, &s.config(&sink, ""));
    let records = wait_distinct(&receiver, "/hook", 20000).await;
    let ids: std::collections::BTreeSet<i64> =
        records.iter().filter_map(|r| r["value"]["after"]["id"].as_i64()).collect();
    assert_eq!(ids.len(), 20000);
    s.finish(tg).await;
}
