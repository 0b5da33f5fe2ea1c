"""How Ray Serve runs the engine deployment: replicas, autoscaling, replica choice, back-pressure, health."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from serve.config._base import _Strict


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
    affinity_slot_aware: bool = Field(
        default=True,
        description="Within the load bound, prefer a replica where the adapter already has one of the engine's LoRA "
        "slots, then one with a free slot, over one whose slots other adapters hold (where the request would wait "
        "for a slot). false: affinity alone (docs/slots.md, 'Across replicas').",
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
        description=(
            "Requests Ray Serve queues at each router replica, first come, first served, after the router's fair-share "
            "gate let them through, while they wait for an engine replica below max_ongoing_requests: it fills when "
            "the routers' gates (`router.max_inflight` each) let more through than the engine replicas take. One more "
            "is refused at once (Serve's back-pressure) and the router answers it 503 with `Retry-After`."
        ),
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
