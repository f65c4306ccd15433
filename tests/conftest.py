"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.idp_fixture import DEFAULT_CLIENTS, TestIdP, start_idp


@pytest.fixture(scope="session")
def idp() -> Iterator[TestIdP]:
    """A real OpenID Connect provider (oidc-provider on Node.js) with DEFAULT_CLIENTS.

    Shared by the whole session: don't rotate its keys; use ``start_idp`` for that.
    """
    server = start_idp(DEFAULT_CLIENTS)
    try:
        yield server
    finally:
        server.stop()
