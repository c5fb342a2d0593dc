//! Commands: `run`, `check`, `offsets show|reset`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tailgate_core::{FormatOptions, Position};
use tailgate_pipeline::{
    Classify, EncoderOptions, Engine, EngineError, ErrorClass, FileStore, IncrementalControl, Metrics, OffsetStore,
    OffsetsError, PipelineError, Rules, RunContext, RunOptions, SinkContext, SourceParams, Status, TableRules,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "tailgate",
    version,
    about = "Change data capture from PostgreSQL, MySQL and MariaDB to Kafka, with Debezium-compatible events.",
    after_help = "Examples:\n  tailgate check --config shop.toml\n  tailgate run --config shop.toml\n  tailgate offsets show --config shop.toml\n\nExit codes: 0 ok, 1 runtime failure, 2 config error, 3 prerequisite failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream changes until SIGINT/SIGTERM, then drain, checkpoint and exit 0.
    Run {
        #[arg(short, long)]
        config: PathBuf,
        /// Stop by itself once everything before this position is delivered and checkpointed, like
        /// pg_recvlogical --endpos: a PostgreSQL LSN (e.g. 0/16B3748) or a MySQL/MariaDB FILE:POS
        /// (e.g. mysql-bin.000003:4711, the end of a transaction).
        #[arg(long, value_name = "POSITION", visible_aliases = ["stop-at-lsn", "stop-at-binlog"])]
        stop_at: Option<String>,
    },
    /// Verify configuration, connectivity and prerequisites; exit 0 only if all pass.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show or reset the stored position.
    Offsets {
        #[command(subcommand)]
        action: OffsetsAction,
    },
    /// Incremental snapshots of a running connector, through its [http] endpoint: re-read tables'
    /// existing rows while streaming goes on (op "r", source.snapshot = "incremental").
    ///
    /// Examples:
    ///   tailgate snapshot --config shop.toml --table public.orders --wait
    ///   tailgate snapshot --config shop.toml --table public.orders --where "created_at > now() - interval '1 day'"
    ///   tailgate snapshot --config shop.toml --status
    Snapshot {
        #[arg(short, long)]
        config: PathBuf,
        /// A table to snapshot: schema.table (MySQL: database.table). Repeat for several.
        #[arg(long = "table", value_name = "TABLE")]
        tables: Vec<String>,
        /// Only rows matching this SQL predicate.
        #[arg(long = "where", value_name = "PREDICATE", requires = "tables")]
        filter: Option<String>,
        /// Wait until the requested snapshots are done, showing their progress.
        #[arg(long, requires = "tables")]
        wait: bool,
        /// Show every snapshot and its progress.
        #[arg(long, conflicts_with_all = ["tables", "pause", "resume", "cancel"])]
        status: bool,
        /// Pause the snapshot with this id (it keeps its place).
        #[arg(long, value_name = "ID", conflicts_with_all = ["tables", "resume", "cancel"])]
        pause: Option<u64>,
        /// Resume a paused snapshot.
        #[arg(long, value_name = "ID", conflicts_with_all = ["tables", "cancel"])]
        resume: Option<u64>,
        /// Cancel a snapshot (rows already delivered stay delivered).
        #[arg(long, value_name = "ID", conflicts_with = "tables")]
        cancel: Option<u64>,
    },
    /// Manage the PostgreSQL replication slot (MySQL has none).
    Slot {
        #[command(subcommand)]
        action: SlotAction,
    },
}

#[derive(Subcommand)]
enum SlotAction {
    /// Drop this connector's slot and publication (the database then stops keeping WAL for it).
    /// Refused while the connector runs. The checkpoint is cleared too: a new slot starts from now.
    Drop {
        #[arg(short, long)]
        config: PathBuf,
        /// Confirm: changes made until the connector runs again will not be captured.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum OffsetsAction {
    /// Print the stored position of this connector.
    Show {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Copy the offsets file's checkpoint into the shared store (`offsets.store = "database"`), to
    /// move a single instance to high availability; refused while the connector runs.
    Migrate {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Reset the stored position; refused while the connector runs.
    ///
    /// Without options: forget it, so the next run starts afresh (PostgreSQL: from the slot's
    /// confirmed position or a new slot; MySQL: from the end of the binlog, after a snapshot unless
    /// snapshot = "never"); use it to accept a gap after a dropped slot or a purged binlog.
    /// `--to-end` skips everything up to the end of the server's log now; `--to` sets a position.
    Reset {
        #[arg(short, long)]
        config: PathBuf,
        /// Skip to the current end of the WAL / binlog.
        #[arg(long, conflicts_with = "to")]
        to_end: bool,
        /// Resume at this position: a PostgreSQL LSN (e.g. 0/16B3748) or a MySQL/MariaDB FILE:POS
        /// (the end of a transaction, e.g. mysql-bin.000003:4711).
        #[arg(long, value_name = "POSITION", visible_aliases = ["to-lsn", "to-binlog"])]
        to: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = match &cli.command {
        Command::Run { config, .. } | Command::Check { config } => config,
        Command::Offsets {
            action:
                OffsetsAction::Show { config } | OffsetsAction::Reset { config, .. } | OffsetsAction::Migrate { config },
        } => config,
        Command::Slot { action: SlotAction::Drop { config, .. } } => config,
        Command::Snapshot { config, .. } => config,
    };
    let config = match Config::load(&config_path.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tailgate: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(&config);
    // The one place that picks the engine: everything after talks to `dyn Engine`.
    let engine = match config.source.engine(&config.name) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("tailgate: configuration error: {e}");
            return ExitCode::from(e.class.exit_code());
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tailgate: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { stop_at, config: path } => run(path, config, &engine, stop_at).await,
            Command::Check { .. } => check(config, engine.as_ref()).await,
            Command::Offsets { action: OffsetsAction::Show { .. } } => offsets_show(&config, engine.as_ref()).await,
            Command::Offsets { action: OffsetsAction::Migrate { .. } } => {
                offsets_migrate(&config, engine.as_ref()).await
            }
            Command::Offsets { action: OffsetsAction::Reset { to_end, to, .. } } => {
                let target = match to {
                    Some(text) => ResetTo::Position(text),
                    None if to_end => ResetTo::End,
                    None => ResetTo::Nothing,
                };
                offsets_reset(&config, engine.as_ref(), target).await
            }
            Command::Slot { action: SlotAction::Drop { yes, .. } } => slot_drop(&config, engine.as_ref(), yes).await,
            Command::Snapshot { tables, filter, wait, status, pause, resume, cancel, .. } => {
                use crate::control::Action;
                let action = match (pause, resume, cancel) {
                    (Some(id), _, _) => Action::Pause(id),
                    (_, Some(id), _) => Action::Resume(id),
                    (_, _, Some(id)) => Action::Cancel(id),
                    _ if status || tables.is_empty() => Action::Status,
                    _ => Action::Start { tables, filter, wait },
                };
                crate::control::run(&config, action).await
            }
        }
    })
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let level = config.log.level.clone().unwrap_or_else(|| "info".into());
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // lapin logs every message the broker returns, body included: row values never reach the log
    // (the RabbitMQ sink reports unroutable messages itself, by routing key).
    if let Ok(quiet) = "lapin::returned_messages=error".parse() {
        filter = filter.add_directive(quiet);
    }
    // stdout belongs to the stdout sink: logs go to stderr.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.format.as_deref() == Some("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn encoder_options(config: &Config, rules: &Rules) -> EncoderOptions {
    EncoderOptions {
        tombstones: config.format.tombstones,
        format: FormatOptions {
            decimal_handling: config.format.decimal_handling,
            bigint_unsigned_handling: config.format.bigint_unsigned_handling,
            transaction_metadata: config.format.transaction_metadata,
        },
        max_record_bytes: config.max_record_bytes(),
        dead_letter_topic: rules.dead_letter_topic.clone(),
        stop_on_dead_letter: rules.dead_letter_stop,
    }
}

/// Cancels `token` on SIGINT or SIGTERM; a second signal exits at once (nothing is checkpointed
/// past what the sink acknowledged, so even that loses nothing).
fn watch_signals(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            warn!("cannot install signal handlers");
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        info!("stop requested: draining and checkpointing (signal again to exit at once)");
        token.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

async fn run(config_path: PathBuf, config: Config, engine: &Arc<dyn Engine>, stop_at: Option<String>) -> ExitCode {
    match run_inner(config_path, config, engine, stop_at).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code_for(&e);
            // Messages embed their causes already; `{e}` avoids printing each cause twice.
            error!("{e}");
            eprintln!("tailgate: {e}");
            ExitCode::from(code)
        }
    }
}

/// The configured offsets store: the file, or the table every instance shares.
fn offset_store(config: &Config, engine: &dyn Engine) -> Result<Arc<dyn OffsetStore>, EngineError> {
    if config.shared_offsets() {
        engine.shared_store(&config.offsets_table(), &config.instance())
    } else {
        Ok(Arc::new(FileStore::new(config.offsets_path(), config.name.clone())))
    }
}

async fn run_inner(
    config_path: PathBuf,
    config: Config,
    engine: &Arc<dyn Engine>,
    stop_at: Option<String>,
) -> anyhow::Result<()> {
    let store = offset_store(&config, engine.as_ref())?;
    let rules = Arc::new(config.rules()?);
    check_outbox_columns(engine.as_ref(), &rules).await?;
    let (rules_tx, rules_rx) = tokio::sync::watch::channel(rules.clone());
    let metrics = Arc::new(Metrics::new(config.name.clone()));
    let shared = Shared { metrics: metrics.clone(), rules: rules_rx.clone(), incremental: IncrementalControl::new() };
    if let Some(http) = &config.http {
        let listen = http.listen.parse().context("http.listen")?;
        let endpoint = crate::http::Endpoint {
            metrics: metrics.clone(),
            ready_window: Duration::from_secs(http.ready_window_s),
            incremental: shared.incremental.clone(),
            token: http.token.clone(),
        };
        crate::http::serve(listen, endpoint)
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", http.listen))?;
        engine.spawn_lag_poller(metrics.clone(), Duration::from_secs(http.lag_poll_s.max(1)));
    }
    crate::progress::spawn_snapshot_bar(metrics.clone());
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    watch_reloads(config_path.clone(), config.clone(), engine.clone(), rules_tx);
    let instance = config.instance();
    loop {
        // High availability: stand by until this instance holds the lease.
        let mut lease = match config.ha() {
            Some(ha) => {
                metrics.standby.store(true, std::sync::atomic::Ordering::Relaxed);
                info!(instance = %instance, "standby: waiting to lead connector {}", config.name);
                let acquired = tokio::select! {
                    lease = engine.acquire_lease(&instance, Duration::from_secs(ha.lease_s)) => lease?,
                    _ = shutdown.cancelled() => return Ok(()),
                };
                info!(instance = %instance, "leader: streaming connector {}", config.name);
                Some(acquired)
            }
            None => None,
        };
        metrics.standby.store(false, std::sync::atomic::Ordering::Relaxed);
        // From here on the writes of any earlier leader are refused.
        store.take_over().await?;
        let term = shutdown.child_token();
        let run = lead(&config, engine.as_ref(), store.clone(), &shared, term.clone(), stop_at.clone());
        tokio::pin!(run);
        let stall = config.ha().map(|ha| Duration::from_secs(ha.max_stall_s.max(1)));
        let step_down = tokio::select! {
            result = &mut run => match result {
                // A successor took over while this instance was paused (its checkpoint write was
                // fenced), or a leader that was frozen wakes up to errors its successor caused
                // (MySQL: the server dropped this replica connection for the successor's, which
                // uses the same server_id) and its lease is gone too: a lost term, not a failure.
                Err(e) if config.ha().is_some() => {
                    if !is_fenced(&e) && !lease_gone_within(&mut lease, config.ha().map(|ha| ha.lease_s)).await {
                        return Err(e);
                    }
                    warn!("{e}");
                    warn!("lost leadership: standing by");
                    true
                }
                other => return other,
            },
            reason = lost(&mut lease) => {
                warn!(reason = %reason, "lost leadership: stepping down without checkpointing further");
                term.cancel();
                if let Err(e) = run.await && !is_fenced(&e) {
                    warn!("{e}");
                }
                true
            }
            _ = stalled(&metrics, stall) => {
                warn!("no progress for {:?}: stepping down so that a healthier instance can lead", stall.unwrap_or_default());
                term.cancel();
                if let Err(e) = run.await && !is_fenced(&e) {
                    warn!("{e}");
                }
                drop(lease.take());
                // Let another instance win the lease before competing again.
                tokio::time::sleep(Duration::from_secs(config.ha().map_or(1, |ha| ha.lease_s))).await;
                true
            }
        };
        if !step_down || shutdown.is_cancelled() {
            return Ok(());
        }
        metrics.source_connected.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

fn is_fenced(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<PipelineError>(), Some(PipelineError::Offsets(OffsetsError::Fenced { .. })))
}

/// Resolves when the lease is lost; never without one.
async fn lost(lease: &mut Option<Box<dyn tailgate_pipeline::Lease>>) -> String {
    match lease {
        Some(lease) => lease.lost().await,
        None => std::future::pending().await,
    }
}

/// Whether the lease turns out lost within one lease period (its keep-alive notices a session the
/// server ended); false without high availability.
async fn lease_gone_within(lease: &mut Option<Box<dyn tailgate_pipeline::Lease>>, lease_s: Option<u64>) -> bool {
    let Some(lease_s) = lease_s else { return false };
    lease.is_some() && tokio::time::timeout(Duration::from_secs(lease_s), lost(lease)).await.is_ok()
}

/// Resolves when the leader has made no progress for `limit` while it had work (records in flight,
/// or its source disconnected); never without a limit.
async fn stalled(metrics: &Metrics, limit: Option<Duration>) {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(limit) = limit else { return std::future::pending().await };
    let since = tailgate_pipeline::metrics::now_ms();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = tailgate_pipeline::metrics::now_ms();
        let progress = metrics.last_progress_ms.load(Relaxed).max(since);
        let busy = metrics.in_flight_records.load(Relaxed) > 0 || !metrics.source_connected.load(Relaxed);
        if busy && now.saturating_sub(progress) >= limit.as_millis() as u64 {
            return;
        }
    }
}

/// One term of leadership (the whole run without high availability): load the checkpoint, build the
/// source and the sink, run the pipeline until it ends or `term` is cancelled.
/// What lives as long as the process, across leadership terms.
struct Shared {
    metrics: Arc<Metrics>,
    rules: tokio::sync::watch::Receiver<Arc<Rules>>,
    /// Incremental snapshot requests (`POST /snapshots`) for whichever term streams.
    incremental: Arc<IncrementalControl>,
}

async fn lead(
    config: &Config,
    engine: &dyn Engine,
    store: Arc<dyn OffsetStore>,
    shared: &Shared,
    term: CancellationToken,
    stop_at: Option<String>,
) -> anyhow::Result<()> {
    let (rules_rx, metrics) = (&shared.rules, &shared.metrics);
    let resume = store.load().await?.map(|s| s.position);
    match &resume {
        Some(p) => {
            info!(connector = %config.name, position = %p, store = %store.describe(), "resuming from checkpoint")
        }
        None => info!(connector = %config.name, store = %store.describe(), "no checkpoint stored"),
    }
    let opts = RunOptions {
        flush_interval: Duration::from_millis(config.offsets.flush_interval_ms.unwrap_or(1000)),
        ..RunOptions::default()
    };
    let source = engine.source(SourceParams {
        name: config.name.clone(),
        tables: TableRules::new(rules_rx.clone()),
        snapshot: config.snapshot_mode()?,
        stop_at,
        taking_over: config.ha().is_some(),
        incremental: shared.incremental.clone(),
    })?;
    let rules = rules_rx.borrow().clone();
    let sink = config.sink.builder().build(SinkContext {
        name: config.name.clone(),
        encoder: encoder_options(config, &rules),
        shutdown: term.clone(),
        drain_timeout: opts.drain_timeout,
    })?;
    info!(sink = config.sink.builder().kind(), prefix = %config.topic_prefix(), "sink ready");
    let context =
        RunContext { store, resume_from: resume, shutdown: term, metrics: metrics.clone(), rules: rules_rx.clone() };
    let summary = tailgate_pipeline::run(source, sink, context, opts).await?;
    info!(
        events = summary.events,
        checkpoint = %summary.checkpoint.as_ref().map_or("(none)".to_owned(), ToString::to_string),
        "stopped cleanly"
    );
    Ok(())
}

/// An `[[outbox]]` naming a column its table does not have is a config error at start (and on
/// reload), not a surprise at the table's first event.
async fn check_outbox_columns(engine: &dyn Engine, rules: &Rules) -> anyhow::Result<()> {
    for table in rules.outbox_tables() {
        let columns = match engine.table_columns(table).await {
            Ok(Some(columns)) => columns,
            // A table created later is checked at its first event; an unreachable server is
            // reported by the source itself.
            Ok(None) | Err(_) => continue,
        };
        if let Some(message) = rules.missing_outbox_columns(table, &columns) {
            return Err(crate::config::ConfigError::Key { key: format!("outbox (table {table})"), message }.into());
        }
    }
    Ok(())
}

/// SIGHUP re-reads the config file and applies its `[filter]`, `[[route]]`, `[[outbox]]` and
/// `[dead_letter]` rules from the next transaction on (and lets the engine bring server-side state
/// in line). A broken file is refused and the running rules kept.
fn watch_reloads(
    path: PathBuf,
    running: Config,
    engine: Arc<dyn Engine>,
    rules_tx: tokio::sync::watch::Sender<Arc<Rules>>,
) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            warn!("cannot install the SIGHUP handler: reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match reload(&path, &running, engine.as_ref()).await {
                Ok(rules) => {
                    rules_tx.send_replace(Arc::new(rules));
                    info!(config = %path.display(), "reloaded: new rules apply from the next transaction");
                }
                Err(e) => error!(config = %path.display(), "reload refused, the running rules stay: {e:#}"),
            }
        }
    });
}

async fn reload(path: &std::path::Path, running: &Config, engine: &dyn Engine) -> anyhow::Result<Rules> {
    let new = Config::load(path)?;
    let rules = new.rules()?;
    if new.source_and_sink_differ(running) {
        warn!("only [filter], [[route]], [[outbox]] and [dead_letter] are reloaded; restart to apply other changes");
    }
    check_outbox_columns(engine, &rules).await?;
    engine.on_reload(&rules).await?;
    Ok(rules)
}

fn exit_code_for(e: &anyhow::Error) -> u8 {
    let class = if let Some(p) = e.downcast_ref::<PipelineError>() {
        p.class()
    } else if let Some(e) = e.downcast_ref::<EngineError>() {
        e.class
    } else if let Some(e) = e.downcast_ref::<tailgate_pipeline::SinkError>() {
        e.class()
    } else if e.downcast_ref::<crate::config::ConfigError>().is_some() {
        ErrorClass::Config
    } else {
        ErrorClass::Runtime
    };
    class.exit_code()
}

async fn check(config: Config, engine: &dyn Engine) -> ExitCode {
    println!("ok      config: {} parsed and valid", config.name);
    let loaded = match offset_store(&config, engine) {
        Ok(store) => store.load().await.map(|stored| (store.describe(), stored)).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let checkpoint = match loaded {
        Ok((store, Some(stored))) => {
            println!("ok      offsets: checkpoint at {} in {store}", stored.position);
            Some(stored.position)
        }
        Ok((store, None)) => {
            println!("ok      offsets: no checkpoint yet ({store})");
            None
        }
        Err(e) => {
            println!("FAILED  offsets: {e}");
            None
        }
    };
    let mut results = engine.check(checkpoint.as_ref()).await;
    results.extend(config.sink.builder().check(&config.name).await);
    let mut failed = false;
    for r in &results {
        let label = match r.status {
            Status::Ok => "ok     ",
            Status::Warn => "WARN   ",
            Status::Failed => {
                failed = true;
                "FAILED "
            }
        };
        println!("{label} {}: {}", r.name, r.detail);
    }
    if failed { ExitCode::from(ErrorClass::Prerequisite.exit_code()) } else { ExitCode::SUCCESS }
}

async fn offsets_show(config: &Config, engine: &dyn Engine) -> ExitCode {
    let store = match offset_store(config, engine) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("tailgate: {e}");
            return ExitCode::from(e.class.exit_code());
        }
    };
    match store.load().await {
        Ok(Some(stored)) => {
            println!(
                "{}",
                serde_json::json!({"connector": config.name, "file": store.describe(), "position": stored.position, "updated_at_ms": stored.updated_at_ms})
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            println!("{}", serde_json::json!({"connector": config.name, "file": store.describe(), "position": null}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tailgate: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `offsets migrate`: copies the checkpoint of the offsets file (`offsets.path`) into the shared
/// store (`offsets.store = "database"`), so that instances started with the shared store resume
/// where the single instance stopped. Refused while the connector runs.
async fn offsets_migrate(config: &Config, engine: &dyn Engine) -> ExitCode {
    if !config.shared_offsets() {
        eprintln!("tailgate: set offsets.store = \"database\" first: the checkpoint is copied into that store");
        return ExitCode::from(EXIT_CONFIG);
    }
    let result: anyhow::Result<String> = async {
        engine.ensure_not_running().await?;
        let file = FileStore::new(config.offsets_path(), config.name.clone());
        let Some(stored) = file.load()? else {
            anyhow::bail!("no checkpoint of {} in {}: nothing to copy", config.name, file.path().display());
        };
        let shared = offset_store(config, engine)?;
        shared.take_over().await?;
        shared.save(&stored.position).await?;
        Ok(format!(
            "copied the checkpoint of {} ({}) from {} to {}",
            config.name,
            stored.position,
            file.path().display(),
            shared.describe()
        ))
    }
    .await;
    match result {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tailgate: {e:#}");
            ExitCode::from(exit_code_for(&e))
        }
    }
}

/// What `offsets reset` sets the checkpoint to.
enum ResetTo {
    /// Forget the checkpoint.
    Nothing,
    /// The end of the server's log now.
    End,
    /// A position as the operator wrote it.
    Position(String),
}

async fn offsets_reset(config: &Config, engine: &dyn Engine, target: ResetTo) -> ExitCode {
    let store = match offset_store(config, engine) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("tailgate: {e}");
            return ExitCode::from(e.class.exit_code());
        }
    };
    // Refuse while the connector runs.
    if let Err(e) = engine.ensure_not_running().await {
        eprintln!("tailgate: {e}");
        return ExitCode::from(e.class.exit_code());
    }
    let position: Result<Option<Position>, EngineError> = match target {
        ResetTo::Nothing => Ok(None),
        ResetTo::End => engine.end_position().await.map(Some),
        ResetTo::Position(text) => engine.parse_position(&text).map(Some),
    };
    let position = match position {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tailgate: {e}");
            return ExitCode::from(e.class.exit_code());
        }
    };
    if let Err(e) = store.take_over().await {
        eprintln!("tailgate: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    if let Some(position) = position {
        return match store.save(&position).await {
            Ok(()) => {
                println!("checkpoint of {} set to {position} in {}", config.name, store.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tailgate: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        };
    }
    match store.clear().await {
        Ok(true) => {
            println!("cleared the checkpoint of {} in {}", config.name, store.describe());
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("no checkpoint stored for {} in {}", config.name, store.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tailgate: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn slot_drop(config: &Config, engine: &dyn Engine, yes: bool) -> ExitCode {
    if !yes {
        eprintln!(
            "tailgate: this drops what the connector keeps on the {} server (the replication slot and publication): \
             changes made until the connector runs again will not be captured. Add --yes to confirm.",
            engine.kind()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let result: Result<Vec<String>, EngineError> = async {
        engine.ensure_not_running().await?;
        let done = engine.retire().await?;
        Ok(done)
    }
    .await;
    match result {
        Ok(done) => {
            for line in done {
                println!("{line}");
            }
            let cleared = match offset_store(config, engine) {
                Ok(store) => store.clear().await.map(|c| (c, store.describe())).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match cleared {
                Ok((true, store)) => println!("cleared the checkpoint in {store}"),
                Ok((false, _)) => {}
                Err(e) => {
                    eprintln!("tailgate: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tailgate: {e}");
            ExitCode::from(e.class.exit_code())
        }
    }
}
