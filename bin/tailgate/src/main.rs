//! The `tailgate` binary: CLI, configuration, logging, signals, exit codes.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 configuration error, 3 prerequisite failure
//! (e.g. `wal_level`, privileges, a dropped slot).

mod cli;
mod config;
mod control;
mod http;
mod progress;

use std::process::ExitCode;

// The pipeline allocates rows on the source's thread and frees them on the sink's: mimalloc's
// per-thread free lists make that cross-thread free cheap (glibc's malloc spent ~15% of a snapshot).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::main()
}
