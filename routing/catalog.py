"""The models a router serves: one base model and its adapters, and how request ids resolve to them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from routing.errors import ModelNotFound

SEPARATOR = ":"


@dataclass(frozen=True)
class ModelTarget:
    """What a request's `model` resolved to."""

    id: str
    """Canonical id: the base model's id, or `BASE:NAME` for an adapter."""
    adapter: str | None
    """Adapter name, or None for the base model."""


class ModelCatalog:
    """Resolves `BASE`, `BASE:NAME` and bare `NAME` to a `ModelTarget`; lists models for `/v1/models`."""

    def __init__(self, base_id: str, adapters: Iterable[str]) -> None:
        self.base_id = base_id
        self._adapters = set(adapters)
        self._created = int(time.time())

    def adapter_id(self, name: str) -> str:
        return f"{self.base_id}{SEPARATOR}{name}"

    def resolve(self, requested: str) -> ModelTarget:
        if requested == self.base_id:
            return ModelTarget(id=self.base_id, adapter=None)
        prefix = self.base_id + SEPARATOR
        name = requested[len(prefix) :] if requested.startswith(prefix) else requested
        if name in self._adapters:
            return ModelTarget(id=self.adapter_id(name), adapter=name)
        raise ModelNotFound(f"The model `{requested}` does not exist.", param="model")

    def models(self) -> list[dict[str, Any]]:
        """OpenAI model objects: the base model first, then adapters with `parent` = base."""
        base = self._card(self.base_id, parent=None)
        return [base] + [self._card(self.adapter_id(name), parent=self.base_id) for name in sorted(self._adapters)]

    def model(self, requested: str) -> dict[str, Any]:
        target = self.resolve(requested)
        return self._card(target.id, parent=None if target.adapter is None else self.base_id)

    def _card(self, model_id: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self._created,
            "owned_by": "loraplex",
            "root": self.base_id,
            "parent": parent,
        }
