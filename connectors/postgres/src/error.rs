//! Errors of the PostgreSQL source, classified: transient ones are retried with backoff, definite
//! ones stop the connector with a message that names the cause and the fix.

use tailgate_core::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "cannot reach PostgreSQL at {addr}: {source}. Fix: check that the server runs and that `source.url` names the right host and port"
    )]
    Connect { addr: String, source: std::io::Error },

    #[error(
        "PostgreSQL rejected the login of user {user:?}: {message}. Fix: check the password in `source.url` and the server's pg_hba.conf"
    )]
    Auth { user: String, message: String },

    #[error(
        "PostgreSQL accepts user {user:?} only over TLS: {message}. Fix: add sslmode=require (or verify-full with \
         sslrootcert=<CA file>) to `source.url`"
    )]
    NeedsTls { user: String, message: String },

    #[error(
        "PostgreSQL at {addr} does not accept TLS connections, and `source.url` has sslmode={mode}. Fix: turn on ssl \
         in the server's postgresql.conf, or use sslmode=prefer to allow plaintext"
    )]
    TlsRefused { addr: String, mode: String },

    #[error(transparent)]
    Tls(#[from] tailgate_tls::TlsError),

    #[error(
        "PostgreSQL asks for authentication method {method}, which tailgate does not support. Fix: use scram-sha-256, md5, password or trust in pg_hba.conf"
    )]
    UnsupportedAuth { method: &'static str },

    #[error("`source.url` {detail}. Fix: use the form postgres://user:password@host:5432/database")]
    Url { detail: String },

    #[error(
        "wal_level is {found:?}; logical replication needs 'logical'. Fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
    )]
    WalLevel { found: String },

    #[error(
        "user {user:?} may not start replication. Fix: ALTER ROLE {user} WITH REPLICATION; (and allow it in pg_hba.conf)"
    )]
    NoReplicationPrivilege { user: String },

    #[error(
        "replication slot {slot:?} is in use by another process (pid {pid}). Fix: stop the other tailgate/consumer of this slot, or give this connector its own `source.slot`"
    )]
    SlotInUse { slot: String, pid: i32 },

    #[error(
        "replication slot {slot:?} does not exist, but the offsets file holds a checkpoint ({checkpoint}) for this connector: the slot was dropped, and changes made since may be lost. Fix: to accept the gap and start from now, run `tailgate offsets reset --config <file>` (it clears the checkpoint), then start again"
    )]
    SlotDropped { slot: String, checkpoint: Lsn },

    #[error(
        "replication slot {slot:?} {problem}. Fix: drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another `source.slot`"
    )]
    SlotUnusable { slot: String, problem: String },

    #[error(
        "no free replication slot (max_replication_slots = {max}, all used). Fix: raise max_replication_slots and restart PostgreSQL, or drop an unused slot"
    )]
    NoFreeSlot { max: i64 },

    #[error(
        "publication {publication:?} does not exist and could not be created: {reason}. Fix: as a superuser run CREATE PUBLICATION {publication} FOR ALL TABLES; (or for the tables to capture)"
    )]
    PublicationCreate { publication: String, reason: String },

    #[error("PostgreSQL error {code} during {during}: {message}")]
    Server { code: String, message: String, during: &'static str },

    #[error("replication protocol: {0}")]
    Protocol(String),

    #[error("connection to PostgreSQL lost: {0}")]
    ConnectionLost(std::io::Error),

    #[error(
        "cannot decode the replication stream: {0}. This is a bug in tailgate; please report it with the PostgreSQL version"
    )]
    Decode(#[from] crate::pgoutput::DecodeError),

    /// Never carries the value itself: errors reach logs and `/health`, and row data must not.
    #[error(
        "column {table}.{column}: a {form} value of {bytes} bytes does not parse as its type (oid {oid}). This is a \
         bug in tailgate; please report it with the column's type. To get past it, exclude the column \
         (filter.exclude_columns)"
    )]
    Value { table: String, column: String, oid: u32, form: &'static str, bytes: usize },

    #[error("change for unknown relation {0}: the server sent no Relation message for it first")]
    UnknownRelation(u32),

    #[error("SQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
}

impl PgError {
    /// Worth retrying with backoff (the server or network may come back).
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { .. } | PgError::ConnectionLost(_) => true,
            PgError::Tls(e) => e.is_transient(),
            // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now, 53300 too_many_connections
            PgError::Server { code, .. } => transient_code(code),
            // A terminated backend (57P01) reaches a tokio-postgres connection as a db error or as a
            // closed connection, depending on timing: both are transient.
            PgError::Sql(e) => transient_sql(e),
            _ => false,
        }
    }
}

impl PgError {
    /// A login refused because it was not over TLS (pg_hba `hostnossl … reject` or no `host` line):
    /// what `sslmode=allow` retries with TLS.
    pub(crate) fn wants_tls(&self) -> bool {
        matches!(self, PgError::NeedsTls { .. })
    }
}

/// Whether an SQL error means the connection or the server went away (retry), not a bad request.
pub(crate) fn transient_sql(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.as_db_error().is_none_or(|db| transient_code(db.code().code()))
}

/// SQLSTATEs that mean "the server or the connection went away", not "the request is wrong":
/// 57P01 admin_shutdown (a terminated backend), 57P02 crash_shutdown, 57P03 cannot_connect_now,
/// 53300 too_many_connections, and class 08 (connection exceptions).
fn transient_code(code: &str) -> bool {
    matches!(code, "57P01" | "57P02" | "57P03" | "53300") || code.starts_with("08")
}
