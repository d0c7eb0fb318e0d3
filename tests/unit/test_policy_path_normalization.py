"""The mesh config's `pathNormalization` reaches the policy engine's path matching, so `ztunnel authz check --layer
l7` answers what the waypoint (which normalizes the path it forwards the same way, `normalize_path`) does."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_policy_support import CLUSTER_YAML, policy, run_cli

from tests.support.waypoint_config import mesh_config
from ztunnel.config.loader import build_config, load_documents
from ztunnel.policy.decision import ConnectionAttributes, HttpRequestAttributes
from ztunnel.policy.engine import PolicyEngine

DENY_ADMIN = policy(
    "deny-admin",
    {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}]},
)


def _mesh(normalization: str | None) -> str:
    return "" if normalization is None else mesh_config(normalization)


# (mode, path, denied): what a DENY on /admin and /admin/* does to each spelling under each mode.
CASES = [
    (None, "//admin", True),  # ours: MERGE_SLASHES
    ("BASE", "//admin", False),  # Istio's default: `//admin` passes (the README says why we merge)
    ("BASE", "/x/../admin", True),
    ("NONE", "/x/../admin", False),  # NONE: the path as sent
    ("MERGE_SLASHES", "/admin%2Fkeys", False),
    ("DECODE_AND_MERGE_SLASHES", "/admin%2Fkeys", True),
    ("DECODE_AND_MERGE_SLASHES", "/admin%5Ckeys", True),
]


@pytest.mark.parametrize(("mode", "path", "denied"), CASES)
def test_the_engine_matches_paths_as_the_mesh_config_normalizes_them(mode: str | None, path: str, denied: bool) -> None:
    cfg = build_config(load_documents(CLUSTER_YAML + _mesh(mode) + "\n---\n" + DENY_ADMIN, "cluster.yaml"))
    engine = PolicyEngine.from_config(cfg)
    server = cfg.workload("foo", "server")
    assert server is not None and server.ips
    attrs = ConnectionAttributes(
        destination=server,
        destination_ip=server.ips[0],
        destination_port=80,
        source_principal="spiffe://cluster.local/ns/bar/sa/client",
        source_ip="10.0.0.1",
    )
    decision = engine.check_l7(attrs, HttpRequestAttributes("GET", path, "server.foo"))
    assert decision.allowed is not denied, decision.reason


@pytest.mark.parametrize(("mode", "path", "denied"), CASES)
def test_authz_check_l7_matches_paths_as_the_mesh_config_normalizes_them(
    tmp_path: Path, mode: str | None, path: str, denied: bool
) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER_YAML + _mesh(mode))
    pol = tmp_path / "policy.yaml"
    pol.write_text(DENY_ADMIN)
    argv = ["authz", "check", "-f", str(cluster), "-f", str(pol), "--from", "pod/bar/client", "--to", "pod/foo/server"]
    rc, out, err = run_cli([*argv, "--port", "80", "--layer", "l7", "--method", "GET", "--path", path])
    assert rc == (1 if denied else 0), out + err
