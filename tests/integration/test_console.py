"""The web console on the real stack, in a headless Chromium: the adapters it serves, a registration through the API
showing up, and the playground's greedy columns (base + two adapters) equal to what the API answers.

Writes a screenshot of each view, at 1280x800 and at a phone's width, to docs/ui/ (docs/console.md shows them).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.console_browser import NO_CHROMIUM, PHONE, SCREENSHOTS, chromium, chromium_path, watch, wide_page
from tests.integration.conftest import EXTERNAL_ADAPTERS, Stack

if chromium_path() is None:
    pytest.skip(NO_CHROMIUM, allow_module_level=True)

pytestmark = pytest.mark.browser
PROMPT = "The capital of France is"
MAX_TOKENS = 16
COMPARED = ("alpha", "ext-qv")
STREAM_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with wide_page(browser, 30_000) as page:
        yield page


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png")


def greedy(stack: Stack, models: list[str]) -> list[str]:
    """The API's greedy answers for `models`, asked at once as the page asks (so the engine batches them alike)."""

    def ask(model: str) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        response = httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])

    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(ask, models))


def test_the_playground_streams_three_greedy_columns_equal_to_the_api(page: Page, stack: Stack) -> None:
    watched = watch(page)
    page.goto(f"{stack.base_url}/ui/#playground")
    models = [stack.model_id, *(f"{stack.model_id}:{name}" for name in COMPARED)]
    boxes = page.locator("#play-models input")
    expect(boxes.first).to_be_visible()
    for box in boxes.all():
        box.set_checked(box.get_attribute("value") in models)
    expect(page.get_by_role("switch", name="Greedy")).to_be_checked()
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    page.get_by_label("Prompt").fill(PROMPT)
    page.get_by_role("button", name="Run").click()
    columns = page.locator(".column")
    expect(columns).to_have_count(3)
    expect(page.locator(".column[data-state=running]")).to_have_count(0, timeout=STREAM_TIMEOUT_MS)
    assert columns.evaluate_all("cs => cs.map(c => c.dataset.state)") == ["done"] * 3, columns.all_text_contents()
    assert columns.evaluate_all("cs => cs.map(c => c.dataset.model)") == models
    shown = columns.locator(".output").all_text_contents()
    assert all(text for text in shown)
    assert shown == greedy(stack, models)
    for column in columns.all():
        expect(column.locator(".metrics")).to_contain_text("tok/s")
    screenshot(page, "playground")
    assert watched.errors == [] and watched.exceptions == []
    assert watched.foreign(stack.base_url) == []


def test_the_adapters_view_lists_the_served_adapters_and_follows_registrations(page: Page, stack: Stack) -> None:
    watched = watch(page)
    page.goto(f"{stack.base_url}/ui/")
    table = page.locator("#adapters-table tbody")
    for name in ("alpha", *(spec.name for spec in EXTERNAL_ADAPTERS)):
        expect(table.locator(f"tr[data-name='{name}']")).to_be_visible()
    expect(page.locator("#adapters-table thead")).to_contain_text("Source")  # an open server: everyone is admin
    source = stack.uploads / "console-check"
    shutil.copytree(stack.adapters["ext-qv"], source, dirs_exist_ok=True)
    registered = httpx.post(f"{stack.base_url}/v1/adapters", json={"name": "console-check", "source": str(source)},
                            timeout=120)  # fmt: skip
    assert registered.status_code == 201, registered.text
    try:
        expect(table.locator("tr[data-name='console-check']")).to_contain_text("v1")
        expect(table.locator("tr[data-name='alpha']")).not_to_contain_text("not installed")  # the playground used it
        screenshot(page, "adapters")
    finally:
        assert httpx.delete(f"{stack.base_url}/v1/adapters/console-check", timeout=60).status_code == 200
    expect(table.locator("tr[data-name='console-check']")).to_have_count(0)
    assert watched.errors == [] and watched.exceptions == []


def test_the_server_view_shows_the_engine_and_its_replicas(page: Page, stack: Stack) -> None:
    watched = watch(page)
    page.goto(f"{stack.base_url}/ui/#server")
    body = page.locator("#server-body")
    expect(body).to_contain_text(stack.model_id)
    expect(body.locator("#server-replicas")).to_be_visible()
    expect(body).to_contain_text("max lora rank")
    assert str(stack.model_dir) not in body.inner_text()  # the model's folder is a host path: not shown
    screenshot(page, "server")
    assert watched.errors == [] and watched.exceptions == []


def test_the_adapters_view_at_a_phone_width(browser: Browser, stack: Stack) -> None:
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    page.goto(f"{stack.base_url}/ui/")
    expect(page.locator("#adapters-table tbody tr[data-name='alpha']")).to_be_visible()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "phone")
    context.close()
