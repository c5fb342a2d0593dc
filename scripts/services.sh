#!/usr/bin/env bash
# Sets up and starts everything tailgate's tests, quickstart and benchmarks talk to, idempotently:
#   - the local PostgreSQL 15: wal_level=logical (restart when needed), replication in pg_hba.conf,
#     roles for the SCRAM and MD5 authentication tests;
#   - the Kafka-compatible broker tansu 0.6.0 on 127.0.0.1:9092 (built once into a cache folder).
# Run it as root (it edits the server configuration). Safe to run again: it only changes what is missing.
set -euo pipefail

CACHE="${TAILGATE_CACHE:-$HOME/.cache/tailgate}"
TANSU_VERSION=0.6.0
TANSU="$CACHE/tansu-$TANSU_VERSION/bin/tansu"
PG_VERSION="${PG_VERSION:-$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)}"
PG_ETC="/etc/postgresql/$PG_VERSION/main"
PSQL=(psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq)

log() { printf '[services] %s\n' "$*" >&2; }

wait_for() { # wait_for <seconds> <description> <command...>
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "timed out waiting for $what"; return 1; fi
    sleep 0.3
  done
}

postgres() {
  [[ -n "$PG_VERSION" && -d "$PG_ETC" ]] || { log "no PostgreSQL cluster under /etc/postgresql"; return 1; }
  if ! "${PSQL[@]}" -c 'select 1' >/dev/null 2>&1; then
    log "starting PostgreSQL $PG_VERSION"
    pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main start || true
    wait_for 30 "PostgreSQL" "${PSQL[@]}" -c 'select 1'
  fi

  local conf="$PG_ETC/conf.d/50-tailgate.conf" restart=0
  local want
  want=$'# written by tailgate scripts/services.sh: logical decoding for CDC\nwal_level = logical\nmax_replication_slots = 32\nmax_wal_senders = 32\nwal_sender_timeout = 10s\n'
  if [[ ! -f "$conf" ]] || [[ "$(cat "$conf")"$'\n' != "$want" ]]; then
    printf '%s' "$want" >"$conf"
    restart=1
  fi
  [[ "$("${PSQL[@]}" -c 'show wal_level')" == logical ]] || restart=1

  # Replication connections need their own pg_hba lines ("all" does not match them). Password roles
  # for the authentication tests go first so that the trust lines do not shadow them.
  local hba="$PG_ETC/pg_hba.conf" marker="# tailgate: authentication test roles"
  if ! grep -qF "$marker" "$hba"; then
    local tmp; tmp=$(mktemp)
    {
      echo "$marker"
      echo "host    all          tailgate_scram  127.0.0.1/32  scram-sha-256"
      echo "host    replication  tailgate_scram  127.0.0.1/32  scram-sha-256"
      echo "host    all          tailgate_md5    127.0.0.1/32  md5"
      echo "host    replication  tailgate_md5    127.0.0.1/32  md5"
      echo "host    all          tailgate_norepl 127.0.0.1/32  scram-sha-256"
      echo "host    replication  tailgate_norepl 127.0.0.1/32  scram-sha-256"
      echo "# end tailgate"
      cat "$hba"
    } >"$tmp"
    cat "$tmp" >"$hba" && rm -f "$tmp"
    restart=$((restart | 2))
  fi
  if ! grep -qE '^host[[:space:]]+replication[[:space:]]+all[[:space:]]+127\.0\.0\.1/32' "$hba"; then
    # Same method as the existing "host all all 127.0.0.1/32" line (trust on the test machines).
    local method
    method=$(awk '$1=="host" && $2=="all" && $3=="all" && $4=="127.0.0.1/32" {print $5; exit}' "$hba")
    echo "host    replication  all  127.0.0.1/32  ${method:-scram-sha-256}" >>"$hba"
    restart=$((restart | 2))
  fi

  if ((restart & 1)); then
    log "restarting PostgreSQL $PG_VERSION for wal_level=logical"
    pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main restart
    wait_for 30 "PostgreSQL" "${PSQL[@]}" -c 'select 1'
  elif ((restart & 2)); then
    "${PSQL[@]}" -c 'select pg_reload_conf()' >/dev/null
  fi

  "${PSQL[@]}" <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tailgate_scram') THEN
    SET password_encryption = 'scram-sha-256';
    CREATE ROLE tailgate_scram LOGIN REPLICATION SUPERUSER PASSWORD 'scram-secret';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tailgate_md5') THEN
    SET password_encryption = 'md5';
    CREATE ROLE tailgate_md5 LOGIN REPLICATION SUPERUSER PASSWORD 'md5-secret';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tailgate_norepl') THEN
    SET password_encryption = 'scram-sha-256';
    CREATE ROLE tailgate_norepl LOGIN PASSWORD 'norepl-secret';
  END IF;
END $$;
SQL
  log "PostgreSQL $PG_VERSION ready: wal_level=$("${PSQL[@]}" -c 'show wal_level')"
}

tansu() {
  if [[ ! -x "$TANSU" ]]; then
    log "building tansu $TANSU_VERSION into $CACHE (once; 20-30 min on 2 cores)"
    mkdir -p "$CACHE"
    CARGO_TARGET_DIR="$CACHE/tansu-build" cargo install tansu --version "$TANSU_VERSION" --locked \
      --features dynostore --root "$CACHE/tansu-$TANSU_VERSION"
    rm -rf "$CACHE/tansu-build"
  fi
  if ! (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; then
    log "starting tansu on 127.0.0.1:9092 (memory storage)"
    mkdir -p "$CACHE/run"
    nohup "$TANSU" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
      --storage-engine memory://tansu/ >"$CACHE/run/tansu.log" 2>&1 &
    echo $! >"$CACHE/run/tansu.pid"
    wait_for 30 "tansu" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9092'
  fi
  log "tansu ready on 127.0.0.1:9092"
}

case "${1:-all}" in
  postgres) postgres ;;
  kafka | tansu) tansu ;;
  all) postgres; tansu ;;
  *) echo "usage: $0 [all|postgres|kafka]" >&2; exit 2 ;;
esac
