"""One in-process vLLM `AsyncLLM` with LoRA, behind vLLM's own OpenAI serving layer.

Requests for the base model and for any adapter go into the same engine, so vLLM batches them
together step by step. Chat templates, sampling, logprobs and stop handling are vLLM's own; this
class adapts them to the replica's wire protocol (`serve.wire`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from serve.adapters.cache import NodeCache
from serve.adapters.loader import AdapterLoader, install_failure
from serve.adapters.resolver import make_resolver
from serve.config import AdapterConfig, AppConfig, EngineConfig
from serve.engines.vllm_routes import Route, StreamUsage, build_routes, sse, with_tool_parser
from serve.prompt_limit import request_models
from serve.vllm_patches import CPU_LORA_OPS_ENV
from serve.wire import AdapterRecord, Endpoint, ReplicaItem, ReplicaReport, Usage, WireError, adapter_model_id

if TYPE_CHECKING:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("loraplex.engine")


@contextmanager
def engine_cpus(wanted: list[int] | None) -> Iterator[None]:
    """While vLLM spawns its engine processes from this thread, lets them use the engine's CPUs.

    `loraplex serve` keeps Ray's processes (this replica among them) on the core vLLM reserves for
    its scheduler. Children inherit the spawning thread's CPU set and vLLM's automatic binding picks
    the worker's cores from it, so without this the model's worker would land on that one shared core
    and leave the others idle. Linux sets affinity per thread: only this thread is widened, then restored.
    `wanted` is the engine's `spawn_cpus`.
    """
    if not wanted:
        yield
        return
    confined = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(wanted))
    try:
        yield
    finally:
        os.sched_setaffinity(0, confined)


def serving_dtype(config: EngineConfig, on_cpu: bool | None = None) -> str:
    """The dtype handed to vLLM. `auto` is vLLM's own choice on a GPU, but float32 on a CPU: there, with LoRA
    enabled (always, here), vLLM's bfloat16 linear layers fall back from oneDNN to plain torch and streamed
    3.5x slower than float32 (AMD EPYC with avx512_bf16: 22.7 against 79.3 tok/s on the base workload, 2026-11-29,
    docs/benchmarks/dtype.md). Ask for `bfloat16` explicitly where it is faster."""
    dtype = config.engine_dtype()
    if config.dtype == "auto" and (_on_cpu() if on_cpu is None else on_cpu):
        return "float32"
    return dtype


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def vllm_cli_args(
    config: EngineConfig, adapters: list[AdapterConfig], allowed_media_domains: tuple[str, ...] = ()
) -> list[str]:
    """The `vllm serve` flags equivalent to `config`; the reference server takes the same list. `allowed_media_domains`:
    the router's (`router.allowed_media_domains`), which vLLM checks again when it fetches media."""
    args = [
        "--model", config.model,
        "--served-model-name", config.model_id,
        "--enable-lora",
        "--max-loras", str(slots := config.lora_slots(_on_cpu())),
        "--max-lora-rank", str(config.max_lora_rank),
        "--max-cpu-loras", str(config.cpu_cache_entries(slots)),
        "--max-model-len", str(config.max_model_len),
        "--max-num-seqs", str(config.max_num_seqs),
        "--dtype", serving_dtype(config),
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--seed", str(config.seed),
        "--disable-log-stats",
    ]  # fmt: skip
    if config.enforce_eager:
        args.append("--enforce-eager")
    if slot_policy := config.slot_policy_config():
        args += ["--additional-config", json.dumps(slot_policy)]
    if config.tool_call_parser is not None:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", config.tool_call_parser]
    if allowed_media_domains:
        args += ["--allowed-media-domains", *allowed_media_domains]
    if adapters:
        args.append("--lora-modules")
        args.extend(f"{adapter_model_id(config.model_id, a.name)}={a.path}" for a in adapters)
    return args


def engine_env(config: EngineConfig) -> dict[str, str]:
    """Environment that vLLM and loraplex's vLLM plugin read at engine start-up (they take no arguments for these;
    the plugin runs in every vLLM process, which inherit it)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_cache_gib:g}",
        "VLLM_CPU_OMP_THREADS_BIND": config.cpu_threads_bind,
        CPU_LORA_OPS_ENV: config.cpu_lora_ops,
    }


class VLLMEngine:
    """A vLLM engine answering completions and chat in the wire protocol; constructed cheaply, started by `start`."""

    def __init__(self, app: AppConfig) -> None:
        self._app = app
        self._config = app.engine
        self._engine: AsyncLLM | None = None
        self._loader: AdapterLoader | None = None
        self._routes: dict[Endpoint, Route] = {}
        self._parser_routes: dict[str, dict[Endpoint, Route]] = {}
        """The routes for adapters registered with a tool-call parser other than the server's, by parser."""
        # The engine's adapter ids as last asked (`list_loras`), and whether anything ran since. Asking is a
        # round trip to the worker, whose message queue then spins a core for a second (vLLM's SpinCondition):
        # asked every report, an idle server's worker burned half a core. Nothing changes them while idle.
        self._engine_loras: set[int] | None = None
        self._changes = 0  # requests started and adapters forgotten
        self._listed_at = -1  # `_changes` when last asked

    @property
    def errored(self) -> bool:
        return self._engine is not None and self._engine.errored

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.update(engine_env(self._config))
        # Adapters are not given to vLLM up front: the loader installs registered ones on first use.
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            vllm_cli_args(self._config, [], self._app.router.allowed_media_domains)
        )
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        with engine_cpus(self._config.spawn_cpus):
            engine = AsyncLLM.from_vllm_config(
                vllm_config=vllm_config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=False,
                disable_log_stats=engine_args.disable_log_stats,
            )
        self._engine = engine
        state = State()
        await init_app_state(engine, state, args, await engine.get_supported_tasks())
        models = state.openai_serving_models
        registry = self._app.registry
        cache = NodeCache(
            Path(registry.cache_dir),
            make_resolver(self._app),
            max_bytes=registry.cache_max_bytes,
            max_adapter_bytes=registry.max_adapter_bytes,
        )
        pin_room = self._config.max_pinned_loras + 1 if self._config.max_pinned_loras else 0
        self._loader = AdapterLoader(engine, models, cache, self._config.model_id, pin_room)
        request_types = request_models(self._app.router.max_prompt_tokens)
        self._routes = build_routes(state, request_types)
        self._parser_routes = {
            parser: build_routes(with_tool_parser(state, parser, args), request_types)
            for parser in self._config.tool_parsers()
            if parser != self._config.tool_call_parser
        }

    @property
    def _llm(self) -> AsyncLLM:
        if self._engine is None:
            raise RuntimeError("the engine has not been started")
        return self._engine

    @property
    def _adapters(self) -> AdapterLoader:
        if self._loader is None:
            raise RuntimeError("the engine has not been started")
        return self._loader

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None
    ) -> AsyncGenerator[ReplicaItem, None]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        self._changes += 1
        parser = adapter.tool_call_parser if adapter is not None else None
        route = (self._parser_routes.get(parser, self._routes) if parser else self._routes)[endpoint]
        streaming = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        client_wants_usage = streaming and bool(options.get("include_usage"))
        if streaming and route.usage_api == "openai":
            # Always ask vLLM for the final usage event: the router's token metrics need it.
            body = {**body, "stream_options": {**options, "include_usage": True}}

        if adapter is not None and (failure := await self._install(adapter)) is not None:
            yield failure
            return

        result: object
        try:
            result = await route.serve(route.parse(body))
        except ValidationError as exc:
            yield validation_error(exc)
            return
        except (ValueError, VLLMClientError) as exc:
            yield from_vllm_error(route.error_response(exc))
            return

        if isinstance(result, ErrorResponse):
            yield from_vllm_error(result)
        elif isinstance(result, BaseModel):
            yield route.dump(result)
        elif isinstance(result, AsyncGenerator):
            usage: Usage | None = None
            reader = StreamUsage(route.usage_api)
            # Closed at once when the caller leaves mid-stream: vLLM then aborts the request.
            async with aclosing(result) as events:
                async for item in events:
                    event = sse(item)
                    closing = usage is None and (usage := reader.read(event)) is not None
                    if closing and route.usage_api == "openai" and not client_wants_usage:
                        continue  # asked for by the router, not by the client
                    yield event
            if usage is not None:
                yield usage

    async def _install(self, adapter: AdapterRecord) -> WireError | None:
        """Loads `adapter` unless held; the error to answer when it cannot be loaded."""
        try:
            await self._adapters.ensure(adapter)
        except Exception as exc:
            return install_failure(adapter, exc)
        return None

    async def check_health(self) -> None:
        """A round trip through the engine core: a wedged core never answers, so Serve's check times out.

        `is_sleeping` is answered by the core between two steps without waking the worker: a worker stuck in
        a step blocks the core, so that is caught too; an idle worker is left asleep.
        """
        await self._llm.check_health()
        await self._llm.is_sleeping()

    def held(self) -> list[str]:
        return self._loader.held() if self._loader is not None else []

    def lora_slots(self) -> int | None:
        lora = self._llm.vllm_config.lora_config
        return int(lora.max_loras) if lora is not None else None

    async def warm(self, adapter: AdapterRecord) -> bool:
        lora = self._llm.vllm_config.lora_config
        room = lora.max_cpu_loras if lora is not None and lora.max_cpu_loras is not None else 0
        if adapter.name not in self.held() and len(await self._engine_lora_ids()) >= room:
            return False
        self._changes += 1
        await self._adapters.ensure(adapter, ahead=True)
        return True

    async def prefetch(self, adapter: AdapterRecord) -> None:
        self._changes += 1
        await self._adapters.prefetch(adapter)

    async def stage(self, adapter: AdapterRecord) -> bool:
        return await self._adapters.stage(adapter, self._app.registry.cache_stage_bytes) != "full"

    async def forget(self, name: str) -> None:
        if self._loader is not None:
            self._changes += 1
            await self._loader.forget(name)

    async def _engine_lora_ids(self) -> set[int]:
        """The engine's adapter ids, asked again only when requests ran (or run) since the last time."""
        if self._engine_loras is None or self._changes != self._listed_at:
            changes = self._changes
            self._engine_loras = await self._llm.list_loras()
            # Requests still running may change them after this look: ask again next time.
            self._listed_at = -1 if self._llm.get_num_unfinished_requests() else changes
        return self._engine_loras

    async def report(self, replica: str) -> ReplicaReport:
        loader = self._adapters
        engine_ids = await self._engine_lora_ids()
        return ReplicaReport(
            replica=replica,
            adapters=tuple(loader.held()),
            engine_loras=len(engine_ids),
            resident=tuple(loader.observe_engine(engine_ids)),
            stats=replace(
                loader.stats,
                load_buckets=list(loader.stats.load_buckets),
                cache_bytes=loader.cache.stats.bytes,
                cache_errors=loader.cache.stats.errors,
                cache_error=loader.cache.stats.last_error,
                cache_error_at=loader.cache.stats.last_error_at,
            ),
            running=self._llm.get_num_unfinished_requests(),
        )

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()


def from_vllm_error(response: ErrorResponse) -> WireError:
    """vLLM's error (its `code` is the HTTP status) in the wire protocol's terms."""
    error = response.error
    status = int(error.code)
    return WireError(status=status, message=error.message, param=error.param)


def validation_error(exc: ValidationError) -> WireError:
    """A pydantic validation failure of vLLM's request model, naming the first offending field."""
    first = exc.errors(include_url=False)[0]
    cause = (first.get("ctx") or {}).get("error")
    param = getattr(cause, "parameter", None) or ".".join(str(part) for part in first["loc"]) or None
    message = str(cause) if cause is not None else first["msg"]
    return WireError(status=400, message=message, param=param)
