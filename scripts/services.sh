#!/usr/bin/env bash
# Sets up and starts everything tailgate's tests, quickstart and benchmarks talk to, idempotently:
#   - the local PostgreSQL 15: wal_level=logical (restart when needed), replication in pg_hba.conf,
#     roles for the SCRAM and MD5 authentication tests;
#   - the local MariaDB (127.0.0.1:3306): row binlog with full images and metadata (restart when needed),
#     users for the privilege tests;
#   - a real MySQL 9.7 on 127.0.0.1:3307 with GTIDs, unpacked from Debian sid's packages into a cache
#     folder (its binaries need sid's glibc, so they run through sid's own loader);
#   - the Kafka-compatible broker tansu 0.6.0 on 127.0.0.1:9092 (built once into a cache folder);
#   - Redis on 127.0.0.1:6379, nothing on disk (started only when it does not answer);
#   - a test CA and certificates under $CACHE/tls, with TLS on in the three databases and TLS-only
#     and client-certificate users/roles for the TLS tests.
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

# The test PKI for the TLS tests, generated once with openssl under $CACHE/tls: a test CA, a server
# certificate for localhost/127.0.0.1, a client certificate (CN tailgate_cert: the PostgreSQL role of
# the cert-auth test; also the MySQL REQUIRE X509 user's) and a second CA that signs nothing we trust.
# Each server gets its own copy of the server key (PostgreSQL refuses a key others can read).
TLS="$CACHE/tls"
tls_certs() {
  command -v openssl >/dev/null || { log "installing openssl"; apt-get install -y -q openssl >/dev/null; }
  mkdir -p "$TLS"
  if [[ ! -f "$TLS/ca.pem" || ! -f "$TLS/client-key.pem" || ! -f "$TLS/other-ca.pem" ]]; then
    log "generating the test CA and certificates in $TLS"
    local tmp; tmp=$(mktemp -d)
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tailgate test CA" \
      -keyout "$tmp/ca-key.pem" -out "$tmp/ca.pem" 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tailgate untrusted CA" \
      -keyout "$tmp/other-ca-key.pem" -out "$tmp/other-ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$tmp/server-key.pem" \
      -out "$tmp/server.csr" 2>/dev/null
    printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n' >"$tmp/server.ext"
    openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca-key.pem" -CAcreateserial \
      -days 3650 -sha256 -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=tailgate_cert" -keyout "$tmp/client-key.pem" \
      -out "$tmp/client.csr" 2>/dev/null
    printf 'basicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n' >"$tmp/client.ext"
    openssl x509 -req -in "$tmp/client.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca-key.pem" -CAcreateserial \
      -days 3650 -sha256 -extfile "$tmp/client.ext" -out "$tmp/client.pem" 2>/dev/null
    cp "$tmp"/{ca,ca-key,other-ca,server,server-key,client,client-key}.pem "$TLS/"
    rm -rf "$tmp"
  fi
  # Certificates readable by all; keys by their owner only (libpq refuses a client key others can read).
  # The servers use their own key copies.
  chmod 0755 "$TLS"
  chmod 0644 "$TLS"/{ca,other-ca,server,client}.pem
  chmod 0600 "$TLS"/{ca-key,server-key,client-key}.pem
  if id postgres >/dev/null 2>&1; then
    install -d -o postgres -g postgres -m 0700 /etc/postgresql/tailgate-tls
    install -o postgres -g postgres -m 0600 "$TLS/server-key.pem" /etc/postgresql/tailgate-tls/server-key.pem
    install -o postgres -g postgres -m 0644 "$TLS/server.pem" /etc/postgresql/tailgate-tls/server.pem
    install -o postgres -g postgres -m 0644 "$TLS/ca.pem" /etc/postgresql/tailgate-tls/ca.pem
  fi
  if id mysql >/dev/null 2>&1; then
    install -d -o mysql -g mysql -m 0750 /etc/mysql/tailgate-tls
    install -o mysql -g mysql -m 0600 "$TLS/server-key.pem" /etc/mysql/tailgate-tls/server-key.pem
    install -o mysql -g mysql -m 0644 "$TLS/server.pem" /etc/mysql/tailgate-tls/server.pem
    install -o mysql -g mysql -m 0644 "$TLS/ca.pem" /etc/mysql/tailgate-tls/ca.pem
  fi
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
  # TLS with the test certificates (tls_certs), in a file of its own; PostgreSQL reloads TLS settings
  # on SIGHUP, so no restart is needed.
  local tls_conf="$PG_ETC/conf.d/60-tailgate-tls.conf" tls_want
  tls_want=$'# written by tailgate scripts/services.sh: TLS with the test certificates\nssl = on\nssl_cert_file = \'/etc/postgresql/tailgate-tls/server.pem\'\nssl_key_file = \'/etc/postgresql/tailgate-tls/server-key.pem\'\nssl_ca_file = \'/etc/postgresql/tailgate-tls/ca.pem\'\n'
  if [[ ! -f "$tls_conf" ]] || [[ "$(cat "$tls_conf")"$'\n' != "$tls_want" ]]; then
    printf '%s' "$tls_want" >"$tls_conf"
    restart=$((restart | 2))
  fi
  [[ "$("${PSQL[@]}" -c 'show ssl_ca_file')" == /etc/postgresql/tailgate-tls/ca.pem ]] || restart=$((restart | 2))

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
  # TLS test roles: tailgate_tls only over TLS (SCRAM), tailgate_cert by client certificate.
  local tls_marker="# tailgate: TLS test roles"
  if ! grep -qF "$tls_marker" "$hba"; then
    local tmp; tmp=$(mktemp)
    {
      echo "$tls_marker"
      echo "hostssl   all          tailgate_tls   127.0.0.1/32  scram-sha-256"
      echo "hostssl   replication  tailgate_tls   127.0.0.1/32  scram-sha-256"
      echo "hostnossl all          tailgate_tls   127.0.0.1/32  reject"
      echo "hostnossl replication  tailgate_tls   127.0.0.1/32  reject"
      echo "hostssl   all          tailgate_cert  127.0.0.1/32  cert"
      echo "hostssl   replication  tailgate_cert  127.0.0.1/32  cert"
      echo "hostnossl all          tailgate_cert  127.0.0.1/32  reject"
      echo "hostnossl replication  tailgate_cert  127.0.0.1/32  reject"
      echo "# end tailgate TLS"
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
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tailgate_tls') THEN
    SET password_encryption = 'scram-sha-256';
    CREATE ROLE tailgate_tls LOGIN REPLICATION SUPERUSER PASSWORD 'tls-secret';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tailgate_cert') THEN
    CREATE ROLE tailgate_cert LOGIN REPLICATION SUPERUSER;
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

# Stops tansu and starts it again: its memory storage keeps every record ever produced, and a
# broker holding gigabytes answers more slowly, so benchmarks start each Kafka run on an empty one.
tansu_restart() {
  local pid
  pid=$(cat "$CACHE/run/tansu.pid" 2>/dev/null || true)
  [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  pkill -f "$TANSU broker --listener-url tcp://127.0.0.1:9092" 2>/dev/null || true
  wait_for 30 "tansu to stop" bash -c '! (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null'
  tansu
}

# Kafka over TLS for the sink's TLS tests: tansu 0.6.0 cannot terminate TLS itself (its --cert and
# --key are mutually exclusive), so Debian's stunnel4 does, in front of two more tansu brokers whose
# advertised listeners are stunnel's ports:
#   127.0.0.1:9193  TLS (server certificate from the test CA)  -> tansu on 127.0.0.1:9192
#   127.0.0.1:9195  mutual TLS (client certificate required)   -> tansu on 127.0.0.1:9194
# and a tansu that requires SASL on 127.0.0.1:9196 (it has no users: `tansu user create` cannot add
# one to an authenticating broker, so it only proves that a refused login is reported clearly).
# Needs the test certificates of tls_certs.
kafka_tls() {
  local tls="$CACHE/tls" run="$CACHE/run"
  [[ -f "$tls/server.pem" ]] || { log "no test certificates in $tls (tls_certs)"; return 1; }
  command -v stunnel4 >/dev/null || { log "installing stunnel4"; apt-get update -qq && apt-get install -y -qq stunnel4 >/dev/null; }
  mkdir -p "$run"
  local port
  for port in 9192 9194; do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      log "starting tansu on 127.0.0.1:$port (behind stunnel on $((port + 1)))"
      nohup "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$((port + 1))" \
        --storage-engine memory://tansu/ >"$run/tansu-$port.log" 2>&1 &
      echo $! >"$run/tansu-$port.pid"
      wait_for 30 "tansu on $port" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
    fi
  done
  if ! (exec 3<>/dev/tcp/127.0.0.1/9196) 2>/dev/null; then
    log "starting tansu with SASL on 127.0.0.1:9196"
    nohup "$TANSU" broker --listener-url tcp://127.0.0.1:9196 --advertised-listener-url tcp://127.0.0.1:9196 \
      --storage-engine memory://tansu/ --authentication >"$run/tansu-9196.log" 2>&1 &
    echo $! >"$run/tansu-9196.pid"
    wait_for 30 "tansu on 9196" bash -c "exec 3<>/dev/tcp/127.0.0.1/9196"
  fi
  local conf="$run/stunnel-kafka.conf" want
  want="; written by tailgate scripts/services.sh: TLS in front of the test brokers
pid = $run/stunnel-kafka.pid
foreground = no
output = $run/stunnel-kafka.log
[kafka-tls]
accept = 127.0.0.1:9193
connect = 127.0.0.1:9192
cert = $tls/server.pem
key = $tls/server-key.pem
[kafka-mtls]
accept = 127.0.0.1:9195
connect = 127.0.0.1:9194
cert = $tls/server.pem
key = $tls/server-key.pem
CAfile = $tls/ca.pem
verify = 2"
  if [[ ! -f "$conf" ]] || [[ "$(cat "$conf")" != "$want" ]]; then
    printf '%s\n' "$want" >"$conf"
    [[ -f "$run/stunnel-kafka.pid" ]] && kill "$(cat "$run/stunnel-kafka.pid")" 2>/dev/null || true
    sleep 0.5
  fi
  if ! (exec 3<>/dev/tcp/127.0.0.1/9195) 2>/dev/null; then
    log "starting stunnel for Kafka over TLS (9193, mutual TLS on 9195)"
    stunnel4 "$conf"
    wait_for 30 "stunnel" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9195'
  fi
  log "Kafka over TLS ready on 127.0.0.1:9193 (mutual TLS on 9195, SASL required on 9196)"
}

# NATS with JetStream on 127.0.0.1:4222 (Debian's nats-server), for the NATS sink's tests.
nats() {
  if [[ ! -x /usr/sbin/nats-server ]]; then
    log "installing nats-server"
    apt-get install -y -q nats-server >/dev/null
  fi
  if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    log "starting nats-server with JetStream on 127.0.0.1:4222"
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
    wait_for 30 "nats-server" bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222'
  fi
  log "NATS ready on 127.0.0.1:4222"
}

# RabbitMQ on 127.0.0.1:5672 with guest/guest (Debian's rabbitmq-server), for the RabbitMQ sink's tests.
rabbitmq() {
  if ! command -v rabbitmqctl >/dev/null; then
    log "installing rabbitmq-server"
    apt-get install -y -q rabbitmq-server >/dev/null
  fi
  if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    log "starting RabbitMQ"
    # The node may run with its application stopped (a test's stop_app): start the application then.
    rabbitmqctl start_app >/dev/null 2>&1 || service rabbitmq-server start >/dev/null 2>&1 || rabbitmq-server -detached
    wait_for 90 "RabbitMQ" bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672'
  fi
  log "RabbitMQ ready on 127.0.0.1:5672"
}

# Users for the MySQL/MariaDB tests: a least-privilege CDC user and one without replication rights.
MYSQL_TEST_USERS_SQL="
CREATE USER IF NOT EXISTS 'tailgate_cdc'@'%' IDENTIFIED BY 'cdc-secret';
GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'tailgate_cdc'@'%';
CREATE USER IF NOT EXISTS 'tailgate_norepl'@'%' IDENTIFIED BY 'norepl-secret';
GRANT SELECT ON *.* TO 'tailgate_norepl'@'%';
CREATE USER IF NOT EXISTS 'tailgate_tls'@'%' IDENTIFIED BY 'tls-secret' REQUIRE SSL;
GRANT ALL PRIVILEGES ON *.* TO 'tailgate_tls'@'%';
CREATE USER IF NOT EXISTS 'tailgate_x509'@'%' IDENTIFIED BY 'x509-secret' REQUIRE X509;
GRANT ALL PRIVILEGES ON *.* TO 'tailgate_x509'@'%';
"

mariadb_server() {
  local conf_dir=/etc/mysql/mariadb.conf.d main_cnf=/etc/mysql/my.cnf restart=0
  local conf="$conf_dir/50-tailgate.cnf" want
  want=$'# written by tailgate scripts/services.sh: a row binlog for CDC\n[mysqld]\nserver_id = 1\nlog_bin = mysql-bin\nbinlog_format = ROW\nbinlog_row_image = FULL\nbinlog_row_metadata = FULL\nmax_connections = 500\n'
  mkdir -p "$conf_dir"
  if [[ ! -f "$conf" ]] || [[ "$(cat "$conf")"$'\n' != "$want" ]]; then
    printf '%s' "$want" >"$conf"
    restart=1
  fi
  # TLS with the test certificates (tls_certs), in a file of its own.
  local tls_conf="$conf_dir/51-tailgate-tls.cnf" tls_want
  tls_want=$'# written by tailgate scripts/services.sh: TLS with the test certificates\n[mysqld]\nssl_ca = /etc/mysql/tailgate-tls/ca.pem\nssl_cert = /etc/mysql/tailgate-tls/server.pem\nssl_key = /etc/mysql/tailgate-tls/server-key.pem\n'
  if [[ ! -f "$tls_conf" ]] || [[ "$(cat "$tls_conf")"$'\n' != "$tls_want" ]]; then
    printf '%s' "$tls_want" >"$tls_conf"
    restart=1
  fi
  if [[ -f "$main_cnf" ]] && ! grep -qF "!includedir $conf_dir" "$main_cnf"; then
    printf '\n!includedir %s/\n' "$conf_dir" >>"$main_cnf"
    restart=1
  fi
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    restart=1
  elif [[ "$(mariadb -N -e 'select @@log_bin, @@binlog_format, @@binlog_row_metadata, @@have_ssl')" != $'1\tROW\tFULL\tYES' ]]; then
    restart=1
  fi
  if ((restart)); then
    log "restarting MariaDB for the row binlog and TLS"
    mariadb-admin shutdown >/dev/null 2>&1 || true
    wait_for 60 "MariaDB to stop" bash -c '! pgrep -x mariadbd'
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    wait_for 60 "MariaDB" mariadb -e 'select 1'
  fi
  mariadb -e "$MYSQL_TEST_USERS_SQL"
  log "MariaDB ready: $(mariadb -N -e 'select concat(version(), " log_bin=", @@log_bin, " format=", @@binlog_format, " metadata=", @@binlog_row_metadata)')"
}

# Debian sid's mysql-server-core (9.7.4 when this was written); the folder is reused once unpacked.
MYSQL_ROOT="$CACHE/mysql-sid"
MYSQL_DATA="${TAILGATE_MYSQL_DATA:-$CACHE/mysql-data}"
MYSQL_RUN="$CACHE/run"
MYSQL_LOADER=("$MYSQL_ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$MYSQL_ROOT/usr/lib/x86_64-linux-gnu")

# Runs one of the unpacked MySQL programs (mysqld, mysql, mysqlbinlog, ...) through sid's loader.
mysql_tool() {
  local tool=$1; shift
  local path="$MYSQL_ROOT/usr/bin/$tool"
  [[ -x "$path" ]] || path="$MYSQL_ROOT/usr/sbin/$tool"
  "${MYSQL_LOADER[@]}" "$path" "$@"
}

mysql_install() {
  [[ -x "$MYSQL_ROOT/usr/sbin/mysqld" ]] && return 0
  log "downloading MySQL from Debian sid into $MYSQL_ROOT (once, ~55 MB)"
  local apt_dir mirror
  apt_dir=$(mktemp -d)
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  mkdir -p "$apt_dir"/{state/lists/partial,cache/archives/partial,etc/apt.conf.d,etc/preferences.d,etc/sources.list.d,debs}
  touch "$apt_dir/state/status"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$apt_dir/etc/sources.list"
  # A private apt configuration: the system's own apt state stays untouched. Check-Valid-Until is off
  # because the mirror may be a dated snapshot whose Release file has expired.
  cat >"$apt_dir/apt.conf" <<APT
Dir::State "$apt_dir/state";
Dir::State::status "$apt_dir/state/status";
Dir::Cache "$apt_dir/cache";
Dir::Etc::SourceList "$apt_dir/etc/sources.list";
Dir::Etc::SourceParts "$apt_dir/etc/sources.list.d";
Dir::Etc::Parts "$apt_dir/etc/apt.conf.d";
Dir::Etc::Preferences "$apt_dir/etc/preferences";
Dir::Etc::PreferencesParts "$apt_dir/etc/preferences.d";
APT::Architecture "amd64";
APT::Architectures "amd64";
Acquire::Check-Valid-Until "false";
APT::Sandbox::User "root";
APT
  APT_CONFIG="$apt_dir/apt.conf" apt-get update -qq
  local packages
  packages=$(APT_CONFIG="$apt_dir/apt.conf" apt-cache depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances mysql-server-core mysql-client-core \
    | grep -v '^[ <]' | grep -vE '^(perl|libperl)|-perl$' | sort -u)
  (cd "$apt_dir/debs" && APT_CONFIG="$apt_dir/apt.conf" apt-get download -qq $packages 2>/dev/null)
  local unpack="$MYSQL_ROOT.tmp"
  rm -rf "$unpack" && mkdir -p "$unpack"
  for deb in "$apt_dir"/debs/*.deb; do dpkg-deb -x "$deb" "$unpack"; done
  [[ -x "$unpack/usr/sbin/mysqld" ]] || { log "MySQL download failed: no mysqld in the packages"; return 1; }
  mv "$unpack" "$MYSQL_ROOT"
  rm -rf "$apt_dir"
}

mysql_server() {
  mysql_install
  mysql_tool mysqld --version >/dev/null || { log "the unpacked mysqld does not run; remove $MYSQL_ROOT and retry"; return 1; }
  mkdir -p "$MYSQL_RUN"
  local cnf="$MYSQL_RUN/mysql.cnf"
  cat >"$cnf" <<CNF
# written by tailgate scripts/services.sh: MySQL for tailgate's tests (GTIDs, row binlog)
[mysqld]
basedir = $MYSQL_ROOT/usr
datadir = $MYSQL_DATA
plugin-dir = $MYSQL_ROOT/usr/lib/mysql/plugin
lc-messages-dir = $MYSQL_ROOT/usr/share/mysql
character-sets-dir = $MYSQL_ROOT/usr/share/mysql/charsets
socket = $MYSQL_RUN/mysql.sock
pid-file = $MYSQL_RUN/mysql.pid
log-error = $MYSQL_RUN/mysql.err
secure-file-priv =
port = 3307
bind-address = 127.0.0.1
mysqlx = OFF
user = root
server-id = 1
log-bin = binlog
binlog-format = ROW
binlog-row-image = FULL
binlog-row-metadata = FULL
gtid-mode = ON
enforce-gtid-consistency = ON
performance-schema = OFF
innodb-buffer-pool-size = 64M
max-connections = 500
ssl-ca = $TLS/ca.pem
ssl-cert = $TLS/server.pem
ssl-key = $TLS/server-key.pem
CNF
  if [[ ! -d "$MYSQL_DATA/mysql" ]]; then
    log "initializing MySQL data in $MYSQL_DATA"
    rm -rf "$MYSQL_DATA"
    mysql_tool mysqld --defaults-file="$cnf" --initialize-insecure
  fi
  if ! mysql_tool mysql --socket="$MYSQL_RUN/mysql.sock" -uroot -e 'select 1' >/dev/null 2>&1; then
    log "starting MySQL on 127.0.0.1:3307"
    nohup "${MYSQL_LOADER[@]}" "$MYSQL_ROOT/usr/sbin/mysqld" --defaults-file="$cnf" >"$MYSQL_RUN/mysqld.out" 2>&1 &
    wait_for 60 "MySQL" mysql_tool mysql --socket="$MYSQL_RUN/mysql.sock" -uroot -e 'select 1'
  fi
  # root over TCP for the tests (the socket user root@localhost has no password).
  mysql_tool mysql --socket="$MYSQL_RUN/mysql.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';
    GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
    $MYSQL_TEST_USERS_SQL
    CREATE USER IF NOT EXISTS 'tailgate_sha2'@'%' IDENTIFIED WITH caching_sha2_password BY 'sha2-secret';
    GRANT ALL PRIVILEGES ON *.* TO 'tailgate_sha2'@'%';"
  # A server started before TLS was configured takes the test certificates without a restart.
  if [[ "$(mysql_tool mysql --socket="$MYSQL_RUN/mysql.sock" -uroot -N -e 'select @@ssl_ca')" != "$TLS/ca.pem" ]]; then
    mysql_tool mysql --socket="$MYSQL_RUN/mysql.sock" -uroot -e "
      SET GLOBAL ssl_ca = '$TLS/ca.pem'; SET GLOBAL ssl_cert = '$TLS/server.pem';
      SET GLOBAL ssl_key = '$TLS/server-key.pem'; ALTER INSTANCE RELOAD TLS;"
  fi
  # The server's RSA key for caching_sha2_password, where the tests pin it (server-public-key-path).
  cp "$MYSQL_DATA/public_key.pem" "$TLS/mysql-public-key.pem" 2>/dev/null && chmod 0644 "$TLS/mysql-public-key.pem" || true
  log "MySQL ready: $(mysql_tool mysql --socket="$MYSQL_RUN/mysql.sock" -uroot -N -e 'select concat(version(), " gtid_mode=", @@gtid_mode, " port=", @@port)')"
}

# A second MySQL 9.7 on 127.0.0.1:3308 replicating from the first by GTID auto-position: the
# failover test starts it, promotes it and stops it (`mysql-replica-start` / `mysql-replica-stop`).
# Its data starts empty each time: it copies the primary's history through replication.
MYSQL_REPLICA_DATA="$CACHE/mysql-replica-data"
mysql_replica_start() {
  mysql_install
  mkdir -p "$MYSQL_RUN"
  local cnf="$MYSQL_RUN/mysql-replica.cnf"
  cat >"$cnf" <<CNF
# written by tailgate scripts/services.sh: a GTID replica of the test MySQL, for the failover test
[mysqld]
basedir = $MYSQL_ROOT/usr
datadir = $MYSQL_REPLICA_DATA
plugin-dir = $MYSQL_ROOT/usr/lib/mysql/plugin
lc-messages-dir = $MYSQL_ROOT/usr/share/mysql
character-sets-dir = $MYSQL_ROOT/usr/share/mysql/charsets
socket = $MYSQL_RUN/mysql-replica.sock
pid-file = $MYSQL_RUN/mysql-replica.pid
log-error = $MYSQL_RUN/mysql-replica.err
secure-file-priv =
port = 3308
bind-address = 127.0.0.1
mysqlx = OFF
user = root
server-id = 2
log-bin = binlog
log-replica-updates = ON
binlog-format = ROW
binlog-row-image = FULL
binlog-row-metadata = FULL
gtid-mode = ON
enforce-gtid-consistency = ON
performance-schema = OFF
innodb-buffer-pool-size = 32M
max-connections = 200
skip-replica-start = ON
CNF
  local sock="$MYSQL_RUN/mysql-replica.sock"
  if ! mysql_tool mysql --socket="$sock" -uroot -e 'select 1' >/dev/null 2>&1; then
    # A replica that does not answer but still runs must be gone before its files are: a mysqld whose
    # redo log is deleted under it logs an error per attempt, gigabytes a minute, until the disk is full.
    replica_kill
    rm -rf "$MYSQL_REPLICA_DATA"
    mysql_tool mysqld --defaults-file="$cnf" --initialize-insecure
    nohup "${MYSQL_LOADER[@]}" "$MYSQL_ROOT/usr/sbin/mysqld" --defaults-file="$cnf" >"$MYSQL_RUN/mysqld-replica.out" 2>&1 &
    wait_for 60 "the MySQL replica" mysql_tool mysql --socket="$sock" -uroot -e 'select 1'
  fi
  # Provisioned at the primary's present (as if restored from a backup taken now: the primary's
  # older binlogs may be purged) and limited to the failover test's databases, which are created
  # after it starts.
  local executed
  executed=$(mysql_tool mysql --socket="$MYSQL_RUN/mysql.sock" -uroot -N -e 'SELECT @@GLOBAL.gtid_executed' | tr -d '\n')
  mysql_tool mysql --socket="$sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';
    GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
    STOP REPLICA;
    RESET BINARY LOGS AND GTIDS;
    SET GLOBAL gtid_purged = '$executed';
    CHANGE REPLICATION FILTER REPLICATE_WILD_DO_TABLE = ('${2:-tg_my_failover%.%}');
    CHANGE REPLICATION SOURCE TO SOURCE_HOST = '127.0.0.1', SOURCE_PORT = 3307, SOURCE_USER = 'root',
      SOURCE_PASSWORD = '', SOURCE_AUTO_POSITION = 1, GET_SOURCE_PUBLIC_KEY = 1;
    START REPLICA;"
  log "MySQL replica ready on 127.0.0.1:3308 (from 3307)"
}

# Kills the replica's mysqld, if one runs, and waits until it is gone.
replica_kill() {
  # '[m]ysqld' matches mysqld's command line but not the pgrep/bash lines that carry the pattern.
  local pattern="[m]ysqld --defaults-file=$MYSQL_RUN/mysql-replica.cnf"
  pkill -9 -f "$pattern" 2>/dev/null || true
  wait_for 30 "the MySQL replica to exit" bash -c "! pgrep -f '$pattern'"
  rm -f "$MYSQL_RUN/mysql-replica.pid"
}

mysql_replica_stop() {
  local sock="$MYSQL_RUN/mysql-replica.sock"
  mysql_tool mysql --socket="$sock" -uroot -e 'SHUTDOWN' >/dev/null 2>&1 || true
  wait_for 60 "the MySQL replica to stop" bash -c "! (exec 3<>/dev/tcp/127.0.0.1/3308) 2>/dev/null" || true
  replica_kill
  rm -rf "$MYSQL_REPLICA_DATA" "$MYSQL_RUN/mysql-replica.err"
  log "MySQL replica stopped"
}

# Redis for the Redis Streams sink tests, on 127.0.0.1:6379 with nothing kept on disk (the machines
# that run the tests usually start it already; this only starts it when it does not answer).
redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then return 0; fi
  command -v redis-server >/dev/null || { log "installing redis-server"; apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
  mkdir -p /var/lib/redis /var/log/redis
  log "starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis \
    --logfile /var/log/redis/ci.log
  wait_for 30 "Redis" redis-cli -h 127.0.0.1 -p 6379 ping
}

case "${1:-all}" in
  postgres) tls_certs; postgres ;;
  redis) redis ;;
  mariadb) tls_certs; mariadb_server ;;
  mysql) tls_certs; mysql_server ;;
  kafka | tansu) tansu ;;
  kafka-restart | tansu-restart) tansu_restart ;;
  kafka-tls) tls_certs; kafka_tls ;;
  nats) nats ;;
  rabbitmq) rabbitmq ;;
  mysql-replica-start) mysql_replica_start "$@" ;;
  mysql-replica-stop) mysql_replica_stop ;;
  tls) tls_certs ;;
  all) tls_certs; postgres; mariadb_server; mysql_server; tansu; kafka_tls; redis; nats; rabbitmq ;;
  *) echo "usage: $0 [all|tls|postgres|mariadb|mysql|kafka|kafka-restart|kafka-tls|redis|nats|rabbitmq|mysql-replica-start|mysql-replica-stop]" >&2; exit 2 ;;
esac
