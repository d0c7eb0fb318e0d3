"""Node authorization of the CA (sans-IO): which node calls, and which identities it may have."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.support.identity import spiffe, two_node_config_yaml, write_token_file
from ztunnel.config.loader import build_config, load_documents
from ztunnel.config.model import ClusterConfig
from ztunnel.identity.authz import (
    NodeAuthError,
    NodeTokens,
    Refusal,
    TokenFileError,
    authorize_identity,
    check_request,
    load_node_tokens,
)
from ztunnel.identity.certs import generate_key, make_csr
from ztunnel.identity.spiffe import SpiffeId


@pytest.fixture(scope="module")
def config() -> ClusterConfig:
    return build_config(load_documents(two_node_config_yaml(), "two-nodes.yaml"))


def _csr(*uris: str) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
        .sign(generate_key(), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _refusal(config: ClusterConfig, csr: bytes, impersonated: str = "") -> NodeAuthError:
    with pytest.raises(NodeAuthError) as info:
        check_request(config, "node-a", csr, trust_domain="cluster.local", impersonated=impersonated)
    assert "\n" not in str(info.value)
    return info.value


def test_node_a_gets_its_own_pods_identities(config: ClusterConfig) -> None:
    for sa in ("web", "shared"):
        req = check_request(config, "node-a", _csr(spiffe("shop", sa)), trust_domain="cluster.local")
        assert req.identity == SpiffeId.parse(spiffe("shop", sa))
    req = check_request(
        config, "node-a", _csr(spiffe("shop", "web")), trust_domain="cluster.local", impersonated=spiffe("shop", "web")
    )
    assert req.identity.service_account == "web"


def test_node_authorization_matrix(config: ClusterConfig) -> None:
    db_only_on_b = _refusal(config, _csr(spiffe("shop", "db")))
    assert db_only_on_b.refusal is Refusal.PERMISSION_DENIED
    assert "node-b" in str(db_only_on_b) and "node-a" in str(db_only_on_b)

    made_up = _refusal(config, _csr(spiffe("shop", "ghost")))
    assert made_up.refusal is Refusal.PERMISSION_DENIED and "no pod" in str(made_up)

    mismatch = _refusal(config, _csr(spiffe("shop", "web")), impersonated=spiffe("shop", "shared"))
    assert mismatch.refusal is Refusal.PERMISSION_DENIED and "differs" in str(mismatch)

    two = _refusal(config, _csr(spiffe("shop", "web"), spiffe("shop", "shared")))
    assert two.refusal is Refusal.PERMISSION_DENIED and "exactly one SAN" in str(two)

    other_td = _refusal(config, _csr(spiffe("shop", "web", "evil.example")))
    assert other_td.refusal is Refusal.PERMISSION_DENIED and "evil.example" in str(other_td)

    bad_impersonation = _refusal(config, _csr(spiffe("shop", "web")), impersonated="web")
    assert bad_impersonation.refusal is Refusal.PERMISSION_DENIED

    garbage = _refusal(config, b"-----BEGIN CERTIFICATE REQUEST-----\nZm9v\n-----END CERTIFICATE REQUEST-----\n")
    assert garbage.refusal is Refusal.INVALID_ARGUMENT


def test_no_config_denies_everything() -> None:
    with pytest.raises(NodeAuthError, match="no cluster config"):
        authorize_identity(None, "node-a", SpiffeId.parse(spiffe("shop", "web")))


def test_host_network_pods_get_no_identity() -> None:
    cfg = build_config(
        load_documents(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: h, namespace: kube-system}\n"
            "spec: {nodeName: node-a, hostNetwork: true, serviceAccountName: h}\n",
            "host.yaml",
        )
    )
    with pytest.raises(NodeAuthError):
        check_request(
            cfg,
            "node-a",
            make_csr(generate_key(), SpiffeId.parse(spiffe("kube-system", "h"))),
            trust_domain="cluster.local",
        )


def test_tokens_map_to_nodes_and_unknown_ones_are_unauthenticated(tmp_path: Path) -> None:
    tokens = write_token_file(tmp_path / "tokens.yaml")
    nt = NodeTokens(load_node_tokens(tmp_path / "tokens.yaml"))
    assert nt.node_for(f"Bearer {tokens['node-a']}") == "node-a"
    assert nt.node_for(f"bearer {tokens['node-b']}") == "node-b"
    for header, words in [
        (None, "no node credential"),
        ("", "no node credential"),
        (f"Basic {tokens['node-a']}", "Bearer"),
        ("Bearer", "Bearer"),
        ("Bearer not-a-known-token", "unknown node token"),
    ]:
        with pytest.raises(NodeAuthError, match=words) as info:
            nt.node_for(header)
        assert info.value.refusal is Refusal.UNAUTHENTICATED


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    write_token_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        load_node_tokens(path)
    os.chmod(path, 0o640)
    with pytest.raises(TokenFileError, match="group or others"):
        load_node_tokens(path)


@pytest.mark.parametrize(
    ("text", "words"),
    [("[a, b]", "mapping"), ("", "mapping"), ("tok: [x]", "non-empty strings"), ("a: {", "not a YAML mapping")],
)
def test_bad_token_files_say_what_is_wrong(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(TokenFileError, match=words) as info:
        load_node_tokens(path)
    assert "\n" not in str(info.value)


def test_a_token_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    """Before: UnicodeDecodeError escaped, and `ca serve` died with a traceback."""
    path = tmp_path / "tokens.yaml"
    path.write_bytes("tok: n\u00f6de".encode("latin-1"))
    os.chmod(path, 0o600)
    with pytest.raises(TokenFileError, match="not UTF-8"):
        load_node_tokens(path)


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        load_node_tokens(tmp_path / "nope.yaml")
