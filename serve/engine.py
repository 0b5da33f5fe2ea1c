"""The engine replica: one in-process vLLM `AsyncLLM` with LoRA, behind vLLM's OpenAI serving layer.

Requests for the base model and for any adapter go into the same engine, so vLLM batches them
together step by step. Chat templates, sampling, logprobs and stop handling are vLLM's own; this
class adapts them to the replica's wire protocol (`serve.wire`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import BaseModel, ValidationError

from serve.adapters.loader import AdapterLoader
from serve.adapters.records import AdapterRecord, LoaderStats, ReplicaReport
from serve.adapters.registry import make_resolver
from serve.adapters.validation import AdapterInvalid
from serve.config import AdapterConfig, AppConfig, EngineConfig
from serve.prompt_limit import request_models
from serve.wire import Endpoint, EngineError, ReplicaItem, Usage

if TYPE_CHECKING:
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("loraplex.engine")
REGISTRY_POLL_S = 2.0
ENGINE_DIED_EXIT_CODE = 70
"""Exit status of a replica process whose vLLM engine died (EX_SOFTWARE)."""
ENGINE_CPUS_ENV = "LORAPLEX_ENGINE_CPUS"
"""CPUs the engine's processes may use when the replica itself was confined to fewer (`loraplex serve`)."""


@contextmanager
def engine_cpus() -> Iterator[None]:
    """While vLLM spawns its engine processes from this thread, lets them use the engine's CPUs.

    `loraplex serve` keeps Ray's processes (this replica among them) on the core vLLM reserves for
    its scheduler. Children inherit the spawning thread's CPU set and vLLM's automatic binding picks
    the worker's cores from it, so without this the model's worker would land on that one shared core
    and leave the others idle. Linux sets affinity per thread: only this thread is widened, then restored.
    """
    wanted = os.environ.get(ENGINE_CPUS_ENV)
    if not wanted:
        yield
        return
    confined = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(cpu) for cpu in wanted.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, confined)


def adapter_model_id(base_id: str, name: str) -> str:
    """The public id of adapter `name` on base model `base_id`."""
    return f"{base_id}:{name}"


def vllm_cli_args(config: EngineConfig, adapters: list[AdapterConfig]) -> list[str]:
    """The `vllm serve` flags equivalent to `config`; the reference server takes the same list."""
    args = [
        "--model", config.model,
        "--served-model-name", config.model_id,
        "--enable-lora",
        "--max-loras", str(config.max_loras),
        "--max-lora-rank", str(config.max_lora_rank),
        "--max-cpu-loras", str(config.max_cpu_loras or config.max_loras),
        "--max-model-len", str(config.max_model_len),
        "--max-num-seqs", str(config.max_num_seqs),
        "--dtype", config.engine_dtype(),
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--seed", str(config.seed),
        "--disable-log-stats",
    ]  # fmt: skip
    if config.enforce_eager:
        args.append("--enforce-eager")
    if adapters:
        args.append("--lora-modules")
        args.extend(f"{adapter_model_id(config.model_id, a.name)}={a.path}" for a in adapters)
    return args


def engine_env(config: EngineConfig) -> dict[str, str]:
    """Environment that vLLM reads at engine start-up (it has no arguments for these)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_cache_gib:g}",
        "VLLM_CPU_OMP_THREADS_BIND": config.cpu_threads_bind,
    }


class EngineReplica:
    """Hosts one vLLM engine and answers completions and chat requests in the wire protocol."""

    # Ray Serve awaits an async constructor, so the engine is up before the replica takes requests.
    async def __init__(self, app: AppConfig, registry: Any) -> None:  # type: ignore[misc]
        config = app.engine
        os.environ.update(engine_env(config))
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        self._config = config
        self._max_prompt_tokens = app.router.max_prompt_tokens
        # Adapters are not given to vLLM up front: the loader installs registered ones on first use.
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_cli_args(config, []))
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        with engine_cpus():
            self._engine: AsyncLLM = AsyncLLM.from_vllm_config(
                vllm_config=vllm_config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=False,
                disable_log_stats=engine_args.disable_log_stats,
            )
        state = State()
        await init_app_state(self._engine, state, args, await self._engine.get_supported_tasks())
        self._models: OpenAIServingModels = state.openai_serving_models
        self._completion: OpenAIServingCompletion = state.openai_serving_completion
        self._chat: OpenAIServingChat = state.openai_serving_chat
        self._registry = registry
        self._loader = AdapterLoader(
            self._engine, self._models, make_resolver(app), Path(app.registry.cache_dir), config.model_id
        )
        self._generation = 0
        self._watcher = asyncio.create_task(self._follow_registry())

    async def _follow_registry(self) -> None:
        """Reports this replica to the registry; frees adapters that were unregistered.

        New versions need no push: the router resolves the version and the next request loads it.
        """
        replica = _replica_id()
        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            try:
                engine_ids = await self._engine.list_loras()
                report = ReplicaReport(
                    replica=replica,
                    adapters=tuple(self._loader.held()),
                    engine_loras=len(engine_ids),
                    resident=tuple(self._loader.observe_engine(engine_ids)),
                    stats=replace(self._loader.stats, load_buckets=list(self._loader.stats.load_buckets)),
                    running=self._engine.get_num_unfinished_requests(),
                )
                generation = await self._registry.report.remote(report)
                if generation == self._generation:
                    continue
                snapshot = await self._registry.snapshot.remote()
                for name in set(self._loader.held()) - set(snapshot.records):
                    await self._loader.forget(name)
                self._generation = snapshot.generation
            except Exception:  # the registry restarting must not stop this replica from serving
                logger.warning("could not reach the adapter registry", exc_info=True)

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None = None
    ) -> AsyncIterator[ReplicaItem]:
        """Runs one request, for `adapter` at the version the router resolved; yields `serve.wire` items.

        Once the engine is dead, the replica ends (`exit_with_dead_engine`) rather than pass on what the
        request met: before the first item, the router then sends the request to another replica.
        """
        if self._engine.errored:
            exit_with_dead_engine()
        try:
            async with aclosing(self._generate(endpoint, body, adapter)) as items:
                async for item in items:
                    if self._engine.errored:
                        exit_with_dead_engine()
                    yield item
        finally:
            if self._engine.errored:
                exit_with_dead_engine()

    async def _generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None
    ) -> AsyncGenerator[ReplicaItem, None]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        streaming = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        client_wants_usage = streaming and bool(options.get("include_usage"))
        if streaming:
            # Always ask vLLM for the final usage event: the router's token metrics need it.
            body = {**body, "stream_options": {**options, "include_usage": True}}

        if adapter is not None:
            try:
                await self._loader.ensure(adapter)
            except AdapterInvalid as exc:
                yield EngineError(status=422, message=str(exc), type="invalid_request_error", param="model")
                return
            except Exception as exc:
                logger.exception("loading adapter %s failed", adapter.name)
                yield EngineError(
                    status=500, message=f"loading adapter {adapter.name!r} failed: {exc}", type="server_error"
                )
                return

        serving = self._completion if endpoint == "completions" else self._chat
        CompletionRequest, ChatCompletionRequest = request_models(self._max_prompt_tokens)
        result: object
        try:
            if endpoint == "completions":
                result = await self._completion.create_completion(CompletionRequest.model_validate(body))
            else:
                result = await self._chat.create_chat_completion(ChatCompletionRequest.model_validate(body))
        except ValidationError as exc:
            yield validation_error(exc)
            return
        except (ValueError, VLLMClientError) as exc:
            yield from_vllm_error(serving.create_error_response(exc))
            return

        if isinstance(result, ErrorResponse):
            yield from_vllm_error(result)
        elif isinstance(result, BaseModel):
            yield result.model_dump(mode="json")
        elif isinstance(result, AsyncGenerator):
            usage: Usage | None = None
            # Closed at once when the caller leaves mid-stream: vLLM then aborts the request.
            async with aclosing(result) as events:
                async for event in events:
                    if usage is None and (usage := final_usage(event)) is not None and not client_wants_usage:
                        continue
                    yield event
            if usage is not None:
                yield usage

    async def check_health(self) -> None:
        """Called by Ray Serve every `health_check_period_s`.

        A dead engine ends the replica, so Serve replaces it at once. An engine core that stopped
        answering (wedged) never completes the round trip below, so Serve's health check times out
        (`health_check_timeout_s`) and marks the replica unhealthy, as it does when this raises.
        """
        if self._engine.errored:
            exit_with_dead_engine()
        await self._engine.check_health()
        await self._engine.list_loras()  # answered by the engine core between two steps

    async def record_routing_stats(self) -> dict[str, Any]:
        """Called by Ray Serve every `routing_stats_period_s`; the request router reads it."""
        return {"adapters": self._loader.held()}

    async def adapters(self) -> list[str]:
        """Names of the adapters this replica holds."""
        return self._loader.held()

    async def stats(self) -> LoaderStats:
        return self._loader.stats

    def __del__(self) -> None:
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.cancel()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def exit_with_dead_engine() -> NoReturn:
    """Ends this replica's process: its vLLM engine died, and nothing left here can serve.

    vLLM's own API server exits the same way. Callers then see the replica die: routers retry
    requests that had not started on another replica, Serve's request routers stop picking it, and
    the controller replaces it at its next health check instead of after several failed ones.
    """
    logger.critical("the vLLM engine of this replica died; ending the replica so Ray Serve replaces it")
    logging.shutdown()  # flush the line above: os._exit skips interpreter clean-up
    os._exit(ENGINE_DIED_EXIT_CODE)


def _replica_id() -> str:
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a Serve replica (tests): the process is the replica
        return f"pid-{os.getpid()}"


def final_usage(event: str) -> Usage | None:
    """The token counts carried by a stream's closing usage event, or None for any other event."""
    if '"usage"' not in event or not event.startswith("data: {"):
        return None
    payload = json.loads(event[len("data: ") :])
    usage = payload.get("usage")
    if payload.get("choices") or not usage:
        return None
    return Usage(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage.get("completion_tokens") or 0)


def from_vllm_error(response: ErrorResponse) -> EngineError:
    """vLLM's error (its `code` is the HTTP status) in the wire protocol's terms."""
    error = response.error
    return EngineError(
        status=int(error.code), message=error.message, type=_error_type(int(error.code)), param=error.param
    )


def validation_error(exc: ValidationError) -> EngineError:
    """A pydantic validation failure of vLLM's request model, naming the first offending field."""
    first = exc.errors(include_url=False)[0]
    cause = (first.get("ctx") or {}).get("error")
    param = getattr(cause, "parameter", None) or ".".join(str(part) for part in first["loc"]) or None
    message = str(cause) if cause is not None else first["msg"]
    return EngineError(status=400, message=message, type="invalid_request_error", param=param)


def _error_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"
