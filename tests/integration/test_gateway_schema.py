"""Schemathesis against the gateway's OpenAPI document and a running gateway.

Every operation is called with generated (valid and invalid) parameters and
bodies, with a valid bearer token: no answer may be a server error, and each
status code, content type, header and body must be one the document declares.
The positive-data check is left out: a body that fits the schema (any bytes)
is still not a sealed envelope, and the gateway rightly refuses it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from maas_worker.gateway.openapi import document

from .conftest import Stack
from .gatewaykit import Caller, GatewayProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(shared_stack: Stack) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(shared_stack, "gateway-schema", MAAS_GATEWAY_MAX_WAIT_S="0.5")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def caller(shared_stack: Stack, gateway: GatewayProcess) -> Iterator[Caller]:
    caller = Caller(shared_stack, gateway)
    yield caller
    caller.http.close()


def test_the_gateway_keeps_its_openapi_document(gateway: GatewayProcess, caller: Caller) -> None:
    # Each operation's cases driven by Hypothesis directly: schemathesis' pytest plugin
    # (schema.parametrize) does not load under the pytest this suite runs.
    api = schemathesis.openapi.from_dict(document())
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 7
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=gateway.url,
                headers={"Authorization": f"Bearer {caller.token}"},
                excluded_checks=[checks.positive_data_acceptance],
                timeout=30,
            )

        call()
