"""`ztunnel-cni`: the CNI chain plugin (DESIGN §4.8), run by the container runtime once per pod event.

It only forwards events to the node agent (HTTP over a unix socket) and passes the primary plugin's
`prevResult` through untouched. The core is sans-IO (`parse_request` -> `plan` -> `finish`), the
edge (`main`) reads env/stdin, talks to the agent and prints. Imports stay stdlib-only and few,
because the runtime starts this process for every pod.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ztunnel.cni import DEFAULT_AGENT_SOCKET, PLUGIN_TYPE
from ztunnel.cni.installer import main as install_main

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
DEFAULT_TIMEOUT = 30.0  # the agent waits for the proxy's ack; the runtime's own timeout is longer

# Error codes from the CNI spec (1.1.0, "Error codes").
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_ENROLLMENT_FAILED = 100  # plugin-specific range starts at 100


@dataclass(slots=True)
class CniError(Exception):
    code: int
    msg: str
    details: str = ""


@dataclass(frozen=True, slots=True)
class CniRequest:
    command: str
    cni_version: str
    config: Mapping[str, Any]
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)

    @property
    def prev_result(self) -> Mapping[str, Any] | None:
        prev = self.config.get("prevResult")
        return prev if isinstance(prev, Mapping) else None

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")

    @property
    def is_pod(self) -> bool:
        return bool(self.pod_name and self.pod_namespace)

    @property
    def agent_socket(self) -> str:
        return str(self.config.get("agent_socket") or DEFAULT_AGENT_SOCKET)

    @property
    def timeout(self) -> float:
        value = self.config.get("agent_timeout", DEFAULT_TIMEOUT)
        return float(value) if isinstance(value, int | float) and value > 0 else DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True)
class AgentCall:
    """One HTTP request to the node agent."""

    method: str
    path: str
    body: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class AgentReply:
    status: int
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the process prints on stdout and its exit code."""

    stdout: str
    exit_code: int
    stderr: str = ""


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)


def parse_cni_args(text: str) -> dict[str, str]:
    """`K=V;K=V` (CNI_ARGS) -> dict; malformed pairs are an error the runtime should see."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        out[key] = value
    return out


REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}


def parse_request(env: Mapping[str, str], stdin: bytes) -> CniRequest:
    """Environment + stdin -> request, or CniError with the spec's code."""
    command = env.get("CNI_COMMAND", "")
    if command not in REQUIRED_ENV:
        raise CniError(
            ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}", "expected one of " + ", ".join(REQUIRED_ENV)
        )
    if command == "VERSION":
        try:
            cfg = json.loads(stdin) if stdin.strip() else {}
        except ValueError:
            cfg = {}
        version = cfg.get("cniVersion") if isinstance(cfg, dict) else None
        return CniRequest(command, version if isinstance(version, str) else LATEST_VERSION, {})
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(ERR_DECODE, "cannot decode the network configuration on stdin", str(e)) from e
    if not isinstance(config, dict):
        raise CniError(ERR_DECODE, "the network configuration on stdin must be a JSON object")
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, "network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            "supported: " + ", ".join(SUPPORTED_VERSIONS),
        )
    if command == "CHECK" and _version_tuple(version) < (0, 4, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, got {version}")
    if command in ("STATUS", "GC") and _version_tuple(version) < (1, 1, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0, got {version}")
    for name in REQUIRED_ENV[command]:
        if not env.get(name):
            raise CniError(ERR_INVALID_ENV, f"{name} is required for {command}")
    for key in ("agent_socket",):
        if key in config and not isinstance(config[key], str):
            raise CniError(ERR_INVALID_CONFIG, f"plugin config field {key!r} must be a string")
    return CniRequest(
        command=command,
        cni_version=version,
        config=config,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=parse_cni_args(env.get("CNI_ARGS", "")),
    )


def _ips(prev: Mapping[str, Any] | None) -> list[str]:
    """Pod IPs from a prevResult, 1.0 shape (`ips[].address`) or 0.3/0.4 (same key)."""
    out: list[str] = []
    for entry in (prev or {}).get("ips") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("address"), str):
            out.append(entry["address"].split("/")[0])
    return out


def _pod_body(req: CniRequest) -> dict[str, Any]:
    return {
        "cniVersion": req.cni_version,
        "network": req.config.get("name", ""),
        "containerId": req.container_id,
        "netns": req.netns,
        "ifname": req.ifname,
        "podName": req.pod_name,
        "podNamespace": req.pod_namespace,
        "podUid": req.pod_uid,
        "ips": _ips(req.prev_result),
    }


def plan(req: CniRequest) -> AgentCall | None:
    """What to ask the agent, or None when this event needs no agent (non-pod containers, VERSION)."""
    if req.command == "VERSION":
        return None
    if req.command == "STATUS":
        return AgentCall("GET", "/v1/status")
    if req.command == "GC":
        valid = req.config.get("cni.dev/valid-attachments") or []
        return AgentCall("POST", "/v1/cni/gc", {"network": req.config.get("name", ""), "validAttachments": valid})
    if req.command == "ADD" and req.prev_result is None:
        raise CniError(
            ERR_INVALID_CONFIG,
            "ztunnel-cni is a chained plugin and got no prevResult",
            "list it after the primary plugin (e.g. bridge) in the conflist's plugins",
        )
    if not req.is_pod:
        return None
    return AgentCall("POST", f"/v1/cni/{req.command.lower()}", _pod_body(req))


def error_json(version: str, err: CniError) -> str:
    body: dict[str, Any] = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        body["details"] = err.details
    return json.dumps(body)


def _fail(req: CniRequest | None, err: CniError) -> Outcome:
    version = req.cni_version if req else LATEST_VERSION
    return Outcome(error_json(version, err) + "\n", 1)


def finish(req: CniRequest, reply: AgentReply | None, unreachable: str = "") -> Outcome:
    """Turn the agent's answer (or its absence) into the plugin's output."""
    if req.command == "VERSION":
        return Outcome(json.dumps({"cniVersion": req.cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}), 0)
    if unreachable:
        if req.command == "DEL":  # DEL must not fail: the agent reconciles from its own state later
            return Outcome("", 0, f"ztunnel-cni: node agent unreachable on DEL ({unreachable}); ignored")
        if req.command == "STATUS":
            return _fail(req, CniError(ERR_PLUGIN_NOT_AVAILABLE, "ztunnel node agent is not reachable", unreachable))
        return _fail(
            req,
            CniError(ERR_TRY_AGAIN_LATER, "ztunnel node agent is not reachable; try again later", unreachable),
        )
    if reply is not None and not 200 <= reply.status < 300:
        msg = str(reply.body.get("msg") or f"node agent answered HTTP {reply.status}")
        details = str(reply.body.get("details") or "")
        if req.command == "DEL":
            return Outcome("", 0, f"ztunnel-cni: node agent failed DEL ({msg}); ignored")
        code = reply.body.get("code")
        if not isinstance(code, int):
            code = ERR_TRY_AGAIN_LATER if reply.status in (429, 503) else ERR_ENROLLMENT_FAILED
        if req.command == "STATUS":
            code = ERR_PLUGIN_NOT_AVAILABLE
        return _fail(req, CniError(code, msg, details))
    if req.command == "ADD":
        return Outcome(json.dumps(req.prev_result), 0)
    return Outcome("", 0)


# ---- I/O edge ------------------------------------------------------------------------------------


def http_over_unix(path: str, call: AgentCall, timeout: float) -> AgentReply:
    """A minimal HTTP/1.1 client (Connection: close) so the plugin needs no http library."""
    body = json.dumps(call.body).encode() if call.body is not None else b""
    head = (
        f"{call.method} {call.path} HTTP/1.1\r\nHost: ztunnel-node-agent\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(head + body)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    header, _, payload = raw.partition(b"\r\n\r\n")
    status_line = header.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"malformed HTTP response from the node agent: {raw[:80]!r}")
    try:
        parsed = json.loads(payload) if payload.strip() else {}
    except ValueError:
        parsed = {"msg": payload.decode(errors="replace")[:500]}
    return AgentReply(int(status_line[1]), parsed if isinstance(parsed, dict) else {})


def run(env: Mapping[str, str], stdin: bytes) -> Outcome:
    """Everything but the process boundary: testable in-process with a fake environment."""
    req: CniRequest | None = None
    try:
        req = parse_request(env, stdin)
        call = plan(req)
    except CniError as e:
        return _fail(req, e)
    if call is None:
        return finish(req, None)
    try:
        reply = http_over_unix(req.agent_socket, call, req.timeout)
    except (OSError, TimeoutError) as e:
        return finish(req, None, unreachable=f"{req.agent_socket}: {e}")
    return finish(req, reply)


ABOUT = (
    f"CNI plugin {PLUGIN_TYPE}: supports CNI versions {', '.join(SUPPORTED_VERSIONS)}; `{PLUGIN_TYPE} install --help`"
)


def _log_invocation(env: Mapping[str, str], stdin: bytes, outcome: Outcome) -> None:
    """One line per call to the plugin config's optional `log_file` (runtimes often drop stderr)."""
    try:
        config = json.loads(stdin)
        path = config.get("log_file") if isinstance(config, dict) else None
    except ValueError:
        return
    if not isinstance(path, str) or not path:
        return
    import time

    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": env.get("CNI_COMMAND", ""),
        "containerId": env.get("CNI_CONTAINERID", ""),
        "args": env.get("CNI_ARGS", ""),
        "exit": outcome.exit_code,
    }
    if outcome.exit_code:
        line["error"] = outcome.stdout.strip()
    if outcome.stderr:
        line["note"] = outcome.stderr
    try:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "install":
        return install_main(args[1:])
    if not os.environ.get("CNI_COMMAND"):
        print(ABOUT, file=sys.stderr)
        return 0
    stdin = b"" if os.environ.get("CNI_COMMAND") == "VERSION" and sys.stdin.isatty() else sys.stdin.buffer.read()
    outcome = run(os.environ, stdin)
    _log_invocation(os.environ, stdin, outcome)
    if outcome.stderr:
        print(outcome.stderr, file=sys.stderr)
    if outcome.stdout:
        sys.stdout.write(outcome.stdout)
        sys.stdout.flush()
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
