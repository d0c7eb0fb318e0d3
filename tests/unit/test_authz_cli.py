"""`ztunnel authz check|validate`: exit codes, output forms, source/destination forms, user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_policy_support import CLUSTER_YAML, policy, run_cli


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER_YAML)
    pol = tmp_path / "policy.yaml"
    pol.write_text(
        "\n---\n".join(
            [
                policy(
                    "allow-foo",
                    {
                        "selector": {"matchLabels": {"app": "server"}},
                        "rules": [{"from": [{"source": {"namespaces": ["foo"]}}]}],
                    },
                ),
                policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication", namespace="bar"),
            ]
        )
    )
    return cluster, pol


def check(files: tuple[Path, Path], *args: str) -> tuple[int, str, str]:
    return run_cli(["authz", "check", "-f", str(files[0]), "-f", str(files[1]), *args])


def test_pod_source_uses_identity_and_ip(files: tuple[Path, Path]) -> None:
    rc, out, _ = check(files, "--from", "pod/foo/client", "--to", "pod/foo/server", "--port", "8080", "-o", "json")
    assert rc == 0
    assert json.loads(out) == {
        "decision": "allow",
        "policy": "foo/allow-foo",
        "reason": "allowed by ALLOW policy foo/allow-foo rule 0",
    }
    rc, out, _ = check(files, "--from", "pod/bar/client", "--to", "pod/foo/server", "--port", "8080", "-o", "json")
    assert rc == 1 and json.loads(out)["decision"] == "deny"


def test_destination_by_ip_and_text_output(files: tuple[Path, Path]) -> None:
    rc, out, _ = check(files, "--from", "spiffe://cluster.local/ns/foo/sa/x", "--to", "10.244.1.10", "--port", "8080")
    assert rc == 0
    assert out.splitlines() == ["ALLOW: allowed by ALLOW policy foo/allow-foo rule 0", "policy: foo/allow-foo"]
    rc, out, _ = check(files, "--from", "plaintext", "--to", "pod/bar/server", "--port", "80", "-v")
    assert rc == 1
    assert "peer authentication for bar/server port 80: STRICT (bar/default)" in out
    rc, out, _ = check(files, "--from", "plaintext", "--to", "pod/foo/server", "--port", "80", "-v")
    assert "policies selecting foo/server at l4: 1" in out and "  ALLOW foo/allow-foo" in out


def test_plaintext_to_strict_port_is_denied_with_reason(files: tuple[Path, Path]) -> None:
    rc, out, _ = check(
        files, "--from", "plaintext", "--source-ip", "10.0.0.1", "--to", "pod/bar/server", "--port", "80", "-o", "json"
    )
    assert rc == 1
    result = json.loads(out)
    assert result["policy"] == "bar/default" and "STRICT" in result["reason"] and "plaintext" in result["reason"]


def test_source_pod_outside_the_mesh_is_plaintext(tmp_path: Path, files: tuple[Path, Path]) -> None:
    extra = tmp_path / "outside.yaml"
    extra.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: legacy, namespace: bar, labels: {istio.io/dataplane-mode: none}}\n"
        "spec: {nodeName: node-2}\nstatus: {podIP: 10.244.2.99}\n"
    )
    rc, out, err = run_cli(
        [
            "authz",
            "check",
            "-f",
            str(files[0]),
            "-f",
            str(files[1]),
            "-f",
            str(extra),
            "--from",
            "pod/bar/legacy",
            "--to",
            "pod/bar/server",
            "--port",
            "80",
        ]
    )
    assert rc == 1 and "not in the mesh" in err and "STRICT" in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--from", "pod/foo/nope", "--to", "pod/foo/server", "--port", "80"], "no such pod"),
        (["--from", "pod/foo", "--to", "pod/foo/server", "--port", "80"], "expected pod/NAMESPACE/NAME"),
        (["--from", "someone", "--to", "pod/foo/server", "--port", "80"], "use spiffe://"),
        (["--from", "plaintext", "--to", "10.9.9.9", "--port", "80"], "no pod"),
        (["--from", "plaintext", "--to", "server", "--port", "80"], "use pod/NAMESPACE/NAME or a pod IP"),
        (
            ["--from", "plaintext", "--to", "10.96.0.10", "--port", "80"],
            "Service foo/server; policies apply to its pods: give one of them (pod/foo/server)",
        ),
        (["--from", "plaintext", "--to", "pod/foo/server", "--port", "0"], "from 1 to 65535"),
        (["--from", "plaintext", "--source-ip", "x", "--to", "pod/foo/server", "--port", "80"], "not an IP address"),
        (
            ["--from", "plaintext", "--to", "pod/foo/server", "--port", "80", "--layer", "l7", "--header", "novalue"],
            "KEY=VALUE",
        ),
        (
            ["--from", "plaintext", "--to", "pod/foo/server", "--port", "80", "--layer", "l7", "--jwt-claims", "{x"],
            "--jwt-claims {x: not JSON",
        ),
        (
            ["--from", "plaintext", "--to", "pod/foo/server", "--port", "80", "--layer", "l7", "--jwt-claims", "[1]"],
            "cannot read",
        ),
        (
            ["--from", "plaintext", "--to", "pod/foo/server", "--port", "80", "--layer", "l7", "--trusted-hops", "-1"],
            "--trusted-hops -1: must be 0 or more",
        ),
    ],
)
def test_user_errors_exit_2(files: tuple[Path, Path], args: list[str], words: str) -> None:
    rc, out, err = check(files, *args)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and words in err


def test_missing_file_exit_2(tmp_path: Path) -> None:
    rc, _, err = run_cli(
        ["authz", "check", "-f", str(tmp_path / "nope.yaml"), "--from", "plaintext", "--to", "1.2.3.4", "--port", "1"]
    )
    assert rc == 2 and "nope.yaml" in err


def test_invalid_policy_reported_and_fails_closed(tmp_path: Path, files: tuple[Path, Path]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(policy("broken", {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}))
    rc, out, err = run_cli(
        [
            "authz",
            "check",
            "-f",
            str(files[0]),
            "-f",
            str(bad),
            "--from",
            "pod/foo/client",
            "--to",
            "pod/foo/other",
            "--port",
            "80",
            "-o",
            "json",
        ]
    )
    assert rc == 1
    assert (
        f"warning: rejected {bad} (document 1): AuthorizationPolicy foo/broken: "
        "field spec.rules[0].to[0].operation.ports[0]" in err
    )
    assert json.loads(out)["policy"] == "foo/broken"
    rc, _, err = run_cli(["authz", "validate", "-f", str(files[0]), "-f", str(bad)])
    assert rc == 2 and "AuthorizationPolicy foo/broken" in err
    rc, out, _ = run_cli(["authz", "validate", "-f", str(files[0]), "-f", str(files[1])])
    assert rc == 0 and out.startswith("ok: 2 security objects")


def test_l7_flags(tmp_path: Path, files: tuple[Path, Path]) -> None:
    pol = tmp_path / "l7.yaml"
    pol.write_text(
        policy(
            "l7",
            {
                "rules": [
                    {
                        "to": [{"operation": {"methods": ["POST"], "paths": ["/api/*"], "hosts": ["server.foo"]}}],
                        "when": [
                            {"key": "request.headers[x-team]", "values": ["blue"]},
                            {"key": "request.auth.claims[role]", "values": ["admin"]},
                        ],
                        "from": [{"source": {"requestPrincipals": ["iss/*"]}}],
                    }
                ]
            },
        )
    )
    base = [
        "authz",
        "check",
        "-f",
        str(files[0]),
        "-f",
        str(pol),
        "--from",
        "pod/bar/client",
        "--to",
        "pod/foo/other",
        "--port",
        "80",
    ]
    l7 = ["--layer", "l7", "--method", "POST", "--path", "/api/x", "--host", "server.foo", "--header", "x-team=blue"]
    assert run_cli([*base, *l7, "--request-principal", "iss/me", "--claim", "role=admin"])[0] == 0
    assert run_cli([*base, *l7, "--request-principal", "iss/me", "--claim", "role=dev"])[0] == 1
    assert run_cli([*base, *l7, "--claim", "role=admin"])[0] == 1
    rc, out, _ = run_cli(base)
    assert rc == 1 and "--layer l7" in out


def test_dry_run_and_audit_shown_in_text(tmp_path: Path, files: tuple[Path, Path]) -> None:
    pol = tmp_path / "dry.yaml"
    pol.write_text(
        "\n---\n".join(
            [
                policy(
                    "dry", {"action": "DENY", "rules": [{}]}, namespace="bar", annotations={"istio.io/dry-run": "true"}
                ),
                policy("audit", {"action": "AUDIT", "rules": [{}]}, namespace="bar"),
            ]
        )
    )
    rc, out, _ = run_cli(
        [
            "authz",
            "check",
            "-f",
            str(files[0]),
            "-f",
            str(pol),
            "--from",
            "pod/foo/client",
            "--to",
            "pod/bar/server",
            "--port",
            "80",
        ]
    )
    assert rc == 0
    assert "dry-run: would deny (matched: bar/dry)" in out and "audit: bar/audit" in out


def test_console_script_exit_codes(files: tuple[Path, Path]) -> None:
    """The installed entry point, as an operator runs it."""
    base = [
        sys.executable,
        "-m",
        "ztunnel",
        "authz",
        "check",
        "-f",
        str(files[0]),
        "-f",
        str(files[1]),
        "--to",
        "pod/foo/server",
        "--port",
        "8080",
    ]
    allow = subprocess.run([*base, "--from", "pod/foo/client"], capture_output=True, text=True, timeout=60)
    deny = subprocess.run([*base, "--from", "pod/bar/client", "-o", "json"], capture_output=True, text=True, timeout=60)
    error = subprocess.run([*base, "--from", "pod/x/y"], capture_output=True, text=True, timeout=60)
    assert (allow.returncode, deny.returncode, error.returncode) == (0, 1, 2), (allow.stderr, deny.stderr, error.stderr)
    assert json.loads(deny.stdout)["decision"] == "deny"


def test_typographic_quotes_are_reported(tmp_path: Path) -> None:
    """Seed 001 writes kind: “Policy”; such an object would otherwise be skipped without a word."""
    f = tmp_path / "quoted.yaml"
    f.write_text(
        "apiVersion: “authentication.istio.io/v1alpha1”\nkind: “Policy”\nmetadata:\n  name: “default”\nspec: {}\n"
    )
    rc, _, err = run_cli(["authz", "validate", "-f", str(f)])
    assert rc == 2 and "write kind: Policy" in err
    rc, _, err = run_cli(["convert", "-f", str(f)])
    assert rc == 2 and "quote characters" in err


def test_destination_outside_the_mesh_is_noted() -> None:
    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "policy"
    argv = ["authz", "check", "-f", str(fixtures / "greeter_cluster.yaml"), "--from", "pod/default/helloweb"]
    rc, out, err = run_cli([*argv, "--to", "pod/other/outside", "--port", "80"])
    assert rc == 0 and "not in the mesh" in err and out.startswith("ALLOW")


def test_l7_jwt_claims_xff_and_sni(tmp_path: Path, files: tuple[Path, Path]) -> None:
    """The waypoint's inputs from the command line: a JWT's claims (file or inline), X-Forwarded-For with trusted
    hops, SNI, repeated headers; the decision is check_l7's."""
    pol = tmp_path / "l7.yaml"
    pol.write_text(
        policy(
            "l7",
            {
                "selector": {"matchLabels": {"app": "server"}},
                "rules": [
                    {
                        "from": [
                            {"source": {"requestPrincipals": ["https://idp/*"], "remoteIpBlocks": ["203.0.113.0/24"]}}
                        ],
                        "when": [
                            {"key": "request.auth.claims[realm][roles]", "values": ["admin"]},
                            {"key": "request.auth.audiences", "values": ["api"]},
                            {"key": "connection.sni", "values": ["server.foo"]},
                            {"key": "request.headers[x-team]", "notValues": ["red"]},
                        ],
                    }
                ],
            },
        )
    )
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({"iss": "https://idp", "sub": "alice", "aud": ["api"], "realm": {"roles": ["admin"]}}))
    base = ["authz", "check", "-f", str(files[0]), "-f", str(pol), "--from", "pod/foo/client", "--to", "pod/foo/server"]
    base += ["--port", "8080", "--layer", "l7", "-o", "json", "--sni", "server.foo"]
    ok = ["--jwt-claims", str(claims), "--forwarded-for", "1.2.3.4, 203.0.113.9", "--trusted-hops", "1"]
    rc, out, _ = run_cli([*base, *ok])
    assert rc == 0 and json.loads(out)["policy"] == "foo/l7", out
    assert run_cli([*base, *ok, "--header", "X-Team=red"])[0] == 1  # header names in any case
    # a repeated header is one value joined with "," (as Envoy matches it): "blue,red" is not "red"
    assert run_cli([*base, *ok, "--header", "x-team=blue", "--header", "X-Team=red"])[0] == 0
    assert run_cli([*base, *ok[:-2]])[0] == 1  # no trusted hop: the client is the peer, 10.244.1.12
    assert run_cli([*base, *ok[:-2], "--trusted-hops", "2"])[0] == 1  # 1.2.3.4
    inline = json.dumps({"iss": "https://idp", "sub": "alice", "aud": "api", "realm": {"roles": ["user"]}})
    assert run_cli([*base, *ok[2:], "--jwt-claims", inline])[0] == 1  # not an admin
    rc, out, _ = run_cli([*base, *ok, "--request-principal", "https://other/alice"])
    assert rc == 1 and json.loads(out)["decision"] == "deny"
