"""No background detection run is left behind for the next test's database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.detection.helpers import settled


@pytest.fixture(autouse=True)
def _detection_settles(request: pytest.FixtureRequest) -> Iterator[None]:
    if "runtime" in request.fixturenames:
        request.getfixturevalue("runtime")  # set up first, so torn down after this wait
    yield
    settled()
