"""An external authorizer for a lab pod holding seed 003's Kyverno rules, on both of Envoy's ext-authz APIs:
gRPC `envoy.service.auth.v3.Authorization/Check` and the HTTP API, like the seed's kyverno-envoy-plugin
("Starting GRPC server on Port 9000", "Starting HTTP server on Port 8000").

The rules (the seed's two ValidatingPolicies): a request for host `testapp-1.demo.svc.cluster.local:8080` must be
GET /book, one for testapp-2 GET /movie; a request matching neither host passes. A denial is 403 with the rule's
message as the body. The gRPC messages come from tests/fixtures/envoy_ext_authz.proto (the tests' write-up of
Envoy's field numbers), compiled with grpc_tools at start. Every check is logged as one JSON line with what the
authorizer got (API, method, path, host, headers, principals), which is how the lab tests see what was sent.

Usage: extauthz_server.py --proto PATH [--grpc-port 9000] [--http-port 8000] [--path-prefix /check]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Rule:
    """One ValidatingPolicy rule: `match` on the host, `assert` method and path, `message` when it fails."""

    name: str
    host: str
    method: str
    path: str
    message: str


RULES = (
    Rule(
        "deny-external-calls-testapp-1",
        "testapp-1.demo.svc.cluster.local:8080",
        "GET",
        "/book",
        "The GET method is restricted to the /book path.",
    ),
    Rule(
        "deny-external-calls-testapp-2",
        "testapp-2.demo.svc.cluster.local:8080",
        "GET",
        "/movie",
        "The GET method is restricted to the /movies path.",
    ),
)


def decide(method: str, path: str, host: str) -> tuple[bool, str, str]:
    """(allowed, the rule that decided or "", the denial message or "")."""
    for rule in RULES:
        if rule.host == host:
            if (method, path) == (rule.method, rule.path):
                return True, rule.name, ""
            return False, rule.name, rule.message
    return True, "", ""


def record(**fields: Any) -> None:
    print(json.dumps({"event": "check", **fields}, sort_keys=True), flush=True)


def compile_messages(proto: Path, out: Path) -> ModuleType:
    """The CheckRequest/CheckResponse classes, compiled from the .proto into `out`."""
    from grpc_tools import protoc

    if protoc.main(["protoc", f"-I{proto.parent}", f"--python_out={out}", proto.name]) != 0:
        raise SystemExit(f"{proto}: protoc failed")
    name = f"{proto.stem}_pb2"
    spec = importlib.util.spec_from_file_location(name, out / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def grpc_check(pb: ModuleType) -> Any:
    """The Check method: bytes in, bytes out (a generic handler, no generated service stubs)."""

    def header(key: str, value: str) -> Any:
        return pb.HeaderValueOption(header=pb.HeaderValue(key=key, value=value))

    def check(body: bytes, context: Any) -> bytes:
        attributes = pb.CheckRequest.FromString(body).attributes
        http = attributes.request.http
        allowed, rule, message = decide(http.method, http.path, http.host)
        dest = attributes.destination.address.socket_address
        record(
            api="grpc",
            method=http.method,
            path=http.path,
            host=http.host,
            scheme=http.scheme,
            protocol=http.protocol,
            headers=dict(http.headers),
            source_principal=attributes.source.principal,
            destination_principal=attributes.destination.principal,
            destination=f"{dest.address}:{dest.port_value}",
            allowed=allowed,
            rule=rule,
        )
        if allowed:
            ok = pb.OkHttpResponse(headers=[header("x-ext-authz-check-result", "allowed")])
            answer = pb.CheckResponse(status=pb.RpcStatus(code=0), ok_response=ok)
        else:
            denied = pb.DeniedHttpResponse(
                status=pb.HttpStatus(code=403),
                headers=[header("x-ext-authz-check-result", "denied"), header("content-type", "text/plain")],
                body=message,
            )
            answer = pb.CheckResponse(status=pb.RpcStatus(code=7, message=message), denied_response=denied)
        return bytes(answer.SerializeToString())

    return check


def http_handler(path_prefix: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """Envoy's HTTP API: the original method, `pathPrefix` + the original path, the allowed headers."""

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path[len(path_prefix) :] if self.path.startswith(path_prefix) else self.path
            host = self.headers.get("host", "")
            allowed, rule, message = decide(self.command, path, host)
            headers = {k.lower(): v for k, v in self.headers.items()}
            record(
                api="http", method=self.command, path=self.path, host=host, headers=headers, allowed=allowed, rule=rule
            )
            body = b"" if allowed else message.encode()
            self.send_response(200 if allowed else 403)
            self.send_header("x-ext-authz-check-result", "allowed" if allowed else "denied")
            self.send_header("x-authz-internal", "not for the client")  # listed nowhere: must go nowhere
            if not allowed:
                self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        def log_message(self, fmt: str, *a: Any) -> None:
            pass  # every check is recorded as JSON by _answer

    return Handler


def main(argv: list[str] | None = None) -> None:
    import grpc

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proto", required=True, type=Path)
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--path-prefix", default="/check")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="extauthz-") as tmp:
        pb = compile_messages(args.proto, Path(tmp))
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(grpc_check(pb))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization", {"Check": handler}),)
    )
    server.add_insecure_port(f"0.0.0.0:{args.grpc_port}")
    server.start()
    print(f"Starting GRPC server on Port {args.grpc_port}", flush=True)
    print(f"Starting HTTP server on Port {args.http_port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", args.http_port), http_handler(args.path_prefix)).serve_forever()


if __name__ == "__main__":
    main()
