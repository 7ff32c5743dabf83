#!/usr/bin/env bash
# Runs the benchmarks of docs/benchmarks.md: the chat gateway and the Socket.IO peer
# (loadtest/peers/socketio) side by side, same machine, same generator (loadgen), one after
# the other. Writes one JSON file per measurement into OUT and prints a summary line for each.
#
#   CARGO_TARGET_DIR=/work/target-load cargo build --release -p gateway -p history-service -p loadgen
#   (cd loadtest/peers/socketio && npm ci)
#   BENCH_BIN=/work/target-load/release loadtest/bench.sh [single] [cluster]
#
# single:  one gateway (embedded: in-process broker + SQLite)  vs  one Socket.IO node
# cluster: 2 gateways + Redis + history-service behind nginx (deploy/local/cluster.sh)
#          vs  2 Socket.IO nodes + @socket.io/redis-adapter behind nginx (same nginx template)
#
# Environment: BENCH_BIN (release binaries; default ${CARGO_TARGET_DIR:-target}/release),
# BENCH_OUT (default target/bench/<time>), FANOUT_ROOMS/FANOUT_MEMBERS/FANOUT_SENDERS/
# FANOUT_RATE (equal-load fan-out, default 10 × 100, 10 senders, 100 msg/s), FANOUT_SECS (10),
# RAMP_START (50 msg/s), RAMP_FACTOR (1.5), RAMP_STEPS (12), RAMP_SECS (5), IDLE_CONNS
# (10000), CONNECT_CONNS (5000 direct; 1800 through nginx, whose template allows ~2000
# proxied websockets), BENCH_ONLY (space-separated subset of: fanout ramp connect idle history).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
OUT=${BENCH_OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}
SECRET=bench-secret-not-for-production-use # HS256: at least 32 bytes
PEER=$ROOT/loadtest/peers/socketio
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
for b in gateway history-service loadgen; do
    [[ -x $BIN/$b ]] || { echo "bench: $BIN/$b missing; build the release binaries first" >&2; exit 1; }
done
[[ -d $PEER/node_modules ]] || (cd "$PEER" && npm ci --no-audit --no-fund --loglevel=error)
export PATH=$PATH:/usr/sbin
# 10k idle connections: the generator and the server each hold one fd per connection.
ulimit -n "$(ulimit -Hn)"

ROOMS=${FANOUT_ROOMS:-10} MEMBERS=${FANOUT_MEMBERS:-100} SENDERS=${FANOUT_SENDERS:-10}
RATE=${FANOUT_RATE:-100} SECS=${FANOUT_SECS:-10}
ONLY=${BENCH_ONLY:-fanout ramp connect idle history}
want() { [[ " $ONLY " == *" $1 "* ]]; }

# Server settings for the gateway: the per-connection message rate is raised so that the
# generator's few senders are not rate limited (the limit is per connection, 20/s by default).
export CHAT_JWT_SECRET=$SECRET CHAT_MESSAGES_PER_S=5000 CHAT_BURST=10000 CHAT_LOG=warn,gateway=info
export CHAT_DRAIN_SECONDS=1

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    [[ -f $OUT/cluster/pids ]] && deploy/local/cluster.sh stop --dir "$OUT/cluster" >/dev/null 2>&1 || true
    [[ -f $OUT/sio-nginx/nginx.pid ]] && kill -TERM "$(<"$OUT/sio-nginx/nginx.pid")" 2>/dev/null || true
    [[ -f $OUT/sio-redis.pid ]] && kill -TERM "$(<"$OUT/sio-redis.pid")" 2>/dev/null || true
}
trap cleanup EXIT

lg() { # name args...: runs loadgen, keeps its JSON, prints a one-line summary
    local name=$1
    shift
    echo "bench: $name: loadgen $*" >&2
    "$BIN/loadgen" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err" || {
        echo "bench: $name FAILED: $(tail -n 3 "$OUT/$name.err")" >&2
        return 0
    }
    python3 - "$OUT/$name.json" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n = sys.argv[2]
def lat(l): return f"p50 {l.get('p50')} p99 {l.get('p99')} p999 {l.get('p999')} ms" if l and l.get('count') else "no samples"
if 'result' in d:
    r = d['result']; c = r['server_cpu']
    print(f"{n}: {r['deliveries_per_s']} deliveries/s, delivered {r['delivered_ratio']}, {lat(r['latency_ms'])}, {c['cpu_us_per_delivery']} server-cpu-us/delivery")
elif 'steps' in d:
    s = ", ".join(f"{x['target_rate']:.0f}/s:{'ok' if x['passed'] else 'FAIL'}(p99 {x['latency_ms'].get('p99')} ms, {x['delivered_ratio']})" for x in d['steps'])
    print(f"{n}: highest sustainable {d['highest_sustainable_rate']} msg/s ({d['connections']} conns): {s}")
elif 'server_bytes_per_connection' in d:
    print(f"{n}: {d['opened']}/{d['connections']} open, server {d['server_bytes_per_connection']} B/conn overall, {d.get('server_marginal_bytes_per_connection')} B/conn marginal (second half)")
elif 'connects_per_s' in d:
    print(f"{n}: {d['opened']}/{d['connections']} in {d['secs']} s = {d['connects_per_s']}/s, {lat(d['latency_ms'])}")
elif 'append' in d:
    a, r = d['append'], d['read']
    print(f"{n}: append {a['acked_per_s']}/s acked (stored in {a['stored_after_secs']} s = {a['stored_per_s']}/s), reads {r['reads_per_s']}/s {lat(r['latency_ms'])}")
PY
}

wait_url() { # url
    local i
    for ((i = 0; i < 150; i++)); do curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0; sleep 0.2; done
    echo "bench: $1 did not come up" >&2
    return 1
}

start_gateway() { # sets GW_PID GW_ADDR
    local log=$OUT/gateway.log
    rm -rf "$OUT/gw-data"
    env -u CHAT_REDIS_URL -u CHAT_HISTORY_URL CHAT_LISTEN=127.0.0.1:0 CHAT_DATA_DIR="$OUT/gw-data" \
        "$BIN/gateway" </dev/null >"$log" 2>&1 &
    GW_PID=$!
    pids+=("$GW_PID")
    GW_ADDR=
    for _ in $(seq 150); do
        GW_ADDR=$(grep -so 'listening on [0-9.]*:[0-9]*' "$log" | head -n1 | awk '{print $3}') || true
        [[ -n $GW_ADDR ]] && break
        sleep 0.1
    done
    [[ -n $GW_ADDR ]] || { cat "$log" >&2; exit 1; }
}

start_sio() { # port [redis-url]: appends the pid to pids, prints it
    local port=$1 redis=${2:-}
    PORT=$port REDIS_URL=$redis node "$PEER/server.js" </dev/null >"$OUT/sio-$port.log" 2>&1 &
    SIO_PID=$!
    pids+=("$SIO_PID")
    wait_url "http://127.0.0.1:$port/healthz"
}

suite() { # label target url pids [history]
    local label=$1 target=$2 url=$3 spid=$4 hist=${5:-}
    local common=(--target "$target" --url "$url" --server-pid "$spid" --jwt-secret "$SECRET")
    if want fanout; then
        lg "$label-fanout" "${common[@]}" --user-prefix "f-$label-" fanout --rooms "$ROOMS" --members "$MEMBERS" \
            --senders "$SENDERS" --rate "$RATE" --duration "$SECS" --room-prefix "f$RANDOM-"
    fi
    if want ramp; then
        lg "$label-ramp" "${common[@]}" --user-prefix "r-$label-" ramp --rooms "$ROOMS" --members "$MEMBERS" \
            --senders "$SENDERS" --rate "${RAMP_START:-50}" --factor "${RAMP_FACTOR:-1.5}" \
            --max-steps "${RAMP_STEPS:-12}" --duration "${RAMP_SECS:-5}" --room-prefix "r$RANDOM-"
    fi
    if want connect; then
        lg "$label-connect" "${common[@]}" --user-prefix "c-$label-" connect --connections "${CONNECT_N:-5000}" \
            --rooms 10 --room-prefix "c$RANDOM-"
    fi
    if want history && [[ -n $hist ]]; then
        lg "$label-history" "${common[@]}" --user-prefix "h-$label-" history --room "h$RANDOM" \
            --messages 5000 --writers 20 --reads 2000 --read-concurrency 16
    fi
}

idle_suite() { # label target url pids
    want idle || return 0
    lg "$1-idle" --target "$2" --url "$3" --server-pid "$4" --jwt-secret "$SECRET" --concurrency 128 \
        --user-prefix "i-$1-" idle --connections "${IDLE_CONNS:-10000}" --rooms 100 --hold 5 --room-prefix "i$RANDOM-"
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {print $2/1024/1024 " GiB"}' /proc/meminfo)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "node: $(node --version); nginx: $(nginx -v 2>&1 | cut -d/ -f2); redis: $(redis-server --version | awk '{print $3}')"
} | tee "$OUT/machine.txt"

modes=("$@")
((${#modes[@]})) || modes=(single cluster)
for mode in "${modes[@]}"; do
    case $mode in
    single)
        start_gateway
        suite single-chat chat "ws://$GW_ADDR" "$GW_PID" history
        idle_suite single-chat chat "ws://$GW_ADDR" "$GW_PID"
        kill -TERM "$GW_PID"; wait "$GW_PID" 2>/dev/null || true
        start_sio 18100
        suite single-sio socketio "ws://127.0.0.1:18100" "$SIO_PID"
        idle_suite single-sio socketio "ws://127.0.0.1:18100" "$SIO_PID"
        kill -TERM "$SIO_PID"; wait "$SIO_PID" 2>/dev/null || true
        ;;
    cluster)
        GATEWAY_BIN=$BIN/gateway HISTORY_BIN=$BIN/history-service \
            deploy/local/cluster.sh start --gateways 2 --base-port 18080 --dir "$OUT/cluster" >&2
        cpids=$(awk '$1 ~ /^(gw|redis|history|nginx)/ {print $2}' "$OUT/cluster/pids" | paste -sd,)
        nginx_master=$(awk '$1 == "nginx" {print $2}' "$OUT/cluster/pids")
        workers=$(pgrep -P "$nginx_master" | paste -sd, || true)
        [[ -n $workers ]] && cpids=$cpids,$workers
        gw_urls=$(awk '$1 ~ /^gw/ {printf "%sws://127.0.0.1:%s", (n++ ? "," : ""), $3}' "$OUT/cluster/pids")
        gw_pids=$(awk '$1 ~ /^gw/ {print $2}' "$OUT/cluster/pids" | paste -sd,)
        CONNECT_N=${CONNECT_NGINX:-1800} suite cluster-chat chat "ws://127.0.0.1:18080" "$cpids" history
        # Idle memory is a per-gateway property: connect to the gateways directly (the nginx
        # template's worker_connections caps proxied websockets at ~2000).
        idle_suite cluster-chat chat "$gw_urls" "$gw_pids"
        deploy/local/cluster.sh stop --dir "$OUT/cluster" >&2

        # Socket.IO: its own redis, 2 nodes with the redis adapter, nginx from the same template.
        redis-server --port 18189 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
            --pidfile "$OUT/sio-redis.pid" --logfile "$OUT/sio-redis.log" --dir "$OUT"
        sleep 0.5
        start_sio 18101 redis://127.0.0.1:18189; s1=$SIO_PID
        start_sio 18102 redis://127.0.0.1:18189; s2=$SIO_PID
        mkdir -p "$OUT/sio-nginx"
        conf=$(<deploy/nginx/local.conf.template)
        conf=${conf//@PREFIX@/$OUT/sio-nginx}
        conf=${conf//@LISTEN@/127.0.0.1:18180}
        conf=${conf//@GATEWAYS@/server 127.0.0.1:18101; server 127.0.0.1:18102;}
        conf=${conf//@HISTORY@/127.0.0.1:18101}
        printf '%s\n' "$conf" >"$OUT/sio-nginx/nginx.conf"
        env -u NGINX nginx -p "$OUT/sio-nginx" -e "$OUT/sio-nginx/error.log" -c "$OUT/sio-nginx/nginx.conf"
        sleep 0.5
        sm=$(<"$OUT/sio-nginx/nginx.pid")
        spids="$s1,$s2,$(<"$OUT/sio-redis.pid"),$sm$(pgrep -P "$sm" | sed 's/^/,/' | tr -d '\n')"
        CONNECT_N=${CONNECT_NGINX:-1800} suite cluster-sio socketio "ws://127.0.0.1:18180" "$spids"
        idle_suite cluster-sio socketio "ws://127.0.0.1:18101,ws://127.0.0.1:18102" "$s1,$s2"
        kill -TERM "$sm" "$s1" "$s2" "$(<"$OUT/sio-redis.pid")" 2>/dev/null || true
        rm -f "$OUT/sio-nginx/nginx.pid" "$OUT/sio-redis.pid"
        ;;
    *) echo "bench: unknown mode $mode (single|cluster)" >&2; exit 2 ;;
    esac
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
echo "bench: results in $OUT"
