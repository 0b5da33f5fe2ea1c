"""Builders for composite tests: the demo base model and adapters, and a real registry that composes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serve.adapters.peft_compose import CompositeStore
from serve.adapters.registry import AdapterRegistry
from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.adapters.store import SqliteStore
from serve.demo.assets import DEMO_ADAPTERS, DemoAdapter, build_adapters, build_default_model
from serve.wire import AdapterRecord

ASSETS = Path(__file__).resolve().parents[2] / ".loraplex"
MATE = DemoAdapter(name="mate", rank=8, alpha=8, seed=7, scale=0.3)
"""A second rank-8 adapter on every target, for the methods that need components of one rank."""


def component_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base model's folder (`model`) and the adapters' (`alpha`, `beta`, ..., `mate`), by name."""
    model = build_default_model(ASSETS / "models" / "SmolLM2-135M-Instruct")
    demo = build_adapters(model, list(DEMO_ADAPTERS), ASSETS / "adapters")
    mate = build_adapters(model, [MATE], tmp_path_factory.mktemp("mate"))
    return {"model": model, **demo, **mate}


def make_registry(folders: dict[str, Path], work: Path, max_rank: int = 64, **options: Any) -> AdapterRegistry:
    resolver = SourceResolver(local=LocalSource((ASSETS.resolve(), work.resolve(), folders["mate"].parent.resolve())))
    return AdapterRegistry(
        SqliteStore(work / "registry.db"), folders["model"], resolver, max_rank=max_rank, max_bytes=10**9,
        composites=CompositeStore(str(work / "composites"), S3Source()), **options,
    )  # fmt: skip


async def registered(folders: dict[str, Path], work: Path, max_rank: int = 64, **options: Any) -> AdapterRegistry:
    """A registry in `work` with `alpha`, `beta` and `mate` registered."""
    registry = make_registry(folders, work, max_rank, **options)
    for name in ("alpha", "beta", "mate"):
        assert isinstance(await registry.register(name, str(folders[name])), AdapterRecord)
    return registry
