"""How the router reaches engine replicas: through a Ray Serve handle, streaming the wire protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serve.adapters.records import AdapterRecord
from serve.wire import Endpoint, ReplicaItem


class EngineClient(Protocol):
    """Sends one request to some engine replica and streams back its items (see `serve.wire`)."""

    def generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None
    ) -> AsyncIterator[ReplicaItem]: ...


class ServeEngineClient:
    """An `EngineClient` over the engine deployment's `DeploymentHandle`."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle.options(stream=True)

    def generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None
    ) -> AsyncIterator[ReplicaItem]:
        return self._handle.generate.remote(endpoint, body, adapter=adapter)
