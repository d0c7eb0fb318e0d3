"""`ztunnel convert` (legacy RBAC/authn -> current YAML) and `ztunnel authz check|validate`.

`authz check` answers with the same `PolicyEngine` the proxy uses: exit 0 allow, 1 deny, 2 error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ztunnel.errors import ZtunnelError


class PolicyCommandError(ZtunnelError):
    """A user error in a policy command (bad flag value, unknown pod)."""


def register(subparsers: Any) -> None:
    conv = subparsers.add_parser(
        "convert",
        help="convert legacy rbac.istio.io / authentication.istio.io objects to current Istio YAML",
        description="Print AuthorizationPolicy/PeerAuthentication/RequestAuthentication YAML equivalent to the "
        "legacy ServiceRole, ServiceRoleBinding, ClusterRbacConfig, Policy and MeshPolicy objects in the files. "
        "Services and pods in the same files are used to map services to workload selectors.",
    )
    conv.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE")
    conv.add_argument("--root-namespace", default="istio-system")
    conv.set_defaults(func=_convert)

    authz = subparsers.add_parser("authz", help="explain and validate authorization policies")
    sub = authz.add_subparsers(dest="authz_command", metavar="COMMAND")
    authz.set_defaults(func=lambda _a: authz.print_help() or 2)

    check = sub.add_parser(
        "check",
        help="would a connection (or request) be allowed? exit 0 allow, 1 deny, 2 error",
        description="Decide like the node proxy (--layer l4, default) or a waypoint (--layer l7) would.",
    )
    check.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE")
    check.add_argument(
        "--from", dest="source", required=True, metavar="SOURCE", help="spiffe://..., pod/NAMESPACE/NAME or plaintext"
    )
    check.add_argument("--source-ip", metavar="IP", help="the client's address (default: the source pod's IP)")
    check.add_argument("--to", dest="dest", required=True, metavar="DEST", help="pod/NAMESPACE/NAME or a pod IP")
    check.add_argument("--port", required=True, type=int, metavar="N", help="destination (target) port on the pod")
    check.add_argument("--layer", choices=["l4", "l7"], default="l4")
    check.add_argument("--method", default="GET")
    check.add_argument("--path", default="/")
    check.add_argument("--host", default="")
    check.add_argument("--header", action="append", default=[], metavar="K=V", help="request header (l7), repeatable")
    check.add_argument("--request-principal", metavar="ISS/SUB", help="principal of a validated JWT (l7)")
    check.add_argument("--claim", action="append", default=[], metavar="K=V", help="JWT claim (l7), repeatable")
    check.add_argument(
        "--jwt-claims",
        metavar="FILE-or-JSON",
        help="the validated JWT's claims as a JSON object (l7): nested and list claims, aud, azp; the request "
        "principal is iss/sub unless --request-principal is given",
    )
    check.add_argument(
        "--forwarded-for", metavar="IP,IP,...", help="X-Forwarded-For chain (l7; default: the --header of that name)"
    )
    check.add_argument(
        "--trusted-hops",
        type=int,
        default=0,
        metavar="N",
        help="trusted proxies in front (Istio numTrustedProxies): the client is the N-th X-Forwarded-For address "
        "from the right (l7; default 0: the connection's source)",
    )
    check.add_argument("--sni", metavar="NAME", help="TLS server name of the connection (l7, connection.sni)")
    check.add_argument("--root-namespace", default="istio-system")
    check.add_argument("--trust-domain", default="cluster.local")
    check.add_argument("-o", "--output", choices=["text", "json"], default="text")
    check.add_argument("-v", "--verbose", action="store_true", help="also list the policies that select DEST")
    check.set_defaults(func=_check)

    validate = sub.add_parser("validate", help="report invalid security objects; exit 2 if any")
    validate.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE")
    validate.add_argument("--root-namespace", default="istio-system")
    validate.set_defaults(func=_validate)


def _convert(args: argparse.Namespace) -> int:
    import yaml

    from ztunnel.config.loader import build_config, read_objects
    from ztunnel.policy.legacy import LEGACY_KINDS, convert_objects

    objects = read_objects(args.files)
    problems = suspicious_objects(objects)
    if problems:
        raise PolicyCommandError("\n".join(problems))
    legacy = [o for o in objects if o.kind in LEGACY_KINDS]
    if not legacy:
        raise PolicyCommandError(
            f"no legacy security objects (ServiceRole, ServiceRoleBinding, ClusterRbacConfig, RbacConfig, Policy, "
            f"MeshPolicy) in {', '.join(args.files)}; nothing to convert"
        )
    config = build_config(objects, root_namespace=args.root_namespace)
    result = convert_objects(legacy, config)
    if result.errors:
        raise PolicyCommandError(
            "cannot convert:\n" + "\n".join(f"  {e}" for e in result.errors) + "\nfix these objects and run again"
        )
    for warning in l7_warnings(result.converted):
        print(f"warning: {warning}", file=sys.stderr)
    out = []
    for note in result.notes:
        out.append(f"# note: {note}\n")
    docs = [yaml.safe_dump(o.body, sort_keys=False, default_flow_style=False) for o in result.objects]
    sys.stdout.write("".join(out) + "---\n".join(docs))
    return 0


def l7_warnings(converted: Any) -> list[str]:
    """Rules of the converted AuthorizationPolicies that use L7 attributes (methods, paths, headers, JWT
    claims, ...): the node proxy cannot check them, so until a waypoint serves the workload an ALLOW rule
    never matches and a DENY rule denies on its L4 part alone (DESIGN §4.5). Say so per object and field."""
    from ztunnel.config.loader import ConfigError
    from ztunnel.policy.authz import parse_authorization_policy

    out = []
    for obj, origin in converted:
        if obj.kind != "AuthorizationPolicy":
            continue
        try:
            policy = parse_authorization_policy(obj)
        except ConfigError:
            continue  # the convert errors report it
        for i, rule in enumerate(policy.rules):
            if not rule.l7_fields:
                continue
            effect = (
                "denies on its L4 part alone (more than the rule says)"
                if policy.action == "DENY"
                else "never matches (the traffic it allows is denied)"
            )
            out.append(
                f"{obj.ref} rule {i} (from {origin}) uses {', '.join(rule.l7_fields)}, which the node proxy cannot "
                f"enforce: there it {effect}; a waypoint enforces the whole rule once the workload uses one "
                "(label istio.io/use-waypoint)"
            )
    return out


_QUOTES = "\"'“”‘’"


def suspicious_objects(objects: Any) -> list[str]:
    """Security objects whose kind or apiVersion is wrapped in quotes copied from a web page (“Policy”).

    The loader skips kinds it does not know, so without this such a policy would be silently ignored."""
    from ztunnel.config.model import POLICY_KINDS

    out = []
    for o in objects:
        bare = o.kind.strip(_QUOTES)
        if bare != o.kind and bare in POLICY_KINDS:
            out.append(
                f"{o.source}: kind {o.kind} has quote characters around it, so the object is ignored; "
                f"write kind: {bare} (and check apiVersion and metadata for the same quotes)"
            )
    return out


def _split_kv(values: list[str], flag: str, *, join: bool = False) -> dict[str, str]:
    """KEY=VALUE flags; with `join`, a key given twice gets its values joined with "," (repeated headers)."""
    out: dict[str, str] = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k.strip():
            raise PolicyCommandError(f"{flag} {v!r}: expected KEY=VALUE")
        key = k.strip().lower() if join else k.strip()
        out[key] = f"{out[key]},{val}" if join and key in out else val
    return out


def _jwt_claims(raw: str | None) -> dict[str, Any]:
    """--jwt-claims: inline JSON (starting with "{") or a file holding it; must be a JSON object."""
    if raw is None:
        return {}
    text = raw
    if not raw.lstrip().startswith("{"):
        try:
            with open(raw, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            msg = f"--jwt-claims {raw}: cannot read ({e.strerror}); give a file or a JSON object"
            raise PolicyCommandError(msg) from None
    try:
        claims = json.loads(text)
    except ValueError as e:
        raise PolicyCommandError(f"--jwt-claims {raw[:60]}: not JSON ({e})") from None
    if not isinstance(claims, dict):
        raise PolicyCommandError(f"--jwt-claims {raw[:60]}: must be a JSON object of claims")
    return claims


def _request(args: argparse.Namespace) -> Any:
    """The HTTP request the l7 flags describe."""
    from ztunnel.policy.decision import HttpRequestAttributes, jwt_principal

    if args.trusted_hops < 0:
        raise PolicyCommandError(f"--trusted-hops {args.trusted_hops}: must be 0 or more")
    claims: dict[str, Any] = {**_jwt_claims(args.jwt_claims), **_split_kv(args.claim, "--claim")}
    principal = args.request_principal or jwt_principal(claims)
    xff = tuple(a.strip() for a in args.forwarded_for.split(",")) if args.forwarded_for else None
    return HttpRequestAttributes(
        method=args.method,
        path=args.path,
        host=args.host,
        headers=_split_kv(args.header, "--header", join=True),
        request_principal=principal,
        request_claims=claims,
        forwarded_for=xff,
        trusted_hops=args.trusted_hops,
        sni=args.sni,
    )


def _check(args: argparse.Namespace) -> int:
    from ztunnel.config.loader import load_files
    from ztunnel.config.model import normalize_ip
    from ztunnel.policy.decision import ConnectionAttributes
    from ztunnel.policy.engine import PolicyEngine

    if not 0 < args.port < 65536:
        raise PolicyCommandError(f"--port {args.port}: must be from 1 to 65535")
    config = load_files(args.files, root_namespace=args.root_namespace, trust_domain=args.trust_domain)
    engine = PolicyEngine.from_config(config)
    for err in engine.errors:
        print(f"warning: rejected {err}", file=sys.stderr)

    principal: str | None
    source_ip = args.source_ip or ""
    if args.source == "plaintext":
        principal = None
    elif args.source.startswith("spiffe://"):
        principal = args.source
    elif args.source.startswith("pod/"):
        src = _pod(config, args.source, "--from")
        principal = src.identity
        if not src.enrolled:
            principal = None
            print(f"note: source pod {src.ref} is not in the mesh, so it connects in plaintext", file=sys.stderr)
        source_ip = source_ip or (src.ips[0] if src.ips else "")
    else:
        raise PolicyCommandError(f"--from {args.source!r}: use spiffe://..., pod/NAMESPACE/NAME or plaintext")
    if source_ip:
        try:
            source_ip = normalize_ip(source_ip)
        except ValueError:
            raise PolicyCommandError(f"--source-ip {source_ip!r} is not an IP address") from None

    if args.dest.startswith("pod/"):
        dest = _pod(config, args.dest, "--to")
        dest_ip = dest.ips[0] if dest.ips else ""
    else:
        try:
            dest_ip = normalize_ip(args.dest)
        except ValueError:
            raise PolicyCommandError(f"--to {args.dest!r}: use pod/NAMESPACE/NAME or a pod IP") from None
        found = config.workload_by_ip(dest_ip)
        if found is None:
            svc = config.service_by_ip(dest_ip)
            if svc is not None:
                pods = ", ".join(f"pod/{w.ref}" for w in config.endpoints(svc)[:3]) or "none in the files"
                raise PolicyCommandError(
                    f"--to {args.dest} is the cluster IP of Service {svc.ref}; policies apply to its pods: "
                    f"give one of them ({pods})"
                )
            if dest_ip in config.conflicting_ips:
                raise PolicyCommandError(
                    f"--to {args.dest}: more than one pod claims this IP, so the proxy refuses traffic to it; "
                    "give the pod as pod/NAMESPACE/NAME or fix status.podIP"
                )
            raise PolicyCommandError(f"--to {args.dest}: no pod in {', '.join(args.files)} has this IP")
        dest = found

    if not dest.enrolled:
        print(
            f"note: destination pod {dest.ref} is not in the mesh, so nothing enforces policy for it yet; "
            "this is the decision it gets once enrolled (label istio.io/dataplane-mode=ambient)",
            file=sys.stderr,
        )
    attrs = ConnectionAttributes(principal, source_ip, dest, dest_ip, args.port)
    decision = engine.check_l7(attrs, _request(args)) if args.layer == "l7" else engine.check_l4(attrs)

    if args.output == "json":
        out: dict[str, Any] = {"decision": decision.verdict, "policy": decision.policy, "reason": decision.reason}
        if decision.custom_policies:  # the waypoint asks these providers first; their deny wins
            out["custom_policies"] = list(decision.custom_policies)
            out["custom_providers"] = list(decision.custom_providers)
        if decision.dry_run_allowed is not None:
            out["dry_run"] = {"decision": "allow" if decision.dry_run_allowed else "deny"}
            out["dry_run"]["matched"] = list(decision.dry_run_policies)
        if decision.audit_policies:
            out["audit_policies"] = list(decision.audit_policies)
        print(json.dumps(out))
    else:
        print(f"{decision.verdict.upper()}: {decision.reason}")
        if decision.policy:
            print(f"policy: {decision.policy}")
        if decision.dry_run_policies or decision.dry_run_allowed is not None:
            shadow = "allow" if decision.dry_run_allowed else "deny"
            print(f"dry-run: would {shadow} (matched: {', '.join(decision.dry_run_policies) or 'none'})")
        if decision.audit_policies:
            print(f"audit: {', '.join(decision.audit_policies)}")
        if decision.custom_policies:
            providers = ", ".join(decision.custom_providers)
            print(
                f"custom (ext-authz at the waypoint, asked before DENY/ALLOW; its deny wins): "
                f"{', '.join(decision.custom_policies)} (provider {providers})"
            )
        if args.verbose:
            mode, pa = engine.peer_authentication_for(dest, args.port)
            print(f"peer authentication for {dest.ref} port {args.port}: {mode} ({pa or 'mesh default'})")
            selected = engine.policies_for(dest, args.layer)
            print(f"policies selecting {dest.ref} at {args.layer}: {len(selected) or 'none'}")
            for p in selected:
                action = getattr(p, "action", "?")
                flags = " (dry-run)" if getattr(p, "dry_run", False) else ""
                if not hasattr(p, "rules"):
                    flags = " (invalid: denies until fixed)"
                print(f"  {action} {p.namespace}/{p.name}{flags}")
    return 0 if decision.allowed else 1


def _pod(config: Any, ref: str, flag: str) -> Any:
    parts = ref.split("/")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise PolicyCommandError(f"{flag} {ref!r}: expected pod/NAMESPACE/NAME")
    w = config.workload(parts[1], parts[2])
    if w is None:
        raise PolicyCommandError(f"{flag} {ref}: no such pod in the given files")
    return w


def _validate(args: argparse.Namespace) -> int:
    from ztunnel.config.loader import build_config, read_objects
    from ztunnel.policy.engine import PolicyEngine

    objects = read_objects(args.files)
    config = build_config(objects, root_namespace=args.root_namespace)
    engine = PolicyEngine.from_config(config)
    problems = [*(str(e) for e in engine.errors), *suspicious_objects(objects)]
    for w in engine.warnings:
        print(f"note: {w}", file=sys.stderr)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"ok: {len(config.policy_objects)} security objects are valid")
    return 0
