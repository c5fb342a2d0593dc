#!/usr/bin/env bash
# Quickstart: a demo database with a little traffic, and tailgate streaming its changes.
#   scripts/quickstart.sh            # to the stdout sink (no broker needed), one JSON line per event
#   scripts/quickstart.sh kafka      # to Kafka (tansu on 127.0.0.1:9092), then reads the topic back
#   scripts/quickstart.sh mysql      # MariaDB (127.0.0.1:3306, row binlog) instead of PostgreSQL, to stdout
#   scripts/quickstart.sh mysql kafka
# Runs for DURATION seconds (default 10), then stops tailgate with SIGTERM and shows its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=postgres
if [[ "${1:-}" == mysql ]]; then SOURCE=mysql; shift; fi
MODE="${1:-stdout}"
DURATION="${DURATION:-10}"
WORK="${TMPDIR:-/tmp}/tailgate-quickstart"
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q)
mkdir -p "$WORK"

if [[ "$MODE" == kafka ]]; then bash scripts/services.sh all
elif [[ "$SOURCE" == mysql ]]; then bash scripts/services.sh mariadb
else bash scripts/services.sh postgres; fi
cargo build --quiet -p tailgate --bin tailgate
[[ "$MODE" == kafka ]] && cargo build --quiet -p tailgate-kafka --example consume

echo "== demo database 'shop' ($SOURCE)" >&2
if [[ "$SOURCE" == mysql ]]; then
  MARIADB=(mariadb -h 127.0.0.1 -P 3306 -u root)
  "${MARIADB[@]}" -e "DROP DATABASE IF EXISTS shop; CREATE DATABASE shop"
  "${MARIADB[@]}" shop -e "CREATE TABLE customers (id int AUTO_INCREMENT PRIMARY KEY, name varchar(100) NOT NULL, email varchar(255));
    CREATE TABLE orders (id int AUTO_INCREMENT PRIMARY KEY, customer_id int, total decimal(10,2), status varchar(20),
                         created_at timestamp(6) DEFAULT CURRENT_TIMESTAMP(6));
    INSERT INTO customers (name, email) VALUES ('existing customer', 'old@example.com')"  # arrives through the initial snapshot (op r)
  SOURCE_SECTION=$'type = "mysql"\nurl = "mysql://root@127.0.0.1:3306/shop"\nserver_id = 5400'
  run_sql() { "${MARIADB[@]}" shop -e "$1"; }
else
  "${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'tailgate_shop' AND NOT active" >/dev/null
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS shop" -c "CREATE DATABASE shop" 2>/dev/null
  "${PSQL[@]}" -d shop -c "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text)" \
    -c "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, total numeric(10,2), status text, created_at timestamptz DEFAULT now())" \
    -c "INSERT INTO customers (name, email) VALUES ('existing customer', 'old@example.com')"  # arrives through the initial snapshot (op r)
  SOURCE_SECTION=$'type = "postgres"\nurl = "postgres://postgres@127.0.0.1:5432/shop"\nslot = "tailgate_shop"\npublication = "tailgate_shop"'
  run_sql() { "${PSQL[@]}" -d shop -c "$1"; }
fi
rm -f "$WORK/shop.offsets.json"

if [[ "$MODE" == kafka ]]; then
  SINK=$'[sink]\ntype = "kafka"\nbrokers = "127.0.0.1:9092"\ntopic_prefix = "shop"\n[sink.librdkafka]\n"compression.type" = "lz4"'
else
  SINK=$'[sink]\ntype = "stdout"\ntopic_prefix = "shop"'
fi
cat >"$WORK/shop.toml" <<TOML
name = "shop"
[source]
$SOURCE_SECTION
snapshot = "initial"
$SINK
[format]
decimal_handling = "precise"
tombstones = true
[offsets]
path = "$WORK/shop.offsets.json"
TOML
echo "== config: $WORK/shop.toml" >&2
./target/debug/tailgate check --config "$WORK/shop.toml" >&2

./target/debug/tailgate run --config "$WORK/shop.toml" &
TAILGATE=$!
trap 'kill $TAILGATE 2>/dev/null || true' EXIT
sleep 1

echo "== traffic for ${DURATION}s" >&2
end=$((SECONDS + DURATION)); i=0
while ((SECONDS < end)); do
  i=$((i + 1)); c=$((i + 1))
  run_sql "BEGIN;
    INSERT INTO customers (name, email) VALUES ('customer $i', 'c$i@example.com');
    INSERT INTO orders (customer_id, total, status) VALUES ($c, $i * 10.5, 'new');
    COMMIT;"
  run_sql "UPDATE orders SET status = 'paid' WHERE id = $i"
  run_sql "DELETE FROM orders WHERE id = $((i - 3))"
  sleep 0.5
done

kill -TERM $TAILGATE; wait $TAILGATE || true; trap - EXIT
echo "== checkpoint ($WORK/shop.offsets.json)" >&2
./target/debug/tailgate offsets show --config "$WORK/shop.toml" >&2
if [[ "$MODE" == kafka ]]; then
  TOPIC=shop.public.orders
  [[ "$SOURCE" == mysql ]] && TOPIC=shop.shop.orders
  echo "== reading $TOPIC back from Kafka" >&2
  ./target/debug/examples/consume --brokers 127.0.0.1:9092 --topic "$TOPIC" --max 5
fi
