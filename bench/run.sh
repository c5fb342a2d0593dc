#!/usr/bin/env bash
# Foundation benchmark: drain a backlog of 200,000 inserts from a slot, in one transaction and in
# 1,000-row transactions. In the same run, pg_recvlogical drains an identical slot to /dev/null (the
# raw limit: the server's decoding speed), and tailgate drains its own slot to the stdout sink
# (/dev/null) and to Kafka. All slots are created before the inserts, so each reader faces the same
# backlog; an unreported warm-up drain first puts that WAL in the page cache for all of them. Reports wall time, events/s, ratio to pg_recvlogical, CPU seconds per million events and
# peak RSS, and writes bench/results/<date>.md.
#
#   bench/run.sh              # ROWS=200000 TXN_ROWS=1000 by default
#   HTTP=1 bench/run.sh       # also serve /metrics and scrape it every second during the runs
#   BASELINE_BIN=path bench/run.sh   # also drain extra slots with another tailgate build (paired comparison)
#   RULES=1 bench/run.sh      # only the filter workload: 1 of 10 tables included, with a route and an excluded column
#   SNAPSHOT=1 bench/run.sh   # only the snapshot workload: 1M existing rows, vs psql \copy
#   SINKS="redis http" bench/run.sh   # redis: the local Redis (127.0.0.1:6379); http: a local Python receiver answering 200
#   TLS=1 bench/run.sh        # also drain a slot over TLS (sslmode=verify-full, the test CA of scripts/services.sh)
#                             # to stdout, next to the plaintext (sslmode=disable) stdout drain
#   SINKS="nats rabbitmq" bench/run.sh   # the sinks drained besides stdout (default: kafka; any of kafka, kafka_tls, redis, http, nats, rabbitmq); each gets its
#                             # own slot; NATS JetStream (file stream, created by tailgate) and RabbitMQ (a
#                             # durable queue bound to the exchange; needs pika) are counted after the run
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
ROWS="${ROWS:-200000}"
SINKS="${SINKS:-kafka}"
TXN_ROWS="${TXN_ROWS:-1000}"
# BENCH_DB and BENCH_SLOTS (slot names are per server) let two benchmarks share the server.
DB="${BENCH_DB:-tailgate_bench}"
SLOTS="${BENCH_SLOTS:-bench}"
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -Atq)
WORK="${TMPDIR:-/tmp}/tailgate-bench"
OUT="bench/results/$(date -u +%Y-%m-%d)${OUT_SUFFIX:-}.md"
mkdir -p "$WORK"

bash scripts/services.sh all >&2
if [[ " $SINKS " == *" rabbitmq "* ]] && ! python3 -c 'import pika' 2>/dev/null; then
  python3 -m pip install --quiet pika >&2 # bench/queues.py declares and counts the RabbitMQ queue
fi
cargo build --release --quiet -p tailgate --bin tailgate
BIN=./target/release/tailgate
# The raw limits of the queue sinks: each client library alone (connectors/*/examples).
[[ " $SINKS " == *" rabbitmq "* ]] && cargo build --release --quiet -p tailgate-rabbitmq --example amqp_raw_publish
[[ " $SINKS " == *" nats "* ]] && cargo build --release --quiet -p tailgate-nats --example nats_raw_publish

# measure <label> <events> <command...>: prints a result row; /usr/bin/time gives CPU and peak RSS.
# With REPEAT=n (and PREPARE=<function> run before each try) the fastest of n runs is reported, with
# the highest peak RSS of them; the drain workloads run once (each slot's backlog is read once).
RESULTS=()
measure() {
  local label=$1 events=$2 wall user sys; shift 2
  fastest_run "$label" "${REPEAT:-1}" "${PREPARE:-true}" "$@"
  read -r wall user sys <<<"$FASTEST"
  python3 - "$wall" "$user" "$sys" "$PEAK_RSS_KB" "$events" "$label" <<'PY'
import sys
wall, user, sys_, rss, events = map(float, sys.argv[1:6])
cpu = user + sys_
print(f"{sys.argv[6]}|{wall:.2f}|{events / wall:,.0f}|{cpu / events * 1e6:.2f}|{rss / 1024:.1f}")
PY
}

setup() { # fresh table, publication and the three slots, created before the backlog
  "${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
  "${PSQL[@]}" -d "$DB" -c "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, total numeric(10,2), status text, created_at timestamptz)" \
    -c "CREATE PUBLICATION bench FOR TABLE orders"
  local sink_slots=""
  for sink in $SINKS; do sink_slots+=" ${SLOTS}_$sink"; done
  [[ "${TLS:-0}" == 1 ]] && sink_slots+=" ${SLOTS}_tls"
  for slot in ${SLOTS}_warmup ${SLOTS}_recv ${SLOTS}_stdout $sink_slots ${BASELINE_BIN:+${SLOTS}_base_stdout ${SLOTS}_base_kafka}; do
    "${PSQL[@]}" -d "$DB" -c "SELECT pg_create_logical_replication_slot('$slot', 'pgoutput')" >/dev/null
  done
  rm -f "$WORK"/*.offsets.json
}

HTTP="${HTTP:-0}"
# The source URL: plaintext by default (sslmode=disable; the default, prefer, would use TLS on a server
# that offers it); PG_URL overrides it (the TLS drain).
config() { # config <slot> <sink section> [no-http]
  local http=""
  [[ "$HTTP" == 1 && -z "${3:-}" ]] && http=$'[http]\nlisten = "127.0.0.1:18080"'
  cat <<TOML
name = "$1"
[source]
type = "postgres"
url = "${PG_URL:-postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable}"
slot = "$1"
publication = "bench"
create_publication = false
snapshot = "never"
$2
[offsets]
path = "$WORK/$1.offsets.json"
$http
TOML
}

if [[ "$HTTP" == 1 ]]; then # a Prometheus-like scraper for the whole run
  python3 -c '
import socket, time
while True:
    time.sleep(1)
    try:
        s = socket.create_connection(("127.0.0.1", 18080), timeout=2)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        while s.recv(65536): pass
        s.close()
    except OSError:
        pass
' &
  SCRAPER=$!
  trap 'kill $SCRAPER 2>/dev/null || true' EXIT
fi

HOOK_PORT="${HOOK_PORT:-18099}"
if [[ " $SINKS " == *" http "* ]]; then # the webhook receiver: reads each body, answers 200, counts X-Tailgate-Records
  python3 - "$HOOK_PORT" "$WORK/hook.count" <<'PY' &
import http.server, sys
count_file = sys.argv[2]
class Hook(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        # The file is the count: each run resets it to 0.
        with open(count_file) as f:
            total = int(f.read().strip() or 0) + int(self.headers.get("X-Tailgate-Records", 0))
        with open(count_file, "w") as f:
            f.write(str(total))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
PY
  HOOK=$!
  echo 0 >"$WORK/hook.count"
  trap 'kill $HOOK 2>/dev/null || true' EXIT
fi
empty_hook() { echo 0 >"$WORK/hook.count"; }
# Redis runs start with the previous run's stream deleted.
empty_redis() { redis-cli --scan --pattern 'bench*.public.orders' | xargs -r redis-cli DEL >/dev/null; }
# delivered <what> <count>: warns when a sink run did not deliver every event.
delivered() { [[ "$2" == "$ROWS" ]] || echo "WARNING: $1 holds $2 records, not $ROWS" >&2; }

run_workload() { # run_workload <title> <insert SQL>
  local title=$1 sql=$2 endpos prefix
  setup
  "${PSQL[@]}" -d "$DB" -c "$sql"
  endpos=$("${PSQL[@]}" -d "$DB" -c "SELECT pg_current_wal_lsn()")
  prefix="bench$(date +%s%N | tail -c 9)"
  config ${SLOTS}_stdout $'[sink]\ntype = "stdout"' >"$WORK/stdout.toml"
  config ${SLOTS}_kafka "$(printf '[sink]\ntype = "kafka"\nbrokers = "127.0.0.1:9092"\ntopic_prefix = "%s"' "$prefix")" >"$WORK/kafka.toml"
  echo "### $title" >&2
  # Unreported warm-up drain: every measured reader then finds the WAL in the page cache.
  pg_recvlogical -h 127.0.0.1 -U postgres -d "$DB" --slot ${SLOTS}_warmup --start -o proto_version=1 \
    -o publication_names=bench --endpos="$endpos" -f /dev/null
  RESULTS+=("**$title**||||")
  RESULTS+=("$(measure "pg_recvlogical → /dev/null" "$ROWS" pg_recvlogical -h 127.0.0.1 -U postgres -d "$DB" --slot ${SLOTS}_recv --start \
    -o proto_version=1 -o publication_names=bench --endpos="$endpos" -f /dev/null)")
  RESULTS+=("$(measure "tailgate → stdout (/dev/null)" "$ROWS" "$BIN" run --config "$WORK/stdout.toml" --stop-at-lsn "$endpos")")
  local rows=2
  if [[ "${TLS:-0}" == 1 ]]; then
    PG_URL="postgres://postgres@127.0.0.1:5432/$DB?sslmode=verify-full&sslrootcert=${TAILGATE_CACHE:-$HOME/.cache/tailgate}/tls/ca.pem" \
      config ${SLOTS}_tls $'[sink]\ntype = "stdout"' >"$WORK/tls.toml"
    RESULTS+=("$(measure "tailgate over TLS (verify-full) → stdout (/dev/null)" "$ROWS" "$BIN" run --config "$WORK/tls.toml" --stop-at-lsn "$endpos")")
    rows=$((rows + 1))
  fi
  for sink in $SINKS; do
    rows=$((rows + 1))
    case $sink in
      kafka)
        RESULTS+=("$(PREPARE=empty_broker measure "tailgate → Kafka (tansu)" "$ROWS" "$BIN" run --config "$WORK/kafka.toml" --stop-at-lsn "$endpos")") ;;
      kafka_tls) # TLS through stunnel (scripts/services.sh) to a second tansu: the TLS cost, plus a hop
        config ${SLOTS}_kafka_tls "$(printf '[sink]\ntype = "kafka"\nbrokers = "127.0.0.1:9193"\ntopic_prefix = "%st"\nsecurity_protocol = "ssl"\nssl_ca_location = "%s"' \
          "$prefix" "${TAILGATE_CACHE:-$HOME/.cache/tailgate}/tls/ca.pem")" >"$WORK/kafka_tls.toml"
        RESULTS+=("$(measure "tailgate → Kafka over TLS (stunnel → tansu)" "$ROWS" "$BIN" run --config "$WORK/kafka_tls.toml" --stop-at-lsn "$endpos")") ;;
      nats)
        config ${SLOTS}_nats "$(printf '[sink]\ntype = "nats"\nurl = "nats://127.0.0.1:4222"\ntopic_prefix = "%s"' "$prefix")" >"$WORK/nats.toml"
        RESULTS+=("$(measure "tailgate → NATS JetStream (file stream, PubAck)" "$ROWS" "$BIN" run --config "$WORK/nats.toml" --stop-at-lsn "$endpos")")
        stored=$(python3 bench/queues.py nats-count "$prefix")
        python3 bench/queues.py nats-delete "$prefix"
        ((stored == ROWS)) || { echo "NATS stream $prefix holds $stored of $ROWS records" >&2; exit 1; }
        # The raw limit: async-nats alone, the sink's settings (file stream, Nats-Msg-Id, every PubAck
        # awaited, 4,096 in flight), messages of about an event's size.
        rows=$((rows + 1))
        RESULTS+=("$(measure "raw limit: async-nats alone → JetStream (450-byte messages, same settings)" "$ROWS" \
          ./target/release/examples/nats_raw_publish "nats://127.0.0.1:4222" "${prefix}raw" "$ROWS" 450 4096)") ;;
      rabbitmq)
        python3 bench/queues.py amqp-setup "$prefix"
        config ${SLOTS}_rabbitmq "$(printf '[sink]\ntype = "rabbitmq"\nurl = "amqp://guest:guest@127.0.0.1:5672/%%2f"\ntopic_prefix = "%s"' "$prefix")" >"$WORK/rabbitmq.toml"
        RESULTS+=("$(measure "tailgate → RabbitMQ (durable queue, confirms)" "$ROWS" "$BIN" run --config "$WORK/rabbitmq.toml" --stop-at-lsn "$endpos")")
        stored=$(python3 bench/queues.py amqp-count "$prefix")
        python3 bench/queues.py amqp-delete "$prefix"
        ((stored == ROWS)) || { echo "RabbitMQ queue of $prefix holds $stored of $ROWS records" >&2; exit 1; }
        # The raw limit: lapin alone, the sink's settings (persistent, mandatory, confirms, 1,024 in
        # flight), messages of about an event's size.
        rows=$((rows + 1))
        python3 bench/queues.py amqp-setup "${prefix}raw"
        RESULTS+=("$(measure "raw limit: lapin alone → RabbitMQ (450-byte messages, same settings)" "$ROWS" \
          ./target/release/examples/amqp_raw_publish "amqp://guest:guest@127.0.0.1:5672/%2f" "${prefix}raw" "${prefix}raw.public.orders" "$ROWS" 450 1024)")
        python3 bench/queues.py amqp-delete "${prefix}raw" ;;
      redis)
        config ${SLOTS}_redis "$(printf '[sink]\ntype = "redis"\naddress = "127.0.0.1:6379"\ntopic_prefix = "%s"' "$prefix")" >"$WORK/redis.toml"
        RESULTS+=("$(PREPARE=empty_redis measure "tailgate → Redis Streams" "$ROWS" "$BIN" run --config "$WORK/redis.toml" --stop-at-lsn "$endpos")")
        delivered "the Redis stream" "$(redis-cli XLEN "$prefix.public.orders")"
        empty_redis ;;
      http)
        config ${SLOTS}_http "$(printf '[sink]\ntype = "http"\nurl = "http://127.0.0.1:%s/hook"\ntopic_prefix = "%s"\nsecret = "bench"' "$HOOK_PORT" "$prefix")" >"$WORK/http.toml"
        RESULTS+=("$(PREPARE=empty_hook measure "tailgate → HTTP webhook (local receiver)" "$ROWS" "$BIN" run --config "$WORK/http.toml" --stop-at-lsn "$endpos")")
        delivered "the webhook receiver" "$(cat "$WORK/hook.count")" ;;
      *) echo "unknown sink in SINKS: $sink" >&2; exit 1 ;;
    esac
  done
  if [[ -n "${BASELINE_BIN:-}" ]]; then
    config ${SLOTS}_base_stdout $'[sink]\ntype = "stdout"' no-http >"$WORK/base_stdout.toml"
    config ${SLOTS}_base_kafka "$(printf '[sink]\ntype = "kafka"\nbrokers = "127.0.0.1:9092"\ntopic_prefix = "%sb"' "$prefix")" no-http >"$WORK/base_kafka.toml"
    RESULTS+=("$(measure "baseline → stdout (/dev/null)" "$ROWS" "$BASELINE_BIN" run --config "$WORK/base_stdout.toml" --stop-at-lsn "$endpos")")
    RESULTS+=("$(PREPARE=empty_broker measure "baseline → Kafka (tansu)" "$ROWS" "$BASELINE_BIN" run --config "$WORK/base_kafka.toml" --stop-at-lsn "$endpos")")
    rows=$((rows + 2))
  fi
  printf '%s\n' "${RESULTS[@]: -$((rows + 1))}" >&2
}

# Filter workload: 200k inserts into orders and 20k into each of 9 other tables (1,000 + 9×100 rows per
# transaction). pg_recvlogical reads a publication of orders only (the raw limit for that stream);
# tailgate reads the same publication with the rules (include, route, excluded column), and, for
# comparison, a FOR ALL TABLES publication filtered on its side.
run_filter_workload() {
  local title="1 of 10 tables included: $ROWS + 9×$((ROWS / 10)) inserts, $TXN_ROWS-row transactions" endpos sql
  "${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
  sql="CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, total numeric(10,2), status text, created_at timestamptz);"
  for t in 1 2 3 4 5 6 7 8 9; do sql+="CREATE TABLE other_$t (LIKE orders INCLUDING ALL);"; done
  "${PSQL[@]}" -d "$DB" -c "$sql" -c "CREATE PUBLICATION bench FOR TABLE orders" -c "CREATE PUBLICATION bench_all FOR ALL TABLES"
  for slot in ${SLOTS}_warmup ${SLOTS}_recv ${SLOTS}_rules ${SLOTS}_clientside; do
    "${PSQL[@]}" -d "$DB" -c "SELECT pg_create_logical_replication_slot('$slot', 'pgoutput')" >/dev/null
  done
  rm -f "$WORK"/*.offsets.json
  sql="DO \$\$ BEGIN FOR b IN 0..$((ROWS / TXN_ROWS - 1)) LOOP
     INSERT INTO orders SELECT g, g % 1000, g * 1.25, 'new', now() FROM generate_series(b * $TXN_ROWS + 1, (b + 1) * $TXN_ROWS) g;"
  for t in 1 2 3 4 5 6 7 8 9; do
    sql+=" INSERT INTO other_$t SELECT g, g % 1000, g * 1.25, 'new', now() FROM generate_series(b * $((TXN_ROWS / 10)) + 1, (b + 1) * $((TXN_ROWS / 10))) g;"
  done
  sql+=" COMMIT; END LOOP; END \$\$"
  "${PSQL[@]}" -d "$DB" -c "$sql"
  endpos=$("${PSQL[@]}" -d "$DB" -c "SELECT pg_current_wal_lsn()")
  local rules=$'[filter]\ninclude_tables = ["public\\\\.orders"]\nexclude_columns = ["public\\\\.orders\\\\.created_at"]\n[[route]]\nmatch = "(.*)\\\\.public\\\\.orders"\ntopic = "$1.orders.v2"'
  { config ${SLOTS}_rules $'[sink]\ntype = "stdout"'; echo "$rules"; } >"$WORK/rules.toml"
  { config ${SLOTS}_clientside $'[sink]\ntype = "stdout"'; echo "$rules"; } | sed 's/^publication = "bench"/publication = "bench_all"/' >"$WORK/clientside.toml"
  pg_recvlogical -h 127.0.0.1 -U postgres -d "$DB" --slot ${SLOTS}_warmup --start -o proto_version=1 \
    -o publication_names=bench --endpos="$endpos" -f /dev/null
  echo "### $title" >&2
  RESULTS+=("**$title**||||")
  RESULTS+=("$(measure "pg_recvlogical, publication of orders → /dev/null" "$ROWS" pg_recvlogical -h 127.0.0.1 -U postgres -d "$DB" \
    --slot ${SLOTS}_recv --start -o proto_version=1 -o publication_names=bench --endpos="$endpos" -f /dev/null)")
  RESULTS+=("$(measure "tailgate with rules, publication of orders → stdout" "$ROWS" "$BIN" run --config "$WORK/rules.toml" --stop-at-lsn "$endpos")")
  RESULTS+=("$(measure "tailgate with rules, FOR ALL TABLES (filtered here) → stdout" "$ROWS" "$BIN" run --config "$WORK/clientside.toml" --stop-at-lsn "$endpos")")
  printf '%s\n' "${RESULTS[@]: -3}" >&2
}

# Snapshot workload: SNAPSHOT_ROWS existing rows of the benchmark table, read by psql \copy (the raw
# limit) and by tailgate's initial snapshot (snapshot = "initial_only": it exits when done); each
# reader SNAPSHOT_REPEAT times (3), the fastest run reported.
SNAPSHOT_REPEAT="${SNAPSHOT_REPEAT:-3}"
fresh_snapshot() { # fresh_snapshot <slot>: drop the slot and the offsets a previous try left
  "${PSQL[@]}" -d "$DB" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$1'" >/dev/null
  rm -f "$WORK/$1.offsets.json"
}
run_snapshot_workload() {
  local n="${SNAPSHOT_ROWS:-1000000}" title prefix
  title="snapshot of $n rows"
  "${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$DB'" >/dev/null
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
  "${PSQL[@]}" -d "$DB" -c "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, total numeric(10,2), status text, created_at timestamptz)" \
    -c "INSERT INTO orders SELECT g, g % 1000, g * 1.25, 'new', now() FROM generate_series(1, $n) g" -c "VACUUM ANALYZE orders"
  rm -f "$WORK"/*.offsets.json
  prefix="snap$(date +%s%N | tail -c 9)"
  for sink in stdout kafka; do
    local section=$'[sink]\ntype = "stdout"'
    [[ $sink == kafka ]] && section="$(printf '[sink]\ntype = "kafka"\nbrokers = "127.0.0.1:9092"\ntopic_prefix = "%s"' "$prefix")"
    config "snap_$sink" "$section" | sed -e 's/^snapshot = "never"/snapshot = "initial_only"/' -e 's/^create_publication = false/create_publication = true/' \
      -e "s/^publication = \"bench\"/publication = \"snap_$sink\"/" >"$WORK/snap_$sink.toml"
  done
  "${PSQL[@]}" -d "$DB" -c "\copy (SELECT * FROM orders) TO /dev/null" # warm-up: the table in the page cache
  echo "### $title" >&2
  title+=", fastest of $SNAPSHOT_REPEAT runs"
  RESULTS+=("**$title**||||")
  # Each try starts a new snapshot: a fresh slot (tailgate creates it) and no offsets.
  fresh_stdout() { fresh_snapshot snap_stdout; }
  fresh_kafka() { empty_broker; fresh_snapshot snap_kafka; }
  export REPEAT="$SNAPSHOT_REPEAT"
  RESULTS+=("$(measure "psql \\copy (select * from orders) → /dev/null" "$n" psql -h 127.0.0.1 -U postgres -d "$DB" -c "\copy (SELECT * FROM orders) TO /dev/null")")
  RESULTS+=("$(PREPARE=fresh_stdout measure "tailgate snapshot → stdout (/dev/null)" "$n" "$BIN" run --config "$WORK/snap_stdout.toml")")
  RESULTS+=("$(PREPARE=fresh_kafka measure "tailgate snapshot → Kafka (tansu)" "$n" "$BIN" run --config "$WORK/snap_kafka.toml")")
  printf '%s\n' "${RESULTS[@]: -3}" >&2
}

if [[ "${SNAPSHOT:-0}" == 1 ]]; then
  run_snapshot_workload
  OUT="bench/results/$(date -u +%Y-%m-%d)-snapshot.md"
elif [[ "${RULES:-0}" == 1 ]]; then
  run_filter_workload
  OUT="bench/results/$(date -u +%Y-%m-%d)-filters.md"
else
run_workload "$ROWS inserts, one transaction" \
  "INSERT INTO orders SELECT g, g % 1000, g * 1.25, 'new', now() FROM generate_series(1, $ROWS) g"
run_workload "$ROWS inserts, $TXN_ROWS-row transactions" \
  "DO \$\$ BEGIN FOR b IN 0..$((ROWS / TXN_ROWS - 1)) LOOP
     INSERT INTO orders SELECT g, g % 1000, g * 1.25, 'new', now() FROM generate_series(b * $TXN_ROWS + 1, (b + 1) * $TXN_ROWS) g;
     COMMIT; END LOOP; END \$\$"
fi

{
  echo "# Foundation benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); PostgreSQL $("${PSQL[@]}" -d postgres -c 'show server_version'); tansu 0.6.0 (memory storage); tailgate release build."
  for sink in $SINKS; do
    case $sink in
      nats) echo "NATS: $(/usr/sbin/nats-server --version), JetStream file storage, one replica; every record's PubAck awaited (4,096 in flight)." ;;
      rabbitmq) echo "RabbitMQ: $(rabbitmqctl version 2>/dev/null), persistent messages to a durable classic queue, publisher confirms (1,024 in flight)." ;;
      redis) echo "Redis $(redis-cli INFO server | sed -n 's/^redis_version:\(.*\)\r$/\1/p') on 127.0.0.1 (no persistence), default [sink] settings." ;;
      http) echo "HTTP receiver: Python http.server on 127.0.0.1 (reads each body, answers 200), default [sink] settings with a secret (signed)." ;;
    esac
  done
  if [[ "${SNAPSHOT:-0}" == 1 ]]; then
    echo "Command: \`SNAPSHOT=1 bench/run.sh\` (SNAPSHOT_ROWS=${SNAPSHOT_ROWS:-1000000}, SNAPSHOT_REPEAT=$SNAPSHOT_REPEAT). Each row is the fastest of $SNAPSHOT_REPEAT runs (peak RSS: the highest of them)."
  else
    echo "Command: \`HTTP=$HTTP SINKS=\"$SINKS\" bench/run.sh\` (ROWS=$ROWS, TXN_ROWS=$TXN_ROWS). Each reader drains its own slot holding the same backlog."
  fi
  echo
  echo "| reader | wall s | events/s | CPU s per 1M events | peak RSS MB |"
  echo "|---|---:|---:|---:|---:|"
  for row in "${RESULTS[@]}"; do echo "| ${row//|/ | } |"; done
} >"$OUT"
cat "$OUT"
