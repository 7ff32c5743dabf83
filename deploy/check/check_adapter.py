#!/usr/bin/env python3
"""The prometheus-adapter rule serves what the HPA reads, from a real metric.

  check_adapter.py k8s/components/autoscaling/prometheus-adapter-values.yaml

- every rule's seriesQuery names metrics the binaries export (contract.py);
- every metricsQuery is a template over <<.Series>> and <<.LabelMatchers>>;
- the served names include every Pods metric of the HPA patch beside it.
"""

import re
import sys
from pathlib import Path

import yaml

import contract


def main() -> int:
    path = Path(sys.argv[1])
    failures = []
    rules = yaml.safe_load(path.read_text())["rules"]["custom"]
    exported = set(contract.metrics())
    for r in rules:
        names = set(re.findall(r"\bchat_[a-z0-9_]+", r["seriesQuery"]))
        if not names or not names <= exported:
            failures.append(f"seriesQuery {r['seriesQuery']!r} names {sorted(names - exported) or 'no metric'}, "
                            f"which no binary exports")
        if not {"<<.Series>>", "<<.LabelMatchers>>"} <= set(re.findall(r"<<\.\w+>>", r["metricsQuery"])):
            failures.append(f"metricsQuery {r['metricsQuery']!r} must use <<.Series>> and <<.LabelMatchers>>")
    served = {r["name"]["as"] for r in rules}
    hpa = yaml.safe_load((path.parent / "patch-hpa.yaml").read_text())
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    if not wanted <= served:
        failures.append(f"the HPA reads {sorted(wanted)} but the adapter serves {sorted(served)}")
    for f in failures:
        print(f"  FAIL adapter: {f}", file=sys.stderr)
    print(f"  prometheus-adapter: {len(rules)} rule(s) serving {sorted(served)}; the HPA reads {sorted(wanted)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
