"""Issue 12's legacy acceptance in the lab (seed 000): the test-app -> CouchDB story's ClusterRbacConfig,
ServiceRole and ServiceRoleBinding, converted to AuthorizationPolicies and enforced per HTTP request by the
waypoint the lab deploys for the namespace; and seed 003's `curl http://testapp-1.demo.svc.cluster.local:8080/book`
from a pod, by name, through a waypoint. Real curl in the pods.

The seeds' Deployments and StatefulSet become pods running small stand-ins (the lab runs commands, not images),
with the seeds' labels, service accounts and named ports; the namespaces get the ambient and use-waypoint labels
in place of `istio-injection`. Everything else is the seeds' YAML.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator

import pytest

from tests.support.lab_waypoint import applied, gateway_yaml, http, waypoint_pod

from .conftest import LabHandle

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

DENIED = (403, "RBAC: access denied")
COUCHDB_URL = "http://couchdb.with-istio.svc.cluster.local"
TEST_APP = "with-istio/test-app"
STRANGER = "with-istio/stranger"


def _server(port: int, routes: dict[str, object], post: bool = False) -> str:
    """A python command answering GET (and POST when asked) with ROUTES' JSON; the stand-in for an image."""
    code = f"""
        import http.server, json
        ROUTES = {json.dumps(routes)!r}
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def answer(self, status=200):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                found = json.loads(ROUTES).get(self.path)
                body = json.dumps(found if found is not None else {{"error": "not_found"}}).encode()
                self.send_response(status if found is not None else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def do_GET(self):
                self.answer()
            {"def do_POST(self): self.answer(201)" if post else ""}
        http.server.ThreadingHTTPServer(("0.0.0.0", {port}), H).serve_forever()
    """
    return json.dumps(textwrap.dedent(code).strip())


WELCOME = {"couchdb": "Welcome", "version": "2.3.0"}
COUCHDB_CLUSTER = f"""\
apiVersion: v1
kind: Namespace
metadata:
  name: with-istio
  labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
{gateway_yaml("with-istio")}---
# Source: couchdb/templates/service.yaml
apiVersion: v1
kind: Service
metadata:
  name: couchdb
  namespace: with-istio
spec:
  type: ClusterIP
  ports:
    - port: 80
      targetPort: http
      protocol: TCP
      name: http
  selector:
    app.kubernetes.io/name: couchdb
    app.kubernetes.io/instance: couchdb
---
# the StatefulSet's pod
apiVersion: v1
kind: Pod
metadata:
  name: couchdb-0
  namespace: with-istio
  labels:
    app.kubernetes.io/name: couchdb
    app.kubernetes.io/instance: couchdb
spec:
  nodeName: n2
  serviceAccountName: couchdb
  containers:
    - name: couchdb
      command: [python3, -c, {_server(5984, {"/": WELCOME, "/_up": {"status": "ok"}, "/db": {"ok": True}}, post=True)}]
      ports:
        - name: http
          containerPort: 5984
          protocol: TCP
      readinessProbe:
        httpGet: {{path: /_up, port: 5984}}
---
# the test-app Deployment's pod: the client of CouchDB (its identity is what the binding names)
apiVersion: v1
kind: Pod
metadata:
  name: test-app
  namespace: with-istio
  labels:
    app.kubernetes.io/name: test-app-chart
    app.kubernetes.io/instance: test-app
spec:
  nodeName: n1
  serviceAccountName: test-app-test-app-chart
  containers: [{{name: test-app-chart, command: [sleep, infinity]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: stranger, namespace: with-istio, labels: {{app: stranger}}}}
spec:
  nodeName: n1
  serviceAccountName: stranger
  containers: [{{name: main, command: [sleep, infinity]}}]
---
apiVersion: "authentication.istio.io/v1alpha1"
kind: "Policy"
metadata:
  name: "default"
  namespace: with-istio
spec:
  peers:
  - mtls:
      mode: STRICT
---
apiVersion: "networking.istio.io/v1alpha3"
kind: "DestinationRule"
metadata:
  name: "default"
  namespace: with-istio
spec:
  host: "*.local"
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
---
apiVersion: "rbac.istio.io/v1alpha1"
kind: ClusterRbacConfig
metadata:
  name: default
spec:
  mode: 'ON_WITH_INCLUSION'
  inclusion:
    namespaces: ['with-istio']
"""

ROLE_AND_BINDING = """\
apiVersion: "rbac.istio.io/v1alpha1"
kind: ServiceRole
metadata:
  name: couchdb-role
  namespace: with-istio
spec:
  rules:
  - services: ["couchdb.with-istio.svc.cluster.local"]
    methods: ["GET"]
    paths: ['*']
---
apiVersion: "rbac.istio.io/v1alpha1"
kind: ServiceRoleBinding
metadata:
  name: bind-test-app-service-couchdb-role
  namespace: with-istio
spec:
  subjects:
  - user: "cluster.local/ns/with-istio/sa/test-app-test-app-chart"
  roleRef:
    kind: ServiceRole
    name: "couchdb-role"
"""


@pytest.fixture(scope="module")
def couchdb(lab: LabHandle) -> Iterator[LabHandle]:
    lab.require("ca", "node-agent", "proxy", "cni-plugin")
    with applied(lab, COUCHDB_CLUSTER, waypoint_pod("with-istio")):
        yield lab


def test_legacy_rbac_story_enforced_per_request_at_the_waypoint(couchdb: LabHandle) -> None:
    # ClusterRbacConfig ON_WITH_INCLUSION alone: every request to the namespace's services is refused
    assert http(couchdb, TEST_APP, f"{COUCHDB_URL}/") == [DENIED]
    couchdb.apply(ROLE_AND_BINDING)
    try:
        # the role binds GET on couchdb to the test-app's service account, by the request
        (code, body), = http(couchdb, TEST_APP, f"{COUCHDB_URL}/")
        assert (code, json.loads(body)) == (200, WELCOME)
        (code, body), = http(couchdb, TEST_APP, "http://couchdb/_up")  # short name, through the search path
        assert (code, json.loads(body)) == (200, {"status": "ok"})
        assert http(couchdb, TEST_APP, "-X", "POST", "-d", "{}", f"{COUCHDB_URL}/db") == [DENIED]  # GET only
        assert http(couchdb, STRANGER, f"{COUCHDB_URL}/") == [DENIED]  # another identity: not bound
        # and CouchDB's pod IP is no way around the waypoint's L7 check, even for the bound identity
        (code, _), = http(couchdb, TEST_APP, "-X", "POST", f"http://{couchdb.pod_ip('with-istio/couchdb-0')}:5984/db")
        assert code == 0
    finally:
        couchdb.delete(ROLE_AND_BINDING)
    log = (couchdb.dir / "logs" / "pod_with-istio_waypoint-0_istio-proxy.log").read_text(errors="replace")
    assert "src.identity=spiffe://cluster.local/ns/with-istio/sa/test-app-test-app-chart" in log
    assert "method=POST path=/db response_code=403" in log


BOOKS = [{"id": "1", "bookname": "Harry Potter", "author": "J.K. Rowling"},
         {"id": "2", "bookname": "Animal Farm", "author": "George Orwell"}]  # fmt: skip
TESTAPP_CLUSTER = f"""\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
{gateway_yaml("demo")}---
apiVersion: v1
kind: Pod
metadata: {{name: testapp-1, namespace: demo, labels: {{app: testapp-1}}}}
spec:
  nodeName: n2
  containers:
  - name: testapp-1
    command: [python3, -c, {_server(8080, {"/book": BOOKS})}]
    ports:
    - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: testapp-1
  namespace: demo
spec:
  type: NodePort
  selector:
    app: testapp-1
  ports:
  - port: 8080
    targetPort: 8080
---
apiVersion: v1
kind: Pod
metadata: {{name: test, namespace: demo, labels: {{run: test}}}}
spec:
  nodeName: n1
  containers: [{{name: test, command: [sleep, infinity]}}]
"""


def test_the_seed_curl_by_service_name_goes_through_the_waypoint(lab: LabHandle) -> None:
    lab.require("ca", "node-agent", "proxy", "cni-plugin")
    with applied(lab, TESTAPP_CLUSTER, waypoint_pod("demo")):
        (code, body), = http(lab, "demo/test", "http://testapp-1.demo.svc.cluster.local:8080/book")
        assert code == 200, body
        assert json.loads(body) == BOOKS
        log = (lab.dir / "logs" / "pod_demo_waypoint-0_istio-proxy.log").read_text(errors="replace")
        assert "method=GET path=/book response_code=200" in log
        assert "dst.service=testapp-1.demo.svc.cluster.local" in log
