"""The compiled modules' coroutines avoid the two places where mypyc 2.4.1's exception state is not CPython's.

Compiled, a coroutine has no frame of its own exception state: mypyc keeps `sys.exc_info()` in the thread.
1. A `try` whose `finally` awaits (mypyc/irbuild/statement.py, transform_try_finally_stmt_async) ends by
   re-raising whatever `sys.exc_info()` holds, even after the try ended normally; and when the try is left by
   an exception, that exception stays in the thread's `sys.exc_info()` after the coroutine is gone. So one
   such `finally` left by a cancellation makes the next one, in any task, end in that CancelledError
   (the waypoint's 504 path, 67c3743), and one run inside an `except` block re-raises what that block handled.
2. An `except` block that awaits leaves its exception in the thread while it waits, and restores at its end
   what was there when it began: two such blocks of two tasks interleaved leave the first one's exception in
   `sys.exc_info()` for good (every later exception's `__context__`, a bare `raise`, rule 1's re-raise), and a
   bare `raise` after the await re-raises the other task's exception.
So in `MODULES`: no `finally` that awaits (the 67c3743 form: `except BaseException as e: failed = e`, the
cleanup, then `raise failed`), and no await inside an `except` block (set a variable there, await after it).
A line may say why a case is safe with `# mypyc-ok: <reason>`. The probe test below records what the
installed mypyc does, so that a fixed mypyc is noticed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.mypyc_probe import compile_probe, compiled_module_findings, excused_lines

OK_MARK = "# mypyc-ok:"
_AWAITS = (ast.Await, ast.AsyncWith, ast.AsyncFor)


def _awaits(body: list[ast.stmt]) -> list[int]:
    """Lines of the awaits in `body`, not counting those of functions defined in it."""
    found: list[int] = []
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, _AWAITS):
            found.append(node.lineno)
        todo.extend(ast.iter_child_nodes(node))
    return sorted(found)


def risky_awaits(source: str, filename: str) -> list[str]:
    """`file:line: what` for each `finally` that awaits and each await in an `except` block of a coroutine."""
    ok = excused_lines(source, OK_MARK)
    found: list[tuple[int, str]] = []
    for fn in ast.walk(ast.parse(source, filename)):
        if not isinstance(fn, ast.AsyncFunctionDef):
            continue
        todo: list[ast.AST] = list(fn.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                continue  # a nested coroutine is walked as its own
            todo.extend(ast.iter_child_nodes(node))
            if isinstance(node, ast.Try | ast.TryStar):
                lines = _awaits(node.finalbody)
                if lines and not ok.intersection(lines):
                    at = node.finalbody[0].lineno
                    found.append((at, f"{filename}:{at}: {fn.name}: a finally that awaits (line {lines[0]})"))
            elif isinstance(node, ast.ExceptHandler):
                lines = _awaits(node.body)
                if lines and node.lineno not in ok and not ok.intersection(lines):
                    what = ast.unparse(node.type) if node.type is not None else ""
                    found.append(
                        (node.lineno, f"{filename}:{node.lineno}: {fn.name}: except {what} awaits (line {lines[0]})")
                    )
    return [text for _, text in sorted(found)]


def test_the_checker_sees_each_form() -> None:
    source = (
        "async def f():\n"
        "    try:\n"
        "        await a()\n"
        "    finally:\n"
        "        await b()\n"  # flagged: a finally that awaits
        "    try:\n"
        "        await a()\n"
        "    except E:\n"
        "        await b()\n"  # flagged: an except block that awaits
        "    try:\n"
        "        await a()\n"
        "    except BaseException as e:\n"
        "        failed = e\n"
        "    await b()\n"
        "    try:\n"
        "        pass\n"
        "    finally:\n"
        "        async def g():\n"
        "            await c()\n"
        "    try:\n"
        "        pass\n"
        "    except E:\n"
        "        await b()  # mypyc-ok: never suspends\n"
        "def h():\n"
        "    try:\n"
        "        pass\n"
        "    finally:\n"
        "        x()\n"
    )
    assert risky_awaits(source, "x.py") == [
        "x.py:5: f: a finally that awaits (line 5)",
        "x.py:8: f: except E awaits (line 9)",
    ]


def test_no_coroutine_of_the_compiled_modules_awaits_in_a_finally_or_an_except_block() -> None:
    found = compiled_module_findings(risky_awaits)
    assert not found, (
        "compiled by mypyc 2.4.1, these re-raise or leak a stale exception (see this test's docstring): move the "
        "awaiting cleanup after an `except BaseException as e: failed = e` (then `raise failed`), and an except "
        "block's await after the block (or say why it is safe: `# mypyc-ok: <reason>`):\n  " + "\n  ".join(found)
    )


PROBE = '''
import asyncio
import sys


async def finally_await_in_except() -> str:
    try:
        raise ValueError("handled")
    except ValueError:
        try:
            await asyncio.sleep(0)
        finally:
            await asyncio.sleep(0)
    return "returned"


async def finally_await_cancelled(gate: asyncio.Future[None]) -> None:
    try:
        await gate
    finally:
        await asyncio.sleep(0)


async def except_await(exc: Exception, gate: asyncio.Future[None]) -> str:
    try:
        raise exc
    except (KeyError, LookupError):
        await gate
    return "handled"
'''

DRIVE = '''
import asyncio, sys
import cprobe_async as p
assert p.__file__.endswith(".so"), p.__file__


def outcome(t: asyncio.Task) -> str:
    if t.cancelled():
        return "CancelledError"
    return type(t.exception()).__name__ if t.exception() is not None else repr(t.result())


async def main() -> None:
    loop = asyncio.get_running_loop()
    t = loop.create_task(p.finally_await_in_except())
    await asyncio.wait([t])
    print("in-except", outcome(t))
    gate = loop.create_future()
    t = loop.create_task(p.finally_await_cancelled(gate))
    await asyncio.sleep(0)
    t.cancel()
    await asyncio.wait([t])
    print("left-by-cancel", type(sys.exc_info()[1]).__name__)
    ga, gb = loop.create_future(), loop.create_future()
    a = loop.create_task(p.except_await(KeyError("a"), ga))
    await asyncio.sleep(0)
    b = loop.create_task(p.except_await(LookupError("b"), gb))
    await asyncio.sleep(0)
    ga.set_result(None)
    await asyncio.wait([a])
    gb.set_result(None)
    await asyncio.wait([b])
    print("interleaved", repr(sys.exc_info()[1]))


asyncio.run(main())
'''


def test_the_installed_mypyc_still_mishandles_exception_state_in_coroutines(tmp_path: Path) -> None:
    env = compile_probe(tmp_path, "cprobe_async", PROBE)
    run = subprocess.run(
        [sys.executable, "-c", DRIVE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    from mypy.version import __version__ as version

    # CPython: in-except 'returned', left-by-cancel NoneType, interleaved None.
    assert run.stdout.splitlines() == [
        "in-except ValueError",
        "left-by-cancel CancelledError",
        "interleaved KeyError('a')",
    ], (
        f"mypyc {version} now handles a coroutine's exception state differently than 2.4.1 did:\n{run.stdout}\n"
        "If it matches CPython (in-except 'returned', left-by-cancel NoneType, interleaved None), the bugs are "
        "fixed: require that mypyc in the build (ztunnel/compiled/build.py, pyproject), then the rules of "
        "test_no_coroutine_of_the_compiled_modules_awaits_in_a_finally_or_an_except_block may go; update this "
        "test to assert the fixed behaviour."
    )
