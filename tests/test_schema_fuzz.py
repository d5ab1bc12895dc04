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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from swapper.backends.registry import load_backends
from swapper.config import parse_config
from swapper.http.app import create_app
from tests.conftest import REPLY
from tests.fakes import FakePlugin, FakeWorld

_registry = load_backends(FakePlugin(FakeWorld()))
_config = parse_config(
    {
        "swapper": {"stop_timeout": 1, "model_swap_timeout": 5},
        "models": {"a": {"backend": "fake", "aliases": ["alpha"]}, "b": {"backend": "fake"}},
    },
    "schema-fuzz.yaml",
    _registry.schemas(),
)
schema = schemathesis.openapi.from_asgi("/schema/openapi.json", create_app(_config, _registry))
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module", autouse=True)
def backends() -> Iterator[None]:
    with respx.mock(assert_all_called=False) as router:
        for host in ("a", "b"):
            router.post(url__startswith=f"http://{host}.fake.test/").respond(json=REPLY)
        yield


@schema.parametrize()
@FUZZ
def test_no_input_makes_swapper_fail(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])


def test_the_fuzzing_reaches_every_outcome() -> None:
    """Guard against fuzzing that only ever sees 404s: real forwards and refusals both happen.

    It draws its own cases from the chat endpoint's schema, so it holds on its own, whatever
    else runs (or does not) before it.
    """
    statuses: collections.Counter[int] = collections.Counter()
    chat = schema["/v1/chat/completions"]["POST"]

    # Valid bodies (forwarded: 200, or 404 for a model name that is not configured) and
    # invalid ones (400), as the parametrized fuzz above draws them.
    @given(
        case=st.one_of(
            chat.as_strategy(GenerationMode.POSITIVE), chat.as_strategy(GenerationMode.NEGATIVE)
        )
    )
    @FUZZ
    def fuzz(case: schemathesis.Case) -> None:
        statuses[case.call_and_validate(checks=[not_a_server_error]).status_code] += 1

    fuzz()
    print("\nschemathesis statuses:", dict(sorted(statuses.items())))
    # Forwards (200) and refusals (400 for a malformed body, 404 for an unknown model) both.
    assert 200 in statuses and {400, 404} & set(statuses), statuses
    assert sum(statuses.values()) >= 60, statuses
