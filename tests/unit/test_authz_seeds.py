"""Each seed example (../shared/seeds, copied to tests/fixtures/policy) behaves as the seed describes, through
the engine and through `ztunnel authz check`. At the node proxy (l4) rules that need HTTP attributes cannot
match, so the HTTP behaviour the seeds describe is checked at l7, as a waypoint enforces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_policy_support import run_cli

from ztunnel.config.loader import load_files
from ztunnel.policy.decision import DENIED_BODY, DENIED_STATUS, ConnectionAttributes, HttpRequestAttributes
from ztunnel.policy.engine import PolicyEngine

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "policy"
GREETER = FIXTURES / "greeter_cluster.yaml"
HELLOWEB = "spiffe://cluster.local/ns/default/sa/helloweb"
TEST_APP = "pod/with-istio/test-app"

# (id, files, --from, --to, --port, extra flags, verdict, deciding policy or "" for don't care)
SEED_CASES = [
    # seed 000: mTLS STRICT + ClusterRbacConfig ON_WITH_INCLUSION + ServiceRole GET + binding for test-app
    (
        "000-test-app-get-couchdb-l7",
        ["seed000_couchdb.yaml"],
        TEST_APP,
        "pod/with-istio/couchdb-0",
        5984,
        ["--layer", "l7", "--method", "GET", "--path", "/_all_dbs"],
        "allow",
        "with-istio/bind-test-app-service-couchdb-role-couchdb",
    ),
    (
        "000-test-app-post-couchdb-l7",
        ["seed000_couchdb.yaml"],
        TEST_APP,
        "pod/with-istio/couchdb-0",
        5984,
        ["--layer", "l7", "--method", "POST"],
        "deny",
        "",
    ),
    (
        "000-intruder-couchdb-l7",
        ["seed000_couchdb.yaml"],
        "pod/with-istio/intruder",
        "pod/with-istio/couchdb-0",
        5984,
        ["--layer", "l7"],
        "deny",
        "",
    ),
    (
        "000-test-app-couchdb-l4-needs-waypoint",
        ["seed000_couchdb.yaml"],
        TEST_APP,
        "pod/with-istio/couchdb-0",
        5984,
        [],
        "deny",
        "",
    ),
    (
        "000-rbac-on-denies-unbound-service",
        ["seed000_couchdb.yaml"],
        "pod/with-istio/couchdb-0",
        "pod/with-istio/test-app",
        8080,
        ["--layer", "l7"],
        "deny",
        "",
    ),
    (
        "000-plaintext-refused-strict",
        ["seed000_couchdb.yaml"],
        "plaintext",
        "pod/with-istio/couchdb-0",
        5984,
        ["--source-ip", "10.1.1.1"],
        "deny",
        "with-istio/default",
    ),
    # seed 002: greeter / helloweb
    (
        "002-principal-get-header",
        ["greeter_principal_get_header.yaml"],
        HELLOWEB,
        "pod/default/greeter-v2",
        3000,
        ["--layer", "l7", "--header", "x-user=user-1"],
        "allow",
        "default/greeter-service",
    ),
    (
        "002-principal-get-wrong-user",
        ["greeter_principal_get_header.yaml"],
        HELLOWEB,
        "pod/default/greeter-v2",
        3000,
        ["--layer", "l7", "--header", "x-user=user-2"],
        "deny",
        "default/greeter-service",
    ),
    (
        "002-principal-post",
        ["greeter_principal_get_header.yaml"],
        HELLOWEB,
        "pod/default/greeter-v2",
        3000,
        ["--layer", "l7", "--method", "POST", "--header", "x-user=user-1"],
        "deny",
        "",
    ),
    (
        "002-other-principal",
        ["greeter_principal_get_header.yaml"],
        "pod/other/stranger",
        "pod/default/greeter-v2",
        3000,
        ["--layer", "l7", "--header", "x-user=user-1"],
        "deny",
        "",
    ),
    (
        "002-v1-not-selected",
        ["greeter_principal_get_header.yaml"],
        "pod/other/stranger",
        "pod/default/greeter-v1",
        3000,
        [],
        "allow",
        "",
    ),
    (
        "002-l4-rule-needs-waypoint",
        ["greeter_principal_get_header.yaml"],
        HELLOWEB,
        "pod/default/greeter-v2",
        3000,
        [],
        "deny",
        "default/greeter-service",
    ),
    (
        "002-namespace-wide-selects-helloweb",
        ["greeter_namespace_wide.yaml"],
        "pod/other/stranger",
        "pod/default/helloweb",
        3000,
        ["--layer", "l7"],
        "deny",
        "",
    ),
    (
        "002-namespace-wide-other-ns-unaffected",
        ["greeter_namespace_wide.yaml"],
        HELLOWEB,
        "pod/other/stranger",
        3000,
        [],
        "allow",
        "",
    ),
    (
        "002-api-get",
        ["greeter_api_get.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--path", "/api/greet"],
        "allow",
        "",
    ),
    (
        "002-api-other-path",
        ["greeter_api_get.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--path", "/version"],
        "deny",
        "",
    ),
    (
        "002-api-post",
        ["greeter_api_get.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--method", "POST", "--path", "/api/x"],
        "deny",
        "",
    ),
    (
        "002-not-private-public",
        ["greeter_not_private.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--path", "/hello"],
        "allow",
        "",
    ),
    (
        "002-not-private-private",
        ["greeter_not_private.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--path", "/private"],
        "deny",
        "",
    ),
    (
        "002-allow-all",
        ["allow_all.yaml"],
        "plaintext",
        "pod/default/greeter-v1",
        3000,
        ["--source-ip", "10.9.9.9"],
        "allow",
        "default/allow-all",
    ),
    ("002-deny-all", ["deny_all.yaml"], HELLOWEB, "pod/default/greeter-v1", 3000, [], "deny", "default/deny-all"),
    (
        "002-deny-all-l7",
        ["deny_all.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7"],
        "deny",
        "default/deny-all",
    ),
    ("002-greeter-get", ["greeter_get.yaml"], HELLOWEB, "pod/default/greeter-v2", 3000, ["--layer", "l7"], "allow", ""),
    (
        "002-greeter-get-post",
        ["greeter_get.yaml"],
        HELLOWEB,
        "pod/default/greeter-v2",
        3000,
        ["--layer", "l7", "--method", "POST"],
        "deny",
        "",
    ),
    (
        "002-greeter-get-helloweb-open",
        ["greeter_get.yaml"],
        "pod/other/stranger",
        "pod/default/helloweb",
        3000,
        [],
        "allow",
        "",
    ),
    (
        "002-hello",
        ["greeter_hello.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--path", "/hello"],
        "allow",
        "",
    ),
    (
        "002-hello-version-denied",
        ["greeter_hello.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--path", "/version"],
        "deny",
        "",
    ),
    # seed 003: STRICT namespace, port 8080 PERMISSIVE on the apps, CUSTOM ext-authz left to the waypoint
    (
        "003-plaintext-8080-permissive",
        ["seed003_demo.yaml"],
        "plaintext",
        "pod/demo/testapp-1",
        8080,
        ["--source-ip", "10.244.9.9"],
        "allow",
        "",
    ),
    (
        "003-plaintext-other-port-strict",
        ["seed003_demo.yaml"],
        "plaintext",
        "pod/demo/testapp-1",
        9000,
        [],
        "deny",
        "demo/mtls-testapp-1",
    ),
    ("003-plaintext-testapp-2-8080", ["seed003_demo.yaml"], "plaintext", "10.244.2.40", 8080, [], "allow", ""),
    (
        "003-plaintext-ext-authz-strict",
        ["seed003_demo.yaml"],
        "plaintext",
        "pod/demo/ext-authz",
        9000,
        [],
        "deny",
        "demo/mtls-demo",
    ),
    ("003-mtls-ext-authz", ["seed003_demo.yaml"], "pod/demo/testapp-1", "pod/demo/ext-authz", 9000, [], "allow", ""),
    (
        "003-custom-at-l7-book",
        ["seed003_demo.yaml"],
        "pod/demo/ext-authz",
        "pod/demo/testapp-1",
        8080,
        ["--layer", "l7", "--path", "/book"],
        "allow",
        "",
    ),
    # seed 001 (legacy authn): namespace mTLS, JWT origin on the customer service
    (
        "001-plaintext-refused",
        ["seed001_customer.yaml"],
        "plaintext",
        "pod/customer/preference-1",
        8080,
        [],
        "deny",
        "customer/default",
    ),
    (
        "001-mtls-preference",
        ["seed001_customer.yaml"],
        "pod/customer/customer-1",
        "pod/customer/preference-1",
        8080,
        [],
        "allow",
        "",
    ),
    (
        "001-customer-jwt-required-l4",
        ["seed001_customer.yaml"],
        "pod/customer/preference-1",
        "pod/customer/customer-1",
        8080,
        [],
        "deny",
        "customer/customer-jwt-policy-customer-require-jwt",
    ),
    (
        "001-customer-jwt-missing-l7",
        ["seed001_customer.yaml"],
        "pod/customer/preference-1",
        "pod/customer/customer-1",
        8080,
        ["--layer", "l7"],
        "deny",
        "",
    ),
    (
        "001-customer-jwt-present-l7",
        ["seed001_customer.yaml"],
        "pod/customer/preference-1",
        "pod/customer/customer-1",
        8080,
        ["--layer", "l7", "--request-principal", "http://keycloak:8080/auth/realms/istio/alice"],
        "allow",
        "",
    ),
    (
        "001-customer-jwt-claims-l7",
        ["seed001_customer.yaml"],
        "pod/customer/preference-1",
        "pod/customer/customer-1",
        8080,
        ["--layer", "l7", "--jwt-claims", '{"iss": "http://keycloak:8080/auth/realms/istio", "sub": "alice"}'],
        "allow",
        "",
    ),
    # seed 002: GET */hello also matches any prefix before /hello, with the Host and a query string
    (
        "002-greeter-hello-nested-path",
        ["greeter_hello.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--path", "/api/v2/hello?name=x", "--host", "greeter-service:3000"],
        "allow",
        "default/greeter-service",
    ),
    (
        "002-greeter-hello-dot-segments",
        ["greeter_hello.yaml"],
        HELLOWEB,
        "pod/default/greeter-v1",
        3000,
        ["--layer", "l7", "--path", "/hello/../version"],
        "deny",
        "",
    ),
    (
        "002-greeter-principal-header-upper-name",
        ["greeter_principal_get_header.yaml"],
        HELLOWEB,
        "pod/default/greeter-v2",
        3000,
        ["--layer", "l7", "--header", "X-User=user-1"],
        "allow",
        "",
    ),
    # seed 002 (legacy authn): prod PERMISSIVE; service-a STRICT; service-b STRICT only on 8080's target port
    (
        "002a-service-a-strict",
        ["seed002_authn.yaml"],
        "plaintext",
        "pod/prod/service-a-1",
        8000,
        [],
        "deny",
        "prod/sample-policy-service-a",
    ),
    (
        "002a-service-b-target-port-strict",
        ["seed002_authn.yaml"],
        "plaintext",
        "pod/prod/service-b-1",
        9090,
        [],
        "deny",
        "prod/sample-policy-service-b",
    ),
    (
        "002a-service-b-other-port-permissive",
        ["seed002_authn.yaml"],
        "plaintext",
        "pod/prod/service-b-1",
        81,
        [],
        "allow",
        "",
    ),
    ("002a-service-c-permissive", ["seed002_authn.yaml"], "plaintext", "pod/prod/service-c-1", 8000, [], "allow", ""),
]


def _files(names: list[str]) -> list[Path]:
    files = [FIXTURES / n for n in names]
    if any(n.startswith(("greeter", "allow_all", "deny_all")) for n in names):
        files.insert(0, GREETER)
    return files


@pytest.mark.parametrize("case", SEED_CASES, ids=[c[0] for c in SEED_CASES])
def test_seed_via_authz_check(case: tuple) -> None:
    _, names, source, dest, port, extra, verdict, decider = case
    argv = ["authz", "check"]
    for f in _files(names):
        argv += ["-f", str(f)]
    argv += ["--from", source, "--to", dest, "--port", str(port), "-o", "json", *extra]
    rc, out, err = run_cli(argv)
    assert rc == (0 if verdict == "allow" else 1), (out, err)
    result = json.loads(out)
    assert result["decision"] == verdict, result
    if decider:
        assert result["policy"] == decider, result
    assert "warning: rejected" not in err


def test_seed_fixtures_have_no_errors() -> None:
    for f in sorted(FIXTURES.glob("*.yaml")):
        engine = PolicyEngine.from_config(load_files(_files([f.name])))
        assert engine.errors == [], (f, engine.errors)


def test_seed000_through_engine_like_the_proxy() -> None:
    config = load_files([FIXTURES / "seed000_couchdb.yaml"])
    engine = PolicyEngine.from_config(config)
    couchdb, test_app = config.workload("with-istio", "couchdb-0"), config.workload("with-istio", "test-app")
    assert couchdb and test_app
    attrs = ConnectionAttributes(test_app.identity, test_app.ips[0], couchdb, couchdb.ips[0], 5984)
    l4 = engine.check_l4(attrs)
    assert not l4.allowed and "methods" in l4.reason and "waypoint" in l4.reason
    assert engine.check_l7(attrs, HttpRequestAttributes("GET", "/db", "couchdb.with-istio")).allowed
    assert engine.peer_authentication_mode(couchdb, 5984) == "STRICT"


def test_seed003_custom_reported_for_waypoint() -> None:
    config = load_files([FIXTURES / "seed003_demo.yaml"])
    engine = PolicyEngine.from_config(config)
    app, ext = config.workload("demo", "testapp-1"), config.workload("demo", "ext-authz")
    assert app and ext
    attrs = ConnectionAttributes(ext.identity, ext.ips[0], app, app.ips[0], 8080)
    assert engine.check_l7(attrs, HttpRequestAttributes("GET", "/book", "")).custom_policies == (
        "demo/kyverno-ext-authz-grpc",
    )
    assert engine.check_l7(attrs, HttpRequestAttributes("GET", "/other", "")).custom_policies == ()
    assert engine.check_l4(attrs).custom_policies == ()
    assert any("CUSTOM" in w for w in engine.warnings)


def test_seed003_custom_runs_first_and_its_deny_wins() -> None:
    """CUSTOM -> DENY -> ALLOW: the waypoint asks the provider the decision names; a provider's deny is a 403."""
    config = load_files([FIXTURES / "seed003_demo.yaml"])
    engine = PolicyEngine.from_config(config)
    app, ext = config.workload("demo", "testapp-1"), config.workload("demo", "ext-authz")
    assert app and ext
    attrs = ConnectionAttributes(ext.identity, ext.ips[0], app, app.ips[0], 8080)
    d = engine.check_l7(attrs, HttpRequestAttributes("GET", "/movie", "testapp-1.demo.svc.cluster.local:8080"))
    assert d.allowed and d.custom_providers == ("kyverno-ext-authz-grpc",)
    assert d.after_custom(True) == d
    denied = d.after_custom(False)
    assert not denied.allowed and denied.policy == "demo/kyverno-ext-authz-grpc"
    assert "kyverno-ext-authz-grpc denied" in denied.reason
    assert (DENIED_STATUS, DENIED_BODY) == (403, b"RBAC: access denied")
    other = engine.check_l7(attrs, HttpRequestAttributes("GET", "/other", ""))
    assert other.custom_providers == () and other.after_custom(False) == other  # no CUSTOM matched: not asked


def test_seed003_custom_in_authz_check_json() -> None:
    argv = ["authz", "check", "-f", str(FIXTURES / "seed003_demo.yaml"), "--from", "pod/demo/ext-authz"]
    argv += ["--to", "pod/demo/testapp-1", "--port", "8080", "--layer", "l7", "--path", "/book", "-o", "json"]
    rc, out, _ = run_cli(argv)
    result = json.loads(out)
    assert rc == 0 and result["custom_policies"] == ["demo/kyverno-ext-authz-grpc"]
    assert result["custom_providers"] == ["kyverno-ext-authz-grpc"]
