//! Errors of the MySQL/MariaDB source, classified: transient ones are retried with backoff, definite
//! ones stop the connector with a message that names the cause and the fix.

use crate::binlog::DecodeError;
use crate::schema::SchemaError;

#[derive(Debug, thiserror::Error)]
pub enum MyError {
    #[error("`source.url` {detail}. Fix: use the form mysql://user:password@host:3306/database")]
    Url { detail: String },

    #[error(
        "cannot reach MySQL at {addr}: {source}. Fix: check that the server runs and that `source.url` names the right host and port"
    )]
    Connect { addr: String, source: std::io::Error },

    #[error("MySQL rejected the login of user {user:?}: {message}. Fix: check the user and password in `source.url`")]
    Auth { user: String, message: String },

    #[error(
        "MySQL asks for authentication method {plugin}, which tailgate does not support. Fix: give the user \
         caching_sha2_password or mysql_native_password (ALTER USER ... IDENTIFIED WITH caching_sha2_password BY '...')"
    )]
    UnsupportedAuth { plugin: String },

    #[error("{setting} is {found}; change data capture needs {needed}. Fix: {fix}")]
    Setting { setting: &'static str, found: String, needed: &'static str, fix: String },

    #[error(
        "user {user:?} lacks the {privilege} privilege. Fix: GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO {user}"
    )]
    Privilege { user: String, privilege: &'static str },

    #[error(
        "the position tailgate stored ({position}) is no longer on the server: {message}. The binlog was purged \
         while tailgate was stopped, so changes made in between cannot be read. Fix: to accept the gap and start \
         from now, run `tailgate offsets reset --config <file>`; or set snapshot = \"when_needed\" to take a new \
         snapshot; raise binlog_expire_logs_seconds so it does not happen again"
    )]
    PositionPurged { position: String, message: String },

    #[error(
        "server {server} has not executed everything the stored checkpoint ({position}) says was delivered: \
         {message}. Streaming from it could skip transactions (a replica promoted before it caught up, or a \
         diverged history). Fix: wait until it has replicated those transactions, or point source.url at the \
         server that has them"
    )]
    ServerBehind { server: String, position: String, message: String },

    #[error(
        "server_id {server_id} is already used by another replica of this server ({message}). \
         Fix: give every connector its own `source.server_id`, or stop the other one"
    )]
    ServerIdInUse { server_id: u32, message: String },

    #[error(
        "MySQL at {addr} does not offer TLS, and `source.url` has ssl-mode={mode}. Fix: configure ssl_cert/ssl_key on \
         the server, or use ssl-mode=PREFERRED to allow plaintext"
    )]
    TlsRefused { addr: String, mode: String },

    #[error(
        "MySQL needs the password of user {user:?} for caching_sha2_password's full authentication, and the \
         connection has no TLS: it would have to be RSA-encrypted with a key the server sends, which a man in the \
         middle could replace. Fix: use TLS (ssl-mode=REQUIRED or VERIFY_IDENTITY), or pin the server's key with \
         server-public-key-path=<PEM file> in `source.url`, or accept the risk with allow-public-key-retrieval=true"
    )]
    RsaKeyNeeded { user: String },

    #[error(transparent)]
    Tls(#[from] tailgate_tls::TlsError),

    #[error("MySQL error {code} ({state}) during {during}: {message}")]
    Server { code: u16, state: String, message: String, during: &'static str },

    #[error("replication protocol: {0}")]
    Protocol(String),

    #[error("connection to MySQL lost: {0}")]
    ConnectionLost(std::io::Error),

    #[error("no event from MySQL for {0:?} (heartbeats included): the connection is dead")]
    Silent(std::time::Duration),

    #[error(
        "cannot decode binlog event at {file}:{pos}: {source}. This is a bug in tailgate (or a corrupt binlog); please \
         report it with the server version. `mysqlbinlog --start-position={pos} {file}` shows the event"
    )]
    Decode { file: String, pos: u64, source: DecodeError },

    #[error(transparent)]
    Schema(#[from] SchemaError),

    #[error("column {}.{} at {}:{}: {}{}", .0.table, .0.column, .0.file, .0.pos, .0.source, .0.hint)]
    Value(Box<ValueFailure>),

    #[error("{what} at {file}:{pos} is not supported: {fix}")]
    Unsupported { what: String, file: String, pos: u64, fix: &'static str },

    #[error(
        "the server logged an incident at {file}:{pos} (code {code}: {message}): events may be missing from the binlog \
         there, so a consistent stream is not guaranteed. Fix: inspect the server, then take a new snapshot"
    )]
    Incident { file: String, pos: u64, code: u16, message: String },

    #[error(
        "table {table} was created or rebuilt after the snapshot opened; the snapshot goes on from a fresh read view"
    )]
    SnapshotTableChanged { table: String },

    #[error("SQL: {0}")]
    Sql(#[from] mysql_async::Error),
}

/// A column value that could not be decoded, and where.
#[derive(Debug)]
pub struct ValueFailure {
    pub table: String,
    pub column: String,
    pub file: String,
    pub pos: u64,
    pub source: DecodeError,
    /// The fix, when the error does not carry one itself.
    pub hint: &'static str,
}

impl MyError {
    /// Worth retrying with backoff: the server or the network may come back.
    pub fn is_transient(&self) -> bool {
        match self {
            MyError::Connect { .. }
            | MyError::ConnectionLost(_)
            | MyError::Silent(_)
            | MyError::SnapshotTableChanged { .. } => true,
            MyError::Server { code, .. } => transient_code(*code),
            MyError::Tls(e) => e.is_transient(),
            MyError::Sql(e) => {
                matches!(e, mysql_async::Error::Io(_) | mysql_async::Error::Driver(_))
                    || matches!(e, mysql_async::Error::Server(s) if matches!(s.code, 1040 | 1053 | 1927 | 2006 | 2013))
            }
            _ => false,
        }
    }

    /// A problem with the server's setup or the user's rights (exit code 3).
    pub fn is_prerequisite(&self) -> bool {
        matches!(
            self,
            MyError::Auth { .. }
                | MyError::UnsupportedAuth { .. }
                | MyError::Setting { .. }
                | MyError::Privilege { .. }
                | MyError::PositionPurged { .. }
                | MyError::ServerBehind { .. }
                | MyError::ServerIdInUse { .. }
                | MyError::TlsRefused { .. }
                | MyError::RsaKeyNeeded { .. }
        ) || matches!(self, MyError::Tls(e) if !e.is_transient())
    }
}

/// Server error codes worth retrying: 1040 too many connections, 1053 server shutdown in progress,
/// 2013 lost connection, 1927 (MariaDB) connection killed, 1317 query interrupted, 3169 session
/// killed.
pub(crate) fn transient_code(code: u16) -> bool {
    matches!(code, 1040 | 1053 | 1317 | 1927 | 2006 | 2013 | 3169)
}
