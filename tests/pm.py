"""Helpers for the package-manager tests: build small real packages, run the CLI, read a root's /usr."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lab.probe import walk
from reference_impl.stone import PackageSpec, build_package_from_files

REPO = Path(__file__).resolve().parents[1]


def make_package(out_dir: Path, name: str, files: dict[str, str | bytes], *, version: str = "1.0", release: int = 1,
                 symlinks: dict[str, str] | None = None, modes: dict[str, int] | None = None,
                 depends: list[str] | None = None, provides: list[str] | None = None,
                 conflicts: list[str] | None = None, owners: dict[str, tuple[int, int]] | None = None) -> Path:
    spec = PackageSpec(name=name, version=version, release=release, summary=f"{name} for tests", license=["MPL-2.0"],
                       depends=depends or [], provides=provides or [], conflicts=conflicts or [],
                       owners=owners or {}, modes=modes or {})
    return build_package_from_files(files, spec, out_dir / f"{name}-{version}-{release}-1-x86_64.stone",
                                    symlinks=symlinks, level=3)


def stonelab(*args: str, fault: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STONELAB_FAULT"}
    if fault:
        env["STONELAB_FAULT"] = fault
    proc = subprocess.run([sys.executable, "-m", "stonelab.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"stonelab {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def pm(root: Path, strategy: str, *args: str, mode: str = "reference", **kw) -> subprocess.CompletedProcess:
    """A package-manager verb on ``root`` with the swap strategy and mode (``state X`` verbs take two words)."""
    verb, rest = (args[:2], args[2:]) if args[0] == "state" else (args[:1], args[1:])
    return stonelab(*verb, "-D", str(root), "--swap", strategy, "--mode", mode, *rest, **kw)


def usr_tree(root: Path) -> dict[str, list]:
    """The files of /usr without the transaction's own marker files, following a symlinked /usr."""
    usr = root / "usr"
    tree = walk(usr.resolve() if usr.is_symlink() else usr)
    tree.pop(".stateID", None)
    tree.pop("lib/os-release", None)
    return tree


def state_id(root: Path) -> int | None:
    marker = root / "usr" / ".stateID"
    return int(marker.read_text()) if marker.exists() else None
