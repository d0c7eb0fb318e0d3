"""The `ztunnel` command: one subcommand per component, kubectl/istioctl-style flags.

Each concern registers its own subcommands (`register(subparsers)` in its `commands` module) and
imports what it needs only when it runs, so `ztunnel --help` stays fast.

`--log-format json` makes every line the process writes to stderr a JSON event: the logs, a command-line
error, a fatal error and an unexpected exception (and the proxy's access log follows it unless
`--access-log` says otherwise), so a log shipper never meets a line it cannot parse.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from ztunnel import __version__
from ztunnel.errors import ZtunnelError
from ztunnel.telemetry.logs import configure_logging

log = logging.getLogger("ztunnel.cli")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

COMMAND_MODULES = (
    "ztunnel.identity.commands",
    "ztunnel.proxy.commands",
    "ztunnel.waypoint.commands",
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


def global_flag(argv: Sequence[str], name: str, choices: Sequence[str]) -> str | None:
    """The value of a global flag in hoisted `argv` (the last one wins, as with argparse), or None if it is
    absent or not one of `choices` (argparse will then say so). Read before parsing, so the parser's own
    errors already come out in the chosen log format."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(argv):
            value = argv[i + 1]
    return value if value in choices else None


class CliParser(argparse.ArgumentParser):
    """An argument parser whose errors are a log event when `log_errors` is set (with `--log-format json`):
    argparse would print its usage and the error as two lines of text."""

    log_errors = False

    def error(self, message: str) -> NoReturn:
        if not self.log_errors:
            super().error(message)
        log.error("%s: %s", self.prog, message, extra={"usage": " ".join(self.format_usage().split())})
        sys.exit(2)


def _log_errors(parser: argparse.ArgumentParser) -> None:
    """Set `log_errors` on `parser` and every subcommand's parser under it."""
    if isinstance(parser, CliParser):
        parser.log_errors = True
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _log_errors(sub)


def _print_version(_args: argparse.Namespace) -> int:
    from ztunnel.compiled import status

    print(__version__)
    print(f"compiled modules: {status()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="ztunnel",
        description="An ambient-style service mesh node proxy: mTLS, SPIFFE identities and authorization.",
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="one event per line; json makes every line on stderr JSON, fatal errors included",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser("version", help="print the version, and whether the hot modules run compiled (mypyc)")
    version.set_defaults(func=_print_version)
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
    argv = hoist_global_flags(sys.argv[1:] if argv is None else argv)
    as_json = global_flag(argv, "--log-format", LOG_FORMATS) == "json"
    parser = build_parser()
    if as_json:
        configure_logging(global_flag(argv, "--log-level", LOG_LEVELS) or "info", "json")
        logging.captureWarnings(True)  # a Python warning is a log event too, not two lines of text
        _log_errors(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except ZtunnelError as e:
        if as_json:
            log.error("%s", e, extra={"exit_code": 2})
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        if not as_json:
            raise
        log.critical("unexpected error", exc_info=True, extra={"exit_code": 1})
        return 1
