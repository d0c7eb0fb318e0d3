"""The outbound loop guard (`ProxyState.is_proxy_address`) as pods come and go: a connection to one of the
proxy's own listeners (pods' listeners, admin, metrics, readiness, wherever bound), in any spelling of its
address, would loop back into it; anything else goes out."""

from __future__ import annotations

import ipaddress
import socket
import timeit
from collections.abc import Iterator

import pytest

from ztunnel.config.model import Workload
from ztunnel.net.listen import listening_socket
from ztunnel.proxy.listeners import WorkloadSockets
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
    assert state.is_proxy_address(f"::ffff:{BASE}.7", 20007)  # ... in another spelling
    assert state.is_proxy_address(ipaddress.ip_address(f"{BASE}.7"), 20007)  # ... or canonical already
    assert not state.is_proxy_address(f"{BASE}.7", 20008)  # pod 8's port, on another address
    assert not state.is_proxy_address("10.1.2.3", 443)  # the common case: not a port of ours
    assert not state.is_proxy_address("127.0.0.1", 15008)  # a default port where nothing of ours listens
    removed = state.remove_served("uid-7")
    assert removed is not None
    removed.sockets.close()
    assert not state.is_proxy_address(f"{BASE}.7", 20007)
    assert 20007 not in state.listener_ports and state.listener_ports[20008] == 1
    assert f"{BASE}.7" not in state.served_by_ip and state.served_by_ip[f"{BASE}.8"] == "uid-8"
    assert (ipaddress.ip_address(f"{BASE}.7"), 20007) not in state.listeners.exact  # nothing left behind


def test_a_wildcard_listener_covers_loopback_and_that_pods_addresses(state: ProxyState) -> None:
    sockets = WorkloadSockets(plaintext=[listening_socket("0.0.0.0", 0)])
    port = sockets.plaintext[0].getsockname()[1]
    state.add_served(ServedWorkload(workload(1), sockets))
    assert state.is_proxy_address("127.0.0.1", port)
    assert state.is_proxy_address("::ffff:127.0.0.1", port)
    assert state.is_proxy_address("127.0.0.2", port)  # every loopback address reaches a wildcard listener
    assert state.is_proxy_address("0.0.0.0", port)  # a connect() there lands on loopback
    assert state.is_proxy_address(f"{BASE}.1", port)
    assert state.is_proxy_address(f"::ffff:{BASE}.1", port)
    assert not state.is_proxy_address("10.1.2.3", port)  # a pod's wildcard is bound in its netns: not the host's


def test_operator_listeners_are_guarded_wherever_the_flags_put_them(state: ProxyState) -> None:
    # --admin-addr 127.0.0.1:15100 (nothing else needs to listen for the guard to know it).
    state.add_own_listener("127.0.0.1", 15100)
    for ip in ("127.0.0.1", "::ffff:127.0.0.1", "::ffff:7f00:1", "::127.0.0.1", "0.0.0.0", "::ffff:0.0.0.0"):
        assert state.is_proxy_address(ip, 15100), ip
    assert not state.is_proxy_address("127.0.0.2", 15100)  # another address: not that socket
    assert not state.is_proxy_address("127.0.0.1", 15000)  # the default port, where nothing listens
    state.add_own_listener("::1", 15101)
    assert state.is_proxy_address("::1", 15101) and state.is_proxy_address("::", 15101)
    assert not state.is_proxy_address("127.0.0.1", 15101)
    state.add_own_listener("localhost", 15102)  # a name: the addresses it binds
    assert state.is_proxy_address("127.0.0.1", 15102)


def test_an_operator_listener_on_every_address_covers_every_local_address(state: ProxyState) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state.add_own_listener("0.0.0.0", port)  # --metrics-addr 0.0.0.0:PORT
    for ip in ("127.0.0.1", "127.9.9.9", "::ffff:127.0.0.1", "0.0.0.0"):
        assert state.is_proxy_address(ip, port), ip
    assert not state.is_proxy_address("192.0.2.1", port)  # TEST-NET-1: not an address of this host
    assert not state.is_proxy_address("127.0.0.1", port + 1 if port < 65535 else port - 1)


def test_the_guards_common_case_stays_o1(state: ProxyState) -> None:
    """With 250 served pods and operator listeners, a destination that is not a port of ours costs no walk:
    about the same as with one pod (bounded, generous factor for a noisy shared host)."""
    serve(state, 1, 21001)
    dst = ipaddress.ip_address("10.1.2.3")
    one = min(timeit.repeat(lambda: state.is_proxy_address(dst, 443), number=2000, repeat=5))
    for i in range(2, 251):
        serve(state, i, 21000 + i)
    state.add_own_listener("0.0.0.0", 15100)
    many = min(timeit.repeat(lambda: state.is_proxy_address(dst, 443), number=2000, repeat=5))
    assert many < one * 5 + 1e-4
