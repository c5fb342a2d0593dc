//! Authentication methods and prerequisite failures, through `tailgate run` and `tailgate check`.
//! scripts/services.sh creates the password roles and the pg_hba.conf lines that force SCRAM and MD5.

use std::time::Duration;

use tailgate_e2e::*;

async fn stream_one_row_as(test: &str, user: &str, password: &str) {
    let db = TestDb::new(test).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = scratch(test);
    let url = db.url_as(user, "${TG_TEST_PASSWORD}");
    let cfg = config(&format!("tg_{test}"), &url, &dir, &stdout_sink(), "");
    let mut tg = Tailgate::start_with_env(&dir, &cfg, &[("TG_TEST_PASSWORD", password)]);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (42)").await;
    let records = wait_stdout(&mut tg, 1, Duration::from_secs(20)).await;
    assert_eq!(records[0]["value"]["after"]["id"], 42);
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains(password), "the password must never be logged:\n{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_sha_256_authentication_streams() {
    stream_one_row_as("scram", "tailgate_scram", "scram-secret").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn md5_authentication_streams() {
    stream_one_row_as("md5", "tailgate_md5", "md5-secret").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_fails_with_a_clear_error_and_exit_3() {
    let db = TestDb::new("badpw").await;
    let dir = scratch("badpw");
    let cfg = config("tg_badpw", &db.url_as("tailgate_scram", "wrong"), &dir, &stdout_sink(), "");
    std::fs::write(dir.join("config.toml"), &cfg).unwrap();
    let config_path = dir.join("config.toml");
    let (code, out, _) = tailgate_cmd(&["check", "--config", config_path.to_str().unwrap()]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("FAILED  authentication") && out.contains("password"), "{out}");

    let mut tg = Tailgate::start(&dir, &cfg);
    let status = tg.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(3), "{}", tg.log_text());
    let log = tg.log_text();
    assert!(log.contains("rejected the login") && log.contains("Fix:"), "{log}");
    assert!(!log.contains("wrong@"), "the URL with its password must not be logged:\n{log}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_replication_privilege_is_named() {
    let db = TestDb::new("norepl").await;
    let dir = scratch("norepl");
    let cfg = config("tg_norepl", &db.url_as("tailgate_norepl", "norepl-secret"), &dir, &stdout_sink(), "");
    std::fs::write(dir.join("config.toml"), &cfg).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", dir.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("FAILED  replication privilege") && out.contains("WITH REPLICATION"), "{out}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_server_and_broker_are_reported_by_check() {
    let dir = scratch("unreach");
    let cfg = config(
        "tg_unreach",
        "postgres://postgres@127.0.0.1:1/nowhere",
        &dir,
        "[sink]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:1\"\n",
        "",
    );
    std::fs::write(dir.join("config.toml"), &cfg).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", dir.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("FAILED  connection") && out.contains("127.0.0.1:1"), "{out}");
    assert!(out.contains("FAILED  kafka"), "{out}");

    let mut tg = Tailgate::start(&dir, &cfg);
    let status = tg.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", tg.log_text());
    assert!(tg.log_text().contains("cannot reach PostgreSQL"), "{}", tg.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_config_exits_2_naming_the_key() {
    let dir = scratch("badcfg");
    let path = dir.join("config.toml");
    std::fs::write(&path, "name = \"x\"\n[source]\ntype = \"postgres\"\nurl = \"postgres://a@b/c\"\nslott = \"s\"\n[sink]\ntype = \"stdout\"\n").unwrap();
    let (code, _, err) = tailgate_cmd(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("slott"), "{err}");
    std::fs::write(&path, "name = \"x\"\n[source\n").unwrap();
    let (code, _, err) = tailgate_cmd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not valid TOML"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_warns_about_tables_outside_the_publication_and_without_key() {
    let db = TestDb::new("pubcheck").await;
    db.exec(
        "CREATE TABLE covered (id int PRIMARY KEY); CREATE TABLE forgotten (id int PRIMARY KEY);
         CREATE TABLE keyless (v text); CREATE PUBLICATION tg_pubcheck FOR TABLE covered, keyless;",
    )
    .await;
    let dir = scratch("pubcheck");
    let cfg = config("tg_pubcheck", &db.url(), &dir, &stdout_sink(), "");
    std::fs::write(dir.join("config.toml"), &cfg).unwrap();
    let (code, out, _) = tailgate_cmd(&["check", "--config", dir.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 0, "warnings do not fail the check: {out}");
    assert!(out.contains("WARN    tables outside the publication: public.forgotten"), "{out}");
    assert!(out.contains("ALTER PUBLICATION tg_pubcheck ADD TABLE"), "{out}");
    assert!(out.contains("WARN    tables without primary key: public.keyless"), "{out}");
    db.drop().await;
}
