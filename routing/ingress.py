"""The router as a Ray Serve deployment: the application's ingress and only public surface.

With `ingress: direct` each router replica runs its own HTTP server (uvicorn, on the replica's event
loop) instead of being reached through Ray Serve's proxy: the proxy would relay every streamed chunk
through one more process and one more Ray call. Replicas on one node share the port (SO_REUSEPORT),
as Serve's proxies share a node's port; the kernel spreads connections over them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import ray
import uvicorn
from fastapi import FastAPI
from ray import serve

from routing.app import create_app
from routing.audit import show_audit_records
from routing.catalog import ModelCatalog
from routing.console.summary import ServerFacts
from routing.engine_client import ServeEngineClient
from routing.ratelimit import ServeRateLimiter
from serve.config import EngineConfig, EngineDeploymentConfig, RouterConfig, TracingConfig
from serve.wire.channel import ChannelServer
from serve.wire.registry import ServeRegistryClient
from serve.wire.tracing import process_tracer

logger = logging.getLogger("loraplex.router")
KEEP_ALIVE_S = 75.0
"""Idle keep-alive connections are closed after this (longer than common load balancers' 60 s)."""


@serve.ingress()
class RouterIngress:
    """Builds the FastAPI router in the replica, wired to the engine, registry and rate-limiter deployments.

    `limiter` is None on an open server (no keys, so no limits): the router's local limiter stands in, unused.
    `engine_config` and `deployment` are the engines' settings, which the web console's Server view shows.
    """

    # Ray Serve awaits an async constructor: the replica is ready once it listens.
    async def __init__(  # type: ignore[misc]
        self,
        engine: Any,
        registry: Any,
        limiter: Any,
        base_id: str,
        config: RouterConfig,
        max_model_len: int | None = None,
        tracing: TracingConfig | None = None,
        engine_config: EngineConfig | None = None,
        deployment: EngineDeploymentConfig | None = None,
    ) -> None:
        show_audit_records()
        registry_client = ServeRegistryClient(registry)
        catalog = ModelCatalog(base_id, registry_client)
        channel = ChannelServer(ray.util.get_node_ip_address()) if config.stream_channel else None
        self._channel = channel
        engine_client = ServeEngineClient(engine, channel, config.engine_transport)
        shared = None if limiter is None else ServeRateLimiter(limiter)
        tracer = process_tracer(tracing, "router") if tracing is not None else None
        facts = ServerFacts(engine=engine_config, deployment=deployment, tracing=tracing)
        self._app = create_app(
            engine_client, catalog, config, limiter=shared, max_model_len=max_model_len, tracer=tracer, facts=facts
        )
        self._config = config
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        if config.ingress == "direct":
            # Listen once an engine can answer, as vLLM's own server does: `/health` then means ready.
            await engine.ready.remote()
            self._server, self._serving = serve_http(self._app, config.host, config.port)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    async def __del__(self) -> None:
        """Ray Serve awaits this when the replica stops: stop accepting, let requests in flight finish."""
        self._app.state.context.draining.set()
        if self._server is None or self._serving is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._serving), self._config.graceful_shutdown_timeout_s)
        except TimeoutError:
            logger.warning("requests still in flight after the graceful shutdown timeout are dropped")
            self._serving.cancel()
        if self._channel is not None:
            await self._channel.close()


def serve_http(app: FastAPI, host: str, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """Serves `app` on `host:port` from the running event loop; the port may be shared with other replicas."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_keep_alive=int(KEEP_ALIVE_S),
    )
    server = _ReplicaServer(config)
    return server, asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))


class _ReplicaServer(uvicorn.Server):
    """uvicorn inside a Ray actor: Ray owns the process's signals, so uvicorn must not take them."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield
