"""`loraplex verify NAME`: proves on the user's machine that a server serves their fine-tune faithfully.

The base model and the adapter's files are loaded with transformers + PEFT here; the same prompts go to the
server (greedy, top-5 logprobs, as token ids so both sides see the same prompt); each answer is compared with
the project's rule (`serve.demo.reference`): tokens equal, or at the first divergence each side's token in the
other's top-5. The adapter's files are first checked against the content hash of the version verified, so a
version mismatch is named as such. During a rollout the requests carry a `user` that gets that version, and each
answer must say it came from it. Nothing the server says becomes a local path, and its answers are read up to a
bound.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from serve.adapters.safetensors_files import content_hash
from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.demo.reference import Greedy, Reference, divergence, served_greedy
from serve.wire import VERSION_SEPARATOR, user_point

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a LoRA adapter is.",
)


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    model: str
    version: int
    files: str
    same_content: bool
    """The local files hash to the content the server's version was registered with."""
    results: tuple[PromptResult, ...]

    @property
    def ok(self) -> bool:
        return self.same_content and all(r.ok for r in self.results)

    def report(self) -> str:
        lines = [f"{self.model} (version {self.version}) against transformers + PEFT with {self.files}"]
        if not self.same_content:
            lines.append("  FILES DIFFER: these files are not the content of the version the server serves")
        for result in self.results:
            lines.append(f"  {'ok      ' if result.ok else 'MISMATCH'} {result.prompt!r}: {result.detail}")
        passed = sum(r.ok for r in self.results)
        lines.append(f"{'PASS' if self.ok else 'FAIL'}: {passed}/{len(self.results)} prompts within the top-5 rule")
        return "\n".join(lines)


class VerifyError(Exception):
    """What stops a verification before any comparison (server unreachable, adapter unknown, files missing)."""


def read_prompts(file: Path | None) -> list[str]:
    """One prompt per line, or a JSON list of strings; the defaults without a file."""
    if file is None:
        return list(DEFAULT_PROMPTS)
    text = file.read_text()
    if text.lstrip().startswith("["):
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise VerifyError(f"{file}: a JSON prompts file holds a list of strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise VerifyError(f"{file} holds no prompt")
    return list(prompts)


MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""Largest answer read from the server (an adapter's card, one completion with its top-5 logprobs: kilobytes)."""
MAX_ADAPTER_BYTES = 2 * 1024**3
"""Largest adapter fetched from its `s3://` or `hf://` source (the registry's default `max_adapter_bytes`)."""
USERS = 10_000
"""`user` values tried to find one that a rollout sends to the version verified."""


@dataclass(frozen=True)
class Served:
    """The version verified: its number, its content hash, the `user` that gets it during a rollout (None: no
    rollout), and the `model` the server's answers for it carry."""

    version: int
    content_hash: str
    user: str | None
    model: str


def served_version(card: dict[str, Any], name: str, version: int | None) -> Served:
    """The version of adapter `name` (its `card`) to verify: `version`, or the current one. During a rollout a request
    gets the version its `user`'s point falls in (`serve.wire.user_point`), so a `user` that gets this one is picked;
    the rolled-out version answers as `BASE:NAME@vN`."""
    current = Served(int(card["version"]), str(card["content_hash"]), None, str(card["id"]))
    canary = card.get("canary")
    if not canary:
        if version not in (None, current.version):
            raise VerifyError(f"the server serves version {current.version} of {name} only, not {version}")
        return current
    new = int(canary["version"])
    if version not in (None, current.version, new):
        raise VerifyError(f"the server serves versions {current.version} and {new} of {name}, not {version}")
    percent = float(card["canary_percent"])
    wanted_new = version == new
    for i in range(USERS):
        user = f"loraplex-verify-{i}"
        if (user_point(name, new, user) < percent) == wanted_new:
            if wanted_new:
                return Served(new, str(canary["content_hash"]), user, f"{card['id']}{VERSION_SEPARATOR}{new}")
            return replace(current, user=user)
    share, wanted = (percent, new) if wanted_new else (100 - percent, current.version)
    raise VerifyError(f"version {wanted} of {name} gets {share:g} % of its requests now: none to verify")


def default_model_dir(assets: Path, model_id: str) -> Path:
    """The base model's folder under `assets/models` as `make serve` builds it: the folder there whose name is the
    server's base model id (a folder listed here, never a path made of the server's words)."""
    base_id = model_id.rsplit(":", 1)[0]
    models = assets / "models"
    folders = {folder.name: folder for folder in models.iterdir() if folder.is_dir()} if models.is_dir() else {}
    if base_id not in folders or not (folders[base_id] / "config.json").is_file():
        raise VerifyError(f"no folder for base model {base_id!r} in {models}: pass --model FOLDER")
    return folders[base_id]


def verify(
    url: str,
    name: str,
    model_dir: Path | None = None,
    *,
    assets: Path = Path(".loraplex"),
    adapter_dir: Path | None = None,
    version: int | None = None,
    prompts: list[str] | None = None,
    tokens: int = 16,
    api_key: str | None = None,
    s3: S3Source | None = None,
    progress: Callable[[str], None] = lambda _: None,
    transport: httpx.BaseTransport | None = None,
) -> Verdict:
    """Compares what the server at `url` answers for `version` (default: the current one) of adapter `name` with
    transformers + PEFT on `model_dir` (default: the base model's folder in `assets/models`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=300, transport=transport) as client:
        card = _answer(client, "GET", f"/v1/adapters/{name}")
        served = served_version(card, str(card.get("name", name)), version)
        model_dir = model_dir or default_model_dir(assets, str(card["id"]))
        with tempfile.TemporaryDirectory(prefix="loraplex-verify-") as tmp:
            files = adapter_dir or _fetch(card, Path(tmp) / "adapter", s3)
            same = content_hash(files) == served.content_hash
            progress(f"loading {model_dir} with {files} (transformers + PEFT)")
            reference = Reference(model_dir, {name: files})
            results = []
            for prompt in prompts or list(DEFAULT_PROMPTS):
                ids = reference.chat_prompt(prompt)
                want = reference.greedy(name, ids, tokens)
                body = {"model": card["id"], "prompt": ids, "max_tokens": tokens, "temperature": 0, "logprobs": 5,
                        "return_tokens_as_token_ids": True, "ignore_eos": True}  # fmt: skip
                if served.user is not None:
                    body["user"] = served.user
                results.append(_compare(client, body, want, served, tokens, prompt))
                progress(f"{'ok' if results[-1].ok else 'MISMATCH'}: {prompt!r}")
    return Verdict(model=card["id"], version=served.version, files=str(adapter_dir or card.get("source")),
                   same_content=same, results=tuple(results))  # fmt: skip


def _compare(
    client: httpx.Client, body: dict[str, Any], want: Greedy, served: Served, tokens: int, prompt: str
) -> PromptResult:
    try:
        answer = _answer(client, "POST", "/v1/completions", json=body)
    except VerifyError as exc:
        return PromptResult(prompt, False, str(exc))
    if answer.get("model") != served.model:
        return PromptResult(prompt, False, f"answered by {answer.get('model')!r}, not version {served.version}")
    step, failure = divergence(want, served_greedy(answer["choices"][0]))
    if failure is not None:
        return PromptResult(prompt, False, failure)
    if step is None:
        return PromptResult(prompt, True, f"{tokens} tokens equal")
    return PromptResult(prompt, True, f"equal up to step {step}, then within each other's top-5")


def _answer(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """The JSON object the server answers, read up to `MAX_ANSWER_BYTES`; `VerifyError` for anything else."""
    try:
        with client.stream(method, path, **kwargs) as response:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise VerifyError(f"{method} {path}: the answer is over {MAX_ANSWER_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise VerifyError(f"cannot reach the server at {client.base_url}: {exc}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if response.status_code != 200 or not isinstance(answer, dict):
        raise VerifyError(f"{method} {path}: the server answered {response.status_code}: {_message(answer, body)}")
    return answer


def _message(answer: Any, body: bytes | bytearray) -> str:
    try:
        return str(answer["error"]["message"])[:500]
    except (KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


def _fetch(card: dict[str, Any], dest: Path, s3: S3Source | None) -> Path:
    """The adapter's registered files, fetched from its `s3://` or `hf://` source (admins see sources) into `dest`, at
    most `MAX_ADAPTER_BYTES`. A folder source is the server's path: it is not read, the user names the folder."""
    source = card.get("source")
    if not source:
        raise VerifyError(
            "the server shows this key no source for the adapter: pass --adapter FOLDER (or an admin key)"
        )
    if urlparse(source).scheme in ("", "file"):
        raise VerifyError(f"the adapter's source is a folder on the server ({source}): pass --adapter FOLDER")
    resolver = SourceResolver(local=LocalSource(()), s3=s3 or S3Source())
    try:
        resolver.fetch(source, dest, MAX_ADAPTER_BYTES)
    except Exception as exc:
        raise VerifyError(f"cannot fetch {source}: {exc}") from None
    return dest
