"""Property-based fuzzing of every route in the server's own OpenAPI schema, over real
HTTP on loopback: no generated request, valid or not, may get a 5xx, and every response
must match the schema the server publishes for that route, its media type included."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from ragcache.api.app import create_app
from tests.api.live_server import running_server, tiny_service

# Enough examples to reach the range and type edges of every field while both runs stay
# within the default suite's time (about 30 routes, each fuzzed with valid and invalid
# input). No shrinking: the report names the route and the failing request as found.
EXAMPLES_PER_ROUTE = 20
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    database=None,
)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data: Path = tmp_path_factory.mktemp("schema-fuzz") / "data"
    with tiny_service(data) as service, running_server(create_app(service)) as url:
        yield url


def fuzz_operation(operation: schemathesis.APIOperation, mode: GenerationMode) -> Counter[int]:
    """Fuzzes one route; returns how often each status code was answered."""
    statuses: Counter[int] = Counter()

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        statuses[response.status_code] += 1

    call()
    return statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_route_answers_5xx_or_breaks_its_schema(base_url: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]
    failures, answered = [], {}
    for operation in operations:
        try:
            answered[operation.label] = fuzz_operation(operation, mode)
        except Unsatisfiable:
            # Only a route without parameters or body has no invalid request to send.
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as error:  # every route is fuzzed, then all failures are named
            failures.append(f"{operation.label}: {error}")
    assert not failures, "\n\n".join(failures)
    assert len(answered) >= 10, f"only {len(answered)} routes could be fuzzed ({mode.value})"
    accepted = [label for label, statuses in answered.items() if any(s < 300 for s in statuses)]
    if mode is GenerationMode.POSITIVE:
        # Valid input must reach the handlers, not only their validation.
        assert len(accepted) >= 10, answered
