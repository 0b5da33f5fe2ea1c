"""The web console's page: `GET /ui/` and its script and style, plain files shipped in this package (`static/`).

The page needs no build step and fetches nothing from elsewhere: its Content-Security-Policy lets it load code and
styles only from this server and connect only to it, so a browser refuses any other address. It needs no key to load
(it holds no data); everything it shows comes from the key-checked API.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from routing.errors import RouteNotFound

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "core.js": "text/javascript; charset=utf-8",
    "adapters.js": "text/javascript; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "server.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
"""The page's files, by name, with their content types: nothing else under `/ui/` is served."""
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # small files: revalidated, so an upgraded server shows its own page at once
}


OPEN_MARK = (b'<meta name="loraplex-auth" content="keys">', b'<meta name="loraplex-auth" content="open">')
"""How the page learns that the server takes no keys (so it asks for none) without a request that would fail."""


def read_assets() -> dict[str, bytes]:
    """The page's files from the installed package."""
    static = resources.files("routing.console") / "static"
    return {name: (static / name).read_bytes() for name in ASSETS}


def page_router(is_open: bool) -> APIRouter:
    """The console's routes, with the files read once, when the app is built; `is_open`: the server has no keys."""
    files = read_assets()
    if is_open:
        files["index.html"] = files["index.html"].replace(*OPEN_MARK)
    router = APIRouter(include_in_schema=False)

    def asset(name: str) -> Response:
        if name not in files:
            raise RouteNotFound(f"no route GET /ui/{name}")
        return Response(files[name], media_type=ASSETS[name], headers=HEADERS)

    @router.get("/ui")
    async def ui() -> RedirectResponse:
        return RedirectResponse("ui/", status_code=307)  # relative: the page's own links stay relative to /ui/

    @router.get("/ui/")
    async def index() -> Response:
        return asset("index.html")

    @router.get("/ui/{name}")
    async def static_file(name: str) -> Response:
        return asset(name)

    return router
