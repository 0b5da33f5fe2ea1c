"""Configuration of a loraplex application: documented pydantic models, loadable from YAML.

The same models back the `loraplex serve` flags, the `--config FILE.yaml` file and the
`args:` block of a Ray Serve config (`import_path: serve.app:build_app`).
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from serve.adapters.validation import AdapterInvalid, base_linear_shapes

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)


def is_adapter_name(value: str) -> bool:
    """Whether `value` is a usable adapter name: the whole string matches (`$` alone lets a trailing newline
    through) and it is not `.` or `..` (it names folders in the node cache and in sources)."""
    return _ADAPTER_NAME.fullmatch(value) is not None and value.strip(".") != ""


# vLLM sizes its LoRA buffers by max_lora_rank and accepts only these bounds.
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimulatedEngineConfig(_Strict):
    """A stand-in engine with no model: it answers in the wire protocol at a set step rate.

    For measuring the serving path at GPU token rates on any machine, and for router tests that need
    no model. Like a real engine it runs steps: each step gives every running sequence
    `tokens_per_step` tokens; at most `EngineConfig.max_num_seqs` sequences run, the rest wait.
    """

    step_ms: float = Field(default=20.0, gt=0, description="Duration of one engine step (decode), in milliseconds.")
    tokens_per_step: int = Field(default=1, ge=1, description="Tokens each running sequence gets per step.")
    prefill_ms: float = Field(
        default=0.0, ge=0, description="Extra time before a sequence's first token (prompt processing)."
    )
    adapter_load_ms: float = Field(
        default=0.0, ge=0, description="Time to load an adapter the engine does not hold yet."
    )
    default_max_tokens: int = Field(
        default=16, ge=1, description="Tokens generated when a request sets no max_tokens (a real engine stops at EOS)."
    )
    lora_slots: bool = Field(
        default=False,
        description=(
            "Model the engine's LoRA slots: a step runs requests of at most `EngineConfig.max_loras` adapters "
            "(4 when unset), admitted as vLLM's scheduler admits them, under the slot policy (`slot_wait_s`)."
        ),
    )


GPU_LORA_SLOTS = 4
CPU_LORA_SLOTS = (4, 16)
CPU_LORA_BUFFER_BYTES = 2 * 1024**3


def lora_slot_bytes(model_dir: Path, max_rank: int, dtype_bytes: int) -> int:
    """Bytes of one LoRA slot's buffers in vLLM: A (rank x in) and B (out x rank) for every linear layer of the
    decoder layers, at the rank bound; 0 when the model's weights cannot be read (no folder, a simulated engine)."""
    try:
        shapes = base_linear_shapes(model_dir)
    except (OSError, AdapterInvalid):
        return 0
    return sum((out + into) * max_rank * dtype_bytes for name, (out, into) in shapes.items() if ".layers." in name)


class EngineConfig(_Strict):
    """Settings of the engine that each engine replica runs: vLLM, or the simulated engine."""

    kind: Literal["vllm", "simulated"] = Field(
        default="vllm",
        description="`vllm`: the real engine. `simulated`: no model, tokens at a set rate (`simulated`), for "
        "measuring the serving path and testing routing.",
    )
    simulated: SimulatedEngineConfig = Field(
        default_factory=SimulatedEngineConfig, description="Step rate and sizes of the simulated engine."
    )
    model: str = Field(
        description="Path of a Hugging Face-format causal LM folder (with the simulated engine, only its name is used)."
    )
    served_model_name: str | None = Field(
        default=None,
        description="Public id of the base model; defaults to the model folder's name.",
    )
    max_loras: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Adapters that can take part in one engine step (the engine's LoRA slots). None: 4 on a GPU; on a "
            "CPU, as many as fit in 2 GiB of LoRA buffers, 4 to 16 (16 for the demo model at rank bound 64): "
            "there slots cost host memory only, and a request whose adapter finds no free slot waits."
        ),
    )
    max_lora_rank: LoraRank = Field(
        default=64,
        description=(
            "Largest adapter rank accepted. vLLM sizes its LoRA buffers by this bound, so on CPU it "
            "dominates the cost of adapter requests: 64 admits most published adapters; lower it "
            "(e.g. 16) when every adapter you serve is small."
        ),
    )
    max_cpu_loras: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Unpinned adapters kept in the engine's CPU cache (LRU). Default: 4 x max_loras with the slot policy "
            "on (slot_wait_s), so an adapter that gave its slot up is still in memory when it gets one back; "
            "max_loras with it off."
        ),
    )
    max_pinned_loras: int = Field(
        default=2,
        ge=0,
        description=(
            "Adapters that may be pinned (a version being rolled out of a pinned adapter counts as one more). The "
            "engine's adapter cache holds them beside max_cpu_loras unpinned ones (and one spare for a version "
            "switch), so a step of max_loras other adapters never evicts one of its own; a pin beyond this is "
            "refused (409)."
        ),
    )
    slot_wait_s: float | None = Field(
        default=1.0,
        gt=0,
        description=(
            "Bound on an adapter's wait for one of the engine's max_loras slots, in seconds: past it, its requests "
            "go first and, when no slot is free, the holder with the fewest running requests gives its slot up "
            "(those requests pause, keeping their KV cache, and go on later; serve/slots.py). A request then waits "
            "at most slot_wait_s + slot_hold_s while fewer adapters are overdue than there are slots. None: vLLM's own "
            "rule (first come, first served; a running request keeps its slot until it ends)."
        ),
    )
    slot_hold_s: float = Field(
        default=1.0,
        ge=0,
        description="Least time an adapter keeps a slot it gained before the slot policy may take it for another.",
    )
    max_model_len: int = Field(default=2048, ge=16, description="Longest prompt plus completion, in tokens.")
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences the engine batches in one step.")
    dtype: Literal["checkpoint", "auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Weights and activations type. `auto`: vLLM's own choice on a GPU (the checkpoint's half type), "
            "float32 on a CPU, where vLLM's bfloat16 with LoRA enabled streamed 3.5x slower here. `checkpoint` "
            "uses the dtype the model's config.json declares (float32 for the demo model), so outputs match "
            "transformers + PEFT exactly."
        ),
    )
    kv_cache_gib: float = Field(default=2.0, gt=0, description="KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(
        default=0.5, gt=0, le=1, description="Fraction of accelerator memory the engine may use."
    )
    cpu_threads_bind: str = Field(
        default="auto",
        description="CPU cores of the engine's worker (VLLM_CPU_OMP_THREADS_BIND): `auto`, `nobind` or ids like `0-3`.",
    )
    spawn_cpus: list[int] | None = Field(
        default=None,
        description=(
            "CPUs the engine's own processes may use when its replica was confined to fewer; `loraplex serve` sets "
            "it when it keeps Ray's processes off vLLM's cores (--infra-cpus). None: the replica's CPUs."
        ),
    )
    tool_call_parser: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "vLLM's tool-call parser for this model's chat format (e.g. `hermes`, `llama3_json`, `mistral`): chat and "
            "Responses requests may then send `tools` with `tool_choice` auto, required or a named function. None: "
            "tools are refused (vLLM's `--enable-auto-tool-choice --tool-call-parser`)."
        ),
    )
    tool_call_parsers: list[str] = Field(
        default_factory=list,
        description=(
            "More tool-call parsers, for adapters whose chat format differs from the base model's: an adapter "
            "registered with `tool_call_parser` set to one of these (or to `tool_call_parser`) gets tools with that "
            "parser. Each is built when the engine starts, so a name vLLM does not know stops it at start."
        ),
    )
    enforce_eager: bool = Field(default=True, description="Skip graph capture; faster start-up on CPU.")
    seed: int = Field(default=0, description="Engine seed, for reproducible sampling with a request seed.")

    @model_validator(mode="after")
    def _cpu_tier_holds_engine_slots(self) -> EngineConfig:
        if self.max_cpu_loras is not None and self.max_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        return self

    def lora_slots(self, on_cpu: bool) -> int:
        """`max_loras`, or its default for the device: on a CPU, the slots whose LoRA buffers fit in
        `CPU_LORA_BUFFER_BYTES` (vLLM sizes every slot's buffers by `max_lora_rank`), within 4..16."""
        if self.max_loras is not None:
            return self.max_loras
        if not on_cpu:
            return GPU_LORA_SLOTS
        dtype_bytes = 2 if self.dtype in ("bfloat16", "float16") else 4
        per_slot = lora_slot_bytes(Path(self.model), self.max_lora_rank, dtype_bytes)
        fitting = CPU_LORA_BUFFER_BYTES // per_slot if per_slot else CPU_LORA_SLOTS[1]
        slots = max(CPU_LORA_SLOTS[0], min(CPU_LORA_SLOTS[1], int(fitting)))
        if self.max_cpu_loras is not None:
            slots = min(slots, self.max_cpu_loras)
        return slots

    def slot_policy_config(self) -> dict[str, dict[str, float]]:
        """vLLM's `additional_config` for loraplex's slot policy (serve/vllm_slots.py); empty when it is off."""
        if self.slot_wait_s is None:
            return {}
        return {"loraplex_slots": {"wait_s": self.slot_wait_s, "hold_s": self.slot_hold_s}}

    def tool_parsers(self) -> tuple[str, ...]:
        """Every tool-call parser the engine loads: the server's, then the adapters' others."""
        named = [self.tool_call_parser, *self.tool_call_parsers] if self.tool_call_parser else self.tool_call_parsers
        return tuple(dict.fromkeys(named))

    def unpinned_cache_entries(self, slots: int) -> int:
        """`max_cpu_loras`, or its default for an engine with `slots` LoRA slots."""
        return self.max_cpu_loras or (4 * slots if self.slot_wait_s is not None else slots)

    def cpu_cache_entries(self, slots: int) -> int:
        """The engine's adapter cache size: the unpinned adapters (`unpinned_cache_entries`), the pinned ones
        allowed, and one spare for a pinned adapter's version switch (its new version is pinned before the old
        one leaves)."""
        return self.unpinned_cache_entries(slots) + (self.max_pinned_loras + 1 if self.max_pinned_loras else 0)

    def engine_dtype(self) -> str:
        """The dtype passed to vLLM: `checkpoint` resolved from the model's config.json."""
        if self.dtype != "checkpoint":
            return self.dtype
        config_file = Path(self.model) / "config.json"
        if not config_file.is_file():
            return "auto"
        declared = json.loads(config_file.read_text())
        value = declared.get("dtype") or declared.get("torch_dtype")
        return value if value in ("float32", "bfloat16", "float16") else "auto"

    @property
    def model_id(self) -> str:
        """The id clients use for the base model."""
        return self.served_model_name or Path(self.model).name


class AdapterConfig(_Strict):
    """A LoRA adapter served from the start."""

    name: str = Field(description="Adapter name, `[A-Za-z0-9._-]`; clients ask for `BASE:NAME` or `NAME`.")
    path: str = Field(description="Folder of a PEFT LoRA adapter (adapter_config.json + safetensors).")

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not is_adapter_name(value):
            raise ValueError(f"adapter name {value!r} must match {ADAPTER_NAME_PATTERN}")
        return value


class Autoscaling(_Strict):
    """Ray Serve autoscaling of the engine deployment (its `autoscaling_config`).

    An engine replica takes tens of seconds to start (model load) and holds adapters in memory, so
    the defaults scale up after a sustained backlog and down only after long quiet.
    """

    min_replicas: int = Field(
        default=1, ge=1, description="Replicas kept however quiet (an engine cannot cold-start fast)."
    )
    max_replicas: int = Field(default=4, ge=1, description="Most replicas; bound it by the accelerators you have.")
    target_ongoing_requests: float = Field(
        default=32,
        gt=0,
        description="Requests in flight per replica that Serve aims for; about half of max_ongoing_requests "
        "keeps batches full without queueing.",
    )
    upscale_delay_s: float = Field(
        default=30.0, ge=0, description="Backlog must last this long before adding a replica."
    )
    downscale_delay_s: float = Field(
        default=600.0, ge=0, description="Quiet must last this long before removing one (its adapters are lost)."
    )
    look_back_period_s: float = Field(
        default=30.0, gt=0, description="Serve averages requests in flight over this window before deciding."
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class EngineDeploymentConfig(_Strict):
    """How the engine deployment is scaled, routed to and guarded by Ray Serve."""

    num_replicas: int = Field(
        default=1, ge=1, description="Engine replicas, each with its own vLLM engine (ignored with `autoscaling`)."
    )
    autoscaling: Autoscaling | None = Field(default=None, description="Scale the replica count with load.")
    request_router: Literal["affinity", "power-of-two"] = Field(
        default="affinity",
        description="How requests pick an engine replica: `affinity` (adapter affinity with bounded load, "
        "routing/policy.py) or Ray Serve's default `power-of-two` choices, for comparison.",
    )
    affinity_epsilon: float = Field(
        default=0.25,
        gt=0,
        description="Load bound of adapter-affine routing: no replica gets more than (1 + epsilon) x the mean "
        "requests in flight; smaller spreads load more evenly, larger loads adapters less often.",
    )
    affinity_min_load: int = Field(
        default=8,
        ge=0,
        description="Requests in flight below which a replica is never treated as overloaded by affinity "
        "routing: the engine batches them for about the price of one, while loading the adapter elsewhere "
        "costs a load and an eviction.",
    )
    routing_stats_period_s: float = Field(
        default=2.0, gt=0, description="Seconds between replicas' reports of the adapters they hold, for routing."
    )
    warm_adapters: int = Field(
        default=8,
        ge=0,
        description="Adapters a replica that joins (scale-out, replacement) loads in the background before it is "
        "preferred for them: the hottest of the last minutes whose rendezvous home it becomes. Bounded by the "
        "engine's CPU LoRA cache (max_cpu_loras); 0 turns warming off.",
    )
    num_cpus: float = Field(default=1.0, gt=0, description="Logical Ray CPUs reserved per engine replica.")
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests one replica accepts at once; more wait in the router."
    )
    max_queued_requests: int = Field(
        default=256,
        ge=1,
        description="Requests a router replica holds waiting for engine capacity; beyond that it answers 503.",
    )
    health_check_period_s: float = Field(default=10.0, gt=0, description="Seconds between engine health checks.")
    stream_batch_ms: float = Field(
        default=50.0,
        ge=0,
        description="How long a replica gathers a stream's events before sending them to the router as one item "
        "(each item costs CPU at every hop). The first event goes at once; later ones wait at most this long, "
        "so it bounds the added inter-token delay. 0 sends whatever is ready, without waiting.",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "Seconds a stopping engine replica (at shutdown, scale-down or replacement) keeps serving the requests "
            "it has in flight before Ray Serve kills it."
        ),
    )


KEY_NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
_KEY_NAME = re.compile(KEY_NAME_PATTERN)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ApiKeyConfig(_Strict):
    """One API key, stored as the SHA-256 of the key (never the key itself), with its scope and limits."""

    name: str = Field(
        description="The key's public id, `[A-Za-z0-9._@-]`: shown in the audit log, rate limits and fair share."
    )
    sha256: str = Field(
        description="Hex SHA-256 of the whole key string (`lpx-...`), as `loraplex keys create` writes it."
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="Adapter names or globs (`support-*`, `*`) this key may use; matched against the bare name.",
    )
    base: bool = Field(default=False, description="Whether this key may use the base model itself.")
    admin: bool = Field(
        default=False,
        description="Whether this key may write adapters (register, unregister, vLLM load/unload) and list them all.",
    )
    metrics: bool = Field(
        default=False,
        description="Whether this key may read `/metrics` (admin keys may too): the key to give Prometheus.",
    )
    compose: bool = Field(
        default=False,
        description=(
            "Whether this key may send a request's `compose` (an inline composite of adapters it may use; admin keys "
            "may too). Each new composite costs the registry a PEFT build and a folder on every node, so it is off "
            "unless granted; registered composites (`POST /v1/adapters` with `compose`) need admin."
        ),
    )
    rpm: int | None = Field(
        default=None, ge=1, description="Requests per minute (generation requests); None: no limit."
    )
    tpm: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per minute, prompt plus completion (estimated at admission, then settled); None: no limit.",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        description="Share of the engine this key gets when the router is backlogged, relative to other keys' weights.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not _KEY_NAME.fullmatch(value):
            raise ValueError(f"key name {value!r} must match {KEY_NAME_PATTERN}")
        return value

    @field_validator("sha256")
    @classmethod
    def _is_a_digest(cls, value: str) -> str:
        if not _SHA256.fullmatch(value):
            raise ValueError("sha256 must be 64 lowercase hex digits: the key's hash, never the key")
        return value


def _unique_keys(keys: list[ApiKeyConfig]) -> list[ApiKeyConfig]:
    for attribute in ("name", "sha256"):
        values = [getattr(key, attribute) for key in keys]
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ValueError(f"API key {attribute}s must be unique, repeated: {repeated}")
    return keys


class KeysFile(_Strict):
    """The keys file (`auth.keys_file`): YAML or JSON, `keys: [...]`."""

    keys: list[ApiKeyConfig] = Field(default_factory=list, description="The API keys.")

    _unique = field_validator("keys")(_unique_keys)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is reachable from this machine only."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another name: it may resolve to anything
        return False


class AuthConfig(_Strict):
    """API keys and the audit log. With no keys at all the server is open to anyone who reaches it."""

    keys_file: str | None = Field(
        default=None,
        description=(
            "YAML or JSON file of API keys (a mounted secret works); re-read when it changes. "
            "Setting it closes the server even while the file holds no keys."
        ),
    )
    keys: list[ApiKeyConfig] = Field(
        default_factory=list, description="API keys given inline (hashes only), in addition to `keys_file`."
    )
    audit_file: str | None = Field(
        default=None,
        description=(
            "File that adapter writes are appended to as JSON lines; they always go to the `loraplex.audit` log."
        ),
    )

    allow_open: bool = Field(
        default=False,
        description=(
            "Serve without keys on an address other than loopback. Without it such a server refuses to start "
            "(`loraplex serve --allow-open` sets it): an open server lets anyone who reaches it register and remove "
            "adapters."
        ),
    )

    _unique = field_validator("keys")(_unique_keys)

    @property
    def is_open(self) -> bool:
        """True when no key is configured: every request is served without authentication."""
        return self.keys_file is None and not self.keys


class RouterConfig(_Strict):
    """The OpenAI-compatible router (the application's ingress)."""

    def open_refusal(self, listen_host: str | None) -> str | None:
        """Why this router must not start open on `listen_host` (None: an address it cannot know), or None.

        Redis' protected mode is the precedent: no keys is fine on loopback, refused elsewhere unless asked for.
        """
        if not self.auth.is_open or self.auth.allow_open or (listen_host is not None and is_loopback(listen_host)):
            return None
        where = f"on {listen_host}" if listen_host is not None else "behind Ray Serve's proxy (any address)"
        return (
            f"refusing to serve {where} without API keys: anyone who reached it could use every model and register "
            "or remove adapters. Create keys (`loraplex keys create --name NAME --admin --file keys.yaml`) and set "
            "router.auth.keys_file (or --keys-file), listen on 127.0.0.1, or, to serve openly on purpose, set "
            "router.auth.allow_open: true (or --allow-open)."
        )

    ingress: Literal["direct", "serve-proxy"] = Field(
        default="direct",
        description=(
            "How HTTP reaches the router. `direct`: every router replica serves `host:port` itself (replicas on one "
            "node share the port, SO_REUSEPORT) and Ray Serve runs no HTTP proxy, so a streamed token crosses one "
            "process boundary fewer. `serve-proxy`: Ray Serve's HTTP proxy on every node relays to the router "
            "replicas (its `http_options` give the address)."
        ),
    )
    host: str = Field(default="127.0.0.1", description="Address the router listens on with `ingress: direct`.")
    engine_transport: Literal["grpc", "ray"] = Field(
        default="grpc",
        description=(
            "How a request and its first item travel between router and engine replica through the engine "
            "deployment's handle: `grpc`, Ray Serve's inter-deployment gRPC (each replica's own gRPC server; Ray "
            "Serve's throughput-optimized default, RAY_SERVE_USE_GRPC_BY_DEFAULT) or `ray`, Ray actor calls with "
            "streaming object refs. Placement, queue lengths, back-pressure and cancellation are Serve's either way; "
            "gRPC costs the router about half the CPU per request (docs/benchmarks/serving-path.md)."
        ),
    )
    stream_channel: bool = Field(
        default=True,
        description=(
            "Streams' items after the first come from engine replicas over one direct TCP connection per router "
            "and replica (serve/wire/channel.py: the router listens on its node's address, replicas prove a per-router "
            "token), every stream's items of one engine step in one write, instead of one Ray item per stream per "
            "`stream_batch_ms`. Requests, first items, cancellation and retries still go through Ray Serve. False: "
            "everything over Ray (for networks where replicas cannot open connections to routers)."
        ),
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port the router listens on with `ingress: direct`.")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Names an open server (no keys) answers in the `Host` header besides `localhost`, `*.localhost` and IP "
            "addresses: an exact name, `*.example.com` for its subdomains, or `*` for any name (no check). Other "
            "names get 403, so a web page whose domain is rebound to this address cannot use the server from the "
            "browser. A server with keys checks no `Host`."
        ),
    )
    num_replicas: int = Field(default=1, ge=1, description="Router replicas (they share one port per node).")
    max_ongoing_requests: int = Field(default=256, ge=1, description="Requests one router replica accepts at once.")
    max_adapter_labels: int = Field(
        default=50,
        ge=1,
        description="Distinct adapter values in metric labels; further adapters are counted as `other`.",
    )
    public_metrics: bool = Field(
        default=False,
        description=(
            "Serve `/metrics` without a key. By default a server with keys answers it only to keys with the "
            "`metrics` or `admin` scope (it names adapters and their traffic); an open server serves it to anyone."
        ),
    )
    console: bool = Field(
        default=True,
        description=(
            "Serve the web console at `/ui`: a page (shipped in the package, nothing fetched from elsewhere) that asks "
            "for an API key and shows what that key may see. Its data come from the key-checked `/v1/console/...` "
            "routes, which answer either way."
        ),
    )
    console_window_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description=(
            "Seconds of traffic the console's per-model statistics cover (requests, tokens, error rate, p50/p99 "
            "latency), kept by each router replica in bounded memory."
        ),
    )
    max_n: int = Field(default=8, ge=1, description="Largest `n` (choices per request) accepted.")
    max_sequences: int = Field(
        default=256,
        ge=1,
        description=(
            "Most sequences one completions request may generate: prompts in its batch times `n` (400 naming "
            "`prompt` beyond it). Rate limits and the fair-share gate count a request once, so without this one "
            "request could carry a million prompts."
        ),
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Largest `max_tokens` / `max_completion_tokens` a request may ask for (400 beyond it); also sent as "
            "`max_tokens` when a request gives none. None: only the engine's max_model_len bounds completions."
        ),
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most tokens a prompt may have (chat and Messages: after the chat template, tools included), counted by "
            "the engine's tokenizer on every route (completions, chat, Responses, Messages, /tokenize); longer "
            "prompts get 400 (param prompt, messages or input). None: only the engine's max_model_len bounds them."
        ),
    )
    max_schema_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description=(
            "Most bytes of JSON a request's grammar inputs may take together: `response_format`, "
            "`structured_outputs`, Responses' `text`, Messages' `output_config`, `tools` and `tool_choice`, which "
            "vLLM may compile into a grammar in the engine's process (400 naming the field beyond it)."
        ),
    )
    max_schema_repetition: int = Field(
        default=10_000,
        ge=1,
        description=(
            "Most times a grammar input may repeat a part once nested counted repetitions are multiplied: regex "
            "`{m,n}` inside another (`(a{1,1000}){1,1000}` is 1,000,000), `minItems`/`maxItems` over an item schema, "
            "`maxLength` (400 naming the field beyond it). `*`, `+` and `?` count once. Bounds the grammar compile's "
            "time and memory in the engine replica."
        ),
    )
    allowed_media_domains: tuple[str, ...] = Field(
        default=(),
        description=(
            "Hosts (exact names, e.g. `images.example.com`) whose http(s) media URLs a prompt may hold: chat "
            "`image_url`/`audio_url`/`video_url` parts, Responses `input_image`/`input_file`, Anthropic `source.url`. "
            "vLLM fetches them from the engine replica's network, so by default none are (400 naming the part): "
            "media come inline as `data:` URLs. Also given to vLLM as `--allowed-media-domains`."
        ),
    )
    extra_chat_roles: tuple[str, ...] = Field(
        default=(),
        description="Chat roles accepted besides OpenAI's (system, developer, user, assistant, tool, function), "
        "for a chat template that uses more (e.g. `ipython`); other roles get 400.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request body, in bytes; larger bodies get 413."
    )
    body_read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a client has to send its whole request body (408 after); the key is checked first.",
    )
    max_inflight: int = Field(
        default=64,
        ge=1,
        description=(
            "Generation requests one router replica sends to the engines at once. Below it requests go straight "
            "through; above it they wait in per-key queues served by fair share (key weights). Size it near "
            "engine replicas x engine max_ongoing_requests / router replicas."
        ),
    )
    fair_share_reserve: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Slots of max_inflight that only keys below their fair share may take, so a light tenant's request "
            "starts at once instead of waiting for a heavy tenant's to finish. None: max_inflight // 8, at least 1."
        ),
    )
    max_waiting: int = Field(
        default=192,
        ge=0,
        description="Requests one router replica holds waiting for an engine slot; beyond that it answers 503.",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "Seconds a stopping router replica keeps relaying the requests it has in flight, streams included, "
            "before Ray Serve kills it. On SIGTERM `loraplex serve` drains for the longer of this and the engine "
            "deployment's graceful_shutdown_timeout_s."
        ),
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys and the audit log.")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, names: list[str]) -> list[str]:
        normalized = []
        for given in names:
            name = given.strip().lower()
            if name != "*":
                name = name.rstrip(".")
                wildcard = name.removeprefix("*.")
                if not wildcard or any(c in wildcard for c in "*/:[] "):
                    raise ValueError(f"allowed_hosts: {given!r} is not a host name, `*.NAME` or `*`")
            normalized.append(name)
        return normalized

    @model_validator(mode="after")
    def _fair_queue_fits_in_the_replica(self) -> RouterConfig:
        # Requests beyond max_ongoing_requests queue in Ray Serve first come, first served, out of fair share's reach.
        if self.max_inflight + self.max_waiting > self.max_ongoing_requests:
            raise ValueError("max_inflight + max_waiting must not exceed max_ongoing_requests")
        return self


class RegistryConfig(_Strict):
    """Where the adapter registry keeps its state and which adapter sources it accepts."""

    store: str | None = Field(
        default=None,
        description=(
            "Where the registry keeps its records: `sqlite:///PATH` (a relative path; four slashes for an absolute "
            "one) or `s3://BUCKET/PREFIX` (one object per adapter, conditional writes; credentials and endpoint "
            "as for `s3://` sources), for clusters whose nodes share no disk. None: SQLite beside `state_file` "
            "(`registry.db`)."
        ),
    )
    state_file: str = Field(
        default=".loraplex/registry.json",
        description=(
            "The JSON state of earlier releases: imported into an empty store on first start, then renamed "
            "`.migrated`. With no `store`, its folder holds the SQLite database."
        ),
    )
    composites: str | None = Field(
        default=None,
        description=(
            "Where the registry stores the composite adapters it builds (one folder per composite, named by the hash "
            "of what it was made from): a folder every node can read, or `s3://BUCKET/PREFIX`. None: beside the "
            "store, `s3://BUCKET/PREFIX-composites` for an S3 store, the `composites` folder beside `state_file` "
            "otherwise."
        ),
    )
    max_pending_builds: int = Field(
        default=4,
        ge=1,
        description=(
            "New inline composites (a request's `compose` no one asked for before) the registry makes or has waiting "
            "at once, for every key together; one more is refused at once, 503 with `Retry-After`. Each waits on one "
            "of the registry's request slots, so this keeps them for routers' reads and health checks."
        ),
    )
    max_pending_builds_per_key: int = Field(
        default=1,
        ge=1,
        description="New inline composites one key may have being made or waiting at once; past it 429 with "
        "`Retry-After`.",
    )
    builds_per_key_per_minute: int | None = Field(
        default=10,
        ge=1,
        description=(
            "New inline composites one key may ask for in any minute (built with PEFT, or read back from the "
            "composite store after a restart); past it 429 with `Retry-After`. Composites made before cost nothing. "
            "None: no bound."
        ),
    )
    cache_dir: str = Field(
        default=".loraplex/adapter-cache", description="Per-node copies of adapters, one folder per content hash."
    )
    local_roots: list[str] = Field(
        default_factory=list,
        description=(
            "Folders under which local (`/path`, `file://`) adapter sources may be registered through the API. "
            "Folders of adapters given in the config or on the command line are always allowed."
        ),
    )
    max_adapter_bytes: int = Field(default=2 * 1024**3, ge=1, description="Largest adapter accepted, in bytes.")
    cache_max_bytes: int | None = Field(
        default=20 * 1024**3,
        ge=1,
        description=(
            "Bound of each node's adapter cache (`cache_dir`), in bytes: the least recently used copies no engine "
            "replica on the node has installed are deleted beyond it. None: unbounded."
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint for `s3://` sources (MinIO, moto, ...); None means AWS."
    )
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(default=None, description="S3 key id; None uses the usual AWS chain.")
    s3_secret_access_key: SecretStr | None = Field(
        default=None,
        description=(
            "S3 secret; None uses the usual AWS chain (environment, shared files, IAM roles: preferred, as it keeps "
            "the secret out of configs). Never rendered: reprs, dumps and logs show `**********`."
        ),
    )
    hf_endpoint: str | None = Field(
        default=None,
        description=(
            "Hugging Face Hub endpoint for `hf://` sources (a mirror, a private hub); None: huggingface_hub's "
            "default (`HF_ENDPOINT`, else https://huggingface.co)."
        ),
    )
    hf_token: SecretStr | None = Field(
        default=None,
        description=(
            "Hub token for private or gated `hf://` sources; None: the one huggingface_hub finds itself (`HF_TOKEN`, "
            "else a saved `hf auth login`; preferred, as it keeps the secret out of configs). Never rendered."
        ),
    )

    @field_validator("store")
    @classmethod
    def _store_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("s3://"):
            if not urlparse(value).netloc:
                raise ValueError("an s3:// registry store needs a bucket: s3://BUCKET/PREFIX")
        elif not (value.startswith("sqlite:///") and len(value) > len("sqlite:///")):
            raise ValueError(f"registry store {value!r}: use sqlite:///PATH or s3://BUCKET/PREFIX")
        return value

    @property
    def store_url(self) -> str:
        """The store's URL, `store` or the SQLite database beside `state_file`."""
        return self.store or f"sqlite:///{Path(self.state_file).with_name('registry.db')}"

    @property
    def composites_url(self) -> str:
        """Where composites go: `composites`, or the default beside the store."""
        if self.composites:
            return self.composites
        if self.store and self.store.startswith("s3://"):
            return self.store.rstrip("/") + "-composites"
        return str(Path(self.state_file).with_name("composites").resolve())


class TracingConfig(_Strict):
    """OpenTelemetry traces of generation requests, in the router and the engine replicas, sent to an OTLP collector.

    Off without `otlp_endpoint`: no tracer is built and requests do no tracing work. On, each authenticated request
    gets spans per phase (auth, admission, replica choice, adapter load, queue, the whole generation), never per
    token, in the trace of the client's W3C `traceparent` header when it sends one; the router alone decides which
    requests are traced (`sample_ratio`), and a request without a valid key gets no span.
    """

    otlp_endpoint: str | None = Field(
        default=None,
        description=(
            "The OTLP collector spans go to, e.g. `http://127.0.0.1:4318` (`http/protobuf`: to its `/v1/traces`) or "
            "`http://127.0.0.1:4317` (`grpc`). None: tracing is off."
        ),
    )
    otlp_protocol: Literal["http/protobuf", "grpc"] = Field(
        default="http/protobuf", description="How spans are sent to `otlp_endpoint`: OTLP over HTTP or gRPC."
    )
    service_name: str = Field(
        default="loraplex",
        min_length=1,
        description="`service.name` of the spans, `-router` or `-engine` appended by the process that made them.",
    )
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description=(
            "Fraction of authenticated generation requests that are traced, by the router's own random draw: a "
            "client's `traceparent` sampled flag and trace id do not change it (its trace id is kept, so the spans "
            "join the client's trace)."
        ),
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        if value is not None and urlparse(value).scheme not in ("http", "https"):
            raise ValueError(f"otlp_endpoint {value!r} must be an http:// or https:// URL")
        return value

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded and exported at all."""
        return self.otlp_endpoint is not None


class AppConfig(_Strict):
    """A whole loraplex application: one base model, its adapters, and how it is deployed."""

    engine: EngineConfig
    adapters: list[AdapterConfig] = Field(default_factory=list, description="Adapters served from the start.")
    engine_deployment: EngineDeploymentConfig = Field(default_factory=EngineDeploymentConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="OpenTelemetry tracing of requests; off unless given an endpoint."
    )

    @model_validator(mode="after")
    def _adapter_names_unique(self) -> AppConfig:
        names = [adapter.name for adapter in self.adapters]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"adapter names must be unique, repeated: {duplicates}")
        return self


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> AppConfig:
    """Reads an AppConfig from YAML, then applies `overrides` (a nested dict) on top."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return AppConfig.model_validate(_merge(data, overrides or {}))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
