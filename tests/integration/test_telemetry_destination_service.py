"""`destination_service` on the destination reporter's series: Istio's service dashboards filter on that
reporter, so it must name the service there too (issue 10, item 13)."""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    ECHO_PORT,
    HTTP_PORT,
    NODE_A_CLIENT,
    NODE_B_SERVER,
    SERVICE_IP,
    LocalMesh,
    recv_all,
    socks_connect,
)
from tests.support.eventually import eventually

SERVER_FQDN = "server.shop.svc.cluster.local"  # Service `server` (port 80 -> targetPort ECHO_PORT)


def _closed(text: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "istio_tcp_connections_closed":
            continue
        for s in family.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _counts(mesh: LocalMesh) -> dict[tuple[str, str, str], float]:
    """Closed connections from `client` to `server`, by (reporter, destination_service, proxy)."""
    out = {}
    for proxy, text in (("a", mesh.a.metrics()), ("b", mesh.b.metrics())):
        for reporter in ("source", "destination"):
            for service in (SERVER_FQDN, "unknown"):
                out[(reporter, service, proxy)] = _closed(
                    text,
                    reporter=reporter,
                    source_workload="client",
                    destination_workload="server",
                    destination_service=service,
                )
    return out


def _echo_once(dst: tuple[str, int]) -> None:
    with socks_connect(NODE_A_CLIENT, dst) as s:
        s.sendall(b"which service?")
        s.shutdown(socket.SHUT_WR)
        recv_all(s)


def test_destination_reporter_names_the_service_like_the_source_reporter(local_mesh: LocalMesh) -> None:
    before = _counts(local_mesh)
    _echo_once((SERVICE_IP, 80))  # through the Service: the source proxy knows which one
    _echo_once((NODE_B_SERVER, ECHO_PORT))  # straight to the pod, on the Service's targetPort
    _echo_once((NODE_B_SERVER, HTTP_PORT))  # a port no Service targets

    def grown() -> dict[tuple[str, str, str], float] | None:
        now = _counts(local_mesh)
        delta = {k: now[k] - before[k] for k in now}
        done = sum(v for (r, _s, p), v in delta.items() if (r, p) in (("source", "a"), ("destination", "b")))
        return delta if done >= 6 else None

    delta = eventually(grown, what="both proxies to count the three connections")
    # the source reporter as before: the service only when the client addressed it
    assert delta[("source", SERVER_FQDN, "a")] == 1
    assert delta[("source", "unknown", "a")] == 2
    # the destination reporter: the service whose selector and targetPort match, however it was addressed
    assert delta[("destination", SERVER_FQDN, "b")] == 2
    assert delta[("destination", "unknown", "b")] == 1
    log = local_mesh.b.log()
    assert f"dst.service={SERVER_FQDN}" in log  # the access log says it too
