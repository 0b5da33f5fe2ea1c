"""Driving the web console in a real headless Chromium: the system's (Debian's `chromium`), through Playwright.

Playwright downloads no browser here: it launches the installed one by path. Without it the browser tests skip,
saying how to install it (`.ci/run` always does). `watch` records what a page logs and fetches, so tests can assert
that it logged no error and asked nothing of any other address.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import free_port

WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "ui"
NO_CHROMIUM = "no Chromium installed: `apt-get install chromium` (`.ci/run` installs it)"


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless system Chromium; skips the test without one."""
    path = chromium_path()
    if path is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def wide_page(browser: Browser, timeout_ms: int) -> Iterator[Page]:
    """A page at 1280x800 in a browser context of its own (its own session storage), closed afterwards."""
    context = browser.new_context(viewport=WIDE)
    try:
        page = context.new_page()
        page.set_default_timeout(timeout_ms)
        yield page
    finally:
        context.close()


@dataclass
class Watched:
    """What a page did: console errors, uncaught exceptions, and every URL it requested."""

    errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def foreign(self, base_url: str) -> list[str]:
        """Requests to anywhere but `base_url` (data: URLs are the page's own)."""
        return [url for url in self.requests if not url.startswith((base_url, "data:"))]


def watch(page: Page) -> Watched:
    watched = Watched()
    page.on("console", lambda message: watched.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: watched.exceptions.append(str(error)))
    page.on("request", lambda request: watched.requests.append(request.url))
    return watched


class ServedApp:
    """A FastAPI app served by uvicorn on a free loopback port, in a thread, while the `with` block runs."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="console-app", daemon=True)

    def __enter__(self) -> ServedApp:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
