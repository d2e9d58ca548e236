"""
The interactive API docs at /docs: usable offline, and able to authenticate.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

from ..conftest import Api


class _Assets(HTMLParser):
    """Collects the URLs a page loads: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


def test_docs_page_loads_only_same_origin_assets(api_server: Any) -> None:
    """Every script, stylesheet and icon of /docs is served by the server itself, with its content type."""
    anon = Api(api_server.url, None)
    page = anon.get("/docs")
    assert 200 == page.status_code
    parser = _Assets()
    parser.feed(page.text)
    assert parser.urls
    assert not re.search(r"https?://|//cdn", page.text.split("<body")[0]), page.text
    kinds = {}
    for url in parser.urls:
        parts = urlsplit(url)
        assert ("", "") == (parts.scheme, parts.netloc), url
        assert url.startswith("/"), url
        r = anon.get(url)
        assert 200 == r.status_code, url
        kinds[url.rsplit(".", 1)[-1]] = r.headers["content-type"]
        assert len(r.content) > 100, url
    assert "javascript" in kinds["js"]
    assert kinds["css"].startswith("text/css")
    assert (
        "SwaggerUIBundle"
        in anon.get(
            next(u for u in parser.urls if u.endswith("swagger-ui-bundle.js"))
        ).text
    )


def test_openapi_declares_the_key_header(api_server: Any) -> None:
    """openapi.json declares X-Kelpie-Key as an apiKey scheme and requires it on the API's operations."""
    spec = Api(api_server.url, None).get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    [(name, scheme)] = schemes.items()
    assert ("apiKey", "header", "X-Kelpie-Key") == (
        scheme["type"],
        scheme["in"],
        scheme["name"],
    )
    assert [{name: []}] == spec["security"]
    assert "/health" not in spec["paths"]
