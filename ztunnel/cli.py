"""The `ztunnel` command: one subcommand per component, kubectl/istioctl-style flags.

Each concern registers its own subcommands (`register(subparsers)` in its `commands` module) and
imports what it needs only when it runs, so `ztunnel --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ztunnel import __version__
from ztunnel.errors import ZtunnelError
from ztunnel.telemetry.logs import configure_logging

COMMAND_MODULES = (
    "ztunnel.identity.commands",
    "ztunnel.proxy.commands",
    "ztunnel.policy.commands",
    "ztunnel.redirect.commands",
    "ztunnel.lab.commands",
    "ztunnel.demo",
)


GLOBAL_FLAGS = ("--log-level", "--log-format")


def hoist_global_flags(argv: Sequence[str]) -> list[str]:
    """Move the global flags to the front, so they work after the subcommand too (`ztunnel lab up
    --log-level debug`, as kubectl and istioctl allow). Nothing after a `--` is touched."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_FLAGS:
            if "=" in arg or i + 1 >= len(argv):
                front.append(arg)
            else:
                front.extend(argv[i : i + 2])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztunnel",
        description="An ambient-style service mesh node proxy: mTLS, SPIFFE identities and authorization.",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="one event per line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _args: print(__version__) or 0)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that component is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(hoist_global_flags(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except ZtunnelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
