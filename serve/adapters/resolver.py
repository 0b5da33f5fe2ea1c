"""The adapter sources an application's config allows, and the connections they read through: local roots, S3 and
the Hugging Face Hub, as the registry and every engine replica's node cache build them from one `AppConfig`."""

from __future__ import annotations

from pathlib import Path

from serve.adapters.hf_source import HfSource
from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.config import AppConfig


def make_resolver(config: AppConfig) -> SourceResolver:
    """Sources allowed by `config`: its local roots plus the folders of its configured adapters."""
    roots = [Path(root).resolve() for root in config.registry.local_roots]
    roots += [Path(adapter.path).resolve() for adapter in config.adapters]
    if not config.registry.composites_url.startswith("s3://"):
        roots.append(Path(config.registry.composites_url).resolve())  # what the registry builds, nodes read
    return SourceResolver(local=LocalSource(tuple(roots)), s3=s3_connection(config), hf=hf_connection(config))


def s3_connection(config: AppConfig) -> S3Source:
    registry = config.registry
    return S3Source(
        endpoint_url=registry.s3_endpoint_url,
        region=registry.s3_region,
        access_key_id=registry.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if (secret := registry.s3_secret_access_key) else None,
    )


def hf_connection(config: AppConfig) -> HfSource:
    registry = config.registry
    token = registry.hf_token.get_secret_value() if registry.hf_token else None
    return HfSource(endpoint=registry.hf_endpoint, token=token)
