"""`ztunnel ca ...`: create a CA, issue and revoke SVIDs, serve the certificate API."""

from __future__ import annotations

import argparse
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
    serve.add_argument("--dir", required=True, help="the CA directory")
    serve.add_argument("-f", "--file", dest="files", action="append", help="config YAML (repeatable), watched")
    add_source_arguments(serve)
    serve.add_argument("--listen", default="127.0.0.1:15012", help="HOST:PORT (default 127.0.0.1:15012)")
    serve.add_argument(
        "--node-tokens", required=True, help="YAML mapping token: node-name (mode 0600), reloaded on change"
    )
    serve.add_argument(
        "--dns-name", dest="dns_names", action="append", default=[], help="extra DNS name or IP for the server cert"
    )
    serve.add_argument("--default-ttl", default="24h", help="validity when the request asks for none")
    serve.add_argument("--max-ttl", default="168h", help="upper bound on any SVID's validity (default 168h)")
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
