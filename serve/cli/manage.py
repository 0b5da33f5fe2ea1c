"""The `loraplex` commands that manage a running server and its keys: `adapters list|show|add|rm`, `keys create|list`,
and `verify` (what the server serves, against transformers + PEFT here). `serve.cli.main` adds them to the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_ASSETS = Path(".loraplex")

adapters_app = typer.Typer(add_completion=False, help="Manage a running server's adapters.")
UrlOption = Annotated[str, typer.Option(help="The server's base URL.", envvar="LORAPLEX_URL")]
ApiKeyOption = Annotated[
    str | None, typer.Option("--api-key", help="An admin API key, sent as a bearer token.", envvar="LORAPLEX_API_KEY")
]


def _call(method: str, url: str, api_key: str | None, **kwargs: Any) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.request(method, url, headers=headers, timeout=300, **kwargs)
    if response.status_code >= 400:
        error = response.json().get("error", {})
        typer.echo(f"error {response.status_code}: {error.get('message', response.text)}", err=True)
        raise typer.Exit(1)
    return response.json()


@adapters_app.command("list")
def adapters_list(url: UrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """List registered adapters (every page)."""
    params: dict[str, str] = {}
    while True:
        page = _call("GET", f"{url}/v1/adapters", api_key, params=params)
        for item in page["data"]:
            pinned = " pinned" if item["pinned"] else ""
            made = item.get("composition")
            source = item.get("source", "-") if made is None else _composition(made)
            rollout = f"\trollout {_split(item)}" if item.get("canary") else ""
            typer.echo(f"{item['id']}\tv{item['version']}\tr={item['rank']}\t{source}{pinned}{rollout}")
            for warning in item.get("warnings") or ():
                typer.echo(f"  warning: {warning}")
        if not page.get("has_more") or not page["data"]:
            return
        params = {"after": page["last_id"]}


@adapters_app.command("show")
def adapters_show(name: str, url: UrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Show NAME: its version, rank, targets, the PEFT options it carries and how each is served, its warnings."""
    item = _call("GET", f"{url}/v1/adapters/{name}", api_key)
    made = item.get("composition")
    source = item.get("source", "-") if made is None else _composition(made)
    pinned = " pinned" if item["pinned"] else ""
    typer.echo(f"{item['id']}\tv{item['version']}\tr={item['rank']}\talpha={item['alpha']:g}\t{source}{pinned}")
    typer.echo(f"  targets: {', '.join(item['target_modules'])}")
    for option in item.get("options") or ():
        typer.echo(f"  option: {option}")
    for warning in item.get("warnings") or ():
        typer.echo(f"  warning: {warning}")
    if item.get("unusable"):
        typer.echo(f"  unusable: {item['unusable']}")
    if item.get("canary"):
        typer.echo(f"  rollout: {_split(item)}")


def _composition(made: dict[str, Any]) -> str:
    parts = ", ".join(f"{name}*{weight:g}" for name, weight in zip(made["adapters"], made["weights"], strict=True))
    return f"{made['method']}({parts})"


@adapters_app.command("add")
def adapters_add(
    name: str,
    source: str,
    pinned: Annotated[bool, typer.Option(help="Never evict once loaded.")] = False,
    tool_call_parser: Annotated[
        str | None, typer.Option(help="vLLM tool-call parser of this adapter's chat format (engine.tool_call_parsers).")
    ] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
) -> None:
    """Register NAME from SOURCE (a folder, file://..., s3://... or hf://...); a new version if NAME exists."""
    from serve.cli.progress import on_server, sized

    body: dict[str, object] = {"name": name, "source": source, "pinned": pinned}
    if tool_call_parser is not None:
        body["tool_call_parser"] = tool_call_parser
    with on_server(f"fetching and validating {sized(source)} on the server") as work:
        item = _call("POST", f"{url}/v1/adapters", api_key, json=body)
    typer.echo(f"{item['id']} v{item['version']}")
    work.made(item)


@adapters_app.command("compose")
def adapters_compose(
    name: str,
    components: Annotated[list[str], typer.Argument(help="Registered adapters as NAME=WEIGHT, e.g. sql=0.7 chat=0.3.")],
    method: Annotated[
        str, typer.Option(help="PEFT's combination: cat, svd, linear, ties, dare_linear or dare_ties.")
    ] = "cat",
    density: Annotated[float | None, typer.Option(help="Share of weights kept (ties and dare only).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of DARE's random pruning.")] = 0,
    pinned: Annotated[bool, typer.Option(help="Never evict once loaded.")] = False,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
) -> None:
    """Register NAME as a weighted combination of registered adapters (built with PEFT's add_weighted_adapter)."""
    adapters = []
    for component in components:
        adapter, separator, weight = component.rpartition("=")
        try:
            adapters.append({"name": adapter, "weight": float(weight)})
        except ValueError:
            separator = ""
        if not separator or not adapter:
            raise typer.BadParameter(f"{component!r}: write each component as NAME=WEIGHT")
    spec: dict[str, Any] = {"adapters": adapters, "method": method, "seed": seed}
    if density is not None:
        spec["density"] = density
    from serve.cli.progress import on_server

    with on_server(f"composing {name} from {', '.join(components)} on the server") as work:
        item = _call("POST", f"{url}/v1/adapters", api_key, json={"name": name, "compose": spec, "pinned": pinned})
    typer.echo(f"{item['id']} v{item['version']} r={item['rank']}")
    work.made(item)


def _split(item: dict[str, Any]) -> str:
    canary = item.get("canary")
    if not canary:
        return f"v{item['version']} 100%"
    share = item["canary_percent"]
    return f"v{item['version']} {100 - share:g}% / v{canary['version']} {share:g}%"


@adapters_app.command("rollout")
def adapters_rollout(
    name: str,
    source: str,
    percent: Annotated[float, typer.Option(min=0, max=100, help="Share of NAME's requests the new version gets.")] = 10,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
) -> None:
    """Roll SOURCE out as NAME's next version to --percent of its requests (sticky per `user`)."""
    from serve.cli.progress import on_server, sized

    with on_server(f"fetching and validating {sized(source)} on the server") as work:
        item = _call("POST", f"{url}/v1/adapters/{name}/rollout", api_key, json={"source": source, "percent": percent})
    typer.echo(f"{item['id']}\t{_split(item)}")
    work.made(item.get("canary") or item)  # the version just registered


@adapters_app.command("split")
def adapters_split(
    name: str,
    percent: Annotated[float, typer.Argument(min=0, max=100, help="Share of NAME's requests the new version gets.")],
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
) -> None:
    """Change the share of NAME's requests its new version gets."""
    item = _call("PATCH", f"{url}/v1/adapters/{name}/rollout", api_key, json={"percent": percent})
    typer.echo(f"{item['id']}\t{_split(item)}")


@adapters_app.command("promote")
def adapters_promote(name: str, url: UrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Make the version being rolled out NAME's only one."""
    item = _call("POST", f"{url}/v1/adapters/{name}/promote", api_key)
    typer.echo(f"{item['id']}\t{_split(item)}")


@adapters_app.command("rollback")
def adapters_rollback(name: str, url: UrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Drop the version being rolled out: NAME's current version takes every request again."""
    item = _call("POST", f"{url}/v1/adapters/{name}/rollback", api_key)
    typer.echo(f"{item['id']}\t{_split(item)}")


@adapters_app.command("rm")
def adapters_rm(name: str, url: UrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Unregister NAME."""
    typer.echo(_call("DELETE", f"{url}/v1/adapters/{name}", api_key)["id"] + " removed")


keys_app = typer.Typer(add_completion=False, help="Manage API keys (the file named by router.auth.keys_file).")
KeysFileOption = Annotated[Path, typer.Option("--file", help="The keys file (YAML, or JSON if it ends in .json).")]


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="The key's public id, shown in audit logs and limits.")],
    file: KeysFileOption,
    adapter: Annotated[list[str] | None, typer.Option(help="Adapter name or glob the key may use; repeatable.")] = None,
    base: Annotated[bool, typer.Option(help="The key may use the base model.")] = False,
    admin: Annotated[bool, typer.Option(help="The key may register and remove adapters.")] = False,
    metrics: Annotated[bool, typer.Option(help="The key may read /metrics (give it to Prometheus).")] = False,
    compose: Annotated[bool, typer.Option(help="The key may send inline composites (`compose`).")] = False,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens (prompt + completion) per minute.")] = None,
    weight: Annotated[float, typer.Option(help="Fair-share weight under load.")] = 1.0,
) -> None:
    """Mint a key, print it once, and append only its SHA-256 (with its scope and limits) to --file."""
    from pydantic import ValidationError

    from routing.keys import append_key, hash_api_key, new_api_key
    from serve.config import ApiKeyConfig

    key = new_api_key()
    try:
        entry = ApiKeyConfig(
            name=name, sha256=hash_api_key(key), adapters=adapter or [], base=base, admin=admin,
            metrics=metrics, compose=compose, rpm=rpm, tpm=tpm, weight=weight,
        )  # fmt: skip
        append_key(file, entry)
    except (ValidationError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"created key {name!r} in {file}; it is shown only this once:", err=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(file: KeysFileOption) -> None:
    """Show each key's name, scope and limits (never a key: the file holds none)."""
    from routing.keys import read_keys_file

    for key in read_keys_file(file).keys:
        scopes = [*key.adapters, *(["<base>"] if key.base else []), *(["<admin>"] if key.admin else []),
                  *(["<metrics>"] if key.metrics else []), *(["<compose>"] if key.compose else [])]  # fmt: skip
        typer.echo(
            f"{key.name}\t{','.join(scopes) or '-'}\trpm={key.rpm or '-'}\ttpm={key.tpm or '-'}\tw={key.weight:g}"
        )


def verify(
    name: str,
    model: Annotated[
        Path | None,
        typer.Option(help="The base model's folder here (default: .loraplex/models/BASE, as `make serve` builds it)."),
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(help="The adapter's folder here (default: its registered s3:// or hf:// source, admins only)."),
    ] = None,
    version: Annotated[
        int | None,
        typer.Option(min=1, help="The version to verify while a new one is rolled out (default: the current one)."),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts to compare, one per line or a JSON list (default: four built in).")
    ] = None,
    tokens: Annotated[int, typer.Option(min=1, max=256, help="Greedy tokens compared per prompt.")] = 16,
    s3_endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint of an s3:// source (default: AWS).")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
) -> None:
    """Check that the server serves adapter NAME as transformers + PEFT compute it here; exit 1 on a mismatch."""
    from serve.adapters.sources import S3Source
    from serve.cli.verify import VerifyError, read_prompts
    from serve.cli.verify import verify as run

    try:
        if model is not None and not (model / "config.json").is_file():
            raise VerifyError(f"no model folder at {model}: pass --model FOLDER")
        verdict = run(url, name, model, assets=DEFAULT_ASSETS, adapter_dir=adapter, version=version,
                      prompts=read_prompts(prompts), tokens=tokens, api_key=api_key,
                      s3=S3Source(endpoint_url=s3_endpoint_url),
                      progress=lambda line: typer.echo(line, err=True))  # fmt: skip
    except VerifyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(verdict.report())
    raise typer.Exit(0 if verdict.ok else 1)
