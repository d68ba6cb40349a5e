"""Shared by the unit tests: managers made over the fake engine end with their test."""

from __future__ import annotations

import pytest
from fakes import shut_down_tracked


@pytest.fixture(autouse=True)
async def _shut_down_managers():
    yield
    await shut_down_tracked()
