"""One real loraplex server for the integration suite, started the way a user starts it.

`loraplex serve` runs as a child process on a free port, with a copy of the default model under
another name and adapters that these tests make themselves with PEFT (plus one demo adapter), so
nothing depends on how the project built its own assets.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import openai
import pytest
import torch

from serve.demo.assets import LORA_TARGETS, prepare
from serve.demo.reference import Reference
from tests.conftest import S3_KEYS, free_port, tail
from tests.hub_standin import StandInHub
from tests.integration.otlp import Collector

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / ".loraplex"
MODEL_ID = "smol-copy"
STARTUP_TIMEOUT_S = 420
REGISTRY_BUCKET = "loraplex-registry"
REGISTRY_REPLICA = "ServeReplica:loraplex:LoraplexRegistry"
TRACING_SERVICE = "loraplex-it"
"""The shared stack's `tracing.service_name`: it sends its spans to the session's `collector`."""


@dataclass(frozen=True)
class ExternalAdapter:
    """An adapter as a stranger might make it: its own rank, targets and scaling."""

    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    seed: int
    scale: float


EXTERNAL_ADAPTERS = (
    ExternalAdapter("ext-qv", rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=11, scale=0.6),
    ExternalAdapter("ext-all", rank=32, alpha=16, targets=LORA_TARGETS, seed=12, scale=0.3),
)


def make_adapter(model_dir: Path, spec: ExternalAdapter, dest: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                scale = spec.scale if "lora_B" in name else 1.0
                param.copy_(scale * torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    model.save_pretrained(dest)
    return dest


@dataclass(frozen=True)
class Stack:
    """The running server and what it serves."""

    base_url: str
    model_id: str
    model_dir: Path
    adapters: dict[str, Path]
    log: Path
    uploads: Path
    """A folder the server accepts local adapter sources from."""
    s3_url: str
    """A real S3 endpoint (moto) on loopback that the server reads `s3://` sources from."""


@pytest.fixture(scope="session")
def hf_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandInHub]:
    """A stand-in for the Hugging Face Hub on loopback (no hub is reachable here), that the stack reads `hf://` from."""
    with StandInHub(tmp_path_factory.mktemp("hub")) as hub:
        yield hub


@pytest.fixture(scope="session")
def collector() -> Iterator[Collector]:
    """An OTLP/HTTP collector on loopback that the shared stack sends its spans to (test_tracing reads them)."""
    server = Collector()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, s3_url: str, hf_hub: StandInHub, collector: Collector
) -> Iterator[Stack]:
    """The shared stack keeps its registry in S3 (moto) and traces every request to `collector`; test_adapters_sqlite
    runs the adapter tests again on SQLite."""
    tracing = {"otlp_endpoint": collector.url, "service_name": TRACING_SERVICE}
    with stack_server(tmp_path_factory.mktemp("stack"), s3_url, hf_hub, store="s3", tracing=tracing) as running:
        yield running


@contextmanager
def stack_server(
    work: Path, s3_url: str, hf_hub: StandInHub, store: str, tracing: dict[str, str] | None = None
) -> Iterator[Stack]:
    """The stack's server in `work`, its registry in `store` ("s3": a bucket on `s3_url`; "sqlite": a file), its
    `tracing` settings (None: off)."""
    model_src, demo = prepare(ASSETS)
    model_dir = work / MODEL_ID
    shutil.copytree(model_src, model_dir)
    adapters = {spec.name: make_adapter(model_dir, spec, work / spec.name) for spec in EXTERNAL_ADAPTERS}
    adapters["alpha"] = demo["alpha"]

    uploads = work / "uploads"
    uploads.mkdir()
    config = work / "loraplex.yaml"
    stores = {"s3": f"s3://{REGISTRY_BUCKET}/{MODEL_ID}", "sqlite": f"sqlite:///{work / 'registry.db'}"}
    config.write_text(
        json.dumps(
            {
                # dtype exact: checked against PEFT. 4 slots (the default on this CPU is 16): test_adapters fills
                # them all and churns the engine's adapter cache with a handful of adapters.
                "engine": {
                    "model": str(model_dir),
                    "dtype": "checkpoint",
                    "max_loras": 4,
                    # 4 unpinned cache entries (the default is 4 x max_loras with the slot policy on): test_adapters
                    # churns the cache with a handful of adapters.
                    "max_cpu_loras": 4,
                    # No tool-call parser of its own; `hermes` for adapters registered with it (test_api_surface).
                    "tool_call_parsers": ["hermes"],
                },
                # The suite's modules ask the shared stack for ~70 adapters; beyond the default 50 labels, the later
                # ones would be counted as `other` and test_serving's metrics test (late in the run) would not find
                # its adapters' series. The cap itself is a unit test's (test_router).
                "router": {"max_adapter_labels": 1000},
                "registry": {
                    "store": stores[store],
                    "state_file": str(work / "registry.json"),
                    "cache_dir": str(work / "adapter-cache"),
                    "local_roots": [str(uploads)],
                    "s3_endpoint_url": s3_url,  # for s3:// adapter sources, whatever the store
                    "s3_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
                    "s3_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                    "hf_endpoint": hf_hub.url,
                },
                **({"tracing": tracing} if tracing is not None else {}),
            }
        )
    )
    if store == "s3":
        key_id, secret = S3_KEYS["AWS_ACCESS_KEY_ID"], S3_KEYS["AWS_SECRET_ACCESS_KEY"]
        s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id=key_id,
                          aws_secret_access_key=secret)  # fmt: skip
        s3.create_bucket(Bucket=REGISTRY_BUCKET)
    with running_server(config, adapters, work) as (base_url, log):
        yield Stack(base_url=base_url, model_id=MODEL_ID, model_dir=model_dir, adapters=adapters, log=log,
                    uploads=uploads, s3_url=s3_url)  # fmt: skip


SESSIONS: dict[str, int] = {}
"""A running server's base URL → the session its processes run in (`session_processes`)."""


@contextmanager
def running_server(config: Path, adapters: dict[str, Path], work: Path) -> Iterator[tuple[str, Path]]:
    """`loraplex serve --config CONFIG --adapter ...` on a free port until the block ends; yields (url, log)."""
    port = free_port()
    log = work / "server.log"
    command = [str(Path(sys.executable).parent / "loraplex"), "serve", "--config", str(config), "--port", str(port)]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    SESSIONS[base_url] = process.pid
    try:
        wait_until_ready(process, base_url, log)
        yield base_url, log
    finally:
        SESSIONS.pop(base_url, None)
        stop(process)


def wait_until_ready(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"loraplex serve exited with {process.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(1)
    pytest.fail(f"loraplex serve not healthy after {STARTUP_TIMEOUT_S}s:\n{tail(log)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a user's Ctrl-C or an orchestrator would; the CLI must clean up Ray and vLLM."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail("loraplex serve did not stop within 90s of SIGTERM")
    assert_nothing_left_behind(process.pid)


def session_processes(session: int) -> list[int]:
    """Processes still alive in the server's session (Ray and vLLM children inherit it)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    alive.append(int(entry.name))
            except ProcessLookupError:
                continue
    return alive


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80]
    except OSError:
        return f"pid {pid} (gone)"


def assert_nothing_left_behind(session: int) -> None:
    deadline = time.monotonic() + 20
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(1)
    if left:
        names = [command_line(pid) for pid in left]
        for pid in left:  # each: the leftovers are in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"loraplex serve left processes behind: {names}")


@pytest.fixture(scope="session")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
async def async_client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    """One per test: its connections belong to that test's event loop."""
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    yield client
    await client.close()


@pytest.fixture(scope="session")
def reference(stack: Stack) -> Reference:
    return Reference(stack.model_dir, stack.adapters)


def adapter_config(path: Path) -> dict[str, object]:
    return dict(json.loads((path / "adapter_config.json").read_text()))


def session_of(base_url: str) -> int:
    """The session (= pid) of the `loraplex serve ... --port PORT` this test process started."""
    port = base_url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "serve" in args and "--port" in args and args[args.index("--port") + 1] == port:
                return os.getsid(int(entry.name))
    raise AssertionError(f"no `loraplex serve --port {port}` process")


def restart_the_registry_and_check_its_records(base_url: str, new_source: str) -> None:
    """SIGKILLs the registry's replica (its node lost), waits for Serve's replacement, and checks that it serves the
    same adapters at the same versions: read back from its store, not from any router's cache (a write through
    the new replica makes every router refetch the whole list)."""
    session = session_of(base_url)
    before = {a["name"]: a["version"] for a in httpx.get(f"{base_url}/v1/adapters", timeout=30).json()["data"]}
    assert before, "adapters are registered before the restart"
    (old,) = [pid for pid in session_processes(session) if REGISTRY_REPLICA in command_line(pid)]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        replicas = [pid for pid in session_processes(session) if REGISTRY_REPLICA in command_line(pid)]
        written = None
        if replicas and old not in replicas:
            body = {"name": "after-restart", "source": new_source}
            written = httpx.post(f"{base_url}/v1/adapters", json=body, timeout=60)
            if written.status_code == 201:
                break
        assert time.monotonic() < deadline, f"no registry replica answered a write: {written and written.text}"
        time.sleep(1)
    after = {a["name"]: a["version"] for a in httpx.get(f"{base_url}/v1/adapters", timeout=30).json()["data"]}
    assert after == {**before, "after-restart": 1}
    assert httpx.delete(f"{base_url}/v1/adapters/after-restart", timeout=30).status_code == 200
