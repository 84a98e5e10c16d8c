import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fohelp import COUNTER  # noqa: E402


@pytest.fixture(scope="session")
def counter(guests: Path) -> Path:
    path = guests / COUNTER
    if not path.exists():
        pytest.skip(f"{path} is not built: run `make guests`")
    return path
