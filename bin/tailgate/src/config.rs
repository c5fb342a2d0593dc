//! The TOML configuration.
//!
//! Every field has a documented default (docs/configuration.md); unknown keys are refused by name;
//! `${VAR}` in any string is replaced by the environment variable, `${VAR:-default}` falls back to
//! `default` when it is unset or empty, `${file:/path}` is replaced by the file's contents (one
//! trailing newline dropped: Docker and Kubernetes secrets), and `$${` writes a literal `${`. The one
//! exception is an `[[outbox]] topic`, a template whose `${...}` name columns. A secret read this way
//! never appears in an error: errors name the key, the variable or the file, never the value.
//! Errors name the offending key and the fix.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tailgate_core::{BigIntUnsignedHandling, DecimalHandling};
use tailgate_http::HttpSinkConfig;
use tailgate_kafka::KafkaConfig;
use tailgate_mysql::{MysqlConfig, MysqlEngine};
use tailgate_nats::NatsConfig;
use tailgate_pipeline::{
    Engine, EngineError, FilterSpec, KeyError, OutboxSpec, RouteSpec, Rules, SinkBuilder, SnapshotMode, TransformSpec,
};
use tailgate_postgres::{PostgresConfig, PostgresEngine};
use tailgate_rabbitmq::RabbitmqConfig;
use tailgate_redis::RedisConfig;
use tailgate_stdout::StdoutConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl From<KeyError> for ConfigError {
    fn from(e: KeyError) -> Self {
        ConfigError::Key { key: e.key, message: e.message }
    }
}

fn key_error(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key { key: key.into(), message: message.into() }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the connector: defaults below, `source.name` in events, the offsets entry.
    pub name: String,
    pub source: SourceConfig,
    pub sink: SinkConfig,
    #[serde(default)]
    pub format: FormatConfig,
    #[serde(default)]
    pub filter: FilterSpec,
    /// `[[route]]` tables: topic routing, first match wins.
    #[serde(default)]
    pub route: Vec<RouteSpec>,
    /// `[[outbox]]` tables: the outbox event router.
    #[serde(default)]
    pub outbox: Vec<OutboxSpec>,
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    #[serde(default)]
    pub offsets: OffsetsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Off when absent.
    pub http: Option<HttpConfig>,
    /// High availability: off when absent.
    pub ha: Option<HaConfig>,
}

/// `[ha]`: several instances of this connector, one streaming, the others standing by.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Default true once the section is present.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Seconds a frozen or cut-off leader keeps leadership before a standby takes over. Default 10.
    #[serde(default = "default_lease_s")]
    pub lease_s: u64,
    /// Seconds a leader may go without progress (the sink or the database away) before it steps down
    /// for a healthier instance. Default 60.
    #[serde(default = "default_max_stall_s")]
    pub max_stall_s: u64,
    /// This instance's name in logs and in the offsets table. Default: `$HOSTNAME` (or the host
    /// name) and the process id.
    pub instance: Option<String>,
}

fn default_lease_s() -> u64 {
    10
}
fn default_max_stall_s() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address for /metrics, /health and /ready, e.g. "127.0.0.1:8080".
    pub listen: String,
    /// /ready turns red when the source was silent, or records stayed unacknowledged, this long. Default 60.
    #[serde(default = "default_ready_window_s")]
    pub ready_window_s: u64,
    /// How often the source's unconfirmed log bytes are measured. Default 10.
    #[serde(default = "default_lag_poll_s")]
    pub lag_poll_s: u64,
    /// Bearer token for the control routes (`POST`/`DELETE /snapshots`). Without one, they answer
    /// requests from this host (loopback) only.
    pub token: Option<String>,
}

/// `[source]`: the engine, by its `type`. The one place that lists the engines.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    Postgres(PostgresConfig),
    /// MySQL and MariaDB (the flavor is detected from the server).
    Mysql(MysqlConfig),
}

impl SourceConfig {
    /// The engine for connector `name`.
    pub fn engine(&self, name: &str) -> Result<Arc<dyn Engine>, EngineError> {
        Ok(match self {
            SourceConfig::Postgres(pg) => Arc::new(PostgresEngine::new(name, pg.clone())?),
            SourceConfig::Mysql(my) => Arc::new(MysqlEngine::new(name, my.clone())?),
        })
    }

    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        match self {
            SourceConfig::Postgres(pg) => pg.validate(name),
            SourceConfig::Mysql(my) => my.validate(),
        }
        .map_err(ConfigError::from)
    }

    fn snapshot(&self) -> &str {
        match self {
            SourceConfig::Postgres(pg) => &pg.snapshot,
            SourceConfig::Mysql(my) => &my.snapshot,
        }
    }
}

/// `[sink]`: the destination, by its `type`. The one place that lists the sinks.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    Kafka(KafkaConfig),
    Stdout(StdoutConfig),
    /// Redis Streams.
    Redis(RedisConfig),
    /// HTTP webhook (`type = "http"`).
    Http(HttpSinkConfig),
    /// NATS JetStream.
    Nats(NatsConfig),
    Rabbitmq(RabbitmqConfig),
}

impl SinkConfig {
    pub fn builder(&self) -> &dyn SinkBuilder {
        match self {
            SinkConfig::Kafka(k) => k,
            SinkConfig::Stdout(s) => s,
            SinkConfig::Redis(r) => r,
            SinkConfig::Http(h) => h,
            SinkConfig::Nats(n) => n,
            SinkConfig::Rabbitmq(r) => r,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    #[serde(default)]
    pub decimal_handling: DecimalHandling,
    /// MySQL `BIGINT UNSIGNED`: `long` (default, a JSON number, exact beyond 2^63 unlike Debezium's)
    /// or `precise` (Kafka Connect Decimal bytes).
    #[serde(default)]
    pub bigint_unsigned_handling: BigIntUnsignedHandling,
    /// A tombstone follows every delete. Default true.
    #[serde(default = "yes")]
    pub tombstones: bool,
    /// Fill the envelope's `transaction` block. Default false.
    #[serde(default)]
    pub transaction_metadata: bool,
}

impl Default for FormatConfig {
    fn default() -> Self {
        FormatConfig {
            decimal_handling: DecimalHandling::Precise,
            bigint_unsigned_handling: BigIntUnsignedHandling::Long,
            tombstones: true,
            transaction_metadata: false,
        }
    }
}

/// `[dead_letter]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Default `<topic_prefix>.dlq`.
    pub topic: Option<String>,
    /// What a record that cannot be delivered does: `continue` (default: it goes to the dead-letter
    /// topic, later records of its key go on) or `stop` (the connector halts before it, naming it;
    /// nothing later is delivered: strict per-key order).
    pub on_error: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsetsConfig {
    /// Default `./<name>.offsets.json`.
    pub path: Option<PathBuf>,
    /// How often acknowledged progress is written, in milliseconds. Default 1000.
    pub flush_interval_ms: Option<u64>,
    /// `file` (default: `path`, for a single instance) or `database`: a table in the source database
    /// that every instance reaches (needed by `[ha]`; the user needs rights to create and write it).
    pub store: Option<String>,
    /// The `database` store's table: `schema.table` (MySQL: `database.table`), created when missing.
    /// Default `tailgate.offsets`.
    pub table: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: Option<String>,
    /// Default `info`; `RUST_LOG` wins when set.
    pub level: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_ready_window_s() -> u64 {
    60
}
fn default_lag_poll_s() -> u64 {
    10
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(&text, path, &|name| std::env::var(name).ok())
    }

    pub fn parse(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax { path: path.into(), message: e.message().to_owned() })?;
        interpolate(&mut value, &mut String::new(), env)?;
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().to_string();
            key_error(if key == "." { "(top level)".to_owned() } else { key }, explain(&message))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let valid_name = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !valid_name(&self.name) {
            return Err(key_error("name", "use letters, digits, '_', '-' or '.' (it names topics and the slot)"));
        }
        self.source.validate(&self.name)?;
        self.sink.builder().validate()?;
        let prefix = self.topic_prefix();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(key_error(
                "sink.topic_prefix",
                "use letters, digits, '.', '_' or '-' (Kafka topic characters)",
            ));
        }
        self.rules()?;
        if let Some(http) = &self.http {
            if http.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(key_error(
                    "http.listen",
                    format!("{:?} is not an address like \"127.0.0.1:8080\"", http.listen),
                ));
            }
            if http.ready_window_s == 0 {
                return Err(key_error("http.ready_window_s", "must be at least 1"));
            }
        }
        match self.offsets.store.as_deref() {
            None | Some("file") | Some("database") => {}
            Some(other) => return Err(key_error("offsets.store", format!("{other:?}: use \"file\" or \"database\""))),
        }
        if let Some(table) = &self.offsets.table
            && table.split_once('.').is_none_or(|(a, b)| a.is_empty() || b.is_empty())
        {
            return Err(key_error("offsets.table", format!("{table:?}: write schema.table (MySQL: database.table)")));
        }
        if let Some(ha) = self.ha.as_ref().filter(|ha| ha.enabled) {
            if !self.shared_offsets() {
                return Err(key_error(
                    "ha",
                    "standbys must see the leader's checkpoints: set offsets.store = \"database\" (a table in the \
                     source database every instance reaches)",
                ));
            }
            if ha.lease_s < 2 {
                return Err(key_error("ha.lease_s", "must be at least 2"));
            }
        }
        if let Some(f) = self.log.format.as_deref()
            && f != "text"
            && f != "json"
        {
            return Err(key_error("log.format", "use \"text\" or \"json\""));
        }
        Ok(())
    }

    pub fn snapshot_mode(&self) -> Result<SnapshotMode, ConfigError> {
        Ok(SnapshotMode::parse(self.source.snapshot())?)
    }

    pub fn topic_prefix(&self) -> String {
        self.sink.builder().topic_prefix().map_or_else(|| self.name.clone(), str::to_owned)
    }

    /// Whether checkpoints live in the shared database store.
    pub fn shared_offsets(&self) -> bool {
        self.offsets.store.as_deref() == Some("database")
    }

    /// The database store's table.
    pub fn offsets_table(&self) -> String {
        self.offsets.table.clone().unwrap_or_else(|| "tailgate.offsets".to_owned())
    }

    /// High availability, when on.
    pub fn ha(&self) -> Option<&HaConfig> {
        self.ha.as_ref().filter(|ha| ha.enabled)
    }

    /// This instance's name: `ha.instance`, else the host name and the process id.
    pub fn instance(&self) -> String {
        self.ha.as_ref().and_then(|ha| ha.instance.clone()).unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
                .unwrap_or_else(|| "host".to_owned());
            format!("{host}:{}", std::process::id())
        })
    }

    pub fn offsets_path(&self) -> PathBuf {
        self.offsets.path.clone().unwrap_or_else(|| PathBuf::from(format!("{}.offsets.json", self.name)))
    }

    /// Whether anything outside the reloadable sections changed.
    pub fn source_and_sink_differ(&self, other: &Config) -> bool {
        let fixed =
            |c: &Config| format!("{:?}", (&c.name, &c.source, &c.sink, &c.format, &c.offsets, &c.http, &c.log, &c.ha));
        fixed(self) != fixed(other)
    }

    /// The transform rules: `[filter]`, `[[route]]`, `[[outbox]]`, `[dead_letter]`.
    pub fn transform_spec(&self) -> TransformSpec {
        TransformSpec {
            filter: self.filter.clone(),
            routes: self.route.clone(),
            outboxes: self.outbox.clone(),
            topic_prefix: self.topic_prefix(),
            dead_letter_topic: self.dead_letter.topic.clone(),
            dead_letter_stop: self.dead_letter.on_error.as_deref() == Some("stop"),
        }
    }

    pub fn rules(&self) -> Result<Rules, ConfigError> {
        if let Some(other) = self.dead_letter.on_error.as_deref().filter(|v| *v != "stop" && *v != "continue") {
            return Err(key_error("dead_letter.on_error", format!("{other:?}: use \"continue\" or \"stop\"")));
        }
        let rules = Rules::compile(&self.transform_spec()).map_err(|e| key_error(e.key, e.message))?;
        if !tailgate_pipeline::transform::valid_topic(&rules.dead_letter_topic) {
            return Err(key_error("dead_letter.topic", "not a valid Kafka topic name"));
        }
        Ok(rules)
    }

    /// Records larger than this go to the dead-letter topic (the sink's limit).
    pub fn max_record_bytes(&self) -> Option<usize> {
        self.sink.builder().max_record_bytes()
    }
}

/// Turns serde's wording into an instruction.
fn explain(message: &str) -> String {
    if message.starts_with("unknown field") {
        format!("{message}. Fix: remove or rename the key (see docs/configuration.md)")
    } else if message.starts_with("missing field") {
        format!("{message}. Fix: add it (see docs/configuration.md)")
    } else {
        message.to_owned()
    }
}

fn interpolate(
    value: &mut toml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        // An outbox topic is a template over columns (`${aggregatetype}`), as in Debezium: not env.
        toml::Value::String(_) if is_outbox_topic(path) => {}
        toml::Value::String(s) if s.contains('$') => *s = expand(s, path, env)?,
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate(item, path, env)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                interpolate(v, path, env)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn is_outbox_topic(path: &str) -> bool {
    path.strip_prefix("outbox[").and_then(|rest| rest.split_once("].")).is_some_and(|(_, key)| key == "topic")
}

fn expand(s: &str, path: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            // `$${` is a literal `${`
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail.find('}').ok_or_else(|| key_error(path, "unterminated ${...}"))?;
            let spec = &tail[..end];
            if let Some(file) = spec.strip_prefix("file:") {
                out.push_str(&read_secret_file(file, path)?);
                rest = &tail[end + 1..];
                continue;
            }
            // `${VAR:-default}` falls back to `default` when VAR is unset or empty, as in a shell.
            let (name, default) = match spec.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (spec, None),
            };
            let value = match (env(name).filter(|v| !v.is_empty() || default.is_none()), default) {
                (Some(v), _) => v,
                (None, Some(d)) => d.to_owned(),
                (None, None) => {
                    return Err(key_error(
                        path,
                        format!(
                            "environment variable {name} is not set. Fix: export {name}=..., or write ${{{name}:-default}}"
                        ),
                    ));
                }
            };
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The contents of `${file:<path>}`, without one trailing newline (`echo secret > file` and the
/// files Docker and Kubernetes mount end with one; a password never does).
fn read_secret_file(file: &str, key: &str) -> Result<String, ConfigError> {
    if file.is_empty() {
        return Err(key_error(key, "${file:} names no file. Fix: write ${file:/run/secrets/name}"));
    }
    let mut text = std::fs::read_to_string(file).map_err(|e| {
        key_error(
            key,
            format!(
                "cannot read the secret file {file}: {e}. Fix: check the path and that tailgate's user may read it"
            ),
        )
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "shop"
[source]
type = "postgres"
url = "postgres://cdc:${PGPASS}@127.0.0.1:5432/shop"
snapshot = "never"
[sink]
type = "kafka"
brokers = "127.0.0.1:9092"
topic_prefix = "shop"
[sink.librdkafka]
"compression.type" = "lz4"
[format]
decimal_handling = "precise"
tombstones = true
[offsets]
path = "shop.offsets.json"
"#;

    fn env(name: &str) -> Option<String> {
        (name == "PGPASS").then(|| "s3cret".to_owned())
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"), &env)
    }

    #[test]
    fn minimal_config_parses_with_defaults_and_interpolation() {
        let c = parse(MINIMAL).unwrap();
        let SourceConfig::Postgres(pg) = &c.source else { panic!("not postgres") };
        assert_eq!(pg.url, "postgres://cdc:s3cret@127.0.0.1:5432/shop");
        assert_eq!(pg.slot_name(&c.name), "tailgate_shop");
        assert_eq!(pg.publication_name(&c.name), "tailgate_shop");
        assert_eq!(c.topic_prefix(), "shop");
        assert!(c.rules().unwrap().skip_ops.contains(&tailgate_core::Op::Truncate));
        assert_eq!(c.offsets_path(), PathBuf::from("shop.offsets.json"));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = parse(&MINIMAL.replace("tombstones = true", "tombstone = true")).unwrap_err().to_string();
        assert!(err.contains("format") && err.contains("tombstone"), "{err}");
        let err = parse(&MINIMAL.replace("snapshot = \"never\"", "snapshot = \"never\"\nslott = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("slott"), "{err}");
    }

    /// librdkafka settings that can lose or reorder records are refused unless explicitly accepted.
    #[test]
    fn weakening_producer_overrides_need_unsafe_overrides() {
        for (setting, value) in [("enable.idempotence", "false"), ("acks", "1")] {
            let text = MINIMAL.replace("\"compression.type\" = \"lz4\"", &format!("\"{setting}\" = \"{value}\""));
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(setting) && err.contains("unsafe_overrides"), "{err}");
            let accepted = text.replace("topic_prefix = \"shop\"", "topic_prefix = \"shop\"\nunsafe_overrides = true");
            assert!(parse(&accepted).is_ok(), "{setting} accepted with unsafe_overrides");
        }
        let safe = MINIMAL.replace("\"compression.type\" = \"lz4\"", "acks = \"all\"");
        assert!(parse(&safe).is_ok());
    }

    #[test]
    fn dead_letter_on_error_is_continue_or_stop() {
        let stop = format!("{MINIMAL}[dead_letter]\non_error = \"stop\"\n");
        assert!(parse(&stop).unwrap().rules().unwrap().dead_letter_stop);
        let err = parse(&stop.replace("\"stop\"", "\"halt\"")).unwrap_err().to_string();
        assert!(err.contains("dead_letter.on_error"), "{err}");
    }

    #[test]
    fn snapshot_parallel_is_at_least_one() {
        let parallel = MINIMAL.replace("snapshot = \"never\"", "snapshot = \"never\"\nsnapshot_parallel = 3");
        let SourceConfig::Postgres(pg) = parse(&parallel).unwrap().source else { panic!() };
        assert_eq!(pg.snapshot_parallel, 3);
        let err = parse(&MINIMAL.replace("snapshot = \"never\"", "snapshot_parallel = 0")).unwrap_err().to_string();
        assert!(err.contains("source.snapshot_parallel"), "{err}");
    }

    #[test]
    fn missing_env_var_names_key_and_variable() {
        let err = parse(&MINIMAL.replace("${PGPASS}", "${NOPE}")).unwrap_err().to_string();
        assert!(err.contains("source.url") && err.contains("NOPE"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err =
            parse(&MINIMAL.replace("decimal_handling = \"precise\"", "decimal_handling = \"exact\"")).unwrap_err();
        assert!(err.to_string().contains("format.decimal_handling"), "{err}");
        let err = parse(&MINIMAL.replace("snapshot = \"never\"", "snapshot = \"sometimes\"")).unwrap_err();
        assert!(err.to_string().contains("source.snapshot"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[filter]\nskip_operations = [\"x\"]\n")).unwrap_err();
        assert!(err.to_string().contains("filter.skip_operations"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[filter]\ninclude_tables = [\"public\\\\.(\"]\n")).unwrap_err();
        assert!(err.to_string().contains("filter.include_tables[0]"), "{err}");
        let err =
            parse(&format!("{MINIMAL}\n[[outbox]]\ntable = \"public.outbox\"\non_update = \"explode\"\n")).unwrap_err();
        assert!(err.to_string().contains("outbox[0].on_update"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[[outbox]]\ntable = \"public.outbox\"\nidd = \"x\"\n")).unwrap_err();
        assert!(err.to_string().contains("idd"), "{err}");
    }

    #[test]
    fn mysql_source_parses_with_defaults() {
        let text = MINIMAL
            .replace("type = \"postgres\"", "type = \"mysql\"")
            .replace("postgres://cdc:${PGPASS}@127.0.0.1:5432/shop", "mysql://cdc:${PGPASS}@127.0.0.1:3306/shop");
        let c = parse(&text).unwrap();
        let SourceConfig::Mysql(my) = &c.source else { panic!("not mysql") };
        assert_eq!(my.url, "mysql://cdc:s3cret@127.0.0.1:3306/shop");
        assert_eq!((my.heartbeat_interval_ms, my.include_query, my.batch_size), (5000, false, 2048));
        assert_eq!(my.server_id(&c.name), my.server_id("shop"), "derived server id is stable");
        assert!(my.server_id(&c.name) >= 1_000_000);
        let with_id = parse(&text.replace("snapshot = \"never\"", "snapshot = \"never\"\nserver_id = 5400")).unwrap();
        let SourceConfig::Mysql(my) = &with_id.source else { panic!() };
        assert_eq!(my.server_id(&with_id.name), 5400);
        let err = parse(&text.replace("snapshot = \"never\"", "snapshot = \"never\"\nslot = \"x\"")).unwrap_err();
        assert!(err.to_string().contains("slot"), "PostgreSQL keys are refused for MySQL: {err}");
        let err = parse(&text.replace("mysql://", "postgres://")).unwrap_err();
        assert!(err.to_string().contains("source.url"), "{err}");
    }

    #[test]
    fn secrets_come_from_files_without_their_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("tailgate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pg_password");
        std::fs::write(&file, "pa$$w:rd\n").unwrap();
        let text = MINIMAL.replace("${PGPASS}", &format!("${{file:{}}}", file.display()));
        let c = parse(&text).unwrap();
        let SourceConfig::Postgres(pg) = &c.source else { panic!("not postgres") };
        assert_eq!(pg.url, "postgres://cdc:pa$$w:rd@127.0.0.1:5432/shop");

        // A missing file names the key and the file, never a value.
        let missing = MINIMAL.replace("${PGPASS}", "${file:/nonexistent/tailgate-secret}");
        let err = parse(&missing).unwrap_err().to_string();
        assert!(err.contains("source.url") && err.contains("/nonexistent/tailgate-secret"), "{err}");
        assert!(parse(&MINIMAL.replace("${PGPASS}", "${file:}")).unwrap_err().to_string().contains("names no file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn outbox_topic_templates_are_not_env_interpolated() {
        let c = parse(&format!(
            "{MINIMAL}\n[[outbox]]\ntable = \"public.outbox\"\ntopic = \"outbox.${{aggregatetype}}\"\n"
        ))
        .unwrap();
        assert_eq!(c.outbox[0].topic, "outbox.${aggregatetype}");
    }

    #[test]
    fn literal_dollar_brace_is_kept() {
        assert_eq!(expand("a$${b}", "k", &env).unwrap(), "a${b}");
        assert_eq!(expand("cost $5", "k", &env).unwrap(), "cost $5");
        assert_eq!(expand("${NOPE:-fallback}", "k", &env).unwrap(), "fallback");
        assert_eq!(expand("${PGPASS:-fallback}", "k", &env).unwrap(), "s3cret");
    }
}
