"""The web playground: three static files, mounted at ``/ui`` on the BentoML services.

The page is plain HTML, CSS and JavaScript shipped inside the ``serving`` package, so a Bento, a wheel
or a checkout serves it with no Node server and no build step. It calls the service's own APIs with
relative URLs, so it works behind any host or path prefix a proxy puts in front of it.

Explicit routes rather than ``StaticFiles``: only the three files exist (no directory listing, no
path handling to get wrong), and every answer carries the same strict headers — a Content-Security-
Policy that allows only this origin (the page loads nothing from a CDN, and the API key a visitor
types can only ever be sent back here), ``nosniff``, and an ETag so browsers revalidate cheaply
instead of caching a page that a redeploy has changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

PLAYGROUND_DIR = Path(__file__).with_name("playground")

# name → media type; these are all the files the mount answers for.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# Everything from this origin only; blob:/data: images for the uploaded photo's thumbnail.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(directory: Path = PLAYGROUND_DIR) -> dict[str, Asset]:
    """Read the page's files once; a missing one fails at import, not on a visitor's first request."""
    assets = {}
    for name, media_type in ASSETS.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"playground file {path} is missing: the serving package was installed "
                                    "without its package data (see pyproject.toml and bentofile.yaml)")
        body = path.read_bytes()
        assets[name] = Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return assets


def build_app(directory: Path = PLAYGROUND_DIR) -> Starlette:
    """The Starlette app BentoML mounts: ``/`` is the page, ``/app.js`` and ``/style.css`` its assets."""
    assets = load_assets(directory)

    def answer(request: Request, name: str) -> Response:
        asset = assets.get(name)
        if asset is None:
            return PlainTextResponse(f"no file {name!r} in the playground", 404)
        headers = {
            "ETag": asset.etag,
            "Cache-Control": "no-cache",  # revalidate every time: a redeploy must show the new page
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Referrer-Policy": "no-referrer",
        }
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    async def index(request: Request) -> Response:
        return answer(request, "index.html")

    async def asset(request: Request) -> Response:
        return answer(request, request.path_params["name"])

    return Starlette(routes=[Route("/", index, methods=["GET"]), Route("/{name:str}", asset, methods=["GET"])])


playground_app = build_app()

__all__ = ["ASSETS", "PLAYGROUND_DIR", "build_app", "playground_app"]
