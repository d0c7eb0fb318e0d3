"""Local mode listens only on specific loopback pod IPs: its SOCKS5 port speaks with the pod's SVID to
anyone who reaches it, so a pod IP of 0.0.0.0 or a real interface address is refused, logged naming the
file, object and field, and reported by readiness, while the other pods are served."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from ztunnel.config.loader import load_files
from ztunnel.identity.manager import CertificateManager
from ztunnel.proxy.listeners import LocalListenerFactory, PodAddressRefused, local_mode_address_problem
from ztunnel.proxy.node import LocalWorkloads, NodeProxy, ProxyOptions, readiness

GOOD_IP = "127.0.181.1"


def _pod(name: str, ip: str, extra_ips: tuple[str, ...] = ()) -> str:
    pod_ips = ", ".join(f'{{ip: "{i}"}}' for i in (ip, *extra_ips))
    return (
        "---\napiVersion: v1\nkind: Pod\n"
        f"metadata: {{name: {name}, namespace: addr, uid: uid-{name}}}\n"
        f"spec: {{nodeName: node-l, serviceAccountName: {name}}}\n"
        f'status: {{podIP: "{ip}", podIPs: [{pod_ips}]}}\n'
    )


@pytest.mark.parametrize(
    ("ip", "refused"),
    [
        ("127.0.0.1", False),
        ("127.0.181.7", False),
        ("::1", False),
        ("0.0.0.0", True),
        ("::", True),
        ("10.1.2.3", True),
        ("192.168.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("fe80::1", True),
    ],
)
def test_only_specific_loopback_addresses_are_accepted(ip: str, refused: bool) -> None:
    assert (local_mode_address_problem(ip) is not None) == refused


async def test_non_loopback_pod_ips_are_refused_logged_and_reported_by_readiness(
    tmp_path: Path, certs: CertificateManager, caplog: pytest.LogCaptureFixture
) -> None:
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: addr, labels: {istio.io/dataplane-mode: ambient}}\n"
        + _pod("good", GOOD_IP)
        + _pod("anywhere", "0.0.0.0")
        + _pod("eth", "10.1.2.3")
        + _pod("second-ip", "127.0.181.2", ("192.0.2.1",))
    )
    config = load_files([config_file])
    proxy = NodeProxy(ProxyOptions(node="node-l"), certs)
    factory = LocalListenerFactory(config_files=[str(config_file)])
    local = LocalWorkloads(proxy, factory)
    try:
        proxy.apply_config(config)
        with caplog.at_level(logging.ERROR, logger="ztunnel.proxy"):
            await local.reconcile(config)
        assert sorted(proxy.workloads) == ["uid-good"]
        with socket.create_connection((GOOD_IP, 15080), timeout=5):
            pass  # the good pod is served

        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        for field_name, ip, pod in [
            ("status.podIP", "0.0.0.0", "addr/anywhere"),
            ("status.podIP", "10.1.2.3", "addr/eth"),
            ("status.podIPs[1]", "192.0.2.1", "addr/second-ip"),
        ]:
            assert any(f"Pod {pod} in {config_file}: {field_name} {ip}" in e and "loopback" in e for e in errors), (
                pod,
                errors,
            )

        ready, reason = readiness(proxy, local)()
        assert not ready
        assert f"Pod addr/anywhere in {config_file}: status.podIP 0.0.0.0 is the unspecified address" in reason
        assert "Pod addr/eth" in reason and "Pod addr/second-ip" in reason

        # Refused before anything is bound, also for the second pod's loopback address.
        with pytest.raises(PodAddressRefused):
            factory.sockets_for(config.workload("addr", "second-ip"))  # type: ignore[arg-type]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.181.2", 15080), timeout=5).close()
    finally:
        await proxy.close()
