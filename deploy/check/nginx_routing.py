#!/usr/bin/env python3
"""nginx checks for scripts/check-deploy.sh (standard library only).

  nginx_routing.py render-local TEMPLATE OUT --prefix DIR --listen ADDR \
        --gateway ADDR [--gateway ADDR ...] --history ADDR
      Fill deploy/nginx/local.conf.template the way deploy/local/cluster.sh does.

  nginx_routing.py loopback-compose-conf CONF OUT --listen ADDR --gateway ADDR x3 --history ADDR
      Rewrite deploy/nginx/nginx.conf (compose host names) to loopback
      addresses so the host's nginx can test and run it.

  nginx_routing.py check URL --gateway-nodes gw1,gw2 --history-node history [--metrics-blocked]
      Send requests through a running nginx whose upstreams are
      deploy/check/fake_service.py, and assert where each one landed and
      with which headers (WebSocket upgrade included).

  nginx_routing.py run-compose-conf CONF --nginx PATH --workdir DIR
      Start 3 fake gateways + a fake history-service + nginx with the
      loopback-rewritten compose config, run `check`, stop everything.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_service.py"


# ------------------------------------------------------------------ rendering
def render_local(template: str, prefix: str, listen: str, gateways, history: str) -> str:
    lines = "\n        ".join(f"server {g};" for g in gateways)
    out = (
        template.replace("@PREFIX@", prefix)
        .replace("@LISTEN@", listen)
        .replace("@GATEWAYS@", lines)
        .replace("@HISTORY@", history)
    )
    left = re.findall(r"@[A-Z]+@", out)
    if left:
        raise SystemExit(f"unreplaced placeholders: {sorted(set(left))}")
    return out


def loopback_compose_conf(conf: str, listen: str, gateways, history: str) -> str:
    gws = iter(gateways)

    def gw(m):
        return f"server {next(gws)}{m.group(1)}"

    out, n = re.subn(r"server gateway\d+:8080(\s[^;]*)?", gw, conf)
    if n != len(gateways):
        raise SystemExit(f"expected {len(gateways)} gateway servers in compose nginx.conf, found {n}")
    out, n = re.subn(r"server history-service:8081", f"server {history}", out)
    if n != 1:
        raise SystemExit("expected one history-service server in compose nginx.conf")
    out, n = re.subn(r"listen 8080;", f"listen {listen};", out)
    if n != 1:
        raise SystemExit("expected 'listen 8080;' in compose nginx.conf")
    return out


# ------------------------------------------------------------------ checks
def http(url: str, method: str = "GET", headers=None, body: bytes = None):
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def websocket_upgrade(host: str, port: int, path: str) -> dict:
    """Raw HTTP/1.1 upgrade; returns the status line and the upstream's echo."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        data = b""
        deadline = time.time() + 5
        while b"\n{" not in data or not data.rstrip().endswith(b"}"):
            if time.time() > deadline:
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    echo = json.loads(rest.decode().strip().splitlines()[0]) if rest.strip() else {}
    return {"status": status, "echo": echo}


def check(url: str, gateway_nodes, history_node: str, metrics_blocked: bool) -> int:
    failures = []
    passed = 0

    def expect(name, cond, detail=""):
        nonlocal passed
        if cond:
            passed += 1
        else:
            failures.append(f"{name}: {detail}")

    def landed(path, method="GET", body=None):
        status, raw = http(url + path, method=method, body=body,
                           headers={"Content-Type": "application/json"} if body else {})
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, {}

    # History paths -> history-service, path and query string intact.
    for path in ["/api/rooms/general/messages?before=10&limit=5",
                 "/api/rooms/dev_team-1/pins", "/api/rooms/general/receipts",
                 "/api/rooms/general/members", "/api/messages?room=general&page=2"]:
        status, body = landed(path)
        expect(f"{path} -> history", status == 200 and body.get("node") == history_node
               and body.get("path") == path, f"status {status}, body {body}")

    # Everything else -> a gateway.
    for path, method in [("/api/rooms", "GET"), ("/api/rooms/general", "GET"),
                         ("/api/rooms/general/messagesx", "GET"), ("/api/admin/notice", "POST"),
                         ("/api/dev/token", "POST"), ("/", "GET"), ("/readyz", "GET"),
                         ("/healthz", "GET")]:
        status, body = landed(path, method, b'{"x":1}' if method == "POST" else None)
        expect(f"{method} {path} -> gateway", status == 200 and body.get("node") in gateway_nodes,
               f"status {status}, body {body}")

    # Plain requests must not carry "Connection: upgrade" upstream, and must
    # carry the forwarding headers.
    _, body = landed("/api/rooms")
    hdrs = body.get("headers", {})
    expect("plain request: no upgrade upstream", "upgrade" not in hdrs.get("connection", "").lower(), hdrs)
    expect("plain request: X-Forwarded-For / X-Real-IP set",
           "x-forwarded-for" in hdrs and "x-real-ip" in hdrs, hdrs)

    # WebSocket upgrades on /ws and /ws/room/{room} reach a gateway with the
    # upgrade headers, and the 101 comes back through nginx.
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    for path in ["/ws?token=t", "/ws/room/general?token=t"]:
        r = websocket_upgrade(host, int(port), path)
        echo = r["echo"]
        h = echo.get("headers", {})
        expect(f"WebSocket {path}: 101 via nginx", " 101 " in r["status"] + " ", r["status"])
        expect(f"WebSocket {path}: lands on a gateway", echo.get("node") in gateway_nodes, echo)
        expect(f"WebSocket {path}: Upgrade/Connection forwarded",
               h.get("upgrade", "").lower() == "websocket" and h.get("connection", "").lower() == "upgrade", h)

    # least_conn spreads sequential requests over all gateways.
    seen = set()
    for _ in range(4 * len(gateway_nodes)):
        _, body = landed("/api/rooms")
        seen.add(body.get("node"))
    expect("requests spread over every gateway", seen >= set(gateway_nodes), f"saw {sorted(map(str, seen))}")

    if metrics_blocked:
        status, _ = http(url + "/metrics")
        expect("/metrics not exposed through the public entry", status == 404, f"status {status}")

    for f in failures:
        print(f"  FAIL {f}", file=sys.stderr)
    print(f"  routing: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


# ------------------------------------------------------------------ compose conf end to end
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc=None, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process for {url} exited with {proc.returncode}")
        try:
            if http(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def run_compose_conf(conf_path: str, nginx: str, workdir: str) -> int:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(5)]
    listen, gws, hist = f"127.0.0.1:{ports[0]}", [f"127.0.0.1:{p}" for p in ports[1:4]], f"127.0.0.1:{ports[4]}"
    conf = loopback_compose_conf(Path(conf_path).read_text(), listen, gws, hist)
    (work / "nginx.conf").write_text(conf)
    procs = []
    nginx_pid = None
    try:
        for i, addr in enumerate(gws + [hist]):
            name = f"gateway{i + 1}" if i < 3 else "history-service"
            env = dict(os.environ, CHAT_LISTEN=addr, CHAT_NODE_ID=name)
            procs.append(subprocess.Popen([sys.executable, str(FAKE)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p, addr in zip(procs, gws + [hist]):
            wait_up(f"http://{addr}/healthz", p)
        # The compose config logs to /dev/stdout and /dev/stderr; the pid file
        # goes to the work dir via -g (the config sets none on purpose).
        # Without NGINX in its environment: nginx reads that variable as
        # inherited sockets (binary upgrade) and then never daemonizes.
        pid_file = work / "nginx.pid"
        nginx_env = {k: v for k, v in os.environ.items() if k != "NGINX"}
        subprocess.run([nginx, "-p", str(work), "-e", str(work / "error.log"),
                        "-c", str(work / "nginx.conf"), "-g", f"pid {pid_file};"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=nginx_env, timeout=30)
        for _ in range(50):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.1)
        nginx_pid = int(pid_file.read_text().strip())
        wait_up(f"http://{listen}/healthz")
        return check(f"http://{listen}", [f"gateway{i}" for i in (1, 2, 3)], "history-service", True)
    finally:
        if nginx_pid:
            try:
                os.kill(nginx_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            p.terminate()
            p.wait(timeout=5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render-local")
    r.add_argument("template")
    r.add_argument("out")
    r.add_argument("--prefix", required=True)
    r.add_argument("--listen", required=True)
    r.add_argument("--gateway", action="append", required=True)
    r.add_argument("--history", required=True)
    lc = sub.add_parser("loopback-compose-conf")
    lc.add_argument("conf")
    lc.add_argument("out")
    lc.add_argument("--listen", required=True)
    lc.add_argument("--gateway", action="append", required=True)
    lc.add_argument("--history", required=True)
    c = sub.add_parser("check")
    c.add_argument("url")
    c.add_argument("--gateway-nodes", required=True)
    c.add_argument("--history-node", required=True)
    c.add_argument("--metrics-blocked", action="store_true")
    rc = sub.add_parser("run-compose-conf")
    rc.add_argument("conf")
    rc.add_argument("--nginx", required=True)
    rc.add_argument("--workdir", required=True)
    a = ap.parse_args()

    if a.cmd == "render-local":
        Path(a.out).write_text(render_local(Path(a.template).read_text(), a.prefix, a.listen, a.gateway, a.history))
        return 0
    if a.cmd == "loopback-compose-conf":
        Path(a.out).write_text(loopback_compose_conf(Path(a.conf).read_text(), a.listen, a.gateway, a.history))
        return 0
    if a.cmd == "check":
        return check(a.url.rstrip("/"), a.gateway_nodes.split(","), a.history_node, a.metrics_blocked)
    return run_compose_conf(a.conf, a.nginx, a.workdir)


if __name__ == "__main__":
    sys.exit(main())
