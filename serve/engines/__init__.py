"""The engines a replica can host, behind one small interface: vLLM, or the simulated engine.

An engine is a plain object: construct it from the config, then `await start()`. The Serve deployment
around it (`serve.replica`) adds what only a replica does: batching stream items, following the
registry, health checks and routing stats.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serve.config import AppConfig
from serve.wire import AdapterRecord, Endpoint, ReplicaItem, ReplicaReport


class Engine(Protocol):
    """Answers completions and chat requests in the wire protocol (`serve.wire`), for the base model or an adapter."""

    @property
    def errored(self) -> bool:
        """True once the engine died; nothing it holds can serve any more."""
        ...

    async def start(self) -> None:
        """Starts the engine; returns when it can take requests."""

    def generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None
    ) -> AsyncIterator[ReplicaItem]:
        """Runs one request, for `adapter` at the version the router resolved. Closing the iterator aborts it."""
        ...

    async def check_health(self) -> None:
        """Raises, or never returns, when the engine cannot serve."""

    def held(self) -> list[str]:
        """Names of the adapters installed in this engine."""
        ...

    def lora_slots(self) -> int | None:
        """Adapters one engine step can serve (vLLM's `max_loras`); None when there is no such limit."""
        ...

    async def warm(self, adapter: AdapterRecord) -> bool:
        """Loads `adapter` ahead of any request for it, weights into memory; False when the engine has no room
        left for adapters loaded ahead (it would evict one of them)."""
        ...

    async def prefetch(self, adapter: AdapterRecord) -> None:
        """Loads `adapter` and its weights into the engine's memory now: a request for it will wait for a LoRA
        slot, and when one opens the switch should cost only the copy into the slot."""

    async def stage(self, adapter: AdapterRecord) -> bool:
        """Fetches `adapter`'s files to this node ahead of any request for it (not into the engine's memory); False
        when the node's cache holds what it may take ahead of use, or the engine has no node cache."""
        ...

    async def forget(self, name: str) -> None:
        """Stops serving adapter `name` (it was unregistered)."""

    async def report(self, replica: str) -> ReplicaReport:
        """What this engine tells the registry about itself."""
        ...

    def shutdown(self) -> None:
        """Stops the engine and every process it started."""


def build_engine(app: AppConfig) -> Engine:
    """The engine `app.engine.kind` names, constructed but not started."""
    if app.engine.kind == "simulated":
        from serve.engines.simulated import SimulatedEngine

        return SimulatedEngine(app.engine)
    from serve.engines.vllm_engine import VLLMEngine

    return VLLMEngine(app)
