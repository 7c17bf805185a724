# shellcheck shell=bash
# Infrastructure for loadtest/run.sh: tools, build, ports, processes, load generators.
# Sourced, not run. Every process started here is recorded and stopped by stop_all,
# which run.sh calls from its EXIT trap.

LT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$LT_DIR/.." && pwd)"
SLUICEGATE="$ROOT/target/release/sluicegate"
STATIC429="$ROOT/target/release/examples/static429"
LT="python3 $LT_DIR/lt.py"

STARTED_PIDS=()
APT_UPDATED=0

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- tools -------------------------------------------------------------------------

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"
    fi
}

ensure_oha() {
    export PATH="$HOME/.cargo/bin:$PATH"
    # --output-format json and --db-url need a recent oha (1.x); reinstall an old one.
    command -v oha >/dev/null && oha --help 2>/dev/null | grep -q -- '--output-format' && return
    log "installing oha (cargo install oha --locked)"
    cargo install oha --locked >&2 || die "cargo install oha failed"
}

# ensure_apt COMMAND PACKAGE
ensure_apt() {
    command -v "$1" >/dev/null && return
    # nginx lives in /usr/sbin, which a non-login PATH may lack.
    if [ -x "/usr/sbin/$1" ]; then export PATH="$PATH:/usr/sbin"; return; fi
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        as_root apt-get update >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "installing $2 (apt-get install -y $2)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >&2 || die "apt-get install $2 failed"
    [ -x "/usr/sbin/$1" ] && export PATH="$PATH:/usr/sbin"
    command -v "$1" >/dev/null || die "$2 installed but $1 not found"
}

ensure_matplotlib() {
    python3 -c 'import matplotlib' 2>/dev/null && return
    log "installing matplotlib (pip install matplotlib)"
    python3 -m pip install matplotlib >&2 || die "pip install matplotlib failed"
}

build_release() {
    log "building: cargo build --release --bin sluicegate --example static429"
    (cd "$ROOT" && cargo build --release --bin sluicegate --example static429) >&2 \
        || die "release build failed"
}

# --- processes ---------------------------------------------------------------------


# start_bg LOGFILE COMMAND... : start COMMAND in the background, remember its pid in BG_PID.
start_bg() {
    local logfile=$1
    shift
    "$@" >"$logfile" 2>&1 &
    BG_PID=$!
    STARTED_PIDS+=("$BG_PID")
}

# stop_pid PID: SIGTERM, up to 10 s to exit, then SIGKILL.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid did not stop within 10 s after SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
}

# stop_all: stop every process this run started, newest first (load before servers).
stop_all() {
    local i
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${STARTED_PIDS[i]}"
    done
    STARTED_PIDS=()
}

# render TEMPLATE OUT KEY=VALUE... : copy TEMPLATE to OUT replacing @KEY@ with VALUE.
render() {
    local template=$1 out=$2 kv
    shift 2
    cp "$template" "$out"
    for kv in "$@"; do
        local k=${kv%%=*} v=${kv#*=}
        sed -i "s|@$k@|$v|g" "$out"
    done
    if grep -q '@[A-Z_]*@' "$out"; then die "unreplaced placeholder in $out"; fi
}

# start_emulator CONFIG NAME : `sluicegate emulate` on the config's emulator.listen.
# Sets EMU_PID.
start_emulator() {
    local config=$1 name=$2 addr
    addr=$(sed -n 's/^listen = "\(.*\)"/\1/p' "$config" | tail -n 1)
    NO_COLOR=1 SLUICEGATE_LOG=warn start_bg "$WORK/$name.emulator.log" "$SLUICEGATE" emulate --config "$config"
    EMU_PID=$BG_PID
    $LT wait-http "http://$addr/emulator/stats" 20 || die "emulator did not start (see $WORK/$name.emulator.log)"
}

# start_sluicegate CONFIG NAME LISTEN : `sluicegate serve`. Sets SG_PID.
start_sluicegate() {
    local config=$1 name=$2 listen=$3
    shift 3
    # Any further arguments are VAR=VALUE settings for this process alone.
    NO_COLOR=1 SLUICEGATE_LOG=${SLUICEGATE_LOG_LEVEL:-warn} start_bg "$WORK/$name.sluicegate.log" \
        env "$@" "$SLUICEGATE" serve --config "$config"
    SG_PID=$BG_PID
    $LT wait-http "http://$listen/healthz" 20 || die "sluicegate did not start (see $WORK/$name.sluicegate.log)"
}

# start_nginx NAME LISTEN EMU_LISTEN FUNCTION : nginx in the foreground under a temp prefix.
start_nginx() {
    local name=$1 listen=$2 emu=$3 function=$4 prefix="$WORK/nginx-$1"
    mkdir -p "$prefix"
    render "$LT_DIR/configs/nginx.conf" "$prefix/nginx.conf" \
        PREFIX="$prefix" NGINX_LISTEN="$listen" EMU_LISTEN="$emu" FUNCTION="$function"
    nginx -t -p "$prefix" -c "$prefix/nginx.conf" >"$prefix/test.log" 2>&1 \
        || die "nginx config test failed: $(cat "$prefix/test.log")"
    start_bg "$prefix/stdout.log" nginx -p "$prefix" -c "$prefix/nginx.conf"
    NGINX_PID=$BG_PID
    $LT wait-http "http://$listen/healthz" 20 || die "nginx did not start (see $prefix/error.log)"
    cp "$prefix/nginx.conf" "$OUT/configs/$name.nginx.conf"
}

# start_static429 LISTEN
start_static429() {
    start_bg "$WORK/static429.log" "$STATIC429" "$1"
    STATIC_PID=$BG_PID
    $LT wait-http "http://$1/" 20 || die "static429 did not start (see $WORK/static429.log)"
}

# --- load --------------------------------------------------------------------------

# Every generator runs under `timeout`, so even a wedged target cannot hold the run:
# the limit is the run's own duration plus a minute.
# It runs in the background and is waited for, so a signal to run.sh is handled at once
# (bash defers traps while a foreground child runs) and stop_all can end it.
bounded() {
    timeout --kill-after=5 "$((DURATION + 60))" "$@" &
    local pid=$!
    STARTED_PIDS+=("$pid")
    wait "$pid"
}

# run_oha SCENARIO LABEL URL OHA_ARGS... : one oha run of DURATION seconds.
# Writes raw/SCENARIO/LABEL.json (oha's JSON) and, with OHA_DB=1 when this oha can,
# LABEL.sqlite (one row per request: the over-time plots and per-status latency).
# Sets RUN_FILE, RUN_START, RUN_END.
run_oha() {
    local scenario=$1 label=$2 url=$3
    shift 3
    local dir="$OUT/raw/$scenario"
    mkdir -p "$dir"
    RUN_FILE="raw/$scenario/$label.json"
    local extra=()
    if [ "$OHA_HAS_DB" = 1 ] && [ "${OHA_DB:-0}" = 1 ]; then extra+=(--db-url "$dir/$label.sqlite"); fi
    RUN_START=$(date +%s.%N)
    bounded oha --no-tui --output-format json -z "${DURATION}s" "${extra[@]}" "$@" "$url" \
        >"$OUT/$RUN_FILE" 2>"$dir/$label.stderr" || log "oha exited $? (see $dir/$label.stderr)"
    RUN_END=$(date +%s.%N)
    printf '  %-34s %s\n' "$label" "$($LT summary oha "$OUT/$RUN_FILE")" >&2
}

# run_wrk SCENARIO LABEL URL LUA [LUA_ARGS...] : one wrk -t1 -c64 run of DURATION seconds.
# Writes raw/SCENARIO/LABEL.txt (wrk's text) and LABEL.json (parsed).
run_wrk() {
    local scenario=$1 label=$2 url=$3 lua=$4
    shift 4
    local dir="$OUT/raw/$scenario"
    mkdir -p "$dir"
    RUN_FILE="raw/$scenario/$label.json"
    RUN_START=$(date +%s.%N)
    bounded wrk -t1 -c"${WRK_CONNECTIONS:-64}" -d"${DURATION}s" --timeout 5s --latency \
        -s "$LT_DIR/lua/$lua" "$url" -- "$@" >"$dir/$label.txt" 2>&1 \
        || log "wrk exited $? (see $dir/$label.txt)"
    RUN_END=$(date +%s.%N)
    $LT wrkjson "$dir/$label.txt" "$OUT/$RUN_FILE" || true
    printf '  %-34s %s\n' "$label" "$($LT summary wrk "$OUT/$RUN_FILE")" >&2
}

# record SCENARIO KEY=VALUE... : append the last run to raw/SCENARIO/runs.jsonl.
record() {
    local scenario=$1
    shift
    $LT record "$OUT/raw/$scenario/runs.jsonl" file="$RUN_FILE" start="$RUN_START" end="$RUN_END" "$@"
}

# sg_metrics SCENARIO NAME : keep sluicegate's Prometheus text (admin GET /metrics), when
# this build serves it, so unexpected statuses can be traced to a scope afterwards.
sg_metrics() {
    mkdir -p "$OUT/raw/$1"
    $LT get "http://$ADMIN/metrics" >"$OUT/raw/$1/metrics-$2.prom" 2>/dev/null || rm -f "$OUT/raw/$1/metrics-$2.prom"
}

# emu_stats ADDR OUTFILE : snapshot of GET /emulator/stats.
emu_stats() { $LT get "http://$1/emulator/stats" >"$2" || echo '{}' >"$2"; }

# Does this oha have --db-url (per-request rows in SQLite)?
detect_oha_features() {
    OHA_HAS_DB=0
    if oha --help 2>/dev/null | grep -q -- '--db-url'; then OHA_HAS_DB=1; fi
    OHA_VERSION=$(oha --version 2>/dev/null | head -n 1)
}
