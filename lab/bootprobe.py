"""Observe what the firmware would find: the GPT of the system disk (``sfdisk --json``), its ESP, the Type 1
entries and ``loader.conf`` on it (read through mtools, no mount). Runs in the lab process for the host target and
inside the guest (``python -m lab.probe ROOT --disk /dev/vda``) for the VM target."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from reference_impl.boot.esp import EspError, MtoolsEsp

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # UEFI spec 2.10, table 5.7
SECTOR = 512
ENTRIES_DIR = "loader/entries/"


def partition_table(disk: Path) -> dict | None:
    """``sfdisk --json`` of ``disk``; None when it holds no partition table."""
    proc = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                          env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout).get("partitiontable")


def observe_boot(disk: Path) -> dict:
    """``{"esp": "DISK:N"|None, "problem": str|None, "partuuids": {uuid: N}, "files": [path],
    "loader_conf": text|None, "entries": {path: text}}`` — ``problem`` says why there is no readable ESP."""
    seen: dict = {"esp": None, "problem": None, "partuuids": {}, "files": [], "loader_conf": None, "entries": {}}
    table = partition_table(disk)
    if table is None:
        seen["problem"] = f"{disk}: no partition table"
        return seen
    parts = table.get("partitions", [])
    for number, part in enumerate(parts, 1):
        if "uuid" in part:
            seen["partuuids"][part["uuid"].lower()] = _number(part, str(disk), number)
    esp = next((p for p in parts if p.get("type", "").upper() == ESP_TYPE), None)
    if esp is None:
        seen["problem"] = f"{disk}: no ESP partition in the GPT"
        return seen
    seen["esp"] = f"{disk}:{_number(esp, str(disk), parts.index(esp) + 1)}"
    fat = MtoolsEsp(disk, esp["start"] * SECTOR)
    try:
        fat.check()
        paths = fat.list_files()
        seen["files"] = sorted(paths)
        for path in paths:
            if path.lower() == "loader/loader.conf":
                seen["loader_conf"] = (fat.read(path) or b"").decode(errors="replace")
            elif path.lower().startswith(ENTRIES_DIR) and path.lower().endswith(".conf"):
                seen["entries"][path] = (fat.read(path) or b"").decode(errors="replace")
    except EspError as err:
        seen["problem"] = f"{seen['esp']}: {err}"
    return seen


def _number(part: dict, disk: str, fallback: int) -> int:
    node = part.get("node", "")
    tail = node[len(disk):].lstrip("p") if node.startswith(disk) else ""
    return int(tail) if tail.isdigit() else fallback
