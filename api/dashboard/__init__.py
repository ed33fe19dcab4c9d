"""The dashboard: one HTML page at `/`, plain JavaScript and CSS, no framework, no CDN.

`static/` holds everything the browser loads (`index.html`, `app.js`, `app.css`); charts
are inline SVG drawn by `app.js`, which reads the same JSON API as any client, sending the
API key a user typed in (kept in sessionStorage) as `Authorization: Bearer`. The page and
its files are public: they hold no data, and every `/v1` call they make is authenticated.
The explorer's endpoints live in `api.dashboard.explorer`.

The page is served with a Content-Security-Policy that allows only this origin's scripts
and styles (no inline script), so data shown on it cannot run as code.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class DashboardFiles(StaticFiles):
    """The page's files, each with PAGE_HEADERS: `/dashboard/index.html` is the page too,
    and must be as unframeable and script-locked as `/`."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def install_dashboard(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/dashboard/` (neither in the API schema)."""

    @app.get("/", include_in_schema=False)
    def dashboard_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/dashboard", DashboardFiles(directory=STATIC), name="dashboard")
