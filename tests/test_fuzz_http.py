"""schemathesis against the live control plane's own OpenAPI schema.

A real ``quiver serve`` runtime on an ephemeral port (tests/harness.py); schemathesis reads
``/schema/openapi.json`` from it and, for every operation, sends generated requests —
valid ones and deliberately invalid ones (wrong types, missing fields, unexpected
parameters) — with the admin token. Every response must be what the schema says: no 5xx,
a documented status, the documented body (``ErrorBody`` for every error), the documented
content type; an operation must refuse a request without a token; a method the path does
not serve answers 405 with ``Allow``.

Bounded for a small machine: ``QUIVER_FUZZ_EXAMPLES`` examples per operation and mode
(default 75: about 2,000 requests, about a minute on 2 cores); raise it for a longer run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis import BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.generation.case import Case
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.harness import Server, start_server
from tests.state import snapshot

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

EXAMPLES = int(os.environ.get("QUIVER_FUZZ_EXAMPLES", "75"))

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    unsupported_method,
]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("fuzz"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed: Server) -> BaseSchema:
    schema = schemathesis.openapi.from_url(f"{fuzzed.http_url}/schema/openapi.json")
    # The admin token is sent explicitly (below); schemathesis must not generate or negate
    # the Authorization header itself. ``ignored_auth`` still probes each operation without
    # a token and with a wrong one.
    schema.config.generation.with_security_parameters = False
    return schema


def _is_form(operation: APIOperation) -> bool:
    return any(body.media_type.startswith("multipart/") for body in operation.body)


def _fuzz(operation: APIOperation, mode: GenerationMode, server: Server) -> None:
    """One bounded hypothesis run of ``operation``; raises the first non-conformance.

    A ``multipart/form-data`` body (the artefact upload) is not checked for
    ``negative_data_rejection``: a form cannot carry the type violations schemathesis makes
    (an empty array "instead of" an integer field is encoded as no field at all, which is a
    valid request). Its refusals have their own tests (tests/test_artefacts_http.py); every
    other check still applies to it."""
    headers = {"Authorization": f"Bearer {server.admin_token}"}  # spelt as the schema does
    checks = [c for c in CHECKS if c is not negative_data_rejection] if _is_form(operation) else CHECKS

    @hypothesis.given(operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def run(case: Case) -> None:
        case.call_and_validate(base_url=server.http_url, headers=headers, checks=checks, timeout=30)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_control_plane_conforms_to_its_schema(
    api_schema: BaseSchema, fuzzed: Server, mode: GenerationMode
) -> None:
    operations: list[APIOperation] = []
    for result in api_schema.get_all_operations():
        if isinstance(result, Err):
            pytest.fail(f"an operation of the schema schemathesis cannot read: {result.err()}")
        operations.append(result.ok())
    assert len(operations) >= 15
    failures = []
    for operation in operations:
        try:
            _fuzz(operation, mode, fuzzed)
        except hypothesis.errors.Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing to negate: no parameters, no body
        except Exception as e:  # every operation runs; all failures are reported together
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)


def test_the_fuzzed_server_still_serves(fuzzed: Server) -> None:
    """After the run the server answers, and the demo swarm and admin token still work; and
    the run really exercised it (a fuzzer that sends nothing passes every check)."""
    http = fuzzed.http()
    served = fuzzed.catalog.metrics.render().decode()
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in served.splitlines()
        if line.startswith('quiver_requests_total{listener="http"')
    )
    assert total > 20 * EXAMPLES
    assert http.get("/healthz").status_code == 200
    assert http.get("/v1/swarms/demo").status_code == 200
    assert snapshot(fuzzed)["swarms"]
