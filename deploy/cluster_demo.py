"""`make cluster-demo`: a Ray cluster of three nodes on this machine serves loraplex, then loses the registry's node.

1. moto's S3 server on loopback (the cluster's object storage), `ray start --head` with no CPUs (Serve's
   controller and HTTP proxy only) and two worker nodes (two more raylets on the same host).
2. `serve run --non-blocking deploy/serve-cluster-demo.yaml`: an engine and a router replica per worker node,
   the adapter registry on one of them, its records in S3 (`registry.store: s3://...`), no state on any disk.
3. Adapters uploaded to S3 and registered from there; requests for the base model and adapters.
4. The worker node that holds the registry is killed (its raylet and every process under it, as if the machine
   died). Requests keep going for 30 s: the other node's replicas answer them.
5. Serve restarts the registry on the surviving node, from S3: every adapter is listed at the same version,
   and a new one can be registered and served. Then the cluster is stopped.

Prints one line per step and ends with `cluster_demo answered_before=N answered_after=N failed_after=N
adapters_kept=K/N registered_after=0|1`.
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
BUCKET = "lpx-cluster-demo"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo"}
ADAPTERS = {"alpha": "alpha", "beta": "beta", **{f"tenant{i:02d}": ("alpha", "beta")[i % 2] for i in range(20)}}
"""Registered name -> demo adapter whose files it uses."""


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


def wait_healthy(url: str, model: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200 and ask(url, model):
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the app did not answer within {timeout_s:.0f}s")


def start_moto(temp_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (temp_dir / "moto.log").open("wb") as log:
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    for _ in range(60):
        try:
            if httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200:
                return moto, url
        except httpx.HTTPError:
            time.sleep(0.5)
    moto.kill()
    raise RuntimeError("moto's S3 server did not start")


def upload_demo_adapters(s3_url: str) -> dict[str, str]:
    """The demo adapters' files in the demo bucket; their s3:// sources by demo name."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="demo",
                      aws_secret_access_key="demo")  # fmt: skip
    sources = {}
    for demo in ("alpha", "beta"):
        folder = REPO / ".loraplex" / "adapters" / demo
        for file in folder.iterdir():
            s3.upload_file(str(file), BUCKET, f"adapters/{demo}/{file.name}")
        sources[demo] = f"s3://{BUCKET}/adapters/{demo}"
    return sources


def adapter_versions(url: str) -> dict[str, int] | None:
    """Every registered adapter's version (all pages), or None while the registry cannot answer."""
    versions: dict[str, int] = {}
    params: dict[str, str] = {"limit": "1000"}
    while True:
        try:
            response = httpx.get(f"{url}/v1/adapters", params=params, timeout=10)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        page = response.json()
        versions.update({item["name"]: item["version"] for item in page["data"]})
        if not page.get("has_more"):
            return versions
        params["after"] = page["last_id"]


def register(url: str, name: str, source: str) -> bool:
    try:
        response = httpx.post(f"{url}/v1/adapters", json={"name": name, "source": source}, timeout=120)
    except httpx.HTTPError:
        return False
    return response.status_code in (200, 201)


def placement(env: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Live loraplex replica actors by node, and each live node's node-manager port, from the GCS (no dashboard)."""
    script = (
        "import json, ray; ray.init(logging_level='ERROR'); from ray._private.state import actors;"
        "print(json.dumps([[(a['ActorClassName'], a['Address']['NodeID'][:8]) for a in actors().values()"
        " if a['State'] == 'ALIVE' and 'Loraplex' in a['ActorClassName']],"
        " {n['NodeID'][:8]: n['NodeManagerPort'] for n in ray.nodes() if n['Alive']}]))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    actors, ports = json.loads(lines[-1]) if lines else ([], {})
    by_node: dict[str, list[str]] = {}
    for class_name, node in actors:
        by_node.setdefault(node, []).append(class_name.rsplit(":", 1)[-1].split(".")[-1])
    return by_node, ports


def main() -> int:
    temp_dir = Path(tempfile.mkdtemp(prefix="lpx-cluster-"))
    gcs_port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    # Ray 2.60 turns token authentication on when a token exists; give this cluster its own token.
    env = {**os.environ, **S3_KEYS, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
    moto, s3_url = start_moto(temp_dir)
    import boto3

    # The cluster's bucket, for the registry's records and the adapters' files (the store does not create buckets).
    boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="demo",
                 aws_secret_access_key="demo").create_bucket(Bucket=BUCKET)  # fmt: skip
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = http_port
    registry = config["applications"][0]["args"]["registry"]
    registry["s3_endpoint_url"] = s3_url
    registry["store"] = registry["store"].replace("BUCKET", BUCKET)
    deployed = temp_dir / "serve.yaml"
    deployed.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{http_port}"
    answered_before = answered_after = failed_after = kept = registered_after = 0
    try:
        head_env = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
        ray_start(temp_dir, head_env, "--head", f"--port={gcs_port}", "--num-cpus=0", "--include-dashboard=false")
        for _ in range(2):
            flags = [f"--{option}={free_port()}" for option in ("node-manager-port", "metrics-export-port",
                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")]  # fmt: skip
            ray_start(temp_dir, env, f"--address={address}", "--num-cpus=4", *flags)
        print(f"cluster: head at {address} (no CPUs: Serve's controller and proxy), two worker nodes on this host; "
              f"S3 at {s3_url}", flush=True)  # fmt: skip
        subprocess.run([str(BIN / "serve"), "run", "--non-blocking", str(deployed)], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
        base = "SmolLM2-135M-Instruct"
        wait_healthy(url, base, 600)
        sources = upload_demo_adapters(s3_url)
        failed = [name for name, demo in ADAPTERS.items() if not register(url, name, sources[demo])]
        if failed:
            raise RuntimeError(f"could not register {failed}")
        deadline = time.monotonic() + 30  # routers list what they have followed of the registry's changes
        while len(before := adapter_versions(url) or {}) < len(ADAPTERS) and time.monotonic() < deadline:
            time.sleep(1)
        by_node, ports = placement(env)
        print(f"deployed {CONFIG.relative_to(REPO)} at {url}; {len(before)} adapters registered from S3; "
              f"replicas by node: {by_node}", flush=True)  # fmt: skip
        answered_before = sum(ask(url, model) for model in (base, "alpha", "beta", "tenant07") * 3)
        print(f"before losing the registry's node: {answered_before}/12 requests answered", flush=True)

        victim = next((node for node, names in by_node.items() if "LoraplexRegistry" in names), None)
        if victim is None or victim not in ports:
            raise RuntimeError(f"the registry is on no worker node: {by_node}")
        raylet = node_processes(temp_dir, f"--node_manager_port={ports[victim]}")
        if not raylet:
            raise RuntimeError("could not find the registry node's raylet")
        kill_trees(raylet)
        print(f"node {victim} killed (raylet and everything under it: the registry, an engine, a router)", flush=True)
        killed_at = time.monotonic()
        durations: list[float] = []
        while time.monotonic() < killed_at + 30:
            for model in (base, "alpha", "tenant07"):
                started = time.monotonic()
                if ask(url, model):
                    answered_after += 1
                else:
                    failed_after += 1
                durations.append(time.monotonic() - started)
            time.sleep(0.5)
        durations.sort()
        print(f"after: {answered_after} answered, {failed_after} failed in 30 s; request time median "
              f"{durations[len(durations) // 2]:.1f} s, max {durations[-1]:.1f} s", flush=True)  # fmt: skip
        # A write needs the registry: it answers once Serve has restarted it on the surviving node, from S3. The
        # routers then follow the new registry (another run's generation): their list is its full list.
        deadline = time.monotonic() + 180
        while not (registered := register(url, "after-loss", sources["beta"])) and time.monotonic() < deadline:
            time.sleep(2)
        after: dict[str, int] = {}
        while registered and "after-loss" not in after and time.monotonic() < deadline:
            after = adapter_versions(url) or {}
            time.sleep(1)
        kept = sum(after.get(name) == version for name, version in before.items())
        registered_after = int(registered and ask(url, "after-loss"))
        by_node, _ = placement(env)
        print(f"registry restarted from S3: {kept}/{len(before)} adapters at the same version; a new one "
              f"{'registered and served' if registered_after else 'NOT registered'}; replicas by node: {by_node}",
              flush=True)  # fmt: skip
    finally:
        kill_trees(node_processes(temp_dir))
        moto.kill()
        moto.wait()
        left = node_processes(temp_dir)
        print(f"cluster stopped; {len(left)} of its processes left", flush=True)
    print(f"cluster_demo answered_before={answered_before} answered_after={answered_after} failed_after={failed_after} "
          f"adapters_kept={kept}/{len(ADAPTERS)} registered_after={registered_after}")  # fmt: skip
    ok = answered_before == 12 and answered_after > 0 and kept == len(ADAPTERS) and registered_after == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
