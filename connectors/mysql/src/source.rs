//! The MySQL/MariaDB source's driver: the binlog connection, snapshots, reconnects; the decoding
//! without I/O lives in [`crate::stream`].
//!
//! ```text
//!  replication conn ──event bytes──▶ binlog::event::parse ──▶ StreamState ──Batch──▶ pipeline
//!        │                                                      │  TABLE_MAP ─▶ schema (FULL metadata,
//!        │                                                      │               or information_schema)
//!        └── COM_BINLOG_DUMP(_GTID) from the last commit handed over (GTIDs when known)
//! ```
//!
//! Progress rules:
//! - A transaction's events are followed by `Item::Commit(file, end position, GTID set)`: the end of
//!   its XID, COMMIT, ROLLBACK, XA PREPARE, or standalone (DDL) event. Transactions of tables that are
//!   not captured still produce the commit marker, so the checkpoint follows the binlog.
//! - A restart asks the server for everything after the stored position: by GTID set when the
//!   position has one and the server has GTIDs (this survives a failover), else by file and
//!   position. Nothing committed after the checkpoint is skipped; a transaction cut by a crash comes
//!   again whole.
//! - After a reconnect within one run the server sends the transaction in progress again; its events
//!   already emitted are skipped, so a reconnect adds no duplicate.
//! - Batches are handed over when the socket has nothing more buffered (small batches first wait up
//!   to 1 ms at a time, 5 ms in all, for more) or when full.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tailgate_core::{BinlogFile, GtidSet, Position};
use tailgate_pipeline::stream::COALESCE_WINDOW;
use tailgate_pipeline::{
    Closed, Command, HandOver, IncrementalControl, IncrementalSnapshots, Reconnecting, Rules, SnapshotMode, Source,
    SourceContext, TablePredicate, TableRules, run_reconnecting,
};
use tracing::{debug, info, warn};

use crate::catalog::{self, Flavor, ServerFacts};
use crate::error::MyError;
use crate::incremental::{ChunkRead, ChunkReader, Emitted};
use crate::replication::{ConnInfo, DUMP_SEND_ANNOTATE_ROWS, DumpFrom, Packet, ReplicationConnection};
use crate::snapshot::{self, SnapshotJob, SnapshotState};
use crate::stream::{Step, StreamState};

#[derive(Clone)]
pub struct MysqlSourceConfig {
    /// The connector's logical name (`source.name` in events).
    pub name: String,
    pub url: String,
    /// This replica's id on the server; must differ from the server's and every other replica's.
    pub server_id: u32,
    /// The tables to capture (`None`: all, within the URL's database if it names one).
    pub tables: Option<TablePredicate>,
    /// Items per batch handed to the pipeline, at most.
    pub batch_size: usize,
    /// How often an idle server sends a heartbeat; three missed ones mean the connection is dead.
    pub heartbeat: Duration,
    /// Fill `source.query` with the statement (MariaDB ANNOTATE_ROWS; MySQL needs
    /// `binlog_rows_query_log_events = ON`).
    pub include_query: bool,
    /// Stop (drain, checkpoint, exit) once a transaction ending at or after this position was emitted.
    pub stop_at: Option<(BinlogFile, u64)>,
    pub connect_timeout: Duration,
    /// Whether the rows that exist before streaming starts are read first (see [`crate::snapshot`]).
    pub snapshot: SnapshotMode,
    /// Rows per snapshot page (one checkpoint marker).
    pub snapshot_fetch_rows: usize,
    /// Tables read at the same time, each on its own connection with the same read view.
    pub snapshot_parallel: usize,
    /// The table rules as they are now (a reload replaces them): incremental snapshots check
    /// requests against them and record them in checkpoints.
    pub rules: TableRules,
    /// Incremental snapshot requests and their status.
    pub incremental: Arc<IncrementalControl>,
    /// Rows per incremental snapshot chunk.
    pub incremental_chunk_rows: usize,
    /// Snapshot tables a reload or restart newly includes.
    pub snapshot_new_tables: bool,
}

impl std::fmt::Debug for MysqlSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlSourceConfig")
            .field("name", &self.name)
            .field("server_id", &self.server_id)
            .field("filtered", &self.tables.is_some())
            .finish_non_exhaustive()
    }
}

pub struct MysqlSource {
    config: MysqlSourceConfig,
    info: ConnInfo,
}

impl MysqlSource {
    pub fn new(config: MysqlSourceConfig) -> Result<Self, MyError> {
        let info = ConnInfo::from_url(&config.url)?;
        Ok(MysqlSource { config, info })
    }
}

impl Source for MysqlSource {
    type Error = MyError;

    async fn run(self, mut ctx: SourceContext) -> Result<(), MyError> {
        let incremental = IncrementalSnapshots::new(
            self.config.incremental.clone(),
            ctx.resume_from.as_ref().and_then(Position::incremental),
            self.config.incremental_chunk_rows,
        );
        let mut state = StreamState::new(&self.config, &self.info, ctx.resume_from.clone(), incremental);
        if let Some(interrupted) = ctx.resume_from.as_ref().and_then(SnapshotState::from_position) {
            // Streaming starts at the interrupted snapshot's consistent point once it is complete.
            state.resume = interrupted.consistent.clone();
            state.snapshot = Some(interrupted);
        }
        run_reconnecting(&mut Session { source: &self, state }, &mut ctx).await
    }
}

/// One binlog connection's worth of streaming, retried by [`run_reconnecting`].
struct Session<'a> {
    source: &'a MysqlSource,
    state: StreamState,
}

impl Reconnecting for Session<'_> {
    type Error = MyError;

    fn engine(&self) -> &'static str {
        "MySQL"
    }

    async fn session(&mut self, ctx: &mut SourceContext) -> Result<(), MyError> {
        self.source.stream(ctx, &mut self.state).await
    }

    // Once streaming, the connector rides out server restarts and network trouble by itself.
    fn retry(&self, e: &MyError) -> bool {
        e.is_transient() && self.state.ever_streamed
    }

    fn made_progress(&self) -> bool {
        self.state.streamed_since_connect
    }

    fn disconnected(&mut self) {
        self.state.disconnected();
    }
}

impl MysqlSource {
    /// The first server of the URL that answers (a host list finds a promoted replica by itself).
    async fn pick_server(&self) -> Result<(ConnInfo, mysql_async::Conn), MyError> {
        let mut last = None;
        for (i, server) in self.info.servers().into_iter().enumerate() {
            match catalog::connect(&server).await {
                Ok(conn) => {
                    if i > 0 {
                        warn!(server = %server.addr(), "the servers before it in source.url did not answer: using this one");
                    }
                    return Ok((server, conn));
                }
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| MyError::Url { detail: "names no server".into() }))
    }

    async fn stream(&self, ctx: &mut SourceContext, state: &mut StreamState) -> Result<(), MyError> {
        state.streamed_since_connect = false;
        let (info, mut catalog) = self.pick_server().await?;
        let facts = catalog::server_facts(&mut catalog).await?;
        catalog::required_settings(&facts)?;
        if facts.server_id == self.config.server_id {
            return Err(MyError::Setting {
                setting: "source.server_id",
                found: self.config.server_id.to_string(),
                needed: "a server_id different from the server's own",
                fix: "set `source.server_id` in the config to a number no other server or replica uses".into(),
            });
        }
        if state.collations.is_empty() {
            state.collations = catalog::collations(&mut catalog, facts.flavor).await?;
        }
        state.flavor = facts.flavor;
        if !self.snapshot_if_due(ctx, state, &info, &mut catalog, &facts).await? {
            return Ok(());
        }
        let (start, from_checkpoint) = match state.restart_position() {
            Some(p) => (p, true),
            None => (catalog::current_position(&mut catalog, &facts).await?, false),
        };
        if from_checkpoint && let Err(message) = catalog::position_available(&mut catalog, &facts, &start).await? {
            return Err(MyError::PositionPurged { position: start.to_string(), message });
        }
        // After a failover the server must hold everything delivered so far.
        if from_checkpoint && let Err(message) = catalog::has_checkpoint(&mut catalog, &facts, &start).await? {
            return Err(MyError::ServerBehind { server: info.addr(), position: start.to_string(), message });
        }
        let Position::Mysql { file, pos, gtids, .. } = &start else {
            return Err(MyError::Protocol(format!(
                "the stored checkpoint ({start}) belongs to another kind of source. Fix: use another offsets file or \
                 `tailgate offsets reset`"
            )));
        };
        // GTIDs are tracked only from a complete starting set: a partial set would make a later
        // GTID restart ask for history that was already delivered.
        state.gtids = gtids.clone().filter(|_| facts.gtids());
        // An empty GTID state would ask a MariaDB server for its whole history: use the position.
        let from = match (&state.gtids, from_checkpoint) {
            (Some(GtidSet::Mysql(set)), true) if facts.gtid_mode => DumpFrom::MysqlGtids(set.clone()),
            (Some(GtidSet::Mariadb(list)), true) if !list.is_empty() => DumpFrom::MariadbGtids,
            _ => DumpFrom::Position { file: file.0.clone(), pos: *pos },
        };

        // Two replicas with one server id make the server drop the older one, over and over. A
        // registration under this connector's own name is an earlier run of it (after kill -9 the
        // server notices the dead connection only at its next write): the server replaces it.
        let label = format!("tailgate {} pid {}", self.config.name, std::process::id());
        let own = format!("tailgate {} pid ", self.config.name);
        if let Some(host) = crate::check::replica_using(&mut catalog, self.config.server_id).await
            && !host.starts_with(&own)
        {
            return Err(MyError::ServerIdInUse {
                server_id: self.config.server_id,
                message: format!("SHOW REPLICAS lists it for {host:?}"),
            });
        }
        if facts.binlog_row_metadata != "FULL" {
            // Column names come from information_schema. Read them now, before the first event:
            // looked up only when a table's first TABLE_MAP arrives, they could already reflect an
            // ALTER TABLE that followed that row (DDL events refresh them later on).
            state.catalog = catalog::all_columns(&mut catalog, state.database.as_deref()).await?;
        }
        let mut conn = ReplicationConnection::connect(&info, self.config.connect_timeout).await?;
        let classify = |e| classify(e, &info.user, self.config.server_id, &start);
        self.prepare_dump(&mut conn, &facts, &from, state).await.map_err(classify)?;
        conn.register(self.config.server_id, &label).await.map_err(classify)?;
        let flags =
            if self.config.include_query && facts.flavor == Flavor::Mariadb { DUMP_SEND_ANNOTATE_ROWS } else { 0 };
        conn.request_dump(self.config.server_id, &from, flags).await.map_err(classify)?;
        state.begin_stream(file, *pos, &facts);
        if !from_checkpoint {
            // Where a fresh connector starts is a checkpoint of its own: a restart before the first
            // transaction must start here again, not at a later "now".
            state.push_commit_at(file, *pos);
        }
        info!(
            server = %facts.version,
            from = %match &from {
                DumpFrom::Position { file, pos } => format!("{file}:{pos}"),
                DumpFrom::MysqlGtids(set) => format!("GTIDs not in {set}"),
                DumpFrom::MariadbGtids => format!("after GTIDs {}", state.gtids.as_ref().map_or(String::new(), ToString::to_string)),
            },
            server_id = self.config.server_id,
            connection_id = conn.connection_id,
            "streaming"
        );
        state.ever_streamed = true;
        ctx.metrics.source_connected.store(true, std::sync::atomic::Ordering::Relaxed);
        ctx.metrics.source_active();

        let silence_limit = self.config.heartbeat * 3;
        let mut last_packet = Instant::now();
        let mut chunks = Chunks { reader: None, info: &info, facts: &facts, retries: 0 };
        // A reload wakes the loop: a table it newly includes is snapshotted without waiting for
        // the next event. (`None`: rules that never change.)
        let mut reloads = Some(self.config.rules.subscribe());
        loop {
            loop {
                let pending = match conn.next_event().map_err(classify)? {
                    None => break,
                    Some(Packet::End) => return Err(MyError::ConnectionLost(std::io::ErrorKind::UnexpectedEof.into())),
                    Some(Packet::Event(bytes)) => {
                        state.batcher.add_bytes(bytes.len());
                        match state.handle(bytes) {
                            Ok(()) => None,
                            Err(Step::Fail(e)) => return Err(e),
                            // The table's columns must come from information_schema: look them up,
                            // then decode the same event again (nothing of it was emitted yet).
                            Err(Step::NeedCatalog(id)) => Some((bytes.to_vec(), id)),
                        }
                    }
                };
                if let Some((bytes, id)) = pending {
                    let columns = catalog::table_columns(&mut catalog, &id.schema, &id.table).await?;
                    state.catalog.insert(id, columns);
                    match state.handle(&bytes) {
                        Ok(()) => {}
                        Err(Step::Fail(e)) => return Err(e),
                        Err(Step::NeedCatalog(id)) => {
                            return Err(MyError::Schema(crate::schema::SchemaError::NoColumnNames {
                                table: id.to_string(),
                            }));
                        }
                    }
                }
                // A compressed transaction: its events, batch by batch.
                let mut looked_up = None;
                loop {
                    match state.drain_payload() {
                        Ok(true) => break,
                        Ok(false) => {
                            if state.batcher.hand_over(&ctx.output, None).await == HandOver::Closed {
                                return Ok(());
                            }
                        }
                        Err(Step::Fail(e)) => return Err(e),
                        Err(Step::NeedCatalog(id)) if looked_up.as_ref() != Some(&id) => {
                            let columns = catalog::table_columns(&mut catalog, &id.schema, &id.table).await?;
                            state.catalog.insert(id.clone(), columns);
                            looked_up = Some(id);
                        }
                        Err(Step::NeedCatalog(id)) => {
                            return Err(MyError::Schema(crate::schema::SchemaError::NoColumnNames {
                                table: id.to_string(),
                            }));
                        }
                    }
                }
                last_packet = Instant::now();
                state.streamed_since_connect = true;
                if state.batcher.is_full() && state.batcher.hand_over(&ctx.output, None).await == HandOver::Closed {
                    return Ok(());
                }
                // With a backlog the buffer never runs dry: stop reading at the requested end.
                if self.config.stop_at.as_ref().is_some_and(|end| state.reached(end)) && !state.in_transaction() {
                    break;
                }
            }
            // A small batch waits a little for more events (see StreamBatcher::wait_for_more).
            if state.batcher.wait_for_more()
                && let Ok(read) = tokio::time::timeout(COALESCE_WINDOW, conn.fill()).await
            {
                read?;
                ctx.metrics.source_active();
                continue;
            }
            let handing_over = Instant::now();
            if state.batcher.hand_over(&ctx.output, None).await == HandOver::Closed {
                return Ok(());
            }
            // Time spent waiting on a slow sink is not the server being silent.
            last_packet = last_packet.max(handing_over);
            conn.trim_buffer();
            if !state.in_transaction() && !ctx.shutdown.is_cancelled() {
                let stepping = Instant::now();
                self.incremental_step(ctx, state, &mut chunks).await?;
                // Nor is time spent reading a chunk.
                last_packet = last_packet.max(stepping);
                if !state.batcher.is_empty() {
                    continue;
                }
            }
            let reached_end = self.config.stop_at.as_ref().is_some_and(|end| state.reached(end));
            if (ctx.shutdown.is_cancelled() || reached_end) && !state.in_transaction() {
                if reached_end {
                    info!("reached the requested end position");
                }
                // The server's dump thread does not read the socket, so it would only notice our
                // leaving (and unregister the replica) at its next heartbeat: end it now.
                let connection_id = conn.connection_id;
                conn.close().await;
                use mysql_async::prelude::Queryable;
                let _ = catalog.query_drop(format!("KILL {connection_id}")).await;
                return Ok(());
            }
            // Incremental snapshots: a chunk due now is read at the next turn; one in its window
            // waits for the stream to read on (events wake us), a refused one for its retry time.
            if state.incremental.next_chunk().is_some() && !state.in_transaction() && !ctx.shutdown.is_cancelled() {
                continue;
            }
            let control = self.config.incremental.clone();
            let retry = state.incremental.retry_at();
            tokio::select! {
                // Data already buffered wins over a silence deadline that passed meanwhile.
                biased;
                read = conn.fill() => {
                    read?;
                    ctx.metrics.source_active();
                }
                _ = tokio::time::sleep_until((last_packet + silence_limit).into()) => {
                    return Err(MyError::Silent(silence_limit));
                }
                _ = ctx.shutdown.cancelled(), if !state.in_transaction() => {}
                _ = control.command_arrived() => {}
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now).into()), if retry.is_some() => {}
                changed = reloaded(&mut reloads), if reloads.is_some() => {
                    if changed.is_err() {
                        reloads = None;
                    }
                }
            }
        }
    }

    /// Between transactions: the operator's commands, tables the rules newly include, the chunk in
    /// its window once the stream read the binlog to its high watermark, and the next chunk.
    async fn incremental_step(
        &self,
        ctx: &mut SourceContext,
        state: &mut StreamState,
        chunks: &mut Chunks<'_>,
    ) -> Result<(), MyError> {
        let before = state.incremental.checkpoint();
        let rules = self.config.rules.current();
        let commands = state.incremental.control().take_commands();
        let rules_changed = !state.rules_seen.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &rules));
        for command in commands {
            self.apply(command, state, chunks, &rules).await?;
        }
        if rules_changed {
            self.snapshot_new_tables(state, chunks, &rules).await?;
            state.rules_seen = Some(rules.clone());
            // The pipeline applies new rules from its next commit on: one goes before any chunk
            // read under them, so that a newly included table's rows are not filtered by the old.
            state.incremental_marker();
        }
        ctx.metrics.incremental.pending.store(state.incremental.snapshots().len() as i64, Relaxed);
        self.close_if_passed(ctx, state);
        // One read per pass; up to MAX_OPEN_CHUNKS wait for the stream at once.
        if let Some(request) = state.incremental.next_chunk() {
            let reader = chunks.reader().await?;
            reader.ddl(state.ddl_count);
            let emitted = match state.flavor {
                Flavor::Mysql => Emitted::Gtids(match &state.gtids {
                    Some(GtidSet::Mysql(set)) => Some(set),
                    _ => None,
                }),
                Flavor::Mariadb => Emitted::Position(state.emitted_position()),
            };
            match reader.read(&request, &rules, emitted).await? {
                ChunkRead::Rows { chunk, high } => {
                    debug!(table = %request.table, rows = chunk.rows.len(), high = %high, "incremental snapshot chunk read");
                    chunks.retries = 0;
                    if let Err(why) = state.incremental.open(&request, chunk, Instant::now(), high) {
                        warn!(snapshot = request.id, table = %request.table, "incremental snapshot failed: {why}");
                        state.incremental.fail(request.id, why);
                    }
                    // An idle stream already stands at the binlog's end.
                    self.close_if_passed(ctx, state);
                }
                ChunkRead::Retry { why } => {
                    debug!(table = %request.table, "incremental snapshot: reading the chunk again shortly: {why}");
                    ctx.metrics.incremental.retries.fetch_add(1, Relaxed);
                    chunks.retries = chunks.retries.saturating_add(1);
                    state.incremental.retry_later(chunk_retry(chunks.retries));
                }
                ChunkRead::Failed(why) => {
                    warn!(snapshot = request.id, table = %request.table, "incremental snapshot failed: {why}");
                    state.incremental.fail(request.id, why);
                }
            }
        }
        // A queued, paused, finished or advanced snapshot becomes durable with the next checkpoint.
        if state.incremental.checkpoint() != before {
            state.incremental_marker();
        }
        Ok(())
    }

    /// Emits the chunks in their windows, oldest first, once the stream, between transactions,
    /// read the binlog to their high watermarks.
    fn close_if_passed(&self, ctx: &SourceContext, state: &mut StreamState) {
        while let Some(high) = state.incremental.oldest_high()
            && crate::incremental::passed(&state.read_position(), high)
        {
            let source = state.incremental_source();
            let mut events = Vec::new();
            let closed = state.incremental.close(&source, &ctx.metrics, |event| events.push(event));
            for event in events {
                state.batcher.push(event);
            }
            if let Some(Closed::Done { .. }) = closed {
                info!("incremental snapshot done");
            }
        }
    }

    /// Runs one operator command: a start after checking each table (see [`Self::accept`]).
    async fn apply(
        &self,
        command: Command,
        state: &mut StreamState,
        chunks: &mut Chunks<'_>,
        rules: &Rules,
    ) -> Result<(), MyError> {
        if let Some(start) = state.incremental.command(command) {
            let mut estimates = Vec::with_capacity(start.tables.len());
            for table in &start.tables {
                match self.accept(state, chunks, table, start.filter.as_deref(), rules).await? {
                    Ok(estimate) => estimates.push(estimate),
                    Err(why) => {
                        start.refuse(why);
                        return Ok(());
                    }
                }
            }
            start.accept(&mut state.incremental, &estimates);
        }
        Ok(())
    }

    /// Whether `table` can be snapshotted incrementally (with `filter`): its estimated rows, or why not.
    async fn accept(
        &self,
        state: &StreamState,
        chunks: &mut Chunks<'_>,
        table: &str,
        filter: Option<&str>,
        rules: &Rules,
    ) -> Result<Result<i64, String>, MyError> {
        if let Some(why) = crate::incremental::unsupported(chunks.facts) {
            return Ok(Err(why));
        }
        if chunks.facts.flavor == Flavor::Mysql && !matches!(state.gtids, Some(GtidSet::Mysql(_))) {
            return Ok(Err(
                "the stream does not track GTIDs (its checkpoint was stored without a GTID set), so chunks cannot be                  placed against it. Fix: restart from a checkpoint with GTIDs (`tailgate offsets reset --to-end`                  starts one, skipping what was not yet streamed)"
                    .into(),
            ));
        }
        let reader = chunks.reader().await?;
        reader.forget(table);
        let described = match reader.describe(table, rules).await? {
            Ok(described) => described,
            Err(why) => return Ok(Err(why)),
        };
        if let Some(filter) = filter
            && let Err(why) = reader.check_filter(&described, filter).await?
        {
            return Ok(Err(why));
        }
        Ok(Ok(described.estimate))
    }

    /// Queues a snapshot of every table the current rules include and the recorded rules did not
    /// (a reload, or a restart with new rules); then records the current rules.
    async fn snapshot_new_tables(
        &self,
        state: &mut StreamState,
        chunks: &mut Chunks<'_>,
        rules: &Rules,
    ) -> Result<(), MyError> {
        if self.config.snapshot_new_tables && state.incremental.rules_changed(rules) {
            let tables = chunks.reader().await?.user_tables().await?;
            for table in state.incremental.newly_included(rules, tables) {
                match self.accept(state, chunks, &table, None, rules).await? {
                    Ok(estimate) => {
                        let id = state.incremental.add(table.clone(), None, estimate);
                        info!(snapshot = id, table = %table, "newly included table: incremental snapshot queued");
                    }
                    Err(why) => warn!(table = %table, "newly included table cannot be snapshotted: {why}"),
                }
            }
        }
        state.incremental.set_captured(rules.captured());
        Ok(())
    }

    /// Runs the initial snapshot when one is due (see [`SnapshotMode`]); afterwards streaming starts
    /// at its consistent point. Returns false when the connector should stop instead of streaming:
    /// stopped during the snapshot, or `initial_only`.
    async fn snapshot_if_due(
        &self,
        ctx: &mut SourceContext,
        state: &mut StreamState,
        info: &ConnInfo,
        catalog: &mut mysql_async::Conn,
        facts: &ServerFacts,
    ) -> Result<bool, MyError> {
        let mode = self.config.snapshot;
        if !state.snapshot_planned {
            state.snapshot_planned = true;
            self.plan_snapshot(state, catalog, facts).await?;
            if state.snapshot.is_none() && mode == SnapshotMode::InitialOnly {
                info!("snapshot = \"initial_only\": the snapshot was completed by an earlier run; nothing to do");
                return Ok(false);
            }
        }
        let Some(progress) = &mut state.snapshot else { return Ok(true) };
        let job = SnapshotJob {
            info,
            facts,
            database: state.database.as_deref(),
            tables: state.tables_filter.as_ref(),
            fetch_rows: self.config.snapshot_fetch_rows.max(1),
            parallel: self.config.snapshot_parallel.max(1),
            stop: &ctx.shutdown,
            name: state.name,
            metrics: &ctx.metrics,
        };
        // A connection lost during the snapshot is retried like one lost while streaming: the
        // snapshot goes on after the last page handed over.
        state.ever_streamed = true;
        ctx.metrics.source_connected.store(true, std::sync::atomic::Ordering::Relaxed);
        ctx.metrics.source_active();
        if !snapshot::run(&job, progress, &ctx.output).await? || ctx.shutdown.is_cancelled() {
            return Ok(false);
        }
        state.resume = progress.consistent.clone();
        state.snapshot = None;
        if mode == SnapshotMode::InitialOnly {
            info!("snapshot = \"initial_only\": stopping after the snapshot");
            return Ok(false);
        }
        Ok(true)
    }

    /// Decides, once per run, whether a snapshot runs first.
    async fn plan_snapshot(
        &self,
        state: &mut StreamState,
        catalog: &mut mysql_async::Conn,
        facts: &ServerFacts,
    ) -> Result<(), MyError> {
        let mode = self.config.snapshot;
        let Some(checkpoint) = state.resume.clone() else {
            if mode != SnapshotMode::Never {
                state.snapshot = Some(SnapshotState::default());
            }
            return Ok(());
        };
        // A stored position the server no longer has: `when_needed` starts over with a new snapshot.
        if let Err(message) = catalog::position_available(catalog, facts, &checkpoint).await? {
            if mode != SnapshotMode::WhenNeeded {
                return Err(MyError::PositionPurged { position: checkpoint.to_string(), message });
            }
            warn!(checkpoint = %checkpoint, reason = %message, "stored position is gone: snapshot = \"when_needed\" takes a new snapshot");
            state.resume = None;
            state.snapshot = Some(SnapshotState::default());
            return Ok(());
        }
        if state.snapshot.is_some() {
            warn!(consistent_point = %checkpoint, "resuming an interrupted snapshot from a fresh read view: rows changed meanwhile may arrive twice");
        }
        Ok(())
    }

    /// Session settings the dump thread reads: checksums, heartbeats, MariaDB's GTID capability
    /// and start state.
    async fn prepare_dump(
        &self,
        conn: &mut ReplicationConnection,
        facts: &ServerFacts,
        from: &DumpFrom,
        state: &StreamState,
    ) -> Result<(), MyError> {
        // Announce that we understand checksummed events (older and newer variable names).
        conn.execute("SET @master_binlog_checksum = @@global.binlog_checksum, @source_binlog_checksum = @@global.binlog_checksum")
            .await?;
        let heartbeat_ns = self.config.heartbeat.as_nanos().min(u128::from(u64::MAX)) as u64;
        conn.execute(&format!(
            "SET @master_heartbeat_period = {heartbeat_ns}, @source_heartbeat_period = {heartbeat_ns}"
        ))
        .await?;
        // A pipeline waiting on a slow sink stops reading; let the server wait longer than its
        // 60 s default before it drops us (we reconnect anyway when it does).
        let _ = conn.execute("SET SESSION net_write_timeout = 600").await;
        if facts.flavor == Flavor::Mariadb {
            // 4 = MARIA_SLAVE_CAPABILITY_GTID: send GTID events as they are.
            conn.execute("SET @mariadb_slave_capability = 4").await?;
            if let (DumpFrom::MariadbGtids, Some(gtids)) = (from, &state.gtids) {
                conn.execute(&format!("SET @slave_connect_state = '{gtids}'")).await?;
                conn.execute("SET @slave_gtid_strict_mode = 0, @slave_gtid_ignore_duplicates = 0").await?;
            }
        }
        Ok(())
    }
}

/// Names what the server's refusal means for the operator.
fn classify(e: MyError, user: &str, server_id: u32, start: &Position) -> MyError {
    let MyError::Server { code, message, .. } = &e else { return e };
    let lower = message.to_ascii_lowercase();
    match code {
        1236 if lower.contains("same server_uuid") || lower.contains("same server_id") => {
            MyError::ServerIdInUse { server_id, message: message.clone() }
        }
        1236 if lower.contains("purged") || lower.contains("could not find") || lower.contains("not in the master") => {
            MyError::PositionPurged { position: start.to_string(), message: message.clone() }
        }
        1045 | 1227 | 1044 => MyError::Privilege { user: user.to_owned(), privilege: "REPLICATION SLAVE" },
        _ => e,
    }
}

/// Resolves when a reload replaced the rules (`Err`: they can no longer change).
async fn reloaded(
    reloads: &mut Option<tokio::sync::watch::Receiver<Arc<Rules>>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match reloads {
        Some(rules) => rules.changed().await,
        None => std::future::pending().await,
    }
}

/// How long a chunk refused by the guard waits before it is read again: 2 ms, doubling with each
/// refusal in a row up to 64 ms (a stream far ahead of the engine's commits, a long transaction).
fn chunk_retry(retries: u32) -> Duration {
    Duration::from_millis(2 << retries.saturating_sub(1).min(5))
}

/// The connection incremental snapshot chunks are read on, opened when first needed, to the server
/// the stream reads.
struct Chunks<'a> {
    reader: Option<ChunkReader>,
    info: &'a ConnInfo,
    facts: &'a ServerFacts,
    /// Chunks refused in a row.
    retries: u32,
}

impl Chunks<'_> {
    async fn reader(&mut self) -> Result<&mut ChunkReader, MyError> {
        if self.reader.is_none() {
            self.reader = Some(ChunkReader::connect(self.info, self.facts).await?);
        }
        Ok(self.reader.as_mut().expect("connected above"))
    }
}
