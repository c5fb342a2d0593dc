//! The Redis Streams sink against the real Redis on 127.0.0.1:6379: what arrives for each change,
//! the outbox, kill -9, Redis frozen (SIGSTOP) and Redis refusing connections (a proxy that closes
//! its port) mid-stream with a writer running, and refused credentials and permissions.
//!
//! The local Redis keeps nothing on disk, so a real restart would lose the streams: "stopped and
//! back" is a freeze (SIGSTOP/SIGCONT, always undone by a guard) or a proxy in front of Redis that
//! cuts every connection and refuses new ones for a while.

use std::time::Duration;

use tailgate_e2e::sinks::*;
use tailgate_e2e::*;

const WAIT: Duration = Duration::from_secs(60);

fn redis_sink(address: &str, prefix: &str, extra: &str) -> String {
    format!("[sink]\ntype = \"redis\"\naddress = \"{address}\"\ntopic_prefix = \"{prefix}\"\n{extra}")
}

async fn drop_streams(prefix: &str) {
    let keys = redis_cmd(&["KEYS", &format!("{prefix}.*")]).await;
    if let tailgate_redis::resp::Reply::Array(Some(keys)) = keys {
        for k in keys {
            redis_cmd(&["DEL", &k.text()]).await;
        }
    }
}

/// (record id, row id, op, v) of the entries of `t`'s stream, in stream order.
fn step_events(entries: &[Entry]) -> Vec<(String, i64, String, i64)> {
    entries
        .iter()
        .filter_map(|e| {
            let value = e.json("value")?;
            let row = &value["after"];
            Some((e.id().to_owned(), row["id"].as_i64()?, value["op"].as_str()?.to_owned(), row["v"].as_i64()?))
        })
        .collect()
}

fn distinct(entries: &[Entry]) -> usize {
    entries.iter().map(Entry::id).collect::<std::collections::HashSet<_>>().len()
}

/// Waits until the stream holds `n` distinct records (repeats after a fault do not count).
async fn wait_distinct(stream: &str, n: usize, timeout: Duration) -> Vec<Entry> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let entries = xrange(stream).await;
        if distinct(&entries) >= n {
            return entries;
        }
        assert!(std::time::Instant::now() < deadline, "{stream}: {} of {n} distinct records", distinct(&entries));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_every_operation_arrives_in_order_with_keys_values_and_ids() {
    let _redis = redis_lock().read().await;
    let s = Scenario::new("redis_ops", "CREATE TABLE customers (id int PRIMARY KEY, name text)").await;
    let prefix = format!("rops{}", nonce());
    let tg = s.start(&redis_sink(&redis_address(), &prefix, "maxlen = 1000\n"), "").await;
    s.db.exec("INSERT INTO customers VALUES (1, 'ada')").await;
    s.db.exec("UPDATE customers SET name = 'ada l.' WHERE id = 1").await;
    s.db.exec("UPDATE customers SET id = 2 WHERE id = 1").await;
    s.db.exec("DELETE FROM customers WHERE id = 2").await;

    let entries = wait_stream(&format!("{prefix}.public.customers"), 7, WAIT).await;
    let ops: Vec<_> = entries.iter().map(|e| e.op().unwrap_or_else(|| "tombstone".into())).collect();
    assert_eq!(ops, ["c", "u", "d", "tombstone", "c", "d", "tombstone"], "{entries:#?}");
    assert_eq!(entries[0].json("key"), Some(serde_json::json!({"id": 1})));
    assert_eq!(entries[0].json("value").unwrap()["after"], serde_json::json!({"id": 1, "name": "ada"}));
    assert_eq!(entries[0].json("value").unwrap()["source"]["table"], "customers");
    assert_eq!(entries[1].json("value").unwrap()["after"]["name"], "ada l.");
    // A tombstone: the key, no value; its id is the delete's with /t.
    assert_eq!(entries[3].json("key"), Some(serde_json::json!({"id": 1})));
    assert!(!entries[3].fields.contains_key("value"), "{:?}", entries[3]);
    assert_eq!(entries[3].id(), format!("{}/t", entries[2].id()));
    assert_eq!(entries[4].json("key"), Some(serde_json::json!({"id": 2})));
    assert!(entries.iter().all(|e| !e.fields.contains_key("headers")), "change events carry no headers");
    let ids: std::collections::HashSet<_> = entries.iter().map(Entry::id).collect();
    assert_eq!(ids.len(), 7, "record ids are unique");
    assert!(entries[0].id().starts_with(&format!("{prefix}.public.customers/lsn ")), "{}", entries[0].id());
    s.finish(tg).await;
    drop_streams(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outbox_events_keep_per_aggregate_order_and_dead_letters_reach_their_stream() {
    let _redis = redis_lock().read().await;
    let s = Scenario::new(
        "redis_outbox",
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
                              aggregateid text NOT NULL, type text NOT NULL, payload jsonb);",
    )
    .await;
    let prefix = format!("rob{}", nonce());
    let outbox = format!(
        "[[outbox]]\ntable = \"public.outbox\"\ntopic = \"{prefix}.outbox.${{routedByValue}}\"\nadditional_fields = [\"type:header:eventType\"]\n"
    );
    let tg = s.start(&redis_sink(&redis_address(), &prefix, ""), &outbox).await;
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
    // A NULL payload cannot be routed: a dead letter on <prefix>.dlq, and later events go on.
    s.db.exec(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'order-0', 'Broken', NULL)",
    )
    .await;
    s.db.exec(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'order-0', 'Late', '{\"seq\": 20}')",
    )
    .await;

    let events = wait_stream(&format!("{prefix}.outbox.order"), 101, WAIT).await;
    assert_eq!(events.len(), 101);
    let mut sequences: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for e in &events {
        let key = e.fields["key"].clone();
        assert!(key.starts_with("order-"), "the key is the plain aggregate id: {key}");
        sequences.entry(key).or_default().push(e.json("value").unwrap()["seq"].as_i64().unwrap());
        let headers = e.json("headers").expect("outbox records carry headers");
        assert_eq!(headers["id"].as_str().unwrap().len(), 36, "the event id header: {headers}");
        assert_eq!(e.id(), headers["id"].as_str().unwrap(), "the record id of an outbox event is its event id");
        assert!(headers["eventType"] == "OrderCreated" || headers["eventType"] == "Late");
    }
    for (key, seqs) in &sequences {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "aggregate {key} out of order: {seqs:?}");
    }
    assert_eq!(sequences["order-0"].last(), Some(&20));

    let dead = wait_stream(&format!("{prefix}.dlq"), 1, WAIT).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let headers = dead[0].json("headers").unwrap();
    assert!(headers.to_string().contains("payload"), "the cause names the NULL column: {headers}");
    s.finish(tg).await;
    drop_streams(&prefix).await;
}

const STEPS: i64 = 40;
const ROWS: i64 = 50;

#[tokio::test(flavor = "multi_thread")]
async fn redis_kill9_mid_stream_loses_nothing() {
    let _redis = redis_lock().read().await;
    let s = Scenario::new("redis_kill9", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("rk{}", nonce());
    let sink = redis_sink(&redis_address(), &prefix, "max_batch_records = 64\n");
    let tg = s.start(&sink, "").await;
    let writer = tokio::spawn(write_steps(s.db.url(), STEPS, ROWS, Duration::from_millis(50)));
    let stream = format!("{prefix}.public.t");
    wait_stream(&stream, 300, WAIT).await;
    tg.kill9().await;
    let mut tg = Tailgate::start(&s.dir, &s.config(&sink, ""));
    tg.wait_streaming().await;
    writer.await.unwrap();
    let total = (STEPS * ROWS + (STEPS - 1) * ROWS) as usize;
    let entries = wait_distinct(&stream, total, WAIT).await;
    check_steps(&step_events(&entries), STEPS, ROWS);
    s.finish(tg).await;
    drop_streams(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_frozen_mid_stream_then_resumed_loses_nothing() {
    // Freezing Redis stalls every Redis test: none runs meanwhile.
    let _redis = redis_lock().write().await;
    let s = Scenario::new("redis_frozen", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("rf{}", nonce());
    // A short reply timeout: the sink gives up on its connection during the freeze, reconnects and
    // sends the unacknowledged batch again (the resend path, not only a long wait).
    let sink = redis_sink(&redis_address(), &prefix, "max_batch_records = 64\ntimeout_ms = 1500\n");
    let mut tg = s.start(&sink, "").await;
    let writer = tokio::spawn(write_steps(s.db.url(), STEPS, ROWS, Duration::from_millis(50)));
    let stream = format!("{prefix}.public.t");
    wait_stream(&stream, 200, WAIT).await;
    {
        let _frozen = FrozenRedis::freeze().await;
        tg.wait_for_log("Redis did not take the batch; sending it again", Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    writer.await.unwrap();
    let total = (STEPS * ROWS + (STEPS - 1) * ROWS) as usize;
    let entries = wait_distinct(&stream, total, WAIT).await;
    check_steps(&step_events(&entries), STEPS, ROWS);
    tg.wait_for_log("Redis accepts writes again", WAIT).await;
    s.finish(tg).await;
    drop_streams(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_refusing_connections_mid_stream_then_back_loses_nothing() {
    let _redis = redis_lock().read().await;
    let s = Scenario::new("redis_refused", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("rr{}", nonce());
    let proxy = TcpProxy::start(redis_address()).await;
    let sink = redis_sink(&format!("127.0.0.1:{}", proxy.port), &prefix, "max_batch_records = 64\n");
    let mut tg = s.start(&sink, "").await;
    let writer = tokio::spawn(write_steps(s.db.url(), STEPS, ROWS, Duration::from_millis(50)));
    let stream = format!("{prefix}.public.t");
    wait_stream(&stream, 200, WAIT).await;
    proxy.set_up(false);
    tg.wait_for_log("Redis did not take the batch; sending it again", Duration::from_secs(20)).await;
    // Refused for a while: the sink keeps retrying (backoff) and the source waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(tg.log_text().contains("Connection refused"), "{}", tg.log_text());
    proxy.set_up(true);
    writer.await.unwrap();
    let total = (STEPS * ROWS + (STEPS - 1) * ROWS) as usize;
    let entries = wait_distinct(&stream, total, WAIT).await;
    check_steps(&step_events(&entries), STEPS, ROWS);
    s.finish(tg).await;
    drop_streams(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_wrong_credentials_and_missing_permissions_name_the_fix() {
    let _redis = redis_lock().read().await;
    let s = Scenario::new("redis_auth", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("ra{}", nonce());
    let user = format!("tg_e2e_{}", nonce());
    let limited = format!("{user}_noxadd");
    redis_cmd(&["ACL", "SETUSER", &user, "on", ">right", "~*", "+@all"]).await;
    redis_cmd(&["ACL", "SETUSER", &limited, "on", ">right", "~*", "+@all", "-xadd"]).await;

    // Wrong password: `tailgate check` fails naming the keys, and so does the run.
    let wrong = redis_sink(&redis_address(), &prefix, &format!("username = \"{user}\"\npassword = \"wrong\"\n"));
    let config = s.dir.join("wrong.toml");
    std::fs::write(&config, s.config(&wrong, "")).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("FAILED  redis") && out.contains("sink.password") && out.contains("WRONGPASS"), "{out}");
    let mut tg = Tailgate::start(&s.dir, &s.config(&wrong, ""));
    tg.wait_streaming().await;
    s.db.exec("INSERT INTO t VALUES (1, 0)").await;
    let status = tg.wait_exit(WAIT).await;
    assert!(!status.success());
    let log = tg.log_text();
    assert!(log.contains("refused the credentials") && log.contains("sink.username and sink.password"), "{log}");

    // The right password: check passes.
    let right = redis_sink(&redis_address(), &prefix, &format!("username = \"{user}\"\npassword = \"right\"\n"));
    std::fs::write(&config, s.config(&right, "")).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.contains("ok      redis:"), "{out}");
    assert_eq!(code, 0, "{out}");

    // No XADD permission: the run stops at the first batch, naming the ACL fix; nothing checkpointed.
    let denied = redis_sink(&redis_address(), &prefix, &format!("username = \"{limited}\"\npassword = \"right\"\n"));
    let mut tg = Tailgate::start(&s.dir, &s.config(&denied, ""));
    let status = tg.wait_exit(WAIT).await;
    assert!(!status.success());
    let log = tg.log_text();
    assert!(log.contains("NOPERM") && log.contains("ACL SETUSER"), "{log}");
    assert_eq!(xrange(&format!("{prefix}.public.t")).await.len(), 0);

    // Once permitted, the same record arrives: nothing was lost by the failures.
    let mut tg = Tailgate::start(&s.dir, &s.config(&right, ""));
    tg.wait_streaming().await;
    let entries = wait_stream(&format!("{prefix}.public.t"), 1, WAIT).await;
    assert_eq!(entries[0].json("value").unwrap()["after"], serde_json::json!({"id": 1, "v": 0}));
    redis_cmd(&["ACL", "DELUSER", &user, &limited]).await;
    s.finish(tg).await;
    drop_streams(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_away_holds_memory_bounded_and_a_stop_gives_up_after_the_drain_timeout() {
    let _redis = redis_lock().read().await;
    let s = Scenario::new("redis_backpressure", "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let prefix = format!("rbp{}", nonce());
    let proxy = TcpProxy::start(redis_address()).await;
    let sink = redis_sink(&format!("127.0.0.1:{}", proxy.port), &prefix, "");
    let port = free_port();
    let metrics = format!("[http]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut tg = s.start(&sink, &metrics).await;
    proxy.set_up(false);
    s.db.exec("INSERT INTO t SELECT g, 0 FROM generate_series(1, 20000) g").await;
    tg.wait_for_log_count("Redis did not take the batch; sending it again", 3, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Backpressure: at most 4 batches of 1000 records in the sink; the rest waits in PostgreSQL.
    let series = format!("tailgate_in_flight_records{{connector=\"{}\"}}", s.name);
    let in_flight = metric(&http_get(port, "/metrics").1, &series).unwrap();
    assert!(in_flight > 0.0 && in_flight <= 4000.0, "in flight: {in_flight}");
    assert!(peak_rss_mib(tg.pid()).unwrap() < 64.0);

    let started = std::time::Instant::now();
    let (status, log) = tg.stop().await;
    assert!(!status.success(), "{log}");
    assert!(started.elapsed() >= Duration::from_secs(25), "gave up after {:?}", started.elapsed());
    assert!(log.contains("stopping while Redis"), "{log}");

    proxy.set_up(true);
    let tg = Tailgate::start(&s.dir, &s.config(&sink, ""));
    let entries = wait_distinct(&format!("{prefix}.public.t"), 20000, WAIT).await;
    assert_eq!(step_events(&entries).iter().map(|e| e.1).collect::<std::collections::BTreeSet<_>>().len(), 20000);
    s.finish(tg).await;
    drop_streams(&prefix).await;
}
