"""Ray Serve LLM (`ray.serve.llm.build_openai_app`) serving a model, for side-by-side benchmarks.

Ray Serve LLM loads LoRA adapters only from object storage, so adapters are read from an
S3-compatible endpoint (moto on loopback in `make bench`) given by AWS_ENDPOINT_URL_S3.
Usage: python -m loadtests.rayllm_server CONFIG.json PORT
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def main(config_file: str, port: int) -> None:
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    spec: dict[str, Any] = json.loads(Path(config_file).read_text())
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        llm_config = LLMConfig(
            model_loading_config={"model_id": spec["model_id"], "model_source": spec["model"]},
            engine_kwargs=spec["engine_kwargs"],
            lora_config=spec.get("lora_config"),
            runtime_env={"env_vars": spec["env"]},
            deployment_config={"num_replicas": 1},
            # No accelerator here: CPU bundles make Ray Serve LLM schedule the engine without a GPU.
            placement_group_config={"bundles": [{"CPU": 1}]},
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app({"llm_configs": [llm_config]}), blocking=False)
        print("rayllm: ready", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
