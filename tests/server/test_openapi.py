"""
/openapi.json says what the server does: its error body, its error answers,
the rules its handlers check; 405 and OPTIONS name the route's methods.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from ..conftest import Api
from .helpers import legacy_job

_METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def document(api_server: Any) -> dict[str, Any]:
    """The served document."""
    return dict(Api(api_server.url, None).get("/openapi.json").json())


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in _METHODS
    ]


def _error_schema(document: dict[str, Any], method: str, path: str, status: str) -> Any:
    response = document["paths"][path][method]["responses"][status]
    schema = response["content"]["application/json"]["schema"]
    return {**schema, "components": document["components"]}


def test_a_real_error_body_matches_the_documented_one(
    document: dict[str, Any], api: Api
) -> None:
    """The 400 the server sends validates against the document's 400 schema."""
    answer = api.post("/jobs", json={"command": " ", "container_group_id": "g"})

    assert 400 == answer.status_code
    jsonschema.validate(answer.json(), _error_schema(document, "post", "/jobs", "400"))
    assert {"error", "message"} <= set(
        document["components"]["schemas"]["Error"]["properties"]
    )


def test_every_operation_lists_its_error_answers(document: dict[str, Any]) -> None:
    """400, 401, 403 and 503 everywhere; 404 where a path names a resource."""
    missing = []
    for method, path, operation in _operations(document):
        wanted = {"400", "401", "403", "503"}
        if "{" in path:
            wanted.add("404")
        if "requestBody" in operation:
            wanted.add("413")
        lacking = wanted - set(operation["responses"])
        if lacking:
            missing.append(f"{method.upper()} {path}: {sorted(lacking)}")
    assert [] == missing
    cancel = document["paths"]["/jobs/{job_id}"]["delete"]["responses"]
    assert "409" in cancel
    unavailable = document["paths"]["/jobs"]["get"]["responses"]["503"]
    assert "Retry-After" in unavailable["headers"]


def test_the_rules_the_handlers_check_are_in_the_schemas(
    document: dict[str, Any],
) -> None:
    """A blank command, an empty batch and a /work without its queue are schema errors."""
    schemas = document["components"]["schemas"]
    job = {"components": document["components"], **schemas["JobSubmission"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**legacy_job("g"), "command": "  "}, job)
    jsonschema.validate(legacy_job("g"), job)
    batch = document["paths"]["/jobs/batch"]["post"]["requestBody"]
    assert (1, 1000) == (
        batch["content"]["application/json"]["schema"]["minItems"],
        batch["content"]["application/json"]["schema"]["maxItems"],
    )
    work = {p["name"]: p for p in document["paths"]["/work"]["get"]["parameters"]}
    assert work["machine_id"]["required"]
    assert work["container_group_id"]["required"]


def test_a_405_names_the_routes_methods(api: Api) -> None:
    """PUT /jobs is a 405 whose Allow header lists GET, POST and DELETE."""
    answer = api.request("PUT", "/jobs")

    assert 405 == answer.status_code
    assert {"DELETE", "GET", "OPTIONS", "POST"} == {
        m.strip() for m in answer.headers["Allow"].split(",")
    }


def test_options_lists_every_method_of_the_route(api: Api) -> None:
    """OPTIONS /jobs/{id} names GET and DELETE, not only the first handler's."""
    answer = api.request("OPTIONS", "/jobs/some-id")

    assert 204 == answer.status_code
    assert {"DELETE", "GET", "OPTIONS"} == {
        m.strip() for m in answer.headers["Allow"].split(",")
    }


def test_a_webhook_with_a_broken_host_is_a_400(api: Api) -> None:
    """A webhook like http://[ is refused with a 400 (it raised in urlsplit: a 500)."""
    answer = api.post("/jobs", json=legacy_job("g", webhook="http://[oops/"))

    assert 400 == answer.status_code
    assert "webhook" in answer.json()["message"]


def test_the_docs_page_shows_the_same_document(api_server: Any) -> None:
    """/docs renders the completed document (its Error schema), not Litestar's own."""
    page = Api(api_server.url, None).get("/docs").text

    assert '"Error"' in page
    assert '"status_code"' not in page
