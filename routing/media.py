"""Remote media in prompts: refused unless the operator allows the URL's host (`router.allowed_media_domains`).

On a vision (or audio, video) base model, vLLM fetches a chat part's `image_url`, a Responses `input_image`, or
an Anthropic image's `source.url` from the engine replica's network: a tenant could make the engine request
internal addresses. Inline `data:` URLs are always accepted; `http(s)` URLs only when their host is one the
operator lists (the same list is given to vLLM as `--allowed-media-domains`); any other scheme never.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from routing.errors import InvalidRequest

MEDIA_KEYS = ("image_url", "audio_url", "video_url", "file_url")
"""Keys of a content part holding a media URL, as a string or as `{"url": ...}` (OpenAI chat, vLLM's own parts,
Responses' `input_image` and `input_file`)."""
PROMPT_FIELDS = ("messages", "input", "system")
"""Body fields whose content parts vLLM renders, media included."""


def check_media_urls(body: dict[str, Any], allowed_domains: tuple[str, ...]) -> None:
    """Raises `InvalidRequest` naming the first media URL the engine would fetch from a host not allowed."""
    allowed = {domain.lower() for domain in allowed_domains}
    for name in PROMPT_FIELDS:
        for url, path in _media_urls(body.get(name), (name,)):
            if not _allowed(url, allowed):
                where = ", ".join(sorted(allowed)) if allowed else "none: send media inline as data: URLs"
                raise InvalidRequest(
                    f"This server does not fetch media from {_host_of(url)}; remote media hosts allowed: {where}.",
                    param=".".join(str(part) for part in path),
                )


def _media_urls(value: Any, path: tuple[str | int, ...]) -> list[tuple[str, tuple[str | int, ...]]]:
    """Every media URL in a prompt field, with its path (content parts nest in tool results: walked iteratively)."""
    found: list[tuple[str, tuple[str | int, ...]]] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, list):
            stack.extend((child, (*where, i)) for i, child in enumerate(item))
            continue
        if not isinstance(item, dict):
            continue
        for key in MEDIA_KEYS:
            media = item.get(key)
            if isinstance(media, str):
                found.append((media, (*where, key)))
            elif isinstance(media, dict) and isinstance(media.get("url"), str):
                found.append((media["url"], (*where, key, "url")))
        source = item.get("source")
        if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
            found.append((source["url"], (*where, "source", "url")))  # Anthropic's image and document blocks
        stack.extend((child, (*where, key)) for key, child in item.items() if isinstance(child, dict | list))
    return found


def _allowed(url: str, allowed: set[str]) -> bool:
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:  # a malformed authority (an unclosed IPv6 bracket, a bad port)
        return False
    scheme = parts.scheme.lower()
    if scheme == "data":
        return True
    return scheme in ("http", "https") and host is not None and host.lower() in allowed


def _host_of(url: str) -> str:
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        host = None
    return f"`{host}`" if host else "this URL"
