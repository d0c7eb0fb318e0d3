"""`ztunnel ca` as an operator runs it: real processes, checked with openssl and a grpcio client."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.eventually import eventually
from tests.support.identity import free_port, pod_yaml, spiffe, two_node_config_yaml, write_token_file
from ztunnel.identity.certs import generate_key, make_csr
from ztunnel.identity.proto import ca_pb2, ca_pb2_grpc
from ztunnel.identity.spiffe import SpiffeId

ZTUNNEL = str(Path(sys.executable).with_name("ztunnel"))
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def ztunnel(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ZTUNNEL, *args], capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def one_line_error(proc: subprocess.CompletedProcess[str], words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert words in lines[0], lines[0]


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca") / "ca"
    ztunnel("ca", "init", "--dir", str(d))
    return d


@needs_openssl
def test_issued_leaf_verifies_and_openssl_shows_the_design_fields(ca_dir: Path, tmp_path: Path) -> None:
    cert, key, bundle = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "bundle.pem"
    ident = spiffe("shop", "web")
    ztunnel(
        "ca",
        "issue",
        "--dir",
        str(ca_dir),
        "--id",
        ident,
        "--cert-out",
        str(cert),
        "--key-out",
        str(key),
        "--bundle-out",
        str(bundle),
    )
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert bundle.read_bytes() == (ca_dir / "root-cert.pem").read_bytes()
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", cert.read_text(), re.S)
    assert len(pems) == 3  # leaf, intermediate, root
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(pems[0])
    verify = openssl(
        "verify", "-CAfile", str(ca_dir / "root-cert.pem"), "-untrusted", str(ca_dir / "ca-cert.pem"), str(leaf)
    )
    assert verify.returncode == 0 and verify.stdout.strip().endswith("OK"), verify.stdout + verify.stderr
    text = openssl("x509", "-in", str(leaf), "-noout", "-text").stdout
    assert re.search(r"X509v3 Subject Alternative Name: critical\n\s+URI:" + re.escape(ident) + r"\n", text)
    assert "DNS:" not in text and "IP Address:" not in text
    assert re.search(r"\n\s+Subject: ?\n", text), "subject must be empty"
    assert re.search(r"X509v3 Key Usage: critical\n\s+Digital Signature, Key Encipherment\n", text)
    assert re.search(
        r"X509v3 Extended Key Usage: ?\n\s+TLS Web Server Authentication, TLS Web Client Authentication\n", text
    )
    assert "CA:FALSE" in text
    serial = re.search(r"Serial Number:\s*\n\s+([0-9a-f:]+)\n", text)
    assert serial is not None and len(serial.group(1).split(":")) >= 15  # ~128 random bits
    assert "ASN1 OID: prime256v1" in text
    dates = openssl("x509", "-in", str(leaf), "-noout", "-enddate", "-checkend", str(24 * 3600 - 60))
    assert dates.returncode == 0  # still valid in (24h - 1 min)
    assert openssl("x509", "-in", str(leaf), "-noout", "-checkend", str(24 * 3600 + 60)).returncode == 1


@needs_openssl
def test_ttl_flag_and_cap(ca_dir: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    base = [
        "ca",
        "issue",
        "--dir",
        str(ca_dir),
        "--id",
        spiffe("shop", "web"),
        "--cert-out",
        str(cert),
        "--key-out",
        str(key),
    ]
    ztunnel(*base, "--ttl", "30m")
    assert openssl("x509", "-in", str(cert), "-noout", "-checkend", "1740").returncode == 0
    assert openssl("x509", "-in", str(cert), "-noout", "-checkend", "1860").returncode == 1
    ztunnel(*base, "--ttl", "48h", "--max-ttl", "1h")
    assert openssl("x509", "-in", str(cert), "-noout", "-checkend", "3660").returncode == 1


@needs_openssl
def test_revoke_puts_the_serial_on_a_crl_openssl_honours(ca_dir: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    ztunnel(
        "ca",
        "issue",
        "--dir",
        str(ca_dir),
        "--id",
        spiffe("shop", "db"),
        "--cert-out",
        str(cert),
        "--key-out",
        str(key),
    )
    serial = openssl("x509", "-in", str(cert), "-noout", "-serial").stdout.strip()  # serial=HEX
    out = ztunnel("ca", "revoke", "--dir", str(ca_dir), "--serial", serial)
    assert "revoked" in out.stdout
    crl = ca_dir / "crl.pem"
    verify = openssl(
        "verify",
        "-crl_check",
        "-CRLfile",
        str(crl),
        "-CAfile",
        str(ca_dir / "root-cert.pem"),
        "-untrusted",
        str(ca_dir / "ca-cert.pem"),
        str(cert),
    )
    assert verify.returncode != 0 and "revoked" in (verify.stdout + verify.stderr)
    listed = openssl("crl", "-in", str(crl), "-noout", "-text").stdout
    assert serial.split("=")[1].upper() in listed.replace(":", "").upper()


def test_cli_errors_are_one_line(ca_dir: Path, tmp_path: Path) -> None:
    one_line_error(ztunnel("ca", "init", "--dir", str(ca_dir), check=False), "--force")
    issue = ["ca", "issue", "--cert-out", str(tmp_path / "c"), "--key-out", str(tmp_path / "k")]
    one_line_error(
        ztunnel(*issue, "--dir", str(tmp_path / "none"), "--id", spiffe("a", "b"), check=False), "no such CA directory"
    )
    one_line_error(
        ztunnel(*issue, "--dir", str(ca_dir), "--id", "spiffe://cluster.local/x", check=False), "not a workload id"
    )
    one_line_error(
        ztunnel(*issue, "--dir", str(ca_dir), "--id", spiffe("a", "b"), "--ttl", "soon", check=False), "not a duration"
    )
    one_line_error(ztunnel("ca", "revoke", "--dir", str(ca_dir), "--serial", "zz", check=False), "not a hex serial")
    broken = tmp_path / "broken"
    shutil.copytree(ca_dir, broken)
    (broken / "ca-key.pem").unlink()
    one_line_error(ztunnel(*issue, "--dir", str(broken), "--id", spiffe("a", "b"), check=False), "missing ca-key.pem")
    other = tmp_path / "other"
    ztunnel("ca", "init", "--dir", str(other))
    shutil.copy(other / "ca-key.pem", broken / "ca-key.pem")
    one_line_error(ztunnel(*issue, "--dir", str(broken), "--id", spiffe("a", "b"), check=False), "does not match")


class Serve:
    def __init__(
        self, proc: subprocess.Popen[str], port: int, root: bytes, tokens: dict[str, str], token_file: Path
    ) -> None:
        self.proc, self.port, self.root, self.tokens, self.token_file = proc, port, root, tokens, token_file


@pytest.fixture
def serve(ca_dir: Path, tmp_path: Path) -> Iterator[tuple[Serve, Path]]:
    config = tmp_path / "cluster.yaml"
    config.write_text(two_node_config_yaml())
    tokens = write_token_file(tmp_path / "tokens.yaml")
    for _ in range(3):  # a free port can be taken between asking and binding: try another
        port = free_port()
        proc = subprocess.Popen(
            [
                ZTUNNEL,
                "--log-format",
                "json",
                "ca",
                "serve",
                "--dir",
                str(ca_dir),
                "-f",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--node-tokens",
                str(tmp_path / "tokens.yaml"),
                "--dns-name",
                "ca.istio-system.svc",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_listening(proc, port)
            break
        except RuntimeError:
            continue
    else:
        pytest.fail("ztunnel ca serve never listened")
    try:
        yield Serve(proc, port, (ca_dir / "root-cert.pem").read_bytes(), tokens, tmp_path / "tokens.yaml"), config
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def _wait_listening(proc: subprocess.Popen[str], port: int) -> None:
    """RuntimeError when the server exits first (its port was taken between asking and binding)."""
    import socket

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read() if proc.stderr else "exited")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        eventually(listening, 15, what=f"ztunnel ca serve to listen on 127.0.0.1:{port}")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise


def _create(
    serve: Serve, identity: str, *, node: str = "node-a", target: str | None = None, name_override: str | None = None
) -> list[str]:
    options = [("grpc.ssl_target_name_override", name_override)] if name_override else []
    with grpc.secure_channel(
        target or f"127.0.0.1:{serve.port}", grpc.ssl_channel_credentials(serve.root), options=options
    ) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        request = ca_pb2.IstioCertificateRequest(
            csr=make_csr(generate_key(), SpiffeId.parse(identity)).decode(), validity_duration=600
        )
        response = stub.CreateCertificate(
            request, metadata=[("authorization", f"Bearer {serve.tokens[node]}")], timeout=10
        )
        return list(response.cert_chain)


def test_grpcio_client_gets_a_chain_from_ca_serve(serve: tuple[Serve, Path], ca_dir: Path) -> None:
    srv, config = serve
    chain = _create(srv, spiffe("shop", "web"))
    assert len(chain) == 3 and chain[-1].encode() == srv.root
    # the server cert also answers to localhost and to the --dns-name given
    assert _create(srv, spiffe("shop", "web"), target=f"localhost:{srv.port}")
    assert _create(srv, spiffe("shop", "web"), name_override="ca.istio-system.svc")
    with pytest.raises(grpc.RpcError) as denied:
        _create(srv, spiffe("shop", "db"))
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    # the config is watched: a pod added to the file is signable without a restart
    config.write_text(two_node_config_yaml() + pod_yaml("db-2", "shop", "node-a", "db", "10.1.0.7"))

    def signable() -> bool:
        try:
            return bool(_create(srv, spiffe("shop", "db")))
        except grpc.RpcError:
            return False

    eventually(signable, 5, 0.1, what="the pod added to the config to become signable")
    # the token file is watched too: a node added to it is recognized without a restart
    srv.tokens["node-c"] = "token-of-node-c-0123456789"
    write_token_file(srv.token_file, srv.tokens)

    def node_c_known() -> bool:
        """Refused for the pod (PERMISSION_DENIED naming node-c), no longer for the token (UNAUTHENTICATED)."""
        with pytest.raises(grpc.RpcError) as refused:
            _create(srv, spiffe("shop", "web"), node="node-c")
        if refused.value.code() is grpc.StatusCode.UNAUTHENTICATED:  # type: ignore[attr-defined]
            return False
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "node-c" in refused.value.details()  # type: ignore[attr-defined]
        return True

    eventually(node_c_known, 5, 0.1, what="the token added to the token file to be accepted")
    assert srv.proc.poll() is None
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0


def test_ca_serve_refuses_bad_setups(ca_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(two_node_config_yaml())
    tokens = tmp_path / "tokens.yaml"
    write_token_file(tokens)
    base = ["ca", "serve", "-f", str(config), "--listen", "127.0.0.1:0"]
    os.chmod(tokens, 0o644)
    one_line_error(ztunnel(*base, "--dir", str(ca_dir), "--node-tokens", str(tokens), check=False), "chmod 600")
    os.chmod(tokens, 0o600)
    broken = tmp_path / "broken"
    shutil.copytree(ca_dir, broken)
    (broken / "ca-key.pem").write_text("not a key")
    one_line_error(
        ztunnel(*base, "--dir", str(broken), "--node-tokens", str(tokens), check=False),
        "not an unencrypted PEM private key",
    )
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("kind: Pod\nmetadata: [oops\n")
    proc = ztunnel(
        "ca",
        "serve",
        "-f",
        str(bad_config),
        "--listen",
        "127.0.0.1:0",
        "--dir",
        str(ca_dir),
        "--node-tokens",
        str(tokens),
        check=False,
    )
    assert proc.returncode == 2 and "bad.yaml" in proc.stderr
