#!/usr/bin/env bash
# The storm benchmarks of docs/benchmarks.md ("Storms"): connect + auth + join, filling one big
# room, and a rolling restart under load. The gateway and the Socket.IO peer
# (loadtest/peers/socketio) side by side where the peer can do the same, same machine, same
# generator (loadgen). One JSON file per measurement in OUT, one summary line each.
#
#   CARGO_TARGET_DIR=/work/target-load cargo build --release -p gateway -p history-service -p loadgen
#   (cd loadtest/peers/socketio && npm ci)
#   BENCH_BIN=/work/target-load/release loadtest/storm-bench.sh [connect] [fill] [rollout]
#
# connect: loadgen connect (CONNECT_N connections into CONNECT_ROOMS rooms, CONCURRENCY
#          handshakes in flight): one gateway (embedded) vs one Socket.IO node; 2 gateways +
#          Redis + history-service behind nginx vs 2 Socket.IO nodes + Redis behind nginx.
# fill:    loadgen fill (FILL_N users join one room, then FILL_SENDERS post FILL_RATE msg/s for
#          FILL_SECS): one gateway; 2 gateways (clients on both, direct); the same for Socket.IO.
# rollout: loadgen rollout (ROLLOUT_N users in ROLLOUT_ROOMS rooms on 2 gateways, direct,
#          ROLLOUT_RATE msg/s): gateway 1 drained with SIGTERM (CHAT_DRAIN_SECONDS, default
#          ROLLOUT_DRAIN_S) and started again; every client reconnects as the web UI does.
#
# Environment (defaults): BENCH_BIN (${CARGO_TARGET_DIR:-target}/release), BENCH_OUT
# (target/bench/storm-<time>), CONCURRENCY (64), CONNECT_N (5000), CONNECT_ROOMS (10),
# FILL_N (10000), FILL_SENDERS (10), FILL_RATE (5), FILL_SECS (10), ROLLOUT_N (19000: the generator holds one
# descriptor per connection, and the hard limit on open files here is 20000),
# ROLLOUT_ROOMS (200), ROLLOUT_SENDERS (20), ROLLOUT_RATE (20), ROLLOUT_DRAIN_S (20),
# SIO (1; 0 leaves the Socket.IO peer out), and any CHAT_* setting for the gateways.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
OUT=${BENCH_OUT:-$ROOT/target/bench/storm-$(date +%Y%m%d-%H%M%S)}
SECRET=bench-secret-not-for-production-use # HS256: at least 32 bytes
PEER=$ROOT/loadtest/peers/socketio
SIO=${SIO:-1}
CONC=${CONCURRENCY:-64}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
for b in gateway history-service loadgen; do
    [[ -x $BIN/$b ]] || { echo "storm-bench: $BIN/$b missing; build the release binaries first" >&2; exit 1; }
done
if [[ $SIO == 1 && ! -d $PEER/node_modules ]]; then
    (cd "$PEER" && npm ci --no-audit --no-fund --loglevel=error)
fi
export PATH=$PATH:/usr/sbin
# 20 000 connections: the generator and each server hold one descriptor per connection.
ulimit -n "$(ulimit -Hn)"

export CHAT_JWT_SECRET=$SECRET CHAT_MESSAGES_PER_S=5000 CHAT_BURST=10000 CHAT_LOG=${CHAT_LOG:-warn,gateway=info}
export CHAT_INTERNAL_TOKEN=storm-bench-internal-token
export CHAT_MAX_CONNECTIONS=${CHAT_MAX_CONNECTIONS:-50000}
# Quick stops between measurements; the rollout sets its own drain window.
DRAIN_S=${CHAT_DRAIN_SECONDS:-}
export CHAT_DRAIN_SECONDS=${CHAT_DRAIN_SECONDS:-1}

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    [[ -f $OUT/nginx/nginx.pid ]] && kill -TERM "$(<"$OUT/nginx/nginx.pid")" 2>/dev/null || true
    [[ -f $OUT/redis.pid ]] && kill -TERM "$(<"$OUT/redis.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_url() { # url
    local i
    for ((i = 0; i < 300; i++)); do curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "storm-bench: $1 did not come up" >&2
    return 1
}

lg() { # name args...: runs loadgen, keeps its JSON, prints a one-line summary
    local name=$1
    shift
    echo "storm-bench: $name: loadgen $*" >&2
    "$BIN/loadgen" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err" || {
        echo "storm-bench: $name FAILED: $(tail -n 3 "$OUT/$name.err")" >&2
        return 0
    }
    python3 - "$OUT/$name.json" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n = sys.argv[2]
def lat(l): return f"p50 {l.get('p50')} p99 {l.get('p99')} ms" if l and l.get('count') else "no samples"
if 'connects_per_s' in d:
    print(f"{n}: {d['opened']}/{d['connections']} in {d['secs']} s = {d['connects_per_s']}/s, {lat(d['latency_ms'])}, {d['server_cpu']['total_cpu_us'] / max(d['opened'], 1):.0f} server-cpu-us/connect")
elif 'fill_secs' in d:
    s = d.get('steady') or {}
    c = d['server_cpu_fill']
    print(f"{n}: {d['joined']}/{d['connections']} joined in {d['fill_secs']} s = {d['joins_per_s']}/s, join {lat(d['join_latency_ms'])}, "
          f"{d['frames_per_join']} frames/join, {c['total_cpu_us'] / max(d['joined'], 1):.0f} server-cpu-us/join; "
          f"steady: {s.get('deliveries_per_s')} deliveries/s, delivered {s.get('delivered_ratio')}, {lat(s.get('latency_ms'))}")
elif 'all_back_and_joined_after_s' in d:
    print(f"{n}: all {d['connections']} back and joined {d['all_back_and_joined_after_s']} s after SIGTERM (node exited after {d['drained_node_exited_after_s']} s), "
          f"downtime {lat(d['downtime_ms'])}, missed events {d['missed_events']}, duplicates {d['duplicates']}, not recovered {d['joins_not_recovered']}, "
          f"peak CPU {d['peak_cpu_cores']['total']} cores")
PY
}

start_redis() { # sets REDIS_URL
    local port
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --pidfile "$OUT/redis.pid" --logfile "$OUT/redis.log" --dir "$OUT" --maxclients 20000
    for _ in $(seq 50); do [[ -s $OUT/redis.pid ]] && break; sleep 0.1; done
    REDIS_URL=redis://127.0.0.1:$port
}

stop_redis() {
    kill -TERM "$(<"$OUT/redis.pid")" 2>/dev/null || true
    rm -f "$OUT/redis.pid"
}

start_history() { # sets HISTORY_URL HISTORY_PID
    local port
    port=$(free_port)
    rm -f "$OUT/history.db"*
    CHAT_LISTEN=127.0.0.1:$port CHAT_REDIS_URL=$REDIS_URL CHAT_STORE=sqlite://$OUT/history.db CHAT_NODE_ID=history \
        "$BIN/history-service" </dev/null >"$OUT/history.log" 2>&1 &
    HISTORY_PID=$!
    pids+=("$HISTORY_PID")
    HISTORY_URL=http://127.0.0.1:$port
    wait_url "$HISTORY_URL/healthz"
}

# gateway NAME PORT [scaled]: starts a gateway in the background, prints its pid (the restart
# command of the rollout runs this too).
gateway_cmd() {
    local name=$1 port=$2 scaled=${3:-}
    mkdir -p "$OUT/$name"
    if [[ -n $scaled ]]; then
        echo "CHAT_LISTEN=127.0.0.1:$port CHAT_REDIS_URL=$REDIS_URL CHAT_HISTORY_URL=$HISTORY_URL CHAT_NODE_ID=$name CHAT_DATA_DIR=$OUT/$name $BIN/gateway </dev/null >>$OUT/$name.log 2>&1 & echo \$!"
    else
        echo "env -u CHAT_REDIS_URL -u CHAT_HISTORY_URL CHAT_LISTEN=127.0.0.1:$port CHAT_NODE_ID=$name CHAT_DATA_DIR=$OUT/$name $BIN/gateway </dev/null >>$OUT/$name.log 2>&1 & echo \$!"
    fi
}

start_gateway() { # name port [scaled]: sets GW_PID
    rm -rf "${OUT:?}/$1"
    GW_PID=$(bash -c "$(gateway_cmd "$@")")
    pids+=("$GW_PID")
    wait_url "http://127.0.0.1:$2/healthz"
}

start_sio() { # port [redis-url]: sets SIO_PID
    PORT=$1 REDIS_URL=${2:-} node "$PEER/server.js" </dev/null >"$OUT/sio-$1.log" 2>&1 &
    SIO_PID=$!
    pids+=("$SIO_PID")
    wait_url "http://127.0.0.1:$1/healthz"
}

start_nginx() { # upstream ports...: sets NGINX_PORT NGINX_PIDS (master and worker)
    local conf ups="" p
    for p in "$@"; do ups+="server 127.0.0.1:$p; "; done
    NGINX_PORT=$(free_port)
    mkdir -p "$OUT/nginx"
    conf=$(<deploy/nginx/local.conf.template)
    conf=${conf//@PREFIX@/$OUT/nginx}
    conf=${conf//@LISTEN@/127.0.0.1:$NGINX_PORT}
    conf=${conf//@GATEWAYS@/$ups}
    conf=${conf//@HISTORY@/127.0.0.1:$1}
    # Two descriptors per proxied websocket: room for the storm.
    conf=${conf/worker_connections 4096;/worker_connections 16384;}
    conf=${conf/worker_processes 1;/worker_processes 1; worker_rlimit_nofile 40000;}
    printf '%s\n' "$conf" >"$OUT/nginx/nginx.conf"
    env -u NGINX nginx -p "$OUT/nginx" -e "$OUT/nginx/error.log" -c "$OUT/nginx/nginx.conf"
    sleep 0.5
    local master
    master=$(<"$OUT/nginx/nginx.pid")
    NGINX_PIDS="nginx0=$master$(pgrep -P "$master" | awk '{printf ",nginx%d=%s", NR, $1}')"
}

stop_nginx() {
    kill -TERM "$(<"$OUT/nginx/nginx.pid")" 2>/dev/null || true
    rm -f "$OUT/nginx/nginx.pid"
}

stop_all() { # stops every process started so far, and waits until they are gone
    local p i
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        # Gateways started through `bash -c` are not this shell's children: poll.
        for ((i = 0; i < 600; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        wait "$p" 2>/dev/null || true
    done
    pids=()
    [[ -f $OUT/nginx/nginx.pid ]] && stop_nginx
    [[ -f $OUT/redis.pid ]] && stop_redis
    return 0
}

common() { # target url pids: sets COMMON, the generator's flags for these servers
    COMMON=(--target "$1" --url "$2" --server-pid "$3" --jwt-secret "$SECRET" --concurrency "$CONC")
}

# Two gateways on Redis and a history service: sets G1 and G2 (their ports), P1 (the first's
# pid), PAIR_URLS and PAIR_PIDS (the generator's --url and --server-pid for them).
start_chat_pair() {
    start_redis
    start_history
    G1=$(free_port)
    start_gateway gw1 "$G1" scaled
    P1=$GW_PID
    G2=$(free_port)
    start_gateway gw2 "$G2" scaled
    PAIR_URLS="ws://127.0.0.1:$G1,ws://127.0.0.1:$G2"
    PAIR_PIDS="gw1=$P1,gw2=$GW_PID,history=$HISTORY_PID,redis=$(<"$OUT/redis.pid")"
}

# Two Socket.IO nodes on Redis: sets G1, G2, PAIR_URLS and PAIR_PIDS likewise.
start_sio_pair() {
    start_redis
    G1=$(free_port)
    start_sio "$G1" "$REDIS_URL"
    local p1=$SIO_PID
    G2=$(free_port)
    start_sio "$G2" "$REDIS_URL"
    PAIR_URLS="ws://127.0.0.1:$G1,ws://127.0.0.1:$G2"
    PAIR_PIDS="sio1=$p1,sio2=$SIO_PID,redis=$(<"$OUT/redis.pid")"
}

bench_connect() {
    local n=${CONNECT_N:-5000} rooms=${CONNECT_ROOMS:-10} g1 s1
    g1=$(free_port)
    start_gateway gw1 "$g1"
    common chat "ws://127.0.0.1:$g1" "gw=$GW_PID"
    lg single-chat-connect "${COMMON[@]}" --user-prefix c1- \
        connect --connections "$n" --rooms "$rooms" --room-prefix "c$RANDOM-"
    stop_all
    if [[ $SIO == 1 ]]; then
        s1=$(free_port)
        start_sio "$s1"
        common socketio "ws://127.0.0.1:$s1" "sio=$SIO_PID"
        lg single-sio-connect "${COMMON[@]}" \
            connect --connections "$n" --rooms "$rooms" --room-prefix "c$RANDOM-"
        stop_all
    fi
    start_chat_pair
    start_nginx "$G1" "$G2"
    common chat "ws://127.0.0.1:$NGINX_PORT" "$PAIR_PIDS,$NGINX_PIDS"
    lg cluster-chat-connect "${COMMON[@]}" \
        --user-prefix c2- connect --connections "$n" --rooms "$rooms" --room-prefix "c$RANDOM-"
    stop_all
    if [[ $SIO == 1 ]]; then
        start_sio_pair
        start_nginx "$G1" "$G2"
        common socketio "ws://127.0.0.1:$NGINX_PORT" "$PAIR_PIDS,$NGINX_PIDS"
        lg cluster-sio-connect "${COMMON[@]}" \
            connect --connections "$n" --rooms "$rooms" --room-prefix "c$RANDOM-"
        stop_all
    fi
}

bench_fill() {
    local n=${FILL_N:-10000} g1 s1
    local shape=(fill --connections "$n" --senders "${FILL_SENDERS:-10}" --rate "${FILL_RATE:-5}" --duration "${FILL_SECS:-10}")
    g1=$(free_port)
    start_gateway gw1 "$g1"
    common chat "ws://127.0.0.1:$g1" "gw=$GW_PID"
    lg single-chat-fill "${COMMON[@]}" --user-prefix f1- "${shape[@]}" --room "f$RANDOM"
    stop_all
    if [[ $SIO == 1 ]]; then
        s1=$(free_port)
        start_sio "$s1"
        common socketio "ws://127.0.0.1:$s1" "sio=$SIO_PID"
        lg single-sio-fill "${COMMON[@]}" "${shape[@]}" --room "f$RANDOM"
        stop_all
    fi
    start_chat_pair
    common chat "$PAIR_URLS" "$PAIR_PIDS"
    lg cluster-chat-fill "${COMMON[@]}" --user-prefix f2- "${shape[@]}" --room "f$RANDOM"
    stop_all
    if [[ $SIO == 1 ]]; then
        start_sio_pair
        common socketio "$PAIR_URLS" "$PAIR_PIDS"
        lg cluster-sio-fill "${COMMON[@]}" "${shape[@]}" --room "f$RANDOM"
        stop_all
    fi
}

bench_rollout() {
    export CHAT_DRAIN_SECONDS=${DRAIN_S:-${ROLLOUT_DRAIN_S:-20}}
    start_chat_pair
    common chat "$PAIR_URLS" "$PAIR_PIDS"
    lg cluster-chat-rollout "${COMMON[@]}" \
        --user-prefix r- rollout --connections "${ROLLOUT_N:-19000}" --rooms "${ROLLOUT_ROOMS:-200}" \
        --senders "${ROLLOUT_SENDERS:-20}" --rate "${ROLLOUT_RATE:-20}" --room-prefix "r$RANDOM-" \
        --drain-pid "$P1" --restart-cmd "$(gateway_cmd gw1 "$G1" scaled)" \
        --timeout $((CHAT_DRAIN_SECONDS + 120))
    # The restarted gateway is not this shell's child: stop it by the pid the generator reported.
    local restarted
    restarted=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])).get("restarted"); print(r["pid"] if r else "")' "$OUT/cluster-chat-rollout.json" 2>/dev/null || true)
    [[ -n $restarted ]] && pids+=("$restarted")
    stop_all
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {print $2/1024/1024 " GiB"}' /proc/meminfo)"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"

modes=("$@")
((${#modes[@]})) || modes=(connect fill rollout)
for mode in "${modes[@]}"; do
    case $mode in
    connect) bench_connect ;;
    fill) bench_fill ;;
    rollout) bench_rollout ;;
    *) echo "storm-bench: unknown mode $mode (connect|fill|rollout)" >&2; exit 2 ;;
    esac
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
echo "storm-bench: results in $OUT"
