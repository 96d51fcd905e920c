"""Property-based fuzzing of the HTTP API against its own OpenAPI schema (schemathesis).

A real uvicorn server on loopback serves the small digits index; schemathesis generates requests
for every operation in ``/openapi.json`` (valid and invalid ones) and checks that no response is a
5xx and that every response conforms to the schema: documented status code, documented content
type, body matching the response model. The example budget is bounded for CI
(``PROPONENT_FUZZ_EXAMPLES``, default 25 per operation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import svc_run_server

pytestmark = pytest.mark.timeout(300)

MAX_EXAMPLES = int(os.environ.get("PROPONENT_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(svc_index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    state = tmp_path_factory.mktemp("fuzz_state")
    with svc_run_server(
        index=svc_index_dir,
        state_dir=state,
        max_upload_bytes=256 * 1024,
        max_image_pixels=1_000_000,
        request_timeout_s=60,
    ) as s:
        yield s


def _own_spec() -> dict[str, Any]:
    """The server's own OpenAPI document (built from the routes; needs no index loaded)."""
    from proponent.service.app import create_app
    from proponent.service.settings import Settings

    return create_app(Settings(index=None)).openapi()


# (a module-level schema: schemathesis' ``pytest.from_fixture`` does not work with pytest 9 yet)
schema = schemathesis.openapi.from_dict(_own_spec())


def test_spec_is_served(fuzz_server: Any) -> None:
    """The spec fuzzed here is the one the live server publishes."""
    import httpx

    assert httpx.get(fuzz_server.url + "/openapi.json").json() == _own_spec()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="PROPONENT_FUZZ_RANDOM" not in os.environ,  # CI: the same examples every run
)
def test_api_fuzz(case: Any, fuzz_server: Any) -> None:
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=120)
