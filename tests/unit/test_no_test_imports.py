"""A test module imports no other module that holds tests: shared fixtures and data live in the test kit
(tests/support), so running or changing one test module never runs or breaks another's tests."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# Known and left to their owners: (importer, imported), both relative to tests/.
KNOWN = {
    ("unit/test_config_source.py", "unit/test_config_model.py"),
}


def holds_tests(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    return any(
isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test") for node in tree.body
    )


def imported_test_modules(path: Path) -> set[Path]:
    """Modules of tests/ that `path` imports, by plain name (as pytest's rootdir-relative imports allow) or by
    dotted `tests.` name."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("tests."):
                candidate = TESTS.parent.joinpath(*name.split(".")).with_suffix(".py")
            else:
                candidate = path.parent / f"{name}.py"
            if candidate.is_file() and candidate != path:
                found.add(candidate)
    return found


def test_no_test_module_imports_another() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for target in imported_test_modules(path):
            pair = (str(path.relative_to(TESTS)), str(target.relative_to(TESTS)))
            if holds_tests(target) and pair not in KNOWN:
                offenders.append(f"{pair[0]} imports {pair[1]}")
    assert offenders == [], "move what they share into tests/support: " + "; ".join(offenders)
