"""The router: how HTTP reaches it, what it accepts, how much it sends to the engines, and who may use it."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve.config._base import _Strict
from serve.config.auth import AuthConfig


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is reachable from this machine only."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another name: it may resolve to anything
        return False


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
        description=(
            "Requests one router replica holds waiting for a slot of its fair-share gate (max_inflight), all keys' "
            "queues together (routing/fairness.py). When they are full, a newcomer takes the place of the newest "
            "request of the key with the most waiting per unit of weight, which gets 503 with `Retry-After`, if that "
            "key would still have more waiting than the newcomer's; otherwise the newcomer gets that 503."
        ),
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
