"""Schemathesis against swapper's own OpenAPI schema: whatever it sends, no server error.

The app runs in-process over ASGI (with its lifespan) in front of fake backends whose HTTP edge
respx answers, so every 5xx would be swapper's own.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest
import respx
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from swapper.app import create_app
from swapper.config import parse_config
from swapper.plugins import load_backends
from tests.fakes import FakePlugin, FakeWorld

REPLY = {"id": "x", "object": "chat.completion", "created": 1, "model": "a",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                      "finish_reason": "stop"}]}

_registry = load_backends(FakePlugin(FakeWorld()))
_config = parse_config(
    {"swapper": {"stop_timeout": 1, "model_swap_timeout": 5},
     "models": {"a": {"backend": "fake", "aliases": ["alpha"]}, "b": {"backend": "fake"}}},
    "schema-fuzz.yaml", _registry.schemas())
schema = schemathesis.openapi.from_asgi("/schema/openapi.json", create_app(_config, _registry))
statuses: collections.Counter[tuple[str, int]] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def backends() -> Iterator[None]:
    with respx.mock(assert_all_called=False) as router:
        for host in ("a", "b"):
            router.post(url__startswith=f"http://{host}.fake.test/").respond(json=REPLY)
        yield
    print("\nschemathesis statuses:", dict(sorted(statuses.items())))


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_input_makes_swapper_fail(case: schemathesis.Case) -> None:
    response = case.call_and_validate(checks=[not_a_server_error])
    statuses[(case.operation.label, response.status_code)] += 1


def test_the_fuzzing_reached_every_outcome() -> None:
    """Guard against a run that only ever saw 404s: real forwards and refusals both happened."""
    seen = {status for (_, status) in statuses}
    assert 200 in seen and 400 in seen and 404 in seen, statuses
    assert sum(statuses.values()) > 100
