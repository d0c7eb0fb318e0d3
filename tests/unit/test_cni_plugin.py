"""CNI plugin conformance of the sans-IO core (DESIGN §4.8): no sockets, no processes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.cni import plugin as p

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/x"}],
    "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/var/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u-1",
}


def conf(version: str = "1.0.0", **extra: Any) -> bytes:
    body = {"cniVersion": version, "name": "k8s-pod-network", "type": "ztunnel-cni", "prevResult": PREV}
    body.update(extra)
    return json.dumps(body).encode()


def env(**over: str) -> dict[str, str]:
    out = dict(ENV)
    out.update(over)
    return {k: v for k, v in out.items() if v != ""}


def test_version_lists_every_supported_version() -> None:
    out = p.finish(p.parse_request({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"0.4.0"}'), None)
    assert out.exit_code == 0
    assert json.loads(out.stdout) == {"cniVersion": "0.4.0", "supportedVersions": list(p.SUPPORTED_VERSIONS)}
    for v in ("0.3.1", "0.4.0", "1.0.0", "1.1.0"):
        assert v in p.SUPPORTED_VERSIONS


def test_add_passes_prev_result_through_unchanged() -> None:
    req = p.parse_request(env(), conf())
    call = p.plan(req)
    assert call == p.AgentCall("POST", "/v1/cni/add", call.body if call else None)
    assert call is not None and call.body is not None
    assert call.body["podName"] == "web" and call.body["podNamespace"] == "default"
    assert call.body["ips"] == ["10.244.1.5"] and call.body["podUid"] == "u-1"
    out = p.finish(req, p.AgentReply(200, {"enrolled": True}))
    assert out.exit_code == 0
    assert json.loads(out.stdout) == PREV


def test_add_for_a_non_pod_container_needs_no_agent() -> None:
    req = p.parse_request(env(CNI_ARGS=""), conf())
    assert p.plan(req) is None
    assert json.loads(p.finish(req, None).stdout) == PREV


@pytest.mark.parametrize(
    ("stdin", "code"),
    [(b"", 6), (b"{not json", 6), (b"[1]", 6), (b'{"name":"x"}', 7), (b'{"cniVersion":"9.9.9"}', 1)],
)
def test_malformed_stdin_gives_a_cni_error(stdin: bytes, code: int) -> None:
    out = p.run(env(), stdin)
    assert out.exit_code != 0
    err = json.loads(out.stdout)
    assert err["code"] == code and err["msg"] and "cniVersion" in err


def test_missing_env_is_error_4() -> None:
    out = p.run(env(CNI_NETNS=""), conf())
    assert json.loads(out.stdout)["code"] == 4
    out = p.run(env(CNI_COMMAND="FROB"), conf())
    assert json.loads(out.stdout)["code"] == 4


def test_add_without_prev_result_explains_chaining() -> None:
    body = json.loads(conf())
    del body["prevResult"]
    out = p.run(env(), json.dumps(body).encode())
    err = json.loads(out.stdout)
    assert err["code"] == 7 and "chained" in err["msg"]


def test_agent_unreachable_is_try_again_later() -> None:
    req = p.parse_request(env(), conf())
    out = p.finish(req, None, unreachable="/run/x.sock: [Errno 2] No such file")
    err = json.loads(out.stdout)
    assert out.exit_code == 1 and err["code"] == 11 and err["cniVersion"] == "1.0.0"
    assert "No such file" in err["details"]


def test_agent_busy_is_try_again_later_and_failure_is_plugin_code() -> None:
    req = p.parse_request(env(), conf())
    assert json.loads(p.finish(req, p.AgentReply(503, {"msg": "proxy not connected"})).stdout)["code"] == 11
    err = json.loads(p.finish(req, p.AgentReply(500, {"msg": "iptables failed"})).stdout)
    assert err["code"] == 100 and err["msg"] == "iptables failed"


def test_del_is_idempotent_and_never_fails() -> None:
    for extra in ({}, {"CNI_NETNS": ""}):
        req = p.parse_request(env(CNI_COMMAND="DEL", **extra), conf())
        assert p.finish(req, None, unreachable="down").exit_code == 0
        assert p.finish(req, p.AgentReply(500, {"msg": "x"})).exit_code == 0
        out = p.finish(req, p.AgentReply(200, {"removed": False}))
        assert (out.exit_code, out.stdout) == (0, "")


def test_del_without_prev_result_or_netns_still_parses() -> None:
    body = json.loads(conf())
    del body["prevResult"]
    req = p.parse_request(env(CNI_COMMAND="DEL", CNI_NETNS=""), json.dumps(body).encode())
    assert p.plan(req) is not None


def test_check_needs_040_and_asks_the_agent() -> None:
    out = p.run(env(CNI_COMMAND="CHECK"), conf("0.3.1"))
    assert json.loads(out.stdout)["code"] == 1
    req = p.parse_request(env(CNI_COMMAND="CHECK"), conf("1.0.0"))
    assert p.plan(req) == p.AgentCall("POST", "/v1/cni/check", p.plan(req).body)  # type: ignore[union-attr]
    assert p.finish(req, p.AgentReply(200, {})) == p.Outcome("", 0)


def test_status_and_gc_are_110_only() -> None:
    assert json.loads(p.run({"CNI_COMMAND": "STATUS"}, conf("1.0.0")).stdout)["code"] == 1
    req = p.parse_request({"CNI_COMMAND": "STATUS"}, conf("1.1.0"))
    assert p.plan(req) == p.AgentCall("GET", "/v1/status")
    assert json.loads(p.finish(req, None, unreachable="down").stdout)["code"] == 50
    gc = p.parse_request(
        {"CNI_COMMAND": "GC"}, conf("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]})
    )
    call = p.plan(gc)
    assert call is not None and call.body is not None
    assert call.body["validAttachments"] == [{"containerID": "a", "ifname": "eth0"}]


def test_cni_args_parsing() -> None:
    assert p.parse_cni_args("A=1;B=;C=x=y") == {"A": "1", "B": "", "C": "x=y"}
    with pytest.raises(p.CniError):
        p.parse_cni_args("novalue")


def test_plugin_imports_stay_light() -> None:
    import subprocess
    import sys

    heavy = "{'grpc','h2','prometheus_client','yaml','cryptography','uvloop','pyroute2','asyncio'}"
    code = f"import sys, ztunnel.cni.plugin; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@given(
    command=st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "", "BOGUS"]),
    stdin=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    cni_args=st.text(max_size=40),
)
def test_any_input_gives_a_request_or_a_cni_error(command: str, stdin: bytes, cni_args: str) -> None:
    environ = env(CNI_COMMAND=command, CNI_ARGS=cni_args) if command else {"CNI_ARGS": cni_args}
    try:
        req = p.parse_request(environ, stdin)
        p.plan(req)
    except p.CniError as e:
        err = json.loads(p.error_json("1.0.0", e))
        assert isinstance(err["code"], int) and err["msg"]
