//! The `tailgate` binary: CLI, configuration, logging, signals, exit codes.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 configuration error, 3 prerequisite failure
//! (e.g. `wal_level`, privileges, a dropped slot).

mod cli;
mod config;
mod http;
mod progress;
mod source;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
