//! Commands: `run`, `check`, `offsets show|reset`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tailgate_core::{FormatOptions, Position};
use tailgate_kafka::{KafkaSink, KafkaSinkConfig};
use tailgate_pipeline::{
    Encoder, EncoderOptions, Metrics, OffsetStore, PipelineError, Rules, RunContext, RunOptions, StdoutSink,
};
use tailgate_postgres::check::{CheckInput, Status};
use tailgate_postgres::{PgError, PostgresSource, PostgresSourceConfig};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, SinkConfig, SourceConfig};

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_PREREQUISITE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "tailgate",
    version,
    about = "Change data capture from PostgreSQL to Kafka, with Debezium-compatible events.",
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
        /// Stop by itself once everything committed before this LSN (e.g. 0/16B3748) is delivered
        /// and checkpointed, like pg_recvlogical --endpos.
        #[arg(long, value_name = "LSN")]
        stop_at_lsn: Option<tailgate_core::Lsn>,
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
    /// Manage the PostgreSQL replication slot.
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
    /// Without options: forget it, so the next run starts from the slot's confirmed position (or a
    /// new slot); use it to accept a gap after a dropped slot. `--to-end` skips everything up to the
    /// server's current WAL position; `--to-lsn` sets a position.
    Reset {
        #[arg(short, long)]
        config: PathBuf,
        /// Skip to the current end of the WAL.
        #[arg(long, conflicts_with = "to_lsn")]
        to_end: bool,
        /// Resume after this LSN (e.g. 0/16B3748).
        #[arg(long, value_name = "LSN")]
        to_lsn: Option<tailgate_core::Lsn>,
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
            Command::Run { stop_at_lsn, config: path } => run(path, config, stop_at_lsn).await,
            Command::Check { .. } => check(config).await,
            Command::Offsets { action: OffsetsAction::Show { .. } } => offsets_show(&config),
            Command::Offsets { action: OffsetsAction::Reset { to_end, to_lsn, .. } } => {
                offsets_reset(&config, to_end, to_lsn).await
            }
            Command::Slot { action: SlotAction::Drop { yes, .. } } => slot_drop(&config, yes).await,
        }
    })
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

/// The table predicate for the publication: `None` when the rules select no tables (all captured).
fn table_predicate(rules: &Arc<Rules>) -> Option<tailgate_postgres::catalog::TablePredicate> {
    if !rules.filters_tables() {
        return None;
    }
    let rules = rules.clone();
    Some(Arc::new(move |table: &str| rules.table_included(table)))
}

fn postgres_source(
    config: &Config,
    stop_at: Option<tailgate_core::Lsn>,
    rules: &Arc<Rules>,
) -> Result<PostgresSource, PgError> {
    let SourceConfig::Postgres(pg) = &config.source;
    PostgresSource::new(PostgresSourceConfig {
        tables: table_predicate(rules),
        name: config.name.clone(),
        url: pg.url.clone(),
        slot: config.slot_name(),
        publication: config.publication_name(),
        create_publication: pg.create_publication,
        batch_size: pg.batch_size,
        status_interval: Duration::from_millis(pg.status_interval_ms.max(100)),
        stop_at,
        snapshot: config.snapshot_mode().unwrap_or(tailgate_postgres::SnapshotMode::Initial),
        snapshot_fetch_rows: pg.snapshot_fetch_rows,
    })
}

fn encoder(config: &Config, rules: &Rules) -> Encoder {
    Encoder::new(EncoderOptions {
        tombstones: config.format.tombstones,
        format: FormatOptions {
            decimal_handling: config.format.decimal_handling,
            transaction_metadata: config.format.transaction_metadata,
        },
        max_record_bytes: config.max_record_bytes(),
        dead_letter_topic: rules.dead_letter_topic.clone(),
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

async fn run(config_path: PathBuf, config: Config, stop_at: Option<tailgate_core::Lsn>) -> ExitCode {
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

async fn run_inner(config_path: PathBuf, config: Config, stop_at: Option<tailgate_core::Lsn>) -> anyhow::Result<()> {
    let store = OffsetStore::new(config.offsets_path(), config.name.clone());
    let stored = store.load()?;
    let resume = stored.map(|s| s.position);
    match &resume {
        Some(p) => {
            info!(connector = %config.name, position = %p, file = %store.path().display(), "resuming from checkpoint")
        }
        None => {
            info!(connector = %config.name, file = %store.path().display(), "no checkpoint stored: starting from the slot")
        }
    }
    let rules = Arc::new(config.rules()?);
    let (rules_tx, rules_rx) = tokio::sync::watch::channel(rules.clone());
    let source = postgres_source(&config, stop_at, &rules)?;
    let metrics = Arc::new(Metrics::new(config.name.clone()));
    if let Some(http) = &config.http {
        let listen = http.listen.parse().context("http.listen")?;
        crate::http::serve(listen, metrics.clone(), Duration::from_secs(http.ready_window_s))
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", http.listen))?;
        spawn_lag_poller(&config, metrics.clone(), Duration::from_secs(http.lag_poll_s.max(1)));
    }
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    watch_reloads(config_path.clone(), config.clone(), rules_tx);
    let opts = RunOptions {
        flush_interval: Duration::from_millis(config.offsets.flush_interval_ms.unwrap_or(1000)),
        ..RunOptions::default()
    };
    let context = RunContext { store, resume_from: resume, shutdown: shutdown.clone(), metrics, rules: rules_rx };
    let summary = match kafka_config(&config) {
        Some(kc) => {
            info!(brokers = %kc.brokers, prefix = %config.topic_prefix(), "sink: kafka");
            let sink = KafkaSink::new(kc, encoder(&config, &rules), shutdown.clone(), opts.drain_timeout)?;
            tailgate_pipeline::run(source, sink, context, opts).await?
        }
        None => {
            let sink = StdoutSink::new(Box::new(std::io::stdout()), encoder(&config, &rules));
            tailgate_pipeline::run(source, sink, context, opts).await?
        }
    };
    info!(
        events = summary.events,
        checkpoint = %summary.checkpoint.as_ref().map_or("(none)".to_owned(), ToString::to_string),
        "stopped cleanly"
    );
    Ok(())
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
    let SourceConfig::Postgres(pg) = &running.source;
    if pg.create_publication {
        let info = tailgate_postgres::replication::ConnInfo::from_url(&pg.url)?;
        let mut client = tailgate_postgres::catalog::connect(&info).await?;
        let shared = Arc::new(rules.clone());
        let outcome = tailgate_postgres::catalog::sync_publication(
            &mut client,
            &running.publication_name(),
            table_predicate(&shared).as_ref(),
            true,
        )
        .await?;
        info!(publication = %running.publication_name(), ?outcome, "publication checked against the new rules");
    }
    Ok(rules)
}

/// Measures, every `every`, how many WAL bytes the slot has not confirmed (`tailgate_source_lag_bytes`).
fn spawn_lag_poller(config: &Config, metrics: Arc<Metrics>, every: Duration) {
    let SourceConfig::Postgres(pg) = &config.source;
    let Ok(info) = tailgate_postgres::replication::ConnInfo::from_url(&pg.url) else { return };
    let slot = config.slot_name();
    tokio::spawn(async move {
        let mut client = None;
        loop {
            if client.is_none() {
                client = tailgate_postgres::catalog::connect(&info).await.ok();
            }
            if let Some(c) = &client {
                match tailgate_postgres::catalog::slot_lag_bytes(c, &slot).await {
                    Ok(Some(bytes)) => metrics.source_lag_bytes.store(bytes, Relaxed),
                    Ok(None) => metrics.source_lag_bytes.store(-1, Relaxed),
                    Err(_) => client = None,
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

fn exit_code_for(e: &anyhow::Error) -> u8 {
    let pg = e
        .downcast_ref::<PipelineError>()
        .and_then(|p| p.source_error())
        .and_then(|s| s.downcast_ref::<PgError>())
        .or_else(|| e.downcast_ref::<PgError>());
    match pg {
        Some(
            PgError::WalLevel { .. }
            | PgError::NoReplicationPrivilege { .. }
            | PgError::SlotInUse { .. }
            | PgError::SlotDropped { .. }
            | PgError::SlotUnusable { .. }
            | PgError::NoFreeSlot { .. }
            | PgError::PublicationCreate { .. }
            | PgError::Auth { .. }
            | PgError::UnsupportedAuth { .. },
        ) => EXIT_PREREQUISITE,
        Some(PgError::Url { .. }) => EXIT_CONFIG,
        _ => EXIT_RUNTIME,
    }
}

async fn check(config: Config) -> ExitCode {
    println!("ok      config: {} parsed and valid", config.name);
    let SourceConfig::Postgres(pg) = &config.source;
    let store = OffsetStore::new(config.offsets_path(), config.name.clone());
    let checkpoint = match store.load() {
        Ok(stored) => {
            let lsn = stored.as_ref().map(|s| s.position.lsn());
            match lsn {
                Some(l) => println!("ok      offsets: checkpoint at {l} in {}", store.path().display()),
                None => println!("ok      offsets: no checkpoint yet ({})", store.path().display()),
            }
            lsn
        }
        Err(e) => {
            println!("FAILED  offsets: {e}");
            None
        }
    };
    let slot = config.slot_name();
    let publication = config.publication_name();
    let results = tailgate_postgres::check::run_checks(&CheckInput {
        url: &pg.url,
        slot: &slot,
        publication: &publication,
        create_publication: pg.create_publication,
        checkpoint,
    })
    .await;
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

async fn offsets_reset(config: &Config, to_end: bool, to_lsn: Option<tailgate_core::Lsn>) -> ExitCode {
    let store = OffsetStore::new(config.offsets_path(), config.name.clone());
    // Refuse while the connector runs: its slot is active.
    if let Err(e) = ensure_not_running(config).await {
        eprintln!("tailgate: {e:#}");
        return ExitCode::from(EXIT_PREREQUISITE);
    }
    let target = if to_end {
        match current_wal_end(config).await {
            Ok(lsn) => Some(lsn),
            Err(e) => {
                eprintln!("tailgate: {e:#}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    } else {
        to_lsn
    };
    if let Some(lsn) = target {
        return match store.save(&Position::Postgres { lsn }) {
            Ok(()) => {
                println!("checkpoint of {} set to {lsn} in {}", config.name, store.path().display());
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

async fn current_wal_end(config: &Config) -> anyhow::Result<tailgate_core::Lsn> {
    let SourceConfig::Postgres(pg) = &config.source;
    let info = tailgate_postgres::replication::ConnInfo::from_url(&pg.url)?;
    let client = tailgate_postgres::catalog::connect(&info).await?;
    let text: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    Ok(text.parse()?)
}

async fn slot_drop(config: &Config, yes: bool) -> ExitCode {
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
        let SourceConfig::Postgres(pg) = &config.source;
        let info = tailgate_postgres::replication::ConnInfo::from_url(&pg.url)?;
        let client = tailgate_postgres::catalog::connect(&info).await?;
        let dropped = client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        println!("{}", if dropped > 0 { format!("dropped slot {slot}") } else { format!("no slot {slot}") });
        let quoted = tailgate_postgres::replication::quote_ident(&publication);
        client.batch_execute(&format!("DROP PUBLICATION IF EXISTS {quoted}")).await?;
        println!("dropped publication {publication} (if it existed)");
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
    let SourceConfig::Postgres(pg) = &config.source;
    let info = tailgate_postgres::replication::ConnInfo::from_url(&pg.url)?;
    let client = tailgate_postgres::catalog::connect(&info).await.context("checking whether the connector runs")?;
    let slot = config.slot_name();
    if let Some(state) = tailgate_postgres::catalog::slot_state(&client, &slot).await? {
        if let Some(pid) = state.active_pid {
            anyhow::bail!("slot {slot} is in use by pid {pid}: stop the running connector first");
        }
    }
    Ok(())
}
