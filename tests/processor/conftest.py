import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    """The processor tests run tiny models: one intra-op thread each (see ``single_thread``)."""
