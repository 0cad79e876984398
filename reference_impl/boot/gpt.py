"""GUID partition tables: protective MBR, primary header and entry array with their CRC32s.

Read from a disk image or a block device; nothing is ever written.  GUIDs are returned as lower-case strings.
"""
from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from stonelab.errors import StonelabError

ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
XBOOTLDR_TYPE = "bc13c2ff-59e6-4262-a352-b275fd6f7172"
LINUX_FS_TYPE = "0fc63daf-8483-4772-8e79-3d69d8477de4"
GPT_SIGNATURE = b"EFI PART"
SECTOR_SIZES = (512, 4096)
HEADER = struct.Struct("<8sIIII QQQQ 16s QIII")


class GptError(StonelabError):
    """The disk has no valid GPT (or a corrupt one)."""


@dataclass(frozen=True)
class Partition:
    number: int            # 1-based index in the entry array, as the kernel numbers partitions
    type_guid: str
    part_guid: str
    name: str
    first_lba: int
    last_lba: int
    attributes: int
    sector_size: int

    @property
    def offset(self) -> int:
        return self.first_lba * self.sector_size

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * self.sector_size

    @property
    def is_esp(self) -> bool:
        return self.type_guid == ESP_TYPE

    @property
    def is_xbootldr(self) -> bool:
        return self.type_guid == XBOOTLDR_TYPE


@dataclass(frozen=True)
class GptDisk:
    path: str
    sector_size: int
    disk_guid: str
    first_usable_lba: int
    last_usable_lba: int
    partitions: list[Partition]

    def partition(self, number: int) -> Partition:
        for part in self.partitions:
            if part.number == number:
                return part
        raise GptError(f"{self.path}: no partition {number} in the GPT "
                       f"(partitions: {', '.join(str(p.number) for p in self.partitions) or 'none'})")

    def by_part_guid(self, guid: str) -> Partition | None:
        guid = guid.strip().lower()
        return next((p for p in self.partitions if p.part_guid == guid), None)


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def has_gpt(path: str | Path) -> bool:
    try:
        with open(path, "rb") as disk:
            for size in SECTOR_SIZES:
                disk.seek(size)
                if disk.read(8) == GPT_SIGNATURE:
                    return True
    except OSError:
        return False
    return False


def _disk_size(disk: BinaryIO) -> int:
    return disk.seek(0, os.SEEK_END)


def read_gpt(path: str | Path) -> GptDisk:
    """Parse the primary GPT of ``path``; raise GptError naming the file and what is wrong.

    The header is untrusted: every LBA and size in it (entry array, partitions) is checked against the size of
    the file or device before it is used, so no value, however large, gets further than a GptError.
    """
    path = str(path)
    try:
        with open(path, "rb") as disk:
            disk_size = _disk_size(disk)
            disk.seek(0)
            mbr = disk.read(512)
            for sector_size in SECTOR_SIZES:
                disk.seek(sector_size)
                header = disk.read(sector_size)
                if header[:8] == GPT_SIGNATURE:
                    break
            else:
                raise GptError(f"{path}: no GPT header (no 'EFI PART' signature at LBA 1)")
            if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa" or not any(
                    mbr[446 + 16 * i + 4] == 0xEE for i in range(4)):
                raise GptError(f"{path}: GPT without a protective MBR (no type 0xEE entry with signature 55AA)")
            if len(header) < HEADER.size:
                raise GptError(f"{path}: GPT header truncated ({len(header)} of {HEADER.size} bytes)")
            (_sig, _rev, header_size, header_crc, _res, my_lba, _alt, first_usable, last_usable, disk_guid,
             entries_lba, entry_count, entry_size, entries_crc) = HEADER.unpack_from(header)
            if not HEADER.size <= header_size <= sector_size:
                raise GptError(f"{path}: GPT header size {header_size} is invalid")
            check = bytearray(header[:header_size])
            check[16:20] = b"\0\0\0\0"
            if zlib.crc32(check) != header_crc:
                raise GptError(f"{path}: GPT header CRC32 mismatch (header corrupt)")
            if my_lba != 1:
                raise GptError(f"{path}: GPT header claims to be at LBA {my_lba}, not 1")
            if not 128 <= entry_size <= 4096 or entry_size % 8 or entry_count > 65536:
                raise GptError(f"{path}: GPT entry array geometry is invalid ({entry_count} x {entry_size})")
            array_start, array_size = entries_lba * sector_size, entry_count * entry_size
            if entries_lba < 2 or array_start + array_size > disk_size:
                raise GptError(f"{path}: GPT entry array at LBA {entries_lba} ({array_size} bytes) lies outside "
                               f"the disk ({disk_size} bytes)")
            disk.seek(array_start)
            array = disk.read(array_size)
    except OSError as err:
        raise GptError(f"{path}: cannot read: {err.strerror or err}") from err
    if len(array) != array_size:
        raise GptError(f"{path}: GPT entry array is truncated")
    if zlib.crc32(array) != entries_crc:
        raise GptError(f"{path}: GPT partition entry array CRC32 mismatch (entries corrupt)")
    partitions = []
    for index in range(entry_count):
        raw = array[index * entry_size:(index + 1) * entry_size]
        if raw[:16] == bytes(16):
            continue
        first, last, attrs = struct.unpack_from("<QQQ", raw, 32)
        if not 1 <= first <= last or (last + 1) * sector_size > disk_size:
            raise GptError(f"{path}: GPT partition {index + 1} spans LBA {first}-{last}, outside the disk "
                           f"({disk_size // sector_size} sectors of {sector_size} bytes)")
        name = raw[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        partitions.append(Partition(index + 1, _guid(raw[:16]), _guid(raw[16:32]), name, first, last, attrs,
                                    sector_size))
    return GptDisk(path, sector_size, _guid(disk_guid), first_usable, last_usable, partitions)


EFIVARS_DIR = Path("/sys/firmware/efi/efivars")
LOADER_VENDOR = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


def loader_device_part_uuid(efivars: Path = EFIVARS_DIR) -> str | None:
    """The partition GUID systemd-boot booted from (``LoaderDevicePartUUID``), lower case, or None."""
    path = Path(efivars) / f"LoaderDevicePartUUID-{LOADER_VENDOR}"
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    # efivarfs prefixes the 4-byte attribute word; the value is a NUL-terminated UTF-16LE GUID string.
    text = raw[4:].decode("utf-16-le", "replace").split("\0", 1)[0].strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def find_boot_partition(disk: GptDisk, efivars: Path = EFIVARS_DIR) -> Partition | None:
    """$BOOT as blsforme finds it: XBOOTLDR if present, else the ESP the loader reported, else the first ESP."""
    xbootldr = next((p for p in disk.partitions if p.is_xbootldr), None)
    if xbootldr is not None:
        return xbootldr
    return find_esp(disk, efivars)


def find_esp(disk: GptDisk, efivars: Path = EFIVARS_DIR) -> Partition | None:
    loader = loader_device_part_uuid(efivars)
    if loader is not None:
        part = disk.by_part_guid(loader)
        if part is not None and part.is_esp:
            return part
    return next((p for p in disk.partitions if p.is_esp), None)
