"""The API docs UIs (``/schema/swagger``, ``/schema/redoc``, ``/schema`` itself), offline.

Litestar's render plugins load Swagger UI and ReDoc from CDNs by default, so on a VM without
internet access (or behind a strict proxy) the pages stay blank. Their scripts and styles
come instead from the ``drf-spectacular-sidecar`` package, which ships the upstream
distribution builds of both (it is a Django app by name, but only its static directory is
used: it is located, never imported, so Django is never loaded), served by a static files
router under ``/schema/assets/``. The other UIs Litestar offers (Elements, RapiDoc) exist
only on CDNs and are not served.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import structlog
from litestar import Router
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.static_files import create_static_files_router

log = structlog.get_logger("control_plane")

ASSETS_PACKAGE = "drf_spectacular_sidecar"
ASSETS_PATH = "/schema/assets"
"""Where the UIs' files are served (``/schema/assets/swagger-ui-dist/…``, ``…/redoc/…``)."""


def assets_dir() -> Path | None:
    """The package's static directory, found without importing the package (its
    ``__init__`` imports Django)."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations))) / "static" / ASSETS_PACKAGE
    return directory if (directory / "swagger-ui-dist" / "swagger-ui-bundle.js").is_file() else None


def render_plugins() -> tuple[list[OpenAPIRenderPlugin], list[Router]]:
    """The OpenAPI render plugins, and the router serving their assets (none when the assets
    package is missing: then the plugins fall back to Litestar's CDN URLs, with a warning)."""
    schema: list[OpenAPIRenderPlugin] = [JsonRenderPlugin(), YamlRenderPlugin()]
    directory = assets_dir()
    if directory is None:
        log.warning("api_docs.assets_missing", package=ASSETS_PACKAGE, fallback="CDN")
        return [RedocRenderPlugin(path=["/redoc", "/"]), SwaggerRenderPlugin(), *schema], []
    swagger = f"{ASSETS_PATH}/swagger-ui-dist"
    favicon = f"<link rel='icon' type='image/png' href='{swagger}/favicon-32x32.png'>"
    plugins: list[OpenAPIRenderPlugin] = [
        RedocRenderPlugin(
            path=["/redoc", "/"],
            js_url=f"{ASSETS_PATH}/redoc/bundles/redoc.standalone.js",
            google_fonts=False,
            favicon=favicon,
        ),
        SwaggerRenderPlugin(
            js_url=f"{swagger}/swagger-ui-bundle.js",
            css_url=f"{swagger}/swagger-ui.css",
            standalone_preset_js_url=f"{swagger}/swagger-ui-standalone-preset.js",
            favicon=favicon,
        ),
        *schema,
    ]
    assets = create_static_files_router(
        path=ASSETS_PATH,
        directories=[directory],
        include_in_schema=False,
        name="api-docs-assets",
    )
    return plugins, [assets]
