"""The lab asks the CLI which components and flags exist, so it runs with whatever is built."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ztunnel.lab import components
from ztunnel.lab.components import Capabilities, _walk


def _caps(build: Callable[[Any], None]) -> Capabilities:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    build(sub)
    caps = Capabilities()
    _walk(parser, "", caps.commands)
    return caps


def test_finds_nested_subcommands_and_their_flags() -> None:
    def build(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        ca = sub.add_parser("ca").add_subparsers()
        ca.add_parser("init").add_argument("--dir")
        ca.add_parser("serve").add_argument("--listen")
        agent = sub.add_parser("node-agent")
        agent.add_argument("--proxy-socket")
        sub.add_parser("proxy").add_argument("--node")

    caps = _caps(build)
    assert caps.has("ca serve", "--listen") and caps.has("ca init")
    assert caps.flag("node-agent", "--inpod-socket", "--proxy-socket") == "--proxy-socket"
    assert caps.flag("node-agent", "--nope") is None
    available = caps.available()
    assert available["ca"] == "" and available["node-agent"] == ""
    assert "--inpod-socket" in available["proxy"]  # a proxy without in-pod mode is not enough
    assert "not built" in available["cni-plugin"]


def test_a_broken_cli_marks_every_component_unavailable() -> None:
    caps = Capabilities(problem="the ztunnel CLI could not be loaded (ImportError: x)")
    assert all("could not be loaded" in why for why in caps.available().values())


def test_this_checkout_is_inspected_without_error() -> None:
    caps = components.inspect()
    assert caps.problem == "" and "lab up" in caps.commands
    assert components.ztunnel_argv("version")[-2:] == ["ztunnel", "version"]
