"""The engine replica: a thin Ray Serve deployment around one engine (`serve.engines`).

What only a replica does lives here: stream items batched per hop (`serve.streaming`), the registry
followed, adapters warmed when it joins, health checks, routing stats, and ending the process when its
engine died.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any, NoReturn

from opentelemetry.trace import Tracer

from serve.config import AppConfig
from serve.engines import Engine, build_engine
from serve.processes import die_with_parent_if_asked
from serve.streaming import batched
from serve.tracing import traced_generation
from serve.wire import (
    NOT_STARTED,
    ROUTING_STATS_ACTIVE,
    ROUTING_STATS_ADAPTERS,
    ROUTING_STATS_SLOTS,
    AdapterRecord,
    Changes,
    Endpoint,
    Relayed,
    ReplicaItem,
    ReplyTo,
    WireError,
    unversioned,
    versioned_name,
)
from serve.wire.channel import Links
from serve.wire.registry import RegistryClient, ServeRegistryClient
from serve.wire.tracing import process_tracer

logger = logging.getLogger("loraplex.replica")
REGISTRY_POLL_S = 2.0
ENGINE_DIED_EXIT_CODE = 70
"""Exit status of a replica process whose engine died (EX_SOFTWARE)."""
NOT_STARTED_EXIT_S = 0.2
"""A replica that found its engine dead answers the request it took `NOT_STARTED`, then ends this much later."""


class Replica:
    """Hosts one engine and answers the router's `generate` calls; `start` starts the engine."""

    def __init__(
        self,
        engine: Engine,
        registry: RegistryClient | None,
        stream_batch_s: float,
        warm_adapters: int = 0,
        replica_id: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """`registry`: how it reaches the registry (None: it follows none, in tests); `replica_id`: this replica's id
        in reports and routing (default: Serve's id of the replica this runs in); `tracer`: spans for traced requests
        (None: tracing off)."""
        self._engine = engine
        self._tracer = tracer
        self._id = replica_id
        self._registry = registry
        self._batch_s = stream_batch_s
        self._warm_adapters = warm_adapters
        self._generation = 0
        self._requests: Counter[str] = Counter()
        """Requests per adapter since the last report to the registry."""
        self._active: Counter[str] = Counter()
        """Requests per adapter in flight here now: the adapters holding (or waiting for) the engine's slots."""
        self._prefetches: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._warmer: asyncio.Task[None] | None = None
        self._to_stage: list[tuple[int, int, AdapterRecord]] = []
        """Records to fetch to the node ahead of use, a heap: the newest registered first."""
        self._queued: set[str] = set()
        """Content hashes in `_to_stage` or staged already."""
        self._stager: asyncio.Task[None] | None = None
        self._links = Links()
        self._unreachable: set[tuple[str, int]] = set()

    async def start(self) -> None:
        await self._engine.start()
        if self._registry is None:
            return
        self._watcher = asyncio.create_task(self._follow_registry(self._registry))
        if self._warm_adapters:
            self._warmer = asyncio.create_task(self._warm(self._registry))

    async def _warm(self, registry: RegistryClient) -> None:
        """Loads, in the background, the adapters this replica is likely to serve (the registry's `warm_plan`).

        The replica takes requests meanwhile: base requests and the spill-over of busy replicas at once, while
        routers keep sending an adapter to the replicas that hold it (`routing.policy`) until this one does too.
        """
        started = time.perf_counter()
        try:
            plan: list[AdapterRecord] = await registry.warm_plan(self._replica(), self._warm_adapters)
        except Exception:
            logger.warning("could not ask the adapter registry what to warm", exc_info=True)
            return
        warmed = 0
        for record in plan:
            try:
                if not await self._engine.warm(record):
                    break  # the engine's memory for adapters is full
                warmed += 1
            except Exception:  # a request for it will load it (or say why it cannot)
                logger.warning("could not warm adapter %s", record.name, exc_info=True)
        logger.info("warmed %d of %d hot adapters in %.2f s", warmed, len(plan), time.perf_counter() - started)

    async def _follow_registry(self, registry: RegistryClient) -> None:
        """Reports this replica to the registry; frees adapters that were unregistered (or became unusable),
        learning of them by what changed since the generation it last saw.

        New versions need no push: the router resolves the version and the next request loads it.
        """
        replica = self._replica()
        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            try:
                report = replace(await self._engine.report(replica), requests=dict(self._requests))
                self._requests.clear()
                generation = await registry.report(report)
                if generation == self._generation:
                    continue
                changes: Changes = await registry.changes(self._generation)
                for name in sorted(self._gone(changes, set(self._engine.held()))):
                    await self._engine.forget(name)
                self._generation = changes.generation
                self._stage_ahead(changes)
            except Exception:  # the registry restarting must not stop this replica from serving
                logger.warning("could not reach the adapter registry", exc_info=True)

    def _stage_ahead(self, changes: Changes) -> None:
        """Queues the usable versions `changes` brings to be fetched to this node before any request asks for them
        (`Engine.stage`), and starts the stager if it is idle."""
        for record in changes.records.values():
            for version in (record, record.canary if record is not None else None):
                if version is not None and not version.unusable and version.content_hash not in self._queued:
                    self._queued.add(version.content_hash)
                    heapq.heappush(self._to_stage, (-version.created, len(self._queued), version))
        if self._to_stage and (self._stager is None or self._stager.done()):
            self._stager = asyncio.create_task(self._stage())

    async def _stage(self) -> None:
        """Fetches the queued versions to the node one at a time, the newest first, until the node's cache has taken
        what it may ahead of use; then drops the rest (versions registered later are tried in turn)."""
        while self._to_stage:
            _, _, record = heapq.heappop(self._to_stage)
            try:
                if not await self._engine.stage(record):
                    for _, _, left in self._to_stage:
                        self._queued.discard(left.content_hash)
                    self._to_stage.clear()
                    return
            except Exception as exc:  # its first request fetches it, and answers why it cannot
                logger.info("could not fetch adapter %s ahead of use: %s", record.name, type(exc).__name__)

    @staticmethod
    def _gone(changes: Changes, held: set[str]) -> set[str]:
        """The held adapters `changes` ends: unregistered or unusable ones, and versions rolled out beside another
        (`NAME@vN`) that are no longer (promoted, rolled back)."""
        gone = {name for name, record in changes.records.items() if record is None or record.unusable}
        if changes.full:
            gone |= {name for name in held if unversioned(name) not in changes.records}
        for name in held - gone:
            adapter = unversioned(name)
            if name != adapter and adapter in changes.records:
                record = changes.records[adapter]
                canary = record.canary if record is not None else None
                if canary is None or versioned_name(adapter, canary.version) != name:
                    gone.add(name)
        return held & gone

    async def generate(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        *,
        adapter: AdapterRecord | None = None,
        reply_to: ReplyTo | None = None,
        trace: str | None = None,
    ) -> AsyncIterator[ReplicaItem]:
        """Runs one request, for `adapter` at the version the router resolved; yields `serve.wire` items.

        With `reply_to` a stream's items after the first go over the router's channel (`serve.wire.channel`) and
        the call ends with `Relayed`; without it (or when the router cannot be reached) they come here,
        batched (`stream_batch_ms`). A request that finds the engine already dead is answered `NOT_STARTED` (the
        router sends it to another replica) and the replica ends just after. One whose engine dies while it runs
        ends the replica (`exit_with_dead_engine`) rather than pass on what the request met; the router does not
        send it again, as it may be what killed the engine. `trace`: the `traceparent` of a request the router traces
        (`serve.tracing`); absent for the others.
        """
        if self._engine.errored:
            asyncio.get_running_loop().call_later(NOT_STARTED_EXIT_S, exit_with_dead_engine)
            yield WireError(503, "this engine replica's engine had died; the request was not started",
                            code=NOT_STARTED, retry_after=1, replica=self._replica())  # fmt: skip
            return
        if adapter is not None:
            self._requests[adapter.name] += 1
            if self._waits_for_slot(adapter.name):
                task = asyncio.create_task(self._prefetch(adapter))
                self._prefetches.add(task)
                task.add_done_callback(self._prefetches.discard)
            self._active[adapter.name] += 1
        stream = self._engine.generate(endpoint, body, adapter)
        if trace is not None and self._tracer is not None:
            attributes = {"loraplex.endpoint": endpoint, "loraplex.adapter": adapter.name if adapter else ""}
            stream = traced_generation(self._tracer, trace, stream, attributes | {"loraplex.replica": self._replica()})
        relay = batched(stream, self._batch_s) if reply_to is None else self._relayed(stream, reply_to)
        try:
            async with aclosing(relay) as items:
                async for item in items:
                    if self._engine.errored:
                        exit_with_dead_engine()
                    yield item
        finally:
            if adapter is not None:
                self._active[adapter.name] -= 1
                if self._active[adapter.name] <= 0:
                    del self._active[adapter.name]
            if self._engine.errored:
                exit_with_dead_engine()

    def _waits_for_slot(self, adapter: str) -> bool:
        """Whether a new request for `adapter` will wait for an engine LoRA slot: other adapters' requests in flight
        here hold (or wait for) every one."""
        slots = self._engine.lora_slots()
        return slots is not None and adapter not in self._active and len(self._active) >= slots

    async def _prefetch(self, adapter: AdapterRecord) -> None:
        """Has the engine load `adapter` while its request waits for a slot (best effort: the request loads it
        itself otherwise)."""
        try:
            await self._engine.prefetch(adapter)
        except Exception:
            logger.warning("prefetching adapter %s failed; its request loads it", adapter.name, exc_info=True)

    async def _relayed(self, stream: AsyncIterator[ReplicaItem], to: ReplyTo) -> AsyncGenerator[ReplicaItem, None]:
        """The first item here at once, then the rest over `to`'s channel, then `Relayed`."""
        async with aclosing(stream):  # type: ignore[type-var]
            first = await anext(stream, None)
            if first is None:
                return
            yield first
            if not isinstance(first, str):  # a whole answer or an error: nothing follows
                async for item in stream:
                    yield item
                return
            link = await self._link(to)
            if link is None:
                async with aclosing(batched(stream, self._batch_s)) as rest:
                    async for item in rest:
                        yield item
                return
            count = 0
            try:
                async for item in stream:
                    link.send(to.stream, item)
                    count += 1
            except ConnectionError:
                raise  # the router is gone: so is this stream
            except Exception as exc:
                logger.exception("a stream failed in the engine after %d items", count)
                yield Relayed(count, failure=type(exc).__name__)
                return
            yield Relayed(count)

    async def _link(self, to: ReplyTo) -> Any:
        """The channel to `to`'s router, or None when it cannot be reached (said once per router)."""
        try:
            return await self._links.get(to)
        except (OSError, TimeoutError) as exc:
            if (to.host, to.port) not in self._unreachable:
                self._unreachable.add((to.host, to.port))
                logger.warning(
                    "cannot reach the router's stream channel at %s:%d (%s); its streams come over Ray",
                    to.host, to.port, exc,
                )  # fmt: skip
            return None

    def _replica(self) -> str:
        return self._id or _replica_id()

    async def check_health(self) -> None:
        """Called by Ray Serve every `health_check_period_s`.

        A dead engine ends the replica, so Serve replaces it at once. An engine that stopped answering
        (wedged) never completes its check, so Serve's health check times out (`health_check_timeout_s`)
        and marks the replica unhealthy, as it does when this raises.
        """
        if self._engine.errored:
            exit_with_dead_engine()
        await self._engine.check_health()

    async def ready(self) -> bool:
        """Answered once this replica's engine has started: routers wait for it before they listen."""
        return True

    async def record_routing_stats(self) -> dict[str, Any]:
        """Called by Ray Serve every `routing_stats_period_s`; the request router reads it."""
        return {
            ROUTING_STATS_ADAPTERS: self._engine.held(),
            ROUTING_STATS_ACTIVE: sorted(self._active),
            ROUTING_STATS_SLOTS: self._engine.lora_slots(),
        }

    def __del__(self) -> None:
        links = getattr(self, "_links", None)
        if links is not None:
            links.close()
        for task in (getattr(self, "_watcher", None), getattr(self, "_warmer", None), getattr(self, "_stager", None)):
            if task is not None:
                task.cancel()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


class EngineReplica(Replica):
    """The Ray Serve deployment: the replica for `app`'s engine, started before it takes requests."""

    # Ray Serve awaits an async constructor, so the engine is up before the replica takes requests.
    async def __init__(self, app: AppConfig, registry: Any) -> None:  # type: ignore[misc]
        die_with_parent_if_asked()  # and its engine's processes with it (serve.vllm_patches)
        scaling = app.engine_deployment
        tracer = process_tracer(app.tracing, "engine")
        engine = build_engine(app)
        super().__init__(
            engine, ServeRegistryClient(registry), scaling.stream_batch_ms / 1000, scaling.warm_adapters, tracer=tracer
        )
        await self.start()


def exit_with_dead_engine() -> NoReturn:
    """Ends this replica's process: its engine died, and nothing left here can serve.

    vLLM's own API server exits the same way. Callers then see the replica die: routers retry
    requests that had not started on another replica, Serve's request routers stop picking it, and
    the controller replaces it at its next health check instead of after several failed ones.
    """
    logger.critical("the engine of this replica died; ending the replica so Ray Serve replaces it")
    logging.shutdown()  # flush the line above: os._exit skips interpreter clean-up
    os._exit(ENGINE_DIED_EXIT_CODE)


def _replica_id() -> str:
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a Serve replica (tests): the process is the replica
        return f"pid-{os.getpid()}"
