"""Locust users for long soak runs against any OpenAI-compatible server, with Locust's web UI.

`make locust` starts Locust on http://127.0.0.1:8089 against `make serve` (HOST/PORT); pick users and
spawn rate in the UI, watch requests/s, failures and latency live, download the CSVs. Headless, as the
integration test runs it: `locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 10m --host URL`.

Each user sends streamed `/v1/completions` back to back (`LORAPLEX_WAIT_S` seconds apart). The model
of each request follows `LORAPLEX_POPULARITY` (`zipf`, `uniform` or `single`) over `LORAPLEX_MODELS`
(comma-separated; default: every model `/v1/models` lists, the base first); prompts are
loadgen's, output lengths uniform in `LORAPLEX_MIN_TOKENS`..`LORAPLEX_MAX_TOKENS`. Besides the
request itself (name `completions <model kind>`), each stream reports its time to first token as a
separate `TTFT` entry, so the UI shows TTFT percentiles next to whole-request latency. An API key,
if the server wants one, comes from `LORAPLEX_API_KEY`.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, events, task

from loadtests.loadgen import PROMPTS


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class Traffic:
    """The models to send to and how often each is picked (shared by all users of one Locust process)."""

    def __init__(self, models: list[str], popularity: str) -> None:
        if not models:
            raise ValueError("no models to send requests to")
        if popularity == "single":
            models = models[:1]
        ranks = range(1, len(models) + 1)
        self.models = models
        self.weights = [1 / rank for rank in ranks] if popularity == "zipf" else [1.0] * len(models)

    def pick(self, rng: random.Random) -> str:
        return rng.choices(self.models, weights=self.weights)[0]


_traffic: Traffic | None = None


class OpenAIUser(HttpUser):
    wait_time = between(0, float(os.environ.get("LORAPLEX_WAIT_S", "0")))

    def on_start(self) -> None:
        global _traffic
        key = os.environ.get("LORAPLEX_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.rng = random.Random()
        if _traffic is None:
            names = [m for m in os.environ.get("LORAPLEX_MODELS", "").split(",") if m]
            if not names:
                listed = self.client.get("/v1/models", headers=self.headers, name="models").json()["data"]
                names = sorted((m["id"] for m in listed), key=lambda model_id: (":" in model_id, model_id))
            _traffic = Traffic(names, os.environ.get("LORAPLEX_POPULARITY", "zipf"))
        self.traffic = _traffic

    @task
    def completion(self) -> None:
        model = self.traffic.pick(self.rng)
        body: dict[str, Any] = {
            "model": model,
            "prompt": self.rng.choice(PROMPTS),
            "max_tokens": self.rng.randint(_env_int("LORAPLEX_MIN_TOKENS", 16), _env_int("LORAPLEX_MAX_TOKENS", 64)),
            "stream": True,
            "temperature": 0.7,
        }
        name = "completions adapter" if ":" in model else "completions base"
        started = time.perf_counter()
        first_token: float | None = None
        with self.client.post(
            "/v1/completions", json=body, headers=self.headers, stream=True, catch_response=True, name=name
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            done = False
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    response.failure(f"error event: {event['error'].get('message')}")
                    return
                if first_token is None and any(choice.get("text") for choice in event.get("choices", [])):
                    first_token = time.perf_counter()
            if not done:
                response.failure("the stream ended without [DONE]")
                return
            response.success()
        if first_token is not None:
            events.request.fire(
                request_type="TTFT",
                name=name,
                response_time=(first_token - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
