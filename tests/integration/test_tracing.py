"""Tracing on the real stack: a streamed chat completion for an adapter, sent with a client's `traceparent`, arrives
at an OTLP/HTTP collector as one trace, with the router's spans and the engine replica's.

The collector is a tiny stdlib HTTP server on loopback that decodes OTLP's `ExportTraceServiceRequest`; the server
under test is this module's own (`tracing.otlp_endpoint` pointing at it).
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from serve.assets import prepare
from tests.integration.conftest import ASSETS, running_server

pytestmark = pytest.mark.own_server
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
EXPORT_WAIT_S = 30.0
"""Spans leave each process in batches (every 5 s by default): wait up to this for both processes' batches."""


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: keeps every span POSTed to `/v1/traces`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExportHandler)
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]


class _ExportHandler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    service = resource.get("service.name", "")
                    ids = span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex()
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    received.append(ReceivedSpan(service, span.name, *ids, attributes))
        with self.server.lock:
            self.server.spans.extend(received)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test's output is not the place for the collector's access log


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class Traced:
    base_url: str
    collector: Collector


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    model_dir, demo = prepare(ASSETS)
    work = tmp_path_factory.mktemp("tracing")
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    config = work / "loraplex.yaml"
    config.write_text(
        json.dumps(
            {
                "engine": {"model": str(model_dir), "dtype": "checkpoint"},
                "registry": {"state_file": str(work / "registry.json"), "cache_dir": str(work / "cache")},
                "tracing": {"otlp_endpoint": collector.url, "service_name": "loraplex-it"},
            }
        )
    )
    try:
        with running_server(config, {"alpha": demo["alpha"]}, work) as (base_url, _):
            yield Traced(base_url=base_url, collector=collector)
    finally:
        collector.shutdown()
        collector.server_close()


def wait_for_spans(collector: Collector, trace_id: str, names: set[str]) -> dict[str, ReceivedSpan]:
    deadline = time.monotonic() + EXPORT_WAIT_S
    while True:
        spans = {span.name: span for span in collector.of_trace(trace_id)}
        if names <= set(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.5)


def test_a_streamed_adapter_request_is_one_trace_across_router_and_replica(traced: Traced) -> None:
    client = openai.OpenAI(base_url=f"{traced.base_url}/v1", api_key="none", max_retries=0, timeout=120)
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
    spans = wait_for_spans(traced.collector, TRACE_ID, expected)
    assert expected <= set(spans), sorted(spans)
    server, generate = spans["POST /v1/chat/completions"], spans["engine.generate"]
    assert server.service == "loraplex-it-router" and generate.service == "loraplex-it-engine"
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
