"""ProxyMetrics: Istio's TCP metric names and labels, per-connection accounting, health gauges."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ztunnel.config.model import ClusterConfig, Service, ServicePort, Workload
from ztunnel.proxy.labels import ConnectionLabelCache, connection_labels
from ztunnel.telemetry.metrics import TCP_LABELS, ConnectionLabels, ProxyMetrics


def workload(name: str, ns: str, sa: str, **labels: str) -> Workload:
    return Workload(
        uid=f"uid-{name}",
        name=name,
        namespace=ns,
        node="a",
        service_account=sa,
        ips=("127.0.10.1",),
        labels=labels,
        enrolled=True,
    )


SLEEP = workload("sleep-1", "foo", "sleep", app="sleep")
HTTPBIN = workload("httpbin-1", "bar", "httpbin", app="httpbin")
HTTPBIN_SVC = Service(
    name="httpbin", namespace="bar", cluster_ips=("10.96.0.5",), ports=(ServicePort(8000, 80),), selector={}
)


def dest_labels(cache: ConnectionLabelCache | None = None, **overrides: object) -> ConnectionLabels:
    kwargs: dict[str, object] = {
        "reporter": "destination",
        "source": SLEEP,
        "source_principal": SLEEP.identity,
        "destination": HTTPBIN,
        "destination_principal": HTTPBIN.identity,
        "destination_service": HTTPBIN_SVC,
        "connection_security_policy": "mutual_tls",
    }
    kwargs.update(overrides)
    return connection_labels(cache=cache, **kwargs)  # type: ignore[arg-type]


def sample(registry: CollectorRegistry, name: str, labels: ConnectionLabels, flags: str = "-") -> float | None:
    return registry.get_sample_value(name, dict(zip(TCP_LABELS, labels.values(flags), strict=True)))


def test_build_fills_istio_labels_with_full_spiffe_principals() -> None:
    labels = dest_labels()
    assert labels.reporter == "destination"
    assert labels.source_workload == "sleep-1"
    assert labels.source_workload_namespace == "foo"
    assert labels.source_principal == "spiffe://cluster.local/ns/foo/sa/sleep"
    assert labels.source_app == "sleep"
    assert labels.destination_workload == "httpbin-1"
    assert labels.destination_workload_namespace == "bar"
    assert labels.destination_principal == "spiffe://cluster.local/ns/bar/sa/httpbin"
    assert labels.destination_app == "httpbin"
    assert labels.destination_service == "httpbin.bar.svc.cluster.local"
    assert labels.request_protocol == "tcp"
    assert labels.connection_security_policy == "mutual_tls"


def test_istio_standard_labels_version_canonical_service_cluster_and_service_name() -> None:
    """Istio's "Istio Standard Metrics" label set, each label filled as Istio's ztunnel does."""
    assert set(TCP_LABELS) == {
        "reporter",
        *(f"source_{x}" for x in ("workload", "workload_namespace", "principal", "app", "version")),
        *(f"source_{x}" for x in ("canonical_service", "canonical_revision", "cluster")),
        *(f"destination_{x}" for x in ("workload", "workload_namespace", "principal", "app", "version")),
        *(f"destination_{x}" for x in ("canonical_service", "canonical_revision", "cluster")),
        *("destination_service", "destination_service_name", "destination_service_namespace"),
        *("request_protocol", "response_flags", "connection_security_policy"),
    }
    versioned = workload(
        "reviews-v3-5d8f",
        "bar",
        "reviews",
        **{"app.kubernetes.io/name": "reviews", "app.kubernetes.io/version": "3.1", "version": "v3"},
    )
    canonical = workload(
        "ratings-1",
        "bar",
        "ratings",
        app="ratings",
        **{"service.istio.io/canonical-name": "ratings-svc", "service.istio.io/canonical-revision": "r7"},
    )
    labels = dest_labels(source=versioned, destination=canonical)
    got = dict(zip(TCP_LABELS, labels.values("-"), strict=True))
    assert {k: v for k, v in got.items() if k.startswith(("source_", "destination_")) and "principal" not in k} == {
        "source_workload": "reviews-v3-5d8f",
        "source_workload_namespace": "bar",
        "source_app": "reviews",
        "source_version": "3.1",  # app.kubernetes.io/version before `version`, as Istio's canonical revision
        "source_canonical_service": "reviews",
        "source_canonical_revision": "3.1",
        "source_cluster": "Kubernetes",
        "destination_workload": "ratings-1",
        "destination_workload_namespace": "bar",
        "destination_app": "ratings-svc",
        "destination_version": "r7",
        "destination_service": "httpbin.bar.svc.cluster.local",
        "destination_service_name": "httpbin",
        "destination_service_namespace": "bar",
        "destination_canonical_service": "ratings-svc",
        "destination_canonical_revision": "r7",
        "destination_cluster": "Kubernetes",
    }
    bare = dest_labels(source=workload("job-x", "foo", "job"), destination=None, destination_service=None)
    source_side = (bare.source_canonical_service, bare.source_version, bare.source_cluster)
    assert source_side == ("job-x", "latest", "Kubernetes")
    assert (bare.destination_canonical_service, bare.destination_cluster, bare.destination_service_name) == (
        "unknown",
        "unknown",
        "unknown",
    )
    registry = CollectorRegistry()
    ProxyMetrics(registry).connection_opened(labels)
    assert sample(registry, "istio_tcp_connections_opened_total", labels) == 1
    assert registry.get_sample_value(
        "istio_tcp_connections_opened_total", {**got, "destination_canonical_revision": "r8"}
    ) is None


def test_labels_hash_once_and_compare_by_value() -> None:
    a, b = dest_labels(), dest_labels()
    assert a is not b and a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert dest_labels(connection_security_policy="none") != a


def test_unknown_peers_are_labelled_unknown() -> None:
    labels = connection_labels(
        reporter="source",
        source=SLEEP,
        source_principal=SLEEP.identity,
        destination=None,
        destination_principal=None,
        destination_service=None,
        connection_security_policy="none",
    )
    assert labels.destination_workload == "unknown"
    assert labels.destination_workload_namespace == "unknown"
    assert labels.destination_principal == "unknown"
    assert labels.destination_app == "unknown"
    assert labels.destination_service == "unknown"
    assert labels.connection_security_policy == "none"


def test_canonical_name_label_beats_app_label() -> None:
    w = workload("r-1", "ns", "sa", app="reviews", **{"service.istio.io/canonical-name": "reviews-canon"})
    labels = dest_labels(destination=w)
    assert labels.destination_app == "reviews-canon"


def test_connection_counts_and_bytes_at_close() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    labels = dest_labels()
    for _ in range(3):
        metrics.connection_opened(labels)
    for _ in range(3):
        metrics.connection_closed(labels, sent_bytes=100, received_bytes=7)
    assert sample(registry, "istio_tcp_connections_opened_total", labels) == 3
    assert sample(registry, "istio_tcp_connections_closed_total", labels) == 3
    assert sample(registry, "istio_tcp_sent_bytes_total", labels) == 300
    assert sample(registry, "istio_tcp_received_bytes_total", labels) == 21


def test_response_flags_label_the_close_and_its_bytes() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    labels = dest_labels()
    metrics.connection_opened(labels)
    metrics.connection_closed(labels, 0, 5, response_flags="UF")
    assert sample(registry, "istio_tcp_connections_closed_total", labels, "UF") == 1
    assert sample(registry, "istio_tcp_received_bytes_total", labels, "UF") == 5
    assert not sample(registry, "istio_tcp_connections_closed_total", labels, "-")


def test_add_bytes_flushes_before_close_without_double_counting() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    labels = dest_labels()
    metrics.connection_opened(labels)
    metrics.add_bytes(labels, sent=1000, received=10)
    assert sample(registry, "istio_tcp_sent_bytes_total", labels) == 1000
    metrics.connection_closed(labels, sent_bytes=24, received_bytes=0)
    assert sample(registry, "istio_tcp_sent_bytes_total", labels) == 1024
    assert sample(registry, "istio_tcp_received_bytes_total", labels) == 10


def test_reporters_are_separate_series() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    src, dst = dest_labels(reporter="source"), dest_labels()
    metrics.connection_opened(src)
    metrics.connection_opened(dst)
    metrics.connection_opened(dst)
    assert sample(registry, "istio_tcp_connections_opened_total", src) == 1
    assert sample(registry, "istio_tcp_connections_opened_total", dst) == 2


def test_registries_do_not_share_counters() -> None:
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    ProxyMetrics(r1).connection_opened(dest_labels())
    ProxyMetrics(r2)
    assert sample(r1, "istio_tcp_connections_opened_total", dest_labels()) == 1
    assert sample(r2, "istio_tcp_connections_opened_total", dest_labels()) is None


def test_label_children_are_cached_per_connection_labels() -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    a = metrics._tcp(dest_labels(), "-")
    b = metrics._tcp(dest_labels(), "-")  # equal labels, different object
    assert a is b


def test_health_metrics() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    assert registry.get_sample_value("ztunnel_config_age_seconds") == -1
    metrics.config_loaded(at=1000.0)
    assert registry.get_sample_value("ztunnel_config_last_load_timestamp_seconds") == 1000.0
    assert registry.get_sample_value("ztunnel_config_age_seconds") > 0
    assert registry.get_sample_value("ztunnel_config_loads_total", {"result": "success"}) == 1
    metrics.config_load_failed()
    assert registry.get_sample_value("ztunnel_config_loads_total", {"result": "error"}) == 1
    metrics.set_pods_served(4)
    assert registry.get_sample_value("ztunnel_pods_served") == 4
    metrics.set_pool_connections(2)
    assert registry.get_sample_value("ztunnel_hbone_pool_connections") == 2
    metrics.tls_failure("identity_mismatch")
    metrics.tls_failure("identity_mismatch")
    assert registry.get_sample_value("ztunnel_tls_failures_total", {"reason": "identity_mismatch"}) == 2
    metrics.connection_refused("policy_denied")
    assert registry.get_sample_value("ztunnel_connections_refused_total", {"reason": "policy_denied"}) == 1
    ident = "spiffe://cluster.local/ns/foo/sa/sleep"
    metrics.set_certificate_expiry(ident, 2e9)
    assert registry.get_sample_value("ztunnel_certificate_expiry_timestamp_seconds", {"identity": ident}) == 2e9
    metrics.remove_certificate(ident)
    metrics.remove_certificate(ident)  # idempotent
    assert registry.get_sample_value("ztunnel_certificate_expiry_timestamp_seconds", {"identity": ident}) is None
    metrics.certificate_fetch_failed()
    assert registry.get_sample_value("ztunnel_certificate_fetch_failures_total") == 1


def test_labels_follow_the_workload_objects_they_are_built_from() -> None:
    """The cache hands out the same labels for the same objects, and fresh ones for a changed workload."""
    cache = ConnectionLabelCache()
    assert dest_labels(cache) is dest_labels(cache)
    assert dest_labels(cache) == dest_labels()  # the same as building them uncached
    relabelled = workload("sleep-1", "foo", "sleep", app="sleep-v2")
    labels = dest_labels(cache, source=relabelled)
    assert labels.source_app == "sleep-v2" and dest_labels(cache).source_app == "sleep"
    assert dest_labels(cache, source=workload("sleep-1", "foo", "sleep", app="sleep")) == dest_labels(cache)
    assert dest_labels(cache, destination_service=None).destination_service == "unknown"


def test_the_label_cache_hands_out_one_object_per_peer_pair_and_stays_bounded() -> None:
    cache = ConnectionLabelCache(limit=2)
    kwargs = dict(source_principal=SLEEP.identity, destination_principal=None, destination_service=None)
    first = connection_labels(reporter="source", source=SLEEP, destination=None, cache=cache, **kwargs)  # type: ignore[arg-type]
    again = connection_labels(reporter="source", source=SLEEP, destination=None, cache=cache, **kwargs)  # type: ignore[arg-type]
    assert again is first
    assert first == connection_labels(reporter="source", source=SLEEP, destination=None, **kwargs)  # type: ignore[arg-type]
    other = connection_labels(reporter="destination", source=SLEEP, destination=None, cache=cache, **kwargs)  # type: ignore[arg-type]
    assert other is not first and other.reporter == "destination"
    connection_labels(reporter="source", source=None, destination=None, cache=cache, **kwargs)  # type: ignore[arg-type]
    assert len(cache._entries) <= 2


def _config(workloads: tuple[Workload, ...], services: tuple[Service, ...]) -> ClusterConfig:
    return ClusterConfig(namespaces={}, workloads=workloads, services=services, nodes={})


def test_inbound_service_is_the_selecting_service_whose_target_port_matches() -> None:
    pod = Workload(
        uid="uid-web",
        name="web-1",
        namespace="bar",
        node="a",
        service_account="web",
        ips=("127.0.20.1",),
        labels={"app": "web", "tier": "front"},
        enrolled=True,
        containers=({"name": "app", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}]},),
    )

    def svc(name: str, *ports: ServicePort, ns: str = "bar", **selector: str) -> Service:
        return Service(name=name, namespace=ns, cluster_ips=(), ports=ports, selector=selector)

    web = svc("web", ServicePort(80, "http"), app="web")  # named targetPort -> containerPort 8080
    alias = svc("alias", ServicePort(8080, 8080), tier="front")  # also selects it on 8080: earlier by hostname
    admin = svc("admin", ServicePort(9000, 9090), app="web")
    other = svc("web", ServicePort(80, 8080), ns="elsewhere", app="web")  # another namespace selects nothing
    config = _config((pod,), (web, alias, admin, other))
    cache = ConnectionLabelCache()
    assert cache.inbound_service(config, pod, 8080) is alias
    assert cache.inbound_service(config, pod, 9090) is admin
    assert cache.inbound_service(config, pod, 7000) is None
    assert cache.inbound_service(_config((pod,), (web, admin)), pod, 8080) is web  # a new snapshot: looked up again
    labels = dest_labels(cache, destination=pod, destination_service=cache.inbound_service(config, pod, 9090))
    assert labels.destination_service == "admin.bar.svc.cluster.local"
