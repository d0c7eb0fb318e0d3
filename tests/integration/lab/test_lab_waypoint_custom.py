"""CUSTOM authorization at a lab waypoint (issue 12 acceptance; seed 003), end to end with real curl.

The module's own lab is seed 003's demo namespace: testapp-1 and testapp-2 (Services opted in to the waypoint
with `istio.io/use-waypoint`), the Kyverno rules (GET /book only on testapp-1, GET /movie only on testapp-2) in
an authorizer pod `ext-authz` in the mesh serving Envoy's gRPC Check API on 9000 and its HTTP API on 8000 (as the
seed's kyverno-envoy-plugin does), registered in the `istio` ConfigMap's mesh.extensionProviders by Service name,
and the seed's CUSTOM policy (paths /book and /movie) naming one provider or the other. The authorizer logs
every check it gets, which is how the tests see what reached it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.support.eventually import eventually
from tests.support.labapps import EXTAUTHZ_SERVER, PROTO, TESTAPP, pod, service, waypoint_gateway

from .conftest import HttpReply, LabHandle, running_lab

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

BOOK_ONLY = "The GET method is restricted to the /book path."
MOVIE_ONLY = "The GET method is restricted to the /movies path."  # the seed's message, its typo included
CLIENT = "demo/client"
AUTHZ = "demo/ext-authz"
PROVIDERS = {"grpc": "kyverno-ext-authz-grpc", "http": "kyverno-ext-authz-http"}

MESH = {
    "extensionProviders": [
        {
            "name": PROVIDERS["grpc"],
            "envoyExtAuthzGrpc": {"service": "ext-authz.demo.svc.cluster.local", "port": "9000", "timeout": "2s"},
        },
        {
            "name": PROVIDERS["http"],
            "envoyExtAuthzHttp": {
                "service": "ext-authz.demo.svc.cluster.local",
                "port": "8000",
                "pathPrefix": "/check",
                "timeout": "2s",
                "includeRequestHeadersInCheck": ["x-ext-authz"],
                "headersToUpstreamOnAllow": ["x-ext-authz-check-result"],
                "headersToDownstreamOnDeny": ["x-ext-authz-check-result", "content-type"],
            },
        },
    ]
}


def custom_policy(provider: str) -> dict[str, Any]:
    """Seed 003's AuthorizationPolicy, the provider its only change."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "kyverno-ext-authz", "namespace": "demo"},
        "spec": {
            "action": "CUSTOM",
            "provider": {"name": provider},
            "rules": [{"to": [{"operation": {"paths": ["/book", "/movie"]}}]}],
        },
    }


def authz_pod() -> dict[str, Any]:
    return pod("ext-authz", "demo", "n1", [EXTAUTHZ_SERVER, "--proto", PROTO], ports=[8000, 9000])


def cluster() -> list[dict[str, Any]]:
    use_waypoint = {"istio.io/use-waypoint": "waypoint"}
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": yaml.safe_dump(MESH)},
        },
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}},
        },
        waypoint_gateway("waypoint", "demo"),
        pod("testapp-1", "demo", "n2", [TESTAPP, "--name", "testapp-1"], ports=[8080]),
        service("testapp-1", "demo", "10.96.20.1", {"http": 8080}, labels=use_waypoint),
        pod("testapp-2", "demo", "n2", [TESTAPP, "--name", "testapp-2"], ports=[8080]),
        service("testapp-2", "demo", "10.96.20.2", {"http": 8080}, labels=use_waypoint),
        authz_pod(),
        service("ext-authz", "demo", "10.96.20.3", {"http": 8000, "grpc": 9000}),
        pod("client", "demo", "n1"),
        custom_policy(PROVIDERS["grpc"]),
    ]


@dataclass
class CustomLab:
    lab: LabHandle
    api: str = "grpc"  # the provider the CUSTOM policy names now

    def get(self, app: int, path: str, *headers: str) -> HttpReply:
        return self.lab.http(CLIENT, f"http://testapp-{app}.demo.svc.cluster.local:8080{path}", *headers)

    def checks(self) -> list[dict[str, Any]]:
        return [e for e in self.lab.pod_log(AUTHZ) if e.get("event") == "check"]

    def use(self, api: str) -> None:
        """Point the CUSTOM policy at the gRPC or the HTTP provider; back once the waypoint asks that one."""
        if api == self.api:
            return
        self.lab.apply(json.dumps(custom_policy(PROVIDERS[api])))

        def asks_it() -> bool:
            self.get(1, "/movie")
            checks = self.checks()
            return bool(checks) and checks[-1]["api"] == api

        eventually(asks_it, 30, 0.2, what=f"the waypoint to ask the {api} provider")
        self.api = api


@pytest.fixture(scope="module")
def custom_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CustomLab]:
    started = time.monotonic()
    with running_lab(f"xa{os.getpid()}", cluster(), tmp_path_factory.mktemp("customlab")) as lab:
        lab.require("node-agent", "proxy")
        setup = CustomLab(lab)
        eventually(
            lambda: setup.get(1, "/book").status == 200,
            60,
            0.5,
            what="GET /book on testapp-1 to pass the waypoint and the authorizer",
        )
        print(f"custom lab ready in {time.monotonic() - started:.1f}s")
        yield setup


@pytest.fixture(params=["grpc", "http"])
def api(request: pytest.FixtureRequest, custom_lab: CustomLab) -> str:
    custom_lab.use(request.param)
    return str(request.param)


def app_saw(reply: HttpReply, app: int, path: str) -> dict[str, Any]:
    assert reply.status == 200, reply
    seen: dict[str, Any] = json.loads(reply.body)
    assert (seen["app"], seen["path"]) == (f"testapp-{app}", path)
    return seen


def test_the_kyverno_rules_decide_and_the_authorizers_403_reaches_the_client(custom_lab: CustomLab, api: str) -> None:
    before = len(custom_lab.checks())
    seen = app_saw(custom_lab.get(1, "/book"), 1, "/book")
    assert seen["headers"]["x-ext-authz-check-result"] == "allowed"  # the authorizer's header went upstream
    assert "x-authz-internal" not in seen["headers"]
    app_saw(custom_lab.get(2, "/movie"), 2, "/movie")
    for app, path, message in ((1, "/movie", BOOK_ONLY), (2, "/book", MOVIE_ONLY)):
        denied = custom_lab.get(app, path)
        assert (denied.status, denied.body) == (403, message)
        assert denied.headers["x-ext-authz-check-result"] == "denied"
        assert denied.headers["content-type"] == "text/plain"
        assert "x-authz-internal" not in denied.headers  # not in headersToDownstreamOnDeny
    checks = custom_lab.checks()[before:]
    assert [(c["api"], c["host"], c["allowed"]) for c in checks] == [
        (api, "testapp-1.demo.svc.cluster.local:8080", True),
        (api, "testapp-2.demo.svc.cluster.local:8080", True),
        (api, "testapp-1.demo.svc.cluster.local:8080", False),
        (api, "testapp-2.demo.svc.cluster.local:8080", False),
    ]


def test_the_grpc_check_carries_envoys_attributes(custom_lab: CustomLab) -> None:
    custom_lab.use("grpc")
    custom_lab.get(1, "/book", "x-user: alice")
    check = custom_lab.checks()[-1]
    lab = custom_lab.lab
    assert (check["method"], check["path"], check["host"], check["scheme"], check["protocol"]) == (
        "GET",
        "/book",
        "testapp-1.demo.svc.cluster.local:8080",
        "http",
        "HTTP/1.1",
    )
    assert check["source_principal"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert check["destination_principal"] == "spiffe://cluster.local/ns/demo/sa/testapp-1"
    assert check["destination"] == f"{lab.pod_ip('demo/testapp-1')}:8080"
    assert check["headers"]["x-user"] == "alice" and check["headers"][":path"] == "/book"


def test_the_http_check_gets_only_the_listed_headers(custom_lab: CustomLab) -> None:
    custom_lab.use("http")
    custom_lab.get(1, "/book", "x-ext-authz: yes", "x-user: alice", "cookie: session=secret")
    check = custom_lab.checks()[-1]
    assert (check["api"], check["method"], check["path"]) == ("http", "GET", "/check/book")
    headers = check["headers"]
    assert headers["x-ext-authz"] == "yes" and headers["host"] == "testapp-1.demo.svc.cluster.local:8080"
    assert "x-user" not in headers and "cookie" not in headers and "user-agent" not in headers


def test_a_path_outside_the_policys_rules_never_reaches_the_authorizer(custom_lab: CustomLab, api: str) -> None:
    before = len(custom_lab.checks())
    for app in (1, 2):
        app_saw(custom_lab.get(app, "/public"), app, "/public")
        app_saw(custom_lab.get(app, "/books"), app, "/books")  # exact paths: /book does not cover /books
    assert len(custom_lab.checks()) == before


def test_without_the_authorizer_the_policys_paths_are_denied(custom_lab: CustomLab) -> None:
    """Last in the module: it deletes the authorizer pod."""
    lab = custom_lab.lab
    lab.delete(json.dumps(authz_pod()))
    for api in ("grpc", "http"):
        lab.apply(json.dumps(custom_policy(PROVIDERS[api])))
        custom_lab.api = api
        eventually(
            lambda: custom_lab.get(1, "/book").status == 403, 30, 0.2, what=f"{api}: /book denied without authorizer"
        )
        denied = custom_lab.get(1, "/book")
        assert (denied.status, denied.body) == (403, "")  # statusOnError, nothing from an authorizer
        app_saw(custom_lab.get(1, "/public"), 1, "/public")  # outside the rules: no authorizer needed
