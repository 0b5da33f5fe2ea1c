"""OpenTelemetry tracing of generation requests."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator

from serve.config._base import _Strict


class TracingConfig(_Strict):
    """OpenTelemetry traces of generation requests, in the router and the engine replicas, sent to an OTLP collector.

    Off without `otlp_endpoint`: no tracer is built and requests do no tracing work. On, each authenticated request
    gets spans per phase (auth, admission, replica choice, adapter load, queue, the whole generation), never per
    token, in the trace of the client's W3C `traceparent` header when it sends one; the router alone decides which
    requests are traced (`sample_ratio`), and a request without a valid key gets no span.
    """

    otlp_endpoint: str | None = Field(
        default=None,
        description=(
            "The OTLP collector spans go to, e.g. `http://127.0.0.1:4318` (`http/protobuf`: to its `/v1/traces`) or "
            "`http://127.0.0.1:4317` (`grpc`). None: tracing is off."
        ),
    )
    otlp_protocol: Literal["http/protobuf", "grpc"] = Field(
        default="http/protobuf", description="How spans are sent to `otlp_endpoint`: OTLP over HTTP or gRPC."
    )
    service_name: str = Field(
        default="loraplex",
        min_length=1,
        description="`service.name` of the spans, `-router` or `-engine` appended by the process that made them.",
    )
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description=(
            "Fraction of authenticated generation requests that are traced, by the router's own random draw: a "
            "client's `traceparent` sampled flag and trace id do not change it (its trace id is kept, so the spans "
            "join the client's trace)."
        ),
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        if value is not None and urlparse(value).scheme not in ("http", "https"):
            raise ValueError(f"otlp_endpoint {value!r} must be an http:// or https:// URL")
        return value

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded and exported at all."""
        return self.otlp_endpoint is not None
