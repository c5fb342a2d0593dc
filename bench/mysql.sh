#!/usr/bin/env bash
# MySQL/MariaDB benchmark: 200,000 inserts written to the binlog, in one transaction and in 1,000-row
# transactions, then read back from the server by
#   - the server's own decoder, `mariadb-binlog` / `mysqlbinlog --read-from-remote-server -v
#     --base64-output=decode-rows` to /dev/null (the raw limit: decoding every row to text),
#   - tailgate to the stdout sink (/dev/null) and to Kafka (tansu),
# each over exactly the same binlog range (tailgate's checkpoint is set to its start with
# `offsets reset --to-binlog`, and it stops at its end with `run --stop-at-binlog`). An unreported
# warm-up read puts the binlog in the page cache first. Reports wall time, events/s, ratio to the
# server's decoder, CPU seconds per million events and peak RSS; writes bench/results/<date>-mysql.md.
#
#   bench/mysql.sh                    # both servers, ROWS=200000 TXN_ROWS=1000
#   SERVERS=mariadb bench/mysql.sh    # one server
#   SNAPSHOT=1 bench/mysql.sh         # initial snapshot of SNAPSHOT_ROWS (1M) existing rows instead,
#                                     # against the client: mariadb/mysql -e "SELECT * FROM orders" > /dev/null
#   TLS=1 bench/mysql.sh              # also tailgate over TLS (ssl-mode=VERIFY_IDENTITY, the test CA of
#                                     # scripts/services.sh) to stdout, next to the plaintext drain
#   RULES=1 bench/mysql.sh            # filters: ROWS inserts into orders plus 9 other tables with ROWS/10
#                                     # each, in TXN_ROWS-row transactions; tailgate with all tables vs.
#                                     # include_tables = orders (+ an excluded column and a route)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
ROWS="${ROWS:-200000}"
TXN_ROWS="${TXN_ROWS:-1000}"
SERVERS="${SERVERS:-mariadb mysql}"
DB=tailgate_bench
WORK="${TMPDIR:-/tmp}/tailgate-bench-mysql"
OUT="bench/results/$(date -u +%Y-%m-%d)-mysql${OUT_SUFFIX:-}.md"
CACHE="${TAILGATE_CACHE:-$HOME/.cache/tailgate}"
MYSQL_ROOT="$CACHE/mysql-sid"
mkdir -p "$WORK"

bash scripts/services.sh all >&2
cargo build --release --quiet -p tailgate --bin tailgate
BIN=./target/release/tailgate
LOADER=("$MYSQL_ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$MYSQL_ROOT/usr/lib/x86_64-linux-gnu")

sql() { # sql <server> <statements...>: runs as root, tab-separated output without headers
  local server=$1; shift
  case $server in
    mariadb) mariadb -h 127.0.0.1 -P 3306 -u root -N -B "$@" ;;
    mysql) "${LOADER[@]}" "$MYSQL_ROOT/usr/bin/mysql" -h 127.0.0.1 -P 3307 -u root -N -B "$@" ;;
  esac
}

binlog_end() { # binlog_end <server>: "file pos"
  case $1 in
    mariadb) sql mariadb -e "SHOW MASTER STATUS" | awk '{print $1, $2}' ;;
    mysql) sql mysql -e "SHOW BINARY LOG STATUS" | awk '{print $1, $2}' ;;
  esac
}

decoder() { # decoder <server> <file> <start> <stop>: sets DECODER to the server's own binlog decoder, rows as text
  local server=$1 file=$2 start=$3 stop=$4
  case $server in
    mariadb) DECODER=(mariadb-binlog --read-from-remote-server --host=127.0.0.1 --port=3306 --user=root -v
      --base64-output=decode-rows --start-position="$start" --stop-position="$stop" "$file") ;;
    mysql) DECODER=("${LOADER[@]}" "$MYSQL_ROOT/usr/bin/mysqlbinlog" --read-from-remote-server --host=127.0.0.1 --port=3307
      --user=root -v --base64-output=decode-rows --start-position="$start" --stop-position="$stop" "$file") ;;
  esac
}

# measure <label> <events> <prepare> <command...>: runs the command REPEAT times (after `<prepare>`,
# a shell function or `true`) and prints the fastest run as a result row, with the peak RSS of all
# runs; /usr/bin/time gives CPU and peak RSS. This machine's run-to-run noise is large (±30%).
REPEAT="${REPEAT:-3}"
RESULTS=()
BASE_WALL=""
measure() {
  local label=$1 events=$2 prepare=$3 wall user sys; shift 3
  fastest_run "$label" "$REPEAT" "$prepare" "$@"
  read -r wall user sys <<<"$FASTEST"
  python3 - "$wall" "$user" "$sys" "$PEAK_RSS_KB" "$events" "${BASE_WALL:-$wall}" "$label" <<'PY'
import sys
wall, user, sys_, rss, events, base = map(float, sys.argv[1:7])
cpu = user + sys_
print(f"{sys.argv[7]}|{wall:.2f}|{events / wall:,.0f}|{base / wall:.2f}×|{cpu / events * 1e6:.2f}|{rss / 1024:.1f}")
PY
}

# Plaintext (ssl-mode=DISABLED; the default, PREFERRED, would use TLS on a server that offers it), or
# with TLS=1 in the environment of a call, VERIFY_IDENTITY with the test CA.
config() { # config <server> <name> <sink section>
  local port=3306 params="ssl-mode=DISABLED"
  [[ $1 == mysql ]] && port=3307
  [[ "${CONFIG_TLS:-0}" == 1 ]] && params="ssl-mode=VERIFY_IDENTITY&ssl-ca=$CACHE/tls/ca.pem"
  cat <<TOML
name = "$2"
[source]
type = "mysql"
url = "mysql://root@127.0.0.1:$port/$DB?$params"
snapshot = "never"
$3
[offsets]
path = "$WORK/$2.offsets.json"
TOML
}

run_workload() { # run_workload <server> <title> <sql file>
  local server=$1 title=$2 script=$3 start_file start_pos end_file end_pos prefix
  sql "$server" -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB; FLUSH BINARY LOGS"
  sql "$server" "$DB" -e "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, total decimal(10,2), status varchar(20), created_at datetime(6))"
  read -r start_file start_pos < <(binlog_end "$server")
  sql "$server" "$DB" <"$script"
  read -r end_file end_pos < <(binlog_end "$server")
  [[ "$start_file" == "$end_file" ]] || { echo "the workload spans binlog files $start_file..$end_file" >&2; exit 1; }
  prefix="bench$(date +%s%N | tail -c 9)"
  rm -f "$WORK"/*.offsets.json
  config "$server" bench_stdout $'[sink]\ntype = "stdout"' >"$WORK/stdout.toml"
  config "$server" bench_kafka "$(printf '[sink]\ntype = "kafka"\nbrokers = "127.0.0.1:9092"\ntopic_prefix = "%s"' "$prefix")" >"$WORK/kafka.toml"
  START="$start_file:$start_pos"
  echo "### $server: $title" >&2
  wait_idle
  decoder "$server" "$start_file" "$start_pos" "$end_pos"
  "${DECODER[@]}" >/dev/null # warm-up
  RESULTS+=("**$server $(sql "$server" -e 'SELECT VERSION()'): $title**|||||")
  BASE_WALL=""
  local base
  base=$(measure "$(decoder_name "$server") -v --base64-output=decode-rows → /dev/null" "$ROWS" true "${DECODER[@]}")
  BASE_WALL=$(echo "$base" | cut -d'|' -f2)
  RESULTS+=("$base")
  RESULTS+=("$(measure "tailgate → stdout (/dev/null)" "$ROWS" reset_stdout "$BIN" run --config "$WORK/stdout.toml" --stop-at-binlog "$end_file:$end_pos")")
  local rows=3
  if [[ "${TLS:-0}" == 1 ]]; then
    CONFIG_TLS=1 config "$server" bench_tls $'[sink]\ntype = "stdout"' >"$WORK/tls.toml"
    RESULTS+=("$(measure "tailgate over TLS (VERIFY_IDENTITY) → stdout (/dev/null)" "$ROWS" reset_tls "$BIN" run --config "$WORK/tls.toml" --stop-at-binlog "$end_file:$end_pos")")
    rows=4
  fi
  RESULTS+=("$(measure "tailgate → Kafka (tansu)" "$ROWS" reset_kafka "$BIN" run --config "$WORK/kafka.toml" --stop-at-binlog "$end_file:$end_pos")")
  printf '%s\n' "${RESULTS[@]: -$rows}" >&2
}

# Waits until the machine is idle (the server's background work after a big write, e.g. InnoDB purge
# and page flushing, would otherwise take a core from the first measurements): idle ≥ 90% over
# half a second, for at most 60 s.
wait_idle() {
  for ((i = 0; i < 120; i++)); do
    local a b
    a=($(head -1 /proc/stat)); sleep 0.5; b=($(head -1 /proc/stat))
    local total=0 k
    for k in 1 2 3 4 5 6 7 8; do total=$((total + b[k] - a[k])); done
    ((total > 0 && (b[4] - a[4]) * 100 / total >= 90)) && return 0
  done
  echo "the machine did not become idle; measuring anyway" >&2
}

# Before each tailgate run: its checkpoint back to the start of the workload.
reset_stdout() { "$BIN" offsets reset --config "$WORK/stdout.toml" --to-binlog "$START" >/dev/null; }
reset_tls() { "$BIN" offsets reset --config "$WORK/tls.toml" --to-binlog "$START" >/dev/null; }
reset_kafka() { empty_broker; "$BIN" offsets reset --config "$WORK/kafka.toml" --to-binlog "$START" >/dev/null; }

decoder_name() {
  case $1 in mariadb) echo mariadb-binlog ;; mysql) echo mysqlbinlog ;; esac
}

# Snapshot workload: SNAPSHOT_ROWS existing rows, read by the server's client (the raw limit: the
# text protocol to /dev/null) and by tailgate's initial snapshot (snapshot = "initial_only": it
# exits when done; its offsets file is removed before every run, so every run is a first run).
run_snapshot_workload() { # run_snapshot_workload <server>
  local server=$1 n="${SNAPSHOT_ROWS:-1000000}" prefix chunk=100000 first limit client
  case $server in
    mariadb) limit="SET SESSION max_recursive_iterations = 100000000;" ;;
    mysql) limit="SET SESSION cte_max_recursion_depth = 100000000;" ;;
  esac
  sql "$server" -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
  sql "$server" "$DB" -e "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, total decimal(10,2), status varchar(20), created_at datetime(6))"
  for ((first = 1; first <= n; first += chunk)); do
    { echo "$limit"; gen "$first" $((n - first + 1 < chunk ? n - first + 1 : chunk)); } | sql "$server" "$DB"
  done
  sql "$server" "$DB" -e "ANALYZE TABLE orders" >/dev/null
  prefix="snap$(date +%s%N | tail -c 9)"
  config "$server" snap_stdout $'[sink]\ntype = "stdout"' | sed 's/^snapshot = "never"/snapshot = "initial_only"/' >"$WORK/snap_stdout.toml"
  config "$server" snap_kafka "$(printf '[sink]\ntype = "kafka"\nbrokers = "127.0.0.1:9092"\ntopic_prefix = "%s"' "$prefix")" |
    sed 's/^snapshot = "never"/snapshot = "initial_only"/' >"$WORK/snap_kafka.toml"
  echo "### $server: snapshot of $n rows" >&2
  wait_idle
  sql "$server" "$DB" -e "SELECT * FROM orders" >/dev/null # warm-up: the table in the buffer pool
  RESULTS+=("**$server $(sql "$server" -e 'SELECT VERSION()'): snapshot of $n rows**|||||")
  BASE_WALL=""
  local base
  case $server in
    mariadb) client=(mariadb -h 127.0.0.1 -P 3306 -u root "$DB") ;;
    mysql) client=("${LOADER[@]}" "$MYSQL_ROOT/usr/bin/mysql" -h 127.0.0.1 -P 3307 -u root "$DB") ;;
  esac
  base=$(measure "$(client_name "$server") -e \"SELECT * FROM orders\" → /dev/null" "$n" true "${client[@]}" -e "SELECT * FROM orders")
  BASE_WALL=$(echo "$base" | cut -d'|' -f2)
  RESULTS+=("$base")
  RESULTS+=("$(measure "tailgate snapshot → stdout (/dev/null)" "$n" fresh_snapshot "$BIN" run --config "$WORK/snap_stdout.toml")")
  RESULTS+=("$(measure "tailgate snapshot → Kafka (tansu)" "$n" fresh_snapshot_empty_broker "$BIN" run --config "$WORK/snap_kafka.toml")")
  printf '%s\n' "${RESULTS[@]: -3}" >&2
}
fresh_snapshot() { rm -f "$WORK"/snap_*.offsets.json; }
fresh_snapshot_empty_broker() { empty_broker; fresh_snapshot; }

# Filter workload: what the table rules cost. The same binlog (orders + 9 other tables) read by the
# server's decoder, by tailgate capturing every table, and by tailgate with rules that keep orders
# only (the other tables' rows are skipped before decoding). events/s counts delivered events.
run_filter_workload() { # run_filter_workload <server>
  local server=$1 start_file start_pos end_file end_pos t b others=$((ROWS / 10)) limit script="$WORK/rules.sql"
  local title="1 of 10 tables included: $ROWS + 9×$others inserts, $TXN_ROWS-row transactions"
  case $server in
    mariadb) limit="SET SESSION max_recursive_iterations = 100000000;" ;;
    mysql) limit="SET SESSION cte_max_recursion_depth = 100000000;" ;;
  esac
  sql "$server" -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB; FLUSH BINARY LOGS"
  sql "$server" "$DB" -e "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, total decimal(10,2), status varchar(20), created_at datetime(6))"
  for t in 1 2 3 4 5 6 7 8 9; do sql "$server" "$DB" -e "CREATE TABLE other_$t LIKE orders"; done
  {
    echo "$limit"
    for ((b = 0; b < ROWS / TXN_ROWS; b++)); do
      echo "START TRANSACTION;"
      gen $((b * TXN_ROWS + 1)) "$TXN_ROWS"
      for t in 1 2 3 4 5 6 7 8 9; do gen $((b * TXN_ROWS / 10 + 1)) $((TXN_ROWS / 10)) | sed "s/^INSERT INTO orders/INSERT INTO other_$t/"; done
      echo "COMMIT;"
    done
  } >"$script"
  read -r start_file start_pos < <(binlog_end "$server")
  sql "$server" "$DB" <"$script"
  read -r end_file end_pos < <(binlog_end "$server")
  [[ "$start_file" == "$end_file" ]] || { echo "the workload spans binlog files $start_file..$end_file" >&2; exit 1; }
  rm -f "$WORK"/*.offsets.json
  config "$server" bench_stdout $'[sink]\ntype = "stdout"' >"$WORK/stdout.toml"
  { config "$server" bench_rules $'[sink]\ntype = "stdout"'
    printf '[filter]\ninclude_tables = ["%s\\\\.orders"]\nexclude_columns = ["%s\\\\.orders\\\\.created_at"]\n' "$DB" "$DB"
    printf '[[route]]\nmatch = "(.*)\\\\.%s\\\\.orders"\ntopic = "$1.orders.v2"\n' "$DB"
  } >"$WORK/rules.toml"
  START="$start_file:$start_pos"
  echo "### $server: $title" >&2
  wait_idle
  decoder "$server" "$start_file" "$start_pos" "$end_pos"
  "${DECODER[@]}" >/dev/null # warm-up
  RESULTS+=("**$server $(sql "$server" -e 'SELECT VERSION()'): $title**|||||")
  BASE_WALL=""
  local base
  base=$(measure "$(decoder_name "$server") -v --base64-output=decode-rows, all tables → /dev/null" $((ROWS + 9 * others)) true "${DECODER[@]}")
  BASE_WALL=$(echo "$base" | cut -d'|' -f2)
  RESULTS+=("$base")
  RESULTS+=("$(measure "tailgate, all tables → stdout (/dev/null)" $((ROWS + 9 * others)) reset_stdout "$BIN" run --config "$WORK/stdout.toml" --stop-at-binlog "$end_file:$end_pos")")
  RESULTS+=("$(measure "tailgate, rules: orders only → stdout (/dev/null)" "$ROWS" reset_rules "$BIN" run --config "$WORK/rules.toml" --stop-at-binlog "$end_file:$end_pos")")
  printf '%s\n' "${RESULTS[@]: -3}" >&2
}
reset_rules() { "$BIN" offsets reset --config "$WORK/rules.toml" --to-binlog "$START" >/dev/null; }
client_name() {
  case $1 in mariadb) echo mariadb ;; mysql) echo mysql ;; esac
}

# The two workloads as SQL scripts: numbers from a recursive CTE (both servers have them).
one_txn="$WORK/one.sql"
many_txn="$WORK/many.sql"
gen() { # gen <first> <count>: an INSERT of <count> rows from <first>
  echo "INSERT INTO orders WITH RECURSIVE n(i) AS (SELECT $1 UNION ALL SELECT i + 1 FROM n WHERE i < $(($1 + $2 - 1))) SELECT i, i % 1000, i * 1.25, 'new', NOW(6) FROM n;"
}
for server in $SERVERS; do
  if [[ "${SNAPSHOT:-0}" == 1 ]]; then
    run_snapshot_workload "$server"
    OUT="bench/results/$(date -u +%Y-%m-%d)-mysql-snapshot${OUT_SUFFIX:-}.md"
    continue
  fi
  if [[ "${RULES:-0}" == 1 ]]; then
    run_filter_workload "$server"
    OUT="bench/results/$(date -u +%Y-%m-%d)-mysql-filters${OUT_SUFFIX:-}.md"
    continue
  fi
  case $server in
    mariadb) limit="SET SESSION max_recursive_iterations = 100000000;" ;;
    mysql) limit="SET SESSION cte_max_recursion_depth = 100000000;" ;;
  esac
  { echo "$limit"; gen 1 "$ROWS"; } >"$one_txn"
  { echo "$limit"; for ((b = 0; b < ROWS / TXN_ROWS; b++)); do gen $((b * TXN_ROWS + 1)) "$TXN_ROWS"; done; } >"$many_txn"
  run_workload "$server" "$ROWS inserts, one transaction" "$one_txn"
  run_workload "$server" "$ROWS inserts, $TXN_ROWS-row transactions" "$many_txn"
done

{
  echo "# MySQL/MariaDB benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); tansu 0.6.0 (memory storage); tailgate release build."
  if [[ "${RULES:-0}" == 1 ]]; then
    echo "Command: \`RULES=1 bench/mysql.sh\` (ROWS=$ROWS, TXN_ROWS=$TXN_ROWS, SERVERS=\"$SERVERS\", REPEAT=$REPEAT). Every reader reads the same binlog range; events/s counts the events each delivers (all rows, or the orders rows only); each row is the fastest of $REPEAT runs (peak RSS: the highest of them)."
  elif [[ "${SNAPSHOT:-0}" == 1 ]]; then
    echo "Command: \`SNAPSHOT=1 bench/mysql.sh\` (SNAPSHOT_ROWS=${SNAPSHOT_ROWS:-1000000}, SERVERS=\"$SERVERS\", REPEAT=$REPEAT). Every reader reads the whole table from the server; each row is the fastest of $REPEAT runs (peak RSS: the highest of them)."
  else
    echo "Command: \`bench/mysql.sh\` (ROWS=$ROWS, TXN_ROWS=$TXN_ROWS, SERVERS=\"$SERVERS\", REPEAT=$REPEAT). Every reader reads the same binlog range from the server; each row is the fastest of $REPEAT runs (peak RSS: the highest of them)."
  fi
  echo
  echo "| reader | wall s | events/s | ratio to the raw reader | CPU s per 1M events | peak RSS MB |"
  echo "|---|---:|---:|---:|---:|---:|"
  for row in "${RESULTS[@]}"; do echo "| ${row//|/ | } |"; done
} >"$OUT"
cat "$OUT"
