"""Build `ztunnel.compiled.MODULES` with mypyc into `build/compiled/<digest>/`, or reuse the build of that digest.

The build compiles a snapshot of the source (copied into a temporary directory first), so what the manifest hashes
is exactly what was compiled even while files are being edited; it is renamed into place in one step, and a
concurrent build of the same digest that got there first is kept. Older builds beyond the newest `KEEP` are
removed (a running process keeps the files it has loaded open).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from ztunnel.compiled import (
    BUILD_ROOT,
    GROUP,
    GROUP_LIBRARY,
    MANIFEST,
    MODULES,
    SOURCE_ROOT,
    digest,
    file_sha256,
    find_build,
    interpreter_abi,
    source_file,
)

KEEP: Final = 3
# The mypy settings the build type-checks with: what the project's pyproject.toml says that matters to a build
# (third-party packages without stubs are Any; the generated gRPC stubs are not analysed).
MYPY_INI: Final = """\
[mypy]
ignore_missing_imports = True

[mypy-ztunnel.identity.proto.*]
ignore_errors = True
follow_imports = skip
"""


class BuildUnavailable(Exception):
    """mypyc or a C compiler is missing here: the project runs as pure Python."""


def closure(root: Path, modules: Iterable[str]) -> list[str]:
    """The project files mypy reads to compile `modules`: them, the project modules they import
    (transitively, `TYPE_CHECKING` imports included) and their packages' `__init__.py`, plus this recipe."""

    def file_of(name: str) -> str | None:
        rel = name.replace(".", "/")
        for candidate in (f"{rel}.py", f"{rel}/__init__.py"):
            if (root / candidate).is_file():
                return candidate
        return None

    seen: dict[str, str] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or not name.startswith("ztunnel"):
            continue
        rel = file_of(name)
        if rel is None:
            continue
        seen[name] = rel
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        package = name if rel.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(ast.parse((root / rel).read_bytes(), rel)):
            if isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                todo.append(base)
                todo.extend(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    recipe = {"ztunnel/compiled/__init__.py", "ztunnel/compiled/build.py"}
    return sorted(set(seen.values()) | recipe)


def mypy_version() -> str:
    try:
        from mypy.version import __version__
    except ImportError as e:
        raise BuildUnavailable(f"mypy (mypyc) is not installed in {sys.prefix}") from e
    return __version__


def c_compiler() -> str | None:
    """The compiler setuptools will call (CC, else the one Python was built with), if it is on PATH."""
    import sysconfig

    cc = os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "cc")
    return shutil.which(cc.split()[0]) if cc.split() else None


def build(log: Callable[[str], None], force: bool = False) -> Path:
    """The current build's directory, built first when there is none; raises BuildUnavailable without mypyc or cc."""
    version = mypy_version()
    current = find_build(BUILD_ROOT, SOURCE_ROOT, env={}).build
    if not force and current is not None and current.mypy_version == version:
        log(f"compiled: build {current.digest} is current ({len(MODULES)} modules, mypyc {version}), nothing to do")
        return current.path
    if c_compiler() is None:
        raise BuildUnavailable("no C compiler (cc) on PATH")
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ztunnel-compiled-") as tmp:
        snapshot = Path(tmp) / "src"
        shutil.copytree(SOURCE_ROOT / "ztunnel", snapshot / "ztunnel", ignore=_not_source)
        files = closure(snapshot, MODULES)
        hashes = {rel: file_sha256(snapshot / rel) for rel in files}
        abi = interpreter_abi()
        name = digest(hashes, version, abi, MODULES)
        final = BUILD_ROOT / name
        log(f"compiled: building {name} with mypyc {version}: {len(MODULES)} modules, {len(files)} files read")
        started = time.monotonic()
        staged = BUILD_ROOT / f".{name}.{os.getpid()}"  # beside the final name: the rename is atomic
        try:
            extensions = _mypyc(snapshot, staged, Path(tmp), [source_file(m) for m in MODULES], log)
            manifest = {"modules": list(MODULES), "mypy_version": version, "abi": abi, "files": hashes,
                        "extensions": extensions}
            (staged / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            if final.exists():  # the same inputs built before (a forced build): replace it
                shutil.rmtree(final)
            staged.rename(final)
        except OSError as e:
            if not (final / MANIFEST).is_file():
                raise RuntimeError(f"could not put the build in {final}: {e}") from e
            # a concurrent build of this digest got there first; its files are the same
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log(f"compiled: built {final} in {time.monotonic() - started:.1f} s")
    _prune(final, log)
    now = find_build(BUILD_ROOT, SOURCE_ROOT, env={})
    if now.build is None or now.build.path != final:
        log(f"compiled: the source changed during the build, which is stale already: {now.reason}")
    return final


def _not_source(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or (not n.endswith((".py", ".pyi")) and "." in n)]


def _mypyc(snapshot: Path, out: Path, tmp: Path, paths: list[str], log: Callable[[str], None]) -> dict[str, str]:
    """Compile `paths` (relative to `snapshot`) into `out`; returns module -> extension file relative to `out`."""
    from mypyc.build import mypycify
    from setuptools import setup

    (snapshot / "mypy.ini").write_text(MYPY_INI)
    cwd = Path.cwd()
    captured = io.StringIO()
    os.chdir(snapshot)  # mypy names modules from paths relative to the working directory
    try:
        with contextlib.redirect_stdout(captured):
            extensions = mypycify(
                ["--config-file", "mypy.ini", "--cache-dir", str(tmp / "mypy-cache"), *paths],
                group_name=GROUP,
                target_dir=str(tmp / "c"),
                multi_file=True,  # one C file per module: the compiler runs on both cores
            )
            log(f"compiled: mypyc generated C for {len(paths)} modules; compiling it (cc)")
            setup(
                name=GROUP,
                ext_modules=extensions,
                script_args=["build_ext", "--build-lib", str(out), "--build-temp", str(tmp / "obj"), "-j", "2"],
            )
    except SystemExit as e:  # setup() and mypycify exit on errors
        sys.stderr.write(captured.getvalue())
        raise RuntimeError(f"mypyc build failed: {e}") from e
    finally:
        os.chdir(cwd)
    found: dict[str, str] = {}
    for so in out.rglob("*.so"):
        rel = so.relative_to(out)
        module = ".".join((*rel.parent.parts, rel.name.split(".", 1)[0]))
        found[module] = str(rel)
    missing = [m for m in (*MODULES, GROUP_LIBRARY) if m not in found]
    if missing:
        raise RuntimeError(f"mypyc build produced no extension for {', '.join(missing)} in {out}")
    return {m: found[m] for m in (*MODULES, GROUP_LIBRARY)}


def _prune(current: Path, log: Callable[[str], None]) -> None:
    """Keep the newest KEEP builds (the current one among them)."""
    builds = sorted(
        (p for p in BUILD_ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p != current),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP - 1 :]:
        log(f"compiled: removing old build {old.name}")
        shutil.rmtree(old, ignore_errors=True)
