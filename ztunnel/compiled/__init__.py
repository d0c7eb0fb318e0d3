"""The optional mypyc build of the hot modules, and the import hook that uses it only while it matches the source.

`python -m ztunnel.compiled build` (scripts/build-compiled.sh) compiles `MODULES` with mypyc into
`build/compiled/<digest>/`, next to the source tree and never inside it: Python prefers an extension module to
the .py beside it, so a .so in `ztunnel/` would silently shadow every later edit of that file. The digest covers
the source of each module mypy read for the build (the compiled modules and the project modules they import,
transitively: mypyc folds their `Final` constants and checks their declared types), the build recipe (this
package), the mypy version and the interpreter's version and ABI; `manifest.json` in the build lists each of
those files with its SHA-256.

`CompiledModuleFinder` serves `MODULES` (and the mypyc group's shared library their shims import) from the build
only when every file of its manifest still hashes as it did and the interpreter is the same: all or nothing,
because the modules of one mypyc group call each other's native classes directly. Otherwise, or with
`ZTUNNEL_COMPILED=0`, it finds nothing and every module loads from its .py as usual. It decides once per
process, at the first import of a listed module, and hashes nothing before that (the CNI plugin and `--help`
pay nothing). Standard library only: `ztunnel/__init__.py` imports it.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Final

# The one list of compiled modules. A module joins it only when mypyc compiles it, its tests pass compiled
# and bench/waypoint_cpu.py moves (README, "Compiled hot modules").
MODULES: Final = (
    "ztunnel.hbone.dataframes",
    "ztunnel.hbone.stream",
    "ztunnel.hbone.connection",
    "ztunnel.waypoint.http1",
    "ztunnel.waypoint.telemetry",
    "ztunnel.waypoint.server",
)
# mypyc puts the group's code in one shared library, `<GROUP>__mypyc`, a top-level module each shim imports.
GROUP: Final = "ztunnel_compiled"
GROUP_LIBRARY: Final = f"{GROUP}__mypyc"
MANIFEST: Final = "manifest.json"
ENV_SWITCH: Final = "ZTUNNEL_COMPILED"

SOURCE_ROOT: Final = Path(__file__).resolve().parents[2]  # the directory holding ztunnel/
BUILD_ROOT: Final = SOURCE_ROOT / "build" / "compiled"


def source_file(name: str) -> str:
    """`ztunnel.hbone.stream` -> `ztunnel/hbone/stream.py`, relative to SOURCE_ROOT (MODULES are no packages)."""
    return name.replace(".", "/") + ".py"


def interpreter_abi() -> dict[str, str]:
    """What an extension module is bound to: a build for another interpreter is never loaded."""
    return {
        "version": sys.version,
        "cache_tag": str(sys.implementation.cache_tag),
        "ext_suffix": str(sysconfig.get_config_var("EXT_SUFFIX")),
        "platform": sysconfig.get_platform(),
    }


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(files: dict[str, str], mypy_version: str, abi: dict[str, str], modules: Sequence[str]) -> str:
    """The build's name: its inputs' hashes (`files`: relative path -> SHA-256), the compiler and the interpreter."""
    h = hashlib.sha256()
    h.update(json.dumps([sorted(files.items()), mypy_version, sorted(abi.items()), list(modules)]).encode())
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class Build:
    """A build in `build/compiled/<digest>/` that matches the current source and interpreter."""

    path: Path
    digest: str
    mypy_version: str
    extensions: dict[str, str]  # module name (and GROUP_LIBRARY) -> file, relative to `path`


@dataclass
class Decision:
    """Whether this process runs the compiled modules, and why not when it does not."""

    build: Build | None
    reason: str  # one line: the build used, or why the source is


def find_build(
    build_root: Path, source_root: Path, modules: Sequence[str] = MODULES, env: Mapping[str, str] | None = None
) -> Decision:
    """The newest build under `build_root` whose manifest matches `modules`, the interpreter and every file's hash."""
    if (os.environ if env is None else env).get(ENV_SWITCH, "") == "0":
        return Decision(None, f"pure Python ({ENV_SWITCH}=0)")
    try:
        candidates = sorted(
            (p for p in build_root.iterdir() if not p.name.startswith(".")), key=_mtime, reverse=True
        )
    except OSError:
        candidates = []
    if not candidates:
        return Decision(None, f"pure Python (no build in {build_root}: run scripts/build-compiled.sh)")
    abi = interpreter_abi()
    hashes: dict[str, str | None] = {}  # one read per file, however many builds name it
    reason = ""
    for path in candidates:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            reason = reason or f"{path / MANIFEST} is missing or unreadable"
            continue
        why = _mismatch(manifest, path, source_root, modules, abi, hashes)
        if why is None:
            build = Build(path, path.name, str(manifest["mypy_version"]), dict(manifest["extensions"]))
            return Decision(build, f"compiled (mypyc {build.mypy_version}, {build.path})")
        reason = reason or why
    return Decision(None, f"pure Python (no current build: {reason}; run scripts/build-compiled.sh)")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _mismatch(
    manifest: dict[str, object],
    path: Path,
    source_root: Path,
    modules: Sequence[str],
    abi: dict[str, str],
    hashes: dict[str, str | None],
) -> str | None:
    """Why the build at `path` may not be loaded here, or None when it may."""
    if manifest.get("modules") != list(modules):
        return f"{path.name} compiled other modules than ztunnel.compiled.MODULES"
    if manifest.get("abi") != abi:
        return f"{path.name} was built for another interpreter"
    files = manifest.get("files")
    extensions = manifest.get("extensions")
    if not isinstance(files, dict) or not isinstance(extensions, dict):
        return f"{path / MANIFEST} lacks files or extensions"
    for rel, expected in sorted(files.items()):
        if rel not in hashes:
            try:
                hashes[rel] = file_sha256(source_root / rel)
            except OSError:
                hashes[rel] = None
        if hashes[rel] != expected:
            return f"{rel} changed since build {path.name}"
    for name in (*modules, GROUP_LIBRARY):
        if not isinstance(extensions.get(name), str) or not (path / extensions[name]).is_file():
            return f"{path.name} has no extension for {name}"
    return None


@dataclass
class CompiledModuleFinder(importlib.abc.MetaPathFinder):
    """A `sys.meta_path` finder that loads `modules` from a current build, else leaves them to the source.

    It is the project's one import-time hook, installed by `ztunnel/__init__.py`: a compiled module must be found
    before the standard path finder looks at its .py, and only a finder can do that without putting the build
    directory on sys.path (where its `ztunnel/` folder would stand beside the real package).
    """

    build_root: Path
    source_root: Path
    modules: tuple[str, ...] = MODULES
    _decision: Decision | None = field(default=None, init=False, repr=False)

    def decision(self) -> Decision:
        """Decided once per process (on first use): half the group compiled and half not cannot run."""
        if self._decision is None:
            self._decision = find_build(self.build_root, self.source_root, self.modules)
        return self._decision

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != GROUP_LIBRARY and fullname not in self.modules:
            return None
        build = self.decision().build
        if build is None:
            return None
        location = str(build.path / build.extensions[fullname])
        loader = importlib.machinery.ExtensionFileLoader(fullname, location)
        return importlib.util.spec_from_file_location(fullname, location, loader=loader)


def install() -> CompiledModuleFinder:
    """Put the finder first on `sys.meta_path` (once per process; called by `ztunnel/__init__.py`)."""
    for finder in sys.meta_path:
        if isinstance(finder, CompiledModuleFinder):
            return finder
    finder = CompiledModuleFinder(BUILD_ROOT, SOURCE_ROOT)
    sys.meta_path.insert(0, finder)
    return finder


def status() -> str:
    """One line for `ztunnel version` and startup logs: compiled or pure Python, and why."""
    return install().decision().reason
