"""The ports and marks of DESIGN §4.1 are written as numbers in one place only: ztunnel/ports.py.

Everything else imports them, so moving a port (or reading the code for where one is used) is one search.
"""

from __future__ import annotations

import ast
from pathlib import Path

from ztunnel import ports

PACKAGE = Path(__file__).resolve().parents[2] / "ztunnel"
DEFINED_ONCE = {
    value
    for name, value in vars(ports).items()
    if (name.endswith("_PORT") or name in ("PROXY_MARK", "CONNMARK")) and isinstance(value, int)
}


def test_the_port_table_is_the_design_one() -> None:
    assert ports.HBONE_PORT == 15008 and ports.SOCKS5_PORT == 15080 and ports.PROXY_MARK == 0x539
    assert len(DEFINED_ONCE) == 10  # 8 ports and 2 marks


def test_no_module_but_ports_writes_a_port_or_mark_as_a_number() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "ports.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in DEFINED_ONCE:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value}")
    assert not found, "import these from ztunnel.ports instead:\n" + "\n".join(found)
