//! Prerequisite checks behind `tailgate check`: each one says ok or FAILED and, when it fails,
//! the fix. Checks never change anything on the server.

use tailgate_core::Lsn;

use crate::catalog;
use crate::error::PgError;
use crate::replication::{ConnInfo, ReplicationConnection};

pub use tailgate_pipeline::{CheckResult, Status};

fn ok(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult::ok(name, detail)
}
fn warn(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult::warn(name, detail)
}
fn failed(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult::failed(name, detail)
}

pub struct CheckInput<'a> {
    pub url: &'a str,
    pub slot: &'a str,
    pub publication: &'a str,
    pub create_publication: bool,
    /// The stored checkpoint, if any.
    pub checkpoint: Option<Lsn>,
}

/// Runs the PostgreSQL checks in order; stops early when the server cannot be reached.
pub async fn run_checks(input: &CheckInput<'_>) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let info = match ConnInfo::from_url(input.url) {
        Ok(i) => i,
        Err(e) => {
            out.push(failed("source.url", e.to_string()));
            return out;
        }
    };
    let client = match catalog::connect(&info).await {
        Ok(c) => {
            out.push(ok("connection", format!("connected to {} as {}", info.addr(), info.user)));
            c
        }
        Err(e @ PgError::Auth { .. }) => {
            out.push(failed("authentication", e.to_string()));
            return out;
        }
        Err(e) => {
            out.push(failed("connection", e.to_string()));
            return out;
        }
    };
    match catalog::wal_level(&client).await {
        Ok(level) if level == "logical" => out.push(ok("wal_level", "logical")),
        Ok(level) => out.push(failed("wal_level", PgError::WalLevel { found: level }.to_string())),
        Err(e) => out.push(failed("wal_level", e.to_string())),
    }
    match catalog::can_replicate(&client).await {
        Ok(true) => out.push(ok("replication privilege", format!("{} may replicate", info.user))),
        Ok(false) => out.push(failed(
            "replication privilege",
            PgError::NoReplicationPrivilege { user: info.user.clone() }.to_string(),
        )),
        Err(e) => out.push(failed("replication privilege", e.to_string())),
    }
    match ReplicationConnection::connect(&info).await {
        Ok(mut conn) => {
            match conn.identify_system().await {
                Ok((_, lsn)) => {
                    out.push(ok("replication connection", format!("IDENTIFY_SYSTEM ok, server WAL at {lsn}")))
                }
                Err(e) => out.push(failed("replication connection", e.to_string())),
            }
            let _ = conn.simple_query("SELECT 1", "close").await;
        }
        Err(e) => out.push(failed(
            "replication connection",
            format!("{e}. Fix: allow `replication` connections for this user in pg_hba.conf"),
        )),
    }
    match catalog::slot_state(&client, input.slot).await {
        Ok(Some(state)) => match catalog::validate_slot(input.slot, &state, &info.dbname) {
            Ok(()) => {
                let confirmed = state.confirmed_flush.map_or("?".to_owned(), |l| l.to_string());
                out.push(ok("slot", format!("{} exists (pgoutput, confirmed up to {confirmed})", input.slot)));
            }
            Err(e) => out.push(failed("slot", e.to_string())),
        },
        Ok(None) => match input.checkpoint {
            Some(checkpoint) => {
                out.push(failed("slot", PgError::SlotDropped { slot: input.slot.to_owned(), checkpoint }.to_string()))
            }
            None => match catalog::slot_usage(&client).await {
                Ok((used, max)) if used < max => {
                    out.push(ok("slot", format!("{} will be created ({used} of {max} slots in use)", input.slot)))
                }
                Ok((_, max)) => out.push(failed("free slots", PgError::NoFreeSlot { max }.to_string())),
                Err(e) => out.push(failed("free slots", e.to_string())),
            },
        },
        Err(e) => out.push(failed("slot", e.to_string())),
    }
    match catalog::publication_exists(&client, input.publication).await {
        Ok(true) => {
            out.push(ok("publication", format!("{} exists", input.publication)));
            if let Ok(tables) = catalog::tables_outside_publication(&client, input.publication).await
                && !tables.is_empty()
            {
                out.push(warn(
                        "tables outside the publication",
                        format!(
                            "{}: their changes are not captured. Fix, if they should be: ALTER PUBLICATION {} ADD TABLE ...;",
                            tables.join(", "),
                            input.publication
                        ),
                    ));
            }
            if let Ok(tables) = catalog::published_tables_without_key(&client, input.publication).await
                && !tables.is_empty()
            {
                out.push(warn(
                        "tables without primary key",
                        format!(
                            "{}: their events have a null Kafka key, and their UPDATE/DELETE fail unless they have a replica identity. Fix: add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL",
                            tables.join(", ")
                        ),
                    ));
            }
        }
        Ok(false) if input.create_publication => out.push(ok(
            "publication",
            format!("{} will be created FOR ALL TABLES (needs a superuser)", input.publication),
        )),
        Ok(false) => out.push(failed(
            "publication",
            format!(
                "{} does not exist and source.create_publication is false. Fix: CREATE PUBLICATION {} FOR ALL TABLES;",
                input.publication, input.publication
            ),
        )),
        Err(e) => out.push(failed("publication", e.to_string())),
    }
    out
}
