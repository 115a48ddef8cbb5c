"""Fixtures the serving e2e tests share."""

from __future__ import annotations

import pytest

from e2e.serve_helpers import make_serve_model


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory):
    """The noisy long-context micro model every serving test serves (built once)."""
    return make_serve_model(tmp_path_factory.mktemp("serve_model"))
