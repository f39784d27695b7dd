"""``submit_many`` is all or nothing, and an input that fails a check is named."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from maas_worker import InputTooLarge, SubmitError

from .conftest import Stack

pytestmark = pytest.mark.integration


def test_one_oversized_item_is_named_and_nothing_is_enqueued(
    make_stack: Callable[..., Stack], client_kind: str
) -> None:
    stack = make_stack()
    items = [{"i": 0}, {"i": 1}, {"i": 2}, {"text": "x" * 2_100_000}, {"i": 4}]
    with stack.client(kind=client_kind) as client:
        with pytest.raises(InputTooLarge) as caught:
            client.submit_many("echo", items)
        size = len('{"text":""}') + 2_100_000
        assert str(caught.value) == (
            f"item 3: input is 2.1 MB ({size} bytes), more than the limit "
            "MAAS_MAX_INPUT_BYTES=1048576"
        )
        with pytest.raises(SubmitError, match=r"^item 1: inputs are not JSON-serialisable"):
            client.submit_many("echo", [{"i": 0}, {"bad": object()}])
        assert stack.backend.llen(stack.tenant_queue("normal")) == 0
        assert not stack.backend.keys("maas:{acme}:*")  # no marker, payload or pending entry
        # One input alone is not numbered.
        with pytest.raises(InputTooLarge, match=r"^input is 2\.1 MB"):
            client.submit("echo", items[3])
