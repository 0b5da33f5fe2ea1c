"""Tracing on the real stack: a streamed chat completion for an adapter, sent with a client's `traceparent`, arrives
at an OTLP/HTTP collector as one trace, with the router's spans and the engine replica's.

The shared stack exports its spans to a tiny collector on loopback (tests/integration/otlp.py,
`tracing.otlp_endpoint` in tests/integration/conftest.py), so every integration test runs with tracing on.
"""

from __future__ import annotations

import time

import openai

from tests.integration.conftest import TRACING_SERVICE, Stack
from tests.integration.otlp import Collector, ReceivedSpan

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
EXPORT_WAIT_S = 30.0
"""Spans leave each process in batches (every 5 s by default): wait up to this for both processes' batches."""


def wait_for_spans(collector: Collector, trace_id: str, names: set[str]) -> dict[str, ReceivedSpan]:
    deadline = time.monotonic() + EXPORT_WAIT_S
    while True:
        spans = {span.name: span for span in collector.of_trace(trace_id)}
        if names <= set(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.5)


def test_a_streamed_adapter_request_is_one_trace_across_router_and_replica(stack: Stack, collector: Collector) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=4,
        stream=True,
        extra_headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
        extra_body={"ignore_eos": True},  # exactly max_tokens tokens
    )
    assert any(chunk.choices and chunk.choices[0].delta.content for chunk in stream)

    expected = {"POST /v1/chat/completions", "router.admission", "router.replica_choice", "engine.generate",
                "engine.queue"}  # fmt: skip
    spans = wait_for_spans(collector, TRACE_ID, expected)
    assert expected <= set(spans), sorted(spans)
    server, generate = spans["POST /v1/chat/completions"], spans["engine.generate"]
    assert server.service == f"{TRACING_SERVICE}-router" and generate.service == f"{TRACING_SERVICE}-engine"
    assert server.parent_id == CLIENT_SPAN
    assert generate.parent_id == server.span_id == spans["router.replica_choice"].parent_id
    assert spans["router.admission"].parent_id == server.span_id
    assert spans["engine.queue"].parent_id == generate.span_id
    if "engine.adapter_load" in spans:  # unless the replica warmed alpha before the request
        assert spans["engine.adapter_load"].parent_id == spans["engine.queue"].span_id
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["loraplex.adapter"] == "alpha"
    assert generate.attributes["loraplex.finish"] == "ok"
    assert generate.attributes["gen_ai.usage.output_tokens"] == 4
