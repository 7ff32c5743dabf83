#!/usr/bin/env python3
"""The docs keep up with the code.

  check_docs.py docs/operations.md k8s/components/monitoring/prometheusrule.yaml
  check_docs.py commands loadtest/README.md scripts/k6-smoke.sh

The first form checks that docs/operations.md covers the binaries and the alerts:
- every CHAT_* setting of both binaries (read from the source by contract.py)
  appears in the configuration reference, with its default;
- every metric the binaries export appears in the metrics table;
- every alert of the PrometheusRule has a runbook entry (a heading naming it).

The second prints, as one shell script, the fenced code blocks of a Markdown
file marked `<!-- run as written by SCRIPT -->` (on the line above the fence)
for that SCRIPT, in file order: SCRIPT runs them, so the commands a reader
copies are the ones a test ran. It fails when the file has no such block.
"""

import re
import sys

MARKED_BLOCK = re.compile(r"^<!-- run as written by (\S+) -->\n```[\w-]*\n(.*?)^```$", re.M | re.S)


def commands(doc_path: str, runner: str) -> int:
    try:
        doc = open(doc_path).read()
    except OSError as e:
        print(f"commands: {e}", file=sys.stderr)
        return 1
    blocks = [m.group(2) for m in MARKED_BLOCK.finditer(doc) if m.group(1) == runner]
    if not blocks:
        print(f"commands: no block of {doc_path} is marked <!-- run as written by {runner} -->", file=sys.stderr)
        return 1
    print(f"# The blocks of {doc_path} marked to be run as written by {runner}.")
    print("".join(blocks), end="")
    return 0


def main() -> int:
    if sys.argv[1] == "commands":
        return commands(sys.argv[2], sys.argv[3])
    import yaml  # only this check needs PyYAML (the deploy tools' venv has it)

    import contract

    doc_path, rule_path = sys.argv[1], sys.argv[2]
    try:
        doc = open(doc_path).read()
    except OSError as e:
        print(f"  FAIL docs: {e}", file=sys.stderr)
        return 1
    failures = []
    rows = {}
    for line in doc.splitlines():
        m = re.match(r"\|\s*`(CHAT_[A-Z0-9_]+)`", line)
        if m:
            rows.setdefault(m.group(1), []).append(line)
    n_settings = 0
    for binary in contract.SOURCES:
        table = contract.settings(binary)
        if not table:
            failures.append(f"no settings found in {contract.SOURCES[binary]}")
        for env, e in table.items():
            n_settings += 1
            if env not in rows:
                failures.append(f"{binary} setting {env} has no row in the configuration reference")
            elif e["default"] not in (None, "") and not any(f"`{e['default']}`" in r for r in rows[env]):
                failures.append(f"{binary} setting {env}: default `{e['default']}` not in its row")
    metrics = contract.metrics()
    for name in metrics:
        if not re.search(rf"\|\s*`{name}`", doc):
            failures.append(f"metric {name} has no row in the metrics table")
    with open(rule_path) as f:
        rule = yaml.safe_load(f)
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    headings = set(re.findall(r"^#{2,4} .*?\b(Chat[A-Za-z]+)\b", doc, re.M))
    for a in alerts:
        if a not in headings:
            failures.append(f"alert {a} has no runbook heading")
    for f in failures:
        print(f"  FAIL docs: {f}", file=sys.stderr)
    print(f"  docs: {n_settings} settings, {len(metrics)} metrics, {len(alerts)} alerts checked; {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
