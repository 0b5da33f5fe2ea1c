"""`loraplex verify NAME`: proves on the user's machine that a server serves their fine-tune faithfully.

The base model and the adapter's files are loaded with transformers + PEFT here; the same prompts go to the
server (greedy, top-5 logprobs, as token ids so both sides see the same prompt); each answer is compared with
the project's rule (`serve.reference`): tokens equal, or at the first divergence each side's token in the
other's top-5. The adapter's files are first checked against the content hash of the version the server
serves, so a version mismatch is named as such.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.adapters.validation import content_hash
from serve.reference import Reference, divergence, served_greedy

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


def verify(
    url: str,
    name: str,
    model_dir: Path,
    *,
    adapter_dir: Path | None = None,
    prompts: list[str] | None = None,
    tokens: int = 16,
    api_key: str | None = None,
    s3: S3Source | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Verdict:
    """Compares what the server at `url` answers for adapter `name` with transformers + PEFT on `model_dir`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        card = _get(client, f"/v1/adapters/{name}")
        with tempfile.TemporaryDirectory(prefix="loraplex-verify-") as tmp:
            files = adapter_dir or _fetch(card, Path(tmp) / "adapter", s3)
            same = content_hash(files) == card["content_hash"]
            progress(f"loading {model_dir} with {files} (transformers + PEFT)")
            reference = Reference(model_dir, {name: files})
            results = []
            for prompt in prompts or list(DEFAULT_PROMPTS):
                ids = reference.chat_prompt(prompt)
                want = reference.greedy(name, ids, tokens)
                body = {"model": card["id"], "prompt": ids, "max_tokens": tokens, "temperature": 0, "logprobs": 5,
                        "return_tokens_as_token_ids": True, "ignore_eos": True}  # fmt: skip
                answer = client.post("/v1/completions", json=body)
                if answer.status_code != 200:
                    results.append(PromptResult(prompt, False, f"the server answered {answer.status_code}: "
                                                f"{_message(answer)}"))  # fmt: skip
                    continue
                step, failure = divergence(want, served_greedy(answer.json()["choices"][0]))
                if failure is not None:
                    results.append(PromptResult(prompt, False, failure))
                elif step is None:
                    results.append(PromptResult(prompt, True, f"{tokens} tokens equal"))
                else:
                    results.append(
                        PromptResult(prompt, True, f"equal up to step {step}, then within each other's top-5")
                    )
                progress(f"{'ok' if results[-1].ok else 'MISMATCH'}: {prompt!r}")
    return Verdict(model=card["id"], version=card["version"], files=str(adapter_dir or card.get("source")),
                   same_content=same, results=tuple(results))  # fmt: skip


def _get(client: httpx.Client, path: str) -> dict[str, Any]:
    try:
        response = client.get(path)
    except httpx.HTTPError as exc:
        raise VerifyError(f"cannot reach the server at {client.base_url}: {exc}") from None
    if response.status_code != 200:
        raise VerifyError(f"GET {path}: {response.status_code} {_message(response)}")
    return dict(response.json())


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _fetch(card: dict[str, Any], dest: Path, s3: S3Source | None) -> Path:
    """The adapter's registered files, from its source (a folder on this machine, or S3): admins see sources."""
    source = card.get("source")
    if not source:
        raise VerifyError(
            "the server shows this key no source for the adapter: pass --adapter FOLDER (or an admin key)"
        )
    scheme = urlparse(source).scheme
    if scheme in ("", "file"):
        folder = Path(urlparse(source).path if scheme else source)
        if not folder.is_dir():
            raise VerifyError(f"the adapter's source {source} is not a folder on this machine: pass --adapter FOLDER")
        return folder
    resolver = SourceResolver(local=LocalSource(()), s3=s3 or S3Source())
    try:
        resolver.fetch(source, dest)
    except Exception as exc:
        raise VerifyError(f"cannot fetch {source}: {exc}") from None
    return dest
