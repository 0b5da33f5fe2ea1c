"""`make cluster-demo`: a two-node Ray cluster on this machine serves loraplex, then loses its worker node.

1. `ray start --head` and `ray start --address` (a second raylet: a worker node on the same host).
2. `serve run --non-blocking deploy/serve-cluster-demo.yaml`: an engine and a router replica per node.
3. Requests for the base model and an adapter; Serve's status shows replicas on both nodes.
4. The worker node is killed (its raylet and every process under it, as if the machine died).
5. Requests keep going for 30 s: the head's replicas answer them. Then both nodes are stopped.

Prints one line per step and ends with `cluster_demo answered_before=N answered_after=N failed_after=N`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = REPO / "deploy" / "serve-cluster-demo.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_start(temp_dir: Path, env: dict[str, str], *args: str) -> None:
    command = [str(BIN / "ray"), "start", "--disable-usage-stats", f"--temp-dir={temp_dir}", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def node_processes(temp_dir: Path, marker: str = "") -> list[psutil.Process]:
    """Ray's daemons of this demo (their command lines name its temp dir), optionally one node's."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(temp_dir) in cmdline and marker in cmdline:
            found.append(proc)
    return found


def kill_trees(processes: list[psutil.Process]) -> None:
    victims = []
    for proc in processes:
        try:
            victims += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(victims, timeout=30)


def ask(url: str, model: str) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0}  # fmt: skip
    try:
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200 and ask(url, "alpha"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the app did not answer within {timeout_s:.0f}s")


def replicas_per_node(env: dict[str, str]) -> dict[str, list[str]]:
    """Live loraplex replica actors by node, from the GCS actor table (no dashboard runs in this demo)."""
    script = (
        "import json, ray; ray.init(logging_level='ERROR'); from ray._private.state import actors;"
        "print(json.dumps([(a['ActorClassName'], a['Address']['NodeID'][:8]) for a in actors().values()"
        " if a['State'] == 'ALIVE' and 'Loraplex' in a['ActorClassName']]))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    placement: dict[str, list[str]] = {}
    for class_name, node in json.loads(lines[-1]) if lines else []:
        placement.setdefault(node, []).append(class_name.rsplit(":", 1)[-1].split(".")[-1])
    return placement


def main() -> int:
    temp_dir = Path(tempfile.mkdtemp(prefix="lpx-cluster-"))
    gcs_port, http_port, worker_manager_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    # Ray 2.60 turns token authentication on when a token exists; give this cluster its own token.
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = http_port
    deployed = temp_dir / "serve.yaml"
    deployed.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{http_port}"
    answered_before = answered_after = failed_after = 0
    try:
        head_env = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
        ray_start(temp_dir, head_env, "--head", f"--port={gcs_port}", "--num-cpus=4", "--include-dashboard=false")
        ray_start(temp_dir, env, f"--address={address}", "--num-cpus=4", f"--node-manager-port={worker_manager_port}",
                  f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                  f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}")  # fmt: skip
        print(f"cluster: head at {address}, worker node on the same host", flush=True)
        subprocess.run([str(BIN / "serve"), "run", "--non-blocking", str(deployed)], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
        wait_healthy(url, 600)
        print(f"deployed {CONFIG.relative_to(REPO)} at {url}; replicas by node: {replicas_per_node(env)}")
        answered_before = sum(ask(url, model) for model in ("SmolLM2-135M-Instruct", "alpha", "beta") * 4)
        print(f"before losing the worker: {answered_before}/12 requests answered", flush=True)

        worker = node_processes(temp_dir, f"--node_manager_port={worker_manager_port}")
        if not worker:
            raise RuntimeError("could not find the worker node's raylet")
        kill_trees(worker)
        print("worker node killed (raylet and everything under it)", flush=True)
        killed_at = time.monotonic()
        durations: list[float] = []
        while time.monotonic() < killed_at + 30:
            for model in ("SmolLM2-135M-Instruct", "alpha"):
                started = time.monotonic()
                if ask(url, model):
                    answered_after += 1
                else:
                    failed_after += 1
                durations.append(time.monotonic() - started)
            time.sleep(0.5)
        durations.sort()
        print(f"after: {answered_after} answered, {failed_after} failed in 30 s; request time median "
              f"{durations[len(durations) // 2]:.1f} s, max {durations[-1]:.1f} s; replicas by node: "
              f"{replicas_per_node(env)}", flush=True)  # fmt: skip
    finally:
        kill_trees(node_processes(temp_dir))
        left = node_processes(temp_dir)
        print(f"cluster stopped; {len(left)} of its processes left", flush=True)
    print(f"cluster_demo answered_before={answered_before} answered_after={answered_after} failed_after={failed_after}")
    return 0 if answered_before == 12 and answered_after > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
