"""``/docs``: Swagger UI over ``/openapi.json``, only with ``BILLING_API_DOCS=true``, from files on disk.

FastAPI's own ``/docs`` and ``/redoc`` load their scripts from a CDN into the app's origin, the one
the finance console and the customer pages live on; they are always off. This page takes Swagger UI
from the ``swagger-ui-py`` package (``pip install 'billing-worker[docs]'``), which ships its built
files, and starts it with a script file of ours, so the app's Content-Security-Policy (no inline
script, nothing from another origin) holds here too. Without the package the setting only logs an
error: documentation is not worth refusing to start over. ReDoc has no such package: ``/redoc`` stays off.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from billing import templating

log = logging.getLogger(__name__)

ASSETS = "/docs/assets"
OWN_STATIC = Path(__file__).resolve().parent / "static"
# name → (media type, whose file): the package's two built files and our starter script.
FILES = {"swagger-ui-bundle.js": ("text/javascript", "package"), "swagger-ui.css": ("text/css", "package"),
         "docs.js": ("text/javascript", "own")}


def swagger_ui_dir() -> Path | None:
    """The package's ``static`` folder, found without importing it (its ``__init__`` loads adapters)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def router(title: str, openapi_url: str) -> APIRouter | None:
    """The ``/docs`` routes, or ``None`` (and an error line) when the package is missing."""
    package_dir = swagger_ui_dir()
    if package_dir is None:
        log.error("BILLING_API_DOCS is on but the swagger-ui-py package is not installed: /docs stays off "
                  "(pip install 'billing-worker[docs]')")
        return None
    docs = APIRouter(include_in_schema=False)

    @docs.get("/docs")
    def swagger_page() -> HTMLResponse:
        html = templating.render("docs/swagger.html.j2", {"title": title, "openapi_url": openapi_url,
                                                          "assets": ASSETS})
        return HTMLResponse(html)

    @docs.get(ASSETS + "/{name}")
    def asset(name: str) -> FileResponse:
        if name not in FILES:
            raise StarletteHTTPException(404, "no such file")
        media_type, whose = FILES[name]
        folder = package_dir if whose == "package" else OWN_STATIC
        return FileResponse(folder / name, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    return docs
