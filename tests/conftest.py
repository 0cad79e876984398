"""Shared test helpers: where ../shared is, and skipping cleanly when a user's clone has none."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# `make test` (and CI=true, whose built-in hypothesis profile would be chosen otherwise) runs every property test
# derandomized: the examples depend only on the test, so a run can fail only where the code changed, never at
# random.  The long randomized search is `make fuzz`; HYPOTHESIS_PROFILE=random gives randomized runs here.
settings.register_profile("stonelab", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("random", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "stonelab"))

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


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A target root for the package manager, with state in /etc that no transaction may touch."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("lab\n")
    return root


@pytest.fixture
def bootloader(tmp_path: Path) -> Path:
    """A stand-in systemd-boot binary (boot sync only copies it; it carries the string bootctl looks for)."""
    path = tmp_path / "systemd-bootx64.efi"
    path.write_bytes(b"MZ fake systemd-boot " * 64)
    return path


@pytest.fixture(scope="module")
def kernel():
    """The default guest kernel, or a clean skip naming the Debian package."""
    from vm.errors import MissingHostTool
    from vm.host import default_kernel
    try:
        return default_kernel()
    except MissingHostTool as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def accel(kernel):
    from vm.accel import AccelSelector
    return AccelSelector().choose(kernel)
