"""`boot sync|status` on GPT disk images through mtools (no loop mounts): goldens, stale cleanup, crash order."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from reference_impl.boot import DirectoryEsp, EspFullError, EspMissingError, EspNotFatError, MtoolsEsp, \
    boot_status, sync_boot
from reference_impl.boot.esp import TMP_SUFFIX
from reference_impl.boot.gpt import read_gpt
from reference_impl.boot.ownership import record_path
from stonelab.cli import main
from tests.test_boot_helpers import ESP_START, add_state_rows, crash_mid_sync, drop_state, esp_listing, esp_read, \
    make_disk, make_root, make_tree

ROOT_ARG = "root=PARTUUID=00000000-0000-4000-8000-000000000001"


def root_guid(disk: Path) -> str:
    return read_gpt(disk).partition(2).part_guid


GOLDEN_ENTRY = """\
title AerynOS 2026.11 (6.6.1)
linux /EFI/aerynos/6.6.1/vmlinuz
initrd /EFI/aerynos/6.6.1/10-default.initrd
options root=PARTUUID={guid} rw quiet splash moss.fstx=3
"""


def test_entry_golden_and_layout(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1", 2: "6.6.1"}, active=2)
    make_tree(root / ".moss" / "root" / "3" / "usr", 3, "6.6.1", cmdline="quiet  splash")
    add_state_rows(root, [3])
    (root / ".moss" / "root" / "3" / "usr" / "lib" / "kernel" / "6.6.1" / "vmlinuz").write_bytes(
        (root / "usr" / "lib" / "kernel" / "6.6.1" / "vmlinuz").read_bytes())
    disk = make_disk(tmp_path / "disk.img")
    report = sync_boot(root, esp=disk, root_device=f"{disk}:2", bootloader=bootloader, target=3)
    guid = root_guid(disk)
    assert esp_read(disk, "loader/entries/aerynos-6.6.1-3.conf").decode() == GOLDEN_ENTRY.format(guid=guid)
    assert b"\n\n" not in esp_read(disk, "loader/entries/aerynos-6.6.1-1.conf")   # blsforme #71
    assert esp_read(disk, "loader/loader.conf") == b"default aerynos-6.6.1-3.conf\ntimeout 3\n"
    assert report.default_entry == "aerynos-6.6.1-3.conf"
    record = record_path(f"root=PARTUUID={guid}")
    assert esp_listing(disk) == sorted([
        "EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi",
        "EFI/aerynos/6.6.1/vmlinuz", "EFI/aerynos/6.6.1/10-default.initrd",
        "loader/loader.conf", "loader/entries/aerynos-6.6.1-1.conf", "loader/entries/aerynos-6.6.1-2.conf",
        "loader/entries/aerynos-6.6.1-3.conf", record])
    assert esp_read(disk, record).decode().splitlines()[1:] == ["EFI/aerynos/6.6.1/10-default.initrd",
                                                                "EFI/aerynos/6.6.1/vmlinuz"]
    assert esp_read(disk, "EFI/BOOT/BOOTX64.EFI") == bootloader.read_bytes()
    assert esp_read(disk, "EFI/aerynos/6.6.1/vmlinuz") == (root / "usr/lib/kernel/6.6.1/vmlinuz").read_bytes()
    # A second run changes nothing.
    again = sync_boot(root, esp=disk, root_device=f"{disk}:2", bootloader=bootloader, target=3)
    assert again.written == [] and again.removed == []


def test_newest_five_states_with_trees_and_stale_cleanup(tmp_path: Path, bootloader: Path) -> None:
    kernels = {i: f"6.{i}.0" for i in range(1, 8)}
    root = make_root(tmp_path / "root", kernels, active=7)
    disk = make_disk(tmp_path / "disk.img")
    # Entries that are not ours: another installation's (other root=) and a hand-written one.
    esp = MtoolsEsp(disk, ESP_START * 512)
    foreign = ("title other\nlinux /EFI/aerynos/6.1.0/vmlinuz\n"
               "options root=PARTUUID=99999999-0000-4000-8000-000000000009 rw moss.fstx=1\n").encode()
    esp.write_atomic("loader/entries/otheros-6.1.0-1.conf", foreign)
    esp.write_atomic("loader/entries/memtest.conf", b"title memtest\nefi /memtest.efi\n")
    report = sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    assert report.entries == [f"aerynos-6.{i}.0-{i}.conf" for i in (7, 6, 5, 4, 3)]
    listing = esp_listing(disk)
    assert not any("6.2.0" in p for p in listing)
    assert "loader/entries/aerynos-6.1.0-1.conf" not in listing
    assert "EFI/aerynos/6.1.0/vmlinuz" not in listing    # the other installation's entry names a file it lacks
    # Prune 6 and 4 (rows and trees), and lose 5's tree only: 5 is skipped, 2 and 1 come in.
    drop_state(root, 6)
    drop_state(root, 4)
    shutil.rmtree(root / ".moss" / "root" / "5")
    report = sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    assert report.entries == [f"aerynos-6.{i}.0-{i}.conf" for i in (7, 3, 2, 1)]
    assert report.states_without_tree == [5]
    assert any("state 5" in note for note in report.notes)
    listing = esp_listing(disk)
    entries = sorted(p for p in listing if p.startswith("loader/entries/"))
    assert entries == sorted([f"loader/entries/{name}" for name in report.entries]
                             + ["loader/entries/otheros-6.1.0-1.conf", "loader/entries/memtest.conf"])
    assert esp_read(disk, "loader/entries/otheros-6.1.0-1.conf") == foreign
    kernel_dirs = sorted({p.split("/")[2] for p in listing if p.startswith("EFI/aerynos/")})
    assert kernel_dirs == ["6.1.0", "6.2.0", "6.3.0", "6.7.0"]
    assert not any(p.endswith(TMP_SUFFIX) for p in listing)
    esp.remove("loader/entries/otheros-6.1.0-1.conf")
    esp.remove("loader/entries/memtest.conf")
    status = boot_status(root, esp=disk)
    assert status.problems == [] and status.active_state == 7


def test_symlink_swap_layout_and_same_version_different_kernels(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1", 2: "6.6.1"}, active=2, symlink=True)
    (root / ".moss/root/1/usr/lib/kernel/6.6.1/vmlinuz").write_bytes(b"an older build of 6.6.1" * 10)
    disk = make_disk(tmp_path / "disk.img")
    sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    new = esp_read(disk, "loader/entries/aerynos-6.6.1-2.conf").decode()
    old = esp_read(disk, "loader/entries/aerynos-6.6.1-1.conf").decode()
    assert "linux /EFI/aerynos/6.6.1/vmlinuz\n" in new
    old_kernel = old.split("linux /", 1)[1].split("\n", 1)[0]
    assert old_kernel.startswith("EFI/aerynos/6.6.1-") and old_kernel.endswith("/vmlinuz")
    assert esp_read(disk, old_kernel) == b"an older build of 6.6.1" * 10
    assert esp_read(disk, "EFI/aerynos/6.6.1/vmlinuz") == (root / "usr/lib/kernel/6.6.1/vmlinuz").read_bytes()


def test_full_esp_is_a_clear_error_and_old_entries_stay(tmp_path: Path, bootloader: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1"}, active=1, kernel_size=200_000)
    disk = make_disk(tmp_path / "disk.img", esp_sectors=2048)      # a 1 MiB ESP
    sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    before = {p: esp_read(disk, p) for p in esp_listing(disk)}
    # State 2 brings a kernel that cannot fit next to the one state 1 still needs.
    make_tree(root / ".moss/root/2/usr", 2, "6.7.0", kernel_size=900_000)
    add_state_rows(root, [2])
    with pytest.raises(EspFullError) as err:
        sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader, target=2)
    message = str(err.value)
    assert "\n" not in message and "full" in message and str(disk) in message
    assert {p: esp_read(disk, p) for p in esp_listing(disk)} == before
    status = boot_status(root, esp=disk)
    assert all(not e.missing_files for e in status.entries)
    # Through the CLI: one line, exit status 2, nothing changed.
    code = main(["boot", "sync", "-D", str(root), "--esp", str(disk), "--root-device", f"{disk}:2",
                 "--state", "2"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("stonelab: error: ESP ")
    assert {p: esp_read(disk, p) for p in esp_listing(disk)} == before


def test_stale_kernels_make_room_before_new_ones_are_copied(tmp_path: Path, bootloader: Path) -> None:
    """moss #866: upstream copies new kernels before removing old ones, so a nearly full ESP fails."""
    root = make_root(tmp_path / "root", {1: "6.6.1"}, active=1, kernel_size=550_000)
    disk = make_disk(tmp_path / "disk.img", esp_sectors=2048)      # a 1 MiB ESP: one kernel fits, not two
    sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    # State 2 activated (its tree is /usr now) and state 1 pruned.
    shutil.rmtree(root / "usr")
    make_tree(root / "usr", 2, "6.7.0", kernel_size=550_000)
    add_state_rows(root, [2])
    (root / ".moss/root/1/usr").mkdir(parents=True)
    drop_state(root, 1)
    report = sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader, target=2)
    assert report.entries == ["aerynos-6.7.0-2.conf"]
    assert [p for p in esp_listing(disk) if p.startswith("EFI/aerynos/")] == [
        "EFI/aerynos/6.7.0/10-default.initrd", "EFI/aerynos/6.7.0/vmlinuz"]
    assert report.removed.index("loader/entries/aerynos-6.6.1-1.conf") < report.removed.index(
        "EFI/aerynos/6.6.1/vmlinuz")


def test_enospc_during_a_copy_leaves_no_temp_file(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.img", esp_sectors=2048)
    esp = MtoolsEsp(disk, ESP_START * 512)
    esp.write_atomic("loader/entries/keep.conf", b"title keep\n")
    big = tmp_path / "big"
    big.write_bytes(bytes(3 << 20))
    with pytest.raises(EspFullError, match="full, cannot write EFI/x/vmlinuz"):
        esp.write_atomic("EFI/x/vmlinuz", big)
    assert "loader/entries/keep.conf" in esp.list_files()
    assert not any(p.endswith(TMP_SUFFIX) or p.endswith("vmlinuz") for p in esp.list_files())


def test_fault_between_kernels_and_entries_keeps_old_entries(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1"}, active=1)
    disk = make_disk(tmp_path / "disk.img")
    crash_mid_sync(root, disk, ROOT_ARG, bootloader, "6.7.0")
    listing = esp_listing(disk)
    assert "EFI/aerynos/6.7.0/vmlinuz" in listing                  # kernels are on the ESP ...
    assert "loader/entries/aerynos-6.7.0-2.conf" not in listing     # ... but no entry names them yet
    assert esp_read(disk, "loader/loader.conf") == b"default aerynos-6.6.1-1.conf\ntimeout 3\n"
    assert all(not e.missing_files for e in boot_status(root, esp=disk).entries)
    report = sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader, target=2)
    assert report.default_entry == "aerynos-6.7.0-2.conf"


def test_status_catches_a_seeded_broken_entry(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1", 2: "6.7.0"}, active=2)
    disk = make_disk(tmp_path / "disk.img")
    sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    assert main(["boot", "status", "-D", str(root), "--esp", str(disk)]) == 0
    # Seeded bug: a kernel removed behind the entry's back, and a state pruned without a boot sync (#585).
    MtoolsEsp(disk, ESP_START * 512).remove("EFI/aerynos/6.6.1/vmlinuz")
    drop_state(root, 1)
    problems = boot_status(root, esp=disk).problems
    assert any("aerynos-6.6.1-1.conf: references missing EFI/aerynos/6.6.1/vmlinuz" in p for p in problems)
    assert any("state 1 has no tree" in p for p in problems)
    assert main(["boot", "status", "-D", str(root), "--esp", str(disk)]) == 1


@pytest.mark.parametrize("damage, error, text", [
    ("retype", EspMissingError, "no ESP or XBOOTLDR partition"),
    ("wipe", EspNotFatError, "unformatted"),
    ("ext4", EspNotFatError, "holds ext4"),
])
def test_lost_esp_is_never_silent_and_rebuild_repopulates(tmp_path: Path, bootloader: Path, damage: str,
                                                         error: type, text: str) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1", 2: "6.7.0"}, active=2)
    disk = make_disk(tmp_path / "disk.img")
    sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    if damage == "retype":
        subprocess.run(["sfdisk", "-q", "--part-type", str(disk), "1", "L"], check=True)
    elif damage == "wipe":
        with open(disk, "r+b") as f:
            f.seek(ESP_START * 512)
            f.write(bytes(1 << 20))
    else:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={ESP_START * 512}", str(disk), "4M"], check=True,
                       capture_output=True)
    with pytest.raises(error, match=text):
        sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    code = main(["boot", "sync", "-D", str(root), "--esp", str(disk), "--root-device", f"{disk}:2"])
    assert code == 2
    if damage == "retype":
        return
    report = sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader, rebuild=True)
    assert report.formatted
    assert sorted(p for p in esp_listing(disk) if p.startswith("loader/entries/")) == [
        "loader/entries/aerynos-6.6.1-1.conf", "loader/entries/aerynos-6.7.0-2.conf"]
    assert boot_status(root, esp=disk).problems == []


def test_directory_esp_must_be_vfat(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1"}, active=1)
    esp_dir = tmp_path / "esp"
    esp_dir.mkdir()
    with pytest.raises(EspNotFatError, match="not a mounted vfat ESP"):
        sync_boot(root, esp=esp_dir, root_arg=ROOT_ARG, bootloader=bootloader)
    report = sync_boot(root, esp=DirectoryEsp(esp_dir, require_vfat=False), root_arg=ROOT_ARG,
                       bootloader=bootloader)
    assert (esp_dir / "loader/entries/aerynos-6.6.1-1.conf").read_text().endswith(f"{ROOT_ARG} rw moss.fstx=1\n")
    assert report.default_entry == "aerynos-6.6.1-1.conf"
    assert not list(esp_dir.rglob(f"*{TMP_SUFFIX}"))


def test_cli_sync_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1"}, active=1)
    disk = make_disk(tmp_path / "disk.img", esp_sectors=4096)
    assert main(["boot", "sync", "--json", "-D", str(root), "--esp", f"{disk}:1", "--root-device", f"{disk}:2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["entries"] == ["aerynos-6.6.1-1.conf"]
    entry = esp_read(disk, "loader/entries/aerynos-6.6.1-1.conf").decode()
    assert f"options root=PARTUUID={root_guid(disk)} rw moss.fstx=1\n" in entry


def test_xbootldr_gets_kernels_and_entries_esp_gets_the_bootloader(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1"}, active=1)
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "16M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], check=True, input=(
        "label: gpt\nstart=2048, size=4096, type=U\n"
        "start=6144, size=8192, type=BC13C2FF-59E6-4262-A352-B275FD6F7172\nstart=14336, type=L\n").encode())
    for start, size in ((2048, 4096), (6144, 8192)):
        subprocess.run(["mkfs.vfat", "--offset", str(start), str(disk), str(size // 2)], check=True,
                       capture_output=True)
    sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    esp, xbootldr = MtoolsEsp(disk, 2048 * 512), MtoolsEsp(disk, 6144 * 512)
    assert esp.list_files() == ["EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi"]
    assert xbootldr.list_files() == sorted(["EFI/aerynos/6.6.1/10-default.initrd", "EFI/aerynos/6.6.1/vmlinuz",
                                            "loader/entries/aerynos-6.6.1-1.conf", "loader/loader.conf",
                                            record_path(ROOT_ARG)])
    again = sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    assert again.written == [] and again.removed == []
    assert boot_status(root, esp=disk).problems == []
    esp.remove("EFI/BOOT/BOOTX64.EFI")
    assert boot_status(root, esp=disk).problems == [
        "no EFI/BOOT/BOOTX64.EFI on the ESP: the firmware finds no bootloader"]


def test_files_another_entry_references_survive_cleanup(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.6.1", 2: "6.7.0"}, active=2)
    disk = make_disk(tmp_path / "disk.img")
    sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    esp = MtoolsEsp(disk, ESP_START * 512)
    other = ("title twin install\nlinux /EFI/aerynos/6.6.1/vmlinuz\n"
             "options root=PARTUUID=99999999-0000-4000-8000-000000000009 rw moss.fstx=1\n").encode()
    esp.write_atomic("loader/entries/aerynos-6.6.1-1-twin.conf", other)
    drop_state(root, 1)
    report = sync_boot(root, esp=disk, root_arg=ROOT_ARG, bootloader=bootloader)
    assert "loader/entries/aerynos-6.6.1-1.conf" in report.removed
    assert "EFI/aerynos/6.6.1/10-default.initrd" in report.removed
    listing = esp_listing(disk)
    assert "EFI/aerynos/6.6.1/vmlinuz" in listing and "loader/entries/aerynos-6.6.1-1-twin.conf" in listing
