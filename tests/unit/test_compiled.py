"""The mypyc build of the hot modules is used only while it matches the source, all or nothing (ztunnel/compiled)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ztunnel import compiled
from ztunnel.compiled import (
    GROUP_LIBRARY,
    MANIFEST,
    MODULES,
    CompiledModuleFinder,
    digest,
    file_sha256,
    find_build,
    interpreter_abi,
)

ROOT = Path(__file__).resolve().parents[2]
EXT_SUFFIX = str(sysconfig.get_config_var("EXT_SUFFIX"))
SHOW = "import importlib, ztunnel.compiled as c; " + "; ".join(
    f"print(importlib.import_module({m!r}).__file__)" for m in MODULES
) + "; print(c.status())"


def _can_build() -> str | None:
    """Why this machine cannot build the compiled modules, or None when it can (CI can: it has mypy and gcc)."""
    try:
        from ztunnel.compiled.build import c_compiler, mypy_version

        mypy_version()
    except Exception as e:
        return str(e)
    return None if c_compiler() else "no C compiler"


def _run(tree: Path, **env: str) -> tuple[list[str], str]:
    """The listed modules' files and the status line, in a fresh interpreter importing ztunnel from `tree`."""
    out = subprocess.run(
        [sys.executable, "-c", SHOW],
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    return out[:-1], out[-1]


def _tree(tmp_path: Path, build: Path | None) -> Path:
    """A copy of the source tree (ztunnel/ only), with `build` linked in as its build/compiled/<digest>."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "ztunnel", tree / "ztunnel", ignore=shutil.ignore_patterns("__pycache__"))
    if build is not None:
        (tree / "build" / "compiled").mkdir(parents=True)
        (tree / "build" / "compiled" / build.name).symlink_to(build)
    return tree


def test_the_hot_modules_run_compiled_where_they_can_be_built() -> None:
    """CI has mypyc and a C compiler, and scripts/setup.sh builds: the suite must run the compiled modules, not
    silently the slow path."""
    if os.environ.get("ZTUNNEL_COMPILED") == "0":
        pytest.skip("ZTUNNEL_COMPILED=0: this run tests the source modules")
    why = _can_build()
    if why is not None:
        pytest.skip(f"the compiled modules cannot be built here: {why}")
    decision = find_build(compiled.BUILD_ROOT, compiled.SOURCE_ROOT)
    assert decision.build is not None, f"{decision.reason} (scripts/setup.sh builds it before the suite)"
    for name in MODULES:
        module = importlib.import_module(name)
        assert module.__file__ is not None and module.__file__.endswith(EXT_SUFFIX), (name, module.__file__)
        assert Path(module.__file__).is_relative_to(decision.build.path)
    assert compiled.status().startswith("compiled (mypyc ")


def test_ztunnel_compiled_0_loads_every_module_from_source() -> None:
    files, status = _run(ROOT, ZTUNNEL_COMPILED="0")
    assert files == [str(ROOT / compiled.source_file(m)) for m in MODULES]
    assert status == "pure Python (ZTUNNEL_COMPILED=0)"
    version = subprocess.run(
        [sys.executable, "-m", "ztunnel", "version"],
        env={**os.environ, "ZTUNNEL_COMPILED": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert version[1] == "compiled modules: pure Python (ZTUNNEL_COMPILED=0)"


@pytest.mark.parametrize("edited", ["ztunnel/waypoint/telemetry.py", "ztunnel/config/model.py"])
def test_an_edited_source_file_loads_every_module_from_source(tmp_path: Path, edited: str) -> None:
    """A compiled module's own source, or one it imports (mypyc folds its constants): the build is stale, and
    every listed module, not only the edited one, loads from its .py (one mypyc group calls itself natively)."""
    build = find_build(compiled.BUILD_ROOT, compiled.SOURCE_ROOT, env={}).build
    if build is None:
        pytest.skip("no current build to copy (test_the_hot_modules_run_compiled_where_they_can_be_built says why)")
    tree = _tree(tmp_path, build.path)
    files, status = _run(tree)
    assert all(f.endswith(EXT_SUFFIX) and f.startswith(str(tree / "build")) for f in files), files
    with (tree / edited).open("a") as f:
        f.write("# edited after the build\n")
    files, status = _run(tree)
    assert files == [str(tree / compiled.source_file(m)) for m in MODULES]
    assert f"{edited} changed since build {build.digest}" in status


def _fake_build(tree: Path, name: str = "fake", **changes: object) -> Path:
    """A build directory whose manifest matches `tree` (empty files for the extensions), with `changes` applied."""
    files = {rel: file_sha256(tree / rel) for rel in (compiled.source_file(m) for m in MODULES)}
    extensions = {m: f"{m}{EXT_SUFFIX}" for m in (*MODULES, GROUP_LIBRARY)}
    manifest: dict[str, object] = {
        "modules": list(MODULES),
        "mypy_version": "0",
        "abi": interpreter_abi(),
        "files": files,
        "extensions": extensions,
    }
    manifest.update(changes)
    path = tree / "build" / "compiled" / name
    path.mkdir(parents=True)
    for rel in extensions.values():
        (path / rel).write_bytes(b"")
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_a_build_is_found_only_when_its_manifest_matches(tmp_path: Path) -> None:
    tree = _tree(tmp_path, None)
    builds = tree / "build" / "compiled"
    assert find_build(builds, tree, env={}).reason.startswith("pure Python (no build in ")
    _fake_build(tree, "other-abi", abi={**interpreter_abi(), "version": "2.7"})
    assert "other-abi was built for another interpreter" in find_build(builds, tree, env={}).reason
    shutil.rmtree(builds / "other-abi")
    _fake_build(tree, "fewer", modules=list(MODULES[:-1]))
    assert "fewer compiled other modules" in find_build(builds, tree, env={}).reason
    shutil.rmtree(builds / "fewer")
    good = _fake_build(tree, "good")
    decision = find_build(builds, tree, env={})
    assert decision.build is not None and decision.build.path == good
    assert find_build(builds, tree, env={"ZTUNNEL_COMPILED": "0"}).build is None
    (good / f"{GROUP_LIBRARY}{EXT_SUFFIX}").unlink()  # the shims import the group's library: no half builds
    assert f"good has no extension for {GROUP_LIBRARY}" in find_build(builds, tree, env={}).reason


def test_the_finder_decides_on_the_first_listed_import_only(tmp_path: Path) -> None:
    """Importing anything else (the CNI plugin, `--help`) hashes nothing; a stale build finds nothing."""
    tree = _tree(tmp_path, None)
    path = _fake_build(tree, "stale")
    (tree / "ztunnel" / "hbone" / "stream.py").write_text("# edited\n")
    finder = CompiledModuleFinder(tree / "build" / "compiled", tree)
    assert finder.find_spec("json") is None and finder.find_spec("ztunnel.cli") is None
    assert finder._decision is None
    assert finder.find_spec(MODULES[0]) is None
    assert finder.find_spec(GROUP_LIBRARY) is None
    assert finder.decision().reason.endswith(
        "(no current build: ztunnel/hbone/stream.py changed since build stale; run scripts/build-compiled.sh)"
    )
    assert path.is_dir()


def test_the_digest_names_its_inputs() -> None:
    abi = interpreter_abi()
    base = digest({"a.py": "1"}, "2.4.1", abi, MODULES)
    assert base == digest({"a.py": "1"}, "2.4.1", abi, MODULES)
    assert base != digest({"a.py": "2"}, "2.4.1", abi, MODULES)
    assert base != digest({"a.py": "1"}, "2.5.0", abi, MODULES)
    assert base != digest({"a.py": "1"}, "2.4.1", {**abi, "version": "3.12"}, MODULES)
    assert base != digest({"a.py": "1"}, "2.4.1", abi, MODULES[:-1])
