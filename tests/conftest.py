"""pytest's hooks and fixtures; the helpers themselves are in tests/support/helpers.py."""

import os

import pytest

from tests.support.helpers import SHARED, SHARED_FIXTURES, SHARED_REALDATA, vmarc


def pytest_sessionstart(session):
    if not os.path.isdir(SHARED_FIXTURES) or not os.path.isdir(SHARED_REALDATA):
        raise pytest.UsageError(
            f"the shared samples are not at {SHARED} (the shared/ folder "
            "beside the checkout); set VMARC_SHARED"
        )


@pytest.fixture
def cli():
    return vmarc
