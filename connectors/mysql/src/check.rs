//! Prerequisite checks behind `tailgate check` for MySQL and MariaDB: each one says ok, WARN or
//! FAILED and, when it is not ok, the fix. Checks never change anything on the server.

use mysql_async::prelude::Queryable;
use tailgate_core::Position;
use tailgate_pipeline::CheckResult;

use crate::catalog::{self, Flavor};
use crate::error::MyError;
use crate::replication::ConnInfo;

pub struct CheckInput<'a> {
    pub url: &'a str,
    pub server_id: u32,
    /// The stored checkpoint, if any.
    pub checkpoint: Option<&'a Position>,
}

/// Runs the checks in order; stops early when the server cannot be reached.
pub async fn run_checks(input: &CheckInput<'_>) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let info = match ConnInfo::from_url(input.url) {
        Ok(i) => i,
        Err(e) => {
            out.push(CheckResult::failed("source.url", e.to_string()));
            return out;
        }
    };
    let mut conn = match catalog::connect(&info).await {
        Ok(c) => c,
        Err(e @ MyError::Auth { .. }) => {
            out.push(CheckResult::failed("authentication", e.to_string()));
            return out;
        }
        Err(e) => {
            out.push(CheckResult::failed("connection", e.to_string()));
            return out;
        }
    };
    let facts = match catalog::server_facts(&mut conn).await {
        Ok(f) => f,
        Err(e) => {
            out.push(CheckResult::failed("server", e.to_string()));
            return out;
        }
    };
    let kind = match facts.flavor {
        Flavor::Mysql => "MySQL",
        Flavor::Mariadb => "MariaDB",
    };
    out.push(CheckResult::ok(
        "connection",
        format!("connected to {} as {} ({kind} {})", info.addr(), facts.user, facts.version),
    ));
    let setting = |name: &'static str, found: &str, ok: bool, fix: &str| {
        if ok {
            CheckResult::ok(name, found.to_owned())
        } else {
            CheckResult::failed(name, format!("{found}. Fix: {fix}"))
        }
    };
    out.push(setting(
        "log_bin",
        if facts.log_bin { "ON" } else { "OFF" },
        facts.log_bin,
        "add `log_bin = mysql-bin` and `server_id = 1` to the [mysqld] section of my.cnf, then restart the server",
    ));
    out.push(setting(
        "binlog_format",
        &facts.binlog_format,
        facts.binlog_format == "ROW",
        "SET GLOBAL binlog_format = 'ROW' and add `binlog_format = ROW` to my.cnf",
    ));
    out.push(setting(
        "binlog_row_image",
        &facts.binlog_row_image,
        facts.binlog_row_image == "FULL",
        "SET GLOBAL binlog_row_image = 'FULL' and add `binlog_row_image = FULL` to my.cnf (events need every column before and after)",
    ));
    if facts.binlog_row_metadata == "FULL" {
        out.push(CheckResult::ok("binlog_row_metadata", "FULL: every change carries its column names"));
    } else {
        out.push(CheckResult::warn(
            "binlog_row_metadata",
            format!(
                "{}: column names come from information_schema, so rows written before an ALTER TABLE that tailgate \
                 has not read yet may not decode. Fix: SET GLOBAL binlog_row_metadata = 'FULL' and add it to my.cnf",
                if facts.binlog_row_metadata.is_empty() { "not supported" } else { &facts.binlog_row_metadata }
            ),
        ));
    }
    if facts.flavor == Flavor::Mysql {
        out.push(setting(
            "binlog_row_value_options",
            if facts.binlog_row_value_options.is_empty() { "''" } else { &facts.binlog_row_value_options },
            !facts.binlog_row_value_options.contains("PARTIAL_JSON"),
            "SET GLOBAL binlog_row_value_options = '' (partial JSON updates carry no full row image)",
        ));
        out.push(CheckResult::ok(
            "gtid_mode",
            if facts.gtid_mode {
                "ON: restarts ask for GTIDs and survive a failover"
            } else {
                "OFF: restarts use binlog file and position (enable GTIDs to survive a failover)"
            },
        ));
    }
    out.push(setting(
        "binlog_checksum",
        &facts.binlog_checksum,
        matches!(facts.binlog_checksum.as_str(), "NONE" | "CRC32"),
        "SET GLOBAL binlog_checksum = 'CRC32'",
    ));
    match catalog::missing_privileges(&mut conn, facts.flavor).await {
        Ok(missing) if missing.is_empty() => {
            out.push(CheckResult::ok("privileges", "SELECT, REPLICATION SLAVE, REPLICATION CLIENT"))
        }
        Ok(missing) => out.push(CheckResult::failed(
            "privileges",
            format!(
                "{} lacks {}. Fix: GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO {}",
                facts.user,
                missing.join(", "),
                facts.user
            ),
        )),
        Err(e) => out.push(CheckResult::warn("privileges", format!("cannot read the grants: {e}"))),
    }
    if facts.server_id == input.server_id {
        out.push(CheckResult::failed(
            "server_id",
            format!("{} is the server's own server_id. Fix: set another `source.server_id`", input.server_id),
        ));
    } else {
        match replica_using(&mut conn, input.server_id).await {
            Some(host) => out.push(CheckResult::failed(
                "server_id",
                format!(
                    "{} is already used by a connected replica ({host}). Fix: give this connector its own `source.server_id` \
                     (or stop the other one)",
                    input.server_id
                ),
            )),
            None => out.push(CheckResult::ok(
                "server_id",
                format!("{} (the server is {})", input.server_id, facts.server_id),
            )),
        }
    }
    out.push(match facts.binlog_retention_s {
        0 => CheckResult::ok("binlog retention", "binlogs are kept until purged by hand"),
        s if s < 86_400 => CheckResult::warn(
            "binlog retention",
            format!(
                "binlogs are purged after {:.1} h: a connector stopped longer loses its position. Fix: SET GLOBAL \
                 binlog_expire_logs_seconds = 604800 (7 days)",
                s as f64 / 3600.0
            ),
        ),
        s => CheckResult::ok("binlog retention", format!("{:.1} days", s as f64 / 86_400.0)),
    });
    if let Some(db) = &info.database {
        let exists: Option<String> = conn
            .exec_first("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?", (db,))
            .await
            .ok()
            .flatten();
        out.push(match exists {
            Some(_) => CheckResult::ok("database", format!("{db} (only its tables are captured)")),
            None => CheckResult::failed(
                "database",
                format!("{db} does not exist. Fix: correct the database in `source.url`"),
            ),
        });
    }
    if let Some(position) = input.checkpoint {
        match catalog::position_available(&mut conn, &facts, position).await {
            Ok(Ok(())) => out.push(CheckResult::ok("stored position", format!("{position} is still on the server"))),
            Ok(Err(reason)) => out.push(CheckResult::failed(
                "stored position",
                format!(
                    "{position}: {reason}. Fix: `tailgate offsets reset` to start from now (changes in between are lost), \
                     or snapshot = \"when_needed\" to take a new snapshot"
                ),
            )),
            Err(e) => out.push(CheckResult::warn("stored position", format!("cannot verify: {e}"))),
        }
    }
    out
}

/// A connected, registered replica that uses `server_id` (`SHOW REPLICAS`), by host.
pub async fn replica_using(conn: &mut mysql_async::Conn, server_id: u32) -> Option<String> {
    let rows: Vec<mysql_async::Row> = match conn.query("SHOW REPLICAS").await {
        Ok(r) => r,
        Err(_) => conn.query("SHOW SLAVE HOSTS").await.ok()?,
    };
    rows.into_iter().find_map(|r| {
        let id: u32 = r.get_opt(0).and_then(Result::ok)?;
        let host: String = r.get_opt(1).and_then(Result::ok).unwrap_or_default();
        (id == server_id).then_some(host)
    })
}
