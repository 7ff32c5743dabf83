#!/usr/bin/env bash
# What CHAT_REDIS_WAIT_REPLICAS=1 costs (docs/benchmarks.md, session 8): two gateways, the
# history service and a Redis primary (deploy/local/cluster.sh) plus one replica, loadgen
# fanout in 250 rooms x 4 at each of RATES, straight to the gateways; WAIT 0 and 1
# alternating, ROUNDS times. One JSON file per run in OUT, one summary line each (CPU in µs
# per message per process).
#
#   CARGO_TARGET_DIR=/work/target-load cargo build --release -p gateway -p history-service -p loadgen
#   BENCH_BIN=/work/target-load/release loadtest/wait-bench.sh
#
# Environment (defaults): BENCH_BIN (${CARGO_TARGET_DIR:-target}/release), BENCH_OUT
# (target/bench/wait-<time>), RATES ("2000 5000"), ROUNDS (2), SECS (10).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
OUT=${BENCH_OUT:-$ROOT/target/bench/wait-$(date +%Y%m%d-%H%M%S)}
SECRET=bench-secret-not-for-production-use # HS256: at least 32 bytes
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
for b in gateway history-service loadgen; do
    [[ -x $BIN/$b ]] || { echo "wait-bench: $BIN/$b missing; build the release binaries first" >&2; exit 1; }
done
REPLICA_PORT=18099 # beside deploy/local/cluster.sh's block at 18080
DIR=
stop() {
    redis-cli -p "$REPLICA_PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
    [[ -n $DIR ]] && deploy/local/cluster.sh stop --dir "$DIR" >&2 || true
    DIR=
}
trap stop EXIT

for ((round = 1; round <= ${ROUNDS:-2}; round++)); do
    for wait in 0 1; do
        DIR=$OUT/cluster-$wait-$round
        CHAT_JWT_SECRET=$SECRET CHAT_REDIS_WAIT_REPLICAS=$wait CHAT_MESSAGES_PER_S=1000 CHAT_BURST=2000 \
            GATEWAY_BIN=$BIN/gateway HISTORY_BIN=$BIN/history-service \
            deploy/local/cluster.sh start --gateways 2 --base-port 18080 --dir "$DIR" >&2
        pids=$DIR/pids
        primary=$(awk '$1 == "redis" {print $3}' "$pids")
        redis-server --port "$REPLICA_PORT" --bind 127.0.0.1 --replicaof 127.0.0.1 "$primary" --save '' \
            --appendonly yes --appendfsync always --dir "$DIR" --daemonize yes \
            --pidfile "$DIR/replica.pid" --logfile "$DIR/replica.log"
        until redis-cli -p "$primary" INFO replication | grep -q 'slave0:.*state=online'; do sleep 0.2; done
        procs=$(awk '$1 ~ /^(gw|redis|history)/ {print $1 "=" $2}' "$pids" | paste -sd,),replica=$(cat "$DIR/replica.pid")
        urls=$(awk '$1 ~ /^gw/ {printf "%sws://127.0.0.1:%s", (n++ ? "," : ""), $3}' "$pids")
        metrics=$(awk '$1 ~ /^(gw|history)/ {printf "%s%s=http://127.0.0.1:%s/metrics", (n++ ? "," : ""), $1, $3}' "$pids")
        for rate in ${RATES:-2000 5000}; do
            name=wait$wait-r$round-$rate
            "$BIN/loadgen" --target chat --url "$urls" --jwt-secret "$SECRET" --server-pid "$procs" \
                --redis-url "redis://127.0.0.1:$primary" --metrics-url "$metrics" --user-prefix "$name-" \
                fanout --rooms 250 --members 4 --senders 250 --rate "$rate" --duration "${SECS:-10}" \
                --room-prefix "$name-" >"$OUT/$name.json" 2>"$OUT/$name.err" ||
                { echo "wait-bench: $name FAILED: $(tail -n 3 "$OUT/$name.err")" >&2; continue; }
            python3 - "$OUT/$name.json" "$wait" "$rate" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["result"]
lat, procs = r["latency_ms"], r["server_cpu"]["processes"]
cpu = " ".join(f"{k}={v['cpu_us_per_message']:.1f}" for k, v in procs.items())
print(f"WAIT={sys.argv[2]} rate={sys.argv[3]} delivered={r['delivered_ratio']} "
      f"p50={lat['p50']} p99={lat['p99']} cpu_us_per_msg {cpu}")
PY
        done
        stop
    done
done
