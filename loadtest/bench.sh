#!/usr/bin/env bash
# Runs the benchmarks of docs/benchmarks.md: the chat gateway, the Socket.IO peer
# (loadtest/peers/socketio) and the uWebSockets.js peer (loadtest/peers/uws) side by side, same
# machine, same generator (loadgen), one after the other. Writes one JSON file per measurement
# into OUT, prints a summary line for each and, per shape, one table with the peers side by
# side (loadtest/summary.py; also written to OUT/summary-<mode>.md).
#
#   CARGO_TARGET_DIR=/work/target-load cargo build --release -p gateway -p history-service -p loadgen
#   BENCH_BIN=/work/target-load/release loadtest/bench.sh [single] [cluster]
#
# (bench.sh runs `npm ci` in each peer's directory when its node_modules is missing.)
#
# single:  one gateway (embedded: in-process broker + SQLite)  vs  one Socket.IO node  vs  one
#          uWS process
# cluster: 2 gateways + Redis + history-service (deploy/local/cluster.sh)  vs  2 Socket.IO
#          nodes + @socket.io/redis-adapter + Redis  vs  2 uWS processes + Redis pub/sub; the
#          fanout/ramp/connect suites go through nginx (the same template for all three), the
#          idle suite and the shapes connect to the two server processes directly
#          (round-robin; a room's members alternate over them)
#
# Measurements (BENCH_ONLY, space-separated; default all):
#   floor    the machine's floor: CPU per write() of a 120-byte frame to 200 loopback sockets,
#            and per frame with 10 frames per write (loadgen floor); the shape tables divide
#            the servers' CPU per delivery by it
#   fanout   equal load: FANOUT_ROOMS × FANOUT_MEMBERS (10 × 100), FANOUT_SENDERS (10) at
#            FANOUT_RATE msg/s (100) for FANOUT_SECS (10)
#   ramp     the same shape from RAMP_START msg/s (50) × RAMP_FACTOR (1.5) per step, at most
#            RAMP_STEPS (12) steps of RAMP_SECS (5)
#   connect  connect + auth + join: CONNECT_CONNS (5000 direct; CONNECT_NGINX 1800 through
#            nginx, whose template allows ~2000 proxied websockets)
#   idle     IDLE_CONNS (10000) idle connections in 100 rooms: RSS per connection
#   history  append rate (20 closed-loop writers, 5000 messages) and page reads (gateway only)
#   shapes   each shape of BENCH_SHAPES, one sender per room: a fixed-rate run at its equal
#            load (p50/p99, CPU per message and delivery per process, Redis commands and store
#            transactions per message) and a ramp (highest sustainable rate, CPU there)
#
# Shapes (BENCH_SHAPES, default "small dm room200 rooms20"):
#   name     rooms × members  equal load           ramp from
#   small    250 × 4          2000 msg/s           500 msg/s
#   dm       1000 × 2         2000 msg/s           500 msg/s
#   room200  1 × 200          50 msg/s (10k del/s) 50 msg/s
#   rooms20  20 × 50          200 msg/s (10k del/s) 50 msg/s
#   RxM@RATE@START  any other shape, e.g. 10x4@100@50 (R rooms × M members)
# SHAPE_SECS (10): seconds of the fixed-rate run; SHAPE_RAMP_SECS (5), SHAPE_RAMP_FACTOR (1.5),
# SHAPE_RAMP_STEPS (14): the shapes' ramps. A ramp step passes with delivered ≥ 99.9 % and
# p99 < 100 ms; it stops at the first failing step.
#
# Other environment: BENCH_BIN (release binaries; default ${CARGO_TARGET_DIR:-target}/release),
# BENCH_OUT (default target/bench/<time>), BENCH_PEERS (default "chat sio uws"),
# FLOOR_WRITES (200000).
#
# Probes: loadgen samples every server process by name (gw1, gw2 = the peer's own server
# processes: gateways, Socket.IO nodes or uWS processes; redis; history; nginx, nginx1 = its
# worker) and reports CPU per process and per role; in cluster mode also the peer's Redis
# (INFO commandstats: calls and µs per message) and, for the gateway, the /metrics counters of
# both gateways and the history service (e.g. chat_store_batch_seconds_count: store
# transactions).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
OUT=${BENCH_OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}
SECRET=bench-secret-not-for-production-use # HS256: at least 32 bytes
SIO=$ROOT/loadtest/peers/socketio
UWS=$ROOT/loadtest/peers/uws
PEERS=${BENCH_PEERS:-chat sio uws}
ONLY=${BENCH_ONLY:-floor fanout ramp connect idle history shapes}
SHAPES=${BENCH_SHAPES:-small dm room200 rooms20}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
for b in gateway history-service loadgen; do
    [[ -x $BIN/$b ]] || { echo "bench: $BIN/$b missing; build the release binaries first" >&2; exit 1; }
done
peer_on() { [[ " $PEERS " == *" $1 "* ]]; }
want() { [[ " $ONLY " == *" $1 "* ]]; }
for p in $PEERS; do
    case $p in
    chat) ;;
    sio) [[ -d $SIO/node_modules ]] || (cd "$SIO" && npm ci --no-audit --no-fund --loglevel=error) ;;
    uws) [[ -d $UWS/node_modules ]] || (cd "$UWS" && npm ci --no-audit --no-fund --loglevel=error) ;;
    *) echo "bench: unknown peer $p in BENCH_PEERS (chat sio uws)" >&2; exit 2 ;;
    esac
done
export PATH=$PATH:/usr/sbin
# 10k idle connections: the generator and the server each hold one fd per connection.
ulimit -n "$(ulimit -Hn)"

ROOMS=${FANOUT_ROOMS:-10} MEMBERS=${FANOUT_MEMBERS:-100} SENDERS=${FANOUT_SENDERS:-10}
RATE=${FANOUT_RATE:-100} SECS=${FANOUT_SECS:-10}

# Server settings for the gateway: the per-connection message rate is raised so that the
# generator's senders are never rate limited (the limit is per connection, 20/s by default;
# the 1 × 200 shape's single sender goes past 5000/s).
export CHAT_JWT_SECRET=$SECRET CHAT_MESSAGES_PER_S=100000 CHAT_BURST=200000 CHAT_LOG=warn,gateway=info
export CHAT_DRAIN_SECONDS=1

pids=()     # node and gateway processes started here
pidfiles=() # daemons (redis, nginx) started here
cleanup() {
    local p f
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for f in "${pidfiles[@]}"; do [[ -s $f ]] && kill -TERM "$(<"$f")" 2>/dev/null || true; done
    [[ -f $OUT/cluster/pids ]] && deploy/local/cluster.sh stop --dir "$OUT/cluster" >/dev/null 2>&1 || true
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
    print(f"{n}: {r['deliveries_per_s']} deliveries/s, delivered {r['delivered_ratio']}, {lat(r['latency_ms'])}, {c['cpu_us_per_delivery']} server-cpu-us/delivery, {c['cpu_us_per_message']} per message")
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
elif 'cpu_us_per_write' in d:
    c = d['coalesced']
    print(f"{n}: {d['cpu_us_per_write']} CPU-us per write() of {d['frame_bytes']} B to {d['sockets']} sockets; {c['cpu_us_per_write']} per write of {c['frames_per_write']} frames = {c['cpu_us_per_frame']} per frame")
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

start_node() { # peer port [redis-url]: a Socket.IO or uWS process; sets NODE_PID
    local peer=$1 port=$2 redis=${3:-} dir
    case $peer in sio) dir=$SIO ;; uws) dir=$UWS ;; esac
    PORT=$port REDIS_URL=$redis JWT_SECRET=$SECRET node "$dir/server.js" </dev/null >"$OUT/$peer-$port.log" 2>&1 &
    NODE_PID=$!
    pids+=("$NODE_PID")
    wait_url "http://127.0.0.1:$port/healthz"
}

start_redis() { # name port: a throwaway Redis without persistence; sets REDIS_PID
    local f=$OUT/$1-redis.pid
    redis-server --port "$2" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --pidfile "$f" --logfile "$OUT/$1-redis.log" --dir "$OUT"
    pidfiles+=("$f")
    for _ in $(seq 50); do [[ -s $f ]] && break; sleep 0.1; done
    REDIS_PID=$(<"$f")
}

start_nginx() { # name listen-port upstream-port...: nginx from the cluster's template; sets NGINX_PIDS
    local name=$1 listen=$2 first=$3 dir=$OUT/$1-nginx conf ups="" p
    shift 2
    for p in "$@"; do ups+="server 127.0.0.1:$p; "; done
    mkdir -p "$dir"
    conf=$(<deploy/nginx/local.conf.template)
    conf=${conf//@PREFIX@/$dir}
    conf=${conf//@LISTEN@/127.0.0.1:$listen}
    conf=${conf//@GATEWAYS@/$ups}
    conf=${conf//@HISTORY@/127.0.0.1:$first} # the peers have no history service
    printf '%s\n' "$conf" >"$dir/nginx.conf"
    env -u NGINX nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    pidfiles+=("$dir/nginx.pid")
    for _ in $(seq 50); do [[ -s $dir/nginx.pid ]] && break; sleep 0.1; done
    local m
    m=$(<"$dir/nginx.pid")
    NGINX_PIDS="nginx=$m$(pgrep -P "$m" | awk '{printf ",nginx%d=%s", NR, $1}')"
}

stop_pids() { # pid...: TERM and wait
    local p
    for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

suite() { # label target url probe-args...; WITH_HISTORY=1 adds the history suite
    local label=$1 target=$2 url=$3
    shift 3
    local common=(--target "$target" --url "$url" --jwt-secret "$SECRET" "$@")
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
        lg "$label-connect" "${common[@]}" --user-prefix "c-$label-" connect --connections "${CONNECT_N:-${CONNECT_CONNS:-5000}}" \
            --rooms 10 --room-prefix "c$RANDOM-"
    fi
    if want history && [[ -n ${WITH_HISTORY:-} ]]; then
        lg "$label-history" "${common[@]}" --user-prefix "h-$label-" history --room "h$RANDOM" \
            --messages 5000 --writers 20 --reads 2000 --read-concurrency 16
    fi
}

idle_suite() { # label target url pids
    want idle || return 0
    lg "$1-idle" --target "$2" --url "$3" --server-pid "$4" --jwt-secret "$SECRET" --concurrency 128 \
        --user-prefix "i-$1-" idle --connections "${IDLE_CONNS:-10000}" --rooms 100 --hold 5 --room-prefix "i$RANDOM-"
}

shape_def() { # name: prints "rooms members rate ramp-start"
    case $1 in
    small) echo "250 4 2000 500" ;;
    dm) echo "1000 2 2000 500" ;;
    room200) echo "1 200 50 50" ;;
    rooms20) echo "20 50 200 50" ;;
    *)
        [[ $1 =~ ^([0-9]+)x([0-9]+)@([0-9.]+)@([0-9.]+)$ ]] ||
            { echo "bench: unknown shape $1 (small dm room200 rooms20, or RxM@RATE@START)" >&2; return 1; }
        echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]} ${BASH_REMATCH[3]} ${BASH_REMATCH[4]}"
        ;;
    esac
}

shapes_suite() { # label target urls probe-args...: every shape, one sender per room
    want shapes || return 0
    local label=$1 target=$2 urls=$3 shape def rooms members rate start
    shift 3
    local common=(--target "$target" --url "$urls" --jwt-secret "$SECRET" "$@")
    for shape in $SHAPES; do
        def=$(shape_def "$shape") || continue
        read -r rooms members rate start <<<"$def"
        lg "$label-shape-$shape-fixed" "${common[@]}" --user-prefix "sf-$label-$shape-" fanout --rooms "$rooms" \
            --members "$members" --senders "$rooms" --rate "$rate" --duration "${SHAPE_SECS:-10}" --room-prefix "sf$RANDOM-"
        lg "$label-shape-$shape-ramp" "${common[@]}" --user-prefix "sr-$label-$shape-" ramp --rooms "$rooms" \
            --members "$members" --senders "$rooms" --rate "$start" --factor "${SHAPE_RAMP_FACTOR:-1.5}" \
            --max-steps "${SHAPE_RAMP_STEPS:-14}" --duration "${SHAPE_RAMP_SECS:-5}" --room-prefix "sr$RANDOM-"
    done
}

single_mode() {
    if peer_on chat; then
        start_gateway
        local probes=(--server-pid "gw1=$GW_PID" --metrics-url "gw1=http://$GW_ADDR/metrics")
        WITH_HISTORY=1 suite single-chat chat "ws://$GW_ADDR" "${probes[@]}"
        idle_suite single-chat chat "ws://$GW_ADDR" "gw1=$GW_PID"
        shapes_suite single-chat chat "ws://$GW_ADDR" "${probes[@]}"
        stop_pids "$GW_PID"
    fi
    local peer port target
    for peer in sio uws; do
        peer_on $peer || continue
        case $peer in sio) port=18100 target=socketio ;; uws) port=18200 target=chat ;; esac
        start_node $peer $port
        suite single-$peer $target "ws://127.0.0.1:$port" --server-pid "gw1=$NODE_PID"
        idle_suite single-$peer $target "ws://127.0.0.1:$port" "gw1=$NODE_PID"
        shapes_suite single-$peer $target "ws://127.0.0.1:$port" --server-pid "gw1=$NODE_PID"
        stop_pids "$NODE_PID"
    done
}

cluster_mode() {
    if peer_on chat; then
        GATEWAY_BIN=$BIN/gateway HISTORY_BIN=$BIN/history-service \
            deploy/local/cluster.sh start --gateways 2 --base-port 18080 --dir "$OUT/cluster" >&2
        local f=$OUT/cluster/pids cpids workers gw_urls gw_pids direct redis metrics
        cpids=$(awk '$1 ~ /^(gw|redis|history|nginx)/ {print $1 "=" $2}' "$f" | paste -sd,)
        workers=$(pgrep -P "$(awk '$1 == "nginx" {print $2}' "$f")" | awk '{printf ",nginx%d=%s", NR, $1}' || true)
        cpids=$cpids$workers
        gw_urls=$(awk '$1 ~ /^gw/ {printf "%sws://127.0.0.1:%s", (n++ ? "," : ""), $3}' "$f")
        gw_pids=$(awk '$1 ~ /^gw/ {print $1 "=" $2}' "$f" | paste -sd,)
        direct=$(awk '$1 ~ /^(gw|redis|history)/ {print $1 "=" $2}' "$f" | paste -sd,)
        redis=redis://127.0.0.1:$(awk '$1 == "redis" {print $3}' "$f")
        metrics=$(awk '$1 ~ /^(gw|history)/ {printf "%s%s=http://127.0.0.1:%s/metrics", (n++ ? "," : ""), $1, $3}' "$f")
        WITH_HISTORY=1 CONNECT_N=${CONNECT_NGINX:-1800} suite cluster-chat chat "ws://127.0.0.1:18080" \
            --server-pid "$cpids" --redis-url "$redis" --metrics-url "$metrics"
        # Idle memory is a per-gateway property: connect to the gateways directly (the nginx
        # template's worker_connections caps proxied websockets at ~2000).
        idle_suite cluster-chat chat "$gw_urls" "$gw_pids"
        shapes_suite cluster-chat chat "$gw_urls" --server-pid "$direct" --redis-url "$redis" --metrics-url "$metrics"
        deploy/local/cluster.sh stop --dir "$OUT/cluster" >&2
    fi
    # Each peer: its own Redis, 2 processes relaying through it, nginx from the same template.
    local peer base target n1 n2 r
    for peer in sio uws; do
        peer_on $peer || continue
        case $peer in sio) base=18100 target=socketio ;; uws) base=18200 target=chat ;; esac
        start_redis $peer $((base + 89)); r=$REDIS_PID
        start_node $peer $((base + 1)) "redis://127.0.0.1:$((base + 89))"; n1=$NODE_PID
        start_node $peer $((base + 2)) "redis://127.0.0.1:$((base + 89))"; n2=$NODE_PID
        start_nginx $peer $((base + 80)) $((base + 1)) $((base + 2))
        local nodes="gw1=$n1,gw2=$n2" urls="ws://127.0.0.1:$((base + 1)),ws://127.0.0.1:$((base + 2))"
        CONNECT_N=${CONNECT_NGINX:-1800} suite cluster-$peer $target "ws://127.0.0.1:$((base + 80))" \
            --server-pid "$nodes,redis=$r,$NGINX_PIDS" --redis-url "redis://127.0.0.1:$((base + 89))"
        idle_suite cluster-$peer $target "$urls" "$nodes"
        shapes_suite cluster-$peer $target "$urls" --server-pid "$nodes,redis=$r" \
            --redis-url "redis://127.0.0.1:$((base + 89))"
        kill -TERM "$(<"$OUT/$peer-nginx/nginx.pid")" "$r" 2>/dev/null || true
        rm -f "$OUT/$peer-nginx/nginx.pid" "$OUT/$peer-redis.pid"
        stop_pids "$n1" "$n2"
    done
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {print $2/1024/1024 " GiB"}' /proc/meminfo)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "node: $(node --version); nginx: $(nginx -v 2>&1 | cut -d/ -f2); redis: $(redis-server --version | awk '{print $3}')"
} | tee "$OUT/machine.txt"

want floor && lg floor floor --writes "${FLOOR_WRITES:-200000}"

modes=("$@")
((${#modes[@]})) || modes=(single cluster)
for mode in "${modes[@]}"; do
    case $mode in
    single) single_mode ;;
    cluster) cluster_mode ;;
    *) echo "bench: unknown mode $mode (single|cluster)" >&2; exit 2 ;;
    esac
    want shapes && python3 loadtest/summary.py "$OUT" "$mode" | tee "$OUT/summary-$mode.md"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
echo "bench: results in $OUT"
