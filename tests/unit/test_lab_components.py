"""The lab asks the CLI which components and flags exist; `lab up` runs all of them or names what is missing."""

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
    assert "not installed" in available["cni-plugin"]


def test_a_broken_cli_marks_every_component_unavailable() -> None:
    caps = Capabilities(problem="the ztunnel CLI could not be loaded (ImportError: x)")
    assert all("could not be loaded" in why for why in caps.available().values())


def _this_cli() -> Any:
    """The subcommand table `ztunnel lab` hands to the lab: the one it is registered in."""
    from ztunnel.cli import build_parser

    return components.subcommands(build_parser())


def test_this_checkout_is_inspected_without_error() -> None:
    caps = components.inspect(_this_cli())
    assert caps.problem == "" and "lab up" in caps.commands
    assert components.ztunnel_argv("version")[-2:] == ["ztunnel", "version"]


def test_the_lab_gets_the_cli_it_is_registered_in() -> None:
    """`ztunnel lab ...` hands the lab its CLI's subcommands; the lab never imports the CLI root itself."""
    from ztunnel.cli import build_parser

    args = build_parser().parse_args(["lab", "status", "--name", "x"])
    caps = components.inspect(args.cli_commands)
    assert caps.problem == "" and caps.has("proxy", "--inpod-socket") and caps.has("ca serve")
    assert "could not" not in " ".join(caps.available().values())


def test_without_the_cli_no_component_runs_and_the_reason_says_how_to_run_it() -> None:
    caps = components.inspect(None)
    assert all("ztunnel lab" in why for why in caps.available().values())


def _parse(*argv: str) -> argparse.Namespace:
    from ztunnel.lab import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    return parser.parse_args(["lab", "up", "-f", "c.yaml", *argv])


def test_lab_up_runs_the_whole_mesh_unless_told_otherwise() -> None:
    assert _parse().mesh == "on"  # never a cluster without mTLS by default
    assert _parse("--mesh", "auto").mesh == "auto" and _parse("--mesh", "off").mesh == "off"


def _lab() -> Any:
    from pathlib import Path

    from ztunnel.lab.cluster import Lab

    said: list[str] = []
    lab = Lab("t", Path("/nonexistent/ztunnel-lab-test"), progress=said.append)
    return lab, said


def _all_but_proxy() -> Capabilities:
    caps = Capabilities(cni_plugin=True)
    caps.commands = {"ca init": set(), "ca serve": set(), "node-agent": set(), "proxy": {"--node"}}
    return caps


def test_mesh_on_names_the_missing_component_and_what_to_do() -> None:
    import pytest

    from ztunnel.lab.model import LabError

    lab, _ = _lab()
    with pytest.raises(LabError) as e:
        lab._choose_components(_all_but_proxy(), "on")
    msg = str(e.value)
    assert "proxy: `ztunnel proxy` has no --inpod-socket" in msg
    assert "--mesh auto" in msg  # the opt-in way around it


def test_mesh_on_with_a_broken_cli_is_an_error_not_a_smaller_lab() -> None:
    import pytest

    from ztunnel.lab.model import LabError

    lab, _ = _lab()
    with pytest.raises(LabError, match="could not be loaded"):
        lab._choose_components(Capabilities(problem="the ztunnel CLI could not be loaded (ImportError: x)"), "on")


def test_mesh_auto_is_the_opt_in_that_skips_and_says_so() -> None:
    lab, said = _lab()
    chosen = lab._choose_components(_all_but_proxy(), "auto")
    assert chosen == {"ca": True, "node-agent": False, "proxy": False, "cni-plugin": False}
    assert any("skipping proxy" in m for m in said)


def test_this_checkout_runs_every_component() -> None:
    lab, _ = _lab()
    assert all(lab._choose_components(components.inspect(_this_cli()), "on").values())


def test_the_lab_never_imports_the_cli_root() -> None:
    """lab/ is a top layer: it may use every concern below it, but not `ztunnel.cli`, which imports the lab."""
    import ast
    from pathlib import Path

    offenders = []
    for f in sorted(Path(components.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(m == "ztunnel.cli" or m.startswith("ztunnel.cli.") for m in modules):
                offenders.append(f"{f.name}:{node.lineno}")
    assert offenders == []
