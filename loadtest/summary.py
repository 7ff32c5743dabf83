#!/usr/bin/env python3
"""Side-by-side tables of bench.sh's shapes: one Markdown table per shape, the peers as
columns (this product, Socket.IO, uWebSockets.js), from the JSON files bench.sh keeps.

    python3 loadtest/summary.py OUT MODE     # MODE: single or cluster

Rows: highest sustainable rate (and the first failing step), the generator's own CPU there,
p50/p99 and delivered ratio at the shape's equal load, CPU per message per role (gw = the
peer's server processes, redis, history) and in % of a core at that load, CPU per delivery at
the top rate and its ratio to the machine's floor (loadgen floor: CPU per write() of one
small frame), Redis commands per message, store transactions per message.
"""
import json
import os
import re
import sys

PEERS = [("chat", "this product"), ("sio", "Socket.IO"), ("uws", "uWebSockets.js")]
ROLES = ["gw", "redis", "history"]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def num(v, digits=1):
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def roles_cpu(step, key):
    roles = (step or {}).get("server_cpu", {}).get("roles", {})
    return " / ".join(num(roles.get(r, {}).get(key)) for r in ROLES) if roles else "—"


def top_and_fail(ramp):
    """The highest passing step and the first failing one."""
    steps = (ramp or {}).get("steps", [])
    passed = [s for s in steps if s.get("passed")]
    failed = [s for s in steps if not s.get("passed")]
    return (passed[-1] if passed else None), (failed[0] if failed else None)


def generator_pct(step):
    cpu = step.get("loadgen_cpu_us") if step else None
    window = step.get("server_cpu", {}).get("window_s") if step else None
    return None if cpu is None or not window else cpu / window / 1e4


def store_tx(step):
    total = 0.0
    found = False
    for counters in (step or {}).get("metrics", {}).values():
        c = counters.get("chat_store_batch_seconds_count") if isinstance(counters, dict) else None
        if c and c.get("per_message") is not None:
            total += c["per_message"]
            found = True
    return total if found else None


def redis_cell(step):
    r = (step or {}).get("redis")
    if not r or "error" in r:
        return "—"
    cmds = sorted(r.get("commands", {}).items(), key=lambda kv: -kv[1].get("usec", 0))[:3]
    top = ", ".join(f"{k} {num(v.get('calls_per_message'), 2)}" for k, v in cmds)
    return f"{num(r.get('calls_per_message'), 2)} calls, {num(r.get('usec_per_message'))} µs ({top})"


def shape_table(out, mode, shape, floor):
    cols = []
    for peer, title in PEERS:
        base = os.path.join(out, f"{mode}-{peer}-shape-{shape}")
        fixed, ramp = load(base + "-fixed.json"), load(base + "-ramp.json")
        if fixed or ramp:
            cols.append((title, (fixed or {}).get("result"), ramp, fixed or ramp))
    if not cols:
        return None
    info = cols[0][3]
    rate = next((c[1]["target_rate"] for c in cols if c[1]), None)
    rows = []

    def row(label, cell):
        rows.append(f"| {label} | " + " | ".join(cell(c) for c in cols) + " |")

    def hsr(c):
        _, fixed, ramp, _ = c
        top, fail = top_and_fail(ramp)
        if ramp is None:
            return "—"
        s = f"**{num(ramp.get('highest_sustainable_rate'))} msg/s**" if top else "none passed"
        if top:
            s += f" ({num(top['deliveries_per_s'])} deliveries/s, p99 {top['latency_ms'].get('p99')} ms)"
        if fail:
            s += (f"; {num(fail['target_rate'])} failed: p99 {fail['latency_ms'].get('p99')} ms, "
                  f"delivered {fail['delivered_ratio']}")
        elif top:
            s += "; no step failed (raise SHAPE_RAMP_STEPS)"
        return s

    def gen(c):
        top, fail = top_and_fail(c[2])
        missed = (fail or {}).get("missed_sends")
        s = f"{num(generator_pct(top))} % of a core" if top else "—"
        return s + (f"; {missed} sends missed at the failing step" if missed else "")

    def at_rate(c):
        f = c[1]
        if not f:
            return "—"
        lat = f["latency_ms"]
        return f"{lat.get('p50')} / {lat.get('p99')} ms, delivered {f['delivered_ratio']}"

    def per_delivery_top(c):
        top, _ = top_and_fail(c[2])
        if not top:
            return "—"
        cpu = top["server_cpu"]
        gw = cpu.get("roles", {}).get("gw", {}).get("cpu_us_per_delivery")
        s = f"{num(gw, 2)} / {num(cpu.get('cpu_us_per_delivery'), 2)}"
        if floor and gw is not None:
            s += f" (gw {gw / floor:.2f}× the floor)"
        return s

    def per_delivery_fixed(c):
        f = c[1]
        if not f:
            return "—"
        gw = f["server_cpu"].get("roles", {}).get("gw", {}).get("cpu_us_per_delivery")
        s = f"{num(gw, 2)} / {num(f['server_cpu'].get('cpu_us_per_delivery'), 2)}"
        if floor and gw is not None:
            s += f" (gw {gw / floor:.2f}× the floor)"
        return s

    row("highest sustainable rate (delivered ≥ 99.9 %, p99 < 100 ms)", hsr)
    row("generator CPU at that step", gen)
    row(f"p50 / p99 at {num(rate)} msg/s", at_rate)
    row(f"CPU µs per message at {num(rate)} msg/s: total", lambda c: num((c[1] or {}).get("server_cpu", {}).get("cpu_us_per_message")))
    row(f"CPU µs per message at {num(rate)} msg/s: {' / '.join(ROLES)}", lambda c: roles_cpu(c[1], "cpu_us_per_message"))
    row(f"CPU % of a core at {num(rate)} msg/s: {' / '.join(ROLES)}", lambda c: roles_cpu(c[1], "cpu_pct"))
    row(f"CPU µs per delivery at {num(rate)} msg/s: gw / total", per_delivery_fixed)
    row("CPU µs per delivery at the top rate: gw / total", per_delivery_top)
    row(f"Redis per message at {num(rate)} msg/s (top commands: calls per message)", lambda c: redis_cell(c[1]))
    row(f"store transactions per message at {num(rate)} msg/s", lambda c: num(store_tx(c[1]), 3))

    head = (f"### {mode}, {shape}: rooms × members {info.get('rooms')} × "
            f"{info.get('members_per_room')}, senders {info.get('senders')}\n\n"
            f"| | " + " | ".join(c[0] for c in cols) + " |\n|---|" + "---|" * len(cols))
    return head + "\n" + "\n".join(rows) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: summary.py OUT MODE")
    out, mode = sys.argv[1], sys.argv[2]
    floor_doc = load(os.path.join(out, "floor.json"))
    floor = floor_doc.get("cpu_us_per_write") if floor_doc else None
    if floor_doc:
        c = floor_doc["coalesced"]
        print(f"Floor: {floor} CPU-µs per write() of a {floor_doc['frame_bytes']}-byte frame to "
              f"{floor_doc['sockets']} loopback sockets; {c['cpu_us_per_frame']} per frame with "
              f"{c['frames_per_write']} frames per write.\n")
    pattern = re.compile(rf"^{re.escape(mode)}-(?:chat|sio|uws)-shape-(.+)-(?:fixed|ramp)\.json$")
    shapes = []
    for name in sorted(os.listdir(out), key=lambda n: os.path.getmtime(os.path.join(out, n))):
        m = pattern.match(name)
        if m and m.group(1) not in shapes:
            shapes.append(m.group(1))
    for shape in shapes:
        table = shape_table(out, mode, shape, floor)
        if table:
            print(table)


if __name__ == "__main__":
    main()
