//! Commands: `run`, `check`, `offsets show|reset`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tailgate_core::{BinlogFile, FormatOptions, Lsn, Position};
use tailgate_kafka::{KafkaSink, KafkaSinkConfig};
use tailgate_mysql::MyError;
use tailgate_pipeline::{
    Encoder, EncoderOptions, Metrics, OffsetStore, PipelineError, Rules, RunContext, RunOptions, Source, Status,
    StdoutSink,
};
use tailgate_postgres::PgError;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, SinkConfig, SourceConfig};
use crate::source::{mysql, postgres};

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_PREREQUISITE: u8 = 3;

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
        /// PostgreSQL: stop by itself once everything committed before this LSN (e.g. 0/16B3748) is
        /// delivered and checkpointed, like pg_recvlogical --endpos.
        #[arg(long, value_name = "LSN", conflicts_with = "stop_at_binlog")]
        stop_at_lsn: Option<Lsn>,
        /// MySQL/MariaDB: stop by itself once a transaction ending at or after FILE:POS (e.g.
        /// mysql-bin.000003:4711) is delivered and checkpointed.
        #[arg(long, value_name = "FILE:POS", value_parser = parse_binlog_arg)]
        stop_at_binlog: Option<(BinlogFile, u64)>,
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
    /// `--to-end` skips everything up to the end of the server's log now; `--to-lsn` and
    /// `--to-binlog` set a position.
    Reset {
        #[arg(short, long)]
        config: PathBuf,
        /// Skip to the current end of the WAL / binlog.
        #[arg(long, conflicts_with_all = ["to_lsn", "to_binlog"])]
        to_end: bool,
        /// PostgreSQL: resume after this LSN (e.g. 0/16B3748).
        #[arg(long, value_name = "LSN", conflicts_with = "to_binlog")]
        to_lsn: Option<Lsn>,
        /// MySQL/MariaDB: resume at FILE:POS (the end of a transaction, e.g. mysql-bin.000003:4711).
        #[arg(long, value_name = "FILE:POS", value_parser = parse_binlog_arg)]
        to_binlog: Option<(BinlogFile, u64)>,
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tailgate: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { stop_at_lsn, stop_at_binlog, config: path } => {
                run(path, config, StopAt { lsn: stop_at_lsn, binlog: stop_at_binlog }).await
            }
            Command::Check { .. } => check(config).await,
            Command::Offsets { action: OffsetsAction::Show { .. } } => offsets_show(&config),
            Command::Offsets { action: OffsetsAction::Reset { to_end, to_lsn, to_binlog, .. } } => {
                let target = match (to_lsn, to_binlog) {
                    (Some(lsn), _) => ResetTo::Position(Position::Postgres { lsn }),
                    (_, Some((file, pos))) => ResetTo::Position(Position::Mysql { file, pos, gtids: None }),
                    _ if to_end => ResetTo::End,
                    _ => ResetTo::Nothing,
                };
                offsets_reset(&config, target).await
            }
            Command::Slot { action: SlotAction::Drop { yes, .. } } => slot_drop(&config, yes).await,
        }
    })
}

fn parse_binlog_arg(text: &str) -> Result<(BinlogFile, u64), String> {
    tailgate_mysql::source::parse_binlog_position(text)
        .ok_or_else(|| format!("{text:?} is not FILE:POS, e.g. mysql-bin.000003:4711"))
}

/// Where `run` stops by itself (benchmarks, controlled catch-up).
#[derive(Debug, Default)]
struct StopAt {
    lsn: Option<Lsn>,
    binlog: Option<(BinlogFile, u64)>,
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let level = config.log.level.clone().unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // stdout belongs to the stdout sink: logs go to stderr.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.format.as_deref() == Some("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn encoder(config: &Config, rules: &Rules) -> Encoder {
    Encoder::new(EncoderOptions {
        tombstones: config.format.tombstones,
        format: FormatOptions {
            decimal_handling: config.format.decimal_handling,
            bigint_unsigned_handling: config.format.bigint_unsigned_handling,
            transaction_metadata: config.format.transaction_metadata,
        },
        max_record_bytes: config.max_record_bytes(),
        dead_letter_topic: rules.dead_letter_topic.clone(),
        stop_on_dead_letter: rules.dead_letter_stop,
    })
}

fn kafka_config(config: &Config) -> Option<KafkaSinkConfig> {
    match &config.sink {
        SinkConfig::Kafka(k) => Some(KafkaSinkConfig {
            brokers: k.brokers.clone(),
            client_id: format!("tailgate-{}", config.name),
            topic_partitions: k.topic_partitions,
            topic_replication_factor: k.topic_replication_factor,
            librdkafka: k.librdkafka.clone(),
        }),
        SinkConfig::Stdout(_) => None,
    }
}

/// Cancels `token` on SIGINT or SIGTERM; a second signal exits at once (nothing is checkpointed
/// past what Kafka acknowledged, so even that loses nothing).
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

async fn run(config_path: PathBuf, config: Config, stop_at: StopAt) -> ExitCode {
    match run_inner(config_path, config, stop_at).await {
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

async fn run_inner(config_path: PathBuf, config: Config, stop_at: StopAt) -> anyhow::Result<()> {
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
    let (rules_tx, rules_rx) = tokio::sync::watch::channel(rules.clone());
    let metrics = Arc::new(Metrics::new(config.name.clone()));
    if let Some(http) = &config.http {
        let listen = http.listen.parse().context("http.listen")?;
        crate::http::serve(listen, metrics.clone(), Duration::from_secs(http.ready_window_s))
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", http.listen))?;
        let every = Duration::from_secs(http.lag_poll_s.max(1));
        match &config.source {
            SourceConfig::Postgres(pg) => postgres::spawn_lag_poller(&config, pg, metrics.clone(), every),
            SourceConfig::Mysql(my) => mysql::spawn_lag_poller(my, metrics.clone(), every),
        }
    }
    crate::progress::spawn_snapshot_bar(metrics.clone());
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    watch_reloads(config_path.clone(), config.clone(), rules_tx);
    let opts = RunOptions {
        flush_interval: Duration::from_millis(config.offsets.flush_interval_ms.unwrap_or(1000)),
        ..RunOptions::default()
    };
    let context =
        RunContext { store, resume_from: resume, shutdown: shutdown.clone(), metrics, rules: rules_rx.clone() };
    let summary = match &config.source {
        SourceConfig::Postgres(pg) => {
            if stop_at.binlog.is_some() {
                anyhow::bail!("--stop-at-binlog is for MySQL sources; use --stop-at-lsn");
            }
            let source = postgres::source(&config, pg, stop_at.lsn, &rules_rx)?;
            run_pipeline(source, &config, &rules, context, opts).await?
        }
        SourceConfig::Mysql(my) => {
            if stop_at.lsn.is_some() {
                anyhow::bail!("--stop-at-lsn is for PostgreSQL sources; use --stop-at-binlog");
            }
            let source = mysql::source(&config, my, stop_at.binlog, &rules_rx)?;
            run_pipeline(source, &config, &rules, context, opts).await?
        }
    };
    info!(
        events = summary.events,
        checkpoint = %summary.checkpoint.as_ref().map_or("(none)".to_owned(), ToString::to_string),
        "stopped cleanly"
    );
    Ok(())
}

/// Runs `source` into the configured sink.
async fn run_pipeline<S: Source>(
    source: S,
    config: &Config,
    rules: &Rules,
    context: RunContext,
    opts: RunOptions,
) -> anyhow::Result<tailgate_pipeline::RunSummary> {
    Ok(match kafka_config(config) {
        Some(kc) => {
            info!(brokers = %kc.brokers, prefix = %config.topic_prefix(), "sink: kafka");
            let sink = KafkaSink::new(kc, encoder(config, rules), context.shutdown.clone(), opts.drain_timeout)?;
            tailgate_pipeline::run(source, sink, context, opts).await?
        }
        None => {
            let sink = StdoutSink::new(Box::new(std::io::stdout()), encoder(config, rules));
            tailgate_pipeline::run(source, sink, context, opts).await?
        }
    })
}

/// SIGHUP re-reads the config file and applies its `[filter]`, `[[route]]` and `[[outbox]]` rules from
/// the next transaction on (and brings a tailgate-managed publication in line). A broken file is
/// refused and the running rules kept.
fn watch_reloads(path: PathBuf, running: Config, rules_tx: tokio::sync::watch::Sender<Arc<Rules>>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            warn!("cannot install the SIGHUP handler: reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match reload(&path, &running).await {
                Ok(rules) => {
                    rules_tx.send_replace(Arc::new(rules));
                    info!(config = %path.display(), "reloaded: new rules apply from the next transaction");
                }
                Err(e) => error!(config = %path.display(), "reload refused, the running rules stay: {e:#}"),
            }
        }
    });
}

async fn reload(path: &std::path::Path, running: &Config) -> anyhow::Result<Rules> {
    let new = Config::load(path)?;
    let rules = new.rules()?;
    if new.source_and_sink_differ(running) {
        warn!("only [filter], [[route]], [[outbox]] and [dead_letter] are reloaded; restart to apply other changes");
    }
    if let SourceConfig::Postgres(pg) = &running.source {
        postgres::on_reload(running, pg, &rules).await?;
    }
    Ok(rules)
}

fn exit_code_for(e: &anyhow::Error) -> u8 {
    let source_error = e.downcast_ref::<PipelineError>().and_then(|p| p.source_error());
    let pg = source_error.and_then(|s| s.downcast_ref::<PgError>()).or_else(|| e.downcast_ref::<PgError>());
    let my = source_error.and_then(|s| s.downcast_ref::<MyError>()).or_else(|| e.downcast_ref::<MyError>());
    pg.and_then(postgres::exit_code).or_else(|| my.and_then(mysql::exit_code)).unwrap_or(EXIT_RUNTIME)
}

async fn check(config: Config) -> ExitCode {
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
    let results = match &config.source {
        SourceConfig::Postgres(pg) => postgres::check(&config, pg, checkpoint.as_ref()).await,
        SourceConfig::Mysql(my) => mysql::check(&config, my, checkpoint.as_ref()).await,
    };
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
    if let Some(kc) = kafka_config(&config) {
        let brokers = kc.brokers.clone();
        match tokio::task::spawn_blocking(move || tailgate_kafka::probe_brokers(&kc, Duration::from_secs(5))).await {
            Ok(Ok(n)) => println!("ok      kafka: {brokers} answered ({n} broker(s))"),
            Ok(Err(e)) => {
                failed = true;
                println!("FAILED  kafka: {brokers} did not answer: {e}. Fix: start the broker or correct sink.brokers");
            }
            Err(e) => {
                failed = true;
                println!("FAILED  kafka: {e}");
            }
        }
    } else {
        println!("ok      sink: stdout");
    }
    if failed { ExitCode::from(EXIT_PREREQUISITE) } else { ExitCode::SUCCESS }
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
    Position(Position),
}

async fn offsets_reset(config: &Config, target: ResetTo) -> ExitCode {
    let store = OffsetStore::new(config.offsets_path(), config.name.clone());
    // Refuse while the connector runs.
    if let Err(e) = ensure_not_running(config).await {
        eprintln!("tailgate: {e:#}");
        return ExitCode::from(EXIT_PREREQUISITE);
    }
    let position = match target {
        ResetTo::Nothing => None,
        ResetTo::End => {
            let end = match &config.source {
                SourceConfig::Postgres(pg) => postgres::end_position(pg).await,
                SourceConfig::Mysql(my) => mysql::end_position(my).await,
            };
            match end {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!("tailgate: {e:#}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
        }
        ResetTo::Position(p) => {
            let matches_source = matches!(
                (&p, &config.source),
                (Position::Postgres { .. }, SourceConfig::Postgres(_))
                    | (Position::Mysql { .. }, SourceConfig::Mysql(_))
            );
            if !matches_source {
                eprintln!("tailgate: use --to-lsn for PostgreSQL sources and --to-binlog for MySQL sources");
                return ExitCode::from(EXIT_CONFIG);
            }
            Some(p)
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

async fn slot_drop(config: &Config, yes: bool) -> ExitCode {
    let SourceConfig::Postgres(pg) = &config.source else {
        eprintln!(
            "tailgate: MySQL sources have no slot: the server keeps binlogs by binlog_expire_logs_seconds whatever tailgate does. \
             To start over, run `tailgate offsets reset`"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let slot = config.slot_name();
    let publication = config.publication_name();
    if !yes {
        eprintln!(
            "tailgate: this drops slot {slot} and publication {publication}: changes made until the connector runs again will not be captured. Add --yes to confirm."
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let result: anyhow::Result<()> = async {
        ensure_not_running(config).await?;
        postgres::drop_slot(config, pg).await?;
        let store = OffsetStore::new(config.offsets_path(), config.name.clone());
        if store.clear()? {
            println!("cleared the checkpoint in {}", store.path().display());
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tailgate: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn ensure_not_running(config: &Config) -> anyhow::Result<()> {
    match &config.source {
        SourceConfig::Postgres(pg) => postgres::ensure_not_running(config, pg).await,
        SourceConfig::Mysql(my) => mysql::ensure_not_running(config, my).await,
    }
}
