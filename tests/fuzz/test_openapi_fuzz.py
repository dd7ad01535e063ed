"""The gateway fuzzed from its own OpenAPI document (schemathesis) over real HTTP through gunicorn.

Every operation in the served document gets requests generated from the schema, valid ones and
ones that break it: the answer must never be a 5xx, must come within the timeout (no hang), and
must match the document (a listed status code, the documented content type, headers and JSON body).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from loadtest.gateway_process import PROJECT_ROOT

pytestmark = pytest.mark.slow

TIMEOUT_S = 15  # an answer slower than this counts as a hang
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Operations listed from the packaged document (the file the gateway serves) at collection time, so
# each gets its own test id; the cases themselves come from the document fetched from the server.
# Only operations that take input can be sent schema-breaking data.
CASES = [
    (op.method.upper(), op.path, mode)
    for op in (r.ok() for r in schemathesis.openapi.from_path(PROJECT_ROOT / "serving" / "openapi.yaml")
               .get_all_operations())
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or len(op.body) or len(op.query)
]
EXAMPLES = {"/v1/predict": 60}  # the upload endpoint is the one with real input to get wrong
OTHER_EXAMPLES = 10


@pytest.fixture(scope="session")
def served_openapi(gateway_server: str) -> schemathesis.schemas.BaseSchema:
    # The document as the gateway serves it: what clients see is what gets fuzzed.
    return schemathesis.openapi.from_url(f"{gateway_server}/v1/openapi.json")


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_operation_answers_as_documented_and_never_5xx(
    served_openapi: schemathesis.schemas.BaseSchema, gateway_server: str, method: str, path: str,
    mode: GenerationMode,
) -> None:
    operation = served_openapi[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES.get(path, OTHER_EXAMPLES), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=gateway_server, checks=CHECKS, timeout=TIMEOUT_S)

    fuzz()
