"""Fixtures shared across test files."""

import pytest
from helpers import Reference


@pytest.fixture(scope="session")
def pretrain_reference(tmp_path_factory) -> Reference:
    """The uninterrupted run of ``helpers.resumable_flags``, made once a session: test_resilience,
    the fault campaign and test_pretrain compare interrupted runs with its final checkpoint."""
    return Reference.make(tmp_path_factory.mktemp("pretrain-reference"))
