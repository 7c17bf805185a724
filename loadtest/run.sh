#!/usr/bin/env bash
# sluicegate load-test suite: oha / wrk against sluicegate, nginx limit_req, a bare
# static-429 server and the Lambda emulator, all on loopback. See loadtest/README.md.
#
#   loadtest/run.sh [SCENARIO...|all] [--duration 10s] [--rounds N] [--quick] [--no-build]
#
# Scenarios: shed passthrough seed000 manykeys batching admitted noisy bulk retry-storm (default: all).
# Writes loadtest/results/<timestamp>/{<scenario>.json,report.md,*.png}.
set -uo pipefail

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --duration D   length of each measured load run: 10s (default), 30s, 1m, or seconds
  --rounds N     A/B rounds per contender in shed, passthrough, manykeys (default 3)
  --quick        dry run: 2 s loads, 2 rounds, manykeys with 20k keys
  --no-build     use the release binaries already in target/release
  --out DIR      results directory (default loadtest/results/<timestamp>)
EOF
}

ALL_SCENARIOS=(shed passthrough seed000 manykeys batching admitted noisy bulk retry-storm)
SCENARIOS=()
DURATION=10
ROUNDS=3
QUICK=0
BUILD=1
OUT=""
DURATION_SET=0
ROUNDS_SET=0

to_seconds() {
    case "$1" in
    *ms) echo $(( (${1%ms} + 999) / 1000 )) ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
    esac
}

while [ $# -gt 0 ]; do
    case "$1" in
    --duration) DURATION=$(to_seconds "$2"); DURATION_SET=1; shift 2 ;;
    --duration=*) DURATION=$(to_seconds "${1#*=}"); DURATION_SET=1; shift ;;
    --rounds) ROUNDS=$2; ROUNDS_SET=1; shift 2 ;;
    --rounds=*) ROUNDS=${1#*=}; ROUNDS_SET=1; shift ;;
    --quick) QUICK=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    all) SCENARIOS+=("${ALL_SCENARIOS[@]}"); shift ;;
    shed | passthrough | seed000 | manykeys | batching | admitted | noisy | bulk | retry-storm) SCENARIOS+=("$1"); shift ;;
    # Correctness under a slow/killed Redis, not speed: its own script (debug build).
    redis-flap) exec "$(dirname "$0")/redis-flap.sh" ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=("${ALL_SCENARIOS[@]}")
if [ "$QUICK" = 1 ]; then
    [ "$DURATION_SET" = 0 ] && DURATION=2
    [ "$ROUNDS_SET" = 0 ] && ROUNDS=2
fi
case "$DURATION" in '' | *[!0-9]*) echo "bad --duration" >&2; exit 2 ;; esac
[ "$DURATION" -ge 1 ] || { echo "--duration must be at least 1s" >&2; exit 2; }
case "$ROUNDS" in '' | *[!0-9]* | 0) echo "bad --rounds" >&2; exit 2 ;; esac
case "${BULK_RECORDS:-100}" in '' | *[!0-9]* | 0) echo "bad BULK_RECORDS (1..500)" >&2; exit 2 ;; esac
[ "${BULK_RECORDS:-100}" -le 500 ] || { echo "bad BULK_RECORDS (1..500)" >&2; exit 2; }

# shellcheck source=loadtest/lib.sh
. "$(dirname "$0")/lib.sh"

# Keys in manykeys: 100k; --quick uses 20k so the warm-up stays short.
MANY_KEYS=${MANY_KEYS:-$([ "$QUICK" = 1 ] && echo 20000 || echo 100000)}
SEED_RATES=${SEED_RATES:-800}
BATCH_RATES=${BATCH_RATES:-50 200 800}
# Fixed offered loads (oha -q) at which admitted measures CPU per record.
CPU_RATES=${CPU_RATES:-2000 10000}
# Records/s the noisy config's function can take (10 invokes/s x 20 records).
NOISY_CAPACITY=${NOISY_CAPACITY:-200}
# Records per bulk request in the bulk scenario (at most the config's max_bulk_records, 500).
BULK_RECORDS=${BULK_RECORDS:-100}
BODY='{"n":1}'

[ -n "$OUT" ] || OUT="$LT_DIR/results/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT/configs" "$OUT/raw" "$OUT/logs" || exit 1
WORK=$(mktemp -d -t sluicegate-loadtest.XXXXXX)

on_exit() {
    stop_all
    cp "$WORK"/*.log "$OUT/logs/" 2>/dev/null
    for d in "$WORK"/nginx-*; do [ -d "$d" ] && cp "$d/error.log" "$OUT/logs/$(basename "$d").error.log" 2>/dev/null; done
    rm -rf "$WORK"
}
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT TERM

# --- scenarios ---------------------------------------------------------------------

# Rotate an array by N: the A/B order changes every round so no contender always runs
# first (warm caches, thermal state, neighbours' compile jobs all drift over a run).
rotated() {
    local n=$1 i
    shift
    local a=("$@")
    for ((i = 0; i < ${#a[@]}; i++)); do echo "${a[$(((i + n) % ${#a[@]}))]}"; done
}

# Free loopback ports for a scenario: SG (sluicegate), ADMIN, EMU (emulator).
# Also XP1, XP2: two more ports for the peers (nginx, static429).
setup_ports() {
    local p
    read -r -a p <<<"$($LT freeport 5)"
    SG=127.0.0.1:${p[0]} ADMIN=127.0.0.1:${p[1]} EMU=127.0.0.1:${p[2]}
    XP1=127.0.0.1:${p[3]} XP2=127.0.0.1:${p[4]}
}
render_config() { # NAME TEMPLATE [KEY=VALUE...]
    local name=$1 template=$2
    shift 2
    CFG="$OUT/configs/$name.toml"
    render "$LT_DIR/configs/$template.toml" "$CFG" SG_LISTEN="$SG" SG_ADMIN="$ADMIN" \
        EMU_LISTEN="$EMU" EMU_URL="http://$EMU" "$@"
    "$SLUICEGATE" check-config "$CFG" >/dev/null 2>"$WORK/check.log" \
        || die "invalid config $CFG: $(cat "$WORK/check.log")"
}

# Keep one full response of each contender (status line, headers, body) for the report.
sample_response() { # SCENARIO NAME URL [CURL ARGS...]
    local scenario=$1 name=$2 url=$3
    shift 3
    mkdir -p "$OUT/raw/$scenario"
    curl -sS -m 5 -i -X POST -H 'content-type: application/json' -d "$BODY" "$@" "$url" \
        >"$OUT/raw/$scenario/response-$name.txt" 2>&1 || true
}

scenario_shed() {
    local s=shed
    setup_ports
    local NG=$XP1 S4=$XP2
    render_config shed shed
    start_emulator "$CFG" shed
    start_sluicegate "$CFG" shed "$SG"
    start_nginx shed "$NG" "$EMU" echo
    start_static429 "$S4"
    declare -A url=([sluicegate]="http://$SG/records" [nginx]="http://$NG/records" [static429]="http://$S4/records")
    # Spend the hot key's burst first, then keep one 429 of each for the report.
    local c
    for c in sluicegate nginx static429; do
        for _ in $(seq 1 25); do curl -s -o /dev/null -m 5 -X POST -H 'x-api-key: hot' -d "$BODY" "${url[$c]}"; done
        sample_response $s "$c" "${url[$c]}" -H 'x-api-key: hot'
    done
    local r tool
    for r in $(seq 1 "$ROUNDS"); do
        for tool in oha wrk; do
            for c in $(rotated $((r - 1)) sluicegate nginx static429); do
                if [ "$tool" = oha ]; then
                    run_oha $s "$c-oha-r$r" "${url[$c]}" -c 64 -m POST -d "$BODY" \
                        -H 'content-type: application/json' -H 'x-api-key: hot'
                else
                    run_wrk $s "$c-wrk-r$r" "${url[$c]}" post.lua hot
                fi
                record $s contender="$c" tool="$tool" round="$r" connections=64
            done
        done
    done
    # One more oha run per contender that keeps every request (oha --db-url) for the
    # goodput/shed-over-time plot. Not in the throughput tables: writing the rows could
    # cost oha some speed, and the measured runs above stay identical for everyone.
    if [ "$OHA_HAS_DB" = 1 ]; then
        for c in sluicegate nginx static429; do
            OHA_DB=1 run_oha $s "$c-oha-timeline" "${url[$c]}" -c 64 -m POST -d "$BODY" \
                -H 'content-type: application/json' -H 'x-api-key: hot'
            record $s contender="$c" tool=oha-timeline round=0 connections=64
        done
    fi
    sg_metrics $s sluicegate
    stop_all
}

scenario_passthrough() {
    local s=passthrough
    setup_ports
    local NG=$XP1
    render_config passthrough passthrough
    start_emulator "$CFG" passthrough
    start_sluicegate "$CFG" passthrough "$SG"
    start_nginx passthrough "$NG" "$EMU" echo
    declare -A url=(
        [direct]="http://$EMU/2015-03-31/functions/echo/invocations"
        [sluicegate]="http://$SG/records"
        [nginx]="http://$NG/passthrough")
    local c r
    for c in direct sluicegate nginx; do sample_response $s "$c" "${url[$c]}" -H 'x-api-key: pass'; done
    emu_stats "$EMU" "$OUT/raw/$s/stats-start.json"
    for r in $(seq 1 "$ROUNDS"); do
        for c in $(rotated $((r - 1)) direct sluicegate nginx); do
            emu_stats "$EMU" "$OUT/raw/$s/$c-r$r.stats-before.json"
            run_oha $s "$c-r$r" "${url[$c]}" -c 64 -m POST -d "$BODY" \
                -H 'content-type: application/json' -H 'x-api-key: pass'
            sleep 0.5
            emu_stats "$EMU" "$OUT/raw/$s/$c-r$r.stats-after.json"
            record $s contender="$c" tool=oha round="$r" connections=64 \
                stats_before="raw/$s/$c-r$r.stats-before.json" stats_after="raw/$s/$c-r$r.stats-after.json"
        done
    done
    sg_metrics $s sluicegate
    stop_all
}

scenario_seed000() {
    local s=seed000 rate
    setup_ports
    render_config seed000 seed000
    start_emulator "$CFG" seed000
    start_sluicegate "$CFG" seed000 "$SG"
    mkdir -p "$OUT/raw/$s"
    for rate in $SEED_RATES; do
        local label="sluicegate-q$rate"
        emu_stats "$EMU" "$OUT/raw/$s/$label.stats-before.json"
        # The sampler polls the emulator's counters for the over-time plot; it stops by itself.
        $LT sample "$OUT/raw/$s/$label.samples.jsonl" "$((DURATION + 3))" "http://$EMU/emulator/stats" &
        local sampler=$!
        STARTED_PIDS+=("$sampler")
        OHA_DB=1 run_oha $s "$label" "http://$SG/records" -q "$rate" -c 200 --latency-correction \
            -m POST -d "$BODY" -H 'content-type: application/json' -H 'x-api-key: seed'
        emu_stats "$EMU" "$OUT/raw/$s/$label.stats-end.json"
        sleep 2 # let dispatched batches finish, so the emulator's totals settle
        emu_stats "$EMU" "$OUT/raw/$s/$label.stats-after.json"
        wait "$sampler" 2>/dev/null
        record $s contender=sluicegate tool=oha rate="$rate" connections=200 duration="$DURATION" \
            invoke_rate=10 emulator_quota=10 max_records=20 \
            stats_before="raw/$s/$label.stats-before.json" stats_end="raw/$s/$label.stats-end.json" \
            stats_after="raw/$s/$label.stats-after.json" samples="raw/$s/$label.samples.jsonl"
    done
    sg_metrics $s sluicegate
    stop_all
}

scenario_manykeys() {
    local s=manykeys
    setup_ports
    render_config manykeys manykeys
    start_emulator "$CFG" manykeys
    start_sluicegate "$CFG" manykeys "$SG"
    mkdir -p "$OUT/raw/$s"
    local url="http://$SG/records" rss0 rss1 rss2
    rss0=$($LT rss "$SG_PID")
    # Warm-up (not measured): walk every key once, in order, so each spends its only
    # token; after it every request, for any key, is a 429 at the key layer. wrk cannot
    # stop after N requests, so it runs (bounded by -d) until sluicegate's admin endpoint
    # reports every key tracked, then gets SIGINT, on which it prints its summary.
    log "manykeys: warm-up, $MANY_KEYS keys once each"
    start_bg "$OUT/raw/$s/warmup.txt" timeout --kill-after=5 200 \
        wrk -t1 -c64 -d180s --timeout 5s -s "$LT_DIR/lua/keys.lua" "$url" -- "$MANY_KEYS" sequential
    local warm=$BG_PID tracked=0
    while kill -0 "$warm" 2>/dev/null; do
        tracked=$($LT get "http://$ADMIN/admin/routes" 2>/dev/null \
            | python3 -c 'import json,sys; print(json.load(sys.stdin).get("tracked_keys", 0))' 2>/dev/null)
        [ "${tracked:-0}" -ge "$MANY_KEYS" ] && break
        sleep 0.2
    done
    # `timeout` passes SIGINT on to wrk.
    kill -INT "$warm" 2>/dev/null
    wait "$warm" 2>/dev/null
    log "manykeys: warm-up done, $tracked keys tracked"
    $LT wrkjson "$OUT/raw/$s/warmup.txt" "$OUT/raw/$s/warmup.json" || true
    printf '  %-34s %s\n' warmup "$($LT summary wrk "$OUT/raw/$s/warmup.json")" >&2
    $LT get "http://$ADMIN/admin/routes" >"$OUT/raw/$s/admin-routes-after-warmup.json" || true
    rss1=$($LT rss "$SG_PID")
    sample_response $s many "$url" -H 'x-api-key: k7'
    local r keys label
    for r in $(seq 1 "$ROUNDS"); do
        for keys in $(rotated $((r - 1)) "$MANY_KEYS" 1); do
            label=$([ "$keys" = 1 ] && echo one-key || echo many-keys)-r$r
            run_wrk $s "$label" "$url" keys.lua "$keys"
            record $s contender="$([ "$keys" = 1 ] && echo one-key || echo many-keys)" tool=wrk \
                round="$r" keys="$keys" connections=64
        done
    done
    rss2=$($LT rss "$SG_PID")
    $LT get "http://$ADMIN/admin/routes" >"$OUT/raw/$s/admin-routes-end.json" || true
    $LT record "$OUT/raw/$s/memory.jsonl" keys="$MANY_KEYS" rss_kib_start="$rss0" \
        rss_kib_after_warmup="$rss1" rss_kib_end="$rss2"
    sg_metrics $s sluicegate
    stop_all
}

scenario_batching() {
    local s=batching flush rate r=1
    setup_ports
    mkdir -p "$OUT/raw/$s"
    # One emulator for both modes; the counters are read as deltas around each run.
    render_config batching-emulator batching FLUSH=adaptive
    start_emulator "$CFG" batching
    for flush in adaptive window; do
        render_config "batching-$flush" batching FLUSH="$flush"
        start_sluicegate "$CFG" "batching-$flush" "$SG"
        for rate in $BATCH_RATES; do
            local label="$flush-q$rate"
            emu_stats "$EMU" "$OUT/raw/$s/$label.stats-before.json"
            OHA_DB=1 run_oha $s "$label" "http://$SG/records" -q "$rate" -c 128 --latency-correction \
                -m POST -d "$BODY" -H 'content-type: application/json' -H 'x-api-key: batch'
            sleep 1
            emu_stats "$EMU" "$OUT/raw/$s/$label.stats-after.json"
            record $s contender="$flush" tool=oha rate="$rate" connections=128 round="$r" \
                stats_before="raw/$s/$label.stats-before.json" stats_after="raw/$s/$label.stats-after.json"
        done
        sg_metrics $s "sluicegate-$flush"
        stop_pid "$SG_PID"
    done
    stop_all
}

scenario_admitted() {
    local s=admitted
    setup_ports
    local NG=$XP1
    render_config admitted admitted
    start_emulator "$CFG" admitted
    start_sluicegate "$CFG" admitted "$SG"
    local main_pid=$SG_PID
    # The same routes sized for a small sidecar: one runtime worker thread, and a 5 ms linger
    # on /records (its /raw at saturation, its /records at the fixed offered loads).
    start_sluicegate "$CFG" admitted-lean "$XP2" SLUICEGATE_SERVER__LISTEN="$XP2" \
        SLUICEGATE_SERVER__ADMIN_LISTEN=127.0.0.1:0 TOKIO_WORKER_THREADS=1 \
        SLUICEGATE_ROUTES__0__BATCH__LINGER=5ms
    local lean_pid=$SG_PID
    SG_PID=$main_pid
    start_nginx admitted "$NG" "$EMU" peer
    # The ceiling: the bare hyper server answering every request itself (no upstream), the
    # most any proxy answering one request per record can do on this machine with oha here.
    local CEIL
    CEIL=127.0.0.1:$($LT freeport 1)
    start_static429 "$CEIL"
    mkdir -p "$OUT/raw/$s"
    declare -A url=(
        [adaptive]="http://$SG/records"
        [window]="http://$SG/window"
        [raw]="http://$SG/raw"
        [lean]="http://$XP2/records"
        [lean-raw]="http://$XP2/raw"
        [nginx]="http://$NG/passthrough"
        [ceiling]="http://$CEIL/records")
    declare -A pid=([adaptive]=$SG_PID [window]=$SG_PID [raw]=$SG_PID [lean]=$lean_pid
        [lean-raw]=$lean_pid [nginx]=$NGINX_PID [ceiling]=$STATIC_PID)
    local c r rate label cpu0 cpu1
    for c in adaptive window raw nginx; do sample_response $s "$c" "${url[$c]}" -H 'x-api-key: pass'; done
    # admitted_run LABEL CONTENDER OHA_ARGS... : one oha run with the emulator's counters
    # and the contender's CPU seconds read around it.
    admitted_run() {
        local label=$1 c=$2
        shift 2
        emu_stats "$EMU" "$OUT/raw/$s/$label.stats-before.json"
        cpu0=$($LT cpu "${pid[$c]}")
        run_oha $s "$label" "${url[$c]}" "$@" -m POST -d "$BODY" \
            -H 'content-type: application/json' -H 'x-api-key: pass'
        cpu1=$($LT cpu "${pid[$c]}")
        sleep 0.5 # let dispatched batches finish, so the emulator's totals settle
        emu_stats "$EMU" "$OUT/raw/$s/$label.stats-after.json"
    }
    # Saturation: as fast as 128 connections go.
    for r in $(seq 1 "$ROUNDS"); do
        for c in $(rotated $((r - 1)) adaptive window raw lean-raw nginx ceiling); do
            label="$c-r$r"
            admitted_run "$label" "$c" -c 128
            record $s contender="$c" tool=oha round="$r" connections=128 cpu_s_before="$cpu0" \
                cpu_s_after="$cpu1" stats_before="raw/$s/$label.stats-before.json" \
                stats_after="raw/$s/$label.stats-after.json"
        done
    done
    # CPU per record at fixed offered loads: batched adaptive /records (default and lean) vs
    # nginx.
    for rate in $CPU_RATES; do
        for c in adaptive lean nginx; do
            label="$c-q$rate"
            admitted_run "$label" "$c" -q "$rate" -c 128 --latency-correction
            record $s contender="$c" tool=oha-fixed rate="$rate" connections=128 cpu_s_before="$cpu0" \
                cpu_s_after="$cpu1" stats_before="raw/$s/$label.stats-before.json" \
                stats_after="raw/$s/$label.stats-after.json"
        done
    done
    sg_metrics $s sluicegate
    stop_all
}

# noisy: key a offers 10x what the function can take, key b 5 % of it; b's goodput (share
# answered 200) and p99 with a per-key fair queue and with a FIFO queue, and b alone.
scenario_noisy() {
    local s=noisy fairness
    local a_rate=$((NOISY_CAPACITY * 10)) b_rate=$((NOISY_CAPACITY / 20))
    local url b_args
    setup_ports
    mkdir -p "$OUT/raw/$s"
    url="http://$SG/records"
    b_args=(-q "$b_rate" -c 32 --latency-correction -m POST -d "$BODY"
        -H 'content-type: application/json' -H 'x-api-key: noisy-b')
    # One emulator for both modes (the queue is sluicegate's).
    render_config noisy-emulator noisy FAIRNESS=per_key
    start_emulator "$CFG" noisy
    for fairness in per_key fifo; do
        render_config "noisy-$fairness" noisy FAIRNESS="$fairness"
        start_sluicegate "$CFG" "noisy-$fairness" "$SG"
        if [ "$fairness" = per_key ]; then
            # b alone: the latency b's p99 under the flood is compared with.
            OHA_DB=1 run_oha $s b-alone "$url" "${b_args[@]}"
            record $s contender=b-alone key=b fairness="$fairness" rate="$b_rate" connections=32
            sleep 1
        fi
        # a floods in the background, from a second before b starts to a second after b
        # ends, so every b request meets a full queue. A subshell: its run variables stay
        # its own, and it records its run itself.
        (
            DURATION=$((DURATION + 2))
            run_oha $s "a-$fairness" "$url" -q "$a_rate" -c 400 --latency-correction \
                -m POST -d "$BODY" -H 'content-type: application/json' -H 'x-api-key: noisy-a'
            record $s contender="a-$fairness" key=a fairness="$fairness" rate="$a_rate" connections=400
        ) &
        local flood=$!
        STARTED_PIDS+=("$flood")
        sleep 1
        OHA_DB=1 run_oha $s "b-$fairness" "$url" "${b_args[@]}"
        record $s contender="b-$fairness" key=b fairness="$fairness" rate="$b_rate" connections=32
        wait "$flood"
        sg_metrics $s "sluicegate-$fairness"
        stop_pid "$SG_PID"
    done
    stop_all
}

# bulk: records/s through NDJSON requests of BULK_RECORDS records, against the same
# records one per request and nginx proxy_pass.
scenario_bulk() {
    local s=bulk
    setup_ports
    local NG=$XP1
    render_config bulk bulk
    start_emulator "$CFG" bulk
    start_sluicegate "$CFG" bulk "$SG"
    start_nginx bulk "$NG" "$EMU" peer
    mkdir -p "$OUT/raw/$s"
    # One bulk body: BULK_RECORDS records, one per line, as a producer would batch them.
    local body="$WORK/bulk.ndjson" i
    for ((i = 0; i < BULK_RECORDS; i++)); do printf '{"n":%d}\n' "$i"; done >"$body"
    cp "$body" "$OUT/raw/$s/body.ndjson"
    declare -A url=(
        [bulk]="http://$SG/bulk"
        [single]="http://$SG/records"
        [nginx]="http://$NG/passthrough")
    declare -A per=([bulk]=$BULK_RECORDS [single]=1 [nginx]=1)
    sample_response $s single "${url[single]}" -H 'x-api-key: pass'
    sample_response $s nginx "${url[nginx]}" -H 'x-api-key: pass'
    curl -sS -m 5 -i -X POST -H 'content-type: application/x-ndjson' -H 'x-api-key: pass' \
        --data-binary "@$body" "${url[bulk]}" >"$OUT/raw/$s/response-bulk.txt" 2>&1 || true
    local c r label
    for r in $(seq 1 "$ROUNDS"); do
        for c in $(rotated $((r - 1)) bulk single nginx); do
            label="$c-r$r"
            emu_stats "$EMU" "$OUT/raw/$s/$label.stats-before.json"
            if [ "$c" = bulk ]; then
                run_oha $s "$label" "${url[$c]}" -c 64 -m POST -D "$body" \
                    -T application/x-ndjson -H 'x-api-key: pass'
            else
                run_oha $s "$label" "${url[$c]}" -c 64 -m POST -d "$BODY" \
                    -T application/json -H 'x-api-key: pass'
            fi
            sleep 0.5 # let dispatched batches finish, so the emulator's totals settle
            emu_stats "$EMU" "$OUT/raw/$s/$label.stats-after.json"
            record $s contender="$c" tool=oha round="$r" connections=64 \
                records_per_request="${per[$c]}" stats_before="raw/$s/$label.stats-before.json" \
                stats_after="raw/$s/$label.stats-after.json"
        done
    done
    sg_metrics $s sluicegate
    stop_all
}

# retry-storm: a check, not a benchmark. Clients retry every 504/503/429/409 with each
# record's own Idempotency-Key against a slow, throttling function: the emulator must
# process no record twice (duplicate_records = 0) and every record must end in 200. The
# same storm without keys runs next as the control (its duplicates are what keys prevent).
# STORM_CLIENTS x STORM_RECORDS records per storm. Writes retry-storm.json; a failed check
# makes run.sh exit 1 after the report.
STORM_CLIENTS=${STORM_CLIENTS:-32}
STORM_RECORDS=${STORM_RECORDS:-$([ "$QUICK" = 1 ] && echo 5 || echo 20)}
CHECKS_FAILED=0
scenario_retry-storm() {
    local s=retry-storm mode
    setup_ports
    render_config retry-storm retry-storm
    start_emulator "$CFG" retry-storm
    start_sluicegate "$CFG" retry-storm "$SG"
    mkdir -p "$OUT/raw/$s"
    for mode in keyed unkeyed; do
        python3 "$LT_DIR/retry_storm.py" "http://$SG/records" "http://$EMU/emulator/stats" flaky \
            "$STORM_CLIENTS" "$STORM_RECORDS" "$mode" "$OUT/raw/$s/$mode.json" >/dev/null \
            || die "retry_storm.py failed ($mode)"
    done
    python3 - "$OUT/raw/$s/keyed.json" "$OUT/raw/$s/unkeyed.json" "$OUT/retry-storm.json" <<'PY'
import json, sys
keyed, unkeyed = (json.load(open(p)) for p in sys.argv[1:3])
ok = (keyed["duplicate_records"] == 0 and keyed["finals"] == {"200": keyed["records_sent"]}
      and keyed["records_processed"] == keyed["records_sent"])
json.dump({"scenario": "retry-storm", "passed": ok, "keyed": keyed, "unkeyed": unkeyed},
          open(sys.argv[3], "w"), indent=1)
print(f"keyed: {keyed['records_sent']} records, {keyed['records_processed']} processed, "
      f"{keyed['duplicate_records']} duplicates, finals {keyed['finals']}, answers {keyed['answers']}; "
      f"without keys: {unkeyed['records_processed']} processed, {unkeyed['duplicate_records']} duplicates"
      f" -> {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
    local rc=$?
    [ "$rc" = 0 ] || { log "retry-storm check FAILED (see $OUT/retry-storm.json)"; CHECKS_FAILED=1; }
    sg_metrics $s sluicegate
    stop_all
}

# --- main --------------------------------------------------------------------------

need_wrk=0 need_nginx=0 need_oha=0
for s in "${SCENARIOS[@]}"; do
    case $s in
    shed) need_oha=1 need_wrk=1 need_nginx=1 ;;
    passthrough | admitted | bulk) need_oha=1 need_nginx=1 ;;
    manykeys) need_wrk=1 ;;
    retry-storm) ;;
    *) need_oha=1 ;;
    esac
done
[ "$need_oha" = 1 ] && ensure_oha
[ "$need_wrk" = 1 ] && ensure_apt wrk wrk
[ "$need_nginx" = 1 ] && ensure_apt nginx nginx
ensure_matplotlib
[ "$BUILD" = 1 ] && build_release
[ -x "$SLUICEGATE" ] || die "$SLUICEGATE missing (run without --no-build)"
[ -x "$STATIC429" ] || die "$STATIC429 missing (run without --no-build)"
if [ "$need_oha" = 1 ]; then detect_oha_features; else OHA_HAS_DB=0 OHA_VERSION=""; fi

# Raise the open-file limit for 200+ connections per side (a no-op if already high).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

$LT record "$OUT/meta.jsonl" \
    started="$(date -Is)" scenarios="${SCENARIOS[*]}" duration_s="$DURATION" rounds="$ROUNDS" \
    quick="$QUICK" git="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo -dirty)" \
    oha="$OHA_VERSION" wrk="$(wrk -v 2>&1 | head -n 1 | awk "{print \$1, \$2}")" \
    nginx="$(nginx -v 2>&1 | cut -d/ -f2)" nproc="$(nproc)" \
    loadavg="$(cut -d' ' -f1-3 /proc/loadavg)" kernel="$(uname -r)" many_keys="$MANY_KEYS"

T0=$(date +%s)
log "results: $OUT (loads of ${DURATION}s, $ROUNDS rounds)"
for s in "${SCENARIOS[@]}"; do
    log "scenario $s"
    "scenario_$s"
done
log "all scenarios done in $(($(date +%s) - T0)) s; writing the report"
python3 "$LT_DIR/report.py" "$OUT" || die "report.py failed"
log "report: $OUT/report.md"
[ "$CHECKS_FAILED" = 0 ] || die "a check failed (retry-storm)"
