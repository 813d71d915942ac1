"""Shared pytest setup: test helpers import as plain modules; the fake-broker ``broker`` fixture;
the ``tls_files`` fixture (throwaway certificates, tests/tls_util.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test helpers (tests/v1peer.py, tests/fake_broker.py) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

from fake_broker import FakeBroker  # noqa: E402 - after the path is set
from tls_util import TLSFiles, have_openssl, make_tls_files  # noqa: E402


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    """A local fake broker (tests/fake_broker.py) for client unit tests; files that need a
    real broker define their own ``broker`` fixture, which takes precedence."""
    b = FakeBroker()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA, a server certificate (``localhost``, ``127.0.0.1``), a client certificate and a
    rogue CA with its own client certificate, made once per session (tests/tls_util.py)."""
    if not have_openssl():
        pytest.skip("the openssl command is needed to make the test certificates")
    return make_tls_files(tmp_path_factory.mktemp("tls"))
