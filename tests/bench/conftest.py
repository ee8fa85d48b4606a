import pytest

from perfml.bench import register, unregister
from tests.bench.helpers import TINY, tiny_case


@pytest.fixture
def tiny():
    """The throwaway case, registered for the test's duration."""
    case = register(tiny_case())
    yield case
    unregister(TINY)
