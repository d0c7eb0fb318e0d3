"""`ztunnel ca ...`: create a CA, issue and revoke SVIDs, serve the certificate API."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

from ztunnel.config.kube.source import add_source_arguments
from ztunnel.errors import ZtunnelError


class CommandError(ZtunnelError):
    pass


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = subparsers.add_parser("ca", help="the certificate authority: init, issue, serve, revoke")
    sub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND")
    def usage(_args: argparse.Namespace) -> int:
        ca.print_help()
        return 2

    ca.set_defaults(func=usage)

    init = sub.add_parser("init", help="create a root and an intermediate (or an intermediate under your root)")
    init.add_argument("--dir", required=True, help="the CA directory (Istio plugged-in CA file names)")
    init.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    init.add_argument("--root-cert", help="your root certificate (PEM) to sign the intermediate with")
    init.add_argument("--root-key", help="the key of --root-cert (unencrypted PEM, ECDSA)")
    init.add_argument("--force", action="store_true", help="replace an existing CA in --dir")
    init.set_defaults(func=_init)

    issue = sub.add_parser("issue", help="issue an SVID to files (for operators and tests)")
    issue.add_argument("--dir", required=True, help="the CA directory")
    issue.add_argument("--id", required=True, help="spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
    issue.add_argument("--ttl", default="24h", help="validity, e.g. 24h, 30m, 6s (bounded by --max-ttl)")
    issue.add_argument("--max-ttl", default="168h", help="the CA's maximum validity (default 168h)")
    issue.add_argument("--cert-out", required=True, help="write the leaf then the chain up to the root here")
    issue.add_argument("--key-out", required=True, help="write the private key here (mode 0600)")
    issue.add_argument("--bundle-out", help="write the trust bundle (roots) here")
    issue.set_defaults(func=_issue)

    serve = sub.add_parser("serve", help="serve the Istio certificate API (gRPC over TLS) with node authorization")
    serve.add_argument(
        "--dir",
        help="the CA directory; with --source kubernetes: the operator's mounted cacerts Secret (Istio's file "
        "names), used when it holds ca-cert.pem and ca-key.pem, else the CA is kept in --ca-secret",
    )
    serve.add_argument("-f", "--file", dest="files", action="append", help="config YAML (repeatable), watched")
    # No --root-namespace: the CA reads pods and namespaces only (node authorization), never policies or the
    # mesh config, so a root namespace would change nothing it does.
    add_source_arguments(serve, root_namespace=False)
    serve.add_argument("--listen", default="127.0.0.1:15012", help="HOST:PORT (default 127.0.0.1:15012)")
    serve.add_argument(
        "--node-tokens", help="YAML mapping token: node-name (mode 0600), reloaded on change (file source)"
    )
    serve.add_argument(
        "--dns-name", dest="dns_names", action="append", default=[], help="extra DNS name or IP for the server cert"
    )
    serve.add_argument("--default-ttl", default="24h", help="validity when the request asks for none")
    serve.add_argument("--max-ttl", default="168h", help="upper bound on any SVID's validity (default 168h)")
    kube = serve.add_argument_group("with --source kubernetes")
    kube.add_argument(
        "--token-audience",
        default="istio-ca",
        help="audience the callers' projected service-account tokens must carry (TokenReview; default istio-ca)",
    )
    kube.add_argument(
        "--node-proxy-account",
        dest="node_proxy_accounts",
        action="append",
        default=[],
        metavar="NS/SA",
        help="service account of the node proxies, which may have the identities of every pod on their node "
        "(repeatable; default <CA namespace>/ztunnel); any other caller gets only its own identity",
    )
    kube.add_argument(
        "--ca-secret", default="istio-ca-secret", help="Secret that keeps the generated CA (default istio-ca-secret)"
    )
    kube.add_argument("--ca-namespace", help="namespace of --ca-secret (default: the CA's service account's)")
    kube.add_argument(
        "--root-configmap",
        default="istio-ca-root-cert",
        help="ConfigMap holding the trust bundle (key root-cert.pem) in every namespace (default istio-ca-root-cert)",
    )
    kube.add_argument(
        "--crl-configmap",
        default="ztunnel-ca-crl",
        help="ConfigMap beside it with the CRLs (crl.der, number, issuer-chain.pem, retired-N.der), in every "
        "namespace once something is revoked (default ztunnel-ca-crl)",
    )
    kube.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    kube.add_argument("--readiness-addr", help="HOST:PORT for /healthz/ready (200 once serving with pods listed)")
    kube.add_argument("--metrics-addr", help="HOST:PORT for /metrics (certificates issued/refused, token reviews)")
    serve.set_defaults(func=_serve)

    revoke = sub.add_parser("revoke", help="put a certificate serial on the CA's CRL (crl.pem)")
    revoke.add_argument("--dir", required=True, help="the CA directory")
    revoke.add_argument(
        "--serial", dest="serials", action="append", required=True, help="serial in hex (as `openssl x509 -serial`)"
    )
    revoke.set_defaults(func=_revoke)


def parse_serial(text: str) -> int:
    """Hex, as openssl prints it: `1A2B...`, `0x1a2b`, or `1a:2b:...`."""
    s = text.strip().lower().removeprefix("serial=").removeprefix("0x").replace(":", "")
    try:
        value = int(s, 16)
    except ValueError:
        raise CommandError(f"--serial {text!r}: not a hex serial; copy it from `openssl x509 -noout -serial`") from None
    if value <= 0:
        raise CommandError(f"--serial {text!r}: a certificate serial is positive")
    return value


def _init(args: argparse.Namespace) -> int:
    from ztunnel.identity.ca import init_ca_dir

    d = init_ca_dir(
        args.dir,
        trust_domain=args.trust_domain,
        root_cert_file=args.root_cert,
        root_key_file=args.root_key,
        force=args.force,
    )
    print(f"CA created in {d} (trust domain {args.trust_domain}); trust bundle: {d / 'root-cert.pem'}")
    return 0


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _issue(args: argparse.Namespace) -> int:
    from ztunnel.identity.ca import CertificateAuthority
    from ztunnel.identity.certs import generate_key, key_to_pem, make_csr
    from ztunnel.identity.duration import parse_duration
    from ztunnel.identity.spiffe import SpiffeId

    identity = SpiffeId.parse(args.id)
    ttl = parse_duration(args.ttl)
    ca = CertificateAuthority.load(args.dir, max_ttl=parse_duration(args.max_ttl))
    key = generate_key()
    chain = ca.sign_csr(make_csr(key, identity), ttl=ttl, expected_identity=identity)
    try:
        Path(args.cert_out).write_bytes(b"".join(chain))
        _write_private(Path(args.key_out), key_to_pem(key))
        if args.bundle_out:
            Path(args.bundle_out).write_bytes(ca.roots_pem)
    except OSError as e:
        raise CommandError(f"{e.filename}: cannot write ({e.strerror})") from e
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(chain[0]).serial_number
    print(f"issued {identity} to {args.cert_out} (key {args.key_out}), serial {serial:x}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from ztunnel.identity.ca import CRL, CertificateAuthority

    serials = [parse_serial(s) for s in args.serials]
    ca = CertificateAuthority.load(args.dir)
    revoked = ca.revoke(serials)
    print(f"revoked {', '.join(f'{s:x}' for s in serials)}; {ca.directory / CRL} lists {len(revoked)} serial(s)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from ztunnel.config.kube.source import open_source
    from ztunnel.identity.authz import NodeTokens, load_node_tokens
    from ztunnel.identity.ca import CertificateAuthority
    from ztunnel.identity.duration import parse_duration
    from ztunnel.identity.server import run_ca_server, split_host_port

    split_host_port(args.listen)  # report a bad --listen before anything else
    default_ttl = parse_duration(args.default_ttl)
    if args.source == "kubernetes":
        return _serve_kubernetes(args, default_ttl)
    for flag in ("dir", "node_tokens"):
        if not getattr(args, flag):
            raise CommandError(f"--{flag.replace('_', '-')} is required (unless --source kubernetes)")
    ca = CertificateAuthority.load(args.dir, max_ttl=parse_duration(args.max_ttl))
    tokens = NodeTokens(load_node_tokens(args.node_tokens))
    source = open_source(args, trust_domain=ca.trust_domain)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_ca_server(
            ca,
            tokens,
            args.files,
            source=source,
            listen=args.listen,
            dns_names=args.dns_names,
            default_ttl=default_ttl,
            stop=stop,
            token_file=args.node_tokens,
        )

    asyncio.run(main())
    return 0


def _serve_kubernetes(args: argparse.Namespace, default_ttl: dt.timedelta) -> int:
    import asyncio
    import signal

    from ztunnel.config.kube.client import from_kubeconfig, in_cluster
    from ztunnel.identity.duration import parse_duration
    from ztunnel.identity.kube import KubeCASettings, run_kube_ca_server
    from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError
    from ztunnel.net.http import parse_host_port

    if args.files or args.node_tokens:
        raise CommandError("-f and --node-tokens are for the file source; --source kubernetes reads the API")
    for account in args.node_proxy_accounts:
        ns, _, sa = account.partition("/")
        if not ns or not sa or "/" in sa:
            raise CommandError(f"--node-proxy-account {account!r}: expected NAMESPACE/SERVICEACCOUNT")
    try:
        SpiffeId.parse(f"spiffe://{args.trust_domain}/ns/default/sa/default")
    except SpiffeIdError as e:
        raise CommandError(f"--trust-domain {args.trust_domain!r}: {e}") from None
    addrs: dict[str, tuple[str, int] | None] = {}
    for flag in ("readiness_addr", "metrics_addr"):
        value = getattr(args, flag)
        try:
            addrs[flag] = parse_host_port(value) if value else None
        except ValueError as e:
            raise CommandError(f"--{flag.replace('_', '-')}: {e}") from None
    settings = KubeCASettings(
        mounted=Path(args.dir) if args.dir else None,
        secret=args.ca_secret,
        namespace=args.ca_namespace,
        root_configmap=args.root_configmap,
        crl_configmap=args.crl_configmap,
        trust_domain=args.trust_domain,
        audience=args.token_audience,
        node_proxy_accounts=tuple(args.node_proxy_accounts),
        listen=args.listen,
        dns_names=tuple(args.dns_names),
        default_ttl=default_ttl,
        max_ttl=parse_duration(args.max_ttl),
        readiness_addr=addrs["readiness_addr"],
        metrics_addr=addrs["metrics_addr"],
    )
    endpoint = from_kubeconfig(args.kubeconfig) if args.kubeconfig else in_cluster()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_kube_ca_server(endpoint, settings, stop)

    asyncio.run(main())
    return 0
