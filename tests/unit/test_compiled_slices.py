"""Two-bound slices in the compiled modules cannot meet mypyc's bytes-slice bug.

mypyc 2.4.1 slices `bytes` with `CPyBytes_GetSlice` (mypyc/lib-rt/bytes_ops.c): when the start, after clamping,
is past the end it passes a negative size to PyBytes_FromStringAndSize and raises SystemError instead of
answering b"" (`b"abcdef"[5:3]`, `b"abc"[-1:-3]`). The waypoint and HBONE layers slice bytes from peers: such a
SystemError kills a request, or a shared HBONE connection. So every two-bound slice in `MODULES` is written so
that start <= end by construction, in a form this test can see: no lower bound (or 0), an upper bound
`max(<the lower bound>, ...)`, a `memoryview(...)` being sliced (not affected), or a `# slice-ok: <why>` comment
on the slice's line saying why start <= end always holds there (e.g. `eol` was found searching from `pos`).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.mypyc_probe import compile_probe, compiled_module_findings, excused_lines

SLICE_OK = "# slice-ok:"


def _safe_by_form(node: ast.Subscript, lower: ast.expr, upper: ast.expr) -> bool:
    if isinstance(lower, ast.Constant) and lower.value == 0:
        return True
    if (
        isinstance(upper, ast.Call)
        and isinstance(upper.func, ast.Name)
        and upper.func.id == "max"
        and upper.args
        and ast.dump(upper.args[0]) == ast.dump(lower)
    ):
        return True
    value = node.value
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "memoryview"


def unguarded_slices(source: str, filename: str) -> list[str]:
    """`file:line: [lower:upper]` for each two-bound slice whose start <= end this test cannot see."""
    ok_lines = excused_lines(source, SLICE_OK)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Subscript) or not isinstance(node.slice, ast.Slice):
            continue
        lower, upper = node.slice.lower, node.slice.upper
        if lower is None or upper is None or _safe_by_form(node, lower, upper):
            continue
        span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if any(line in ok_lines for line in span):
            continue
        found.append((node.lineno, f"{filename}:{node.lineno}: {ast.unparse(node)}"))
    return [text for _, text in sorted(found)]


def test_the_checker_sees_each_form() -> None:
    source = (
        "a = b[i:j]\n"  # flagged
        "c = b[i:]\n"
        "d = b[:j]\n"
        "e = b[0:j]\n"
        "f = b[i : max(i, j)]\n"
        "g = b[i : max(k, j)]\n"  # flagged: the max does not hold the lower bound
        "h = memoryview(b)[i:j]\n"
        "k = b[i:j]  # slice-ok: j was found searching from i\n"
        "m = b[i:j]  # slice-ok:\n"  # flagged: no reason
        "n = b[\n    i : j  # slice-ok: j >= i\n]\n"
    )
    assert unguarded_slices(source, "x.py") == ["x.py:1: b[i:j]", "x.py:6: b[i:max(k, j)]", "x.py:9: b[i:j]"]


def test_every_two_bound_slice_in_the_compiled_modules_is_guarded() -> None:
    found = compiled_module_findings(unguarded_slices)
    assert not found, (
        "two-bound slices whose start <= end is not shown (mypyc 2.4.1 raises SystemError on a bytes slice with "
        "start > end instead of answering b''): write the upper bound as max(<lower>, ...), slice a "
        "memoryview(...), or say on the line why it holds with `# slice-ok: <reason>`:\n  " + "\n  ".join(found)
    )


PROBE = "def cut(b: bytes, i: int, j: int) -> bytes:\n    return b[i:j]\n"


def test_the_installed_mypyc_still_has_the_bytes_slice_bug(tmp_path: Path) -> None:
    """Records what the installed mypyc does with `bytes[i:j]`, start > end: a 2-line module compiled here."""
    env = compile_probe(tmp_path, "slprobe", PROBE)
    shutil.rmtree(tmp_path / "build", ignore_errors=True)
    check = (
        "import slprobe\n"
        "assert slprobe.__file__.endswith('.so'), slprobe.__file__\n"
        "for b, i, j in ((b'abcdef', 5, 3), (b'abc', -1, -3), (b'abcdef', 2, 4)):\n"
        "    try:\n"
        "        print(repr(slprobe.cut(b, i, j)))\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    from mypy.version import __version__ as version

    assert run.stdout.split() == ["SystemError", "SystemError", "b'cd'"], (
        f"mypyc {version} now slices bytes with start > end as {run.stdout.split()[:2]} (was SystemError, "
        "SystemError in 2.4.1). If both are b'', the bug is fixed: require that mypyc version in the build "
        "(ztunnel/compiled/build.py, pyproject), then the slice guards test_every_two_bound_slice_... asks for "
        "may go, and update this test to assert the fixed behaviour."
    )
