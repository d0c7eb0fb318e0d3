"""A lab pod's app (seed 003's testapp-1/-2, the greeter): answers every request with one JSON line naming the
app, the method, the path and the headers it got, so a test sees what the waypoint let through and added.

Usage: testapp.py --name NAME [--port 8080]
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as an app behind a waypoint usually is

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen = {"app": args.name, "method": self.command, "path": self.path, "headers": headers}
            body = json.dumps(seen).encode() + b"\n"
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            print(json.dumps({"event": "request", "peer": self.client_address[0], **seen}), flush=True)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, fmt: str, *a: Any) -> None:
            pass  # one JSON line per request is printed by _answer

    print(json.dumps({"event": "listening", "app": args.name, "port": args.port}), flush=True)
    ThreadingHTTPServer(("0.0.0.0", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
