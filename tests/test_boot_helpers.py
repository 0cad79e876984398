"""Builders for boot tests (no tests here): moss-like roots with kernels, and GPT disks with a FAT ESP."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

STATE_SCHEMA = ("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, "
                "created BIGINT, summary TEXT, description TEXT)")
OS_RELEASE = 'NAME="AerynOS"\nID=aerynos\nPRETTY_NAME="AerynOS 2026.11"\n'


def need_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (tools/debian-packages.txt)")


def kernel_bytes(kver: str, size: int = 4096, salt: str = "") -> bytes:
    unit = f"vmlinuz {kver} {salt}|".encode()
    return (unit * (size // len(unit) + 1))[:size]


def make_tree(tree: Path, state_id: int, kver: str | None, *, kernel_size: int = 4096, salt: str = "",
              cmdline: str | None = None) -> None:
    (tree / "lib").mkdir(parents=True, exist_ok=True)
    (tree / "lib" / "os-release").write_text(OS_RELEASE)
    (tree / ".stateID").write_text(str(state_id))
    if kver is not None:
        kdir = tree / "lib" / "kernel" / kver
        kdir.mkdir(parents=True, exist_ok=True)
        (kdir / "vmlinuz").write_bytes(kernel_bytes(kver, kernel_size, salt))
        (kdir / "10-default.initrd").write_bytes(f"initrd {kver} {salt}".encode() * 8)
    if cmdline is not None:
        cdir = tree / "lib" / "kernel" / "cmdline.d"
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "00-quiet.cmdline").write_text(cmdline + "\n")


def add_state_rows(root: Path, ids: list[int]) -> None:
    db = root / ".moss" / "db" / "state"
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute(STATE_SCHEMA)
        for state_id in ids:
            conn.execute("INSERT INTO state (id, type, created, summary) VALUES (?, 'transaction', 0, '')",
                         (state_id,))
    conn.close()


def make_root(root: Path, kernels: dict[int, str | None], active: int, *, symlink: bool = False,
              kernel_size: int = 4096) -> Path:
    """States ``kernels`` (id -> kernel version or None); ``active``'s tree is /usr (or /usr -> its archive)."""
    add_state_rows(root, sorted(kernels))
    for state_id, kver in kernels.items():
        if state_id == active and not symlink:
            tree = root / "usr"
        else:
            tree = root / ".moss" / "root" / str(state_id) / "usr"
        make_tree(tree, state_id, kver, kernel_size=kernel_size)
    if symlink:
        os.symlink(f".moss/root/{active}/usr", root / "usr")
    return root


def drop_state(root: Path, state_id: int) -> None:
    """Prune a state the way moss does: row and tree gone."""
    shutil.rmtree(root / ".moss" / "root" / str(state_id))
    with sqlite3.connect(root / ".moss" / "db" / "state") as conn:
        conn.execute("DELETE FROM state WHERE id = ?", (state_id,))
    conn.close()


ESP_START = 2048


def make_disk(path: Path, esp_sectors: int = 8192, *, esp_type: str = "U", format_esp: bool = True) -> Path:
    """GPT disk image: partition 1 the ESP (FAT), partition 2 an ext4 root (its superblock only matters)."""
    need_tools("sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy")
    root_start = ESP_START + esp_sectors
    subprocess.run(["truncate", "-s", str((root_start + 16384 + 64) * 512), str(path)], check=True)
    subprocess.run(["sfdisk", "-q", str(path)], check=True, input=(
        f"label: gpt\nstart={ESP_START}, size={esp_sectors}, type={esp_type}, name=esp\n"
        f"start={root_start}, size=16384, type=L, name=root\n").encode())
    if format_esp:
        subprocess.run(["mkfs.vfat", "-n", "ESP", "--offset", str(ESP_START), str(path), str(esp_sectors // 2)],
                       check=True, capture_output=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", f"offset={root_start * 512}", str(path), "8M"],
                   check=True, capture_output=True)
    return path


def mtools(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    return subprocess.run(list(args), env=env, capture_output=True, check=True)


def esp_listing(disk: Path) -> list[str]:
    out = mtools("mdir", "-/", "-b", "-a", "-i", f"{disk}@@{ESP_START * 512}", "::/").stdout.decode()
    return sorted(line[3:] for line in out.splitlines() if line.startswith("::/") and not line.endswith("/"))


def esp_read(disk: Path, path: str) -> bytes:
    return mtools("mcopy", "-n", "-i", f"{disk}@@{ESP_START * 512}", f"::/{path}", "-").stdout


def crash_mid_sync(root: Path, disk: Path, root_arg: str, bootloader: Path, kver: str) -> None:
    """Sync once (state 1), add state 2 with kernel ``kver`` and sync it with a fault between the kernel copies
    and the entries (``boot.mid``): its kernel files are on the ESP, no entry names them."""
    from reference_impl.boot import sync_boot
    sync_boot(root, esp=disk, root_arg=root_arg, bootloader=bootloader)
    make_tree(root / ".moss/root/2/usr", 2, kver)
    add_state_rows(root, [2])
    with pytest.raises(OSError, match="boot.mid"):
        sync_boot(root, esp=disk, root_arg=root_arg, bootloader=bootloader, target=2,
                  environ={"STONELAB_FAULT": "boot.mid:eio"})
