//! Ordinary SQL against the source database (tokio-postgres): prerequisites, slot and publication
//! state, primary keys. Everything here runs on a short-lived normal connection, never on the
//! replication connection.

use tailgate_core::Lsn;
use tailgate_tls::TlsMode;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};
use tracing::warn;

use crate::error::PgError;
use crate::replication::{ConnInfo, quote_ident};
use crate::tls::PgTls;

/// Opens an ordinary SQL connection: the one way every tokio-postgres connection is made, with the
/// URL's TLS settings (the same as the replication connection's; see [`crate::tls`]).
pub async fn connect(info: &ConnInfo) -> Result<Client, PgError> {
    match info.tls.mode {
        TlsMode::Disable => connect_with(info, SslMode::Disable).await,
        // libpq's allow: plaintext, and TLS when the server refuses a plaintext login.
        TlsMode::Allow => match connect_with(info, SslMode::Disable).await {
            Err(e) if e.wants_tls() => connect_with(info, SslMode::Require).await,
            other => other,
        },
        TlsMode::Prefer => connect_with(info, SslMode::Prefer).await,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => connect_with(info, SslMode::Require).await,
    }
}

async fn connect_with(info: &ConnInfo, mode: SslMode) -> Result<Client, PgError> {
    let mut config = info.sql_config.clone();
    config.ssl_mode(mode);
    let client = if mode == SslMode::Disable {
        let (client, connection) = config.connect(NoTls).await.map_err(|e| classify_connect(info, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "catalog connection ended");
            }
        });
        client
    } else {
        let tls = PgTls { settings: info.tls.clone(), config: info.tls_config.clone() };
        let (client, connection) = config.connect(tls).await.map_err(|e| classify_connect(info, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "catalog connection ended");
            }
        });
        client
    };
    Ok(client)
}

fn classify_connect(info: &ConnInfo, e: tokio_postgres::Error) -> PgError {
    // A TLS failure: our own error, held by tokio-postgres as the source.
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<tailgate_tls::TlsError>() {
            return PgError::Tls(tls.clone());
        }
        // tokio-postgres's answer to an 'N' under SslMode::Require.
        if s.to_string().contains("server does not support TLS") {
            return PgError::TlsRefused { addr: info.addr(), mode: info.tls.mode_text.clone() };
        }
        source = s.source();
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        if code == "28000" && db.message().contains("no encryption") {
            return PgError::NeedsTls { user: info.user.clone(), message: db.message().to_owned() };
        }
        if code == "28P01" || code == "28000" {
            return PgError::Auth { user: info.user.clone(), message: db.message().to_owned() };
        }
        return PgError::Server { code: code.to_owned(), message: db.message().to_owned(), during: "connect" };
    }
    let source = match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>()) {
        Some(io) => std::io::Error::new(io.kind(), io.to_string()),
        None => std::io::Error::other(e.to_string()),
    };
    PgError::Connect { addr: info.addr(), source }
}

pub async fn wal_level(client: &Client) -> Result<String, PgError> {
    Ok(client.query_one("SHOW wal_level", &[]).await?.get(0))
}

/// Whether the current user may start replication (REPLICATION attribute or superuser).
pub async fn can_replicate(client: &Client) -> Result<bool, PgError> {
    let row =
        client.query_one("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[]).await?;
    Ok(row.get(0))
}

/// (slots in use, max_replication_slots)
pub async fn slot_usage(client: &Client) -> Result<(i64, i64), PgError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots), current_setting('max_replication_slots')::bigint",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

#[derive(Debug, Clone)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    /// PostgreSQL 13+: `lost` when the server removed WAL the slot needed.
    pub wal_status: Option<String>,
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotState {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        wal_status: r.get(4),
    }))
}

/// Checks that an existing slot can serve this connector.
pub fn validate_slot(slot: &str, state: &SlotState, dbname: &str) -> Result<(), PgError> {
    let unusable = |problem: String| Err(PgError::SlotUnusable { slot: slot.to_owned(), problem });
    if state.plugin.as_deref() != Some("pgoutput") {
        return unusable(format!("uses plugin {:?}, not pgoutput", state.plugin.as_deref().unwrap_or("(physical)")));
    }
    if state.database.as_deref() != Some(dbname) {
        return unusable(format!("belongs to database {:?}, not {dbname:?}", state.database.as_deref().unwrap_or("")));
    }
    if state.wal_status.as_deref() == Some("lost") {
        return unusable("has lost WAL it needed (wal_status = lost): changes are missing".to_owned());
    }
    if let Some(pid) = state.active_pid {
        return Err(PgError::SlotInUse { slot: slot.to_owned(), pid });
    }
    Ok(())
}

pub async fn publication_exists(client: &Client, publication: &str) -> Result<bool, PgError> {
    Ok(client.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication]).await?.is_some())
}

/// Tables with no primary key that the publication covers (their events have a null key, and
/// their updates and deletes fail on the server unless they have a replica identity).
pub async fn published_tables_without_key(client: &Client, publication: &str) -> Result<Vec<String>, PgError> {
    let rows = client
        .query(
            "SELECT p.schemaname || '.' || p.tablename FROM pg_publication_tables p \
             JOIN pg_class c ON c.relname = p.tablename \
             JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = p.schemaname \
             WHERE p.pubname = $1 AND NOT EXISTS \
               (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
             ORDER BY 1",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Primary-key column names of a relation, in key order.
pub async fn primary_key(client: &Client, rel_oid: u32) -> Result<Vec<String>, PgError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1::oid AND i.indisprimary ORDER BY k.ord",
            &[&rel_oid],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// User tables the publication does not cover: their changes never reach tailgate.
pub async fn tables_outside_publication(client: &Client, publication: &str) -> Result<Vec<String>, PgError> {
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
               AND NOT EXISTS (SELECT 1 FROM pg_publication_tables p \
                               WHERE p.pubname = $1 AND p.schemaname = n.nspname AND p.tablename = c.relname) \
             ORDER BY 1",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// WAL bytes written by the server that the slot has not confirmed.
pub async fn slot_lag_bytes(client: &Client, slot: &str) -> Result<Option<i64>, PgError> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// The comment that marks a publication as tailgate's own: only those are ever altered.
pub const MANAGED_COMMENT: &str = "managed by tailgate";

pub use tailgate_pipeline::TablePredicate;

#[derive(Debug, PartialEq, Eq)]
pub enum PublicationSync {
    Created,
    Updated {
        tables: usize,
    },
    Unchanged,
    /// Created by someone else: left alone; filters still apply to the events.
    NotManaged,
}

/// Creates the publication when missing, or brings a tailgate-managed one in line with `tables`
/// (`None`: FOR ALL TABLES). The change is atomic: DROP and CREATE in one transaction, which the
/// walsender sees from that commit on.
pub async fn sync_publication(
    client: &mut Client,
    publication: &str,
    tables: Option<&TablePredicate>,
    create: bool,
) -> Result<PublicationSync, PgError> {
    let existing = client
        .query_opt(
            "SELECT p.puballtables, coalesce(obj_description(p.oid, 'pg_publication'), '') FROM pg_publication p WHERE p.pubname = $1",
            &[&publication],
        )
        .await?;
    let desired: Option<Vec<String>> = match tables {
        None => None,
        Some(accept) => {
            let rows = client
                .query(
                    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
                     ORDER BY 1, 2",
                    &[],
                )
                .await?;
            Some(
                rows.iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                    .filter(|(s, t)| accept(&format!("{s}.{t}")))
                    .map(|(s, t)| format!("{}.{}", quote_ident(&s), quote_ident(&t)))
                    .collect(),
            )
        }
    };
    let outcome = match existing {
        None if !create => {
            return Err(PgError::PublicationCreate {
                publication: publication.to_owned(),
                reason: "it is missing and `source.create_publication` is false".into(),
            });
        }
        None => PublicationSync::Created,
        Some(row) => {
            let all_tables: bool = row.get(0);
            let comment: String = row.get(1);
            if comment != MANAGED_COMMENT {
                return Ok(PublicationSync::NotManaged);
            }
            let current: Vec<String> = client
                .query(
                    "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_publication_tables \
                     WHERE pubname = $1 ORDER BY 1",
                    &[&publication],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let same = match &desired {
                None => all_tables,
                Some(want) => {
                    !all_tables && {
                        let mut want = want.clone();
                        want.sort();
                        want == current
                    }
                }
            };
            if same {
                return Ok(PublicationSync::Unchanged);
            }
            PublicationSync::Updated { tables: desired.as_ref().map_or(0, Vec::len) }
        }
    };
    let name = quote_ident(publication);
    let target = match &desired {
        None => " FOR ALL TABLES".to_owned(),
        Some(list) if list.is_empty() => String::new(),
        Some(list) => format!(" FOR TABLE {}", list.join(", ")),
    };
    let tx = client.transaction().await?;
    if outcome != PublicationSync::Created {
        tx.batch_execute(&format!("DROP PUBLICATION {name}")).await?;
    }
    let create_sql = format!("CREATE PUBLICATION {name}{target}; COMMENT ON PUBLICATION {name} IS '{MANAGED_COMMENT}'");
    tx.batch_execute(&create_sql).await.map_err(|e| PgError::PublicationCreate {
        publication: publication.to_owned(),
        reason: e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned()),
    })?;
    tx.commit().await?;
    Ok(outcome)
}
