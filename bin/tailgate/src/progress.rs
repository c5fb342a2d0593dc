//! The snapshot progress bar: when stderr is a terminal, one line redrawn twice a second while a
//! snapshot reads a table (rows done / estimated, rows/s, ETA). Logs keep going to stderr; the bar is
//! redrawn after them. Off a terminal (services, CI) the `snapshot progress` log lines and the
//! `tailgate_snapshot_rows_*` metrics carry the same information.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tailgate_pipeline::Metrics;

const WIDTH: usize = 24;

pub fn spawn_snapshot_bar(metrics: Arc<Metrics>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut current: Option<String> = None;
        loop {
            tick.tick().await;
            let table = metrics.snapshot_table();
            let mut err = std::io::stderr().lock();
            match table {
                Some(t) => {
                    if current.as_ref().is_some_and(|name| *name != t.name) {
                        let _ = writeln!(err);
                    }
                    current = Some(t.name.clone());
                    let done = metrics.snapshot_rows.load(Relaxed).saturating_sub(t.rows_before);
                    let _ = write!(err, "\r\x1b[2K{}\r", render(&t.name, done, t.estimate, t.started.elapsed()));
                }
                None => {
                    if current.take().is_some() {
                        let _ = write!(err, "\x1b[2K");
                    }
                }
            }
            let _ = err.flush();
        }
    });
}

/// `snapshot shop.orders [######------] 412,000/~1,000,000 rows 41% 183,210 rows/s ETA 0:03`
fn render(table: &str, done: u64, estimate: i64, elapsed: Duration) -> String {
    let estimate = (estimate.max(0) as u64).max(done);
    let fraction = if estimate == 0 { 1.0 } else { done as f64 / estimate as f64 };
    let filled = ((fraction * WIDTH as f64).round() as usize).min(WIDTH);
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    let eta = if rate >= 1.0 { ((estimate - done) as f64 / rate) as u64 } else { 0 };
    format!(
        "snapshot {table} [{}{}] {}/~{} rows {:.0}% {} rows/s ETA {}:{:02}",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        grouped(done),
        grouped(estimate),
        fraction * 100.0,
        grouped(rate as u64),
        eta / 60,
        eta % 60
    )
}

fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_done_estimate_rate_and_eta() {
        let line = render("shop.orders", 400_000, 1_000_000, Duration::from_secs(2));
        assert_eq!(
            line,
            "snapshot shop.orders [##########--------------] 400,000/~1,000,000 rows 40% 200,000 rows/s ETA 0:03"
        );
    }

    #[test]
    fn an_estimate_below_the_rows_read_is_raised_to_them() {
        let line = render("t", 1_500, 1_000, Duration::from_secs(1));
        assert!(line.contains("1,500/~1,500 rows 100%"), "{line}");
        assert!(line.contains("ETA 0:00"), "{line}");
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(12_345_678), "12,345,678");
    }
}
