"""Shared pytest setup: test helpers import as plain modules; the fake-broker ``broker`` fixture."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test helpers (tests/v1peer.py, tests/fake_broker.py) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

from fake_broker import FakeBroker  # noqa: E402 - after the path is set


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    """A local fake broker (tests/fake_broker.py) for client unit tests; files that need a
    real broker define their own ``broker`` fixture, which takes precedence."""
    b = FakeBroker()
    try:
        yield b
    finally:
        b.close()
