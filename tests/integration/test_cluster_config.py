"""deploy/serve.yaml as Ray Serve deploys it, on the real stack: the routers serve their own port (direct
ingress) while Serve's proxy still answers, the router replicas ask for the `loraplex_router` resource, and
keys are required. The engine is the simulated one (no GPU here); everything else is the file as shipped,
deployed through Serve's controller as `serve run deploy/serve.yaml` does (`client.deploy_apps`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serve.app import ENGINE_DEPLOYMENT, ROUTER_DEPLOYMENT
from tests.conftest import free_port, tail
from tests.integration.conftest import command_line, session_processes, stop, wait_until_ready
from tests.integration.test_tenants import create_key

pytestmark = pytest.mark.own_server
ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180
DRIVER = """
import sys, time, ray, yaml
from ray.serve._private import api
from ray.serve.config import gRPCOptions
from ray.serve.schema import ServeDeploySchema
config = ServeDeploySchema.model_validate(yaml.safe_load(open(sys.argv[1])))
ray.init(address="local", namespace="serve", num_cpus=8, include_dashboard=False,
         resources={"loraplex_router": int(sys.argv[2])})
client = api.serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
                         grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
client.deploy_apps(config, _blocking=True)
print("deployed", flush=True)
while True:
    time.sleep(1)
"""


def local_copy(work: Path, keys_file: Path, proxy_port: int, router_port: int) -> Path:
    """deploy/serve.yaml with only what this machine lacks replaced: a GPU and model (simulated engine), the
    cluster's volumes and bucket (files under `work`), and its public addresses (loopback, free ports)."""
    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": proxy_port}
    (app,) = config["applications"]
    args = app["args"]
    args["engine"] = {"kind": "simulated", "model": "sim-base", "simulated": {"step_ms": 10}}
    args["router"] = {**args["router"], "host": "127.0.0.1", "port": router_port,
                      "auth": {**args["router"]["auth"], "keys_file": str(keys_file)}}  # fmt: skip
    args["registry"] = {"store": f"sqlite:///{work / 'registry.db'}", "cache_dir": str(work / "cache")}
    engine = next(d for d in app["deployments"] if d["name"] == ENGINE_DEPLOYMENT)
    engine["ray_actor_options"] = {**engine["ray_actor_options"], "num_cpus": 1}
    del engine["ray_actor_options"]["num_gpus"]
    path = work / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_shipped_serve_config_serves_on_the_routers_own_port_and_through_the_proxy(tmp_path: Path) -> None:
    shipped = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    (app,) = shipped["applications"]
    router = next(d for d in app["deployments"] if d["name"] == ROUTER_DEPLOYMENT)
    replicas = router["num_replicas"]
    assert app["args"]["router"]["ingress"] == "direct" and router["ray_actor_options"]["resources"]
    keys_file = tmp_path / "keys.yaml"
    key = create_key(keys_file, "full", "--base", "--adapter", "*")
    proxy_port, router_port = free_port(), free_port()
    config = local_copy(tmp_path, keys_file, proxy_port, router_port)
    log = tmp_path / "driver.log"
    with log.open("wb") as sink:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(config), str(replicas)], stdout=sink,
                                  stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while b"deployed" not in log.read_bytes():
            assert driver.poll() is None, tail(log)
            assert time.monotonic() < deadline, tail(log)
            time.sleep(1)
        router_title = f"ServeReplica:loraplex:{ROUTER_DEPLOYMENT}"
        routers = [pid for pid in session_processes(driver.pid) if router_title in command_line(pid)]
        assert len(routers) == replicas  # each placed on a `loraplex_router` unit; they share the port

        for port in (router_port, proxy_port):
            url = f"http://127.0.0.1:{port}"
            wait_until_ready(driver, url, log)
            anonymous = httpx.post(f"{url}/v1/completions", json={"model": "sim-base", "prompt": "hi"}, timeout=30)
            assert anonymous.status_code == 401, anonymous.text
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
            stream = client.completions.create(model="sim-base", prompt="hi", max_tokens=5, stream=True)
            assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text) == 5
    finally:
        try:
            stop(driver)  # and nothing of it left behind
        except BaseException:
            print(tail(log))
            raise
