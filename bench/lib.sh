# Shared by bench/run.sh and bench/mysql.sh (sourced; expects $WORK).

# fastest_run <label> <runs> <prepare> <command...>: runs the command <runs> times, each after
# <prepare> (a shell function, or `true`), with /usr/bin/time. Sets FASTEST="wall user sys" of the
# fastest run and PEAK_RSS_KB, the highest peak RSS of all runs. A failing run stops the benchmark.
fastest_run() {
  local label=$1 runs=$2 prepare=$3; shift 3
  local run wall user sys rss
  FASTEST="" PEAK_RSS_KB=0
  for ((run = 0; run < runs; run++)); do
    "$prepare"
    /usr/bin/time -f '%e %U %S %M' -o "$WORK/time" "$@" >/dev/null 2>"$WORK/stderr" || {
      echo "FAILED: $label" >&2; cat "$WORK/stderr" >&2; exit 1; }
    read -r wall user sys rss <"$WORK/time"
    ((rss > PEAK_RSS_KB)) && PEAK_RSS_KB=$rss
    if [[ -z "$FASTEST" ]] || python3 -c "import sys; sys.exit(0 if $wall < ${FASTEST%% *} else 1)"; then
      FASTEST="$wall $user $sys"
    fi
  done
}

# Kafka runs start on an empty broker: tansu's memory storage keeps every record, and slows down as it fills.
empty_broker() { bash scripts/services.sh kafka-restart 2>/dev/null; }
