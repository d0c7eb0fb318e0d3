"""A test issuer's JWKS endpoint for a lab pod: serves one key set file (read once at start) at one path over
HTTP, as an identity provider's `jwks_uri` does, and logs each fetch (who fetched, what it answered).

Usage: jwks_server.py --file JWKS.json [--port 8000] [--path /jwks.json]
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--file", required=True, type=Path)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--path", default="/jwks.json")
    args = parser.parse_args(argv)
    key_set = args.file.read_bytes()
    json.loads(key_set)  # a broken file fails the pod at start, not the waypoint's fetch later

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = (200, key_set) if self.path == args.path else (404, b"not found\n")
            self.send_response(status)
            self.send_header("content-type", "application/json" if status == 200 else "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            fetch = {"event": "fetch", "peer": self.client_address[0], "path": self.path, "status": status}
            print(json.dumps(fetch), flush=True)

        def log_message(self, fmt: str, *a: Any) -> None:
            pass  # do_GET prints one JSON line per fetch

    print(json.dumps({"event": "listening", "port": args.port, "path": args.path}), flush=True)
    ThreadingHTTPServer(("0.0.0.0", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
