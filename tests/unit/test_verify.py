"""`loraplex verify` against a scripted server: it gets the version it names during a rollout, makes no local path of
the server's words, and reads the server's answers up to a bound. transformers + PEFT are stood in for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from serve.adapters.safetensors_files import content_hash
from serve.cli import verify as verify_module
from serve.cli.verify import MAX_ANSWER_BYTES, VerifyError, verify
from serve.demo.reference import Greedy
from serve.wire import user_point

BASE = "tiny-base"
PROMPTS = ["one", "two", "three", "four", "five", "six"]
TOKENS = {3: 5, 4: 7}
"""The token each version of the adapter answers greedily (and its local files make the reference answer)."""


class FakeReference:
    """transformers + PEFT, standing in: the greedy tokens are the `token` file of the adapter's folder."""

    made: ClassVar[list[Path]] = []

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        FakeReference.made.append(model_dir)
        self.token = int((next(iter(adapters.values())) / "token").read_text())

    def chat_prompt(self, text: str) -> list[int]:
        return [1, 2, 3]

    def greedy(self, adapter: str | None, prompt: list[int], max_tokens: int) -> Greedy:
        return Greedy(tokens=[self.token] * max_tokens, top=[{self.token, 1}] * max_tokens)


@pytest.fixture(autouse=True)
def reference(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeReference.made = []
    monkeypatch.setattr(verify_module, "Reference", FakeReference)


def adapter_folder(root: Path, version: int) -> Path:
    folder = root / f"support-v{version}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "token").write_text(str(TOKENS[version]))
    return folder


def model_folder(assets: Path, name: str = BASE) -> Path:
    folder = assets / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


class RollingServer:
    """Adapter `support` at version 3 with version 4 rolled out to `percent` % of its requests, answered as the router
    does: by the `user`'s point, else by a draw (here: always the new version)."""

    def __init__(self, tmp: Path, percent: float = 50.0, source: str = "s3://bucket/support-v3") -> None:
        self.percent = percent
        self.bodies: list[dict[str, Any]] = []
        self.card = {
            "id": f"{BASE}:support", "name": "support", "version": 3, "source": source,
            "content_hash": content_hash(adapter_folder(tmp, 3)), "canary_percent": percent,
            "canary": {"name": "support", "version": 4, "content_hash": content_hash(adapter_folder(tmp, 4))},
        }  # fmt: skip

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=self.card)
        body = json.loads(request.content)
        self.bodies.append(body)
        user = body.get("user")
        new = user_point("support", 4, user) < self.percent if user else True
        model, token = (f"{BASE}:support@v4", TOKENS[4]) if new else (f"{BASE}:support", TOKENS[3])
        logprobs = {"tokens": [f"token_id:{token}"] * body["max_tokens"],
                    "top_logprobs": [{f"token_id:{token}": -0.1, "token_id:1": -2.0}] * body["max_tokens"]}  # fmt: skip
        return httpx.Response(200, json={"model": model, "choices": [{"logprobs": logprobs}]})


def run(server: RollingServer | Any, tmp: Path, **options: Any) -> Any:
    handle = server.handle if isinstance(server, RollingServer) else server
    options.setdefault("model_dir", model_folder(tmp / "given"))
    return verify("http://127.0.0.1:8000", "support", transport=httpx.MockTransport(handle), prompts=PROMPTS,
                  tokens=4, **options)  # fmt: skip


@pytest.mark.parametrize("version", [3, 4])
def test_during_a_rollout_it_verifies_the_version_it_names_and_gets_it(tmp_path: Path, version: int) -> None:
    server = RollingServer(tmp_path)
    verdict = run(server, tmp_path, adapter_dir=tmp_path / f"support-v{version}", version=version)
    assert verdict.ok and verdict.same_content and verdict.version == version, verdict.report()
    assert len({body["user"] for body in server.bodies}) == 1  # one user, which gets this version


def test_by_default_it_verifies_the_current_version(tmp_path: Path) -> None:
    server = RollingServer(tmp_path)
    verdict = run(server, tmp_path, adapter_dir=tmp_path / "support-v3")
    assert verdict.ok and verdict.version == 3, verdict.report()
    assert f"{BASE}:support (version 3)" in verdict.report()


def test_an_answer_from_another_version_is_a_mismatch_that_names_it(tmp_path: Path) -> None:
    server = RollingServer(tmp_path)

    def ignoring_user(request: httpx.Request) -> httpx.Response:  # a server that draws whatever `user` says
        if request.method == "POST":
            body = json.loads(request.content)
            body.pop("user", None)
            request = httpx.Request("POST", request.url, json=body)
        return server.handle(request)

    verdict = run(ignoring_user, tmp_path, adapter_dir=tmp_path / "support-v3")
    assert not verdict.ok
    assert all("answered by 'tiny-base:support@v4', not version 3" in r.detail for r in verdict.results)


@pytest.mark.parametrize(("percent", "version", "share"), [(0.0, 4, "0 %"), (100.0, 3, "0 %")])
def test_a_version_no_request_gets_cannot_be_verified(tmp_path: Path, percent: float, version: int, share: str) -> None:
    with pytest.raises(VerifyError, match=f"version {version} of support gets {share}"):
        run(RollingServer(tmp_path, percent), tmp_path, adapter_dir=tmp_path / "support-v3", version=version)


@pytest.mark.parametrize("version", [2, 5])
def test_a_version_the_server_does_not_serve_is_refused(tmp_path: Path, version: int) -> None:
    with pytest.raises(VerifyError, match=f"versions 3 and 4 of support, not {version}"):
        run(RollingServer(tmp_path), tmp_path, adapter_dir=tmp_path / "support-v3", version=version)


@pytest.mark.parametrize("base_id", ["../outside", "/abs/outside", "models/../../outside", "..", "missing"])
def test_the_base_models_folder_is_one_listed_here_never_a_path_from_the_server(tmp_path: Path, base_id: str) -> None:
    assets = tmp_path / "assets"
    model_folder(assets, "present")
    (assets / "outside").mkdir()
    (assets / "outside" / "config.json").write_text("{}")  # what `models/../outside` would reach
    server = RollingServer(tmp_path)
    server.card["id"] = f"{base_id}:support"
    with pytest.raises(VerifyError, match="pass --model FOLDER"):
        run(server, tmp_path, model_dir=None, assets=assets, adapter_dir=tmp_path / "support-v3")
    assert FakeReference.made == []
    server.card["id"] = "present:support"
    run(server, tmp_path, model_dir=None, assets=assets, adapter_dir=tmp_path / "support-v3")
    assert FakeReference.made == [assets / "models" / "present"]


@pytest.mark.parametrize("source", ["/home/someone/.ssh", "file:///etc/loraplex"])
def test_a_folder_source_is_the_servers_path_and_is_not_read(tmp_path: Path, source: str) -> None:
    with pytest.raises(VerifyError, match=r"a folder on the server \(.*\): pass --adapter FOLDER"):
        run(RollingServer(tmp_path, source=source), tmp_path)
    assert FakeReference.made == []


def test_answers_are_read_up_to_a_bound(tmp_path: Path) -> None:
    server = RollingServer(tmp_path)
    huge = b'{"pad": "' + b"x" * MAX_ANSWER_BYTES + b'"}'

    def card_too_large(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=huge)

    with pytest.raises(VerifyError, match=f"over {MAX_ANSWER_BYTES} bytes"):
        run(card_too_large, tmp_path, adapter_dir=tmp_path / "support-v3")

    def answer_too_large(request: httpx.Request) -> httpx.Response:
        return server.handle(request) if request.method == "GET" else httpx.Response(200, content=huge)

    verdict = run(answer_too_large, tmp_path, adapter_dir=tmp_path / "support-v3")
    assert not verdict.ok and all(f"over {MAX_ANSWER_BYTES} bytes" in r.detail for r in verdict.results)
