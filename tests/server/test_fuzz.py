"""The HTTP API fuzzed from its own OpenAPI schema with schemathesis: no generated request gets a
5xx, and every answer fits what the schema documents. Bounded: a few dozen examples per operation,
a context of 64 tokens so that no generation runs long."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.server.conftest import LiveServer


@pytest.fixture(scope="module")
def fuzzed(make_server) -> LiveServer:
    return make_server(max_model_len=64, max_queue=256)


@pytest.fixture(scope="module")
def api_schema(fuzzed: LiveServer):
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_answers_fit_the_schema(case, fuzzed: LiveServer) -> None:
    case.call_and_validate(base_url=fuzzed.url, checks=[not_a_server_error, response_schema_conformance], timeout=30)
