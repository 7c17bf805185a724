#!/usr/bin/env bash
# The redis-flap scenario (issue 17): three replicas share one key (rate 10, burst 10: at
# most 110 admitted in 10 s) through one redis-server behind a TCP proxy that adds latency on
# a schedule; on_backend_error = "local", redis_timeout = 50ms. Three runs of 10 s each:
#
#   steady     no added latency
#   flapping   80 ms (over the deadline) every other second
#   killed     redis-server killed at 2 s, restarted empty at 7 s
#
# It runs tests/redis_flap.rs (in-process replicas, each with its own connection, health
# and heartbeat: the admission path of `sluicegate serve` minus HTTP), which also asserts
# the targets (steady <= 1.0x, flapping <= 1.1x, killed <= 1.2x the bound). A debug build is
# fine: the scenario measures correctness (admitted vs. the shared bound), not speed.
#
#   loadtest/redis-flap.sh            # prints one line per case, and writes them to
#                                     # loadtest/results/redis-flap-<timestamp>.txt
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || {
    echo "redis-flap needs redis-server (apt-get install -y redis-server)" >&2
    exit 1
}
out="loadtest/results/redis-flap-$(date +%Y%m%dT%H%M%S).txt"
mkdir -p loadtest/results
cargo test --test redis_flap -- --nocapture --test-threads=1 2>&1 | tee "$out.log" |
    grep -oE 'redis-flap (steady|flapping|killed).*|^test result.*' | tee "$out"
rm -f "$out.log"
grep -q '^test result: ok' "$out"
