#!/usr/bin/env bash
# The ceiling of one Redis primary (docs/benchmarks.md "One Redis primary: the ceiling"): how
# many stored messages per second one redis-server process takes when it runs nothing but the
# gateway's publish script, and the CPU it spends on each, with the number of subscribing
# gateway nodes as a parameter. redis-benchmark drives the script (EVALSHA, the script text
# taken from gateway/src/broker/redis/scripts.rs) with random rooms; each "node" is one
# connection subscribed (SSUBSCRIBE) to every room, as a gateway is when it has a user in each.
# The history service's reads and deletes are not included (measured separately with the
# whole product: docs/benchmarks.md).
#
#   loadtest/redis-ceiling.sh
#
# Environment (defaults): ROOMS (250), NODES ("0 2 4 8": subscribing nodes, one run each),
# FSYNC ("always everysec": appendfsync of the AOF; always is what k8s/base/redis.conf ships),
# CLIENTS (32 connections publishing), PIPELINE (4 calls in flight per connection, as the
# gateways' multiplexed connections carry under load), MESSAGES (200000 per run), FRAME_BYTES
# (200: the size of a typical message frame).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOMS=${ROOMS:-250}
NODES=${NODES:-0 2 4 8}
FSYNC=${FSYNC:-always everysec}
CLIENTS=${CLIENTS:-32}
PIPELINE=${PIPELINE:-4}
MESSAGES=${MESSAGES:-200000}
FRAME_BYTES=${FRAME_BYTES:-200}
for tool in redis-server redis-cli redis-benchmark; do
    command -v "$tool" >/dev/null || { echo "redis-ceiling: $tool missing (Debian: redis-server, redis-tools)" >&2; exit 1; }
done
WORK=$(mktemp -d)
SUBS=()
cleanup() {
    for pid in "${SUBS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [[ -s $WORK/redis.pid ]] && kill "$(cat "$WORK/redis.pid")" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The publish script, exactly as the gateway loads it.
SCRIPT=$(sed -n '/^pub const PUBLISH: &str = r#"$/,/^"#;$/p' "$ROOT/gateway/src/broker/redis/scripts.rs" | sed '1d;$d')
[[ $SCRIPT == *SPUBLISH* ]] || { echo "redis-ceiling: publish script not found in scripts.rs" >&2; exit 1; }
FRAME='{"type":"message","room":"r","id":"1","user":{"id":"u","name":"U"},"ts":1,"text":"'
FRAME+=$(head -c "$FRAME_BYTES" /dev/zero | tr '\0' 'x')'"}'

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu() { redis-cli -p "$PORT" INFO cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.3f", s}'; }

printf '%-9s %6s %12s %14s %10s\n' appendfsync nodes "msg/s" "Redis µs/msg" "Redis CPU"
for fsync in $FSYNC; do
    for nodes in $NODES; do
        PORT=$(free_port)
        rm -rf "$WORK/data" && mkdir -p "$WORK/data"
        redis-server --port "$PORT" --bind 127.0.0.1 --dir "$WORK/data" --save '' \
            --appendonly yes --appendfsync "$fsync" --daemonize yes \
            --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
        until redis-cli -p "$PORT" PING >/dev/null 2>&1; do sleep 0.1; done
        # One partition on one primary; every room seeded in its epoch, as a gateway seeds it.
        redis-cli -p "$PORT" HSET 'chat:{p0}:epoch' id e1 until 0 >/dev/null
        channels=()
        for ((r = 0; r < ROOMS; r++)); do channels+=("$(printf 'chat:{p0}:r:room%012d' "$r")"); done
        printf 'SET %s:ep e1\n' "${channels[@]}" | redis-cli -p "$PORT" >/dev/null
        SHA=$(redis-cli -p "$PORT" SCRIPT LOAD "$SCRIPT")
        SUBS=()
        for ((n = 0; n < nodes; n++)); do
            redis-cli -p "$PORT" SSUBSCRIBE "${channels[@]}" >/dev/null &
            SUBS+=("$!")
        done
        until (($(redis-cli -p "$PORT" PUBSUB SHARDCHANNELS | wc -l) >= (nodes > 0 ? ROOMS : 0))); do sleep 0.1; done
        before=$(cpu)
        # KEYS: epoch, seq, ep, log, persist, dedupe, state; ARGV: frame, window, channel, no
        # dedupe, -, -, no traceparent, no state check, -. redis-benchmark draws each
        # __rand_int__ on its own, so one counter numbers every room (a room's log only needs
        # rising ids; the cost is that of one counter per room).
        rate=$(redis-benchmark -p "$PORT" -c "$CLIENTS" -P "$PIPELINE" -n "$MESSAGES" -r "$ROOMS" --csv \
            EVALSHA "$SHA" 7 'chat:{p0}:epoch' 'chat:{p0}:r:all:seq' \
            'chat:{p0}:r:room__rand_int__:ep' 'chat:{p0}:r:room__rand_int__:log' 'chat:{p0}:persist' \
            'chat:{p0}:r:room__rand_int__:dd' 'chat:{p0}:r:room__rand_int__:state' \
            "$FRAME" 1000 'chat:{p0}:r:room__rand_int__' 0 - - '' '' - |
            awk -F, 'NR == 2 {gsub(/"/, "", $(NF - 6)); print $(NF - 6)}')
        after=$(cpu)
        published=$(redis-cli -p "$PORT" XLEN 'chat:{p0}:persist')
        ((published == MESSAGES)) || { echo "redis-ceiling: $published of $MESSAGES published" >&2; exit 1; }
        awk -v f="$fsync" -v n="$nodes" -v r="$rate" -v b="$before" -v a="$after" -v m="$MESSAGES" \
            'BEGIN {printf "%-9s %6d %12.0f %14.1f %9.2fs\n", f, n, r, (a - b) * 1e6 / m, a - b}'
        for pid in "${SUBS[@]}"; do kill "$pid" 2>/dev/null || true; done
        SUBS=()
        redis-cli -p "$PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
        while [[ -s $WORK/redis.pid ]] && kill -0 "$(cat "$WORK/redis.pid")" 2>/dev/null; do sleep 0.1; done
    done
done
