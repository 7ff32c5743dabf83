#!/usr/bin/env bash
# A local multi-node chat cluster on loopback: the scaled-out shape of the
# product (redis + N gateways + history-service + nginx) on one machine, for
# tests, demos and debugging. Runs as root or as an ordinary user; needs only
# bash, curl, redis-server and nginx (Debian packages redis-server, nginx).
#
#   cluster.sh start  [--gateways N] [--base-port P|auto] [--dir DIR]
#   cluster.sh stop   [--dir DIR]
#   cluster.sh status [--dir DIR]
#
# Defaults: N=2, P=$CLUSTER_BASE_PORT or 18080, DIR=./data/cluster; P=auto picks a
# free block of ports (printed, and in cluster.env). Ports:
#   P        nginx (the entry point: /ws, /api, /)
#   P+1..P+N gateways gw1..gwN
#   P+9      redis-server (AOF on, no RDB snapshots)
#   P+10     history-service (SQLite at DIR/history.db)
#
# Environment:
#   GATEWAY_BIN, HISTORY_BIN  binaries (default target/release/{gateway,history-service})
#   REDIS_SERVER, NGINX_BIN   override the redis-server / nginx executables
#                             (not NGINX: nginx itself reads a variable of that
#                             name as inherited listening sockets, so it is
#                             removed from nginx's environment)
#   CLUSTER_BASE_PORT         P when --base-port is not given (default 18080)
#   CHAT_JWT_SECRET           HS256 secret for both binaries, at least 32 bytes
#                             (default: a dev value, printed)
#   CHAT_INTERNAL_TOKEN       token guarding history-service's /internal/v1 API,
#                             shared by the gateways (default: random per start)
#   CHAT_DRAIN_SECONDS        gateway drain window (default here: 5, to stop quickly)
#   CLUSTER_WAIT_SECONDS      how long to wait for each /healthz (default 30)
#   Any other CHAT_* variable (CHAT_LOG, CHAT_ALLOWED_ORIGINS, ...) is passed through.
#
# Files under DIR:
#   pids         one line per process: "<name> <pid> <port> <executable>", in
#                start order (redis, history, gw1..gwN, nginx)
#   cluster.env  URLs and the JWT secret, for tests to source
#   logs/        one log per process; redis/ AOF files; nginx/ rendered config
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true # bash 5.2: keep '&' literal in ${x//a/b}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TEMPLATE="$ROOT/deploy/nginx/local.conf.template"

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*"; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- arguments
cmd=${1:-}
[[ $# -gt 0 ]] && shift
gateways=2
base_port=${CLUSTER_BASE_PORT:-18080}
dir=./data/cluster
while [[ $# -gt 0 ]]; do
    case $1 in
        --gateways) gateways=${2:?--gateways needs a number}; shift 2 ;;
        --gateways=*) gateways=${1#*=}; shift ;;
        --base-port) base_port=${2:?--base-port needs a number}; shift 2 ;;
        --base-port=*) base_port=${1#*=}; shift ;;
        --dir) dir=${2:?--dir needs a path}; shift 2 ;;
        --dir=*) dir=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see cluster.sh --help)" ;;
    esac
done

# ---------------------------------------------------------------- helpers
find_exe() { # name [override]: prints a path or nothing
    local name=$1 override=${2:-}
    if [[ -n $override ]]; then
        [[ -x $override ]] && echo "$override"
        return 0
    fi
    # Debian puts nginx in /usr/sbin, which an ordinary user's PATH may lack.
    local p
    for p in "$(command -v "$name" 2>/dev/null || true)" "/usr/sbin/$name" "/usr/local/sbin/$name" "/sbin/$name"; do
        if [[ -n $p && -x $p ]]; then echo "$p"; return 0; fi
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_base_port() { # a P with P..P+10 all free on 127.0.0.1
    local try p base busy
    for ((try = 0; try < 20; try++)); do
        # 20000..32700: below Linux's ephemeral range (32768..60999), from which outgoing
        # connections take their local ports — one could take a port between this check and
        # the bind (seen while a load generator held thousands of connections).
        base=$((20000 + RANDOM % 1270 * 10))
        busy=0
        for ((p = base; p <= base + 10; p++)); do
            if port_open "$p"; then busy=1; break; fi
        done
        ((busy)) || { echo "$base"; return 0; }
    done
    return 1
}

# A zombie counts as dead: daemonized nginx/redis are reaped by PID 1, which in
# some containers takes seconds.
alive() {
    [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# True when pid still runs the executable we started (guards against pid reuse
# after a crash: never signal a process we did not start).
owns() {
    local pid=$1 exe=$2
    alive "$pid" || return 1
    [[ -r /proc/$pid/cmdline ]] || return 0 # no procfs: trust the pid file
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$(basename "$exe")"
}

wait_seconds=${CLUSTER_WAIT_SECONDS:-30}

wait_http() { # name pid url log
    local name=$1 pid=$2 url=$3 log=$4 i
    for ((i = 0; i < wait_seconds * 5; i++)); do
        if ! alive "$pid"; then
            echo "--- last lines of $log ---" >&2; tail -n 20 "$log" >&2 || true
            die "$name exited during start-up (log: $log)"
        fi
        if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    echo "--- last lines of $log ---" >&2; tail -n 20 "$log" >&2 || true
    die "$name did not answer $url within ${wait_seconds}s (log: $log)"
}

wait_redis() { # port
    local i reply
    for ((i = 0; i < wait_seconds * 5; i++)); do
        if reply=$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'PING\r\n' >&3 && read -r -t 1 line <&3 && echo "$line") 2>/dev/null ); then
            [[ $reply == +PONG* ]] && return 0
        fi
        sleep 0.2
    done
    die "redis-server did not answer PING on port $1 within ${wait_seconds}s (log: $dir/logs/redis.log)"
}

record() { echo "$1 $2 $3 $4" >>"$dir/pids"; }

# Stops everything listed in DIR/pids, last started first.
stop_all() {
    local pidfile=$dir/pids
    [[ -f $pidfile ]] || { say "not running (no $pidfile)"; return 0; }
    local -a names=() pids=() exes=()
    local name pid port exe i
    while read -r name pid port exe; do
        [[ -n ${name:-} ]] || continue
        names+=("$name"); pids+=("$pid"); exes+=("$exe")
    done <"$pidfile"
    local drain=${CHAT_DRAIN_SECONDS:-5}
    # Stop in reverse start order: nginx (no new traffic), then the gateways
    # together (they drain in parallel), then history, then redis (which
    # fsyncs its AOF on SIGTERM).
    local -a group=()
    flush_group() {
        local timeout=$1 p deadline
        ((${#group[@]})) || return 0
        deadline=$((SECONDS + timeout))
        for p in "${group[@]}"; do
            while alive "$p" && ((SECONDS < deadline)); do sleep 0.1; done
            if alive "$p"; then
                say "pid $p did not exit within ${timeout}s; sending SIGKILL"
                kill -KILL "$p" 2>/dev/null || true
            fi
        done
        group=()
    }
    for ((i = ${#names[@]} - 1; i >= 0; i--)); do
        name=${names[i]} pid=${pids[i]} exe=${exes[i]}
        if ! owns "$pid" "$exe"; then
            alive "$pid" && say "pid $pid is no longer $name; leaving it alone"
            continue
        fi
        case $name in
            gw*) kill -TERM "$pid" 2>/dev/null || true; group+=("$pid") ;;
            *)
                flush_group $((drain + 10)) # gateways still draining
                kill -TERM "$pid" 2>/dev/null || true; group+=("$pid")
                flush_group 15
                ;;
        esac
    done
    flush_group $((drain + 10))
    rm -f "$pidfile"
    say "stopped (logs and data kept in $dir)"
}

# ---------------------------------------------------------------- commands
start() {
    if ! [[ $gateways =~ ^[0-9]+$ ]] || ((gateways < 1 || gateways > 8)); then
        die "--gateways must be 1..8 (gateway ports are P+1..P+8; P+9 is redis)"
    fi
    if [[ $base_port == auto ]]; then
        base_port=$(free_base_port) || die "--base-port auto: no free block of 11 loopback ports found"
    fi
    if ! [[ $base_port =~ ^[0-9]+$ ]] || ((base_port < 1024 || base_port + 10 > 65535)); then
        die "--base-port must be 1024..65525 or auto"
    fi

    local gateway_bin history_bin redis_bin nginx_bin
    gateway_bin=$(find_exe gateway "${GATEWAY_BIN:-$ROOT/target/release/gateway}")
    history_bin=$(find_exe history-service "${HISTORY_BIN:-$ROOT/target/release/history-service}")
    [[ -n $gateway_bin ]] || die "gateway binary not found (${GATEWAY_BIN:-$ROOT/target/release/gateway}); build it: cargo build --release -p gateway -p history-service"
    [[ -n $history_bin ]] || die "history-service binary not found (${HISTORY_BIN:-$ROOT/target/release/history-service}); build it: cargo build --release -p gateway -p history-service"
    redis_bin=$(find_exe redis-server "${REDIS_SERVER:-}")
    nginx_bin=$(find_exe nginx "${NGINX_BIN:-}")
    [[ -n $redis_bin ]] || die "redis-server not found: install it (Debian: apt-get install redis-server) or set REDIS_SERVER"
    [[ -n $nginx_bin ]] || die "nginx not found: install it (Debian: apt-get install nginx) or set NGINX_BIN"
    [[ -r $TEMPLATE ]] || die "missing $TEMPLATE"
    command -v curl >/dev/null || die "curl not found"

    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -f $dir/pids ]]; then
        local name pid port exe
        while read -r name pid port exe; do
            owns "$pid" "$exe" && die "already running ($name pid $pid); stop it first: cluster.sh stop --dir $dir"
        done <"$dir/pids"
        rm -f "$dir/pids"
    fi

    local redis_port=$((base_port + 9)) history_port=$((base_port + 10)) p i
    local -a ports=("$base_port" "$redis_port" "$history_port")
    for ((i = 1; i <= gateways; i++)); do ports+=($((base_port + i))); done
    for p in "${ports[@]}"; do
        port_open "$p" && die "port $p on 127.0.0.1 is already in use (choose another --base-port)"
    done

    mkdir -p "$dir/logs" "$dir/redis" "$dir/nginx"
    # If anything below fails, take down what already started.
    trap 'rc=$?; if ((rc != 0)); then say "start failed; stopping what was started"; stop_all >/dev/null 2>&1 || true; fi' EXIT

    local secret=${CHAT_JWT_SECRET:-}
    if [[ -z $secret ]]; then
        secret=local-cluster-dev-secret-not-for-production
        say "CHAT_JWT_SECRET not set; using the dev secret '$secret' (HS256)"
    fi
    export CHAT_JWT_SECRET=$secret
    local token=${CHAT_INTERNAL_TOKEN:-}
    if [[ -z $token ]]; then
        token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    fi
    export CHAT_INTERNAL_TOKEN=$token
    export CHAT_DRAIN_SECONDS=${CHAT_DRAIN_SECONDS:-5}
    local redis_url=redis://127.0.0.1:$redis_port history_url=http://127.0.0.1:$history_port

    # redis: daemonized, pid from its own pid file.
    "$redis_bin" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly yes \
        --dir "$dir/redis" --daemonize yes --pidfile "$dir/redis/redis.pid" \
        --logfile "$dir/logs/redis.log" </dev/null
    for ((i = 0; i < 50; i++)); do [[ -s $dir/redis/redis.pid ]] && break; sleep 0.1; done
    [[ -s $dir/redis/redis.pid ]] || die "redis-server did not start (log: $dir/logs/redis.log)"
    record redis "$(<"$dir/redis/redis.pid")" "$redis_port" "$redis_bin"
    wait_redis "$redis_port"

    # history-service on SQLite.
    CHAT_LISTEN=127.0.0.1:$history_port CHAT_REDIS_URL=$redis_url \
        CHAT_STORE=sqlite://$dir/history.db CHAT_NODE_ID=history \
        nohup "$history_bin" </dev/null >"$dir/logs/history.log" 2>&1 &
    record history $! "$history_port" "$history_bin"
    local history_pid=$!

    local -a gw_pids=() upstreams=()
    for ((i = 1; i <= gateways; i++)); do
        mkdir -p "$dir/gw$i"
        CHAT_LISTEN=127.0.0.1:$((base_port + i)) CHAT_REDIS_URL=$redis_url \
            CHAT_HISTORY_URL=$history_url CHAT_NODE_ID=gw$i CHAT_DATA_DIR=$dir/gw$i \
            nohup "$gateway_bin" </dev/null >"$dir/logs/gw$i.log" 2>&1 &
        gw_pids+=($!)
        record "gw$i" $! $((base_port + i)) "$gateway_bin"
        upstreams+=("server 127.0.0.1:$((base_port + i));")
    done

    wait_http history-service "$history_pid" "$history_url/healthz" "$dir/logs/history.log"
    for ((i = 1; i <= gateways; i++)); do
        wait_http "gw$i" "${gw_pids[i - 1]}" "http://127.0.0.1:$((base_port + i))/healthz" "$dir/logs/gw$i.log"
    done

    # nginx from the template; it daemonizes and writes nginx.pid.
    local conf prefix=$dir/nginx gw_lines
    printf -v gw_lines '%s\n        ' "${upstreams[@]}"
    gw_lines=${gw_lines%$'\n        '}
    conf=$(<"$TEMPLATE")
    conf=${conf//@PREFIX@/$prefix}
    conf=${conf//@LISTEN@/127.0.0.1:$base_port}
    conf=${conf//@GATEWAYS@/$gw_lines}
    conf=${conf//@HISTORY@/127.0.0.1:$history_port}
    printf '%s\n' "$conf" >"$prefix/nginx.conf"
    rm -f "$prefix/nginx.pid"
    # env -u NGINX: with that variable set, nginx believes it is a binary
    # upgrade, inherits "sockets" and never daemonizes (start would hang).
    env -u NGINX "$nginx_bin" -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" </dev/null ||
        die "nginx failed to start (see $prefix/error.log)"
    for ((i = 0; i < 50; i++)); do [[ -s $prefix/nginx.pid ]] && break; sleep 0.1; done
    [[ -s $prefix/nginx.pid ]] || die "nginx wrote no pid file (see $prefix/error.log)"
    local nginx_pid
    nginx_pid=$(<"$prefix/nginx.pid")
    record nginx "$nginx_pid" "$base_port" "$nginx_bin"
    wait_http nginx "$nginx_pid" "http://127.0.0.1:$base_port/healthz" "$prefix/error.log"

    local gw_urls=()
    for ((i = 1; i <= gateways; i++)); do gw_urls+=("http://127.0.0.1:$((base_port + i))"); done
    cat >"$dir/cluster.env" <<EOF
# Written by deploy/local/cluster.sh start; source it in tests.
CLUSTER_URL=http://127.0.0.1:$base_port
CLUSTER_WS_URL=ws://127.0.0.1:$base_port/ws
CLUSTER_GATEWAY_URLS="${gw_urls[*]}"
CLUSTER_HISTORY_URL=$history_url
CLUSTER_REDIS_URL=$redis_url
CHAT_JWT_SECRET=$secret
CHAT_INTERNAL_TOKEN=$token
EOF
    trap - EXIT
    say "up: http://127.0.0.1:$base_port (nginx) -> $gateways gateway(s) on ports $((base_port + 1))-$((base_port + gateways)), history :$history_port, redis :$redis_port"
    say "state in $dir (pids, cluster.env, logs/)"
}

status() {
    [[ -d $dir ]] && dir=$(cd "$dir" && pwd)
    if [[ ! -f $dir/pids ]]; then say "not running (no $dir/pids)"; return 3; fi
    local name pid port exe state health url down=0
    printf '%-8s %-8s %-6s %-8s %s\n' NAME PID PORT PROCESS HEALTH
    while read -r name pid port exe; do
        [[ -n ${name:-} ]] || continue
        if owns "$pid" "$exe"; then state=running; else state=dead; down=1; fi
        health=-
        if [[ $name == redis ]]; then
            port_open "$port" && health=open || health=closed
        else
            url=http://127.0.0.1:$port/healthz
            if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then health=ok; else health=failing; down=1; fi
        fi
        printf '%-8s %-8s %-6s %-8s %s\n' "$name" "$pid" "$port" "$state" "$health"
    done <"$dir/pids"
    return $down
}

case $cmd in
    start) start ;;
    stop) [[ -d $dir ]] && dir=$(cd "$dir" && pwd); stop_all ;;
    status) status ;;
    -h|--help|help) usage ;;
    "") usage >&2; exit 2 ;;
    *) die "unknown command: $cmd (start|stop|status)" ;;
esac
