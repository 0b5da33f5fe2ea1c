"""Configuration of a loraplex application: documented pydantic models, loadable from YAML.

The same models back the `loraplex serve` flags, the `--config FILE.yaml` file and the
`args:` block of a Ray Serve config (`import_path: serve.app:build_app`). One module per part:
`engine`, `deployment` (the engine deployment in Ray Serve), `router`, `auth`, `registry`,
`tracing`, and `app`, the whole tree and its YAML loader.
"""

from serve.config.app import ADAPTER_NAME_PATTERN, AdapterConfig, AppConfig, is_adapter_name, load_config
from serve.config.auth import KEY_NAME_PATTERN, ApiKeyConfig, AuthConfig, KeysFile
from serve.config.deployment import Autoscaling, EngineDeploymentConfig
from serve.config.engine import (
    CPU_LORA_BUFFER_BYTES,
    CPU_LORA_SLOTS,
    GPU_LORA_SLOTS,
    EngineConfig,
    LoraRank,
    SimulatedEngineConfig,
    lora_slot_bytes,
)
from serve.config.registry import RegistryConfig
from serve.config.router import RouterConfig, is_loopback
from serve.config.tracing import TracingConfig

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "CPU_LORA_BUFFER_BYTES",
    "CPU_LORA_SLOTS",
    "GPU_LORA_SLOTS",
    "KEY_NAME_PATTERN",
    "AdapterConfig",
    "ApiKeyConfig",
    "AppConfig",
    "AuthConfig",
    "Autoscaling",
    "EngineConfig",
    "EngineDeploymentConfig",
    "KeysFile",
    "LoraRank",
    "RegistryConfig",
    "RouterConfig",
    "SimulatedEngineConfig",
    "TracingConfig",
    "is_adapter_name",
    "is_loopback",
    "load_config",
    "lora_slot_bytes",
]
