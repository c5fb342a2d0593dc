#!/usr/bin/env bash
# Incremental snapshot benchmark (PostgreSQL), in one run on a table of INC_ROWS (1,000,000) rows:
#   1. the initial snapshot (snapshot = "initial_only") → Kafka: the rate to compare against;
#   2. an incremental snapshot of the same table while tailgate streams, no writer;
#   3. the same with pgbench updating random rows at WRITER_TPS (200) transactions/s: the snapshot's
#      rate, and the commit → Kafka acknowledgement latency of those writes while it runs
#      (tailgate_delivery_lag_seconds, p50/p99 interpolated in its buckets).
# Reports wall time, rows/s, the ratio to the initial snapshot, CPU seconds per million rows and peak
# RSS; appends to bench/results/<date>-incremental.md.
#
#   bench/incremental.sh
#   INC_ROWS=200000 WRITER_TPS=500 bench/incremental.sh
#   TAILGATE_BIN=/path/to/release/tailgate bench/incremental.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
N="${INC_ROWS:-1000000}"
TPS="${WRITER_TPS:-200}"
DB=tailgate_bench_inc
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -Atq)
WORK="${TMPDIR:-/tmp}/tailgate-bench-inc"
OUT="bench/results/$(date -u +%Y-%m-%d)-incremental.md"
PORT=18090
mkdir -p "$WORK"

bash scripts/services.sh all >&2
# TAILGATE_BIN=<path> measures a binary built elsewhere (no build here).
BIN="${TAILGATE_BIN:-./target/release/tailgate}"
[[ -n "${TAILGATE_BIN:-}" ]] || cargo build --release --quiet -p tailgate --bin tailgate

"${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
"${PSQL[@]}" -d "$DB" -c "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, total numeric(10,2), status text, created_at timestamptz)" \
  -c "INSERT INTO orders SELECT g, g % 1000, g * 1.25, 'new', now() FROM generate_series(1, $N) g" -c "VACUUM ANALYZE orders" \
  -c "CREATE PUBLICATION bench_inc FOR TABLE orders"
"${PSQL[@]}" -d "$DB" -c "\copy (SELECT * FROM orders) TO /dev/null" # the table in the page cache

config() { # config <name> <snapshot mode> <topic prefix>
  cat <<TOML
name = "$1"
[source]
type = "postgres"
url = "postgres://postgres@127.0.0.1:5432/$DB"
slot = "$1"
publication = "bench_inc"
create_publication = false
snapshot = "$2"
[sink]
type = "kafka"
brokers = "127.0.0.1:9092"
topic_prefix = "$3"
[offsets]
path = "$WORK/$1.offsets.json"
[http]
listen = "127.0.0.1:$PORT"
TOML
}

# cpu_s <pid>: user + system CPU seconds of a process so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
peak_mib() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
metrics() { curl -s "http://127.0.0.1:$PORT/metrics"; }

ROWS_OUT=()
row() { # row <label> <wall s> <cpu s> <peak MiB> [extra]
  python3 - "$@" "$N" "${INITIAL_RATE:-0}" <<'PY'
import sys
label, wall, cpu, rss, extra, n, initial = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), float(sys.argv[7])
rate = n / wall
ratio = f"{rate / initial:.2f}" if initial else "1.00"
print(f"{label}|{wall:.2f}|{rate:,.0f}|{ratio}|{cpu / n * 1e6:.2f}|{rss}|{extra}")
PY
}

# 1. Initial snapshot.
empty_broker
rm -f "$WORK"/*.offsets.json
config inc_initial initial_only "inc$(date +%s%N | tail -c 9)" >"$WORK/initial.toml"
/usr/bin/time -f '%e %U %S %M' -o "$WORK/time" "$BIN" run --config "$WORK/initial.toml" >/dev/null 2>"$WORK/initial.log"
read -r wall user sys rss <"$WORK/time"
INITIAL_RATE=$(python3 -c "print($N / $wall)")
ROWS_OUT+=("$(row "initial snapshot (initial_only) → Kafka" "$wall" "$(python3 -c "print($user + $sys)")" "$(python3 -c "print(f'{$rss / 1024:.1f}')")" "")")
"${PSQL[@]}" -d "$DB" -c "SELECT pg_drop_replication_slot('inc_initial')" >/dev/null

# incremental <label> <with writer: 0|1>
incremental() {
  local label=$1 writer=$2 pid bench_pid="" t0 t1 c0 c1 m0 m1 name
  name="inc_stream_$writer"
  empty_broker
  config "$name" never "inc$(date +%s%N | tail -c 9)" >"$WORK/$name.toml"
  "$BIN" run --config "$WORK/$name.toml" >/dev/null 2>"$WORK/$name.log" &
  pid=$!
  until grep -q "streaming" "$WORK/$name.log"; do sleep 0.1; done
  if [[ $writer == 1 ]]; then
    printf '\\set id random(1, %s)\nUPDATE orders SET status = %s, total = total + 1 WHERE id = :id;\n' "$N" "'upd'" >"$WORK/writer.sql"
    pgbench -h 127.0.0.1 -U postgres -n -c 2 -R "$TPS" -T 600 -f "$WORK/writer.sql" "$DB" >"$WORK/pgbench.log" 2>&1 &
    bench_pid=$!
    sleep 5 # the writer's stream flows before the snapshot starts
  fi
  m0=$(metrics)
  c0=$(cpu_s "$pid")
  t0=$(date +%s.%N)
  "$BIN" snapshot --config "$WORK/$name.toml" --table public.orders --wait >/dev/null 2>&1
  t1=$(date +%s.%N)
  c1=$(cpu_s "$pid")
  m1=$(metrics)
  [[ -n $bench_pid ]] && kill "$bench_pid" 2>/dev/null && wait "$bench_pid" 2>/dev/null || true
  local extra=""
  if [[ $writer == 1 ]]; then
    extra=$(python3 - "$m0" "$m1" <<'PY'
import re, sys
def buckets(text):
    out = {}
    for m in re.finditer(r'tailgate_delivery_lag_seconds_bucket\{[^}]*le="([^"]+)"\} (\d+)', text):
        out[float("inf") if m.group(1) == "+Inf" else float(m.group(1))] = int(m.group(2))
    return out
b0, b1 = buckets(sys.argv[1]), buckets(sys.argv[2])
bounds = sorted(b1)
counts = [b1[b] - b0.get(b, 0) for b in bounds]
total = counts[-1]
def q(p):
    target, prev_bound, prev = p * total, 0.0, 0
    for bound, c in zip(bounds, counts):
        if c >= target:
            if bound == float("inf"):
                return f"> {prev_bound}"
            return f"{(prev_bound + (bound - prev_bound) * (target - prev) / max(c - prev, 1)) * 1000:.0f} ms"
        prev_bound, prev = bound, c
    return "?"
print(f"{total} writer transactions during the snapshot, commit → Kafka ack p50 {q(0.5)}, p99 {q(0.99)}")
PY
)
  fi
  ROWS_OUT+=("$(row "$label" "$(python3 -c "print($t1 - $t0)")" "$(python3 -c "print($c1 - $c0)")" "$(peak_mib "$pid")" "$extra")")
  kill -TERM "$pid"; wait "$pid" || true
  "${PSQL[@]}" -d "$DB" -c "SELECT pg_drop_replication_slot('$name')" >/dev/null
}

incremental "incremental snapshot while streaming, no writer → Kafka" 0
incremental "incremental snapshot while streaming, pgbench at $TPS tps → Kafka" 1

{
  echo
  echo "## Incremental snapshot of $N rows ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, release build)"
  echo
  echo "workload|wall s|rows/s|vs initial|CPU s per 1M rows|peak RSS MiB|streaming meanwhile"
  echo "---|---|---|---|---|---|---"
  printf '%s\n' "${ROWS_OUT[@]}"
} | tee -a "$OUT"
