"""Remote media URLs in prompts are refused unless `router.allowed_media_domains` lists their host: vLLM would fetch
them from the engine replica's network. Inline `data:` media always pass; the list also reaches vLLM's own check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serve.config import EngineConfig
from serve.engines.vllm_engine import vllm_cli_args
from tests.unit.fake_engine import FakeEngine
from tests.unit.tenancy import BASE, client_for, make_app

INTERNAL = "http://169.254.169.254/latest/meta-data/iam"
PIXEL = "data:image/png;base64,iVBORw0KGgo="


def chat(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]}


REMOTE = [
    ("/v1/chat/completions", chat({"type": "image_url", "image_url": {"url": INTERNAL}}),
     "messages.0.content.1.image_url.url"),
    ("/v1/chat/completions", chat({"image_url": INTERNAL}), "messages.0.content.1.image_url"),  # vLLM's bare part
    ("/v1/chat/completions", chat({"type": "video_url", "video_url": {"url": "https://internal.corp/v.mp4"}}),
     "messages.0.content.1.video_url.url"),
    ("/v1/chat/completions", chat({"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}),
     "messages.0.content.1.audio_url.url"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": INTERNAL}]}]},
     "input.0.content.0.image_url"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": INTERNAL}]}]},
     "input.0.content.0.file_url"),
    ("/v1/messages", {"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": INTERNAL}}]}]}, "messages.0.content.0.source.url"),
    ("/v1/messages", {"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_result",
        "tool_use_id": "t", "content": [{"type": "image", "source": {"type": "url", "url": INTERNAL}}]}]}]},
     "messages.0.content.0.content.0.source.url"),
    ("/tokenize", chat({"type": "image_url", "image_url": {"url": INTERNAL}}), "messages.0.content.1.image_url.url"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), REMOTE)
async def test_remote_media_are_refused_by_default_naming_the_part(path: str, body: dict[str, Any], param: str) -> None:
    engine = FakeEngine()
    async with client_for(make_app([], engine)) as client:
        answer = await client.post(path, json={"model": BASE, **body})
    assert answer.status_code == 400, answer.text
    if path != "/v1/messages":  # Anthropic's error shape has no param
        assert answer.json()["error"]["param"] == param
    assert not engine.requests, "the engine never saw the URL"


async def test_inline_media_and_allowed_hosts_pass() -> None:
    engine = FakeEngine()
    allowed = make_app([], engine, allowed_media_domains=("images.example.com",))
    async with client_for(allowed) as client:
        for url in (PIXEL, "https://images.example.com/cat.png", "https://IMAGES.example.com/cat.png"):
            body = {"model": BASE, **chat({"type": "image_url", "image_url": {"url": url}})}
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200, url
        for url in ("https://images.example.com.evil.net/x.png", "https://evil.net/?images.example.com",
                    "ftp://images.example.com/x.png", INTERNAL):  # fmt: skip
            body = {"model": BASE, **chat({"type": "image_url", "image_url": {"url": url}})}
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 400, url
    assert len(engine.requests) == 3


def test_the_allowed_hosts_reach_vllms_own_check(tmp_path: Path) -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    config = EngineConfig(model=str(tmp_path))
    assert "--allowed-media-domains" not in vllm_cli_args(config, [])
    args = vllm_cli_args(config, [], ("images.example.com", "cdn.example.com"))
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(args)
    assert parsed.allowed_media_domains == ["images.example.com", "cdn.example.com"]
