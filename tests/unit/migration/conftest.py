import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mighelp import FakeLanding, Tap  # noqa: E402


@pytest.fixture
def landing() -> Iterator[FakeLanding]:
    fake = FakeLanding()
    yield fake
    fake.memory.close()


@pytest.fixture
def tap() -> Iterator[Tap]:
    t = Tap()
    yield t
    t.close()
