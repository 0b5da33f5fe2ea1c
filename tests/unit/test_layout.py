"""The layout holds: routing/ reaches into serve/ only through its config and the wire contract."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ("serve.config", "serve.wire", "serve.wire.channel", "serve.wire.tracing")


def test_routing_imports_nothing_of_serve_but_its_config_and_the_wire_contract() -> None:
    reached = set()
    for file in sorted((ROOT / "routing").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            reached |= {(file.relative_to(ROOT).as_posix(), name) for name in names if name.split(".")[0] == "serve"}
    assert reached, "routing/ does import serve's config and contract"
    assert sorted(item for item in reached if item[1] not in ALLOWED) == []
