"""The web console in a real headless Chromium, against the router on a fake engine served on a loopback port.

What a person does with the page: it loads with no console error and asks nothing of any other address; a tenant
sees only its adapters; an admin's malformed registration shows the API's message inline; errors read as messages;
the playground streams columns side by side; everything works from the keyboard and fits a phone's width.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.config import RouterConfig
from serve.wire import Endpoint, ReplicaItem, ReplicaReport, Usage
from tests.console_browser import PHONE, ServedApp, chromium, watch, wide_page
from tests.unit.fake_engine import FakeEngine, FakeRegistry, echo_script, engine_client, record
from tests.unit.tenancy import ADAPTERS, BASE, api_key, make_app

pytestmark = pytest.mark.browser
USER, USER_CONF = api_key("user", adapters=["a1"], base=True)
LIMITED, LIMITED_CONF = api_key("limited", adapters=["*"], base=True, tpm=50)
"""One playground request (about 6 prompt + 32 completion tokens, all used: see `costly_script`) fits its minute."""
ADMIN, ADMIN_CONF = api_key("ops", admin=True)
KEYS = [USER_CONF, LIMITED_CONF, ADMIN_CONF]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def open_server() -> Iterator[ServedApp]:
    registry = FakeRegistry({name: record(name) for name in ADAPTERS})
    with ServedApp(create_app(engine_client(FakeEngine()), ModelCatalog(BASE, registry), RouterConfig())) as served:
        yield served


@pytest.fixture
def keyed_server() -> Iterator[ServedApp]:
    with ServedApp(make_app(KEYS, FakeEngine())) as served:
        yield served


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with wide_page(browser, 15_000) as page:
        yield page


def rows(page: Page) -> list[str]:
    return page.locator("#adapters-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.name)")


def sign_in(page: Page, served: ServedApp, key: str) -> None:
    page.goto(f"{served.url}/ui/")
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")


def test_the_page_loads_every_view_with_no_console_error(page: Page, open_server: ServedApp) -> None:
    watched = watch(page)
    page.goto(f"{open_server.url}/ui")
    expect(page.locator("#adapters-table tbody tr[data-name=a1]")).to_be_visible()
    assert rows(page) == ["\u0000base", *ADAPTERS]
    expect(page.locator("#who")).to_have_text("open server (no key)")
    for view in ("playground", "server", "adapters"):
        page.get_by_role("tab", name=view.capitalize()).click()
        expect(page.locator(f"#view-{view}")).to_be_visible()
    expect(page.locator("#server-body")).not_to_be_empty()
    assert watched.errors == [] and watched.exceptions == []
    assert watched.foreign(open_server.url) == []


def test_a_registration_through_the_api_shows_in_the_table(page: Page, open_server: ServedApp) -> None:
    page.goto(f"{open_server.url}/ui/")
    expect(page.locator("#adapters-table tbody tr[data-name=a1]")).to_be_visible()
    response = httpx.post(f"{open_server.url}/v1/adapters", json={"name": "fresh", "source": "/adapters/fresh"})
    assert response.status_code == 201
    expect(page.locator("#adapters-table tbody tr[data-name=fresh]")).to_contain_text("/adapters/fresh")


def test_a_tenant_key_sees_only_its_adapters(page: Page, keyed_server: ServedApp) -> None:
    watched = watch(page)
    sign_in(page, keyed_server, USER)
    expect(page.locator("#who")).to_have_text("key user")
    expect(page.locator("#adapters-table tbody tr[data-name=a1]")).to_be_visible()
    assert rows(page) == ["\u0000base", "a1"]
    expect(page.locator("#adapters-table thead")).not_to_contain_text("Source")
    expect(page.locator("#admin-panel")).to_be_hidden()
    page.get_by_role("tab", name="Playground").click()
    expect(page.locator("#play-models input")).to_have_count(2)  # the base model and a1
    assert watched.errors == [] and watched.exceptions == []


def test_an_admin_sees_a_malformed_registration_refused_inline(page: Page, keyed_server: ServedApp) -> None:
    sign_in(page, keyed_server, ADMIN)
    form = page.locator("#admin-panel")
    expect(form).to_be_visible()
    form.get_by_label("Name").fill("broken")
    form.get_by_label("Source").fill("/adapters/bad-upload")
    form.get_by_role("button", name="Register").click()
    expect(page.locator("#register-error")).to_have_text("/adapters/bad-upload is not a LoRA adapter (field: source)")
    expect(form.get_by_label("Source")).to_have_attribute("aria-invalid", "true")
    form.get_by_label("Name").fill("")
    form.get_by_role("button", name="Register").click()
    expect(page.locator("#register-error")).to_contain_text("(field: name)")
    assert rows(page) == list(ADAPTERS)  # nothing was registered; an admin without base scope sees no base row


def test_an_admin_registers_a_new_version_and_removes_an_adapter(page: Page, keyed_server: ServedApp) -> None:
    sign_in(page, keyed_server, ADMIN)
    row = page.locator("#adapters-table tbody tr[data-name=a2]")
    row.get_by_role("button", name="New version of a2").click()
    expect(page.get_by_label("Source")).to_be_focused()
    page.get_by_label("Source").fill("/adapters/a2-next")
    page.get_by_label("Source").press("Enter")
    expect(page.locator("#register-done")).to_have_text("Registered a2 v2.")
    expect(row).to_contain_text("v2")
    row.get_by_role("button", name="Remove a2").click()
    row.get_by_role("button", name="Yes, remove a2").click()
    expect(page.locator("#action-done")).to_have_text("Removed a2.")
    expect(row).to_have_count(0)


def test_a_wrong_key_is_a_clear_message_and_the_key_is_asked_again(page: Page, keyed_server: ServedApp) -> None:
    sign_in(page, keyed_server, "lpx-wrong")
    expect(page.locator("#key-error")).to_have_text(
        "Not signed in (401): Incorrect API key provided. Enter a valid API key."
    )
    expect(page.get_by_label("API key")).to_be_focused()
    sign_in(page, keyed_server, USER)
    expect(page.locator("#who")).to_have_text("key user")
    page.reload()  # the key is kept for the tab's session: not asked again
    expect(page.locator("#adapters-table tbody tr[data-name=a1]")).to_be_visible()


def test_an_unreachable_registry_is_a_503_message_not_a_broken_page(page: Page, browser: Browser) -> None:
    class Unreachable(FakeRegistry):
        async def replica_reports(self) -> list[ReplicaReport]:
            raise TimeoutError

    registry = Unreachable({name: record(name) for name in ADAPTERS})
    app = create_app(engine_client(FakeEngine()), ModelCatalog(BASE, registry), RouterConfig())
    with ServedApp(app) as served:
        page.goto(f"{served.url}/ui/")
        expect(page.locator("#banner")).to_contain_text("The server is busy or not ready (503)")
        expect(page.get_by_role("tab", name="Adapters")).to_be_visible()


def costly_script(endpoint: Endpoint, body: dict[str, Any]) -> list[ReplicaItem | Exception]:
    """The fake engine's answer, reporting every token it was admitted for as used: nothing is refunded."""
    spent = Usage(prompt_tokens=6, completion_tokens=body.get("max_tokens") or 32)
    return [spent if isinstance(item, Usage) else item for item in echo_script(endpoint, body)]


def test_a_rate_limited_column_says_so(page: Page) -> None:
    """The console reads with its key too (the key's rpm counts reads): a tokens-per-minute limit leaves them free."""
    with ServedApp(make_app(KEYS, FakeEngine(script=costly_script))) as served:
        sign_in(page, served, LIMITED)
        page.get_by_role("tab", name="Playground").click()
        expect(page.locator("#play-models input:checked")).to_have_count(3)
        page.get_by_role("button", name="Run").click()
        expect(page.locator(".column[data-state=done]")).to_have_count(1)
        expect(page.locator(".column[data-state=error]")).to_have_count(2)
        expect(page.locator(".column[data-state=error]").first).to_contain_text("Rate limited (429)")


@pytest.mark.parametrize(
    ("status", "shown"),
    [
        (401, "Not signed in (401): No. Enter a valid API key."),
        (403, "Not allowed for this key (403): No."),
        (429, "Rate limited (429): No. Retry in 3 s."),
        (503, "The server is busy or not ready (503): No. Retry in 3 s."),
        (0, "No."),
        (400, "Error 400: No. (field: name)"),
    ],
)
def test_error_statuses_read_as_messages(page: Page, open_server: ServedApp, status: int, shown: str) -> None:
    page.goto(f"{open_server.url}/ui/")
    expect(page.get_by_role("tab", name="Adapters")).to_be_visible()
    describe = f"import('./core.js').then(m => m.describe(new m.ApiError({status}, 'No.', 'name', '3')))"
    assert page.evaluate(describe) == shown


def test_the_playground_streams_columns_side_by_side(page: Page, open_server: ServedApp) -> None:
    page.goto(f"{open_server.url}/ui/#playground")
    expect(page.locator("#play-models input:checked")).to_have_count(3)
    page.get_by_role("button", name="Run").click()
    columns = page.locator(".column")
    expect(columns).to_have_count(3)
    expect(page.locator(".column[data-state=done]")).to_have_count(3)
    assert columns.evaluate_all("cs => cs.map(c => c.dataset.model)") == [BASE, f"{BASE}:a1", f"{BASE}:a2"]
    assert columns.locator(".output").all_text_contents() == ["ab", "ab", "ab"]  # the fake engine's two tokens
    expect(columns.first.locator(".metrics")).to_have_text(re.compile(r"TTFT \d+ ms · [\d.]+ tok/s · 2 tokens"))


def chat_script(endpoint: Endpoint, body: dict[str, Any]) -> list[ReplicaItem | Exception]:
    """Streams a chat answer as vLLM does: the words in `delta.content`, then a usage chunk."""
    words = [f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': w}}]})}\n\n" for w in ("Bon", "jour")]
    usage = f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': 2}})}\n\n"
    return [*words, usage, "data: [DONE]\n\n", Usage(prompt_tokens=5, completion_tokens=2)]


def test_the_playground_streams_chat_answers(page: Page) -> None:
    engine = FakeEngine(script=chat_script)
    registry = FakeRegistry({name: record(name) for name in ADAPTERS})
    with ServedApp(create_app(engine_client(engine), ModelCatalog(BASE, registry), RouterConfig())) as served:
        page.goto(f"{served.url}/ui/#playground")
        page.get_by_label("Chat").check()
        page.get_by_label("Greedy").uncheck()
        page.get_by_label("Temperature").fill("0.5")
        page.get_by_label("Seed").fill("7")
        page.get_by_role("button", name="Run").click()
        expect(page.locator(".column[data-state=done]")).to_have_count(3)
    assert page.locator(".column .output").all_text_contents() == ["Bonjour"] * 3
    endpoint, body = engine.requests[0]
    assert endpoint == "chat" and body["messages"] == [{"role": "user", "content": "The capital of France is"}]
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"]) == (0.5, 1, 7, 32)


def test_everything_works_from_the_keyboard(page: Page, keyed_server: ServedApp) -> None:
    page.goto(f"{keyed_server.url}/ui/")
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(USER)
    page.keyboard.press("Enter")
    tab = page.get_by_role("tab", name="Adapters")
    expect(tab).to_have_attribute("aria-selected", "true")
    tab.focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Playground")).to_be_focused()
    expect(page.locator("#view-playground")).to_be_visible()
    page.keyboard.press("End")
    expect(page.locator("#view-server")).to_be_visible()
    page.keyboard.press("Home")
    expect(page.locator("#view-adapters")).to_be_visible()
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, select, button')]
             .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
             .map(e => e.outerHTML)"""
    )
    assert unlabelled == []


@pytest.mark.parametrize("view", ["adapters", "playground", "server"])
def test_each_view_fits_a_phone(browser: Browser, open_server: ServedApp, view: str) -> None:
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    page.goto(f"{open_server.url}/ui/#{view}")
    expect(page.locator(f"#view-{view}")).to_be_visible()
    expect(page.get_by_role("tab", name=view.capitalize())).to_have_attribute("aria-selected", "true")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    context.close()
