"""Filesystem superblock probing: type, UUID and label, named as `blkid` names them.

Offsets are from the start of the filesystem (``offset`` within an image for a partition).
"""
from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

# Enough for every probe below (btrfs' superblock ends at 0x10000 + 4 KiB).
PROBE_BYTES = 0x11000


@dataclass(frozen=True)
class FsInfo:
    type: str          # blkid TYPE: ext2/ext3/ext4, btrfs, f2fs, xfs, crypto_LUKS, vfat
    uuid: str
    label: str
    version: str = ""  # FAT12/FAT16/FAT32, LUKS version

    def as_dict(self) -> dict[str, str]:
        return {"type": self.type, "uuid": self.uuid, "label": self.label, "version": self.version}


def _label(text: str) -> str:
    """A label as blkid's LABEL: cut at the first NUL, trailing whitespace removed (``blkid_rtrim_whitespace()``
    in libblkid's ``blkid_probe_set_label``/``set_utf8label``; only LABEL_RAW keeps the blanks)."""
    return text.split("\0", 1)[0].rstrip(" \t\n\v\f\r")


def _text(raw: bytes) -> str:
    return _label(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))


def _uuid(raw: bytes) -> str:
    return str(uuid.UUID(bytes=raw))


def _ext(buf: bytes) -> FsInfo | None:
    if len(buf) < 0x500 or struct.unpack_from("<H", buf, 0x438)[0] != 0xEF53:
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", buf, 0x45C)
    # blkid's rule of thumb: ext4-only features make ext4, a journal makes ext3, otherwise ext2.
    if incompat & ~0x0006 & 0xFFFF or ro_compat & ~0x0007:
        kind = "ext4"
    elif compat & 0x0004:
        kind = "ext3"
    else:
        kind = "ext2"
    return FsInfo(kind, _uuid(buf[0x468:0x478]), _text(buf[0x478:0x488]), "1.0")


def _btrfs(buf: bytes) -> FsInfo | None:
    if buf[0x10040:0x10048] != b"_BHRfS_M":
        return None
    return FsInfo("btrfs", _uuid(buf[0x10020:0x10030]), _text(buf[0x1012B:0x1022B]))


def _f2fs(buf: bytes) -> FsInfo | None:
    if len(buf) < 0x880 or struct.unpack_from("<I", buf, 0x400)[0] != 0xF2F52010:
        return None
    major, minor = struct.unpack_from("<HH", buf, 0x404)
    label = _label(buf[0x47C:0x47C + 1024].decode("utf-16-le", "replace"))
    return FsInfo("f2fs", _uuid(buf[0x46C:0x47C]), label, f"{major}.{minor}")


def _xfs(buf: bytes) -> FsInfo | None:
    if len(buf) < 0x78 or buf[:4] != b"XFSB":
        return None
    return FsInfo("xfs", _uuid(buf[0x20:0x30]), _text(buf[0x6C:0x78]))


def _luks(buf: bytes) -> FsInfo | None:
    if len(buf) < 0xD0 or buf[:6] != b"LUKS\xba\xbe":
        return None
    version = struct.unpack_from(">H", buf, 6)[0]
    label = _text(buf[0x18:0x48]) if version == 2 else ""
    return FsInfo("crypto_LUKS", buf[0xA8:0xD0].split(b"\0", 1)[0].decode("ascii", "replace"), label, str(version))


def _fat(buf: bytes) -> FsInfo | None:
    if len(buf) < 512 or buf[0x1FE:0x200] != b"\x55\xaa":
        return None
    bytes_per_sector, sectors_per_cluster, reserved, fats, root_entries, total16, _media, fat16_size = \
        struct.unpack_from("<HBHBHHBH", buf, 0x0B)
    if (bytes_per_sector not in (512, 1024, 2048, 4096) or sectors_per_cluster == 0
            or sectors_per_cluster & (sectors_per_cluster - 1) or reserved == 0 or fats not in (1, 2)
            or buf[0] not in (0xEB, 0xE9)):
        return None
    total32 = struct.unpack_from("<I", buf, 0x20)[0]
    fat32_size = struct.unpack_from("<I", buf, 0x24)[0]
    is_fat32 = fat16_size == 0 and fat32_size != 0
    vol_id_at, label_at = (0x43, 0x47) if is_fat32 else (0x27, 0x2B)
    vol_id = struct.unpack_from("<I", buf, vol_id_at)[0]
    boot_label = _label(buf[label_at:label_at + 11].decode("latin-1"))
    if is_fat32:
        version = "FAT32"
    else:
        total = total16 or total32
        root_sectors = (root_entries * 32 + bytes_per_sector - 1) // bytes_per_sector
        data = total - reserved - fats * fat16_size - root_sectors
        version = "FAT12" if data // sectors_per_cluster < 4085 else "FAT16"
    label = "" if boot_label == "NO NAME" else boot_label
    return FsInfo("vfat", f"{vol_id >> 16:04X}-{vol_id & 0xFFFF:04X}", label, version)


PROBES = (_luks, _xfs, _ext, _btrfs, _f2fs, _fat)


def probe_bytes(buf: bytes) -> FsInfo | None:
    for probe in PROBES:
        info = probe(buf)
        if info is not None:
            return info
    return None


def _fat_root_dir_label(dev, offset: int, boot: bytes) -> str | None:
    """The volume label entry of the root directory (blkid prefers it over the boot sector's copy)."""
    bytes_per_sector, sectors_per_cluster, reserved, fats, root_entries, _total16, _media, fat16_size = \
        struct.unpack_from("<HBHBHHBH", boot, 0x0B)
    if fat16_size:
        start = (reserved + fats * fat16_size) * bytes_per_sector
        length = root_entries * 32
    else:
        fat32_size, root_cluster = struct.unpack_from("<I4xI", boot, 0x24)
        start = (reserved + fats * fat32_size + (root_cluster - 2) * sectors_per_cluster) * bytes_per_sector
        length = sectors_per_cluster * bytes_per_sector   # the first cluster of the root directory
    if fat16_size == 0 and root_cluster < 2:
        return None
    end = dev.seek(0, os.SEEK_END)
    if start <= 0 or length <= 0 or offset + start >= end:
        return None   # a directory outside the device: the boot sector lies, keep its label
    dev.seek(offset + start)
    data = dev.read(min(length, 1 << 20, end - offset - start))
    for at in range(0, len(data) - 31, 32):
        entry = data[at:at + 32]
        if entry[0] == 0:
            break
        if entry[0] != 0xE5 and entry[11] & 0x3F != 0x0F and entry[11] & 0x08:
            return _label(entry[:11].decode("latin-1"))
    return None


def probe(path: str | Path, offset: int = 0) -> FsInfo | None:
    """Probe the filesystem at ``offset`` (bytes) of ``path``; None when no known superblock is there.

    Every value read from the device is bounded before use (the FAT root directory by the device's size);
    OSError only for a device that cannot be read."""
    with open(path, "rb") as dev:
        dev.seek(offset)
        buf = dev.read(PROBE_BYTES)
        info = probe_bytes(buf)
        if info is not None and info.type == "vfat":
            label = _fat_root_dir_label(dev, offset, buf)
            if label is not None:
                info = FsInfo(info.type, info.uuid, label, info.version)
    return info
