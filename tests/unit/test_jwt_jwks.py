"""JWKS for the waypoint (waypoint/jwks.py): which keys a set may hold, the refresh schedule with keep-last-good
(fake clock), and the fetcher against loopback HTTP(S) servers, including one that goes away after the first
fetch while cached keys keep verifying."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.clock import FakeClock
from tests.support.eventually import eventually_async
from tests.support.jwtkit import NOW, claims, jwks, key
from tests.support.waypoint_config import config
from ztunnel.config.model import ClusterConfig
from ztunnel.waypoint.jwks import (
    REFRESH_INTERVAL,
    RETRY_MAX,
    ClusterNames,
    JwksError,
    JwksFetcher,
    JwksFetchError,
    JwksRefresher,
    RemoteJwks,
    parse_jwks,
)
from ztunnel.waypoint.jwt import Authenticated, JwtRule, KeyStore, RequestTokens, authenticate, remote_uris

ISS = "https://issuer.test"


# ---- parsing ----------------------------------------------------------------------------------------
def test_only_public_signature_keys_are_kept() -> None:
    rsa, ec_key = key("RS256"), key("ES256")
    private = {**ec_key.jwk(), "kid": "p", "d": "AAAA"}
    doc = {
        "keys": [
            rsa.jwk(),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            private,
            {**ec_key.jwk(), "use": "enc", "kid": "enc"},
            {**rsa.jwk(), "alg": "HS256", "kid": "hs"},
            "not a key",
        ]
    }
    ks = parse_jwks(json.dumps(doc))
    assert [k.kid for k in ks.keys] == [rsa.kid]
    assert len(ks.skipped) == 5 and "oct" in ks.skipped[0] and "private" in ks.skipped[1]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not json", "not JSON"),
        ('{"keys": []}', "empty"),
        ('["a"]', "`keys` list"),
        ('{"keys": [{"kty": "oct", "k": "eA"}]}', "oct"),
        ('{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}', "cannot be loaded"),
    ],
)
def test_unusable_key_sets_are_errors_that_say_why(text: str, why: str) -> None:
    with pytest.raises(JwksError, match=why):
        parse_jwks(text, what="jwks of issuer 'x'")


# ---- the schedule (sans-IO) ---------------------------------------------------------------------------
def test_refresh_schedule_and_keep_last_good() -> None:
    clock = FakeClock()
    good, rotated = jwks(key("RS256")).encode(), jwks(key("RS256", kid="rotated", n=1)).encode()
    r = RemoteJwks("http://jwks.test/keys", next_fetch=clock())
    assert r.due(clock()) and r.keys is None
    r.failed(clock(), "connection refused")  # never fetched yet: no keys, retry after 1 s
    assert r.keys is None and r.next_fetch == clock() + 1
    clock.advance(1)
    r.succeeded(clock(), good)
    assert r.keys is not None and r.fetch_ok == 1 and r.next_fetch == clock() + REFRESH_INTERVAL  # 20 min
    kept = r.keys
    clock.advance(REFRESH_INTERVAL - 1)
    assert not r.due(clock())
    clock.advance(1)
    delays = []
    for _ in range(12):  # the server is gone: doubling retries, capped, keys kept all along
        assert r.due(clock())
        r.failed(clock(), "connection refused")
        delays.append(r.next_fetch - clock())
        clock.advance(r.next_fetch - clock())
    assert r.keys is kept and r.fetch_failed == 13 and r.last_error == "connection refused"
    assert delays[:4] == [1, 2, 4, 8] and max(delays) == RETRY_MAX
    r.succeeded(clock(), b'{"keys": []}')  # a 200 with nothing usable is a failure too
    assert r.keys is kept and r.consecutive_failures == 13
    r.succeeded(clock(), rotated)
    assert r.keys is not kept and r.consecutive_failures == 0 and r.last_error == ""
    assert [k.kid for k in r.keys.keys] == ["rotated"]


async def test_refresher_fetches_what_is_due_and_reports_each_fetch() -> None:
    clock = FakeClock()
    answers = {"http://a/keys": [jwks(key("RS256")).encode(), OSError("refused")], "http://b/keys": [OSError("x")] * 3}

    async def fetch(uri: str) -> bytes:
        answer = answers[uri].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    seen: list[tuple[str, bool]] = []
    rules = [
        JwtRule(ISS, jwks_uri="http://a/keys"),
        JwtRule("https://b", jwks_uri="http://b/keys"),
        JwtRule("https://c", jwks='{"keys": []}', jwks_uri="http://c/ignored"),
        JwtRule("https://a2", jwks_uri="http://a/keys"),
    ]
    assert remote_uris(rules) == ["http://a/keys", "http://b/keys"]
    refresher = JwksRefresher(remote_uris(rules), fetch=fetch, clock=clock, on_fetch=lambda u, ok: seen.append((u, ok)))
    assert await refresher.refresh_due() == 2
    assert seen == [("http://a/keys", True), ("http://b/keys", False)]
    assert await refresher.refresh_due() == 0  # nothing due until a retry or a refresh
    clock.advance(1)
    assert await refresher.refresh_due() == 1 and refresher.remotes["http://b/keys"].fetch_failed == 2
    clock.advance(REFRESH_INTERVAL)
    await refresher.refresh_due()
    a = refresher.remotes["http://a/keys"]
    assert (a.fetch_ok, a.fetch_failed) == (1, 1) and refresher.keys("http://a/keys") is a.keys is not None


# ---- the fetcher, on loopback ----------------------------------------------------------------------------
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[asyncio.Server, int]]:
    """A loopback server running `handler` per connection; TLS (if any) is started in the handler's task so a
    failed handshake closes its socket there, and every connection is finished before the server goes."""
    tasks: set[asyncio.Task[None]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            if tls is not None:
                await writer.start_tls(tls)
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away or refused our certificate
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    try:
        yield server, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def answering(body: bytes, status: str = "200 OK", requests: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if requests is not None:
            requests.append(head)
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    return handle


async def test_fetch_over_http() -> None:
    body = jwks(key("ES256")).encode()
    requests: list[bytes] = []
    async with serve(answering(body, requests=requests)) as (_, port):
        assert await JwksFetcher().fetch(f"http://127.0.0.1:{port}/realms/x/certs?v=1") == body
    assert requests[0].startswith(b"GET /realms/x/certs?v=1 HTTP/1.1\r\n")


async def test_fetch_failures_are_jwks_fetch_errors_naming_the_uri() -> None:
    async with serve(answering(b"nope", "404 Not Found")) as (_, port):
        with pytest.raises(JwksFetchError, match=rf"127.0.0.1:{port}/k: answered 404"):
            await JwksFetcher().fetch(f"http://127.0.0.1:{port}/k")
    async with serve(answering(b"x" * 5000)) as (_, port):
        with pytest.raises(JwksFetchError, match="larger than"):
            await JwksFetcher(max_bytes=4096).fetch(f"http://127.0.0.1:{port}/k")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; ends when the client gives up
        writer.close()

    async with serve(silent) as (_, port):
        with pytest.raises(JwksFetchError, match=r"no answer within 0\.2s"):
            await JwksFetcher(timeout=0.2).fetch(f"http://127.0.0.1:{port}/k")
    with pytest.raises(JwksFetchError, match="not an http"):
        await JwksFetcher().fetch("ftp://127.0.0.1/k")


def _self_signed(tmp: Path, dns: str | None = None) -> tuple[ssl.SSLContext, Path]:
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(dns)] if dns else [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(k, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return server, cert_file


async def test_fetch_over_https_verifies_the_server(tmp_path: Path) -> None:
    server_tls, ca_file = _self_signed(tmp_path)
    body = jwks(key("EdDSA")).encode()
    async with serve(answering(body), tls=server_tls) as (_, port):
        uri = f"https://127.0.0.1:{port}/jwks"
        assert await JwksFetcher(ca_file=str(ca_file)).fetch(uri) == body
        with pytest.raises(JwksFetchError, match="CERTIFICATE_VERIFY_FAILED"):
            await JwksFetcher().fetch(uri)  # the system trust store does not know this issuer


def jwks_service(*ports: int, ready: bool = True) -> ClusterConfig:
    """Service `jwks` of namespace `auth` (ClusterIP 10.96.9.9, port 8000), one pod per loopback server port: each
    pod 127.0.0.1 with the Service's targetPort `http` on that port (a named port, as a chart writes it)."""
    text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: auth}\n"
    for i, port in enumerate(ports):
        not_ready = "" if ready else ", conditions: [{type: Ready, status: 'False'}]"
        text += (
            f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: jwks-{i}, namespace: auth, labels: {{app: jwks}}}}\n"
            f"spec: {{nodeName: n1, containers: [{{name: s, ports: [{{name: http, containerPort: {port}}}]}}]}}\n"
            f'status: {{podIP: "127.0.0.1"{not_ready}}}\n'
        )
    text += (
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: jwks, namespace: auth}\n"
        "spec: {clusterIP: 10.96.9.9, selector: {app: jwks}, ports: [{port: 8000, targetPort: http}]}\n"
    )
    return config(text)


def names_for(cfg: ClusterConfig, uri: str, namespace: str) -> ClusterNames:
    names = ClusterNames()
    names.update(cfg, [(namespace, uri), ("elsewhere", uri)])  # the first namespace naming a URI is its
    return names


@pytest.mark.parametrize(
    ("uri", "namespace"),
    [
        ("http://jwks:8000/jwks.json", "auth"),  # short: relative to the RequestAuthentication's namespace
        ("http://jwks.auth:8000/jwks.json", "demo"),
        ("http://jwks.auth.svc:8000/jwks.json", "demo"),
        ("http://jwks.auth.svc.cluster.local:8000/jwks.json", "demo"),
        ("http://10.96.9.9:8000/jwks.json", "demo"),  # its ClusterIP: nothing routes it here, an endpoint does
    ],
)
async def test_a_service_name_is_fetched_from_a_ready_endpoint_through_the_config(uri: str, namespace: str) -> None:
    body = jwks(key("RS256")).encode()
    requests: list[bytes] = []
    async with serve(answering(body, requests=requests)) as (_, port):
        fetcher = JwksFetcher(timeout=2, names=names_for(jwks_service(port), uri, namespace))
        assert await fetcher.fetch(uri) == body
    host = uri.split("/")[2]
    assert requests[0].startswith(b"GET /jwks.json HTTP/1.1\r\n")
    assert f"\r\nhost: {host}\r\n".encode() in requests[0].lower()  # the name as written, not the pod address


async def test_a_service_without_a_ready_endpoint_fails_naming_it_and_other_names_use_the_system_resolver() -> None:
    uri = "http://jwks:8000/jwks.json"
    with pytest.raises(JwksFetchError, match=r"jwks:8000/jwks.json: Service auth/jwks has no ready endpoint"):
        await JwksFetcher(timeout=2, names=names_for(jwks_service(1, ready=False), uri, "auth")).fetch(uri)
    body = jwks(key("ES256")).encode()
    async with serve(answering(body)) as (_, port):
        outside = f"http://localhost:{port}/k"  # no Service of that name: the system resolver has it
        assert await JwksFetcher(timeout=2, names=names_for(jwks_service(1), outside, "auth")).fetch(outside) == body


async def test_a_failed_endpoint_is_named_and_the_retry_takes_the_next() -> None:
    uri = "http://jwks.auth.svc.cluster.local:8000/jwks.json"
    body = jwks(key("ES256")).encode()
    with socket.socket() as bound:  # bound, never listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        dead = bound.getsockname()[1]
        async with serve(answering(body)) as (_, port):
            fetcher = JwksFetcher(timeout=2, names=names_for(jwks_service(dead, port), uri, "auth"))
            outcomes = []
            for _ in range(2):
                try:
                    outcomes.append(await fetcher.fetch(uri))
                except JwksFetchError as e:
                    outcomes.append(str(e).encode())
    assert body in outcomes
    failed = [o for o in outcomes if o != body]
    assert len(failed) == 1 and f"(Service endpoint 127.0.0.1:{dead})".encode() in failed[0], outcomes


async def test_https_to_a_service_name_verifies_the_name_not_the_endpoint(tmp_path: Path) -> None:
    name = "jwks.auth.svc.cluster.local"
    server_tls, ca_file = _self_signed(tmp_path, dns=name)
    sni: list[str | None] = []
    server_tls.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    body = jwks(key("EdDSA")).encode()
    async with serve(answering(body), tls=server_tls) as (_, port):
        uri = f"https://{name}:8000/jwks"
        fetcher = JwksFetcher(timeout=2, ca_file=str(ca_file), names=names_for(jwks_service(port), uri, "auth"))
        assert await fetcher.fetch(uri) == body
    assert sni == [name]


async def test_server_gone_after_first_fetch_cached_keys_still_verify() -> None:
    """The lab's acceptance case on loopback: JWKS served over HTTP, then the server stops."""
    k = key("RS256")
    clock = FakeClock(start=NOW)
    seen: list[bool] = []
    async with serve(answering(jwks(k).encode())) as (_, port):
        uri = f"http://127.0.0.1:{port}/jwks"
        rule = JwtRule(ISS, jwks_uri=uri)
        refresher = JwksRefresher(remote_uris([rule]), clock=clock, on_fetch=lambda _, ok: seen.append(ok))
        assert await refresher.refresh_due() == 1
    store = KeyStore(refresher.keys)
    token = RequestTokens([("authorization", f"Bearer {k.sign(claims())}")])
    assert isinstance(authenticate(token, [rule], store, clock()), Authenticated)
    clock.advance(REFRESH_INTERVAL)
    assert await refresher.refresh_due() == 1  # the server is gone: refused
    remote = refresher.remotes[uri]
    assert seen == [True, False] and (remote.fetch_ok, remote.fetch_failed) == (1, 1)
    assert str(port) in remote.last_error
    assert isinstance(authenticate(token, [rule], store, clock()), Authenticated)


async def test_run_loop_fetches_at_start_and_when_poked() -> None:
    clock = FakeClock()
    calls: list[float] = []

    async def fetch(uri: str) -> bytes:
        calls.append(clock())
        return jwks(key("ES384")).encode()

    refresher = JwksRefresher(["http://a/keys"], fetch=fetch, clock=clock)
    task = asyncio.create_task(refresher.run())
    try:
        await eventually_async(lambda: calls, 5, interval=0.01, what="the first fetch")
        clock.advance(REFRESH_INTERVAL)
        refresher.poke()
        await eventually_async(lambda: len(calls) >= 2, 5, interval=0.01, what="the refetch after the interval")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert calls == [1000.0, 1000.0 + REFRESH_INTERVAL]
