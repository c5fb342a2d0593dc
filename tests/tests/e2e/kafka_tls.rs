//! The Kafka sink over TLS and mutual TLS, and secrets read from files, against real brokers:
//! scripts/services.sh puts stunnel (with the test CA's server certificate) in front of two tansu
//! brokers, 127.0.0.1:9193 (TLS) and 127.0.0.1:9195 (a client certificate required).

use std::path::PathBuf;
use std::time::Duration;

use tailgate_e2e::*;

const TLS_BROKER: &str = "127.0.0.1:9193";
const MUTUAL_TLS_BROKER: &str = "127.0.0.1:9195";

fn tls_file(name: &str) -> String {
    let cache = std::env::var("TAILGATE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tailgate"));
    cache.join("tls").join(name).display().to_string()
}

fn tls_sink(prefix: &str, brokers: &str, extra: &str) -> String {
    format!(
        "[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\nsecurity_protocol = \"ssl\"\n\
         ssl_ca_location = \"{}\"\n{extra}",
        tls_file("ca.pem")
    )
}

fn check(dir: &std::path::Path, cfg: &str) -> (i32, String) {
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    let (code, out, err) = tailgate_cmd(&["check", "--config", path.to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

/// A consumer of the TLS broker, verifying it with the test CA (and presenting the client
/// certificate on the mutual-TLS one).
fn consume_tls(brokers: &str, topic: &str, at_least: usize) -> Vec<Record> {
    let (ca, cert, key) = (tls_file("ca.pem"), tls_file("client.pem"), tls_file("client-key.pem"));
    let mut settings = vec![("bootstrap.servers", brokers), ("security.protocol", "ssl"), ("ssl.ca.location", &ca)];
    if brokers == MUTUAL_TLS_BROKER {
        settings.extend([("ssl.certificate.location", cert.as_str()), ("ssl.key.location", key.as_str())]);
    }
    consume_from(&settings, topic, at_least, Duration::from_secs(30))
}

/// Snapshot and streaming through a TLS broker: `check` names the protocol, every row arrives.
async fn deliver_over(test: &str, brokers: &str, sink_extra: &str) {
    let _broker = broker_lock().read().await;
    let db = TestDb::new(test).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, note text)").await;
    db.exec("INSERT INTO t VALUES (1, 'snapshot')").await;
    let dir = scratch(test);
    let prefix = format!("{test}{}", nonce());
    let cfg = config(&format!("tg_{test}"), &db.url(), &dir, &tls_sink(&prefix, brokers, sink_extra), "");
    let (code, out) = check(&dir, &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("over TLS"), "check names the protocol: {out}");

    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (2, 'stream'), (3, 'stream')").await;
    db.exec("UPDATE t SET note = 'updated' WHERE id = 1").await;
    let records = consume_tls(brokers, &format!("{prefix}.public.t"), 4);
    let ops: Vec<(i64, &str)> = records.iter().map(|r| (r.after()["id"].as_i64().unwrap(), r.op().unwrap())).collect();
    assert_eq!(ops, [(1, "r"), (2, "c"), (3, "c"), (1, "u")], "{ops:?}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_over_tls_delivers_snapshot_and_stream() {
    deliver_over("ktls", TLS_BROKER, "").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_mutual_tls_delivers_with_the_client_certificate() {
    let extra = format!(
        "ssl_certificate_location = \"{}\"\nssl_key_location = \"{}\"\n",
        tls_file("client.pem"),
        tls_file("client-key.pem")
    );
    deliver_over("kmtls", MUTUAL_TLS_BROKER, &extra).await;
}

/// The failures an operator meets first, each named with its fix by `check`: no client
/// certificate for a mutual-TLS broker, an untrusted CA, plaintext against a TLS listener.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_tls_failures_name_the_setting_to_fix() {
    let db = TestDb::new("ktlsbad").await;
    let dir = scratch("ktlsbad");
    let name = "tg_ktlsbad";

    let cfg = config(name, &db.url(), &dir, &tls_sink("ktlsbad", MUTUAL_TLS_BROKER, ""), "");
    let (code, out) = check(&dir, &cfg);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("FAILED  kafka") && out.contains("ssl_certificate_location"), "{out}");

    let untrusted = tls_sink("ktlsbad", TLS_BROKER, "").replace(&tls_file("ca.pem"), &tls_file("other-ca.pem"));
    let (code, out) = check(&dir, &config(name, &db.url(), &dir, &untrusted, ""));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("certificate verify failed") && out.contains("sink.ssl_ca_location"), "{out}");

    let plaintext = format!("[sink]\ntype = \"kafka\"\nbrokers = \"{TLS_BROKER}\"\n");
    let (code, out) = check(&dir, &config(name, &db.url(), &dir, &plaintext, ""));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("over plaintext") && out.contains("sink.security_protocol"), "{out}");

    // Inconsistent settings never reach the broker: a config error (exit 2) naming the key.
    let sasl_without_protocol = format!("{}sasl_mechanism = \"SCRAM-SHA-512\"\n", kafka_sink("ktlsbad"));
    let (code, out) = check(&dir, &config(name, &db.url(), &dir, &sasl_without_protocol, ""));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("sink.security_protocol") && out.contains("sasl_ssl"), "{out}");
    db.drop().await;
}

/// Secrets from files reach the servers and appear nowhere else: not in the debug log, `/health`,
/// `/metrics` or `check`, not even when the server refuses them.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_from_files_never_appear_in_logs_health_metrics_or_check() {
    let db = TestDb::new("secrets").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = scratch("secrets");
    let password_file = dir.join("pg_password");
    std::fs::write(&password_file, "scram-secret\n").unwrap();
    let token_file = dir.join("http_token");
    std::fs::write(&token_file, "http-token-s3cret").unwrap();
    let port = free_port();
    let url = db.url_as("tailgate_scram", &format!("${{file:{}}}", password_file.display()));
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"${{file:{}}}\"\n[log]\nlevel = \"debug\"\n",
        token_file.display()
    );
    let cfg = config("tg_secrets", &url, &dir, &stdout_sink(), &extra);
    let secrets = ["scram-secret", "http-token-s3cret"];

    let (code, out) = check(&dir, &cfg);
    assert_eq!(code, 0, "the password from the file logs in: {out}");
    let mut tg = Tailgate::start_with_env(&dir, &cfg, &[("RUST_LOG", "debug")]);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (1)").await;
    wait_stdout(&mut tg, 1, Duration::from_secs(20)).await;
    let (health_code, health) = http_get(port, "/health");
    let (metrics_code, metrics) = http_get(port, "/metrics");
    assert_eq!((health_code, metrics_code), (200, 200), "{health}");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    for (place, text) in [("check", &out), ("log", &log), ("/health", &health), ("/metrics", &metrics)] {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} in {place}:\n{text}");
        }
    }

    // A refused password is not echoed back either.
    std::fs::write(&password_file, "wrong-s3cret-value").unwrap();
    let (code, out) = check(&dir, &cfg);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("FAILED  authentication") && !out.contains("wrong-s3cret-value"), "{out}");
    db.drop().await;
}

/// SASL against a broker that requires it (tansu with `--authentication` on 127.0.0.1:9196): the
/// mechanism is reported by `check`, and a refused login names the `sasl_*` keys without echoing
/// the password. A successful SASL login is not tested: that broker cannot be given users here.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_sasl_refusal_names_the_keys_and_never_the_password() {
    let db = TestDb::new("ksasl").await;
    let dir = scratch("ksasl");
    let sink = "[sink]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9196\"\nsecurity_protocol = \"sasl_plaintext\"\n\
                sasl_mechanism = \"SCRAM-SHA-256\"\nsasl_username = \"tailgate\"\nsasl_password = \"${TG_KAFKA_PW}\"\n";
    let path = dir.join("config.toml");
    std::fs::write(&path, config("tg_ksasl", &db.url(), &dir, sink, "")).unwrap();
    let output = std::process::Command::new(tailgate_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .env("TG_KAFKA_PW", "kafka-s3cret-pw")
        .output()
        .unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(3), "{out}");
    assert!(out.contains("over SASL SCRAM-SHA-256 without TLS"), "{out}");
    assert!(out.contains("SASL SCRAM authentication failed") && out.contains("sink.sasl_password"), "{out}");
    assert!(!out.contains("kafka-s3cret-pw"), "{out}");
    db.drop().await;
}
