//! Waiting on a destination while the run may be stopping (shared by the sinks that own their
//! retry loops: HTTP and Redis).
//!
//! The sink contract: transient failures are retried forever while the run goes on, and for at most
//! the drain timeout once it is stopping. Every wait of the writer (connect, write, reply, backoff)
//! goes through [`Stopping::run`], which gives up when that budget is spent, counted from the moment
//! the stop was first seen.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Stopping {
    token: CancellationToken,
    drain: Duration,
    since: Option<Instant>,
}

/// Why a wait ended without its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// The wait's own timeout passed.
    TimedOut,
    /// The run is stopping and the drain timeout has passed.
    GaveUp,
}

impl Stopping {
    pub fn new(token: CancellationToken, drain: Duration) -> Self {
        Stopping { token, drain, since: None }
    }

    fn give_up_at(&mut self) -> Option<Instant> {
        if self.token.is_cancelled() { Some(*self.since.get_or_insert_with(Instant::now) + self.drain) } else { None }
    }

    /// Waits for `fut`, at most `timeout` (`None`: no limit of its own), and no longer than the drain
    /// timeout once the run is stopping.
    pub async fn run<T>(&mut self, fut: impl Future<Output = T>, timeout: Option<Duration>) -> Result<T, Interrupted> {
        tokio::pin!(fut);
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let give_up = self.give_up_at();
            let limit = match (deadline, give_up) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let token = self.token.clone();
            tokio::select! {
                out = &mut fut => return Ok(out),
                () = sleep_until(limit) => {
                    return Err(if give_up.is_some_and(|g| Instant::now() >= g) {
                        Interrupted::GaveUp
                    } else {
                        Interrupted::TimedOut
                    });
                }
                // The stop arrived during the wait: recompute the limit with the drain budget.
                () = token.cancelled(), if give_up.is_none() => {}
            }
        }
    }
}

async fn sleep_until(limit: Option<Instant>) {
    match limit {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
