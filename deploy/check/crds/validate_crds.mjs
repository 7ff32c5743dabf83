// Validates custom resources against the OpenAPI schemas of their CRDs.
//
//   node validate_crds.mjs OBJECTS.json NAME
//
// OBJECTS.json is a JSON array of rendered objects (scripts/check-deploy.sh
// converts a `kubectl kustomize` build). The schemas come from npm packages
// generated from the upstream CRDs (package.json pins their versions):
// @kubernetes-models/prometheus-operator (ServiceMonitor, PrometheusRule),
// @kubernetes-models/keda (ScaledObject), @kubernetes-models/gateway-api
// (HTTPRoute). They check types, required fields, enums, patterns and bounds,
// as the API server's CRD validation does; like it, they do not refuse
// unknown fields (CRD schemas are open), which validate_k8s.py's policy
// checks and a server-side dry run cover. ScyllaCluster has no such package:
// validate_k8s.py shape-checks it. Built-in kinds are skipped here
// (kubernetes-validate checks them).
import { readFileSync } from "node:fs";
import { ServiceMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";

const MODELS = {
  "monitoring.coreos.com/v1 ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1 PrometheusRule": PrometheusRule,
  "keda.sh/v1alpha1 ScaledObject": ScaledObject,
  "gateway.networking.k8s.io/v1 HTTPRoute": HTTPRoute,
};
// Custom resources without a schema package, checked elsewhere.
const SHAPE_CHECKED = new Set(["scylla.scylladb.com/v1 ScyllaCluster"]);

const [file, name] = process.argv.slice(2);
const objects = JSON.parse(readFileSync(file, "utf8"));
let passed = 0;
const failures = [];
const checked = [];
for (const o of objects) {
  const key = `${o.apiVersion} ${o.kind}`;
  const group = o.apiVersion.includes("/") ? o.apiVersion.split("/")[0] : "";
  const builtin = !group.includes(".") || (group.endsWith(".k8s.io") && !group.startsWith("gateway.networking."));
  if (builtin || SHAPE_CHECKED.has(key)) continue;
  const id = `${o.kind}/${o.metadata.name}`;
  const Model = MODELS[key];
  if (!Model) {
    failures.push(`${id}: no CRD schema for ${key}; add its package to deploy/check/crds`);
    continue;
  }
  try {
    new Model(o).validate();
    passed++;
    checked.push(id);
  } catch (e) {
    const details = (e.errors || []).map((x) => `${x.instancePath || "/"} ${x.message}`).join("; ");
    failures.push(`${id}: ${details || e.message}`);
  }
}
for (const f of failures) console.error(`  FAIL ${name}: ${f}`);
console.log(`  ${name}: ${checked.length ? checked.join(", ") : "no custom resources with a schema"}: ` +
  `${passed} valid against their CRD schemas, ${failures.length} invalid`);
process.exit(failures.length ? 1 : 0);
