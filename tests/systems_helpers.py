"""Shared by the system-under-test tests: packages, the expected tree, a snapshot of what must stay untouched."""
from __future__ import annotations

import os
from pathlib import Path

import shutil

import pytest

from lab.invariants import tree_difference
from lab.packages import PackageDecl, expected_tree

HELLO_1 = PackageDecl(key="hello-1", name="hello", version="1",
                      files={"bin/hello": "#!/bin/sh\necho one\n", "share/hello/empty": ""}, symlinks={"bin/hi": "hello"})
HELLO_2 = PackageDecl(key="hello-2", name="hello", version="2", files={"bin/hello": "#!/bin/sh\necho two\n"},
                      symlinks={"bin/hi": "hello"})
BASE = PackageDecl(key="base", name="base", version="1", files={"lib/libbase.so.1": "ELF base\n"})


def difference(tree: dict, decls: list[PackageDecl]) -> str:
    """'identical' when ``tree`` is exactly the packages' files (modes aside)."""
    return tree_difference(tree, expected_tree(decls).files)


def snapshot(path: Path) -> dict[str, tuple]:
    """Every entry below ``path`` with its type, size and link target (for 'nothing here changed')."""
    seen = {}
    if not path.exists():
        return seen
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = os.lstat(full)
            seen[str(full)] = (st.st_mode, st.st_size if not os.path.isdir(full) else 0,
                               os.readlink(full) if os.path.islink(full) else "")
    return seen


def require_nix_ostree_and_kernel() -> None:
    """Skip (with the reason) unless nix-env, ostree and a guest kernel are here."""
    from vm.errors import VmError
    from vm.host import default_kernel
    for binary in ("nix-env", "ostree"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is absent (tools/debian-packages.txt)")
    try:
        default_kernel()
    except VmError as err:
        pytest.skip(str(err))
