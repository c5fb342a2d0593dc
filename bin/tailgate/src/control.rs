//! `tailgate snapshot`: asks a running connector, through its `[http]` endpoint, to snapshot tables
//! incrementally, and shows, pauses, resumes or cancels its snapshots.

use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;

/// What `tailgate snapshot` was asked to do.
pub enum Action {
    Start { tables: Vec<String>, filter: Option<String>, wait: bool },
    Status,
    Pause(u64),
    Resume(u64),
    Cancel(u64),
}

#[derive(Debug, Deserialize)]
struct Status {
    snapshots: Vec<Snapshot>,
}

#[derive(Debug, Deserialize)]
struct Snapshot {
    id: u64,
    table: String,
    #[serde(rename = "where")]
    filter: Option<String>,
    state: String,
    rows: u64,
    estimate: i64,
    error: Option<String>,
}

pub async fn run(config: &Config, action: Action) -> ExitCode {
    match run_inner(config, action).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tailgate: {e:#}");
            ExitCode::from(crate::cli::EXIT_RUNTIME)
        }
    }
}

async fn run_inner(config: &Config, action: Action) -> anyhow::Result<ExitCode> {
    let client = Client::new(config)?;
    match action {
        Action::Start { tables, filter, wait } => {
            let body = serde_json::json!({ "tables": tables, "where": filter });
            let answer: serde_json::Value = client.call("POST", "/snapshots", Some(body)).await?;
            let ids: Vec<u64> = answer["ids"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
            for (id, table) in ids.iter().zip(&tables) {
                println!("snapshot {id}: {table} queued");
            }
            if wait { follow(&client, &ids).await } else { Ok(ExitCode::SUCCESS) }
        }
        Action::Status => {
            let status: Status = client.call("GET", "/snapshots", None).await?;
            print_status(&status.snapshots);
            Ok(ExitCode::SUCCESS)
        }
        Action::Pause(id) => simple(&client, "POST", &format!("/snapshots/{id}/pause")).await,
        Action::Resume(id) => simple(&client, "POST", &format!("/snapshots/{id}/resume")).await,
        Action::Cancel(id) => simple(&client, "DELETE", &format!("/snapshots/{id}")).await,
    }
}

async fn simple(client: &Client, method: &str, path: &str) -> anyhow::Result<ExitCode> {
    let status: Status = client.call(method, path, None).await?;
    print_status(&status.snapshots);
    Ok(ExitCode::SUCCESS)
}

/// Shows the progress of `ids` until each is done (exit 0) or one is cancelled or failed (exit 1).
async fn follow(client: &Client, ids: &[u64]) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stderr().is_terminal();
    loop {
        let status: Status = client.call("GET", "/snapshots", None).await?;
        let mine: Vec<&Snapshot> = status.snapshots.iter().filter(|s| ids.contains(&s.id)).collect();
        let line = mine.iter().map(|s| progress(s)).collect::<Vec<_>>().join("  ");
        if terminal {
            eprint!("\r\x1b[2K{line}");
        }
        if let Some(bad) = mine.iter().find(|s| s.state == "failed" || s.state == "cancelled") {
            eprintln!();
            eprintln!(
                "snapshot {} of {}: {}{}",
                bad.id,
                bad.table,
                bad.state,
                bad.error.as_deref().map_or(String::new(), |e| format!(": {e}"))
            );
            return Ok(ExitCode::from(crate::cli::EXIT_RUNTIME));
        }
        if mine.len() == ids.len() && mine.iter().all(|s| s.state == "done") {
            if terminal {
                eprintln!();
            }
            for s in mine {
                println!("snapshot {}: {} done, {} rows", s.id, s.table, s.rows);
            }
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn progress(s: &Snapshot) -> String {
    let bar = if s.estimate > 0 {
        let done = (s.rows as f64 / s.estimate as f64).min(1.0);
        let filled = (done * 20.0).round() as usize;
        format!("[{}{}] {:>3.0}%", "#".repeat(filled), ".".repeat(20 - filled), done * 100.0)
    } else {
        String::new()
    };
    format!("{} {} {} rows {bar}", s.table, s.state, s.rows)
}

fn print_status(snapshots: &[Snapshot]) {
    if snapshots.is_empty() {
        println!("no incremental snapshots");
        return;
    }
    println!("{:>4}  {:<32} {:<9} {:>12} {:>12}  where", "id", "table", "state", "rows", "estimate");
    for s in snapshots {
        let estimate = if s.estimate >= 0 { s.estimate.to_string() } else { "?".into() };
        println!(
            "{:>4}  {:<32} {:<9} {:>12} {:>12}  {}{}",
            s.id,
            s.table,
            s.state,
            s.rows,
            estimate,
            s.filter.as_deref().unwrap_or(""),
            s.error.as_deref().map_or(String::new(), |e| format!("  ({e})"))
        );
    }
    let _ = std::io::stdout().flush();
}

/// A one-request-per-connection HTTP client for the connector's own endpoint.
struct Client {
    addr: SocketAddr,
    token: Option<String>,
}

impl Client {
    fn new(config: &Config) -> anyhow::Result<Client> {
        let http = config.http.as_ref().ok_or_else(|| {
            anyhow!("the connector has no [http] section: set [http] listen = \"127.0.0.1:8080\" and restart it")
        })?;
        let mut addr: SocketAddr = http.listen.parse().context("http.listen")?;
        // A wildcard listen address is reached on this host's loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        Ok(Client { addr, token: http.token.clone() })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let mut stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("cannot reach the connector at {} (http.listen): is it running?", self.addr))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = self.token.as_deref().map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if !(200..300).contains(&code) {
            let message = serde_json::from_str::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| payload.trim().to_owned());
            bail!("{message} (HTTP {code})");
        }
        serde_json::from_str(payload).with_context(|| format!("unexpected answer: {payload}"))
    }
}
