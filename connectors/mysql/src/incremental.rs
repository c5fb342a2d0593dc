//! Incremental snapshots on MySQL and MariaDB: reading a chunk and its watermarks, read-only (no
//! signalling table, nothing written). The engine-agnostic part (the window, the drops, the
//! progress) is `tailgate_pipeline::incremental`, whose module doc states the argument; here is
//! how each flavor places a chunk's read snapshot S against the stream.
//!
//! ```text
//!  MySQL (gtid_mode = ON)                         MariaDB
//!  SELECT @@GLOBAL.gtid_executed ── G (guard)     START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY
//!  START TRANSACTION WITH CONSISTENT SNAPSHOT,    SHOW STATUS LIKE 'binlog_snapshot_%' ── P (guard, H)
//!        READ ONLY                      ── S      SELECT … WHERE key > after … ORDER BY key LIMIT n
//!  SELECT … WHERE key > after … ORDER BY key      COMMIT
//!        LIMIT n
//!  SHOW BINARY LOG STATUS               ── H
//!  COMMIT
//! ```
//!
//! A chunk row of key k holds k's state in S and is emitted at E. Two things make it safe:
//!
//! **Nothing the stream emitted before the read is newer than S (the guard).**
//! - *MySQL*: every GTID the stream has emitted (its set, which starts from the checkpoint's) must be
//!   in G, `gtid_executed` read before S opens. MySQL adds a GTID to `gtid_executed` only after the
//!   transaction committed in the engine, so S sees every transaction in G, hence every one emitted.
//!   The stream may run ahead of G (the dump thread sends a transaction once it is in the binlog,
//!   before the engine commit): G is read again a few times, 1 ms apart, then the chunk waits and is
//!   read again.
//! - *MariaDB*: P, the snapshot's own binlog position, is exact by the server's contract: S sees
//!   precisely the transactions that end at or before P. The last commit the stream emitted must be
//!   at or before P; otherwise the chunk is dropped and read again a moment later.
//!
//! **Nothing older than S follows the chunk (the high watermark H; E is "the stream read the binlog
//! up to H").**
//! - *MySQL*: H is the end of the binlog read after the chunk. A transaction is written to the binlog
//!   before it commits in the engine, so every transaction S sees ends at or before H. (The executed
//!   GTID set read after the chunk would nearly do, but a transaction is visible a moment before
//!   its GTID joins the set, so the binlog end is the exact bound.)
//! - *MariaDB*: H = P, for the reason above.
//!
//! The stream's read position ([`crate::stream::StreamState`]) advances with every event it handles,
//! heartbeats and the events that open a binlog file included, and is compared between transactions
//! only, so "read up to H" means "every transaction ending at or before H was emitted". On an idle
//! server the stream already stands at the end of the binlog, so E comes at once.
//!
//! MySQL without GTIDs is refused: there is no lock-free, read-only way to tell which transactions a
//! snapshot sees (Debezium's read-only variant needs GTIDs too). InnoDB tables only: a
//! non-transactional table's rows change before their events are logged.

use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row};
use tailgate_core::{BinlogFile, MysqlGtidSet};
use tailgate_pipeline::{Chunk, ChunkRequest, Rules};

use crate::catalog::{self, Flavor, ServerFacts};
use crate::error::MyError;
use crate::replication::ConnInfo;
use crate::snapshot::{self, SnapTable};

/// A place in one server's binlog, ordered by file (by its number) and then offset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BinlogPos {
    pub(crate) file: BinlogFile,
    pub(crate) pos: u64,
}

impl BinlogPos {
    pub(crate) fn new(file: &str, pos: u64) -> BinlogPos {
        BinlogPos { file: BinlogFile(file.to_owned()), pos }
    }
}

impl std::fmt::Display for BinlogPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

/// What the stream emitted before the chunk is read, for the guard.
#[derive(Debug)]
pub(crate) enum Emitted<'a> {
    /// MySQL: every GTID emitted (from the checkpoint's set on); `None` when the stream does not
    /// track GTIDs (a checkpoint stored without a GTID set).
    Gtids(Option<&'a MysqlGtidSet>),
    /// MariaDB: the end of the last transaction (or progress marker) emitted.
    Position(Option<BinlogPos>),
}

/// The guard's verdict on MySQL: whether S, opened after `executed` was read, sees every
/// transaction the stream emitted.
pub(crate) fn mysql_guard(emitted: &MysqlGtidSet, executed: &MysqlGtidSet) -> bool {
    emitted.is_subset(executed)
}

/// The guard's verdict on MariaDB: whether S, at binlog position `snapshot`, sees every
/// transaction the stream emitted (the last of them ending at `emitted`).
pub(crate) fn mariadb_guard(emitted: &BinlogPos, snapshot: &BinlogPos) -> bool {
    emitted <= snapshot
}

/// E: whether the stream, between transactions with the binlog read up to `read`, emitted every
/// transaction that ends at or before `high`.
pub(crate) fn passed(read: &BinlogPos, high: &BinlogPos) -> bool {
    read >= high
}

/// Why incremental snapshots cannot run on this server, if they cannot.
pub(crate) fn unsupported(facts: &ServerFacts) -> Option<String> {
    (facts.flavor == Flavor::Mysql && !facts.gtid_mode).then(|| {
        "incremental snapshots on MySQL need gtid_mode = ON (without GTIDs a read-only connector cannot tell which \
         transactions a chunk's snapshot sees). Fix: enable GTIDs: SET PERSIST enforce_gtid_consistency = ON, then \
         SET PERSIST gtid_mode step by step (OFF_PERMISSIVE, ON_PERMISSIVE, ON), or gtid_mode = ON and \
         enforce_gtid_consistency = ON in my.cnf and a restart"
            .to_owned()
    })
}

/// Why a `--where` predicate is refused before it reaches the server, if it is (see
/// [`tailgate_pipeline::incremental::filter_refused`]; MySQL comments open with `--`, `#`, `/*`).
pub(crate) fn filter_refused(filter: &str) -> Option<String> {
    tailgate_pipeline::incremental::filter_refused(filter, &["--", "#", "/*"])
}

/// What reading a chunk gave.
pub(crate) enum ChunkRead {
    /// The rows and the high watermark.
    Rows { chunk: Chunk, high: BinlogPos },
    /// The read's snapshot could not be placed against the stream: read again shortly.
    Retry { why: String },
    /// The snapshot cannot go on (the table is gone, the filter fails, MySQL without GTIDs).
    Failed(String),
}

/// How many times the MySQL guard reads `gtid_executed` before the chunk waits.
const GUARD_READS: u32 = 4;
/// Between two reads of `gtid_executed`.
const GUARD_PAUSE: Duration = Duration::from_millis(1);

/// The connection chunks are read on (the server the stream reads), and the tables' descriptions.
pub(crate) struct ChunkReader {
    conn: Conn,
    facts: ServerFacts,
    /// The URL's database: only its tables are captured.
    database: Option<String>,
    tables: Vec<(String, Arc<SnapTable>)>,
    /// The stream's DDL count when the descriptions were taken: a DDL may have changed columns.
    ddl_seen: u64,
}

impl ChunkReader {
    /// Opens a session as the initial snapshot's (`utf8mb4`, UTC, repeatable read) on `info`.
    pub(crate) async fn connect(info: &ConnInfo, facts: &ServerFacts) -> Result<ChunkReader, MyError> {
        let conn = snapshot::open_session(info).await?;
        Ok(ChunkReader { conn, facts: facts.clone(), database: info.database.clone(), tables: Vec::new(), ddl_seen: 0 })
    }

    /// Forgets the table descriptions when the stream saw DDL since they were taken.
    pub(crate) fn ddl(&mut self, count: u64) {
        if count != self.ddl_seen {
            self.tables.clear();
            self.ddl_seen = count;
        }
    }

    /// Forgets a table's description (a new request describes it afresh).
    pub(crate) fn forget(&mut self, table: &str) {
        self.tables.retain(|(name, _)| name != table);
    }

    /// Describes `table` (`database.table`) for chunk reads, or says why it cannot be snapshotted.
    pub(crate) async fn describe(
        &mut self,
        table: &str,
        rules: &Rules,
    ) -> Result<Result<Arc<SnapTable>, String>, MyError> {
        if let Some((_, known)) = self.tables.iter().find(|(name, _)| name == table) {
            return Ok(Ok(known.clone()));
        }
        let Some((db, name)) = table.split_once('.') else {
            return Ok(Err(format!("{table:?}: name the table as database.table")));
        };
        if catalog::SYSTEM_DATABASES.contains(&db) {
            return Ok(Err(format!(
                "table {table} belongs to the server's own database {db}, which is never captured"
            )));
        }
        if let Some(only) = self.database.as_deref().filter(|only| *only != db) {
            return Ok(Err(format!(
                "table {table} is outside database {only}, the only one source.url captures: its changes do not stream. \
                 Fix: name no database in source.url and select tables with [filter] include_tables"
            )));
        }
        let found: Option<(String, Option<u64>)> = self
            .conn
            .exec_first(
                "SELECT TABLE_TYPE, TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (db, name),
            )
            .await?;
        let estimate = match found {
            None => return Ok(Err(format!("table {table} does not exist"))),
            Some((kind, _)) if kind != "BASE TABLE" => {
                return Ok(Err(format!("{table} is a {}, not a table", kind.to_ascii_lowercase())));
            }
            Some((_, rows)) => rows.map_or(-1, |r| r.min(i64::MAX as u64) as i64),
        };
        if !rules.table_included(table) {
            return Ok(Err(format!(
                "table {table} is not captured: add it to [filter] include_tables (and reload) first, so that its changes stream"
            )));
        }
        let key_columns = rules.key_columns(table);
        let described =
            match snapshot::describe_table(&mut self.conn, db.to_owned(), name.to_owned(), estimate, key_columns)
                .await?
            {
                Some(described) => described,
                // Dropped since the lookup above.
                None => return Ok(Err(format!("table {table} does not exist"))),
            };
        if let Err(why) = key_usable(&described, key_columns) {
            return Ok(Err(why));
        }
        let described = Arc::new(described);
        self.tables.push((table.to_owned(), described.clone()));
        Ok(Ok(described))
    }

    /// Checks that `filter` is a valid predicate on `table`: prepared (so parsed and its names
    /// resolved) but not run.
    pub(crate) async fn check_filter(
        &mut self,
        table: &SnapTable,
        filter: &str,
    ) -> Result<Result<(), String>, MyError> {
        if let Some(why) = filter_refused(filter) {
            return Ok(Err(why));
        }
        let query = format!("SELECT 1 FROM {} WHERE ({filter})", table.sql_name);
        match self.conn.prep(query).await {
            Ok(statement) => {
                self.conn.close(statement).await?;
                Ok(Ok(()))
            }
            Err(mysql_async::Error::Server(e)) => {
                Ok(Err(format!("--where {filter:?} on {}: {}", table.qualified, e.message)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every user base table (within the URL's database), as `database.table`.
    pub(crate) async fn user_tables(&mut self) -> Result<Vec<String>, MyError> {
        let system = catalog::SYSTEM_DATABASES.map(|d| format!("'{d}'")).join(", ");
        let rows: Vec<(String, String)> = self
            .conn
            .query(format!(
                "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES \
                 WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN ({system}) ORDER BY TABLE_SCHEMA, TABLE_NAME"
            ))
            .await?;
        Ok(rows
            .into_iter()
            .filter(|(db, _)| self.database.as_ref().is_none_or(|only| only == db))
            .map(|(db, name)| format!("{db}.{name}"))
            .collect())
    }

    /// Reads the chunk `request` asks for, after the guard on what the stream `emitted` (see the
    /// module doc).
    pub(crate) async fn read(
        &mut self,
        request: &ChunkRequest,
        rules: &Rules,
        emitted: Emitted<'_>,
    ) -> Result<ChunkRead, MyError> {
        if let Some(why) = unsupported(&self.facts) {
            return Ok(ChunkRead::Failed(why));
        }
        let table = match self.describe(&request.table, rules).await? {
            Ok(table) => table,
            Err(why) => return Ok(ChunkRead::Failed(why)),
        };
        let read = match emitted {
            Emitted::Gtids(emitted) => {
                let Some(emitted) = emitted else {
                    return Ok(ChunkRead::Failed(
                        "the stream does not track GTIDs (its checkpoint was stored without a GTID set), so a chunk \
                         cannot be placed against it. Fix: restart from a checkpoint with GTIDs (`tailgate offsets \
                         reset --to-end` starts one, skipping what was not yet streamed)"
                            .into(),
                    ));
                };
                self.read_mysql(&table, request, emitted).await
            }
            Emitted::Position(emitted) => self.read_mariadb(&table, request, emitted).await,
        };
        match read {
            // The table changed under the description: describe it again and read again.
            Err(Failure::Changed(why)) => {
                self.forget(&request.table);
                Ok(ChunkRead::Retry { why })
            }
            Err(Failure::Refused(why)) => Ok(ChunkRead::Failed(why)),
            Err(Failure::Error(e)) => Err(e),
            Ok(read) => Ok(read),
        }
    }

    async fn read_mysql(
        &mut self,
        table: &SnapTable,
        request: &ChunkRequest,
        emitted: &MysqlGtidSet,
    ) -> Result<ChunkRead, Failure> {
        let mut placed = false;
        for attempt in 0..GUARD_READS {
            if attempt > 0 {
                tokio::time::sleep(GUARD_PAUSE).await;
            }
            let executed: String = self.conn.query_first("SELECT @@GLOBAL.gtid_executed").await?.unwrap_or_default();
            let executed: MysqlGtidSet =
                executed.parse().map_err(|e| MyError::Protocol(format!("server's gtid_executed: {e}")))?;
            if mysql_guard(emitted, &executed) {
                placed = true;
                break;
            }
        }
        if !placed {
            return Ok(ChunkRead::Retry {
                why: "the stream emitted a transaction not yet in gtid_executed (committing in the engine)".into(),
            });
        }
        self.conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY").await?;
        let in_snapshot = async {
            let chunk = self.select(table, request).await?;
            let (file, pos) = catalog::binlog_end(&mut self.conn, &self.facts).await?;
            Ok(ChunkRead::Rows { chunk, high: BinlogPos { file, pos } })
        }
        .await;
        self.end(in_snapshot).await
    }

    async fn read_mariadb(
        &mut self,
        table: &SnapTable,
        request: &ChunkRequest,
        emitted: Option<BinlogPos>,
    ) -> Result<ChunkRead, Failure> {
        self.conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY").await?;
        let in_snapshot = async {
            let status: Vec<(String, String)> = self.conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await?;
            let get = |name: &str| status.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
            let (Some(file), Some(pos)) = (get("binlog_snapshot_file"), get("binlog_snapshot_position")) else {
                return Err(MyError::Protocol("MariaDB did not report binlog_snapshot_file/position".into()).into());
            };
            let pos: u64 = pos.parse().map_err(|_| MyError::Protocol(format!("binlog_snapshot_position {pos:?}")))?;
            let snapshot = BinlogPos::new(file, pos);
            if let Some(emitted) = emitted
                && !mariadb_guard(&emitted, &snapshot)
            {
                return Ok(ChunkRead::Retry {
                    why: format!("the stream emitted up to {emitted}, after the snapshot's position {snapshot}"),
                });
            }
            let chunk = self.select(table, request).await?;
            Ok(ChunkRead::Rows { chunk, high: snapshot })
        }
        .await;
        self.end(in_snapshot).await
    }

    /// Ends the read-only transaction (either way changes nothing) and passes on what it gave.
    async fn end(&mut self, read: Result<ChunkRead, Failure>) -> Result<ChunkRead, Failure> {
        let ended = self.conn.query_drop("ROLLBACK").await;
        let read = read?;
        ended?;
        Ok(read)
    }

    /// The chunk's rows, in the open snapshot.
    async fn select(&mut self, table: &SnapTable, request: &ChunkRequest) -> Result<Chunk, Failure> {
        let mut conditions = Vec::new();
        if let Some(after) = &request.after {
            let condition = snapshot::after_condition(table, after).ok_or_else(|| {
                Failure::Refused(format!(
                    "the progress stored for {} is not a key of the table ({after:?}); cancel the snapshot and \
                     request it again",
                    table.qualified
                ))
            })?;
            conditions.push(format!("({condition})"));
        }
        if let Some(filter) = &request.filter {
            // Checked when the snapshot was requested; checked again, as it comes from the checkpoint.
            if let Some(why) = filter_refused(filter) {
                return Err(Failure::Refused(why));
            }
            conditions.push(format!("({filter})"));
        }
        let filter = if conditions.is_empty() { String::new() } else { format!(" WHERE {}", conditions.join(" AND ")) };
        let order: Vec<String> =
            table.keyset.iter().map(|&(i, _)| snapshot::quote_ident(&table.schema.columns[i].name)).collect();
        let query = format!(
            "SELECT {} FROM {}{filter} ORDER BY {} LIMIT {}",
            table.select_list,
            table.sql_name,
            order.join(", "),
            request.limit
        );
        let rows: Vec<Row> = self.conn.query(query).await.map_err(|e| match e {
            // 1054 unknown column, 1412 table definition changed since the snapshot opened.
            mysql_async::Error::Server(s) if matches!(s.code, 1054 | 1412) => {
                Failure::Changed(format!("{} changed: {}", table.qualified, s.message))
            }
            mysql_async::Error::Server(s) if !crate::error::transient_code(s.code) => {
                Failure::Refused(format!("reading {}: {}", table.qualified, s.message))
            }
            other => Failure::Error(other.into()),
        })?;
        let last_key = rows.last().map(|row| {
            table
                .keyset
                .iter()
                .map(|&(i, form)| match row.as_ref(i) {
                    Some(mysql_async::Value::Bytes(b)) => Some(form.store(b)),
                    _ => None,
                })
                .collect()
        });
        let mut values = Vec::with_capacity(rows.len());
        for row in rows {
            // A value the converters refuse fails this snapshot, not the stream.
            values.push(snapshot::convert_row(row, table).map_err(|e| Failure::Refused(e.to_string()))?);
        }
        let key = table.keyset.iter().map(|&(i, _)| i).collect();
        Ok(Chunk { schema: table.schema.clone(), key, rows: values, last_key })
    }
}

/// Why a chunk read did not give rows.
enum Failure {
    /// The table changed under its description: describe it again and read again.
    Changed(String),
    /// The snapshot cannot go on.
    Refused(String),
    Error(MyError),
}

impl From<MyError> for Failure {
    fn from(e: MyError) -> Self {
        Failure::Error(e)
    }
}

impl From<mysql_async::Error> for Failure {
    fn from(e: mysql_async::Error) -> Self {
        Failure::Error(e.into())
    }
}

/// Whether chunks can page `table` by its key (`key_columns`: the columns named for it in
/// `[filter.key_columns]`): a key exists, every named column exists, pages can resume on its types,
/// and it is never NULL.
fn key_usable(table: &SnapTable, key_columns: Option<&[String]>) -> Result<(), String> {
    let name = &table.qualified;
    if table.key.is_empty() && key_columns.is_none() {
        return Err(format!(
            "table {name} has no primary key: name a unique key in [filter.key_columns] \"{name}\" = [\"col\", …] to snapshot it incrementally"
        ));
    }
    if let Some(named) = key_columns
        && table.key.len() != named.len()
    {
        let missing: Vec<&str> =
            named.iter().filter(|n| !table.columns.iter().any(|c| &c.name == *n)).map(String::as_str).collect();
        return Err(format!(
            "[filter.key_columns] \"{name}\" names columns the table does not have: {}",
            missing.join(", ")
        ));
    }
    if table.keyset.is_empty() {
        let names: Vec<&str> = table.key.iter().map(|&i| table.columns[i].name.as_str()).collect();
        return Err(format!(
            "the key of {name} ({}) has a type chunks cannot be ordered and resumed by (FLOAT, DOUBLE, ENUM, SET, \
             BIT, JSON, spatial): name other unique columns in [filter.key_columns] \"{name}\"",
            names.join(", ")
        ));
    }
    if let Some(&i) = table.key.iter().find(|&&i| table.columns[i].nullable) {
        return Err(format!(
            "[filter.key_columns] \"{name}\": column {} allows NULL; name NOT NULL columns that identify a row",
            table.columns[i].name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tailgate_core::{ColumnSchema, TableId, TableSchema};

    use super::*;
    use crate::schema::CatalogColumn;
    use crate::snapshot::KeyForm;

    fn pos(file: &str, pos: u64) -> BinlogPos {
        BinlogPos::new(file, pos)
    }

    #[test]
    fn binlog_positions_order_by_file_number_then_offset() {
        assert!(pos("mysql-bin.000009", 900) < pos("mysql-bin.000010", 4));
        assert!(pos("mysql-bin.999999", 900) < pos("mysql-bin.1000000", 4), "a file number past six digits");
        assert!(pos("mysql-bin.000010", 4) < pos("mysql-bin.000010", 5));
        assert_eq!(pos("binlog.000002", 7).to_string(), "binlog.000002:7");
    }

    #[test]
    fn the_window_ends_once_the_stream_read_the_binlog_to_the_high_watermark() {
        let high = pos("binlog.000003", 5000);
        assert!(!passed(&pos("binlog.000003", 4999), &high));
        assert!(passed(&pos("binlog.000003", 5000), &high), "an idle stream stands at the binlog's end");
        assert!(passed(&pos("binlog.000004", 4), &high), "a later file");
        assert!(!passed(&pos("binlog.000002", 90_000), &high), "an earlier file, however far into it");
    }

    #[test]
    fn mariadb_guard_accepts_a_snapshot_at_or_after_what_was_emitted() {
        let snapshot = pos("mysql-bin.000024", 385);
        assert!(mariadb_guard(&pos("mysql-bin.000024", 385), &snapshot), "idle: equal");
        assert!(mariadb_guard(&pos("mysql-bin.000024", 4), &snapshot), "a rotation marker before it");
        assert!(mariadb_guard(&pos("mysql-bin.000023", 228_500_422), &snapshot));
        assert!(!mariadb_guard(&pos("mysql-bin.000024", 900), &snapshot), "the stream emitted a transaction S misses");
    }

    #[test]
    fn mysql_guard_needs_every_emitted_gtid_executed() {
        let uuid = "1b8060a0-eca6-11f1-9bf7-02fc00000001";
        let set = |text: String| -> MysqlGtidSet { text.parse().unwrap() };
        let executed = set(format!("{uuid}:1-100"));
        assert!(mysql_guard(&set(format!("{uuid}:1-100")), &executed));
        assert!(mysql_guard(&set(format!("{uuid}:1-99")), &executed));
        assert!(
            !mysql_guard(&set(format!("{uuid}:1-101")), &executed),
            "101 streamed, not yet committed in the engine"
        );
    }

    #[test]
    fn mysql_without_gtids_is_refused_naming_the_fix() {
        let facts = |flavor, gtid_mode| ServerFacts {
            flavor,
            version: String::new(),
            server_id: 1,
            log_bin: true,
            binlog_format: "ROW".into(),
            binlog_row_image: "FULL".into(),
            binlog_row_metadata: "FULL".into(),
            binlog_row_value_options: String::new(),
            binlog_checksum: "CRC32".into(),
            gtid_mode,
            binlog_retention_s: 0,
            user: "cdc".into(),
        };
        let why = unsupported(&facts(Flavor::Mysql, false)).unwrap();
        assert!(why.contains("gtid_mode = ON") && why.contains("Fix:"), "{why}");
        assert_eq!(unsupported(&facts(Flavor::Mysql, true)), None);
        assert_eq!(unsupported(&facts(Flavor::Mariadb, false)), None, "MariaDB always has its binlog position");
    }

    #[test]
    fn predicates_stay_one_expression() {
        assert_eq!(filter_refused("id % 2 = 0 AND name <> 'x'"), None);
        for bad in ["1; DELETE FROM t", "1) -- ", "1 # x", "1 /* x */"] {
            assert!(filter_refused(bad).is_some(), "{bad}");
        }
    }

    fn column(name: &str, nullable: bool) -> CatalogColumn {
        CatalogColumn {
            name: name.into(),
            data_type: "int".into(),
            column_type: "int".into(),
            charset: None,
            primary_key: false,
            nullable,
            precision: None,
            scale: None,
            fsp: None,
            octet_length: None,
        }
    }

    fn table(columns: Vec<CatalogColumn>, key: Vec<usize>, pageable: bool) -> SnapTable {
        SnapTable {
            qualified: "shop.t".into(),
            sql_name: "`shop`.`t`".into(),
            schema: Arc::new(TableSchema {
                id: TableId { schema: "shop".into(), table: "t".into() },
                columns: columns.iter().map(|c| ColumnSchema { name: c.name.clone(), key: false }).collect(),
            }),
            keyset: if pageable { key.iter().map(|&i| (i, KeyForm::Number)).collect() } else { Vec::new() },
            key,
            columns,
            codecs: Vec::new(),
            select_list: String::new(),
            estimate: 0,
        }
    }

    #[test]
    fn keys_are_checked_before_a_snapshot_is_queued() {
        let cols = || vec![column("id", false), column("code", true)];
        assert_eq!(key_usable(&table(cols(), vec![0], true), None), Ok(()));
        let why = key_usable(&table(cols(), vec![], false), None).unwrap_err();
        assert!(why.contains("no primary key") && why.contains("[filter.key_columns]"), "{why}");
        let named = ["code".to_owned()];
        let why = key_usable(&table(cols(), vec![1], true), Some(&named)).unwrap_err();
        assert!(why.contains("allows NULL"), "{why}");
        let named = ["nope".to_owned()];
        let why = key_usable(&table(cols(), vec![], false), Some(&named)).unwrap_err();
        assert!(why.contains("nope"), "{why}");
        let why = key_usable(&table(cols(), vec![0], false), None).unwrap_err();
        assert!(why.contains("cannot be ordered"), "{why}");
    }
}
