#!/usr/bin/env python3
"""Offline checks of deploy/compose.yaml (no Docker needed).

Parses the file with PyYAML (anchors and merge keys resolved as Compose does)
and checks what `docker compose config` cannot: that the services form the
intended topology, every reference resolves (depends_on, build files, bind
mounts, named volumes), and the settings match deploy/nginx/nginx.conf.
"""

import re
import sys
from pathlib import Path

import yaml

import contract

failures = []
passed = 0


def expect(cond, what):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
    return cond


def env_of(svc) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return env


def seconds(v) -> int:
    m = re.fullmatch(r"(\d+)(s|m)?", str(v))
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1) if m else 0


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/compose.yaml").resolve()
    base = path.parent
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services") or {}
    gateways = sorted(s for s in services if re.fullmatch(r"gateway\d+", s))

    for name in ("nginx", "redis", "scylla", "schema-migrate", "history-service"):
        expect(name in services, f"service {name} missing")
    expect(len(gateways) == 3, f"expected 3 gateway services, found {gateways}")

    declared_volumes = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        expect(svc.get("image") or svc.get("build"), f"{name}: needs image or build")
        b = svc.get("build")
        if isinstance(b, dict):
            ctx = (base / b.get("context", ".")).resolve()
            expect((ctx / b.get("dockerfile", "Dockerfile")).is_file(), f"{name}: Dockerfile {b.get('dockerfile')} not found in {ctx}")
        deps = svc.get("depends_on") or {}
        for dep, cond in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            expect(dep in services, f"{name}: depends_on unknown service {dep}")
            expect((cond or {}).get("condition", "service_started") in
                   ("service_started", "service_healthy", "service_completed_successfully"),
                   f"{name}: bad depends_on condition {cond}")
            if (cond or {}).get("condition") == "service_healthy":
                expect(services.get(dep, {}).get("healthcheck"), f"{name}: waits for {dep} healthy, but {dep} has no healthcheck")
        for v in svc.get("volumes") or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source")
            if src.startswith((".", "/")):
                expect((base / src).exists(), f"{name}: bind mount source {src} missing")
            else:
                expect(src in declared_volumes, f"{name}: named volume {src} not declared")
        for k, val in env_of(svc).items():
            # Empty values are ambiguous (set-but-empty vs unset) for the binaries.
            expect(val not in (None, ""), f"{name}: environment {k} is empty; leave it out instead")

    redis_cmd = " ".join(map(str, services.get("redis", {}).get("command") or []))
    expect("--appendonly yes" in redis_cmd, "redis: must run with --appendonly yes")
    expect("--appendfsync always" in redis_cmd, "redis: must run with --appendfsync always (acked = durable)")
    expect("noeviction" in redis_cmd, "redis: must run with --maxmemory-policy noeviction")
    expect(str(services.get("scylla", {}).get("image", "")).startswith("scylladb/scylla:"), "scylla: image scylladb/scylla:<tag>")

    mig = services.get("schema-migrate", {})
    expect(mig.get("command") == ["migrate"], "schema-migrate: command must be [migrate]")
    expect(str(env_of(mig).get("CHAT_STORE", "")).startswith("scylla://scylla:9042/"), "schema-migrate: CHAT_STORE must point at scylla")
    hist = services.get("history-service", {})
    expect((hist.get("depends_on") or {}).get("schema-migrate", {}).get("condition") == "service_completed_successfully",
           "history-service: must wait for schema-migrate to complete")
    expect(env_of(hist).get("CHAT_STORE") == env_of(mig).get("CHAT_STORE"), "history-service and schema-migrate: same CHAT_STORE")

    # Every CHAT_* variable is a setting of the binary the service runs, and the
    # internal token (when set) is the same on both sides.
    table = {b: contract.settings(b) for b in contract.SOURCES}
    binary_of = {g: "gateway" for g in gateways}
    binary_of.update({"history-service": "history-service", "schema-migrate": "history-service"})
    for name, binary in binary_of.items():
        expect(table[binary], f"no settings found in {contract.SOURCES[binary]}")
        for k, v in env_of(services.get(name, {})).items():
            if k.startswith("CHAT_"):
                expect(k in table[binary], f"{name}: {k} is not a setting of {binary}")
    mig_cmd = services.get("schema-migrate", {}).get("command") or []
    expect(mig_cmd[:1] and mig_cmd[0] in contract.subcommands(), f"schema-migrate: {mig_cmd} is not a history-service subcommand")
    tokens = {env_of(services[n]).get("CHAT_INTERNAL_TOKEN") for n in gateways + ["history-service"] if n in services}
    expect(len(tokens) == 1 and None not in tokens, f"gateways and history-service need the same CHAT_INTERNAL_TOKEN, got {tokens}")
    expect(seconds(hist.get("stop_grace_period", "10s")) > int(env_of(hist).get("CHAT_DRAIN_SECONDS", 20)),
           "history-service: stop_grace_period must exceed CHAT_DRAIN_SECONDS")

    node_ids = set()
    for g in gateways:
        env = env_of(services[g])
        node_ids.add(env.get("CHAT_NODE_ID"))
        expect(env.get("CHAT_REDIS_URL") == "redis://redis:6379", f"{g}: CHAT_REDIS_URL")
        expect(env.get("CHAT_HISTORY_URL") == "http://history-service:8081", f"{g}: CHAT_HISTORY_URL")
        expect(env.get("CHAT_LISTEN") == "0.0.0.0:8080", f"{g}: CHAT_LISTEN must be 0.0.0.0:8080")
        expect(seconds(services[g].get("stop_grace_period", "10s")) > int(env.get("CHAT_DRAIN_SECONDS", 20)),
               f"{g}: stop_grace_period must exceed CHAT_DRAIN_SECONDS")
    expect(len(node_ids) == len(gateways) and None not in node_ids, f"gateways need distinct CHAT_NODE_IDs, got {node_ids}")

    # nginx.conf upstreams must name exactly these services and ports.
    conf_mount = next((v for v in services.get("nginx", {}).get("volumes") or [] if "nginx.conf" in v), "")
    conf_file = base / conf_mount.split(":", 1)[0]
    if expect(conf_file.is_file(), "nginx: nginx.conf mount missing"):
        conf = conf_file.read_text()
        ups = set(re.findall(r"server (gateway\d+):8080", conf))
        expect(ups == set(gateways), f"nginx.conf gateway upstreams {sorted(ups)} != services {gateways}")
        expect("server history-service:8081" in conf, "nginx.conf: history upstream must be history-service:8081")
        port = re.search(r"listen (\d+);", conf)
        expect(port and any(str(p).endswith(f":{port.group(1)}") for p in services["nginx"].get("ports") or []),
               "nginx: published port must match nginx.conf listen")

    for f in failures:
        print(f"  FAIL compose: {f}", file=sys.stderr)
    print(f"  compose: {len(services)} services; {passed} checks passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
