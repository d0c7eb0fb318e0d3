"""The import graph follows the layer table in the README: no sideways or upward imports, no cycles.

Every import counts, including those inside functions (they are cycles all the same, just later).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ztunnel"
ROW = re.compile(r"^\|\s*(\d+)\s*\|([^|]+)\|")


def layer_table() -> dict[str, int]:
    """`package -> layer` from the README's layer table (the rows between the `layers:` markers)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- layers:begin -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    table: dict[str, int] = {}
    for line in block.splitlines():
        m = ROW.match(line.strip())
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                table[name] = int(m.group(1))
    return table


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("ztunnel"):
                found.add(name)
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ztunnel"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_every_package_has_a_layer() -> None:
    table = layer_table()
    packages = {package_of(m) for m in modules()} - {"ztunnel"}
    assert packages <= set(table), f"packages missing from the README's layer table: {sorted(packages - set(table))}"


def test_imports_go_down_the_layers_only() -> None:
    table = layer_table()
    table.setdefault("ztunnel", 0)  # the root package: the version string
    violations = []
    for module, targets in graph().items():
        src = package_of(module)
        for target in targets:
            dst = package_of(target)
            if (module, target) == ("ztunnel", "ztunnel.compiled"):  # the root installs the one import hook
                continue
            if dst != src and table[dst] >= table[src]:
                violations.append(f"{module} (layer {table[src]}) imports {target} (layer {table[dst]})")
    assert not violations, "\n".join(sorted(violations))


def test_the_cni_plugin_needs_nothing_but_its_own_package() -> None:
    """It ships as a self-contained executable of ztunnel/cni alone (cni/build.sh)."""
    outside = {t for m, ts in graph().items() if package_of(m) == "cni" for t in ts if package_of(t) != "cni"}
    assert outside <= {"ztunnel"}, sorted(outside)


def test_no_import_cycles() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_a_table_row_is_read() -> None:
    """The test above cannot pass vacuously: the table names the packages and their order."""
    table = layer_table()
    assert table["errors"] < table["net"] < table["identity"] < table["hbone"] < table["proxy"] < table["cli"]
