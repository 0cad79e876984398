"""Superblock probing against the real fixtures and fresh mkfs images (random UUIDs), checked with blkid."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import zstandard

from reference_impl.boot.device import root_argument, root_argument_for_spec
from stonelab.errors import StonelabError
from reference_impl.boot.superblock import probe
from stonelab.cli import main
from tests.conftest import shared_file

FIXTURES = {  # from ../shared/docs/moss-semantics.md (values blkid reports)
    "btrfs": ("btrfs", "829d6a03-96a5-4749-9ea2-dbb6e59368b2", "blsforme testing"),
    "ext4": ("ext4", "731af94c-9990-4eed-944d-5d230dbe8a0d", "blsforme testing"),
    "f2fs": ("f2fs", "d2c85810-4e75-4274-bc7d-a78267af7443", "blsforme testing"),
    "xfs": ("xfs", "45e8a3bf-8114-400f-95b0-380d0fb7d42d", "BLSFORME"),
    "fat16": ("vfat", "A1B2-C3D4", "TESTLABEL"),
    "fat32": ("vfat", "A1B2-C3D4", "TESTLABEL"),
}


def unpack(name: str, dest: Path) -> Path:
    src = shared_file("fixtures", "superblock", f"{name}.img.zst")
    out = dest / f"{name}.img"
    with open(src, "rb") as fin, open(out, "wb") as fout:
        zstandard.ZstdDecompressor().copy_stream(fin, fout)
    return out


def blkid(path: Path, offset: int = 0) -> dict[str, str]:
    cmd = ["blkid", "-p", "-o", "export"] + (["-O", str(offset)] if offset else []) + [str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values[key] = value.replace("\\ ", " ")
    return values


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (tools/debian-packages.txt)")


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_images(name: str, tmp_path: Path) -> None:
    img = unpack(name, tmp_path)
    info = probe(img)
    assert info is not None
    assert (info.type, info.uuid, info.label) == FIXTURES[name]
    if name.startswith("fat"):
        assert info.version == name.upper()
    if shutil.which("blkid"):
        ref = blkid(img)
        assert (info.type, info.uuid, info.label) == (ref["TYPE"], ref["UUID"], ref.get("LABEL", ""))


def _mkfs(kind: str, img: Path, fs_uuid: str, label: str) -> None:
    commands = {
        "ext4": ["mkfs.ext4", "-q", "-F", "-U", fs_uuid, "-L", label, str(img), "8M"],
        "btrfs": ["mkfs.btrfs", "-q", "-f", "-U", fs_uuid, "-L", label, str(img)],
        "xfs": ["mkfs.xfs", "-q", "-f", "-m", f"uuid={fs_uuid}", "-L", label, str(img)],
        "f2fs": ["mkfs.f2fs", "-q", "-f", "-U", fs_uuid, "-l", label, str(img)],
        "fat16": ["mkfs.vfat", "-F", "16", "-i", fs_uuid, "-n", label, str(img)],
        "fat32": ["mkfs.vfat", "-F", "32", "-i", fs_uuid, "-n", label, str(img)],
        "fat12": ["mkfs.vfat", "-F", "12", "-i", fs_uuid, "-n", label, str(img)],
    }
    subprocess.run(commands[kind], check=True, capture_output=True)


SIZES = {"ext4": "8M", "btrfs": "128M", "xfs": "320M", "f2fs": "64M", "fat16": "32M", "fat32": "64M", "fat12": "2M"}
TOOLS = {"ext4": "mkfs.ext4", "btrfs": "mkfs.btrfs", "xfs": "mkfs.xfs", "f2fs": "mkfs.f2fs", "fat16": "mkfs.vfat",
         "fat32": "mkfs.vfat", "fat12": "mkfs.vfat"}


@pytest.mark.parametrize("kind", sorted(SIZES))
def test_fresh_mkfs_images_agree_with_blkid(kind: str, tmp_path: Path) -> None:
    need(TOOLS[kind])
    need("blkid")
    img = tmp_path / f"{kind}.img"
    subprocess.run(["truncate", "-s", SIZES[kind], str(img)], check=True)
    if kind.startswith("fat"):
        fs_uuid = uuid.uuid4().hex[:8].upper()
        label = "L" + uuid.uuid4().hex[:6].upper()
    else:
        fs_uuid = str(uuid.uuid4())
        label = f"lab {uuid.uuid4().hex[:6]}"[:12]
    _mkfs(kind, img, fs_uuid, label)
    info = probe(img)
    ref = blkid(img)
    assert info is not None
    assert (info.type, info.uuid, info.label) == (ref["TYPE"], ref["UUID"], ref.get("LABEL", ""))
    expected_uuid = f"{fs_uuid[:4]}-{fs_uuid[4:]}" if kind.startswith("fat") else fs_uuid
    assert info.uuid == expected_uuid and info.label == label
    if kind.startswith("fat"):
        assert info.version == ref["VERSION"] == kind.upper()


@pytest.mark.parametrize("kind", sorted(SIZES))
def test_label_trailing_blanks_are_dropped_like_blkid(kind: str, tmp_path: Path) -> None:
    """util-linux#965: blkid's LABEL has no trailing blanks (LABEL_RAW keeps them); ours must equal LABEL."""
    need(TOOLS[kind])
    need("blkid")
    img = tmp_path / f"{kind}.img"
    subprocess.run(["truncate", "-s", SIZES[kind], str(img)], check=True)
    fs_uuid = uuid.uuid4().hex[:8].upper() if kind.startswith("fat") else str(uuid.uuid4())
    _mkfs(kind, img, fs_uuid, "DATA  " if kind.startswith("fat") else "da ta  ")
    info = probe(img)
    ref = blkid(img)
    assert info is not None and info.label == ("DATA" if kind.startswith("fat") else "da ta")
    assert info.label == ref["LABEL"]


def test_blank_only_label_is_no_label() -> None:
    from reference_impl.boot.superblock import probe_bytes
    buf = bytearray(0x800)
    buf[0x438:0x43A] = (0xEF53).to_bytes(2, "little")
    buf[0x478:0x488] = b" \t  ".ljust(16, b"\0")
    info = probe_bytes(bytes(buf))
    assert info is not None and info.type == "ext2" and info.label == ""


def test_luks2_header_from_cryptsetup(tmp_path: Path) -> None:
    need("cryptsetup")
    img = tmp_path / "luks.img"
    key = tmp_path / "key"
    key.write_bytes(b"not a secret")
    subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
    luks_uuid = str(uuid.uuid4())
    proc = subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", "-q", "--key-file", str(key),
                           "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--uuid", luks_uuid,
                           "--label", "cryptroot", str(img)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cryptsetup luksFormat on a file failed here: {proc.stderr.strip()}")
    info = probe(img)
    assert info is not None
    assert (info.type, info.uuid, info.label, info.version) == ("crypto_LUKS", luks_uuid, "cryptroot", "2")
    if shutil.which("blkid"):
        ref = blkid(img)
        assert (ref["TYPE"], ref["UUID"]) == (info.type, info.uuid)
    assert root_argument(info, None) == f"rd.luks.uuid={luks_uuid}"


def test_unknown_and_empty_are_none(tmp_path: Path) -> None:
    img = tmp_path / "zero.img"
    img.write_bytes(bytes(1 << 17))
    assert probe(img) is None
    img.write_bytes(b"\xeb\x3c\x90" + bytes(507) + b"\x55\xaa" + bytes(1 << 16))  # boot signature, no BPB
    assert probe(img) is None


@pytest.fixture
def gpt_disk(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A GPT disk: ESP (FAT32), ext4 root, btrfs — filesystems made inside the partitions, no loop devices."""
    for tool in ("sfdisk", "mkfs.vfat", "mkfs.ext4", "mkfs.btrfs"):
        need(tool)
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "300M", str(img)], check=True)
    subprocess.run(["sfdisk", "-q", str(img)], check=True, input=(
        "label: gpt\nstart=2048, size=133120, type=U, name=esp\n"
        "start=135168, size=16384, type=L, name=root\nstart=151552, type=L, name=home\n").encode())
    ids = {"fat": uuid.uuid4().hex[:8].upper(), "ext4": str(uuid.uuid4()), "btrfs": str(uuid.uuid4())}
    subprocess.run(["mkfs.vfat", "-F", "32", "-i", ids["fat"], "-n", "ESP", "--offset", "2048", str(img),
                    str(133120 // 2)], check=True, capture_output=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", ids["ext4"], "-L", "root", "-E", f"offset={135168 * 512}",
                    str(img), "8M"], check=True, capture_output=True)
    # mkfs.btrfs has no offset option: make it in a file and splice it in.
    part = tmp_path / "btrfs.part"
    subprocess.run(["truncate", "-s", f"{(614400 - 151552 - 33) * 512 // 4096 * 4096}", str(part)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", "-f", "-U", ids["btrfs"], "-L", "home", str(part)], check=True)
    subprocess.run(["dd", f"if={part}", f"of={img}", "bs=512", f"seek={151552}", "conv=notrunc,sparse",
                    "status=none"], check=True)
    return img, ids


def test_probe_gpt_disk_json(gpt_disk: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    img, ids = gpt_disk
    assert main(["boot", "probe", "--json", str(img)]) == 0
    rows = json.loads(capsys.readouterr().out)["partitions"]
    table = json.loads(subprocess.run(["sfdisk", "--json", str(img)], capture_output=True, check=True).stdout)
    guids = [p["uuid"].lower() for p in table["partitiontable"]["partitions"]]
    assert [r["number"] for r in rows] == [1, 2, 3]
    assert [r["part_guid"] for r in rows] == guids
    assert [r["name"] for r in rows] == ["esp", "root", "home"]
    assert [r["fstype"] for r in rows] == ["vfat", "ext4", "btrfs"]
    assert rows[0]["uuid"] == f"{ids['fat'][:4]}-{ids['fat'][4:]}" and rows[0]["label"] == "ESP"
    assert rows[1]["uuid"] == ids["ext4"] and rows[1]["label"] == "root"
    assert rows[2]["uuid"] == ids["btrfs"] and rows[2]["label"] == "home"
    assert rows[1]["root"] == f"root=PARTUUID={guids[1]}"
    assert rows[0]["root"] == f"root=PARTUUID={guids[0]}"
    assert rows[2]["root"] == f"root=UUID={ids['btrfs']} rootflags=subvol=/"
    for row, part in zip(rows, table["partitiontable"]["partitions"]):
        ref = blkid(img, part["start"] * 512)
        assert (row["fstype"], row["uuid"], row["label"]) == (ref["TYPE"], ref["UUID"], ref.get("LABEL", ""))
    assert root_argument_for_spec(f"{img}:2") == f"root=PARTUUID={guids[1]}"
    assert root_argument_for_spec(f"{img}:3", "/@root") == f"root=UUID={ids['btrfs']} rootflags=subvol=/@root"


def test_probe_text_output_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = unpack("ext4", tmp_path)
    assert main(["boot", "probe", str(img)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == ('fstype=ext4 uuid=731af94c-9990-4eed-944d-5d230dbe8a0d label="blsforme testing" '
                           'version=1.0 root=root=UUID=731af94c-9990-4eed-944d-5d230dbe8a0d')
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(4096))
    assert main(["boot", "probe", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"stonelab: error: {junk}: no known filesystem superblock and no GPT"
    assert main(["boot", "probe", str(tmp_path / "absent")]) == 2


def test_probe_never_crashes_on_garbage() -> None:
    from hypothesis import given, settings, strategies as st

    from reference_impl.boot.superblock import probe_bytes

    magics = [(0, b"XFSB"), (0, b"LUKS\xba\xbe\x00\x02"), (0x438, b"\x53\xef"), (0x10040, b"_BHRfS_M"),
              (0x400, b"\x10\x20\xf5\xf2"), (0x1FE, b"\x55\xaa"), (0, b"\xeb\x3c\x90")]

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 0x11000), st.sampled_from(magics), st.binary(max_size=64), st.integers(0, 0x11000))
    def check(length: int, magic: tuple[int, bytes], noise: bytes, where: int) -> None:
        buf = bytearray(length)
        at, value = magic
        buf[at:at + len(value)] = value
        buf[where:where + len(noise)] = noise
        info = probe_bytes(bytes(buf[:length]))
        assert info is None or isinstance(info.uuid, str)

    check()


@pytest.mark.parametrize("fat", ["12", "16", "32"])
def test_fat_root_directory_label_wins_like_blkid(fat: str, tmp_path: Path) -> None:
    need("mkfs.vfat")
    need("blkid")
    img = tmp_path / "fat.img"
    subprocess.run(["truncate", "-s", {"12": "2M", "16": "16M", "32": "40M"}[fat], str(img)], check=True)
    subprocess.run(["mkfs.vfat", "-F", fat, "-n", "ROOTDIRLBL", str(img)], check=True, capture_output=True)
    label_at = 0x47 if fat == "32" else 0x2B
    with open(img, "r+b") as f:   # a stale copy in the boot sector, as after a relabel by some tools
        f.seek(label_at)
        f.write(b"BOOTSECTOR ")
    info = probe(img)
    ref = blkid(img)
    assert ref["LABEL"] == "ROOTDIRLBL" and ref.get("LABEL_FATBOOT") == "BOOTSECTOR"
    assert info is not None and info.label == "ROOTDIRLBL"


@pytest.mark.parametrize("fat32_size, root_cluster", [(0xFFFFFFFF, 2), (1, 0xFFFFFFFF), (1, 0), (1, 1)])
def test_fat_root_directory_outside_the_image_keeps_the_boot_sector_label(tmp_path: Path, fat32_size: int,
                                                                          root_cluster: int) -> None:
    """A FAT32 boot sector whose FAT size or root cluster points past the end of the file (or before the data
    area) is not followed: the boot sector's label is reported, nothing raises."""
    import struct
    boot = bytearray(4096)
    boot[0:3] = b"\xeb\x58\x90"
    struct.pack_into("<HBHBHHBH", boot, 0x0B, 512, 8, 32, 2, 0, 0, 0xF8, 0)
    struct.pack_into("<II", boot, 0x20, 65536, fat32_size)
    struct.pack_into("<I", boot, 0x2C, root_cluster)
    struct.pack_into("<I", boot, 0x43, 0x12345678)
    boot[0x47:0x52] = b"BOOTLBL    "
    boot[0x1FE:0x200] = b"\x55\xaa"
    img = tmp_path / "fat.img"
    img.write_bytes(bytes(boot))
    info = probe(img)
    assert info is not None and (info.type, info.uuid, info.label) == ("vfat", "1234-5678", "BOOTLBL")


def blkid_label(path: Path) -> str:
    """blkid's LABEL exactly (udev output's ID_FS_LABEL_ENC: \\xNN escapes, no shell quoting to undo)."""
    out = subprocess.run(["blkid", "-p", "-o", "udev", str(path)], capture_output=True, text=True, check=True).stdout
    enc = next((line.split("=", 1)[1] for line in out.splitlines() if line.startswith("ID_FS_LABEL_ENC=")), "")
    return re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), enc.encode()).decode()


@pytest.mark.parametrize("kind", sorted(k for k in SIZES if not k.startswith("fat")))
@pytest.mark.parametrize("label", ["  lead  in ", "\u00fcn\u00ef \u00e9 "])
def test_leading_inner_blanks_and_utf8_labels_as_blkid(kind: str, label: str, tmp_path: Path) -> None:
    """Only trailing blanks go (leading and inner ones stay), UTF-8 as blkid decodes it (f2fs stores UTF-16)."""
    need(TOOLS[kind])
    need("blkid")
    img = tmp_path / f"{kind}.img"
    subprocess.run(["truncate", "-s", SIZES[kind], str(img)], check=True)
    _mkfs(kind, img, str(uuid.uuid4()), label)
    info = probe(img)
    assert info is not None and info.label == label.rstrip() == blkid_label(img)


def test_root_device_spec_names_a_btrfs_subvolume(tmp_path: Path) -> None:
    """``--root-device IMG[:N]:subvol=PATH``: a btrfs root in an image or partition with its subvolume (nested,
    with a blank); a subvolume for ext4 is refused rather than dropped."""
    need("mkfs.btrfs")
    img = tmp_path / "btrfs.img"
    subprocess.run(["truncate", "-s", SIZES["btrfs"], str(img)], check=True)
    fs_uuid = str(uuid.uuid4())
    _mkfs("btrfs", img, fs_uuid, "r")
    assert root_argument_for_spec(f"{img}:subvol=/@/nested") == f"root=UUID={fs_uuid} rootflags=subvol=/@/nested"
    assert root_argument_for_spec(f"{img}:subvol=/my root") == f'root=UUID={fs_uuid} rootflags="subvol=/my root"'
    assert root_argument_for_spec(str(img)) == f"root=UUID={fs_uuid} rootflags=subvol=/"
    ext4 = tmp_path / "ext4.img"
    subprocess.run(["truncate", "-s", SIZES["ext4"], str(ext4)], check=True)
    _mkfs("ext4", ext4, str(uuid.uuid4()), "r")
    with pytest.raises(StonelabError, match="subvol=/@ given, but the filesystem is ext4"):
        root_argument_for_spec(f"{ext4}:subvol=/@")
