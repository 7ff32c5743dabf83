#!/usr/bin/env python3
"""The binaries' operating contract, read from their source (no cargo build).

The deploy files must only use settings the binaries really accept, and the
alerts must only use metrics the binaries really export. Both lists live in
the Rust source; this module extracts them so the checks follow the code:

  settings: every `#[arg(..., env = "CHAT_...")]` of gateway/src/config.rs
            and history-service/src/main.rs (and of the argument structs
            they flatten, FLATTENED), with its default and type;
  metrics:  every `metrics::counter!/gauge!/histogram!("name")` under
            gateway/src and history-service/src;
  commands: history-service subcommands (`enum Command`);
  min_hs256_secret_bytes: the shortest CHAT_JWT_SECRET the binaries accept
            (proto/src/auth.rs); min_api_key_bytes: the shortest server API
            key the gateway accepts (gateway/src/api_keys.rs).

  python3 deploy/check/contract.py            # prints both as a table
  python3 deploy/check/contract.py --json     # the same as JSON
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {
    "gateway": ROOT / "gateway/src/config.rs",
    "history-service": ROOT / "history-service/src/main.rs",
}
METRIC_DIRS = {"gateway": ROOT / "gateway/src", "history-service": ROOT / "history-service/src"}

ARG_RE = re.compile(r"#\[arg\((?P<body>.*?)\)\]\s*(?:pub(?:\(crate\))?\s+)?(?P<field>\w+)\s*:\s*(?P<type>[^,\n]+),", re.S)


# Argument structs the binaries flatten into theirs (`#[command(flatten)]`),
# and the file each is defined in: their settings are the binaries' too.
FLATTENED = {"RedisArgs": ROOT / "history-service/src/redis_settings.rs"}


def settings(binary: str) -> dict:
    """env name -> {flag, default, type, doc} for one binary ({} if unreadable)."""
    try:
        text = SOURCES[binary].read_text()
        out = parse_args(text)
        for struct, path in FLATTENED.items():
            if re.search(rf"#\[command\(flatten\)\]\s*(?:pub(?:\(crate\))?\s+)?\w+\s*:\s*{struct}\b", text):
                out.update(parse_args(path.read_text()))
    except OSError:
        return {}
    return out


def parse_args(text: str) -> dict:
    """The `#[arg(..., env = "CHAT_...")]` fields of one Rust source."""
    out = {}
    for m in ARG_RE.finditer(text):
        body = m.group("body")
        env = re.search(r'env\s*=\s*"(CHAT_[A-Z0-9_]+)"', body)
        if not env:
            continue
        default = None
        d = re.search(r'default_value\s*=\s*"([^"]*)"', body)
        if d:
            default = d.group(1)
        else:
            d = re.search(r"default_value_t\s*=\s*([^,\n]+?)\s*(?:,|$)", body, re.M)
            if d:
                default = d.group(1).strip()
                # `64 * 1024`, `100_000`: evaluate simple integer expressions.
                if re.fullmatch(r"[\d_ *]+", default):
                    prod = 1
                    for part in default.split("*"):
                        prod *= int(part.strip().replace("_", ""))
                    default = str(prod)
        # The doc comment right above the #[arg]: consecutive /// lines.
        before = text[: m.start()].rstrip().splitlines()
        doc = []
        while before and before[-1].strip().startswith("///"):
            doc.insert(0, before.pop().strip()[3:].strip())
        field = m.group("field")
        long = re.search(r'long\s*=\s*"([^"]+)"', body)
        if default is None and m.group("type").strip() == "bool":
            default = "false"
        out[env.group(1)] = {
            "flag": "--" + (long.group(1) if long else field.replace("_", "-")),
            "default": default,
            "type": m.group("type").strip(),
            "doc": " ".join(doc),
        }
    return out


def subcommands() -> list:
    try:
        text = SOURCES["history-service"].read_text()
    except OSError:
        return []
    m = re.search(r"enum Command\s*\{(.*?)\n\}", text, re.S)
    if not m:
        return []
    return [v.lower() for v in re.findall(r"^\s*(\w+),\s*$", m.group(1), re.M)]


def rust_usize_const(rel_path: str, name: str) -> int:
    """`pub const NAME: usize = N;` of a Rust source file (0 when it cannot be read)."""
    try:
        text = (ROOT / rel_path).read_text()
    except OSError:
        return 0
    m = re.search(rf"pub const {name}: usize = (\d+);", text)
    return int(m.group(1)) if m else 0


def min_hs256_secret_bytes() -> int:
    """`MIN_HS256_SECRET_BYTES` of proto/src/auth.rs (0 when it cannot be read)."""
    return rust_usize_const("proto/src/auth.rs", "MIN_HS256_SECRET_BYTES")


def min_api_key_bytes() -> int:
    """`MIN_KEY_BYTES` of gateway/src/api_keys.rs (0 when it cannot be read)."""
    return rust_usize_const("gateway/src/api_keys.rs", "MIN_KEY_BYTES")


METRIC_RE = re.compile(r"metrics::(counter|gauge|histogram)!\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")


def metrics() -> dict:
    """metric name -> {kind, binaries} exported by the binaries' source."""
    out = {}
    for binary, d in METRIC_DIRS.items():
        for f in sorted(d.rglob("*.rs")):
            for kind, name in METRIC_RE.findall(f.read_text()):
                e = out.setdefault(name, {"kind": kind, "binaries": []})
                if binary not in e["binaries"]:
                    e["binaries"].append(binary)
    return out


def series_names(metric_table: dict) -> set:
    """Every series name Prometheus sees (histograms: _bucket, _sum, _count)."""
    names = set()
    for name, e in metric_table.items():
        if e["kind"] == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            names.add(name)
    return names


def main() -> int:
    table = {b: settings(b) for b in SOURCES}
    data = {"settings": table, "metrics": metrics(), "subcommands": subcommands()}
    if "--json" in sys.argv:
        json.dump(data, sys.stdout, indent=2)
        print()
        return 0
    for b, s in table.items():
        print(f"# {b} ({SOURCES[b].relative_to(ROOT)}): {len(s)} settings")
        for env, e in s.items():
            print(f"{env:34} {e['flag']:32} default={e['default']}")
    print(f"# history-service subcommands: {', '.join(data['subcommands'])}")
    print(f"# metrics: {len(data['metrics'])}")
    for name, e in data["metrics"].items():
        print(f"{name:36} {e['kind']:10} {', '.join(e['binaries'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
