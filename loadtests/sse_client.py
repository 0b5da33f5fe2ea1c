"""A lean streaming client for measuring servers at thousands of tokens per second on a small machine.

An SDK client parses every event into objects and would be the bottleneck long before the server. This
one speaks HTTP/1.1 over asyncio streams, counts tokens by their `"index":` fields (one per choice
chunk, the usage and `[DONE]` events have none) and records when each read brought them, which is what
a user sees: tokens that arrive in one read have no gap between them.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from loadtests.loadgen import quantile


@dataclass
class StreamStats:
    """What the client saw across all streams of one run."""

    streams: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    """One entry per token after a stream's first: time since the token before it arrived."""
    ttft_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "streams": self.streams,
            "failed": self.failed,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "itl_p50_ms": round(1000 * quantile(self.gaps_s, 0.5), 2),
            "itl_p99_ms": round(1000 * quantile(self.gaps_s, 0.99), 2),
            "ttft_p50_ms": round(1000 * quantile(self.ttft_s, 0.5), 2),
        }


async def one_stream(url: str, body: bytes, stats: StreamStats) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer unused\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    started = time.monotonic()
    last: float | None = None
    try:
        writer.write(head.encode() + body)
        status = (await reader.readline()).split(b" ", 2)
        if len(status) < 2 or status[1] != b"200":
            stats.failed += 1
            return
        done = False
        tail = b""  # the end of the previous read: a marker may be split across two reads
        while chunk := await reader.read(65536):
            now = time.monotonic()
            joined = tail + chunk
            count = joined.count(b'"index":') - tail.count(b'"index":')
            done = done or b"[DONE]" in joined
            tail = joined[-8:]
            if count:
                if last is None:
                    stats.ttft_s.append(now - started)
                    stats.gaps_s.extend([0.0] * (count - 1))
                else:
                    stats.gaps_s.append(now - last)
                    stats.gaps_s.extend([0.0] * (count - 1))
                last = now
                stats.tokens += count
        stats.streams += 1
        if not done:
            stats.failed += 1
    except OSError:
        stats.failed += 1
    finally:
        writer.close()


async def run_streams(url: str, model: str, concurrency: int, duration_s: float, max_tokens: int) -> StreamStats:
    """Keeps `concurrency` streamed completions running for `duration_s`; counts what arrived meanwhile."""
    body = json.dumps({"model": model, "prompt": "hello there", "max_tokens": max_tokens, "stream": True}).encode()
    stats = StreamStats()
    deadline = time.monotonic() + duration_s

    async def user() -> None:
        while time.monotonic() < deadline:
            await one_stream(url, body, stats)

    started = time.monotonic()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    stats.seconds = time.monotonic() - started
    return stats
