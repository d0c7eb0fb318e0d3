"""`haproxy`: the peer written in C. Client -> HAProxy A (plain TCP) -> TLS 1.3, ECDSA P-256, mutual auth ->
HAProxy B -> app, one thread per process like one proxy worker. In the lab, A runs in node1's netns and B in
node2's, between the plain pods."""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.paths.base import PathContext, PathKind, PathSetup
from bench.processes import ProcessGroup, listening, wait_until
from bench.settings import ECHO_PORT, HAPROXY_A, HAPROXY_B, IPERF_PORT, SERVER_POD, TLS_PORT_OFFSET
from bench.topology.lab import LabTopology, netns_exec

LOCAL_ENTRY = "haproxy A (TCP) -> mTLS 1.3 ECDSA P-256 -> haproxy B, nbthread 1 each"
LAB_ENTRY = "plain client pod -> haproxy on node1 -> mTLS 1.3 ECDSA P-256 -> haproxy on node2 -> plain pod"


@dataclass(frozen=True, slots=True)
class HaproxyPlacement:
    """Where the two HAProxy processes listen and run, and where the app is."""

    a_addr: str = HAPROXY_A
    b_addr: str = HAPROXY_B
    app_addr: str = SERVER_POD
    a_prefix: tuple[str, ...] = ()  # e.g. `ip netns exec <node1 netns>`
    b_prefix: tuple[str, ...] = ()
    client_prefix: tuple[str, ...] = ()
    server_prefix: tuple[str, ...] = ()
    iperf_bind: str = SERVER_POD


def haproxy_path(name: str, entry: str, at: HaproxyPlacement) -> tuple[PathSetup, str]:
    """The path record and the haproxy binary ("" and an unavailable path when it is not installed)."""
    binary = shutil.which("haproxy")
    if binary is None:
        return PathSetup(name, available=False, note="haproxy is not installed (bench/run installs it as root)"), ""
    path = PathSetup(
        name,
        entry=entry,
        client_prefix=list(at.client_prefix),
        server_prefix=list(at.server_prefix),
        iperf_bind=at.iperf_bind,
    )
    return path, binary


def haproxy_config_head(maxconn: int) -> str:
    """One thread per process, like one node proxy worker; plain TCP mode."""
    return (
        f"global\n  maxconn {maxconn}\n  nbthread 1\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n"
    )


def placement(ctx: PathContext) -> HaproxyPlacement:
    """Local: the loopback addresses above. Lab: node1 and node2's netns and fabric addresses, the plain pods."""
    if not isinstance(ctx.topology, LabTopology):
        return HaproxyPlacement()
    lab = ctx.topology
    client, server = lab.pair("plain")
    n1, n2 = lab.node("node1"), lab.node("node2")
    return HaproxyPlacement(
        a_addr=n1["address"],
        b_addr=n2["address"],
        app_addr=server["ips"][0],
        a_prefix=tuple(netns_exec(n1["netns"])),
        b_prefix=tuple(netns_exec(n2["netns"])),
        client_prefix=tuple(netns_exec(client["netns"])),
        server_prefix=tuple(netns_exec(server["netns"])),
        iperf_bind=server["ips"][0],
    )


def make_haproxy_certs(directory: Path) -> None:
    """A root and two ECDSA P-256 leaves (client and server), as PEM files haproxy reads."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    root_key = key()
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    for name, eku in (("client", ExtendedKeyUsageOID.CLIENT_AUTH), ("server", ExtendedKeyUsageOID.SERVER_AUTH)):
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}.bench.local")]))
            .issuer_name(root_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{name}.bench.local")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(root_key, hashes.SHA256())
        )
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + pem_key(k))



def setup_haproxy(group: ProcessGroup, maxconn: int, at: HaproxyPlacement, entry: str) -> PathSetup:
    path, binary = haproxy_path("haproxy", entry, at)
    if not path.available:
        return path
    certs = group.workdir / "haproxy-certs"
    certs.mkdir(exist_ok=True)
    make_haproxy_certs(certs)
    a_cfg = b_cfg = haproxy_config_head(maxconn)
    tls = f"ca-file {certs}/ca.pem verify required ssl-min-ver TLSv1.3"
    for port in (IPERF_PORT, ECHO_PORT):
        tls_port = port + TLS_PORT_OFFSET
        a_cfg += (
            f"frontend f{port}\n  bind {at.a_addr}:{port}\n  maxconn {maxconn}\n  default_backend b{port}\n"
            f"backend b{port}\n  server b {at.b_addr}:{tls_port} ssl crt {certs}/client.pem {tls} "
            "verifyhost server.bench.local\n"
        )
        b_cfg += (
            f"frontend f{port}\n  bind {at.b_addr}:{tls_port} ssl crt {certs}/server.pem {tls}\n"
            f"  maxconn {maxconn}\n  default_backend app{port}\n"
            f"backend app{port}\n  server app {at.app_addr}:{port}\n"
        )
    for side, cfg, prefix in (("a", a_cfg, at.a_prefix), ("b", b_cfg, at.b_prefix)):
        cfg_path = group.workdir / f"haproxy-{side}.cfg"
        cfg_path.write_text(cfg)
        path.proxies[side] = group.start(f"haproxy-{side}", [*prefix, binary, "-db", "-f", str(cfg_path)])
    b_port = ECHO_PORT + TLS_PORT_OFFSET
    wait_until(lambda: listening(at.b_addr, b_port, list(at.b_prefix)), 10, "haproxy B", path.proxies["b"])
    wait_until(lambda: listening(at.a_addr, ECHO_PORT, list(at.a_prefix)), 10, "haproxy A", path.proxies["a"])
    path.echo_target = f"{at.a_addr}:{ECHO_PORT}"
    path.iperf_host, path.iperf_port = at.a_addr, IPERF_PORT
    return path


def _build(ctx: PathContext) -> PathSetup:
    entry = LAB_ENTRY if isinstance(ctx.topology, LabTopology) else LOCAL_ENTRY
    return setup_haproxy(ctx.group, ctx.maxconn, placement(ctx), entry)


HAPROXY = PathKind("haproxy", _build)
