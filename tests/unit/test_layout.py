"""The layout holds, both ways: routing/ reaches into serve/ only through its config and the wire contract; serve/
reaches routing/ only where the application is assembled (serve/app.py) and in the command's key tools; the runtime
imports none of the tooling (serve/cli/, serve/demo/). Imports anywhere in a file count, inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ("serve.config", "serve.wire")
"""What routing/ may import of serve/: these packages and their modules."""
ASSEMBLY = ("serve/app.py", "serve/cli/main.py", "serve/cli/manage.py")
"""Where serve/ may import routing/: the application's assembly, and the CLI's key commands (routing.keys)."""
TOOLING = ("serve.cli", "serve.demo")


def imports(folder: str) -> set[tuple[str, str]]:
    """(file, module) for every import in the Python files under `folder`."""
    found = set()
    for file in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            found |= {(file.relative_to(ROOT).as_posix(), name) for name in names}
    return found


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def test_routing_imports_nothing_of_serve_but_its_config_and_the_wire_contract() -> None:
    reached = {(file, name) for file, name in imports("routing") if within(name, ("serve",))}
    assert reached, "routing/ does import serve's config and contract"
    assert sorted((file, name) for file, name in reached if not within(name, CONTRACT)) == []


def test_serve_imports_routing_only_where_the_application_is_assembled() -> None:
    reached = {(file, name) for file, name in imports("serve") if within(name, ("routing",))}
    assert {file for file, _ in reached} <= set(ASSEMBLY), sorted(reached)
    assert "serve/app.py" in {file for file, _ in reached}


def test_the_runtime_imports_none_of_the_tooling() -> None:
    runtime = {
        (file, name)
        for file, name in imports("serve")
        if not file.startswith(("serve/cli/", "serve/demo/")) and within(name, TOOLING)
    }
    assert sorted(runtime) == []


CONFIG_READS = {("serve/config/engine.py", "serve.adapters.safetensors_files")}
"""The config sizes its LoRA slots from the base model's weight shapes, read from the safetensors headers by the
adapters' file reader, which loads no engine, no torch and nothing of serve/; validation, beside it, nothing of
serve/ but four small modules of names, option checks and that reader."""


def test_the_contract_imports_nothing_else_of_serve_so_routing_reaches_nothing_else_indirectly() -> None:
    reached = {
        (file, name)
        for folder in ("serve/wire", "serve/config")
        for file, name in imports(folder)
        if within(name, ("serve", "routing")) and not within(name, CONTRACT)
    }
    assert sorted(reached - CONFIG_READS) == []
    small = {"serve.adapters.tensor_names", "serve.adapters.unserved", "serve.adapters.lora_extras"}
    for module, allowed in (("safetensors_files", set()), ("validation", small | {"serve.adapters.safetensors_files"})):
        tree = ast.parse((ROOT / f"serve/adapters/{module}.py").read_text())
        loaded = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        loaded |= {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        assert not any(within(name, ("serve", "routing", "torch", "vllm")) for name in loaded - allowed), sorted(loaded)
