"""Shared test helpers: where ../shared is, and skipping cleanly when a user's clone has none."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_file(*parts: str) -> Path:
    """A path below ../shared, or a clean skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the real fixtures; a plain clone has none)")
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    return shared_file("fixtures", "aerynos")
