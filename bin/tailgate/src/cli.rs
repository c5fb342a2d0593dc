//! Commands: `run`, `check`, `offsets show|reset`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tailgate_core::{FormatOptions, Position};
use tailgate_pipeline::{
    Classify, EncoderOptions, Engine, EngineError, ErrorClass, Metrics, OffsetStore, PipelineError, Rules, RunContext,
    RunOptions, SinkContext, SourceParams, Status, TableRules,
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
        Command::Offsets { action: OffsetsAction::Show { config } | OffsetsAction::Reset { config, .. } } => config,
        Command::Slot { action: SlotAction::Drop { config, .. } } => config,
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
            Command::Offsets { action: OffsetsAction::Show { .. } } => offsets_show(&config),
            Command::Offsets { action: OffsetsAction::Reset { to_end, to, .. } } => {
                let target = match to {
                    Some(text) => ResetTo::Position(text),
                    None if to_end => ResetTo::End,
                    None => ResetTo::Nothing,
                };
                offsets_reset(&config, engine.as_ref(), target).await
            }
            Command::Slot { action: SlotAction::Drop { yes, .. } } => slot_drop(&config, engine.as_ref(), yes).await,
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

async fn run_inner(
    config_path: PathBuf,
    config: Config,
    engine: &Arc<dyn Engine>,
    stop_at: Option<String>,
) -> anyhow::Result<()> {
    let store = OffsetStore::new(config.offsets_path(), config.name.clone());
    let stored = store.load()?;
    let resume = stored.map(|s| s.position);
    match &resume {
        Some(p) => {
            info!(connector = %config.name, position = %p, file = %store.path().display(), "resuming from checkpoint")
        }
        None => info!(connector = %config.name, file = %store.path().display(), "no checkpoint stored"),
    }
    let rules = Arc::new(config.rules()?);
    check_outbox_columns(engine.as_ref(), &rules).await?;
    let (rules_tx, rules_rx) = tokio::sync::watch::channel(rules.clone());
    let metrics = Arc::new(Metrics::new(config.name.clone()));
    if let Some(http) = &config.http {
        let listen = http.listen.parse().context("http.listen")?;
        crate::http::serve(listen, metrics.clone(), Duration::from_secs(http.ready_window_s))
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", http.listen))?;
        engine.spawn_lag_poller(metrics.clone(), Duration::from_secs(http.lag_poll_s.max(1)));
    }
    crate::progress::spawn_snapshot_bar(metrics.clone());
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    watch_reloads(config_path.clone(), config.clone(), engine.clone(), rules_tx);
    let opts = RunOptions {
        flush_interval: Duration::from_millis(config.offsets.flush_interval_ms.unwrap_or(1000)),
        ..RunOptions::default()
    };
    let source = engine.source(SourceParams {
        name: config.name.clone(),
        tables: TableRules::new(rules_rx.clone()),
        snapshot: config.snapshot_mode()?,
        stop_at,
    })?;
    let sink = config.sink.builder().build(SinkContext {
        name: config.name.clone(),
        encoder: encoder_options(&config, &rules),
        shutdown: shutdown.clone(),
        drain_timeout: opts.drain_timeout,
    })?;
    info!(sink = config.sink.builder().kind(), prefix = %config.topic_prefix(), "sink ready");
    let context = RunContext { store, resume_from: resume, shutdown, metrics, rules: rules_rx };
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
    let store = OffsetStore::new(config.offsets_path(), config.name.clone());
    let checkpoint = match store.load() {
        Ok(Some(stored)) => {
            println!("ok      offsets: checkpoint at {} in {}", stored.position, store.path().display());
            Some(stored.position)
        }
        Ok(None) => {
            println!("ok      offsets: no checkpoint yet ({})", store.path().display());
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

fn offsets_show(config: &Config) -> ExitCode {
    let store = OffsetStore::new(config.offsets_path(), config.name.clone());
    match store.load() {
        Ok(Some(stored)) => {
            println!(
                "{}",
                serde_json::json!({"connector": config.name, "file": store.path(), "position": stored.position, "updated_at_ms": stored.updated_at_ms})
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            println!("{}", serde_json::json!({"connector": config.name, "file": store.path(), "position": null}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tailgate: {e}");
            ExitCode::from(EXIT_RUNTIME)
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
    let store = OffsetStore::new(config.offsets_path(), config.name.clone());
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
    if let Some(position) = position {
        return match store.save(&position) {
            Ok(()) => {
                println!("checkpoint of {} set to {position} in {}", config.name, store.path().display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tailgate: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        };
    }
    match store.clear() {
        Ok(true) => {
            println!("cleared the checkpoint of {} in {}", config.name, store.path().display());
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("no checkpoint stored for {} in {}", config.name, store.path().display());
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
            let store = OffsetStore::new(config.offsets_path(), config.name.clone());
            match store.clear() {
                Ok(true) => println!("cleared the checkpoint in {}", store.path().display()),
                Ok(false) => {}
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
