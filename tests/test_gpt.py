"""GPT parsing agrees with sfdisk --json; corrupt headers and arrays are refused; ESP/XBOOTLDR discovery."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from reference_impl.boot.gpt import ESP_TYPE, XBOOTLDR_TYPE, GptError, find_boot_partition, find_esp, \
    loader_device_part_uuid, read_gpt, LOADER_VENDOR

pytestmark = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (util-linux fdisk) not installed")


def make_disk(path: Path, script: str, size: str = "64M") -> None:
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    subprocess.run(["sfdisk", "-q", str(path)], input=script.encode(), check=True)


def sfdisk_json(path: Path) -> dict:
    out = subprocess.run(["sfdisk", "--json", str(path)], check=True, capture_output=True).stdout
    return json.loads(out)["partitiontable"]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    ids = [str(uuid.uuid4()) for _ in range(3)]
    make_disk(img, f"""label: gpt
label-id: {uuid.uuid4()}
start=2048, size=20480, type=U, uuid={ids[0]}, name="EFI System"
start=22528, size=8192, type=BC13C2FF-59E6-4262-A352-B275FD6F7172, uuid={ids[1]}, name="boot ÿ"
start=30720, type=L, uuid={ids[2]}, name="root"
""")
    return img


def test_gpt_matches_sfdisk(disk: Path) -> None:
    gpt = read_gpt(disk)
    table = sfdisk_json(disk)
    assert gpt.disk_guid == table["id"].lower()
    assert gpt.first_usable_lba == table["firstlba"] and gpt.last_usable_lba == table["lastlba"]
    assert gpt.sector_size == table["sectorsize"]
    assert len(gpt.partitions) == len(table["partitions"]) == 3
    for part, ref in zip(gpt.partitions, table["partitions"]):
        assert ref["node"].endswith(str(part.number))
        assert part.first_lba == ref["start"]
        assert part.last_lba - part.first_lba + 1 == ref["size"]
        assert part.type_guid == ref["type"].lower()
        assert part.part_guid == ref["uuid"].lower()
        assert part.name == ref["name"]


def test_gaps_in_the_entry_array_keep_numbers(tmp_path: Path) -> None:
    img = tmp_path / "gap.img"
    make_disk(img, "label: gpt\nstart=2048, size=2048, type=L\nstart=8192, size=2048, type=U\n")
    subprocess.run(["sfdisk", "-q", "--delete", str(img), "1"], check=True)
    gpt = read_gpt(img)
    assert [p.number for p in gpt.partitions] == [2]
    assert [int(p["node"][len(str(img)):]) for p in sfdisk_json(img)["partitions"]] == [2]


def test_boot_partition_prefers_xbootldr_then_loader_efivar(disk: Path, tmp_path: Path) -> None:
    gpt = read_gpt(disk)
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    assert find_boot_partition(gpt, efivars).type_guid == XBOOTLDR_TYPE
    assert find_esp(gpt, efivars).type_guid == ESP_TYPE
    assert loader_device_part_uuid(efivars) is None


def test_loader_device_part_uuid_picks_that_esp(tmp_path: Path) -> None:
    img = tmp_path / "two-esp.img"
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    make_disk(img, f"label: gpt\nstart=2048, size=4096, type=U, uuid={first}\n"
                   f"start=8192, size=4096, type=U, uuid={second}\n")
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    gpt = read_gpt(img)
    assert find_esp(gpt, efivars).part_guid == first
    # efivarfs: 4 attribute bytes, then the value — systemd writes the GUID upper-case, UTF-16LE, NUL-terminated.
    value = (b"\x06\x00\x00\x00" + (second.upper() + "\0").encode("utf-16-le"))
    (efivars / f"LoaderDevicePartUUID-{LOADER_VENDOR}").write_bytes(value)
    assert loader_device_part_uuid(efivars) == second
    assert find_esp(gpt, efivars).part_guid == second


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("offset, message", [
    (512 + 40, "header CRC32"),            # first usable LBA inside the header
    (1024 + 56, "entry array CRC32"),      # first partition's name
    (510, "protective MBR"),
    (512, "no GPT header"),
])
def test_corruption_is_refused_with_the_reason(disk: Path, offset: int, message: str) -> None:
    _flip(disk, offset)
    with pytest.raises(GptError, match=message) as err:
        read_gpt(disk)
    assert str(disk) in str(err.value) and "\n" not in str(err.value)


def test_plain_filesystem_image_has_no_gpt(tmp_path: Path) -> None:
    img = tmp_path / "plain.img"
    img.write_bytes(bytes(1 << 20))
    with pytest.raises(GptError, match="no GPT header"):
        read_gpt(img)


def _gpt_with_edits(pristine: bytes, edits: list[tuple[int, int]], fix_crc: bool) -> bytes:
    """``pristine`` with bytes replaced; with ``fix_crc`` the header (and a 128-byte-entry array) CRCs are
    recomputed so that the checks behind them are reached."""
    import zlib
    data = bytearray(pristine)
    for offset, value in edits:
        data[offset] = value
    if fix_crc:
        size = int.from_bytes(data[512 + 12:512 + 16], "little")
        if 92 <= size <= 512:
            count = min(int.from_bytes(data[512 + 80:512 + 84], "little"), 128)
            esize = int.from_bytes(data[512 + 84:512 + 88], "little")
            if esize == 128:
                data[512 + 88:512 + 92] = zlib.crc32(bytes(data[1024:1024 + count * esize])).to_bytes(4, "little")
            data[512 + 16:512 + 20] = bytes(4)
            data[512 + 16:512 + 20] = zlib.crc32(bytes(data[512:512 + size])).to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize("edits, message", [
    ([(590, 64)], "entry array at LBA .* lies outside the disk"),        # entry-array LBA ~2^62 (issue 15)
    ([(519 + 72, 1)], "entry array at LBA .* lies outside the disk"),    # LBA 2^56: a seek past any size
    ([(512 + 72, 1)], "entry array at LBA 1 "),                          # overlapping the header itself
    ([(1024 + 32 + 7, 0x10)], "partition 1 spans LBA .* outside the disk"),   # first LBA 2^60
    ([(1024 + 40, 0), (1024 + 41, 0), (1024 + 42, 0)], "partition 1 spans LBA"),                         # last LBA < first LBA
])
def test_header_values_are_bounded_by_the_disk(disk: Path, tmp_path: Path, edits, message: str) -> None:
    target = tmp_path / "bad.img"
    target.write_bytes(_gpt_with_edits(disk.read_bytes(), edits, True))
    with pytest.raises(GptError, match=message) as err:
        read_gpt(target)
    assert str(target) in str(err.value) and "\n" not in str(err.value)


def test_partition_past_the_end_of_a_truncated_image_is_refused(disk: Path, tmp_path: Path) -> None:
    target = tmp_path / "short.img"
    target.write_bytes(disk.read_bytes()[:1 << 20])
    with pytest.raises(GptError, match="partition 1 spans"):
        read_gpt(target)


def test_corrupt_tables_raise_only_gpt_error(disk: Path, tmp_path: Path) -> None:
    from hypothesis import example, given, settings, strategies as st

    pristine = disk.read_bytes()[:64 * 1024]
    size = disk.stat().st_size
    target = tmp_path / "fuzz.img"

    @settings(max_examples=200, deadline=None)
    @example([(590, 64)], True)
    @given(st.lists(st.tuples(st.integers(0, 3 * 512 + 4 * 128), st.integers(0, 255)), min_size=1, max_size=8),
           st.booleans())
    def check(edits: list[tuple[int, int]], fix_crc: bool) -> None:
        target.write_bytes(_gpt_with_edits(pristine, edits, fix_crc))
        os.truncate(target, size)   # sparse: the partitions lie inside the file, as on the real disk
        try:
            gpt = read_gpt(target)
        except GptError as err:
            assert "\n" not in str(err)
        else:
            assert all(1 <= p.number <= 65536 and len(p.part_guid) == 36 for p in gpt.partitions)

    check()
