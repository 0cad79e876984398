"""The states of an installation as boot sees them: id, tree, os-release and kernels.

Reads ``<root>/.moss/db/state`` read-only with sqlite3.  The active state's tree is ``<root>/usr`` (a real
directory, or a symlink to ``.moss/root/<id>/usr`` with the symlink swap); every other state's is
``<root>/.moss/root/<id>/usr``.
"""
from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path

from reference_impl.installation import Installation
from stonelab.errors import StonelabError
from stonelab.uapi_version import version_key

DEFAULT_OS_ID = "aerynos"
DEFAULT_PRETTY_NAME = "AerynOS"


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    initrds: tuple[Path, ...]


@dataclass(frozen=True)
class BootState:
    id: int
    tree: Path                       # the state's /usr
    os_id: str = DEFAULT_OS_ID
    pretty_name: str = DEFAULT_PRETTY_NAME
    kernels: tuple[Kernel, ...] = ()
    cmdline: tuple[str, ...] = field(default_factory=tuple)
    image_id: str | None = None       # os-release IMAGE_ID, a candidate entry token


def read_state_ids(root: Path) -> list[int]:
    db = root / ".moss" / "db" / "state"
    if not db.exists():
        raise StonelabError(f"{db}: no state database (is {root} a moss installation?)")
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return [row[0] for row in conn.execute("SELECT id FROM state ORDER BY id")]
    except sqlite3.Error as err:
        raise StonelabError(f"{db}: cannot read the state table: {err}") from err


def active_state_id(root: Path) -> int | None:
    return Installation(root).active_state()


def state_tree(root: Path, state_id: int, active: int | None) -> Path:
    inst = Installation(root)
    return inst.usr if state_id == active else inst.archived(state_id)


def read_os_release(tree: Path) -> tuple[str, str, str | None]:
    """(ID, PRETTY_NAME or NAME, IMAGE_ID or None) from ``<tree>/lib/os-release``, with AerynOS' defaults."""
    values: dict[str, str] = {}
    try:
        text = (tree / "lib" / "os-release").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[key.strip()] = value
    return (values.get("ID") or DEFAULT_OS_ID, values.get("PRETTY_NAME") or values.get("NAME") or DEFAULT_PRETTY_NAME,
            values.get("IMAGE_ID") or None)


def find_kernels(tree: Path) -> tuple[Kernel, ...]:
    """The kernels in ``<tree>/lib/kernel/<version>/vmlinuz``, newest first by the UAPI version rules
    (``6.10.0`` before ``6.9.0``), as systemd-boot orders them."""
    base = tree / "lib" / "kernel"
    kernels = []
    if base.is_dir():
        for kdir in sorted(base.iterdir()):
            vmlinuz = kdir / "vmlinuz"
            if kdir.is_dir() and vmlinuz.is_file():
                kernels.append(Kernel(kdir.name, vmlinuz, tuple(sorted(kdir.glob("*.initrd")))))
    return tuple(sorted(kernels, key=lambda k: version_key(k.version), reverse=True))


def read_cmdline_snippets(tree: Path) -> tuple[str, ...]:
    snippets = []
    base = tree / "lib" / "kernel" / "cmdline.d"
    if base.is_dir():
        for path in sorted(base.glob("*.cmdline")):
            text = " ".join(path.read_text(errors="replace").split())
            if text:
                snippets.append(text)
    return tuple(snippets)


def load_state(root: Path, state_id: int, active: int | None, tree: Path | None = None) -> BootState | None:
    """The state as boot sees it, read from ``tree`` (default: where the state lives); None without a tree."""
    tree = tree if tree is not None else state_tree(root, state_id, active)
    if not tree.is_dir():
        return None
    os_id, pretty, image_id = read_os_release(tree)
    return BootState(state_id, tree, os_id, pretty, find_kernels(tree), read_cmdline_snippets(tree), image_id)


def bootable_states(root: Path, limit: int = 5, target: int | None = None,
                    trees: Mapping[int, Path] | None = None) -> tuple[list[BootState], list[int]]:
    """The target (default: active) state plus the newest others whose trees exist, newest first, at most
    ``limit``; and the ids skipped because their tree is gone. ``trees`` (state id -> its /usr) overrides where a
    state is read from: a transaction plans the boot of a tree still in staging before it swaps."""
    active = active_state_id(root)
    target = target if target is not None else active
    ids = read_state_ids(root)
    chosen: list[BootState] = []
    missing: list[int] = []
    order = ([target] if target in ids else []) + [i for i in sorted(ids, reverse=True) if i != target]
    for state_id in order:
        if len(chosen) >= limit:
            break
        state = load_state(root, state_id, active, (trees or {}).get(state_id))
        if state is None:
            missing.append(state_id)
        else:
            chosen.append(state)
    chosen.sort(key=lambda s: s.id, reverse=True)
    return chosen, missing
