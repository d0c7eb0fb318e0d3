"""Which mesh components this checkout can run, and the command lines that start them in the lab.

The lab runs the project's own CLI (`python -m ztunnel ...`) for the CA, node agents and proxies. It reads the
CLI's subcommand table (handed in by `ztunnel lab`, which is registered in it: the lab never imports the CLI
root) to learn which subcommands and flags exist, so it passes only flags a component understands and can say
which component is missing or broken: an error with `lab up --mesh on` (the default), a skipped component
only with `--mesh auto`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

COMPONENTS = ("ca", "node-agent", "proxy", "cni-plugin")


@dataclass
class Capabilities:
    """Subcommands ("proxy", "ca serve") mapped to the option strings they accept."""

    commands: dict[str, set[str]] = field(default_factory=dict)
    cni_plugin: bool = False
    problem: str = ""  # why the CLI could not be inspected, if it could not

    def has(self, command: str, *flags: str) -> bool:
        opts = self.commands.get(command)
        return opts is not None and all(f in opts for f in flags)

    def flag(self, command: str, *candidates: str) -> str | None:
        """The first of CANDIDATES the command accepts (components name the same thing differently)."""
        opts = self.commands.get(command, set())
        return next((c for c in candidates if c in opts), None)

    def available(self) -> dict[str, str]:
        """Component -> "" if it can run, else the reason it cannot."""
        out: dict[str, str] = {}
        out["ca"] = "" if self.has("ca init") and self.has("ca serve") else "`ztunnel ca init/serve` not built yet"
        out["node-agent"] = "" if self.has("node-agent") else "`ztunnel node-agent` not built yet"
        if not self.has("proxy"):
            out["proxy"] = "`ztunnel proxy` not built yet"
        elif not self.has("proxy", "--inpod-socket"):
            out["proxy"] = "`ztunnel proxy` has no --inpod-socket (in-pod mode) yet"
        else:
            out["proxy"] = ""
        out["cni-plugin"] = "" if self.cni_plugin else f"ztunnel-cni ({cni_plugin_path()}) not installed"
        if self.problem:  # nothing runs without the CLI, whatever else is installed
            out = dict.fromkeys(out, self.problem)
        return out


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommand table (name -> parser)."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update(action.choices)
    return out


def _walk_table(table: Mapping[str, argparse.ArgumentParser], prefix: str, out: dict[str, set[str]]) -> None:
    for name, sub in table.items():
        key = f"{prefix} {name}".strip()
        out[key] = {o for a in sub._actions for o in a.option_strings}
        _walk(sub, key, out)


def _walk(parser: argparse.ArgumentParser, prefix: str, out: dict[str, set[str]]) -> None:
    _walk_table(subcommands(parser), prefix, out)


def inspect(cli: Mapping[str, argparse.ArgumentParser] | None) -> Capabilities:
    """What the CLI with the subcommand table CLI can run (`ztunnel lab` hands in the table it is registered in);
    without a table nothing runs, and the reason says how to run the lab."""
    caps = Capabilities()
    if cli is None:
        caps.problem = "the ztunnel CLI's subcommands were not handed to the lab (run it as `ztunnel lab ...`)"
    else:
        _walk_table(cli, "", caps.commands)
    try:
        modules = all(importlib.util.find_spec(m) is not None for m in ("ztunnel.cni.plugin", "ztunnel.cni.installer"))
    except ImportError:
        modules = False
    caps.cni_plugin = modules and os.access(cni_plugin_path(), os.X_OK)
    return caps


def cni_plugin_path() -> Path:
    """The `ztunnel-cni` console script of this interpreter's environment (the lab installs it on each node)."""
    return Path(sys.executable).parent / "ztunnel-cni"


def ztunnel_argv(*args: str) -> list[str]:
    """The project's CLI run by this interpreter, so the lab's processes use the same checkout and venv."""
    return [sys.executable, "-m", "ztunnel", *args]
