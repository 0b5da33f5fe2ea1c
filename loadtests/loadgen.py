"""A load generator for any OpenAI-compatible server: closed loop (concurrency) or open loop (rate).

Each request is a streamed `/v1/completions` call, so time to first token and time per output token
are measured on the client, the same way for every system under test. `ignore_eos` makes every
request produce exactly `max_tokens`, so systems are compared on equal work.

Why not vLLM's own `vllm bench serve`: in vLLM 0.32 it assigns adapters to requests only at random
or round robin (no Zipf popularity over many adapters, which is what multi-adapter serving is
about), and it imports all of vLLM to run. Long soak runs with a live web UI use Locust instead
(`loadtests/locustfile.py`, `make locust`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import httpx

Popularity = Literal["single", "uniform", "zipf"]

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while moving.",
    "List five facts about the planet Mars.",
    "What is the capital of France?",
    "Describe the water cycle to a ten-year-old.",
    "Write a haiku about the sea.",
    "Give three tips for writing clear documentation.",
    "Summarise the plot of a detective novel in four sentences.",
)


@dataclass(frozen=True)
class Workload:
    """What to send: how many requests, to which models, how fast, and how long each is."""

    name: str
    models: tuple[str, ...]
    popularity: Popularity = "uniform"
    num_requests: int = 64
    concurrency: int = 32
    rate: float | None = None
    """Requests per second (Poisson arrivals); None means closed loop at `concurrency`."""
    max_tokens: int = 64
    """Output tokens of every request, unless `output_tokens` gives a range."""
    zipf_s: float = 1.1
    seed: int = 0
    output_tokens: tuple[int, int] | None = None
    """Output length drawn uniformly from this inclusive range per request (None: always `max_tokens`)."""
    prompt_repeat: tuple[int, int] = (1, 1)
    """Prompt length: each prompt is one of PROMPTS repeated k times, k uniform in this inclusive range."""
    rare: tuple[str, ...] = ()
    """Models sent beside the rest, one request each, one every `rare_every_s` from the start (the long tail)."""
    rare_every_s: float = 1.0

    def schedule(self) -> list[Planned]:
        """(model, prompt, max_tokens) of every request, reproducible from `seed`."""
        rng = random.Random(self.seed)
        if self.popularity == "single":
            weights = [1.0] + [0.0] * (len(self.models) - 1)
        elif self.popularity == "zipf":
            weights = [1 / (rank**self.zipf_s) for rank in range(1, len(self.models) + 1)]
        else:
            weights = [1.0] * len(self.models)
        models = rng.choices(self.models, weights=weights, k=self.num_requests)
        planned = []
        for model in models:
            prompt = rng.choice(PROMPTS)
            if self.prompt_repeat != (1, 1):  # fixed lengths draw nothing more: schedules match earlier runs'
                prompt = " ".join([prompt] * rng.randint(*self.prompt_repeat))
            tokens = rng.randint(*self.output_tokens) if self.output_tokens else self.max_tokens
            planned.append(Planned(model, prompt, tokens))
        return planned


class Planned(NamedTuple):
    """One request of a schedule."""

    model: str
    prompt: str
    max_tokens: int


@dataclass
class Result:
    """One request as the client saw it."""

    model: str
    status: int
    ttft: float | None = None
    latency: float = 0.0
    completion_tokens: int = 0
    error: str | None = None
    sent: float = 0.0
    """When it was sent (`time.perf_counter`); `ttft` and `latency` count from then."""


@dataclass
class Report:
    """Aggregates of one workload run."""

    workload: str
    duration_s: float
    results: list[Result] = field(default_factory=list)
    started: float = 0.0
    """When the run began (`time.perf_counter`)."""

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.status == 200 and r.error is None]

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)

    @property
    def output_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.duration_s if self.duration_s else 0.0

    def steady_tokens_per_s(self, besides: tuple[str, ...] = ()) -> float:
        """Tokens per second while the run was still sending: from its start to the last request sent (the models
        in `besides`, sent on their own schedule, aside). A closed loop of N requests ends by draining the last
        ones in small batches, which `tokens_per_s` counts too; this leaves that drain out. Each request's tokens
        are taken as evenly spaced between its first token and its end."""
        main = [r for r in self.results if r.model not in besides]
        end = max((r.sent for r in main), default=self.started)
        if end <= self.started:
            return float("nan")
        tokens = 0
        for r in self.ok:
            if r.ttft is None or r.completion_tokens < 1 or r.sent + r.ttft > end:
                continue
            first, n = r.sent + r.ttft, r.completion_tokens
            spacing = (r.latency - r.ttft) / (n - 1) if n > 1 else 0.0
            tokens += n if spacing <= 0 else min(n, int((end - first) / spacing) + 1)
        return tokens / (end - self.started)

    def ttft_ms(self, q: float) -> float:
        return 1000 * quantile([r.ttft for r in self.ok if r.ttft is not None], q)

    def tpot_ms(self, q: float) -> float:
        per_token = [
            (r.latency - r.ttft) / (r.completion_tokens - 1)
            for r in self.ok
            if r.ttft is not None and r.completion_tokens > 1
        ]
        return 1000 * quantile(per_token, q)

    def ttft_by_rank(self, models: tuple[str, ...]) -> dict[str, float]:
        """Worst TTFT (ms) of the requests for each band of popularity ranks (a model's place in `models`)."""
        bands: dict[str, list[float]] = {}
        for r in self.ok:
            if r.ttft is not None and r.model in models:
                rank = models.index(r.model) + 1
                band = next(f"{low}-{high}" for low, high in RANK_BANDS if rank <= high)
                bands.setdefault(band, []).append(r.ttft)
        return {band: round(1000 * max(values), 1) for band, values in sorted(bands.items(), key=_band_order)}

    def summary(self, rare: tuple[str, ...] = ()) -> dict[str, float | int | str]:
        failed = [r for r in self.results if r.status != 200 or r.error is not None]
        first_error = {"first_error": f"HTTP {failed[0].status}: {failed[0].error}"} if failed else {}
        ttfts = [r.ttft for r in self.ok if r.ttft is not None]
        rare_ttfts = [r.ttft for r in self.ok if r.ttft is not None and r.model in rare]
        tail = {"rare_ttft_max_ms": round(1000 * max(rare_ttfts), 1)} if rare_ttfts else {}
        return {
            "workload": self.workload,
            "requests": len(self.results),
            "errors": self.errors,
            "duration_s": round(self.duration_s, 2),
            "tok_per_s": round(self.tokens_per_s, 1),
            "steady_tok_per_s": round(self.steady_tokens_per_s(rare), 1),
            "req_per_s": round(self.requests_per_s, 2),
            "ttft_p50_ms": round(self.ttft_ms(0.5), 1),
            "ttft_p99_ms": round(self.ttft_ms(0.99), 1),
            "tpot_p50_ms": round(self.tpot_ms(0.5), 1),
            "tpot_p99_ms": round(self.tpot_ms(0.99), 1),
            "ttft_max_ms": round(1000 * max(ttfts, default=float("nan")), 1),
            **tail,
            **first_error,
        }


RANK_BANDS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 512), (513, 1 << 30))


def _band_order(item: tuple[str, float]) -> int:
    return int(item[0].split("-")[0])


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    started = time.perf_counter()
    result = Result(model=model, status=0, sent=started)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:200]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"])[:200]
                if event.get("choices") and result.ttft is None and event["choices"][0].get("text"):
                    result.ttft = time.perf_counter() - started
                if event.get("usage"):
                    result.completion_tokens = int(event["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.latency = time.perf_counter() - started
    return result


async def run(base_url: str, workload: Workload, timeout_s: float = 600) -> Report:
    """Sends `workload` to the server at `base_url` and returns what it measured."""
    schedule = workload.schedule()
    limits = httpx.Limits(max_connections=max(workload.concurrency, 1) * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()
        rare = asyncio.create_task(_rare(client, workload))
        if workload.rate is None:
            results = await _closed_loop(client, workload, schedule)
        else:
            results = await _open_loop(client, workload, schedule, workload.rate)
        results += await rare
        return Report(workload=workload.name, duration_s=time.perf_counter() - started, results=results,
                      started=started)  # fmt: skip


async def _closed_loop(client: httpx.AsyncClient, workload: Workload, schedule: list[Planned]) -> list[Result]:
    gate = asyncio.Semaphore(workload.concurrency)

    async def guarded(planned: Planned) -> Result:
        async with gate:
            return await one_request(client, *planned)

    return list(await asyncio.gather(*(guarded(planned) for planned in schedule)))


async def _open_loop(
    client: httpx.AsyncClient, workload: Workload, schedule: list[Planned], rate: float
) -> list[Result]:
    rng = random.Random(workload.seed + 1)
    tasks = []
    for planned in schedule:
        tasks.append(asyncio.create_task(one_request(client, *planned)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


async def _rare(client: httpx.AsyncClient, workload: Workload) -> list[Result]:
    tasks = []
    for model in workload.rare:
        await asyncio.sleep(workload.rare_every_s)
        tasks.append(asyncio.create_task(one_request(client, model, PROMPTS[0], workload.max_tokens)))
    return list(await asyncio.gather(*tasks))


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    bounds = (int(low), int(high or low))
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected N or LOW:HIGH with 1 <= LOW <= HIGH, not {text!r}")
    return bounds


def main(argv: list[str] | None = None) -> None:
    """`python -m loadtests.loadgen URL --model M [--model M2 ...]`: one workload, its summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", action="append", required=True, help="a model id; repeat for several")
    parser.add_argument("--popularity", choices=("single", "uniform", "zipf"), default="uniform")
    parser.add_argument("--requests", type=int, default=64)
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=32, help="closed loop: requests in flight")
    loop.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--output-tokens", type=_range, default=(64, 64), help="N or LOW:HIGH (uniform)")
    parser.add_argument("--prompt-repeat", type=_range, default=(1, 1), help="prompt repeated N or LOW:HIGH times")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workload = Workload(
        "cli", tuple(args.model), popularity=args.popularity, num_requests=args.requests,
        concurrency=args.concurrency, rate=args.rate, output_tokens=args.output_tokens,
        prompt_repeat=args.prompt_repeat, seed=args.seed,
    )  # fmt: skip
    print(json.dumps(asyncio.run(run(args.url, workload)).summary()))


if __name__ == "__main__":
    main()
