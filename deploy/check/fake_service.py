#!/usr/bin/env python3
"""Stand-in for the gateway / history-service binaries in deploy checks.

scripts/check-deploy.sh uses it to test nginx routing and deploy/local/cluster.sh
without the Rust binaries: it honours the same CHAT_LISTEN / CHAT_NODE_ID
environment, answers /healthz, and echoes every other request as JSON
(node, method, path, headers) so a test can see which upstream got a request
and with which headers. A request carrying "Upgrade: websocket" gets a
101 Switching Protocols answer followed by one JSON line over the raw tunnel,
which proves a proxy passed the upgrade through.

GET /__env returns the CHAT_* variables it was started with (secrets masked).
Standard library only; exits on SIGTERM like the real binaries.
"""

import base64
import hashlib
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def node_name() -> str:
    return os.environ.get("CHAT_NODE_ID") or (sys.argv[1] if len(sys.argv) > 1 else "fake")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keepalive, like nginx's upstream keepalive expects

    def log_message(self, fmt, *args):  # quiet: tests read responses, not logs
        pass

    def _json(self, status: int, body: dict) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _echo(self) -> dict:
        return {
            "node": node_name(),
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._json(200, {"ok": True, "node": node_name()})
        elif path == "/__env":
            env = {
                k: ("***" if "SECRET" in k or "TOKEN" in k else v)
                for k, v in os.environ.items()
                if k.startswith("CHAT_")
            }
            self._json(200, {"node": node_name(), "env": env})
        elif (self.headers.get("Upgrade") or "").lower() == "websocket":
            key = self.headers.get("Sec-WebSocket-Key", "")
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            self.send_response(101, "Switching Protocols")
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            body = self._echo()
            body["upgraded"] = True
            self.wfile.write((json.dumps(body) + "\n").encode())
            self.wfile.flush()
            self.close_connection = True
        else:
            self._json(200, self._echo())

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


def main() -> None:
    listen = os.environ.get("CHAT_LISTEN", "127.0.0.1:0")
    host, _, port = listen.rpartition(":")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # Same first log line as the real binaries (docs/protocol.md, "Operating contract").
    print(f"listening on {server.server_address[0]}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
