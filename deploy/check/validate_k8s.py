#!/usr/bin/env python3
"""Offline checks of a rendered Kustomize build (`kubectl kustomize DIR`).

Used by scripts/check-deploy.sh, one call per overlay:

  validate_k8s.py RENDERED.yaml --name k8s/overlays/production \
      --kube-version 1.31.0 [--kube-version 1.35.0 ...] \
      [--external Secret/chat-tls ...] [--min-gateway-replicas 3] \
      [--pinned-images] [--production]

Four layers, all offline:
1. Schema: every built-in object (core and *.k8s.io groups) is validated with
   kubernetes-validate against each given Kubernetes version, strict mode
   (unknown fields are errors). Custom resources (ScyllaCluster,
   ServiceMonitor, PrometheusRule, ScaledObject, HTTPRoute) have no built-in
   schema: they are listed here and validated against their CRD schemas by
   deploy/check/crds/validate_crds.mjs; ScyllaCluster (no schema package
   exists) is shape-checked here.
2. References: Service/PDB/HPA/NetworkPolicy/ServiceMonitor selectors match
   pods, named ports exist, ConfigMaps/Secrets/PVCs/ServiceAccounts used by
   pods exist in the build (or are declared --external: created out of band).
3. Policy: what the operations runbook promises (non-root, read-only root
   filesystem, no capabilities, RuntimeDefault seccomp, no token automount,
   resources, probes on the internal port, drain timing, zero-downtime
   rollouts, no `replicas` where an autoscaler owns the count, WebSocket
   timeouts and retries, routing that never reaches an internal port,
   secrets as files, priority classes, AOF and Redis auth; with
   --production: autoscaling on connections, history-service spread over
   zones as a hard rule, Pod Security enforced on the namespace).
4. Contract with the binaries (deploy/check/contract.py reads it from the
   Rust source): every CHAT_* variable a pod gets is one its binary accepts,
   values parse the way the binary parses them, secrets come from Secrets,
   the schema Job runs a real subcommand, and every metric a PrometheusRule
   uses is one the binaries export.
"""

import argparse
import base64
import re
import sys

import kubernetes_validate
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


# ------------------------------------------------------------------ helpers
# *.k8s.io groups that are CRDs, not built into Kubernetes.
CRD_GROUPS = {"gateway.networking.k8s.io", "gateway.networking.x-k8s.io"}


def builtin(api_version: str) -> bool:
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    return group not in CRD_GROUPS and ("." not in group or group.endswith(".k8s.io"))


def ident(o):
    return f"{o['kind']}/{o['metadata']['name']}"


def selector_matches(sel, labels) -> bool:
    if sel is None:
        return False
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def pod_template(o):
    k = o["kind"]
    if k in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return o["spec"]["template"]
    if k == "CronJob":
        return o["spec"]["jobTemplate"]["spec"]["template"]
    return None


def containers(tpl):
    spec = tpl["spec"]
    return (spec.get("initContainers") or []) + spec["containers"]


def quantity_ok(res, *path):
    cur = res
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return False
        cur = cur[p]
    return True


def service_port(svc, port):
    """The Service port named or numbered `port`, or None."""
    for p in svc["spec"]["ports"]:
        if port in (p.get("name"), p["port"]):
            return p
    return None


class Scaler:
    """An HPA or a KEDA ScaledObject: what it scales, its bounds, its signals."""

    def __init__(self, owner, target, lo, hi, on_connections):
        self.owner, self.target, self.min, self.max, self.on_connections = owner, target, lo, hi, on_connections


def autoscalers(by_kind):
    out = []
    for h in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = h["spec"]["scaleTargetRef"]
        conn = any(m.get("type") == "Pods" and m["pods"]["metric"]["name"] == "chat_connections"
                   for m in h["spec"].get("metrics") or [])
        out.append(Scaler(ident(h), (ref["kind"], ref["name"]), h["spec"].get("minReplicas", 1),
                          h["spec"]["maxReplicas"], conn))
    for so in by_kind.get("ScaledObject", {}).values():
        ref = so["spec"]["scaleTargetRef"]
        conn = any(t.get("type") == "prometheus" and "chat_connections" in (t.get("metadata") or {}).get("query", "")
                   for t in so["spec"].get("triggers") or [])
        out.append(Scaler(ident(so), (ref.get("kind", "Deployment"), ref["name"]), so["spec"].get("minReplicaCount", 0),
                          so["spec"].get("maxReplicaCount", 100), conn))
    return out


class Pod:
    """A pod template, or the pods an operator creates for a custom resource."""

    def __init__(self, owner, labels, ports, template=None):
        self.owner, self.labels, self.ports, self.template = owner, labels, ports, template


# ------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--name", required=True)
    ap.add_argument("--kube-version", action="append", required=True,
                    help="validate against this Kubernetes version (repeatable)")
    ap.add_argument("--external", action="append", default=[],
                    help="Kind/name that is created out of band (e.g. Secret/chat-secrets)")
    ap.add_argument("--min-gateway-replicas", type=int, default=1)
    ap.add_argument("--pinned-images", action="store_true",
                    help="fail on images without a tag or tagged latest/dev")
    ap.add_argument("--production", action="store_true",
                    help="also require the production-only policies (connections autoscaling, "
                         "zone spread, enforced Pod Security)")
    a = ap.parse_args()

    with open(a.rendered) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    external = set(a.external)
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o

    def exists(kind, name):
        return name in by_kind.get(kind, {}) or f"{kind}/{name}" in external

    # ---------------------------------------------------------- 1. schema
    skipped = []
    n_builtin = 0
    for o in objs:
        if not builtin(o["apiVersion"]):
            skipped.append(o)
            continue
        n_builtin += 1
        for version in a.kube_version:
            try:
                kubernetes_validate.validate(o, version, strict=True)
                expect(True, "")
            except kubernetes_validate.ValidationError as e:
                expect(False, f"{ident(o)}: schema ({version}): {e.message} at {'/'.join(map(str, e.path))}")
            except kubernetes_validate.SchemaNotFoundError:
                expect(False, f"{ident(o)}: no schema for {o['apiVersion']} {o['kind']} in Kubernetes {version}")

    # Shape checks of the custom resources we ship; their schemas are checked
    # by validate_crds.mjs (all but ScyllaCluster).
    for o in skipped:
        s = o.get("spec") or {}
        if o["kind"] == "ScyllaCluster":
            dc = s.get("datacenter") or {}
            racks = dc.get("racks") or []
            expect(s.get("version") and dc.get("name") and racks, f"{ident(o)}: needs spec.version, datacenter.name, racks")
            for r in racks:
                expect(r.get("name") and isinstance(r.get("members"), int) and r["members"] >= 1
                       and quantity_ok(r, "storage", "capacity"),
                       f"{ident(o)}: rack needs name, members >= 1, storage.capacity")
        elif o["kind"] == "ServiceMonitor":
            expect(s.get("selector") and s.get("endpoints") and all(e.get("port") for e in s["endpoints"]),
                   f"{ident(o)}: needs selector and endpoints[].port")
        elif o["kind"] == "PrometheusRule":
            for g in s.get("groups") or []:
                for r in g.get("rules") or []:
                    expect(r.get("expr") and (r.get("alert") or r.get("record")),
                           f"{ident(o)}: rule in group {g.get('name')} needs expr and alert/record")
        elif o["kind"] == "ScaledObject":
            expect((s.get("scaleTargetRef") or {}).get("name") and s.get("triggers"),
                   f"{ident(o)}: needs scaleTargetRef.name and triggers")
        elif o["kind"] == "HTTPRoute":
            expect(s.get("parentRefs") and s.get("rules"), f"{ident(o)}: needs parentRefs and rules")
        else:
            expect(False, f"{ident(o)}: unknown custom resource kind; add a shape check")

    notes = []
    try:
        check_refs_and_policy(objs, by_kind, exists, a)
        check_contract(objs, by_kind, exists, external, notes)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # Malformed input that the schema layer has already reported.
        expect(False, f"reference/policy checks stopped on malformed input: {e!r}")

    # ---------------------------------------------------------- report
    skipped_txt = ", ".join(ident(o) for o in skipped) or "none"
    print(f"  {a.name}: {len(objs)} objects; {n_builtin} built-in objects checked against "
          f"Kubernetes {', '.join(a.kube_version)} schemas (strict)")
    if skipped:
        print(f"  {a.name}: NOTE custom resources, validated against their CRD schemas by "
              f"validate_crds.mjs (ScyllaCluster: no schema package, shape-checked here): {skipped_txt}")
    if external:
        print(f"  {a.name}: NOTE expected to exist already (created out of band): {', '.join(sorted(external))}")
    for n in notes:
        print(f"  {a.name}: NOTE {n}")
    for f in failures:
        print(f"  FAIL {a.name}: {f}", file=sys.stderr)
    print(f"  {a.name}: {passed} checks passed, {len(failures)} failed")
    return 1 if failures else 0


def check_refs_and_policy(objs, by_kind, exists, a):
    # ---------------------------------------------------------- 2. references
    pods = []
    for o in objs:
        tpl = pod_template(o)
        if tpl:
            ports = {p["name"]: p["containerPort"] for c in tpl["spec"]["containers"]
                     for p in c.get("ports") or [] if "name" in p}
            pods.append(Pod(ident(o), tpl["metadata"].get("labels") or {}, ports, tpl))
    for o in by_kind.get("ScyllaCluster", {}).values():
        # Labels and ports of the pods the Scylla Operator creates.
        pods.append(Pod(ident(o), {"scylla/cluster": o["metadata"]["name"], "app.kubernetes.io/name": "scylla"},
                        {"cql": 9042, "cql-shard-aware": 19042, "prometheus": 9180, "agent-prometheus": 5090}))

    def matching(sel):
        return [p for p in pods if selector_matches(sel, p.labels)]

    pvc_templates = set()
    for o in by_kind.get("StatefulSet", {}).values():
        for t in o["spec"].get("volumeClaimTemplates") or []:
            pvc_templates.add(t["metadata"]["name"])

    for p in pods:
        if not p.template:
            continue
        spec = p.template["spec"]
        sa = spec.get("serviceAccountName", "default")
        expect(sa == "default" or exists("ServiceAccount", sa), f"{p.owner}: ServiceAccount {sa} missing")
        for c in containers(p.template):
            for ef in c.get("envFrom") or []:
                if "configMapRef" in ef:
                    expect(exists("ConfigMap", ef["configMapRef"]["name"]) or ef["configMapRef"].get("optional"),
                           f"{p.owner}: ConfigMap {ef['configMapRef']['name']} missing")
                if "secretRef" in ef:
                    expect(exists("Secret", ef["secretRef"]["name"]) or ef["secretRef"].get("optional"),
                           f"{p.owner}: Secret {ef['secretRef']['name']} missing (or declare it --external)")
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                if "configMapKeyRef" in vf:
                    expect(exists("ConfigMap", vf["configMapKeyRef"]["name"]), f"{p.owner}: ConfigMap for {e['name']} missing")
                if "secretKeyRef" in vf:
                    expect(exists("Secret", vf["secretKeyRef"]["name"]), f"{p.owner}: Secret for {e['name']} missing")
        vols = {v["name"] for v in spec.get("volumes") or []} | pvc_templates
        for c in containers(p.template):
            for m in c.get("volumeMounts") or []:
                expect(m["name"] in vols, f"{p.owner}: volumeMount {m['name']} has no volume")
        for v in spec.get("volumes") or []:
            if "configMap" in v:
                expect(exists("ConfigMap", v["configMap"]["name"]), f"{p.owner}: ConfigMap volume {v['configMap']['name']} missing")
            if "secret" in v:
                name = v["secret"]["secretName"]
                if expect(exists("Secret", name), f"{p.owner}: Secret volume {name} missing"):
                    sec = by_kind.get("Secret", {}).get(name)
                    keys = set((sec or {}).get("data") or {}) | set((sec or {}).get("stringData") or {})
                    for item in v["secret"].get("items") or []:
                        expect(sec is None or item["key"] in keys, f"{p.owner}: Secret {name} has no key {item['key']}")
            if "persistentVolumeClaim" in v:
                expect(exists("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]),
                       f"{p.owner}: PVC {v['persistentVolumeClaim']['claimName']} missing")

    for svc in by_kind.get("Service", {}).values():
        m = matching(svc["spec"].get("selector") and {"matchLabels": svc["spec"]["selector"]})
        if expect(m, f"{ident(svc)}: selector matches no pods"):
            for port in svc["spec"]["ports"]:
                tp = port.get("targetPort", port["port"])
                for p in m:
                    if p.template:
                        ok = tp in p.ports if isinstance(tp, str) else tp in p.ports.values()
                        expect(ok, f"{ident(svc)}: targetPort {tp} not a container port of {p.owner}")

    for ing in by_kind.get("Ingress", {}).values():
        for rule in ing["spec"].get("rules") or []:
            for path in rule["http"]["paths"]:
                b = path["backend"]["service"]
                svc = by_kind.get("Service", {}).get(b["name"])
                if expect(svc, f"{ident(ing)}: backend Service {b['name']} missing"):
                    port = service_port(svc, b["port"].get("name") or b["port"].get("number"))
                    if expect(port, f"{ident(ing)}: backend port {b['port']} not on Service {b['name']}"):
                        expect(port.get("targetPort") != "internal",
                               f"{ident(ing)}: routes to {b['name']}'s internal port (health, metrics, internal API)")
        for t in ing["spec"].get("tls") or []:
            expect(exists("Secret", t["secretName"]), f"{ident(ing)}: TLS Secret {t['secretName']} missing (or declare it --external)")

    for route in by_kind.get("HTTPRoute", {}).values():
        for rule in route["spec"].get("rules") or []:
            for b in rule.get("backendRefs") or []:
                svc = by_kind.get("Service", {}).get(b["name"])
                if expect(svc, f"{ident(route)}: backend Service {b['name']} missing"):
                    port = service_port(svc, b.get("port"))
                    if expect(port, f"{ident(route)}: backend port {b.get('port')} not on Service {b['name']}"):
                        expect(port.get("targetPort") != "internal",
                               f"{ident(route)}: routes to {b['name']}'s internal port (health, metrics, internal API)")

    for scaler in autoscalers(by_kind):
        kind, name = scaler.target
        expect(exists(kind, name), f"{scaler.owner}: target {kind}/{name} missing")
        expect(scaler.min <= scaler.max, f"{scaler.owner}: min replicas > max replicas")
        tgt = by_kind.get(kind, {}).get(name)
        # The autoscaler owns the count: a `replicas` in the manifest would
        # reset it on every apply (scaling a loaded fleet down to that number).
        expect(not tgt or "replicas" not in tgt["spec"],
               f"{kind}/{name}: has spec.replicas ({(tgt or {}).get('spec', {}).get('replicas')}) but {scaler.owner} "
               f"owns its replica count; remove it")
    targets = [sc.target for sc in autoscalers(by_kind)]
    expect(len(targets) == len(set(targets)), f"two autoscalers scale the same workload: {targets}")

    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        expect(matching(pdb["spec"]["selector"]), f"{ident(pdb)}: selector matches no pods")

    for npol in by_kind.get("NetworkPolicy", {}).values():
        sel = npol["spec"]["podSelector"]
        targets = pods if not sel else matching(sel)
        expect(targets, f"{ident(npol)}: podSelector matches no pods")
        for rule in npol["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    expect(matching(peer["podSelector"]), f"{ident(npol)}: from.podSelector {peer['podSelector']} matches no pods")
            for port in rule.get("ports") or []:
                if isinstance(port.get("port"), str):
                    for t in targets:
                        expect(port["port"] in t.ports, f"{ident(npol)}: named port {port['port']} not on {t.owner}")

    for sm in by_kind.get("ServiceMonitor", {}).values():
        svcs = [s for s in by_kind.get("Service", {}).values()
                if selector_matches(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
        if expect(svcs, f"{ident(sm)}: selector matches no Service"):
            for ep in sm["spec"]["endpoints"]:
                for s in svcs:
                    expect(ep["port"] in {p.get("name") for p in s["spec"]["ports"]},
                           f"{ident(sm)}: port {ep['port']} not on {ident(s)}")

    # ---------------------------------------------------------- 3. policy
    for sa in by_kind.get("ServiceAccount", {}).values():
        expect(sa.get("automountServiceAccountToken") is False, f"{ident(sa)}: automountServiceAccountToken must be false")

    for p in pods:
        if not p.template:
            continue
        spec = p.template["spec"]
        if p.owner.split("/")[0] in ("Deployment", "StatefulSet"):
            pc = spec.get("priorityClassName")
            expect(pc and exists("PriorityClass", pc),
                   f"{p.owner}: priorityClassName {pc!r} missing or not in the build (chat pods must not be preempted first)")
        psc = spec.get("securityContext") or {}
        if p.owner not in REDIS_STATEFULSETS:  # the official image's uid 999 (deploy/check/checkov.yaml)
            expect(psc.get("runAsUser", 0) >= 10000, f"{p.owner}: runAsUser must be >= 10000 (no clash with host uids)")
        expect(spec.get("automountServiceAccountToken") is False, f"{p.owner}: pod automountServiceAccountToken must be false")
        expect(psc.get("runAsNonRoot") is True, f"{p.owner}: securityContext.runAsNonRoot must be true")
        expect((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{p.owner}: seccompProfile must be RuntimeDefault")
        for c in containers(p.template):
            csc = c.get("securityContext") or {}
            who = f"{p.owner} container {c['name']}"
            expect(csc.get("readOnlyRootFilesystem") is True, f"{who}: readOnlyRootFilesystem must be true")
            expect(csc.get("allowPrivilegeEscalation") is False, f"{who}: allowPrivilegeEscalation must be false")
            expect("ALL" in ((csc.get("capabilities") or {}).get("drop") or []), f"{who}: must drop ALL capabilities")
            res = c.get("resources") or {}
            expect(quantity_ok(res, "requests", "cpu") and quantity_ok(res, "requests", "memory")
                   and quantity_ok(res, "limits", "memory"), f"{who}: needs cpu/memory requests and a memory limit")
            img = c["image"]
            tag = img.rsplit(":", 1)[1] if ":" in img.rsplit("/", 1)[-1] else ""
            expect(tag or "@" in img, f"{who}: image {img} has no tag")
            if a.pinned_images and "@" not in img:
                expect(tag not in ("", "latest", "dev"), f"{who}: image {img} must be pinned in this overlay")

    def config_value(tpl, key):
        for c in tpl["spec"]["containers"]:
            for e in c.get("env") or []:
                if e["name"] == key and "value" in e:
                    return e["value"]
            for ef in c.get("envFrom") or []:
                cm = by_kind.get("ConfigMap", {}).get((ef.get("configMapRef") or {}).get("name"))
                if cm and key in (cm.get("data") or {}):
                    return cm["data"][key]
        return None

    for dep in by_kind.get("Deployment", {}).values():
        tpl = dep["spec"]["template"]
        strat = dep["spec"].get("strategy") or {}
        if strat.get("type", "RollingUpdate") == "RollingUpdate":
            expect((strat.get("rollingUpdate") or {}).get("maxUnavailable") == 0,
                   f"{ident(dep)}: rollingUpdate.maxUnavailable must be 0")
        for c in tpl["spec"]["containers"]:
            for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                get_ = (c.get(probe) or {}).get("httpGet") or {}
                expect(get_.get("path") == path and get_.get("port") == "internal",
                       f"{ident(dep)}: {probe} must GET {path} on port internal (the public port does not serve it)")
            expect((c.get("lifecycle") or {}).get("preStop"), f"{ident(dep)}: needs a preStop hook (endpoint propagation)")

    gw = by_kind.get("Deployment", {}).get("gateway")
    if expect(gw, "Deployment/gateway missing"):
        tpl = gw["spec"]["template"]
        drain = int(config_value(tpl, "CHAT_DRAIN_SECONDS") or 20)
        pre = tpl["spec"]["containers"][0].get("lifecycle", {}).get("preStop", {})
        cmd = (pre.get("exec") or {}).get("command") or []
        sleep = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else int((pre.get("sleep") or {}).get("seconds", 0))
        tgps = tpl["spec"].get("terminationGracePeriodSeconds", 30)
        expect(tgps > sleep + drain,
               f"Deployment/gateway: terminationGracePeriodSeconds {tgps} must exceed preStop {sleep}s + CHAT_DRAIN_SECONDS {drain}s")
        expect(tpl["spec"].get("topologySpreadConstraints"), "Deployment/gateway: needs topologySpreadConstraints")
        scalers = [sc for sc in autoscalers(by_kind) if sc.target == ("Deployment", "gateway")]
        if expect(scalers, "Deployment/gateway: no HorizontalPodAutoscaler or ScaledObject"):
            sc = scalers[0]
            expect(sc.min >= a.min_gateway_replicas, f"{sc.owner}: min replicas {sc.min} < {a.min_gateway_replicas}")
            if a.production:
                expect(sc.on_connections, f"{sc.owner}: must scale on chat_connections (open sockets per pod), "
                                          f"not CPU alone")
        expect(any(selector_matches(p["spec"]["selector"], tpl["metadata"]["labels"])
                   for p in by_kind.get("PodDisruptionBudget", {}).values()), "Deployment/gateway: no PodDisruptionBudget")
        expect(config_value(tpl, "CHAT_LISTEN", ) == "0.0.0.0:8080", "Deployment/gateway: CHAT_LISTEN must bind 0.0.0.0:8080")

    for ing in by_kind.get("Ingress", {}).values():
        ann = ing["metadata"].get("annotations") or {}
        for k in ("proxy-read-timeout", "proxy-send-timeout"):
            v = ann.get(f"nginx.ingress.kubernetes.io/{k}", "0")
            expect(v.isdigit() and int(v) >= 3600, f"{ident(ing)}: {k} must be >= 3600 for WebSockets (is {v})")
        nxt = ann.get("nginx.ingress.kubernetes.io/proxy-next-upstream", "").split()
        expect({"http_502", "http_503"} <= set(nxt),
               f"{ident(ing)}: proxy-next-upstream must include http_502 http_503 (a full or draining pod "
               f"refuses the upgrade with 503: try another)")
        routes = {p["path"]: p["backend"]["service"]["name"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]}
        expect(routes.get("/ws") == "gateway" and routes.get("/") == "gateway", f"{ident(ing)}: /ws and / must go to gateway")
        for word in ("messages", "pins", "receipts", "members"):
            expect(any(word in p and s == "history-service" for p, s in routes.items()),
                   f"{ident(ing)}: {word} paths must go to history-service")
        expect(any(p.startswith("/api/messages") and s == "history-service" for p, s in routes.items()),
               f"{ident(ing)}: /api/messages must go to history-service")

    for route in by_kind.get("HTTPRoute", {}).values():
        rules = route["spec"].get("rules") or []
        ws = [r for r in rules for m in r.get("matches") or []
              if (m.get("path") or {}).get("value") == "/ws" and (m.get("path") or {}).get("type") == "PathPrefix"]
        if expect(ws, f"{ident(route)}: no PathPrefix /ws rule"):
            r = ws[0]
            expect([b["name"] for b in r.get("backendRefs") or []] == ["gateway"], f"{ident(route)}: /ws must go to gateway")
            t = (r.get("timeouts") or {}).get("request", "")
            expect(t == "0s" or (t.endswith("s") and t[:-1].isdigit() and int(t[:-1]) >= 3600)
                   or t.endswith("h"), f"{ident(route)}: /ws request timeout must be 0s (off) or >= 1h (is {t!r})")
        for r in rules:
            codes = set((r.get("retry") or {}).get("codes") or [])
            expect({502, 503} <= codes, f"{ident(route)}: rule {r.get('name')} must retry 502 and 503 on another pod")

    # Redis: the base's single primary, or components/redis-cluster's cluster.
    redises = {n: o for n, o in by_kind.get("StatefulSet", {}).items() if f"StatefulSet/{n}" in REDIS_STATEFULSETS}
    expect(len(redises) == 1, f"exactly one Redis StatefulSet expected ({', '.join(REDIS_STATEFULSETS)}), found {list(redises)}")
    for name, redis in redises.items():
        who = f"StatefulSet/{name}"
        tpl = redis["spec"]["template"]
        rc = tpl["spec"]["containers"][0]
        expect("--aclfile" in (rc.get("args") or []), f"{who}: clients must authenticate (--aclfile)")
        expect(redis["spec"].get("volumeClaimTemplates"), f"{who}: needs a PVC for the AOF")
        # The config file of its own `config` volume (a ConfigMap key mounted as redis.conf).
        vol = next((v["configMap"] for v in tpl["spec"].get("volumes") or [] if v["name"] == "config" and "configMap" in v), {})
        key = next((i["key"] for i in vol.get("items") or [] if i["path"] == "redis.conf"), "redis.conf")
        conf = ((by_kind.get("ConfigMap", {}).get(vol.get("name")) or {}).get("data") or {}).get(key, "")
        expect(re.search(r"^appendonly yes", conf, re.M) and re.search(r"^appendfsync always", conf, re.M),
               f"{who}: its redis.conf must have appendonly yes + appendfsync always")
        expect(re.search(r"^maxmemory-policy noeviction", conf, re.M), f"{who}: its redis.conf must have maxmemory-policy noeviction")
        expect(any(c["name"] == "exporter" and any(p.get("name") == "metrics" for p in c.get("ports") or [])
                   for c in tpl["spec"]["containers"]), f"{who}: needs the redis_exporter sidecar (port metrics)")
        cluster = bool(re.search(r"^cluster-enabled yes", conf, re.M))
        modes = {config_value(d["spec"]["template"], "CHAT_REDIS_MODE") or "single"
                 for d in by_kind.get("Deployment", {}).values() if d["metadata"]["name"] in ("gateway", "history-service")}
        expect(modes == {"cluster" if cluster else "single"},
               f"{who}: gateway and history-service must run CHAT_REDIS_MODE={'cluster' if cluster else 'single'} (have {sorted(modes)})")
        if cluster:
            n = redis["spec"].get("replicas", 1)
            expect(n >= 6, f"{who}: a cluster needs at least 3 primaries + 3 replicas (replicas: {n})")
            expect(redis["spec"].get("podManagementPolicy") == "Parallel",
                   f"{who}: podManagementPolicy Parallel (nodes become Ready only once the cluster is formed)")
            headless = by_kind.get("Service", {}).get(redis["spec"].get("serviceName"), {})
            expect(headless.get("spec", {}).get("clusterIP") == "None" and headless["spec"].get("publishNotReadyAddresses"),
                   f"{who}: serviceName must be a headless Service publishing not-ready addresses (nodes find each other before Ready)")
            expect(any("--cluster-announce-hostname" == a for a in rc.get("args") or []),
                   f"{who}: must announce its stable DNS name (--cluster-announce-hostname)")
            pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
                    if selector_matches(p["spec"]["selector"], tpl["metadata"].get("labels") or {})]
            expect(len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == 1,
                   f"{who}: needs a PodDisruptionBudget with maxUnavailable 1")
            jobs = [j for j in by_kind.get("Job", {}).values()
                    if any("cluster-init" in " ".join(c.get("command") or []) for c in j["spec"]["template"]["spec"]["containers"])]
            expect(jobs, f"{who}: no Job runs cluster-init.sh (the cluster would never form)")
            for j in jobs:
                env = {e["name"]: e.get("value", "") for c in j["spec"]["template"]["spec"]["containers"] for e in c.get("env") or []}
                want = [f"{name}-{i}.{headless.get('metadata', {}).get('name')}:6379" for i in range(n)]
                expect(env.get("CLUSTER_NODES", "").split() == want,
                       f"{ident(j)}: CLUSTER_NODES must list every node of {who} ({' '.join(want)})")

    expect(any(not n["spec"]["podSelector"] and not n["spec"].get("ingress")
               for n in by_kind.get("NetworkPolicy", {}).values()), "no default-deny ingress NetworkPolicy")

    for sm in by_kind.get("ServiceMonitor", {}).values():
        chat = any(selector_matches(sm["spec"]["selector"], s["metadata"].get("labels") or {})
                   for s in by_kind.get("Service", {}).values() if s["metadata"]["name"] in ("gateway", "history-service"))
        for ep in sm["spec"]["endpoints"]:
            if chat:
                expect(ep.get("port") == "internal", f"{ident(sm)}: scrape the internal port (/metrics is not on the public one)")

    if a.production:
        hist = by_kind.get("Deployment", {}).get("history-service")
        if expect(hist, "Deployment/history-service missing"):
            tsc = hist["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
            expect(any(c["topologyKey"] == "topology.kubernetes.io/zone" and c["whenUnsatisfiable"] == "DoNotSchedule"
                       for c in tsc), "Deployment/history-service: must spread over zones (DoNotSchedule)")
        for ns in by_kind.get("Namespace", {}).values():
            level = (ns["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce")
            expect(level in ("baseline", "restricted"), f"{ident(ns)}: Pod Security must be enforced (is {level!r})")
        expect(by_kind.get("Namespace"), "no Namespace object: Pod Security labels cannot be checked")


# ------------------------------------------------------------------ 4. contract
# The Redis shapes: base's single primary, components/redis-cluster's cluster.
REDIS_STATEFULSETS = ("StatefulSet/redis", "StatefulSet/redis-cluster")
SECRET_SETTINGS = {"CHAT_JWT_SECRET", "CHAT_INTERNAL_TOKEN"}
# The keys of the generated Secret chat-secrets (mounted as files).
SECRET_KEYS = ("jwt-secret", "internal-token", "redis-password", "redis-url")


def secret_file(tpl, container, path, secrets):
    """(Secret name, key, its value or None) of the mounted Secret file at `path`, else None."""
    vols = {v["name"]: v for v in tpl["spec"].get("volumes") or []}
    for m in container.get("volumeMounts") or []:
        sec = (vols.get(m["name"]) or {}).get("secret")
        prefix = m["mountPath"].rstrip("/") + "/"
        if not sec or not path.startswith(prefix):
            continue
        rel = path[len(prefix):]
        items = sec.get("items")
        key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
        if key is None:
            return None
        data = (secrets.get(sec["secretName"]) or {}).get("data") or {}
        value = base64.b64decode(data[key]).decode() if key in data else None
        return sec["secretName"], key, value
    return None


def binary_of(image: str):
    name = image.rsplit("@", 1)[0]
    name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    last = name.rsplit("/", 1)[-1]
    return last if last in contract.SOURCES else None


def check_value(who, key, value, spec):
    """The value parses the way the binary's clap/validate() parses it."""
    t = spec["type"]
    if t in ("u64", "u32", "usize", "Option<u32>", "Option<u64>"):
        expect(re.fullmatch(r"\d+", value), f"{who}: {key}={value!r} is not an unsigned integer")
    elif t == "bool":
        expect(value in ("true", "false"), f"{who}: {key}={value!r} must be true or false")
    elif t == "f64":
        expect(re.fullmatch(r"\d+(\.\d+)?", value), f"{who}: {key}={value!r} is not a number")
    elif t in ("SocketAddr", "Option<SocketAddr>"):
        expect(re.fullmatch(r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:]+\]):\d+", value),
               f"{who}: {key}={value!r} must be IP:PORT (no host names)")
    if key == "CHAT_REDIS_URL":
        expect(value.startswith(("redis://", "rediss://")), f"{who}: CHAT_REDIS_URL must start with redis://")
    if key == "CHAT_HISTORY_URL":
        expect(value.startswith(("http://", "https://")), f"{who}: CHAT_HISTORY_URL must be http(s)://")
    if key == "CHAT_STORE":
        expect(re.fullmatch(r"sqlite://.+|scylla://([^@/]+@)?[^/]+/\w+|https?://.+", value),
               f"{who}: CHAT_STORE={value!r}: expected sqlite://PATH or scylla://HOSTS/KEYSPACE")
    if key == "CHAT_TRACE_SAMPLE_RATIO":
        expect(re.fullmatch(r"\d+(\.\d+)?", value) and float(value) <= 1.0,
               f"{who}: CHAT_TRACE_SAMPLE_RATIO must be between 0.0 and 1.0")
    if key == "CHAT_LOG_FORMAT":
        expect(value in ("text", "json"), f"{who}: CHAT_LOG_FORMAT must be text or json")
    if key == "CHAT_SCYLLA_REPLICATION":
        expect(value.strip().startswith("{") and "class" in value, f"{who}: CHAT_SCYLLA_REPLICATION must be a CQL map")
    expect(value != "", f"{who}: {key} is empty; leave it out instead")


def check_contract(objs, by_kind, exists, external, notes):
    table = {b: contract.settings(b) for b in contract.SOURCES}
    for b, t in table.items():
        expect(t, f"no CHAT_* settings found in {contract.SOURCES[b]} (source moved?)")
    known_any = set(table["gateway"]) | set(table["history-service"])
    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})

    for o in objs:
        tpl = pod_template(o)
        if not tpl:
            continue
        for c in tpl["spec"]["containers"]:
            binary = binary_of(c["image"])
            if not binary:
                continue
            who = f"{ident(o)} ({binary})"
            accepted = table[binary]
            values, sources = {}, {}
            for ef in c.get("envFrom") or []:
                if "configMapRef" in ef:
                    cm = configmaps.get(ef["configMapRef"]["name"]) or {}
                    for k, v in (cm.get("data") or {}).items():
                        if not k.startswith("CHAT_"):
                            continue
                        # A shared ConfigMap may hold the other binary's settings.
                        expect(k in known_any, f"{who}: ConfigMap {cm['metadata']['name']} sets {k}, which no binary accepts")
                        expect(k not in SECRET_SETTINGS, f"{who}: {k} belongs in a Secret, not ConfigMap {cm['metadata']['name']}")
                        if k in accepted:
                            values[k], sources[k] = v, "configmap"
                if "secretRef" in ef:
                    name = ef["secretRef"]["name"]
                    sec = secrets.get(name)
                    if sec is not None:
                        for k in list((sec.get("data") or {})) + list((sec.get("stringData") or {})):
                            if k.startswith("CHAT_"):
                                expect(k in known_any, f"{who}: Secret {name} holds {k}, which no binary accepts")
                                if k in accepted:
                                    values[k], sources[k] = "<secret>", "secret"
                    elif f"Secret/{name}" in external:
                        for k in SECRET_SETTINGS & set(accepted):
                            sources.setdefault(k, "external-secret")
            for e in c.get("env") or []:
                k = e["name"]
                if not k.startswith("CHAT_"):
                    continue
                expect(k in accepted, f"{who}: env {k} is not a setting of {binary}")
                vf = e.get("valueFrom") or {}
                if "value" in e and k.endswith("_FILE"):
                    # A secret given as a file: it must be a key of a mounted Secret.
                    found = secret_file(tpl, c, e["value"], secrets)
                    if expect(found, f"{who}: {k}={e['value']} is not a file of a mounted Secret"):
                        name = k[: -len("_FILE")]
                        values[k], sources[k], sources[name] = e["value"], "literal", "secret-file"
                        if found[2] is not None:
                            values[name] = found[2]
                elif "value" in e:
                    expect(k not in SECRET_SETTINGS, f"{who}: {k} must come from a Secret, not a literal")
                    values[k], sources[k] = e["value"], "literal"
                elif "secretKeyRef" in vf:
                    values[k], sources[k] = "<secret>", "secret"
                elif "fieldRef" in vf:
                    values[k], sources[k] = "<field>", "field"
            for k, v in values.items():
                if v not in ("<secret>", "<field>") and k in accepted and sources.get(k) != "secret-file":
                    check_value(who, k, v, accepted[k])
            # Secrets are files from a mounted Secret, not environment variables.
            for k in SECRET_SETTINGS & set(sources):
                expect(sources[k] == "secret-file",
                       f"{who}: {k} must be a file of a mounted Secret ({k}_FILE), not an environment variable")

            args = c.get("args") or []
            subcommand = args[0] if args and not args[0].startswith("-") else None
            if binary == "history-service" and subcommand:
                expect(subcommand in contract.subcommands(),
                       f"{who}: args {args}: {subcommand!r} is not a subcommand ({contract.subcommands()})")
            elif binary == "gateway":
                expect(not subcommand, f"{who}: the gateway has no subcommands (args {args})")
            if subcommand == "migrate":
                expect(str(values.get("CHAT_STORE", "")).startswith("scylla://"), f"{who}: migrate needs CHAT_STORE=scylla://")
                both = {"CHAT_SCYLLA_REPLICATION", "CHAT_SCYLLA_REPLICATION_FACTOR"} <= set(values)
                expect(not both, f"{who}: set CHAT_SCYLLA_REPLICATION or CHAT_SCYLLA_REPLICATION_FACTOR, not both")
                continue  # a one-shot Job: no listener, no probes, no drain

            # A server: listens on its container ports, on all interfaces; health,
            # readiness and metrics on the internal one only.
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
            for key, port in (("CHAT_LISTEN", "http"), ("CHAT_INTERNAL_LISTEN", "internal")):
                listen = values.get(key, "")
                expect(listen.startswith("0.0.0.0:") and ports.get(port) == int(listen.rsplit(":", 1)[1] or 0),
                       f"{who}: {key}={listen!r} must be 0.0.0.0:<containerPort {port} {ports.get(port)}>")
            expect(sources.get("CHAT_NODE_ID") == "field", f"{who}: CHAT_NODE_ID should be the pod name (fieldRef metadata.name)")
            expect(not ({"CHAT_JWT_SECRET", "CHAT_JWT_PUBLIC_KEY"} <= set(sources) | set(values)),
                   f"{who}: set CHAT_JWT_SECRET or CHAT_JWT_PUBLIC_KEY, not both")
            keyed = {"CHAT_JWT_SECRET", "CHAT_JWT_PUBLIC_KEY", "CHAT_JWT_KEYS_DIR", "CHAT_JWT_JWKS_URL"}
            expect(keyed & (set(sources) | set(values)),
                   f"{who}: no JWT key: it would run with the built-in development key")
            # Drain: the kubelet must not SIGKILL before the binary's drain ends.
            drain = int(values.get("CHAT_DRAIN_SECONDS") or accepted.get("CHAT_DRAIN_SECONDS", {}).get("default") or 0)
            pre = (c.get("lifecycle") or {}).get("preStop") or {}
            cmd = (pre.get("exec") or {}).get("command") or []
            sleep = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else int((pre.get("sleep") or {}).get("seconds", 0))
            tgps = tpl["spec"].get("terminationGracePeriodSeconds", 30)
            expect(tgps > sleep + drain,
                   f"{who}: terminationGracePeriodSeconds {tgps} must exceed preStop {sleep}s + CHAT_DRAIN_SECONDS {drain}s")
            if binary == "gateway":
                # The server API's keys: a whole mounted Secret (one file per key), read-only.
                keys_dir = values.get("CHAT_API_KEYS_DIR")
                if keys_dir:
                    vols = {v["name"]: v for v in tpl["spec"].get("volumes") or []}
                    mount = next((m for m in c.get("volumeMounts") or []
                                  if m["mountPath"].rstrip("/") == keys_dir.rstrip("/")), None)
                    sec = (vols.get(mount["name"]) or {}).get("secret") if mount else None
                    expect(sec and not sec.get("items") and mount.get("readOnly"),
                           f"{who}: CHAT_API_KEYS_DIR={keys_dir} must be a whole Secret mounted read-only there")
                expect("CHAT_REDIS_URL" in sources, f"{who}: CHAT_REDIS_URL unset: each pod would be an isolated single node")
                expect("CHAT_HISTORY_URL" in values, f"{who}: CHAT_HISTORY_URL unset: each pod would keep its own SQLite history")
                hb = int(values.get("CHAT_HEARTBEAT_SECONDS") or accepted["CHAT_HEARTBEAT_SECONDS"]["default"])
                for ing in by_kind.get("Ingress", {}).values():
                    ann = ing["metadata"].get("annotations") or {}
                    t = ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout", "60")
                    expect(t.isdigit() and int(t) > 2 * hb, f"{ident(ing)}: proxy-read-timeout {t}s must exceed 2 x heartbeat ({hb}s)")
            if "CHAT_HISTORY_URL" in values or binary == "history-service":
                # The internal API is guarded by a token both sides must share.
                expect(sources.get("CHAT_INTERNAL_TOKEN") == "secret-file",
                       f"{who}: CHAT_INTERNAL_TOKEN must come from a Secret (gateway and history-service share it)")
            for k, url_key, svc_name in (("CHAT_REDIS_URL", "redis", None), ("CHAT_HISTORY_URL", "http", None),
                                          ("CHAT_STORE", "scylla", None)):
                v = values.get(k, "")
                m = re.match(r"\w+://(?:[^@/]+@)?([^:/,]+)(?::(\d+))?", v)
                if not m or v.startswith("sqlite"):
                    continue
                host, port = m.group(1), m.group(2)
                svc = by_kind.get("Service", {}).get(host)
                if svc is None and "." not in host and host != "localhost":
                    # Operator-created Services (scylla-client) are not in the build.
                    if not any(sc["metadata"]["name"] + "-client" == host for sc in by_kind.get("ScyllaCluster", {}).values()):
                        expect(False, f"{who}: {k} host {host} is no Service of this build")
                elif svc is not None and port:
                    sp = service_port(svc, int(port))
                    if expect(sp, f"{who}: {k} port {port} not on Service/{host}") and k == "CHAT_HISTORY_URL":
                        expect(sp.get("targetPort") == "internal",
                               f"{who}: CHAT_HISTORY_URL must use history-service's internal port (the internal API lives there)")

    # SQLite is one file on one pod's volume: more replicas would each keep a
    # different history (the stream's consumer group splits entries between them).
    hist = by_kind.get("Deployment", {}).get("history-service")
    if hist:
        store = ""
        for ef in hist["spec"]["template"]["spec"]["containers"][0].get("envFrom") or []:
            cm = configmaps.get((ef.get("configMapRef") or {}).get("name")) or {}
            store = (cm.get("data") or {}).get("CHAT_STORE", store)
        if store.startswith("sqlite://"):
            expect(hist["spec"].get("replicas", 1) == 1,
                   f"Deployment/history-service: CHAT_STORE is SQLite, so replicas must be 1 (is {hist['spec'].get('replicas', 1)})")

    # The generated Secret must carry what the pods mount, and an HS256 secret the binaries
    # accept (they refuse a shorter one at start).
    min_secret = contract.min_hs256_secret_bytes()
    expect(min_secret > 0, "MIN_HS256_SECRET_BYTES not found in proto/src/auth.rs (source moved?)")
    for name, sec in secrets.items():
        keys = set(sec.get("data") or {}) | set(sec.get("stringData") or {})
        if name.startswith("chat-secrets"):
            for k in SECRET_KEYS:
                expect(k in keys, f"Secret/{name}: key {k} missing")
            expect(not any(k.startswith("CHAT_") for k in keys), f"Secret/{name}: keys are file names, not CHAT_* variables")
        jwt = (sec.get("stringData") or {}).get("jwt-secret", "").encode()
        if "jwt-secret" in (sec.get("data") or {}):
            jwt = base64.b64decode(sec["data"]["jwt-secret"])
        if "jwt-secret" in keys:
            expect(len(jwt) >= min_secret,
                   f"Secret/{name}: jwt-secret is {len(jwt)} bytes; the binaries refuse fewer than {min_secret}")
        if name.startswith("chat-api-keys"):
            # Every key is a server API key; the gateway refuses a short one at start.
            min_key = contract.min_api_key_bytes()
            expect(min_key > 0, "MIN_KEY_BYTES not found in gateway/src/api_keys.rs (source moved?)")
            expect(keys, f"Secret/{name}: no key: the gateways would refuse to start")
            for k, v in (sec.get("data") or {}).items():
                n = len(base64.b64decode(v).rstrip(b"\r\n"))
                expect(n >= min_key, f"Secret/{name}: key {k} is {n} bytes; the gateway refuses fewer than {min_key}")
    for ext in sorted(external):
        if ext == "Secret/chat-api-keys":
            notes.append(f"{ext} must hold the server API's keys, one per key (docs/operations.md \"Secrets\")")
        elif ext.startswith("Secret/") and ext != "Secret/chat-tls":
            notes.append(f"{ext} must hold keys {', '.join(SECRET_KEYS)} (docs/operations.md \"Secrets\")")

    # Alerts use only metrics the binaries export.
    table = contract.metrics()
    exported = contract.series_names(table)
    for rule_obj in by_kind.get("PrometheusRule", {}).values():
        for g in rule_obj["spec"].get("groups") or []:
            for r in g.get("rules") or []:
                # Queries must name real series (histograms: _bucket/_sum/_count);
                # the prose of annotations may name a metric itself.
                texts = ((r.get("expr", ""), exported),
                         (" ".join((r.get("annotations") or {}).values()), exported | set(table)))
                for text, known in texts:
                    for name in set(re.findall(r"\bchat_[a-z0-9_]+", text)):
                        expect(name in known, f"{ident(rule_obj)}: {r.get('alert') or r.get('record')} uses {name}, "
                                              f"which no binary exports")


if __name__ == "__main__":
    sys.exit(main())
