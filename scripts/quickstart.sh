#!/usr/bin/env bash
# Quickstart: a demo database with a little traffic, and tailgate streaming its changes.
#   scripts/quickstart.sh            # to the stdout sink (no broker needed), one JSON line per event
#   scripts/quickstart.sh kafka      # to Kafka (tansu on 127.0.0.1:9092), then reads the topic back
# Runs for DURATION seconds (default 10), then stops tailgate with SIGTERM and shows its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-stdout}"
DURATION="${DURATION:-10}"
WORK="${TMPDIR:-/tmp}/tailgate-quickstart"
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q)
mkdir -p "$WORK"

if [[ "$MODE" == kafka ]]; then bash scripts/services.sh all; else bash scripts/services.sh postgres; fi
cargo build --quiet -p tailgate --bin tailgate
[[ "$MODE" == kafka ]] && cargo build --quiet -p tailgate-kafka --example consume

echo "== demo database 'shop'" >&2
"${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'tailgate_shop' AND NOT active" >/dev/null
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS shop" -c "CREATE DATABASE shop" 2>/dev/null
"${PSQL[@]}" -d shop -c "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text)" \
  -c "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, total numeric(10,2), status text, created_at timestamptz DEFAULT now())" \
  -c "INSERT INTO customers (name, email) VALUES ('existing customer', 'old@example.com')"  # arrives through the initial snapshot (op r)
rm -f "$WORK/shop.offsets.json"

if [[ "$MODE" == kafka ]]; then
  SINK=$'[sink]\ntype = "kafka"\nbrokers = "127.0.0.1:9092"\ntopic_prefix = "shop"\n[sink.librdkafka]\n"compression.type" = "lz4"'
else
  SINK=$'[sink]\ntype = "stdout"\ntopic_prefix = "shop"'
fi
cat >"$WORK/shop.toml" <<TOML
name = "shop"
[source]
type = "postgres"
url = "postgres://postgres@127.0.0.1:5432/shop"
slot = "tailgate_shop"
publication = "tailgate_shop"
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
  "${PSQL[@]}" -d shop -c "BEGIN;
    INSERT INTO customers (name, email) VALUES ('customer $i', 'c$i@example.com');
    INSERT INTO orders (customer_id, total, status) VALUES ($c, $i * 10.5, 'new');
    COMMIT;" \
    -c "UPDATE orders SET status = 'paid' WHERE id = $i" \
    -c "DELETE FROM orders WHERE id = $((i - 3))"
  sleep 0.5
done

kill -TERM $TAILGATE; wait $TAILGATE || true; trap - EXIT
echo "== checkpoint ($WORK/shop.offsets.json)" >&2
./target/debug/tailgate offsets show --config "$WORK/shop.toml" >&2
if [[ "$MODE" == kafka ]]; then
  echo "== reading shop.public.orders back from Kafka" >&2
  ./target/debug/examples/consume --brokers 127.0.0.1:9092 --topic shop.public.orders --max 5
fi
