"""Names of the model -> answers: full names, search paths, NXDOMAIN vs no data, what is forwarded."""

from __future__ import annotations

from pathlib import Path

from ztunnel.config.model import ClusterConfig, Service, ServicePort, Workload
from ztunnel.net import dns
from ztunnel.proxy.dns import FORWARD, DnsTable, Resolution, upstream_from_resolv_conf

A, AAAA, SRV = dns.TYPE_A, dns.TYPE_AAAA, 33


def table() -> DnsTable:
    pod = Workload(
        uid="u1", name="testapp-1", namespace="demo", node="n1", service_account="default",
        ips=("10.244.1.5",), labels={"app": "testapp"},
    )
    services = (
        Service("testapp-1", "demo", ("10.96.0.10",), (ServicePort(8080, 8080),), {"app": "testapp"}),
        Service("dual", "other", ("10.96.0.11", "fd00::11"), (ServicePort(80, 80),), {}),
        Service("headless", "demo", (), (ServicePort(80, 80),), {}),
    )
    return DnsTable.from_config(ClusterConfig(namespaces={}, workloads=(pod,), services=services, nodes={}))


def test_full_service_name_is_its_cluster_ip_case_insensitively() -> None:
    t = table()
    assert t.resolve("testapp-1.demo.svc.cluster.local", A, 1, None) == Resolution(False, 0, ("10.96.0.10",))
    assert t.resolve("dual.other.svc.cluster.local", AAAA, 1, "demo") == Resolution(False, 0, ("fd00::11",))


def test_aaaa_of_an_ipv4_only_service_is_no_data_not_nxdomain() -> None:
    assert table().resolve("testapp-1.demo.svc.cluster.local", AAAA, 1, None) == Resolution(False, 0, ())


def test_unknown_names_in_the_zone_are_nxdomain_and_empty_non_terminals_no_data() -> None:
    t = table()
    assert t.resolve("nope.demo.svc.cluster.local", A, 1, "demo").rcode == dns.RCODE_NXDOMAIN
    assert t.resolve("headless.demo.svc.cluster.local", A, 1, "demo").rcode == dns.RCODE_NXDOMAIN
    assert t.resolve("demo.svc.cluster.local", A, 1, "demo") == Resolution(False, 0, ())
    # what a resolver with ndots:5 asks first for a full name: NXDOMAIN so it moves on
    doubled = "testapp-1.demo.svc.cluster.local.demo.svc.cluster.local"
    assert t.resolve(doubled, A, 1, "demo").rcode == dns.RCODE_NXDOMAIN


def test_short_names_go_through_the_asking_pods_search_path() -> None:
    t = table()
    for name in ("testapp-1", "testapp-1.demo", "testapp-1.demo.svc"):
        assert t.resolve(name, A, 1, "demo") == Resolution(False, 0, ("10.96.0.10",)), name
    assert t.resolve("testapp-1", A, 1, "other") == FORWARD  # not in the other namespace's path
    assert t.resolve("dual.other", A, 1, "demo") == Resolution(False, 0, ("10.96.0.11",))
    assert t.resolve("testapp-1", A, 1, None) == FORWARD  # unknown asker: no search path


def test_pod_names_and_what_is_forwarded() -> None:
    t = table()
    assert t.resolve("10-244-1-5.demo.pod.cluster.local", A, 1, None) == Resolution(False, 0, ("10.244.1.5",))
    assert t.resolve("example.com", A, 1, "demo") == FORWARD
    assert t.resolve("testapp-1.demo.svc.cluster.local", SRV, 1, "demo") == FORWARD
    assert t.resolve("testapp-1.demo.svc.cluster.local", A, 3, "demo") == FORWARD  # class CH


def test_configurable_domain() -> None:
    svc = Service("web", "prod", ("10.0.0.9",), (), {})
    t = DnsTable.from_config(ClusterConfig(namespaces={}, workloads=(), services=(svc,), nodes={}), "corp.example")
    assert t.resolve("web.prod.svc.corp.example", A, 1, None).addresses == ("10.0.0.9",)
    assert t.resolve("web.prod.svc.cluster.local", A, 1, None) == FORWARD


def test_upstream_is_the_first_nameserver_of_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# generated\nsearch example.com\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n")
    assert upstream_from_resolv_conf(conf) == ("fe80::1%eth0", 53)
    conf.write_text("search only\n")
    assert upstream_from_resolv_conf(conf) is None
    assert upstream_from_resolv_conf(tmp_path / "missing") is None
