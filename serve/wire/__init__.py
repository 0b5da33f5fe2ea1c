"""The contract between processes: what routers, engine replicas and the registry say to each other.

Both sides import it (routing/ imports nothing else of serve/ but the config): adapter ids, adapter records and
registry snapshots, replica reports, the items a replica answers with, the one wire error. The channel that
carries streams after their first item is `serve.wire.channel`.

A replica's `generate` is an async generator. Its first item decides the HTTP answer:
an `WireError` (an OpenAI-shaped error with its status), a `dict` (a whole JSON response),
or a `str` (the first server-sent event of a stream, more `str` events following). A stream
ends with one `Usage` item, which the router records and does not forward. A request sent with
`reply_to` gets its stream's items after the first over the router's channel (`serve.wire.channel`) and
ends with `Relayed` over Ray.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Endpoint = Literal["completions", "chat", "responses", "messages", "tokenize", "detokenize"]
"""What a request asks of an engine: OpenAI's completions, chat and Responses, Anthropic's Messages, or vLLM's
tokenizer."""
GENERATING: frozenset[Endpoint] = frozenset({"completions", "chat", "responses", "messages"})
"""The endpoints that generate tokens (the others only count or decode them)."""


@dataclass(frozen=True)
class WireError:
    """An error answered across the wire (by an engine replica or the registry), already in OpenAI's terms:
    the router answers it as is (`routing.errors.UpstreamError`). `type` defaults to the status's
    (`error_type`)."""

    status: int
    message: str
    param: str | None = None
    type: str = ""
    code: str | None = None
    retry_after: int | None = None
    """Seconds a client should wait before sending it again (a 503's `Retry-After`)."""
    replica: str | None = None
    """The engine replica that answered, set with `NOT_STARTED` (the router then avoids it); never sent on."""
    detail: str | None = None
    """Why, when the reason may name what a tenant must not see (a host path, a bucket, the S3 endpoint): the router
    tells it only to admin keys and its log, and other keys get `message` with a request id to quote."""

    def __post_init__(self) -> None:
        if not self.type:
            object.__setattr__(self, "type", error_type(self.status))


NOT_STARTED = "replica_unavailable"
"""`WireError.code` of a request an engine replica took but did not start: its engine had already died. Nothing
ran, so the router sends it to another replica. A replica that dies while a request runs says nothing, and that
request is not sent again: it may be what killed the replica."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one finished request."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ReplyTo:
    """Where a replica sends stream `stream`'s items after the first: a router's channel."""

    host: str
    port: int
    token: str
    stream: int


@dataclass(frozen=True)
class Relayed:
    """A replica's last item over Ray for a stream whose items went over the channel.

    `count` items were written to the channel; `failure` names the error that ended the stream early.
    """

    count: int
    failure: str | None = None


ReplicaItem = WireError | Usage | Relayed | dict | str


ADAPTER_ID_SEPARATOR = ":"


def adapter_model_id(base_id: str, name: str) -> str:
    """The public id of adapter `name` on base model `base_id`: `BASE:NAME`, the one place it is formatted."""
    return f"{base_id}{ADAPTER_ID_SEPARATOR}{name}"


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 404:
        return "not_found_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


ROUTING_STATS_ADAPTERS = "adapters"
"""Key of a replica's routing stats (Serve's `record_routing_stats`): the adapters it holds."""
ROUTING_STATS_ACTIVE = "active"
"""Key of a replica's routing stats: the adapters with requests in flight there (each holds an engine LoRA slot)."""
ROUTING_STATS_SLOTS = "lora_slots"
"""Key of a replica's routing stats: its engine's LoRA slots (vLLM's max_loras), or None when it has no limit."""


# The plain data that crosses between the registry, routers and engine replicas.
COMPOSE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
"""PEFT's `add_weighted_adapter` combination types a composite may use."""
DENSITY_METHODS = frozenset({"ties", "dare_linear", "dare_ties"})
"""The methods that prune, and so take a `density`."""
SEEDED_METHODS = frozenset({"dare_linear", "dare_ties"})
"""The methods whose result depends on `seed`: DARE prunes at random. TIES prunes by magnitude, the others do not
prune, so their composite is the same whatever the seed, and their identity holds none (`canonical`)."""
WEIGHT_DECIMALS = 4
"""Composite weights and densities count to this many decimals (steps of 1e-4): 0.70004 and 0.7 are one composite,
built once."""
MAX_WEIGHT = 16.0
"""The largest weight, either sign, a component of a composite may have."""
INLINE_COMPOSITE_LABEL = "~compose"
"""The one metrics label of every inline composite (their names come from request bodies: unbounded)."""
INLINE_COMPOSITE_PREFIX = INLINE_COMPOSITE_LABEL + "-"
"""Names of composites built for one request's `compose` field: `~` is not allowed in a registered name."""
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
"""A registered adapter's name: what the config, the registry and the registration route accept."""
_ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)


def is_adapter_name(value: str) -> bool:
    """Whether `value` is a usable adapter name: the whole string matches (`$` alone lets a trailing newline
    through) and it is not `.` or `..` (it names folders in the node cache and in sources)."""
    return _ADAPTER_NAME.fullmatch(value) is not None and value.strip(".") != ""


@dataclass(frozen=True)
class Composition:
    """A weighted combination of registered adapters, made with PEFT's `add_weighted_adapter`."""

    method: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    density: float | None = None
    seed: int = 0
    """Seeds torch's generator before combining: DARE prunes at random, and the same seed gives the same adapter."""
    built_from: tuple[str, ...] = ()
    """Content hashes of the components' versions it was built from, in `adapters` order (empty until built)."""


def canonical(composition: Composition) -> Composition:
    """`composition` as it is identified and built: weights and density rounded to `WEIGHT_DECIMALS`, the seed 0
    unless the method prunes at random (`SEEDED_METHODS`). Requests that differ only below that precision, or by a
    seed their method ignores, ask for one composite."""
    return replace(
        composition,
        weights=tuple(round(weight, WEIGHT_DECIMALS) + 0.0 for weight in composition.weights),  # + 0.0: no -0.0
        density=None if composition.density is None else round(composition.density, WEIGHT_DECIMALS),
        seed=composition.seed if composition.method in SEEDED_METHODS else 0,
    )


def composition_key(composition: Composition) -> str:
    """The hash of what a composite is made of (`canonical`): its name in the composite store and its identity in
    caches."""
    composition = canonical(composition)
    made_of = {
        "method": composition.method,
        "components": list(composition.built_from),
        "weights": list(composition.weights),
        "density": composition.density,
        "seed": composition.seed,
    }
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()


_SHARED: dict[tuple[type, object], Any] = {}
"""One object per distinct `target_modules` and `alpha` (a few kinds among 100,000 adapters), up to `SHARED_KINDS`."""
SHARED_KINDS = 4096


def _shared(value: Any) -> Any:
    """An object equal to `value` (of its type) that records share."""
    key = (type(value), value)
    return _SHARED.setdefault(key, value) if len(_SHARED) < SHARED_KINDS else _SHARED.get(key, value)


_last_created = 0


def _as_last_created(created: int) -> int:
    """The previous record's `created` when equal: adapters registered in bulk (and decoded from a store in the
    order they were written) share it, 32 bytes each; another second is not remembered (timestamps would fill
    `_SHARED`)."""
    global _last_created
    if created == _last_created:
        return _last_created
    _last_created = created
    return created


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """One registered adapter at its current version.

    The registry and every router and engine replica hold one per adapter, 100,000s of them: slots, and its
    repeated values (`source`, `target_modules`, `options`, `alpha`, `size_bytes`, `canary_percent`,
    `tool_call_parser`, and `created` within one second) shared between records however a record was made
    (constructed, decoded from a store, unpickled after a Ray call), keep it at about 0.4 KB.
    Whatever holds records by name keys them by the record's own `name` (`keyed`), not by an equal string.
    """

    name: str
    source: str
    version: int
    content_hash: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    pinned: bool
    created: int
    unusable: str | None = None
    """Why the adapter cannot be served on this base model (it no longer fits it), or None: such a record is
    listed with the reason and never handed to an engine."""
    warnings: tuple[str, ...] = ()
    """What registration found suspect but servable, e.g. an adapter whose weights change nothing."""
    composition: Composition | None = None
    """How a composite adapter was made from others (its `source` is where the registry stored the result)."""
    canary: AdapterRecord | None = None
    """A newer version being rolled out beside this one, to `canary_percent` of the requests; None: no rollout."""
    canary_percent: float = 0.0
    tool_call_parser: str | None = None
    """vLLM's tool-call parser for this adapter's chat format, when it differs from the server's
    (`engine.tool_call_parser`); one of the parsers the server loads (`EngineConfig.tool_parsers`)."""
    options: tuple[str, ...] = ()
    """The PEFT options beyond plain LoRA it carries, each with how it is served (`rank_pattern: per-module rank`)."""

    def __post_init__(self) -> None:
        share = object.__setattr__  # frozen: these replace values by equal, shared ones
        share(self, "source", sys.intern(self.source))
        share(self, "target_modules", _shared(self.target_modules))
        share(self, "options", _shared(self.options))
        share(self, "alpha", _shared(self.alpha))
        share(self, "size_bytes", _shared(self.size_bytes))  # adapters of one recipe (rank, targets) are one size
        share(self, "canary_percent", _shared(self.canary_percent))  # a float unpickled is a new object each time
        share(self, "created", _as_last_created(self.created))  # registered in one second, in bulk
        if self.tool_call_parser is not None:
            share(self, "tool_call_parser", sys.intern(self.tool_call_parser))

    def __reduce__(self) -> tuple[type[AdapterRecord], tuple[object, ...]]:
        """Unpickled through the constructor, so a record received from another process shares its values too."""
        return AdapterRecord, tuple(getattr(self, f.name) for f in fields(self))


def keyed(records: Iterable[AdapterRecord]) -> dict[str, AdapterRecord]:
    """`records` by name, each keyed by its own `name` object: an equal key string beside it would be a second
    copy of every name (~60 bytes each at 100,000 adapters)."""
    return {record.name: record for record in records}


VERSION_SEPARATOR = "@v"


def versioned_name(name: str, version: int) -> str:
    """The engine's name for version `version` of adapter `name` while it is rolled out beside another (`NAME@vN`):
    both versions are installed in an engine at once, each under its own name."""
    return f"{name}{VERSION_SEPARATOR}{version}"


def user_point(name: str, version: int, user: str) -> float:
    """Where `user` falls on [0, 100) for the rollout of `version` of adapter `name`: a request naming `user` gets
    that version while the point is under the rollout's percentage (`routing.rollout_choice`), and `loraplex verify`
    picks a `user` so to get the version it checks."""
    digest = hashlib.sha256(f"{name}\0{version}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def unversioned(name: str) -> str:
    """The adapter a `versioned_name` belongs to (a plain name is its own)."""
    return name.split(VERSION_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class Snapshot:
    """All records at one generation; the generation grows with every change."""

    generation: int
    records: dict[str, AdapterRecord]

    def updated(self, changes: Changes) -> Snapshot:
        """This snapshot brought to `changes.generation`; its records dict is changed in place (a follower owns
        its copy: at 100,000 adapters a copy per change would cost more than the change)."""
        if changes.full:
            return Snapshot(changes.generation, keyed(r for r in changes.records.values() if r is not None))
        for name, record in changes.records.items():
            if record is None:
                self.records.pop(name, None)
            else:
                self.records.pop(name, None)  # a key kept from before would be another copy of the name
                self.records[record.name] = record
        return Snapshot(changes.generation, self.records)


@dataclass(frozen=True)
class Changes:
    """What a follower (router, engine replica) holding one generation needs to reach the registry's current one:
    the records written since (None: removed). When the registry cannot answer from its change log (the generation
    is another run's, or older than the log), `full` is set and `records` holds every record."""

    generation: int
    records: dict[str, AdapterRecord | None]
    full: bool = False


LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class LoaderStats:
    """Cumulative counters a replica reports: cache hits and misses, loads (a latency histogram), unloads,
    and evictions (adapters the engine's LRU dropped from memory while still installed)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    load_buckets: list[int] = field(default_factory=lambda: [0] * len(LOAD_BUCKETS))
    unloads: int = 0
    evictions: int = 0
    warmed: int = 0
    """Adapters loaded ahead of any request for them, when the replica joined (`serve.replica`, warming)."""
    staged: int = 0
    """Adapters this replica fetched into the node's cache ahead of any request (`registry.cache_stage_bytes`)."""
    cache_bytes: int = 0
    """Bytes in the node's adapter cache, as this replica last measured it."""
    cache_errors: int = 0
    """Adapters this replica could not store in the node's cache (disk full, read-only, ...)."""
    cache_error: str | None = None
    cache_error_at: float | None = None
    """Wall-clock time of `cache_error`, the latest."""

    def observe_load(self, seconds: float) -> None:
        self.loads += 1
        self.load_seconds += seconds
        for i, bound in enumerate(LOAD_BUCKETS):
            if seconds <= bound:
                self.load_buckets[i] += 1


@dataclass(frozen=True)
class ReplicaReport:
    """What one engine replica tells the registry about itself."""

    replica: str
    adapters: tuple[str, ...]
    """Adapters installed in this replica's engine."""
    engine_loras: int
    """Adapters whose weights the engine currently holds in memory (its LRU caches)."""
    stats: LoaderStats
    resident: tuple[str, ...] = ()
    """Names of the installed adapters among those `engine_loras`."""
    running: int = 0
    """Sequences in the replica's vLLM engine, running or waiting (one per prompt and choice); aborts free them."""
    requests: dict[str, int] = field(default_factory=dict)
    """Requests per adapter since the replica's previous report: the registry's measure of which adapters are hot."""


def joined(pending: deque[ReplicaItem]) -> list[ReplicaItem]:
    """Takes everything out of `pending`, consecutive strings joined into one."""
    out: list[ReplicaItem] = []
    events: list[str] = []
    while pending:
        item = pending.popleft()
        if isinstance(item, str):
            events.append(item)
            continue
        if events:
            out.append("".join(events))
            events = []
        out.append(item)
    if events:
        out.append("".join(events))
    return out
