"""A config file the commands cannot use is an error naming the file and the reason, exit 2, never a
traceback: `authz check` documents 1 as "deny", so a crash there would read as a decision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_policy_support import CLUSTER_YAML, run_cli

from ztunnel.identity.ca import init_ca_dir

BAD = {
    "latin1": (b"kind: Namespace\nmetadata: {name: caf\xe9}\n", "is not UTF-8 text (byte 0xe9"),
    "utf16": (CLUSTER_YAML.encode("utf-16"), "is UTF-16 text, not UTF-8"),
    "binary": (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00", "a binary file"),
    "mistyped-kind": (
        b"apiVersion: security.istio.io/v1\nkind: AuthorizationPolcy\n"
        b"metadata: {name: deny-all, namespace: foo}\nspec: {action: DENY, rules: [{}]}\n",
        "did you mean AuthorizationPolicy?",
    ),
}


def _argv(command: str, bad: Path, tmp_path: Path) -> list[str]:
    if command == "authz check":
        return ["authz", "check", "-f", str(bad), "--from", "plaintext", "--to", "10.244.1.10", "--port", "80"]
    if command == "authz validate":
        return ["authz", "validate", "-f", str(bad)]
    if command == "convert":
        return ["convert", "-f", str(bad)]
    if command == "proxy":
        return ["proxy", "--node", "node-1", "-f", str(bad), "--ca-dir", str(tmp_path / "ca")]
    assert command == "ca serve"
    init_ca_dir(tmp_path / "ca")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("t0k3n: node-1\n")
    os.chmod(tokens, 0o600)
    return ["ca", "serve", "--dir", str(tmp_path / "ca"), "-f", str(bad), "--node-tokens", str(tokens)]


@pytest.mark.parametrize("content", sorted(BAD))
@pytest.mark.parametrize("command", ["authz check", "authz validate", "convert", "proxy", "ca serve"])
def test_an_unusable_config_file_exits_2_with_file_and_reason(tmp_path: Path, command: str, content: str) -> None:
    data, reason = BAD[content]
    bad = tmp_path / "cluster.yaml"
    bad.write_bytes(data)
    argv = _argv(command, bad, tmp_path)
    if command in ("proxy", "ca serve"):  # servers: had the file been accepted, they would run until stopped
        try:
            run = subprocess.run(
                [sys.executable, "-m", "ztunnel", *argv], capture_output=True, text=True, timeout=30, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command} accepted {content} config and kept running")
        rc, out, err = run.returncode, run.stdout, run.stderr
    else:
        rc, out, err = run_cli(argv)
    assert rc == 2, (out, err)
    assert str(bad) in err and reason in err
    assert "Traceback" not in err


def test_a_mistyped_deny_is_not_validated_as_ok(tmp_path: Path) -> None:
    """`kind: AuthorizationPolcy` (DENY) was skipped, so validate said ok and traffic stayed allowed."""
    f = tmp_path / "policy.yaml"
    f.write_bytes(BAD["mistyped-kind"][0])
    rc, out, err = run_cli(["authz", "validate", "-f", str(f)])
    assert rc == 2 and "ok:" not in out
    assert f"{f} (document 1): AuthorizationPolcy deny-all: field kind: security.istio.io has no kind" in err
