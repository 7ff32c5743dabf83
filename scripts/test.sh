#!/usr/bin/env bash
# The project's test command (README): installs what the tests need when it is missing, then
# runs every suite against real servers on 127.0.0.1. Exits non-zero when anything fails.
#
#   scripts/test.sh              # everything
#   CHAT_SOAK_SECONDS=600 scripts/test.sh                     # a 10-minute soak (default 60 s)
#   SCYLLA_URI=scylla://host:9042/chat_test scripts/test.sh   # also the ScyllaDB contract tests
#
# Installs (when missing, as root): Debian packages redis-server, nginx, chromium; the browser
# tests' npm packages (playwright-core only; browsers are never downloaded); the deploy
# checks' PyPI tools (scripts/check-deploy.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

apt_install() {
    local missing=()
    for pair in "$@"; do
        local cmd=${pair%%:*} pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    step "installing Debian packages: ${missing[*]}"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

apt_install redis-server:redis-server nginx:nginx chromium:chromium
export PATH=$PATH:/usr/sbin

step "build (debug): every binary the multi-process tests start"
cargo build --workspace --bins --locked

step "unit and integration tests (embedded mode, and real Redis + nginx + several gateways)"
CHAT_SOAK_SECONDS=0 cargo test --workspace --locked -- --test-threads=2  # the soak runs next, on its own

step "the whole gateway suite again in scaled mode (two gateway nodes, Redis, history service; users spread over both nodes)"
# cluster:: starts its own multi-process clusters in both runs; it runs once, above.
CHAT_TEST_SCALED=1 cargo test -p gateway --test integration --locked -- --skip cluster:: --test-threads=2

step "the contract suite on a Redis Cluster (3 primaries + 3 replicas, two history-service replicas; a few minutes)"
CHAT_TEST_SCALED=1 CHAT_TEST_REDIS=cluster cargo test -p gateway --test integration --locked -- \
    rooms:: messaging:: recovery:: authorization:: pins_receipts:: --skip cluster:: --test-threads=2

step "soak (${CHAT_SOAK_SECONDS:=60} s of steady traffic on a real gateway: no RSS or queue growth, no errors)"
CHAT_SOAK_SECONDS=$CHAT_SOAK_SECONDS cargo test -p gateway --test integration --locked -- \
    --exact cluster::soak::soak_has_no_growth_trend_and_no_errors --nocapture

if [[ -z ${SCYLLA_URI:-} ]]; then
    echo
    echo "SKIPPED: ScyllaDB store contract tests — SCYLLA_URI is not set (no ScyllaDB server here)."
    echo "         The same contract tests ran against SQLite and the remote store above."
fi

step "browser tests (real gateway, headless Chromium via playwright-core)"
(
    cd tests/browser
    npm ci --no-audit --no-fund --loglevel=error
    GATEWAY_CMD="${CARGO_TARGET_DIR:-$ROOT/target}/debug/gateway" npm test
)

step "JavaScript client tests (clients/js against real servers: one gateway; redis + history-service + two gateways)"
(
    cd clients/js
    GATEWAY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/gateway" npm test
)

step "k6 smoke runs (each loadtest/k6 script briefly against a real gateway, then loadtest/README.md's cluster commands as written; k6 from PyPI)"
scripts/k6-smoke.sh

step "deployment checks (k8s manifests, Dockerfiles, nginx, compose, local cluster script)"
scripts/check-deploy.sh

echo
echo "all test suites passed"
