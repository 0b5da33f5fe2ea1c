"""The ceiling of a Python HTTP stack on this machine: FastAPI + uvicorn streaming the simulated engine's
events in-process, one event per write, with no routing, auth or Ray.

Usage: python -m loadtests.bare_app --port 8001 [--step-ms 20 --max-num-seqs 1024]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from serve.config import EngineConfig
from serve.engines.simulated import SimulatedEngine


def create_bare_app(config: EngineConfig) -> FastAPI:
    engine = SimulatedEngine(config)
    app = FastAPI()

    @app.on_event("startup")
    async def start() -> None:
        await engine.start()

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body: dict[str, Any] = await request.json()

        async def events() -> AsyncIterator[str]:
            async for item in engine.generate("completions", body, None):
                if isinstance(item, str):
                    yield item

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    args = parser.parse_args()
    config = EngineConfig(
        kind="simulated", model="sim", max_num_seqs=args.max_num_seqs, simulated={"step_ms": args.step_ms}
    )
    uvicorn.run(create_bare_app(config), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
