"""The outbound loop guard (`ProxyState.is_proxy_address`) as pods come and go: a connection to one of the
proxy's own listeners would loop back into it, anything else goes out."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ztunnel.config.model import Workload
from ztunnel.proxy.listeners import WorkloadSockets, listening_socket
from ztunnel.proxy.state import ProxyOptions, ProxyState, ServedWorkload

BASE = "127.0.173"


def workload(i: int) -> Workload:
    return Workload(
        uid=f"uid-{i}",
        name=f"pod-{i}",
        namespace="guard",
        node="n",
        service_account="sa",
        ips=(f"{BASE}.{i}",),
        labels={},
        enrolled=True,
    )


@pytest.fixture
def state() -> Iterator[ProxyState]:
    s = ProxyState(ProxyOptions(node="n"))
    yield s
    for served in list(s.workloads.values()):
        served.sockets.close()


def serve(state: ProxyState, i: int, port: int) -> None:
    sockets = WorkloadSockets(plaintext=[listening_socket(f"{BASE}.{i}", port)])
    state.add_served(ServedWorkload(workload(i), sockets))


def test_a_served_pods_own_listener_is_refused_until_the_pod_goes(state: ProxyState) -> None:
    for i in range(1, 101):  # a busy node: the guard's common case must not walk every pod
        serve(state, i, 20000 + i)
    assert state.is_proxy_address(f"{BASE}.7", 20007)  # pod 7's listener
    assert not state.is_proxy_address(f"{BASE}.7", 20008)  # pod 8's port, on another address
    assert not state.is_proxy_address("10.1.2.3", 443)  # the common case: not a port of ours
    assert state.is_proxy_address("127.0.0.1", 15008)  # a proxy port on loopback
    assert state.is_proxy_address(f"{BASE}.9", 15001)  # a proxy port on a served pod's address
    assert not state.is_proxy_address("10.1.2.3", 15008)  # ... but not on someone else's
    removed = state.remove_served("uid-7")
    assert removed is not None
    removed.sockets.close()
    assert not state.is_proxy_address(f"{BASE}.7", 20007)
    assert 20007 not in state.listener_ports and state.listener_ports[20008] == 1
    assert f"{BASE}.7" not in state.served_by_ip and state.served_by_ip[f"{BASE}.8"] == "uid-8"


def test_a_wildcard_listener_covers_loopback_and_that_pods_addresses(state: ProxyState) -> None:
    sockets = WorkloadSockets(plaintext=[listening_socket("0.0.0.0", 0)])
    port = sockets.plaintext[0].getsockname()[1]
    state.add_served(ServedWorkload(workload(1), sockets))
    assert state.is_proxy_address("127.0.0.1", port)
    assert state.is_proxy_address(f"{BASE}.1", port)
    assert not state.is_proxy_address("10.1.2.3", port)
