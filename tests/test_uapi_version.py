"""UAPI version comparison (systemd's strverscmp_improved) and its use wherever kernels are ordered."""
from __future__ import annotations

import itertools
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from reference_impl.boot.entries import plan_boot
from reference_impl.boot.states import find_kernels, load_state
from stonelab.uapi_version import compare_versions, newest, version_key
from tests.test_boot_helpers import make_root, make_tree

# systemd's test-string-util.c order (oldest first), which the specification's examples follow.
ORDERED = ["~1", "", "ab", "abb", "abc", "0001", "002", "12", "122", "122.9", "123~rc1", "123", "123-a",
           "123-a.1", "123-a1", "123-a1.1", "123-3", "123-3.1", "123^patch1", "123^1", "123.a-1", "123.1-1",
           "123a-1", "124"]


def test_systemd_reference_order_pairwise() -> None:
    for (i, a), (j, b) in itertools.product(enumerate(ORDERED), repeat=2):
        want = (i > j) - (i < j)
        assert compare_versions(a, b) == want, (a, b)


def test_kernel_versions() -> None:
    assert sorted(["6.9.0", "6.10.0", "6.8.0", "6.10.0~rc7", "6.9.0^1", "6.1.0-28-amd64", "6.10"],
                  key=version_key) == ["6.1.0-28-amd64", "6.8.0", "6.9.0", "6.9.0^1", "6.10", "6.10.0~rc7",
                                       "6.10.0"]
    assert compare_versions("6.9.0-rc3", "6.9.0") == 1      # '-' starts a release suffix, not a pre-release
    assert compare_versions("010", "10") == 0 and compare_versions("6.9.0_x", "6.9.0x") == 0
    assert newest(["6.8.0", "6.10.0", "6.9.0"]) == "6.10.0" and newest([]) is None


def test_never_raises_on_odd_strings() -> None:
    for a, b in itertools.product(["", "~", "-", "^", ".", "~~", "é1", "1\0", "a-~", "-~1", "..."], repeat=2):
        assert compare_versions(a, b) == -compare_versions(b, a)


def test_kernels_of_a_state_are_newest_first_and_the_default_is_the_newest(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.8.0"}, active=1)
    for kver in ("6.9.0", "6.10.0", "6.10.0~rc2"):
        make_tree(root / "usr", 1, kver)
    assert [k.version for k in find_kernels(root / "usr")] == ["6.10.0", "6.10.0~rc2", "6.9.0", "6.8.0"]
    state = load_state(root, 1, 1)
    plan = plan_boot([state], "root=UUID=x", None, target=1)
    assert plan.default_entry == "aerynos-6.10.0-1.conf"
    assert plan.loader_conf.startswith("default aerynos-6.10.0-1.conf\n")


def test_the_default_guest_kernel_is_the_newest_by_the_same_rules(tmp_path: Path) -> None:
    from vm.host import default_kernel
    boot = tmp_path / "boot"
    boot.mkdir()
    for release in ("6.9.0-1-amd64", "6.10.0-1-amd64", "6.10.0~rc7-1-amd64", "6.1.0-28-amd64"):
        (boot / f"vmlinuz-{release}").write_bytes(b"MZ")
    assert default_kernel(boot, tmp_path / "modules").release == "6.10.0-1-amd64"


KERNEL_PAIRS = [("6.10.0-rc1", "6.10.0"), ("6.10.0~rc1", "6.10.0"), ("6.1~rc2", "6.1"), ("6.1^post", "6.1"),
                ("6.1^post", "6.1.1"), ("6.1.0-57-amd64", "6.1.0-9-amd64"), ("6.1a", "6.1.0"), ("6.1", "6.1a"),
                ("1.0", "1_0"), ("", "a"), ("", "~"), ("1~", "1"), ("1-", "1"), ("1.", "1"), ("1^", "1"),
                ("6.8.0-rc7+", "6.8.0-rc7"), ("6.6.0-asterinas", "6.6.0"), ("0.9.0", "0.10.0")]


def _systemd_order(a: str, b: str) -> int:
    proc = subprocess.run(["systemd-analyze", "compare-versions", "--", a, b], capture_output=True)
    return {0: 0, 11: 1, 12: -1}[proc.returncode]


def test_the_same_order_as_systemd_itself() -> None:
    """Differential: systemd-analyze compare-versions (systemd >= 252) is strverscmp_improved() itself; every
    kernel-like pair and 300 random strings over the separators, digits, letters and invalid characters."""
    if shutil.which("systemd-analyze") is None or subprocess.run(
            ["systemd-analyze", "compare-versions", "1", "2"], capture_output=True).returncode != 12:
        pytest.skip("no systemd-analyze with compare-versions (systemd >= 252)")
    rng = random.Random(15)
    chars = "0123456789aAzZ~-^._+é \t"
    pairs = KERNEL_PAIRS + [tuple("".join(rng.choice(chars) for _ in range(rng.randrange(7))) for _ in "ab")
                            for _ in range(300)]
    wrong = [(a, b) for a, b in pairs if compare_versions(a, b) != _systemd_order(a, b)]
    assert wrong == []
