"""A scripted stand-in for the engine deployment, for fast tests of the router alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from serve.wire import Endpoint, ReplicaItem, Usage

Script = Callable[[Endpoint, dict[str, Any]], list[ReplicaItem | Exception]]


def echo_script(endpoint: Endpoint, body: dict[str, Any]) -> list[ReplicaItem | Exception]:
    """Answers like vLLM would, echoing the model id the router sent."""
    if not body.get("stream"):
        return [{"object": "chat.completion" if endpoint == "chat" else "text_completion",
                 "model": body["model"], "choices": [{"index": 0, "text": "hi"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}]  # fmt: skip
    events: list[ReplicaItem | Exception] = [
        f"data: {json.dumps({'model': body['model'], 'choices': [{'index': 0, 'text': word}]})}\n\n"
        for word in ("a", "b")
    ]
    return [*events, "data: [DONE]\n\n", Usage(prompt_tokens=3, completion_tokens=2)]


@dataclass
class FakeEngine:
    """Records each request and plays `script`'s items back; an Exception item is raised."""

    script: Script = echo_script
    requests: list[tuple[Endpoint, dict[str, Any]]] = field(default_factory=list)

    def generate(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[ReplicaItem]:
        self.requests.append((endpoint, body))
        return self._play(self.script(endpoint, body))

    async def _play(self, items: list[ReplicaItem | Exception]) -> AsyncIterator[ReplicaItem]:
        for item in items:
            if isinstance(item, Exception):
                raise item
            yield item
