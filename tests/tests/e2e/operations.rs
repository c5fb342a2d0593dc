//! What an operator sees: metrics, health and readiness, offsets and slot commands, deployment files.

use std::time::{Duration, Instant};

use serde::Deserialize as _;
use tailgate_e2e::*;

async fn wait_http(port: u16, path: &str, want: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = http_get(port, path);
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} stayed {status} (want {want}) for {timeout:?}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_traffic_and_ready_follows_the_broker() {
    let broker = broker_lock().write().await;
    let db = TestDb::new("metrics").await;
    db.exec("CREATE TABLE orders (id int PRIMARY KEY, v text)").await;
    let dir = scratch("metrics");
    let port = free_port();
    let prefix = format!("metrics{}", nonce());
    let http = format!("[http]\nlisten = \"127.0.0.1:{port}\"\nready_window_s = 3\nlag_poll_s = 1\n");
    let mut tg = Tailgate::start(&dir, &config("tg_metrics", &db.url(), &dir, &kafka_sink(&prefix), &http));
    tg.wait_streaming().await;
    wait_http(port, "/health", 200, Duration::from_secs(10)).await;
    wait_http(port, "/ready", 200, Duration::from_secs(10)).await;

    db.exec("INSERT INTO orders SELECT g, 'x' FROM generate_series(1, 100) g").await;
    db.exec("UPDATE orders SET v = 'y' WHERE id <= 10").await;
    assert_eq!(consume(&format!("{prefix}.public.orders"), 110, Duration::from_secs(30)).len(), 110);
    let c = "{connector=\"tg_metrics\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = http_get(port, "/metrics");
        if metric(&text, &format!("tailgate_records_delivered_total{c}")) >= Some(110.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "delivered counter did not reach 110:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(metric(&text, &format!("tailgate_events_read_total{c}")), Some(110.0), "{text}");
    assert_eq!(metric(&text, &format!("tailgate_transactions_total{c}")), Some(2.0), "{text}");
    assert_eq!(
        metric(&text, "tailgate_table_events_read_total{connector=\"tg_metrics\",table=\"public.orders\"}"),
        Some(110.0)
    );
    assert!(metric(&text, &format!("tailgate_produced_bytes_total{c}")).unwrap() > 10_000.0);
    assert!(metric(&text, &format!("tailgate_checkpoint_position{c}")).unwrap() > 0.0);
    assert_eq!(metric(&text, &format!("tailgate_delivery_lag_seconds_count{c}")), Some(2.0), "{text}");
    assert_eq!(metric(&text, &format!("tailgate_source_connected{c}")), Some(1.0));

    // Idle for longer than the window: still ready (keepalives prove the source alive).
    tokio::time::sleep(Duration::from_secs(5)).await;
    wait_http(port, "/ready", 200, Duration::from_secs(1)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&http_get(port, "/metrics").1, &format!("tailgate_source_lag_bytes{c}")).unwrap_or(-1.0) < 0.0 {
        assert!(Instant::now() < deadline, "source lag bytes never measured");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Broker frozen with traffic: records stay unacknowledged, /ready turns red; back when it returns.
    let tansu = tansu_pid();
    signal(tansu, "STOP");
    db.exec("INSERT INTO orders SELECT g, 'z' FROM generate_series(101, 150) g").await;
    let body = wait_http(port, "/ready", 503, Duration::from_secs(20)).await;
    signal(tansu, "CONT");
    assert!(body.contains("unacknowledged"), "{body}");
    assert_eq!(http_get(port, "/health").0, 200, "a stalled broker is not a fatal state");
    wait_http(port, "/ready", 200, Duration::from_secs(30)).await;
    drop(broker);

    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("serving /metrics"), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn offsets_show_and_reset_round_trip_and_refuse_while_running() {
    let db = TestDb::new("offsets").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = scratch("offsets");
    let cfg = config("tg_offsets", &db.url(), &dir, &stdout_sink(), "");
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (1)").await;
    wait_stdout(&mut tg, 1, Duration::from_secs(20)).await;
    let path = dir.join("config.toml");
    let path = path.to_str().unwrap();

    let (code, _, err) = tailgate_cmd(&["offsets", "reset", "--config", path]);
    assert_eq!(code, 3, "reset must be refused while the connector runs: {err}");
    assert!(err.contains("in use"), "{err}");
    let (status, _) = tg.stop().await;
    assert!(status.success());

    let (code, shown, _) = tailgate_cmd(&["offsets", "show", "--config", path]);
    assert_eq!(code, 0);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["position"]["type"], "postgres", "{shown}");

    let (code, out, err) = tailgate_cmd(&["offsets", "reset", "--config", path, "--to-lsn", "0/ABCDEF"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, shown, _) = tailgate_cmd(&["offsets", "show", "--config", path]);
    assert!(shown.contains("\"lsn\":\"0/ABCDEF\""), "{shown}");

    // --to-end skips what happened meanwhile.
    db.exec("INSERT INTO t VALUES (2)").await;
    let (code, _, err) = tailgate_cmd(&["offsets", "reset", "--config", path, "--to-end"]);
    assert_eq!(code, 0, "{err}");
    db.exec("INSERT INTO t VALUES (3)").await;
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    let records = wait_stdout(&mut tg, 1, Duration::from_secs(20)).await;
    assert_eq!(records[0]["value"]["after"]["id"], 3, "row 2 was skipped by --to-end");
    tg.stop().await;

    let (code, _, _) = tailgate_cmd(&["offsets", "reset", "--config", path]);
    assert_eq!(code, 0);
    let (_, shown, _) = tailgate_cmd(&["offsets", "show", "--config", path]);
    assert!(shown.contains("\"position\":null"), "{shown}");

    // slot drop needs --yes, then removes slot, publication and checkpoint.
    let (code, _, err) = tailgate_cmd(&["slot", "drop", "--config", path]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--yes"));
    let (code, out, err) = tailgate_cmd(&["slot", "drop", "--config", path, "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(db.confirmed_flush("tg_offsets").await.is_none(), "slot is gone");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_lifecycle_steps_and_never_the_password() {
    let db = TestDb::new("logs").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = scratch("logs");
    let url = db.url_as("tailgate_scram", "scram-secret");
    let cfg = config("tg_logs", &url, &dir, &stdout_sink(), "[log]\nformat = \"json\"\nlevel = \"debug\"\n");
    let mut tg = Tailgate::start_with_env(&dir, &cfg, &[("RUST_LOG", "debug")]);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (1)").await;
    wait_stdout(&mut tg, 1, Duration::from_secs(20)).await;
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    for line in log.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
    }
    for step in ["replication slot created", "streaming", "stopped cleanly"] {
        assert!(log.contains(step), "no {step:?} in the log:\n{log}");
    }
    assert!(!log.contains("scram-secret"), "password in the log:\n{log}");
    db.drop().await;
}

#[test]
fn docker_compose_is_valid_and_references_existing_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("docker-compose.yml is valid YAML");
    let services = doc["services"].as_mapping().expect("services");
    for name in ["postgres", "mysql", "kafka", "tailgate-postgres", "tailgate-mysql"] {
        let service = &services[name];
        assert!(service.is_mapping(), "service {name} missing");
        assert!(service["healthcheck"]["test"].is_sequence(), "service {name} has no healthcheck");
    }
    assert_eq!(services["postgres"]["image"].as_str(), Some("postgres:16"));
    assert_eq!(services["mysql"]["image"].as_str(), Some("mysql:8.4"));
    assert!(services["kafka"]["image"].as_str().unwrap().starts_with("apache/kafka"));
    let pg_args = format!("{:?}", services["postgres"]["command"]);
    assert!(pg_args.contains("wal_level=logical"), "{pg_args}");
    let mysql_args = format!("{:?}", services["mysql"]["command"]);
    for flag in ["--binlog-format=ROW", "--binlog-row-image=FULL", "--binlog-row-metadata=FULL", "--gtid-mode=ON"] {
        assert!(mysql_args.contains(flag), "mysql lacks {flag}");
    }
    assert_eq!(services["tailgate-postgres"]["build"].as_str(), Some("."));
    assert!(root.join("Dockerfile").exists());
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("USER tailgate"), "the image runs as non-root");

    // Every bind-mounted file exists; every mounted tailgate config is valid.
    for service in services.values() {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let spec = volume.as_str().unwrap();
            let Some(host) = spec.split(':').next().filter(|h| h.starts_with("./")) else { continue };
            let path = root.join(host);
            assert!(path.exists(), "docker-compose.yml mounts {host}, which does not exist");
            if host.ends_with(".toml") {
                let (code, _, err) = tailgate_cmd(&["offsets", "show", "--config", path.to_str().unwrap()]);
                assert_eq!(code, 0, "{host} is not a valid tailgate config: {err}");
            }
        }
    }
}

#[test]
fn example_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, _, err) = tailgate_cmd(&["offsets", "show", "--config", path.to_str().unwrap()]);
            assert_eq!(code, 0, "{} is not a valid config: {err}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 4, "example configs missing");
}

/// After an initial snapshot, streamed transactions are still counted by the lag histogram once
/// acknowledged (a snapshot marker used to block the queue behind it for good, so the count stayed
/// at the snapshot's and memory grew with every transaction).
#[tokio::test(flavor = "multi_thread")]
async fn lag_histogram_counts_streamed_transactions_after_a_snapshot() {
    let s =
        Scenario::new("lagsnap", "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 2000);")
            .await;
    let port = free_port();
    let http = format!("[http]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut tg = s.start(&stdout_sink(), &http).await;
    wait_stdout(&mut tg, 2000, Duration::from_secs(30)).await;
    for i in 0..30 {
        s.db.exec(&format!("INSERT INTO t VALUES ({})", 10_000 + i)).await;
    }
    wait_stdout(&mut tg, 2030, Duration::from_secs(30)).await;
    let series = format!("tailgate_delivery_lag_seconds_count{{connector=\"{}\"}}", s.name);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let count = metric(&http_get(port, "/metrics").1, &series).unwrap_or(0.0);
        if count >= 30.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{series} = {count} after 30 streamed transactions");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.finish(tg).await;
}

/// Idle or slow clients cannot hold the HTTP endpoint: connections beyond the cap are closed at
/// once, each gets a few seconds in all, and the probes answer again as soon as they are gone.
#[tokio::test(flavor = "multi_thread")]
async fn http_endpoint_caps_connections_and_drops_slow_clients() {
    let s = Scenario::new("httpcap", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let port = free_port();
    let tg = s.start(&stdout_sink(), &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n")).await;
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", tg.pid())).map(|d| d.count()).unwrap_or(0);
    let before = fds();
    // 300 clients that connect and send nothing (a slowloris).
    let idle: Vec<_> = (0..300).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = fds();
    assert!(during < before + 64, "{during} descriptors open with 300 idle clients ({before} before)");
    // They are dropped after the deadline: the probes answer again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if http_get(port, "/health").0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/health never answered again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(idle);
    s.finish(tg).await;
}

/// The Kubernetes example deploys a working high-availability pair: two replicas, probes on
/// /health and /ready at the port the config listens on, the shared offsets store and `[ha]`,
/// every secret read from a file of the mounted Secret, and a config tailgate accepts.
#[test]
fn kubernetes_manifests_are_consistent() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("examples/kubernetes/tailgate.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("valid YAML"))
        .collect();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("no {k}"));
    let (secret, config_map, deployment) = (kind("Secret"), kind("ConfigMap"), kind("Deployment"));
    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2, "a standby needs a second replica");
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();

    let config_text = config_map["data"]["tailgate.toml"].as_str().unwrap();
    let config: toml::Value = toml::from_str(config_text).expect("the embedded config is TOML");
    assert!(config["http"]["listen"].as_str().unwrap().ends_with(&format!(":{port}")), "probes hit the http port");
    assert_eq!(config["offsets"]["store"].as_str(), Some("database"), "standbys share the checkpoints");
    assert!(config.get("ha").is_some(), "[ha] is on");
    // Config and secrets are mounted where the container reads them.
    let mounts: Vec<(&str, &str)> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap()))
        .collect();
    let config_path = container["args"].as_sequence().unwrap().last().unwrap().as_str().unwrap();
    let (config_dir, config_file) = config_path.rsplit_once('/').unwrap();
    assert!(mounts.contains(&("config", config_dir)) && config_file == "tailgate.toml", "{mounts:?} {config_path}");
    let secret_dir = mounts.iter().find(|(n, _)| *n == "secrets").expect("secrets mounted").1;
    let mut files = 0;
    for reference in config_text.split("${file:").skip(1) {
        let path = reference.split('}').next().unwrap();
        let (dir, key) = path.rsplit_once('/').unwrap();
        assert_eq!(dir, secret_dir, "{path} is not in the mounted Secret");
        assert!(secret["stringData"].get(key).is_some(), "the Secret has no key {key}");
        files += 1;
    }
    assert!(files >= 1, "secrets come from files");
    assert!(!config_text.contains("change-me"), "no secret in the ConfigMap");
}
