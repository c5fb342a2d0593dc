//! TLS to the databases, against the real servers: scripts/services.sh generates the test CA and
//! certificates (`$TAILGATE_CACHE/tls`, server certificate for localhost and 127.0.0.1), turns TLS
//! on in PostgreSQL, MariaDB and MySQL 9.7, and creates users that may only log in over TLS
//! (`tailgate_tls`: pg_hba `hostssl` + `hostnossl … reject`, MySQL `REQUIRE SSL`) or with a client
//! certificate (`tailgate_cert`: pg_hba `cert`; `tailgate_x509`: `REQUIRE X509`). A test that
//! streams as one of them fails if tailgate did not use TLS on every connection.
//!
//! Host-name checks need an address the certificate does not name: a forwarder on 127.0.0.2 (the
//! servers listen on 127.0.0.1 only). PostgreSQL's `prefer` fallback needs a server without TLS: a
//! forwarder that answers the SSLRequest with 'N' itself, as such a server does.

use std::path::PathBuf;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use tailgate_e2e::mysql::{MyDb, Server, my_config, server_lock};
use tailgate_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

fn tls_file(name: &str) -> String {
    let cache = std::env::var("TAILGATE_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/tailgate")
    });
    let path = cache.join("tls").join(name);
    assert!(path.exists(), "{} is missing: run scripts/services.sh", path.display());
    path.display().to_string()
}

/// What the forwarder does with a connection.
#[derive(Clone, Copy)]
enum Forward {
    /// Bytes as they are.
    Plain,
    /// Answers PostgreSQL's SSLRequest with 'N' itself (a server without TLS), then forwards.
    RefusePgTls,
    /// Clears CLIENT_SSL in MySQL's greeting (a server without TLS), then forwards.
    StripMysqlTls,
}

/// Clears the CLIENT_SSL capability (0x0800) in a MySQL greeting packet (header included).
fn strip_client_ssl(packet: &mut [u8]) {
    // header(4), protocol(1), version\0, connection id(4), nonce(8), filler(1), capabilities (low u16)
    let Some(nul) = packet[5..].iter().position(|&b| b == 0) else { return };
    let caps = 5 + nul + 1 + 4 + 8 + 1;
    if let Some(b) = packet.get_mut(caps + 1) {
        *b &= !0x08;
    }
}

/// Listens on 127.0.0.2 (an address the test certificate does not name) and forwards each
/// connection to `target`. Returns `127.0.0.2:port`.
async fn forwarder(target: String, mode: Forward) -> String {
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind 127.0.0.2");
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let mut first = Vec::new();
                if let Forward::RefusePgTls = mode {
                    let mut request = [0u8; 8];
                    if client.read_exact(&mut request).await.is_err() {
                        return;
                    }
                    if request == [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] {
                        if client.write_all(b"N").await.is_err() {
                            return;
                        }
                    } else {
                        first.extend_from_slice(&request);
                    }
                }
                let Ok(mut server) = TcpStream::connect(&target).await else { return };
                if !first.is_empty() && server.write_all(&first).await.is_err() {
                    return;
                }
                if let Forward::StripMysqlTls = mode {
                    let mut header = [0u8; 4];
                    if server.read_exact(&mut header).await.is_err() {
                        return;
                    }
                    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
                    let mut greeting = header.to_vec();
                    greeting.resize(4 + len, 0);
                    if server.read_exact(&mut greeting[4..]).await.is_err() {
                        return;
                    }
                    strip_client_ssl(&mut greeting);
                    if client.write_all(&greeting).await.is_err() {
                        return;
                    }
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    addr
}

fn pg_url(user: &str, password: &str, host: &str, db: &str, params: &str) -> String {
    let auth = if password.is_empty() { user.to_owned() } else { format!("{user}:{password}") };
    format!("postgres://{auth}@{host}/{db}?{params}")
}

/// `tailgate check` on a config; (exit code, stdout + stderr).
fn check(dir: &std::path::Path, cfg: &str) -> (i32, String) {
    std::fs::write(dir.join("config.toml"), cfg).unwrap();
    let (code, out, err) = tailgate_cmd(&["check", "--config", dir.join("config.toml").to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

/// Snapshot of one row, then one streamed row, as `url`'s user; asserts the password never shows
/// and, with `tls_user`, that the replication connection of that user runs over TLS.
async fn pg_snapshot_and_stream(
    test: &str,
    url_for: impl Fn(&str) -> String,
    secret: Option<&str>,
    tls_user: Option<&str>,
) -> TestDb {
    let db = TestDb::new(test).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'before')").await;
    let dir = scratch(test);
    let cfg = config(&format!("tg_{test}"), &url_for(&db.name), &dir, &stdout_sink(), "");
    let (code, out) = check(&dir, &cfg);
    assert_eq!(code, 0, "{out}");
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (2, 'after')").await;
    let records = wait_stdout(&mut tg, 2, WAIT).await;
    assert_eq!(records[0]["value"]["op"], "r", "{records:?}");
    assert_eq!(records[0]["value"]["after"]["id"], 1);
    assert_eq!(records[1]["value"]["op"], "c");
    assert_eq!(records[1]["value"]["after"]["v"], "after");
    if let Some(user) = tls_user {
        let row = db
            .client
            .query_one(
                "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.usename = $1 AND a.backend_type = 'walsender'",
                &[&user],
            )
            .await
            .unwrap();
        let (n, all_ssl): (i64, bool) = (row.get(0), row.get(1));
        assert!(n >= 1 && all_ssl, "the replication connection is not TLS: {n} walsenders, ssl {all_ssl}");
    }
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    if let Some(secret) = secret {
        assert!(!log.contains(secret), "the password must never be logged:\n{log}");
    }
    db
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_streams_and_snapshots_over_verify_full_with_channel_binding() {
    let ca = tls_file("ca.pem");
    let url = |db: &str| {
        pg_url("tailgate_tls", "tls-secret", "localhost:5432", db, &format!("sslmode=verify-full&sslrootcert={ca}"))
    };
    // tailgate_tls logs in by SCRAM; over TLS the server offers SCRAM-SHA-256-PLUS and tailgate takes
    // it, so a wrong tls-server-end-point hash would fail the login.
    pg_snapshot_and_stream("tls_pg_full", url, Some("tls-secret"), Some("tailgate_tls")).await.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_client_certificate_login() {
    let (ca, cert, key) = (tls_file("ca.pem"), tls_file("client.pem"), tls_file("client-key.pem"));
    let url = |db: &str| {
        pg_url(
            "tailgate_cert",
            "",
            "127.0.0.1:5432",
            db,
            &format!("sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={key}"),
        )
    };
    pg_snapshot_and_stream("tls_pg_cert", url, None, Some("tailgate_cert")).await.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_prefer_uses_tls_when_offered_and_plaintext_when_not() {
    // A TLS-only role with sslmode=prefer: works only if prefer really tries TLS first.
    let url = |db: &str| pg_url("tailgate_tls", "tls-secret", "127.0.0.1:5432", db, "sslmode=prefer");
    pg_snapshot_and_stream("tls_pg_prefer", url, Some("tls-secret"), Some("tailgate_tls")).await.drop().await;

    // A server that answers 'N': prefer goes on in plaintext, require refuses naming sslmode.
    let plain = forwarder("127.0.0.1:5432".into(), Forward::RefusePgTls).await;
    let admin = pg_admin_url();
    let admin_user = admin.trim_start_matches("postgres://").split('@').next().unwrap_or("postgres").to_owned();
    let url = |db: &str| pg_url(&admin_user, "", &plain, db, "sslmode=prefer");
    let db = pg_snapshot_and_stream("tls_pg_prefer_n", url, None, None).await;
    let dir = scratch("tls_pg_require_n");
    let cfg = config(
        "tg_tls_pg_require_n",
        &pg_url(&admin_user, "", &plain, &db.name, "sslmode=require"),
        &dir,
        &stdout_sink(),
        "",
    );
    let (code, out) = check(&dir, &cfg);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("does not accept TLS") && out.contains("sslmode=require"), "{out}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_verify_full_refuses_a_host_the_certificate_does_not_name() {
    let db = TestDb::new("tls_pg_name").await;
    let ca = tls_file("ca.pem");
    let other_host = forwarder("127.0.0.1:5432".into(), Forward::Plain).await;
    let dir = scratch("tls_pg_name");
    let url =
        pg_url("tailgate_tls", "tls-secret", &other_host, &db.name, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let cfg = config("tg_tls_pg_name", &url, &dir, &stdout_sink(), "");
    let (code, out) = check(&dir, &cfg);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("does not match host '127.0.0.2'") && out.contains("sslmode=verify-ca"), "{out}");
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_exit(WAIT).await;
    assert!(tg.log_text().contains("does not match host"), "{}", tg.log_text());

    // verify-ca checks the chain only: the same address is fine.
    let url =
        pg_url("tailgate_tls", "tls-secret", &other_host, &db.name, &format!("sslmode=verify-ca&sslrootcert={ca}"));
    let (code, out) = check(&dir, &config("tg_tls_pg_name", &url, &dir, &stdout_sink(), ""));
    assert!(!out.contains("does not match host") && !out.contains("TLS handshake"), "{code}: {out}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_untrusted_ca_and_plaintext_for_a_tls_only_role_are_refused_by_name() {
    let db = TestDb::new("tls_pg_refused").await;
    let dir = scratch("tls_pg_refused");
    let other = tls_file("other-ca.pem");
    let url = pg_url(
        "tailgate_tls",
        "tls-secret",
        "localhost:5432",
        &db.name,
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    );
    let (code, out) = check(&dir, &config("tg_tls_pg_refused", &url, &dir, &stdout_sink(), ""));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not signed by a trusted CA") && out.contains(&format!("sslrootcert={other}")), "{out}");

    let url = pg_url("tailgate_tls", "tls-secret", "127.0.0.1:5432", &db.name, "sslmode=disable");
    let cfg = config("tg_tls_pg_refused", &url, &dir, &stdout_sink(), "");
    let (code, out) = check(&dir, &cfg);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("only over TLS") && out.contains("sslmode=require"), "{out}");
    assert!(!out.contains("tls-secret"), "{out}");
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_exit(WAIT).await;
    let log = tg.log_text();
    assert!(log.contains("only over TLS") && log.contains("sslmode="), "{log}");
    assert!(!log.contains("tls-secret"), "{log}");

    let url = pg_url(
        "tailgate_tls",
        "tls-secret",
        "127.0.0.1:5432",
        &db.name,
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    );
    let (code, out) = check(&dir, &config("tg_tls_pg_refused", &url, &dir, &stdout_sink(), ""));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("sslrootcert=/nonexistent/ca.pem: cannot read"), "{out}");
    db.drop().await;
}

fn my_url(user: &str, password: &str, host: &str, db: &str, params: &str) -> String {
    format!("mysql://{user}:{password}@{host}/{db}?{params}")
}

/// Snapshot of one row, then one streamed row, as `url`'s user on `server`.
async fn my_snapshot_and_stream(server: Server, test: &str, url_for: impl Fn(&str) -> String, secret: &str) {
    let _lock = server_lock(server).read().await;
    let mut db = MyDb::new(server, test).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v varchar(20)); INSERT INTO t VALUES (1, 'before')").await;
    let dir = scratch(&db.name);
    let name = db.name.clone();
    let cfg = my_config(&name, &url_for(&name), &dir, "snapshot = \"initial\"", &stdout_sink(), "");
    let (code, out) = check(&dir, &cfg);
    assert_eq!(code, 0, "{out}");
    let mut tg = Tailgate::start(&dir, &cfg);
    tg.wait_streaming().await;
    db.exec("INSERT INTO t VALUES (2, 'after')").await;
    let records = wait_stdout(&mut tg, 2, WAIT).await;
    assert_eq!(records[0]["value"]["op"], "r", "{records:?}");
    assert_eq!(records[0]["value"]["after"]["id"], 1);
    assert_eq!(records[1]["value"]["op"], "c");
    assert_eq!(records[1]["value"]["after"]["v"], "after");
    let (status, log) = tg.stop().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains(secret), "the password must never be logged:\n{log}");
    db.drop().await;
}

async fn my_verify_identity_streams(server: Server) {
    let ca = tls_file("ca.pem");
    let host = server.host_port().replace("127.0.0.1", "localhost");
    let url =
        |db: &str| my_url("tailgate_tls", "tls-secret", &host, db, &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}"));
    my_snapshot_and_stream(server, &format!("tls_full_{}", server.tag()), url, "tls-secret").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_streams_and_snapshots_over_verify_identity() {
    my_verify_identity_streams(Server::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_streams_and_snapshots_over_verify_identity() {
    my_verify_identity_streams(Server::Mysql).await;
}

async fn my_client_certificate(server: Server) {
    let (ca, cert, key) = (tls_file("ca.pem"), tls_file("client.pem"), tls_file("client-key.pem"));
    let host = server.host_port();
    let url = |db: &str| {
        my_url(
            "tailgate_x509",
            "x509-secret",
            &host,
            db,
            &format!("ssl-mode=VERIFY_CA&ssl-ca={ca}&ssl-cert={cert}&ssl-key={key}"),
        )
    };
    my_snapshot_and_stream(server, &format!("tls_x509_{}", server.tag()), url, "x509-secret").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_and_mariadb_client_certificate_login() {
    my_client_certificate(Server::Mariadb).await;
    my_client_certificate(Server::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_preferred_uses_tls_for_a_tls_only_user() {
    for server in [Server::Mariadb, Server::Mysql] {
        let host = server.host_port();
        // No ssl-mode: PREFERRED, the default.
        let url = |db: &str| format!("mysql://tailgate_tls:tls-secret@{host}/{db}");
        my_snapshot_and_stream(server, &format!("tls_pref_{}", server.tag()), url, "tls-secret").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_preferred_falls_back_to_plaintext_when_the_server_has_no_tls() {
    for server in [Server::Mariadb, Server::Mysql] {
        let no_tls = forwarder(server.host_port(), Forward::StripMysqlTls).await;
        // root has no password on the test servers: the fallback login needs no RSA exchange.
        let url = |db: &str| format!("mysql://root@{no_tls}/{db}?ssl-mode=PREFERRED");
        my_snapshot_and_stream(server, &format!("tls_nossl_{}", server.tag()), url, "never-a-secret").await;

        let _lock = server_lock(server).read().await;
        let dir = scratch(&format!("{}_tls_nossl_req", server.tag()));
        let url = format!("mysql://root@{no_tls}/mysql?ssl-mode=REQUIRED");
        let (code, out) = check(&dir, &my_config("tg_tls_nossl_req", &url, &dir, "", &stdout_sink(), ""));
        assert_ne!(code, 0, "{out}");
        assert!(out.contains("does not offer TLS") && out.contains("ssl-mode=REQUIRED"), "{server:?}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_certificate_errors_name_the_setting() {
    for server in [Server::Mariadb, Server::Mysql] {
        let _lock = server_lock(server).read().await;
        let db = MyDb::new(server, "tls_errs").await;
        let dir = scratch(&format!("{}_tls_errs", server.tag()));
        let name = format!("tg_{}_tls_errs", server.tag());
        let (ca, other) = (tls_file("ca.pem"), tls_file("other-ca.pem"));
        let url = my_url(
            "tailgate_tls",
            "tls-secret",
            &server.host_port(),
            &db.name,
            &format!("ssl-mode=VERIFY_CA&ssl-ca={other}"),
        );
        let (code, out) = check(&dir, &my_config(&name, &url, &dir, "", &stdout_sink(), ""));
        assert_ne!(code, 0, "{out}");
        assert!(
            out.contains("not signed by a trusted CA") && out.contains(&format!("ssl-ca={other}")),
            "{server:?}: {out}"
        );

        let other_host = forwarder(server.host_port(), Forward::Plain).await;
        let url = my_url(
            "tailgate_tls",
            "tls-secret",
            &other_host,
            &db.name,
            &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}"),
        );
        let cfg = my_config(&name, &url, &dir, "", &stdout_sink(), "");
        let (code, out) = check(&dir, &cfg);
        assert_ne!(code, 0, "{out}");
        assert!(
            out.contains("does not match host '127.0.0.2'") && out.contains("ssl-mode=VERIFY_CA"),
            "{server:?}: {out}"
        );
        let mut tg = Tailgate::start(&dir, &cfg);
        tg.wait_exit(WAIT).await;
        assert!(tg.log_text().contains("does not match host"), "{}", tg.log_text());

        let url = my_url("tailgate_tls", "tls-secret", &server.host_port(), &db.name, "ssl-mode=DISABLED");
        let (code, out) = check(&dir, &my_config(&name, &url, &dir, "", &stdout_sink(), ""));
        assert_ne!(code, 0, "a REQUIRE SSL user in plaintext: {out}");
        // "Access denied" with the REQUIRE SSL hint, or (MySQL, no cached hash) the RSA refusal: both name ssl-mode.
        assert!(out.contains("ssl-mode=REQUIRED"), "{server:?}: {out}");
        assert!(!out.contains("tls-secret"), "{out}");
        db.drop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_unknown_url_parameter_is_a_config_error() {
    let dir = scratch("tls_my_unknown");
    let url = "mysql://root@127.0.0.1:3307/x?sslmode=require";
    let (code, out) = check(&dir, &my_config("tg_tls_unknown", url, &dir, "", &stdout_sink(), ""));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("unknown parameter \"sslmode\"") && out.contains("ssl-mode"), "{out}");
    let mut tg = Tailgate::start(&dir, &my_config("tg_tls_unknown", url, &dir, "", &stdout_sink(), ""));
    let status = tg.wait_exit(WAIT).await;
    assert!(!status.success());
    assert!(tg.log_text().contains("unknown parameter \"sslmode\""), "{}", tg.log_text());
}

/// caching_sha2_password without TLS: the server-side cache is flushed first, so the login takes
/// the full-authentication path that needs the password (RSA-encrypted).
#[tokio::test(flavor = "multi_thread")]
async fn mysql_rsa_password_exchange_needs_a_pinned_key_or_permission() {
    let server = Server::Mysql;
    let key = tls_file("mysql-public-key.pem");
    let flush = || async {
        let mut admin = server.connect().await;
        admin.query_drop("FLUSH PRIVILEGES").await.unwrap();
        let _ = admin.disconnect().await;
    };
    {
        let _lock = server_lock(server).read().await;
        let db = MyDb::new(server, "tls_rsa").await;
        let dir = scratch("my_tls_rsa");
        let url = my_url("tailgate_sha2", "sha2-secret", &server.host_port(), &db.name, "ssl-mode=DISABLED");
        flush().await;
        let (code, out) = check(&dir, &my_config("tg_my_tls_rsa", &url, &dir, "", &stdout_sink(), ""));
        assert_ne!(code, 0, "{out}");
        assert!(out.contains("server-public-key-path") && out.contains("allow-public-key-retrieval"), "{out}");
        assert!(!out.contains("sha2-secret"), "{out}");
        db.drop().await;
    }
    let url = |db: &str| {
        my_url(
            "tailgate_sha2",
            "sha2-secret",
            &server.host_port(),
            db,
            &format!("ssl-mode=DISABLED&server-public-key-path={key}"),
        )
    };
    flush().await;
    my_snapshot_and_stream(server, "tls_rsa_pinned", url, "sha2-secret").await;
    // A wrong pinned key: the server cannot decrypt the password, the login fails.
    let wrong = tls_file("server.pem");
    let _lock = server_lock(server).read().await;
    let db = MyDb::new(server, "tls_rsa_wrong").await;
    let dir = scratch("my_tls_rsa_wrong");
    let url = my_url(
        "tailgate_sha2",
        "sha2-secret",
        &server.host_port(),
        &db.name,
        &format!("ssl-mode=DISABLED&server-public-key-path={wrong}"),
    );
    flush().await;
    let (code, out) = check(&dir, &my_config("tg_my_tls_rsa_wrong", &url, &dir, "", &stdout_sink(), ""));
    assert_ne!(code, 0, "a certificate is not the server's RSA key: {out}");
    db.drop().await;
}
