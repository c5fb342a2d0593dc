#!/usr/bin/env bash
# The test command: sets up the services the tests need, then runs lint, unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh all
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
