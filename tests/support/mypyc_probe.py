"""What the tests of the compiled build (ztunnel/compiled) share: the lines a `# <mark> <reason>` comment excuses
from a source rule, and a probe module compiled by the installed mypyc to record one of its known defects."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tokenize
from collections.abc import Callable
from pathlib import Path

import pytest


def excused_lines(source: str, mark: str) -> set[int]:
    """Lines carrying a `<mark> <reason>` comment with a reason (a bare mark excuses nothing)."""
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            at = tok.string.find(mark)
            if at >= 0 and tok.string[at + len(mark) :].strip():
                lines.add(tok.start[0])
    return lines


def _mypyc_missing() -> str | None:
    try:
        from ztunnel.compiled.build import BuildUnavailable, c_compiler, mypy_version

        mypy_version()
    except (ImportError, BuildUnavailable) as e:
        return str(e)
    return None if c_compiler() else "no C compiler"


def compile_probe(tmp_path: Path, module: str, source: str) -> dict[str, str]:
    """`module`.py compiled with mypyc in `tmp_path` (the test skips, saying why, where mypyc cannot compile);
    the environment to run it with from `tmp_path`."""
    why = _mypyc_missing()
    if why is not None:
        pytest.skip(f"mypyc cannot compile here: {why}")
    (tmp_path / f"{module}.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    build = subprocess.run(
        [sys.executable, "-m", "mypyc", f"{module}.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    return env


def compiled_module_findings(check: Callable[[str, str], list[str]]) -> list[str]:
    """`check(source, path)` over every module of ztunnel.compiled.MODULES, its findings together."""
    from ztunnel.compiled import MODULES, source_file

    root = Path(__file__).resolve().parents[2]
    found: list[str] = []
    for name in MODULES:
        rel = source_file(name)
        found += check((root / rel).read_text(), rel)
    return found
