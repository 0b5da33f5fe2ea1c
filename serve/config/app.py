"""A whole application: the base model's engine, the adapters served from the start, and the parts' settings;
read from YAML by `load_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from serve.config._base import _Strict
from serve.config.deployment import EngineDeploymentConfig
from serve.config.engine import EngineConfig
from serve.config.registry import RegistryConfig
from serve.config.router import RouterConfig
from serve.config.tracing import TracingConfig
from serve.wire import ADAPTER_NAME_PATTERN, is_adapter_name


class AdapterConfig(_Strict):
    """A LoRA adapter served from the start."""

    name: str = Field(description="Adapter name, `[A-Za-z0-9._-]`; clients ask for `BASE:NAME` or `NAME`.")
    path: str = Field(description="Folder of a PEFT LoRA adapter (adapter_config.json + safetensors).")

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not is_adapter_name(value):
            raise ValueError(f"adapter name {value!r} must match {ADAPTER_NAME_PATTERN}")
        return value


class AppConfig(_Strict):
    """A whole loraplex application: one base model, its adapters, and how it is deployed."""

    engine: EngineConfig
    adapters: list[AdapterConfig] = Field(default_factory=list, description="Adapters served from the start.")
    engine_deployment: EngineDeploymentConfig = Field(default_factory=EngineDeploymentConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="OpenTelemetry tracing of requests; off unless given an endpoint."
    )

    @model_validator(mode="after")
    def _adapter_names_unique(self) -> AppConfig:
        names = [adapter.name for adapter in self.adapters]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"adapter names must be unique, repeated: {duplicates}")
        return self


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> AppConfig:
    """Reads an AppConfig from YAML, then applies `overrides` (a nested dict) on top."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return AppConfig.model_validate(_merge(data, overrides or {}))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
