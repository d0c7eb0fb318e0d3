"""The lab waypoint tests' kit: put a set of objects (with a waypoint Gateway) into the session's lab for one
module and take them out again, and ask a pod's real curl for a status code and body.

A test gets a waypoint by applying a `gateway.networking.k8s.io/v1` Gateway with `gatewayClassName:
istio-waypoint` (the lab deploys its pod, `<ns>/<gateway>-0`, as Istio's controller does) and labelling the
namespace or Service `istio.io/use-waypoint: <gateway>`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.integration.lab.conftest import LabHandle

HTTP_CODE = "\n@@%{http_code}@@\n"  # curl -w: the status code after each body, marked


def gateway_yaml(namespace: str, name: str = "waypoint") -> str:
    """A waypoint Gateway as Istio's docs write it (`istioctl waypoint generate`)."""
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"""


# namespace shop, labelled to use waypoint `wp`; wp's Gateway; an ingress Gateway (class istio: no waypoint pod)
SHOP_WAYPOINT = (
    "apiVersion: v1\nkind: Namespace\n"
    "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}\n---\n"
    + gateway_yaml("shop", "wp")
    + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: shop}\n"
    "spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}\n"
)


def waypoint_pod(namespace: str, gateway: str = "waypoint") -> str:
    return f"{namespace}/{gateway}-0"


def _state(lab: LabHandle) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((lab.dir / "state.json").read_text())
    return data


@contextlib.contextmanager
def applied(lab: LabHandle, yaml_text: str, *waypoints: str) -> Iterator[None]:
    """YAML_TEXT applied to the lab for the block, then deleted; WAYPOINTS (`ns/pod`) are the waypoint pods the
    lab must have deployed for it, and must have removed again with it (process and netns)."""
    lab.apply(yaml_text, "--timeout", "90")
    st = _state(lab)
    netns = {ref: st["pods"][ref]["netns"] for ref in waypoints}
    procs = {ref: st["processes"][f"pod/{ref}/istio-proxy"]["pid"] for ref in waypoints}
    try:
        yield
    finally:
        lab.delete(yaml_text)
    st = _state(lab)
    for ref in waypoints:
        assert ref not in st["pods"], f"{ref} still in the lab after its Gateway was deleted"
        assert not Path(f"/var/run/netns/{netns[ref]}").exists(), f"{ref}'s netns left behind"
        assert not Path(f"/proc/{procs[ref]}").exists() or _zombie(procs[ref]), f"{ref}'s waypoint still runs"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def http(lab: LabHandle, target: str, *curl_args: str, max_time: float = 5.0) -> list[tuple[int, str]]:
    """(status, body) of each response curl in pod TARGET got for CURL_ARGS (several URLs: one keep-alive
    connection, in order); status 0 when no response came. Real curl, in the pod's netns."""
    p = lab.run(target, "curl", "-sS", "-m", str(max_time), "-w", HTTP_CODE, *curl_args, timeout=max_time + 15)
    answers = [(int(code), body) for body, code in re.findall(r"(.*?)\n@@(\d{3})@@\n", p.stdout, re.S)]
    return [(code, body if code else p.stderr.strip()) for code, body in answers] or [(0, p.stderr.strip())]
