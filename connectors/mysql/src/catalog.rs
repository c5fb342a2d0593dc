//! Ordinary SQL to the server (`mysql_async`): what kind of server it is, whether its binlog suits
//! change data capture, where the binlog ends now, and the `information_schema` facts the binlog
//! may not carry.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row};
use tailgate_core::{BinlogFile, GtidSet, MariadbGtidList, Position};
use tailgate_tls::TlsMode;

use crate::error::MyError;
use crate::replication::{ConnInfo, ReplicationConnection};
use crate::schema::{CatalogColumn, Collations};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Mysql,
    Mariadb,
}

impl Flavor {
    /// The `connector` name in the `source` block, as Debezium's two connectors write it.
    pub fn connector(self) -> &'static str {
        match self {
            Flavor::Mysql => "mysql",
            Flavor::Mariadb => "mariadb",
        }
    }
}

/// What the server is and how its binlog is set up.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    pub flavor: Flavor,
    pub version: String,
    pub server_id: u32,
    pub log_bin: bool,
    pub binlog_format: String,
    pub binlog_row_image: String,
    pub binlog_row_metadata: String,
    /// MySQL: `binlog_row_value_options` (`PARTIAL_JSON` breaks full row images).
    pub binlog_row_value_options: String,
    pub binlog_checksum: String,
    /// MySQL `gtid_mode = ON`; MariaDB always has GTIDs.
    pub gtid_mode: bool,
    /// Seconds binlogs are kept (0: forever).
    pub binlog_retention_s: u64,
    pub user: String,
}

impl ServerFacts {
    /// Whether a restart can ask for GTIDs instead of a file and position.
    pub fn gtids(&self) -> bool {
        self.gtid_mode || self.flavor == Flavor::Mariadb
    }
}

/// Opens a mysql_async connection: the one way every SQL connection is made, with the URL's TLS
/// settings. mysql_async has no "preferred" mode: PREFERRED connects with TLS and, when the server
/// offers none, again in plaintext.
pub async fn connect(info: &ConnInfo) -> Result<Conn, MyError> {
    // mysql_async builds its rustls config with the process-wide provider.
    tailgate_tls::install_process_provider();
    match info.tls.mode {
        TlsMode::Disable | TlsMode::Allow => connect_plain(info).await,
        TlsMode::Prefer => match Conn::new(info.opts(true)).await {
            Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer)) => {
                connect_plain(info).await
            }
            other => other.map_err(|e| classify(info, e)),
        },
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => {
            Conn::new(info.opts(true)).await.map_err(|e| classify(info, e))
        }
    }
}

async fn connect_plain(info: &ConnInfo) -> Result<Conn, MyError> {
    connect_plain_inner(info).await.map_err(|e| match e {
        MyError::Auth { user, message } => {
            MyError::Auth { user, message: crate::replication::plaintext_hint(message, false) }
        }
        other => other,
    })
}

async fn connect_plain_inner(info: &ConnInfo) -> Result<Conn, MyError> {
    // Without TLS, mysql_async answers caching_sha2_password's full authentication with whatever RSA
    // key the server sends. Unless that is allowed, log in once with our own client first (which uses
    // only the pinned key, or refuses): the server then holds the password's hash in its cache and
    // mysql_async's login takes the fast path, without the password. (A server restart in between
    // would reopen the window: documented in docs/security.md.)
    if !info.password.is_empty() && !info.allow_public_key_retrieval {
        let conn = ReplicationConnection::connect(info, std::time::Duration::from_secs(10)).await?;
        conn.close().await;
    }
    Conn::new(info.opts(false)).await.map_err(|e| classify(info, e))
}

fn classify(info: &ConnInfo, e: mysql_async::Error) -> MyError {
    if let Some(r) = tailgate_tls::find_rustls_error(&e) {
        return MyError::Tls(info.tls.handshake_error(&info.host, r));
    }
    match e {
        mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) => {
            MyError::TlsRefused { addr: info.addr(), mode: info.tls.mode_text.clone() }
        }
        mysql_async::Error::Server(s) if s.code == 1045 => {
            MyError::Auth { user: info.user.clone(), message: s.message }
        }
        mysql_async::Error::Io(io) => {
            MyError::Connect { addr: info.addr(), source: std::io::Error::other(io.to_string()) }
        }
        other => MyError::Sql(other),
    }
}

async fn var(conn: &mut Conn, name: &str) -> Result<Option<String>, MyError> {
    // A variable this server does not have is NULL here, not an error.
    let sql = format!("SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_VARIABLES WHERE VARIABLE_NAME = '{name}'");
    // MySQL 5.7+ may refuse information_schema.GLOBAL_VARIABLES; SHOW VARIABLES works everywhere.
    let row: Option<Option<String>> = conn.query_first(&sql).await.unwrap_or_default();
    if let Some(v) = row {
        return Ok(v);
    }
    let row: Option<(String, Option<String>)> =
        conn.query_first(format!("SHOW GLOBAL VARIABLES LIKE '{name}'")).await?;
    Ok(row.and_then(|(_, v)| v))
}

pub async fn server_facts(conn: &mut Conn) -> Result<ServerFacts, MyError> {
    let (version, user): (String, String) =
        conn.query_first("SELECT VERSION(), CURRENT_USER()").await?.unwrap_or_default();
    let flavor = if version.to_ascii_lowercase().contains("mariadb") { Flavor::Mariadb } else { Flavor::Mysql };
    let get = |v: Option<String>| v.unwrap_or_default();
    let log_bin = get(var(conn, "log_bin").await?);
    let expire_s: u64 = var(conn, "binlog_expire_logs_seconds").await?.and_then(|v| v.parse().ok()).unwrap_or(0);
    let expire_days: f64 = var(conn, "expire_logs_days").await?.and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let retention = if expire_s > 0 { expire_s } else { (expire_days * 86_400.0) as u64 };
    Ok(ServerFacts {
        flavor,
        server_id: get(var(conn, "server_id").await?).parse().unwrap_or(0),
        log_bin: matches!(log_bin.to_ascii_uppercase().as_str(), "ON" | "1"),
        binlog_format: get(var(conn, "binlog_format").await?).to_ascii_uppercase(),
        binlog_row_image: get(var(conn, "binlog_row_image").await?).to_ascii_uppercase(),
        binlog_row_metadata: get(var(conn, "binlog_row_metadata").await?).to_ascii_uppercase(),
        binlog_row_value_options: get(var(conn, "binlog_row_value_options").await?).to_ascii_uppercase(),
        binlog_checksum: get(var(conn, "binlog_checksum").await?).to_ascii_uppercase(),
        gtid_mode: get(var(conn, "gtid_mode").await?).eq_ignore_ascii_case("ON"),
        binlog_retention_s: retention,
        version,
        user,
    })
}

/// The settings change data capture cannot do without, as errors naming the fix.
pub fn required_settings(f: &ServerFacts) -> Result<(), MyError> {
    let cnf = match f.flavor {
        Flavor::Mariadb => "the [mysqld] section of my.cnf (e.g. /etc/mysql/mariadb.conf.d/50-server.cnf)",
        Flavor::Mysql => "the [mysqld] section of my.cnf",
    };
    if !f.log_bin {
        return Err(MyError::Setting {
            setting: "log_bin",
            found: "OFF".into(),
            needed: "ON",
            fix: format!("add `log_bin = mysql-bin` and `server_id = 1` to {cnf}, then restart the server"),
        });
    }
    if f.binlog_format != "ROW" {
        return Err(MyError::Setting {
            setting: "binlog_format",
            found: f.binlog_format.clone(),
            needed: "ROW",
            fix: format!(
                "SET GLOBAL binlog_format = 'ROW' and add `binlog_format = ROW` to {cnf} (sessions opened before keep their format)"
            ),
        });
    }
    if f.binlog_row_image != "FULL" {
        return Err(MyError::Setting {
            setting: "binlog_row_image",
            found: f.binlog_row_image.clone(),
            needed: "FULL (before and after images of every column)",
            fix: format!("SET GLOBAL binlog_row_image = 'FULL' and add `binlog_row_image = FULL` to {cnf}"),
        });
    }
    if f.binlog_row_value_options.contains("PARTIAL_JSON") {
        return Err(MyError::Setting {
            setting: "binlog_row_value_options",
            found: f.binlog_row_value_options.clone(),
            needed: "'' (partial JSON updates carry no full after image)",
            fix: "SET GLOBAL binlog_row_value_options = ''".into(),
        });
    }
    if !matches!(f.binlog_checksum.as_str(), "NONE" | "CRC32" | "") {
        return Err(MyError::Setting {
            setting: "binlog_checksum",
            found: f.binlog_checksum.clone(),
            needed: "NONE or CRC32",
            fix: "SET GLOBAL binlog_checksum = 'CRC32'".into(),
        });
    }
    Ok(())
}

/// Where the binlog ends now: file, position and (MySQL with GTIDs / MariaDB) the matching GTID set.
pub async fn current_position(conn: &mut Conn, f: &ServerFacts) -> Result<Position, MyError> {
    let row = binlog_status(conn, f).await?;
    let file: String = row.get_opt(0).and_then(Result::ok).unwrap_or_default();
    let pos: u64 = row.get_opt(1).and_then(Result::ok).unwrap_or(4);
    let gtids = match f.flavor {
        Flavor::Mysql if f.gtid_mode => {
            let text: String = row.get_opt(4).and_then(Result::ok).unwrap_or_default();
            Some(GtidSet::Mysql(text.parse().map_err(|e| MyError::Protocol(format!("server's GTID set: {e}")))?))
        }
        Flavor::Mysql => None,
        Flavor::Mariadb => Some(GtidSet::Mariadb(mariadb_gtid_pos(conn, &file, pos).await?)),
    };
    Ok(Position::mysql(BinlogFile(file), pos, gtids))
}

/// Where the binlog ends now: the file being written and the offset after its last event.
pub async fn binlog_end(conn: &mut Conn, f: &ServerFacts) -> Result<(BinlogFile, u64), MyError> {
    let row = binlog_status(conn, f).await?;
    let file: String = row.get_opt(0).and_then(Result::ok).unwrap_or_default();
    let pos: Option<u64> = row.get_opt(1).and_then(Result::ok);
    match pos {
        Some(pos) if !file.is_empty() => Ok((BinlogFile(file), pos)),
        _ => Err(MyError::Protocol(format!("SHOW BINARY LOG STATUS returned file {file:?}, position {pos:?}"))),
    }
}

/// `SHOW BINARY LOG STATUS` (`SHOW MASTER STATUS` before MySQL 8.2 and on MariaDB): file, position,
/// and on MySQL the executed GTID set in the fifth column.
async fn binlog_status(conn: &mut Conn, f: &ServerFacts) -> Result<Row, MyError> {
    // MySQL 8.2 renamed SHOW MASTER STATUS (and 8.4 removed it).
    let row: Option<Row> = match conn.query_first("SHOW BINARY LOG STATUS").await {
        Ok(r) => r,
        // 1064: a server that does not know the new name yet.
        Err(mysql_async::Error::Server(s)) if s.code == 1064 => {
            conn.query_first("SHOW MASTER STATUS").await.map_err(|e| privilege(e, f, BINLOG_STATUS))?
        }
        Err(e) => return Err(privilege(e, f, BINLOG_STATUS)),
    };
    row.ok_or_else(|| MyError::Setting {
        setting: "log_bin",
        found: "OFF (SHOW MASTER STATUS is empty)".into(),
        needed: "ON",
        fix: "enable the binary log (log_bin) and restart the server".into(),
    })
}

/// MariaDB: the GTID state exactly at a binlog file and position.
pub async fn mariadb_gtid_pos(conn: &mut Conn, file: &str, pos: u64) -> Result<MariadbGtidList, MyError> {
    let text: Option<String> = conn.exec_first("SELECT BINLOG_GTID_POS(?, ?)", (file, pos)).await?.flatten();
    text.unwrap_or_default().parse().map_err(|e| MyError::Protocol(format!("server's GTID position: {e}")))
}

/// The privilege reading the binlog's status needs.
const BINLOG_STATUS: &str = "REPLICATION CLIENT (MariaDB: BINLOG MONITOR)";

/// An access-denied error as the privilege it lacks; other errors as they are.
fn privilege(e: mysql_async::Error, f: &ServerFacts, privilege: &'static str) -> MyError {
    match e {
        mysql_async::Error::Server(s) if matches!(s.code, 1227 | 1142 | 1044) => {
            MyError::Privilege { user: f.user.clone(), privilege }
        }
        other => other.into(),
    }
}

/// The binlog files the server still has, oldest first.
pub async fn binary_logs(conn: &mut Conn) -> Result<Vec<String>, MyError> {
    let rows: Vec<Row> = conn.query("SHOW BINARY LOGS").await.map_err(|e| match e {
        mysql_async::Error::Server(s) if s.code == 1227 => {
            MyError::Privilege { user: String::new(), privilege: BINLOG_STATUS }
        }
        other => other.into(),
    })?;
    Ok(rows.into_iter().filter_map(|r| r.get_opt::<String, _>(0).and_then(Result::ok)).collect())
}

/// Binlog bytes written after `file`/`pos` (the checkpoint), from `SHOW BINARY LOGS` sizes: how far
/// the connector is behind. `None` when the file is no longer listed.
pub async fn binlog_lag_bytes(conn: &mut Conn, file_index: u64, pos: u64) -> Result<Option<u64>, MyError> {
    let rows: Vec<Row> = conn.query("SHOW BINARY LOGS").await?;
    let mut lag = 0u64;
    let mut found = false;
    for row in rows {
        let name: String = row.get_opt(0).and_then(Result::ok).unwrap_or_default();
        let size: u64 = row.get_opt(1).and_then(Result::ok).unwrap_or(0);
        let index = BinlogFile(name).index();
        if index == file_index {
            found = true;
            lag += size.saturating_sub(pos);
        } else if index > file_index {
            lag += size;
        }
    }
    Ok(found.then_some(lag))
}

/// Whether the server can still stream from `position`: its file exists, or (by GTID) no transaction
/// it lacks has been purged. `Err(reason)` says what is gone.
pub async fn position_available(
    conn: &mut Conn,
    f: &ServerFacts,
    position: &Position,
) -> Result<Result<(), String>, MyError> {
    let Position::Mysql { file, gtids, .. } = position else { return Ok(Ok(())) };
    if let (Some(GtidSet::Mysql(set)), true) = (gtids, f.gtid_mode) {
        let purged: String = conn.query_first("SELECT @@GLOBAL.gtid_purged").await?.unwrap_or_default();
        let covered: Option<i64> =
            conn.exec_first("SELECT GTID_SUBSET(?, ?)", (purged.clone(), set.to_string())).await?;
        return Ok(if covered == Some(1) {
            Ok(())
        } else {
            Err(format!("transactions not in the stored GTID set were purged (gtid_purged = {purged})"))
        });
    }
    binlog_file_available(conn, file).await
}

/// Whether the server has executed every transaction the checkpoint says was delivered: a server
/// that lags behind it (a replica promoted before it caught up) or diverged from it would stream
/// from a history the checkpoint does not describe. `Err` names what is missing.
pub async fn has_checkpoint(
    conn: &mut Conn,
    f: &ServerFacts,
    position: &Position,
) -> Result<Result<(), String>, MyError> {
    let Position::Mysql { gtids: Some(gtids), .. } = position else { return Ok(Ok(())) };
    match gtids {
        GtidSet::Mysql(set) if f.gtid_mode => {
            let executed: String = conn.query_first("SELECT @@GLOBAL.gtid_executed").await?.unwrap_or_default();
            let contained: Option<i64> =
                conn.exec_first("SELECT GTID_SUBSET(?, ?)", (set.to_string(), executed.clone())).await?;
            Ok(if contained == Some(1) {
                Ok(())
            } else {
                Err(format!("its gtid_executed ({executed}) lacks transactions of the checkpoint ({set})"))
            })
        }
        GtidSet::Mariadb(list) if !list.is_empty() => {
            let pos: String = conn.query_first("SELECT @@GLOBAL.gtid_binlog_pos").await?.unwrap_or_default();
            let server: MariadbGtidList = match pos.parse() {
                Ok(l) => l,
                Err(_) => return Ok(Ok(())),
            };
            let behind: Vec<String> = list
                .iter()
                .filter(|(domain, _, seq)| server.get(*domain).is_none_or(|(_, s)| s < *seq))
                .map(|(d, s, q)| format!("{d}-{s}-{q}"))
                .collect();
            Ok(if behind.is_empty() {
                Ok(())
            } else {
                Err(format!("its gtid_binlog_pos ({pos}) is behind the checkpoint in {}", behind.join(", ")))
            })
        }
        _ => Ok(Ok(())),
    }
}

async fn binlog_file_available(conn: &mut Conn, file: &BinlogFile) -> Result<Result<(), String>, MyError> {
    let logs = binary_logs(conn).await?;
    Ok(if logs.iter().any(|l| l == &file.0) {
        Ok(())
    } else {
        Err(format!(
            "binlog file {file} is gone (the server has {})",
            match (logs.first(), logs.last()) {
                (Some(a), Some(b)) => format!("{a} to {b}"),
                _ => "none".into(),
            }
        ))
    })
}

/// Collation ids to character set names.
pub async fn collations(conn: &mut Conn, flavor: Flavor) -> Result<Collations, MyError> {
    let mut out = Collations::new();
    let rows: Vec<(u64, String)> =
        conn.query("SELECT ID, CHARACTER_SET_NAME FROM information_schema.COLLATIONS WHERE ID IS NOT NULL").await?;
    out.extend(rows.into_iter().map(|(id, cs)| (id as u32, cs)));
    if flavor == Flavor::Mariadb {
        // MariaDB 10.10+ lists the ids of character-set-specific UCA 14 collations here.
        let rows: Result<Vec<(u64, String)>, _> = conn
            .query(
                "SELECT ID, CHARACTER_SET_NAME FROM information_schema.COLLATION_CHARACTER_SET_APPLICABILITY \
                 WHERE ID IS NOT NULL",
            )
            .await;
        if let Ok(rows) = rows {
            out.extend(rows.into_iter().map(|(id, cs)| (id as u32, cs)));
        }
    }
    Ok(out)
}

const COLUMNS_SELECT: &str = "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME, \
     COLUMN_KEY, IS_NULLABLE, NUMERIC_PRECISION, NUMERIC_SCALE, DATETIME_PRECISION, CHARACTER_OCTET_LENGTH \
     FROM information_schema.COLUMNS";

/// A row of [`COLUMNS_SELECT`]: (database, table, column).
fn catalog_column(r: &Row) -> (String, String, CatalogColumn) {
    let text = |i: usize| r.get_opt::<Option<String>, _>(i).and_then(Result::ok).flatten();
    let number = |i: usize| r.get_opt::<Option<u64>, _>(i).and_then(Result::ok).flatten();
    let column = CatalogColumn {
        name: text(2).unwrap_or_default(),
        data_type: text(3).unwrap_or_default().to_ascii_lowercase(),
        column_type: text(4).unwrap_or_default(),
        charset: text(5),
        primary_key: text(6).as_deref() == Some("PRI"),
        nullable: text(7).as_deref() == Some("YES"),
        precision: number(8),
        scale: number(9),
        fsp: number(10),
        octet_length: number(11),
    };
    (text(0).unwrap_or_default(), text(1).unwrap_or_default(), column)
}

/// A table's columns in order, or an empty list when the table does not exist (any more).
pub async fn table_columns(conn: &mut Conn, database: &str, table: &str) -> Result<Vec<CatalogColumn>, MyError> {
    let rows: Vec<Row> = conn
        .exec(
            format!("{COLUMNS_SELECT} WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION"),
            (database, table),
        )
        .await?;
    Ok(rows.iter().map(|r| catalog_column(r).2).collect())
}

/// The columns of every table in `database` (`None`: every database but the server's own), in one
/// query: what a stream without FULL row metadata needs before its first TABLE_MAP, so that a table
/// altered right after a row was written is not looked up only after the change.
pub async fn all_columns(
    conn: &mut Conn,
    database: Option<&str>,
) -> Result<std::collections::HashMap<tailgate_core::TableId, Vec<CatalogColumn>>, MyError> {
    let rows: Vec<Row> = match database {
        Some(db) => {
            conn.exec(format!("{COLUMNS_SELECT} WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, ORDINAL_POSITION"), (db,))
                .await?
        }
        None => {
            conn.query(format!(
                "{COLUMNS_SELECT} WHERE TABLE_SCHEMA NOT IN ({}) ORDER BY TABLE_SCHEMA, TABLE_NAME, ORDINAL_POSITION",
                SYSTEM_DATABASES.map(|d| format!("'{d}'")).join(", ")
            ))
            .await?
        }
    };
    let mut out: std::collections::HashMap<tailgate_core::TableId, Vec<CatalogColumn>> = Default::default();
    for row in &rows {
        let (schema, table, column) = catalog_column(row);
        out.entry(tailgate_core::TableId { schema, table }).or_default().push(column);
    }
    Ok(out)
}

/// A table's primary-key columns in key order (empty without one).
pub async fn primary_key(conn: &mut Conn, database: &str, table: &str) -> Result<Vec<String>, MyError> {
    Ok(conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
            (database, table),
        )
        .await?)
}

/// Databases that hold the server's own state, never captured.
pub const SYSTEM_DATABASES: [&str; 4] = ["mysql", "sys", "performance_schema", "information_schema"];

/// The grants of the current user, to name a missing privilege before the server refuses.
pub async fn missing_privileges(conn: &mut Conn, flavor: Flavor) -> Result<Vec<&'static str>, MyError> {
    let grants: Vec<String> = conn.query("SHOW GRANTS").await?;
    let all = grants.join("\n").to_ascii_uppercase();
    let has = |p: &str| all.contains("ALL PRIVILEGES ON *.*") || all.contains(p);
    let mut missing = Vec::new();
    if !has("REPLICATION SLAVE") && !has("REPLICATION REPLICA") {
        missing.push("REPLICATION SLAVE");
    }
    let client = match flavor {
        Flavor::Mariadb => has("BINLOG MONITOR") || has("REPLICATION CLIENT") || has("SUPER"),
        Flavor::Mysql => has("REPLICATION CLIENT") || has("SUPER"),
    };
    if !client {
        missing.push(if flavor == Flavor::Mariadb {
            "BINLOG MONITOR (REPLICATION CLIENT)"
        } else {
            "REPLICATION CLIENT"
        });
    }
    if !has("SELECT") {
        missing.push("SELECT");
    }
    Ok(missing)
}
