"""Boot sync touches only what this installation owns: foreign files in its own EFI/<os-id>/ directory, another
installation sharing the ESP (same os-release, same kernel version), entry tokens, loader.conf's other lines."""
from __future__ import annotations

from pathlib import Path

import pytest

from reference_impl.boot import MtoolsEsp, boot_status, sync_boot
from reference_impl.boot.ownership import (EntryToken, choose_token, configured_token, installation_id, is_ours,
                                           record_path)
from stonelab.cli import main
from stonelab.errors import StonelabError
from tests.test_boot_helpers import ESP_START, crash_mid_sync, drop_state, esp_listing, esp_read, make_disk, \
    make_root

ROOT_A = "root=PARTUUID=00000000-0000-4000-8000-00000000000a"
ROOT_B = "root=PARTUUID=00000000-0000-4000-8000-00000000000b"


def test_firmware_updater_files_in_the_os_directory_survive_sync_and_cleanup(tmp_path: Path,
                                                                             bootloader: Path) -> None:
    """NixOS/nixpkgs#47640: fwupd keeps EFI/<os-id>/fwupdx64.efi and EFI/<os-id>/fw/ — and a stray file in a
    kernel directory of ours is not ours either."""
    root = make_root(tmp_path / "root", {1: "6.8.0", 2: "6.9.0"}, active=2)
    disk = make_disk(tmp_path / "disk.img")
    esp = MtoolsEsp(disk, ESP_START * 512)
    foreign = {"EFI/aerynos/fwupdx64.efi": b"MZ fwupd", "EFI/aerynos/fw/fwupd-capsule.cap": b"capsule",
               "EFI/aerynos/6.8.0/notes.txt": b"not ours"}
    for path, data in foreign.items():
        esp.write_atomic(path, data)
    first = sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert first.entries == ["aerynos-6.9.0-2.conf", "aerynos-6.8.0-1.conf"] and first.removed == []
    for path, data in foreign.items():
        assert esp_read(disk, path) == data, path
    drop_state(root, 1)
    report = sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert sorted(report.removed) == ["EFI/aerynos/6.8.0/10-default.initrd", "EFI/aerynos/6.8.0/vmlinuz",
                                      "loader/entries/aerynos-6.8.0-1.conf"]
    for path, data in foreign.items():
        assert esp_read(disk, path) == data, path


def test_a_foreign_file_at_a_kernel_path_is_not_overwritten(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.8.0"}, active=1)
    disk = make_disk(tmp_path / "disk.img")
    esp = MtoolsEsp(disk, ESP_START * 512)
    esp.write_atomic("EFI/aerynos/6.8.0/vmlinuz", b"someone else's kernel")
    report = sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert esp_read(disk, "EFI/aerynos/6.8.0/vmlinuz") == b"someone else's kernel"
    entry = esp_read(disk, "loader/entries/aerynos-6.8.0-1.conf").decode()
    linux = next(line.split()[1] for line in entry.splitlines() if line.startswith("linux "))
    assert linux.startswith("/EFI/aerynos/6.8.0-") and esp_read(disk, linux[1:]) == (
        root / "usr/lib/kernel/6.8.0/vmlinuz").read_bytes()
    assert report.default_entry == "aerynos-6.8.0-1.conf"


def test_two_installations_share_an_esp(tmp_path: Path, bootloader: Path) -> None:
    """Two roots, the same os-release, the same kernel version with different content: separate entries and
    kernel files; each sync (and cleanup) leaves the other's alone; status tells them apart."""
    a = make_root(tmp_path / "a", {1: "6.8.0"}, active=1)
    b = make_root(tmp_path / "b", {1: "6.8.0", 2: "6.9.0"}, active=2)
    (b / ".moss/root/1/usr/lib/kernel/6.8.0/vmlinuz").write_bytes(b"kernel of B " * 300)
    disk = make_disk(tmp_path / "disk.img", esp_sectors=16384)
    first_a = sync_boot(a, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    first_b = sync_boot(b, esp=disk, root_arg=ROOT_B, bootloader=bootloader)
    b_token = f"aerynos-{installation_id(ROOT_B)[:8]}"
    assert (first_a.entry_token, first_b.entry_token) == ("aerynos", b_token)
    assert first_b.entries == [f"{b_token}-6.9.0-2.conf", f"{b_token}-6.8.0-1.conf"] and first_b.removed == []
    assert esp_read(disk, "EFI/aerynos/6.8.0/vmlinuz") == (a / "usr/lib/kernel/6.8.0/vmlinuz").read_bytes()
    assert esp_read(disk, f"EFI/{b_token}/6.8.0/vmlinuz") == b"kernel of B " * 300
    assert is_ours(esp_read(disk, "loader/entries/aerynos-6.8.0-1.conf").decode(), ROOT_A)
    assert is_ours(esp_read(disk, f"loader/entries/{b_token}-6.8.0-1.conf").decode(), ROOT_B)
    # A again: nothing to do, B's files untouched; the tokens are stable.
    again = sync_boot(a, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert (again.written, again.removed, again.entry_token) == (["loader/loader.conf"], [], "aerynos")
    # B prunes its first state: only B's old files go.
    drop_state(b, 1)
    cleanup = sync_boot(b, esp=disk, root_arg=ROOT_B, bootloader=bootloader)
    assert sorted(cleanup.removed) == sorted([f"loader/entries/{b_token}-6.8.0-1.conf",
                                              f"EFI/{b_token}/6.8.0/vmlinuz", f"EFI/{b_token}/6.8.0/10-default.initrd"])
    listing = esp_listing(disk)
    assert {"EFI/aerynos/6.8.0/vmlinuz", "loader/entries/aerynos-6.8.0-1.conf", record_path(ROOT_A)} <= set(listing)
    status = boot_status(a, esp=disk)      # the root= of A's last sync is remembered in A's .moss/boot-root
    assert status.root == ROOT_A
    assert {e.name: e.owner for e in status.entries} == {f"{b_token}-6.9.0-2.conf": "other",
                                                         "aerynos-6.8.0-1.conf": "this"}
    assert status.other_installations == [
        f"entry {b_token}-6.9.0-2.conf boots {ROOT_B}, not this installation's root ({ROOT_A}): "
        "another installation's, left alone"]
    assert status.problems == [f"default entry {b_token}-6.9.0-2.conf does not boot the active state 1"]


def test_status_reports_an_entry_with_another_root_through_the_cli(tmp_path: Path, bootloader: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "root", {1: "6.8.0"}, active=1)
    disk = make_disk(tmp_path / "disk.img")
    sync_boot(root, esp=disk, root_device=f"{disk}:2", bootloader=bootloader)
    esp = MtoolsEsp(disk, ESP_START * 512)
    esp.write_atomic("loader/entries/aerynos-6.8.0-9.conf",
                     f"title moved\nlinux /EFI/aerynos/6.8.0/vmlinuz\noptions {ROOT_B} rw moss.fstx=9\n".encode())
    assert main(["boot", "status", "-D", str(root), "--esp", str(disk), "--root-device", f"{disk}:2"]) == 0
    out = capsys.readouterr().out
    assert main(["boot", "status", "-D", str(root), "--esp", str(disk)]) == 0      # the root of the last sync
    assert capsys.readouterr().out == out
    assert f"aerynos-6.8.0-9.conf  another installation  {ROOT_B}" in out
    assert f"other installation: entry aerynos-6.8.0-9.conf boots {ROOT_B}, not this installation's root" in out


def test_kernel_files_copied_before_a_crash_are_owned_and_cleaned_later(tmp_path: Path, bootloader: Path) -> None:
    """The ownership record lists a file before it is first copied: after a crash between the kernels and the
    entries, and that state's removal, the next sync still knows the files are its own."""
    root = make_root(tmp_path / "root", {1: "6.8.0"}, active=1)
    disk = make_disk(tmp_path / "disk.img")
    crash_mid_sync(root, disk, ROOT_A, bootloader, "6.9.0")
    assert "EFI/aerynos/6.9.0/vmlinuz" in esp_listing(disk)
    assert "EFI/aerynos/6.9.0/vmlinuz" in esp_read(disk, record_path(ROOT_A)).decode().splitlines()
    drop_state(root, 2)
    report = sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert sorted(report.removed) == ["EFI/aerynos/6.9.0/10-default.initrd", "EFI/aerynos/6.9.0/vmlinuz"]
    assert esp_read(disk, record_path(ROOT_A)).decode().splitlines()[1:] == [
        "EFI/aerynos/6.8.0/10-default.initrd", "EFI/aerynos/6.8.0/vmlinuz"]


def test_loader_conf_keeps_other_settings_and_another_boot_loader_is_left_alone(tmp_path: Path,
                                                                                bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.8.0"}, active=1)
    disk = make_disk(tmp_path / "disk.img")
    esp = MtoolsEsp(disk, ESP_START * 512)
    esp.write_atomic("loader/loader.conf", b"timeout 10\nconsole-mode max\ndefault windows.conf\n")
    esp.write_atomic("EFI/BOOT/BOOTX64.EFI", b"MZ shim fallback")
    report = sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert esp_read(disk, "loader/loader.conf") == b"timeout 10\nconsole-mode max\ndefault aerynos-6.8.0-1.conf\n"
    assert esp_read(disk, "EFI/BOOT/BOOTX64.EFI") == b"MZ shim fallback"
    assert esp_read(disk, "EFI/systemd/systemd-bootx64.efi") == bootloader.read_bytes()
    assert any("EFI/BOOT/BOOTX64.EFI is another boot loader" in note for note in report.notes)


def test_entry_token_follows_kernel_install(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/kernel").mkdir(parents=True)
    assert configured_token(root, "aerynos", None) == EntryToken("aerynos", "ID")
    assert configured_token(root, "aerynos", "aerynos-desktop") == EntryToken("aerynos-desktop", "IMAGE_ID")
    (root / "etc/machine-id").write_text("uninitialized\n")
    assert configured_token(root, "aerynos", None).source == "ID"
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    assert configured_token(root, "aerynos", None) == EntryToken("0123456789abcdef0123456789abcdef", "machine-id")
    (root / "etc/kernel/entry-token").write_text("lab-box\n")
    assert configured_token(root, "aerynos", None) == EntryToken("lab-box", "entry-token")


def test_token_choice_on_a_shared_esp() -> None:
    plain = EntryToken("aerynos", "ID")
    shared = f"aerynos-{installation_id(ROOT_A)[:8]}"
    other = f"title x\nlinux /EFI/aerynos/6.8.0/vmlinuz\noptions {ROOT_B} rw moss.fstx=1\n"
    mine = f"title x\nlinux /EFI/aerynos/6.8.0/vmlinuz\noptions {ROOT_A} rw moss.fstx=1\n"
    hand = "title x\nlinux /vmlinuz\noptions root=/dev/sda2\n"
    wanted = ["aerynos-6.8.0-1.conf"]
    assert choose_token(plain, ROOT_A, {}, wanted) == plain
    assert choose_token(plain, ROOT_A, {"loader/entries/aerynos-6.8.0-1.conf": other}, wanted).value == shared
    assert choose_token(plain, ROOT_A, {"loader/entries/aerynos-6.8.0-1.conf": other,
                                        "loader/entries/aerynos-6.7.0-3.conf": mine},
                        ["aerynos-6.7.0-3.conf"]) == plain   # held: first come, first served
    assert choose_token(plain, ROOT_A, {"loader/entries/aerynos-6.8.0-1.conf": hand}, wanted).value == shared
    assert choose_token(plain, ROOT_A, {"loader/entries/aerynos-custom.conf": hand}, wanted) == plain
    machine = EntryToken("0123456789abcdef0123456789abcdef", "machine-id")
    assert choose_token(machine, ROOT_A, {"loader/entries/x.conf": other}, wanted) == machine


def test_ownership_of_an_entry_is_its_root_words() -> None:
    btrfs = "root=UUID=u rootflags=subvol=/@a"
    assert is_ours(f"options {btrfs} rw quiet rootflags=compress=zstd moss.fstx=2\n", btrfs)
    assert not is_ours("options root=UUID=u rootflags=subvol=/@b rw moss.fstx=2\n", btrfs)
    assert not is_ours(f"options {btrfs} rw\n", btrfs)                      # not a stonelab entry
    assert not is_ours(f"options {ROOT_A}0 rw moss.fstx=1\n", ROOT_A)


def test_the_ownership_record_goes_with_the_last_owned_file(tmp_path: Path, bootloader: Path) -> None:
    import shutil
    root = make_root(tmp_path / "root", {1: "6.8.0"}, active=1)
    disk = make_disk(tmp_path / "disk.img")
    sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    shutil.rmtree(root / "usr/lib/kernel")
    report = sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert sorted(report.removed) == ["EFI/aerynos/6.8.0/10-default.initrd", "EFI/aerynos/6.8.0/vmlinuz",
                                      "loader/entries/aerynos-6.8.0-1.conf"]
    assert not [p for p in MtoolsEsp(disk, ESP_START * 512)._walk() if p.casefold().startswith("loader/stonelab")]


@pytest.mark.parametrize("token_file, token", [("etc/machine-id", "0123456789abcdef0123456789abcdef"),
                                                ("etc/kernel/entry-token", "lab-box")])
def test_two_clones_with_one_token_keep_separate_entries(tmp_path: Path, bootloader: Path, token_file: str,
                                                         token: str) -> None:
    """A cloned image: two installations with the same machine ID (or entry-token file), the same kernel
    version and state id. The second sync must not overwrite the first one's entry."""
    roots = []
    for name in ("a", "b"):
        root = make_root(tmp_path / name, {1: "6.8.0"}, active=1)
        (root / token_file).parent.mkdir(parents=True, exist_ok=True)
        (root / token_file).write_text(token + "\n")
        roots.append(root)
    disk = make_disk(tmp_path / "disk.img")
    first = sync_boot(roots[0], esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    second = sync_boot(roots[1], esp=disk, root_arg=ROOT_B, bootloader=bootloader)
    assert first.entries == [f"{token}-6.8.0-1.conf"]
    assert second.entries == [f"{token}-{installation_id(ROOT_B)[:8]}-6.8.0-1.conf"]
    assert ROOT_A in esp_read(disk, f"loader/entries/{first.entries[0]}").decode()
    assert ROOT_B in esp_read(disk, f"loader/entries/{second.entries[0]}").decode()
    again = sync_boot(roots[0], esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert (again.entries, again.written, again.removed) == (first.entries, ["loader/loader.conf"], [])


@pytest.mark.parametrize("foreign", ["EFI/aerynos/6.8.0", "EFI/aerynos"])
def test_a_foreign_file_where_a_kernel_directory_goes(tmp_path: Path, bootloader: Path, foreign: str) -> None:
    """A file (not a directory) at the kernel directory's path, or at its parent: left alone; the kernel goes to
    another directory, or the sync is one line naming the obstacle."""
    root = make_root(tmp_path / "root", {1: "6.8.0"}, active=1)
    disk = make_disk(tmp_path / "disk.img")
    MtoolsEsp(disk, ESP_START * 512).write_atomic(foreign, b"not a directory")
    if foreign == "EFI/aerynos":
        with pytest.raises(StonelabError, match="no free directory for kernel 6.8.0 below EFI/aerynos/"):
            sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    else:
        sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
        assert "EFI/aerynos/6.8.0-" in esp_read(disk, "loader/entries/aerynos-6.8.0-1.conf").decode()
    assert esp_read(disk, foreign) == b"not a directory"


def test_a_foreign_dot_tmp_file_beside_an_entry_is_not_a_leftover(tmp_path: Path, bootloader: Path) -> None:
    root = make_root(tmp_path / "root", {1: "6.8.0"}, active=1)
    disk = make_disk(tmp_path / "disk.img")
    esp = MtoolsEsp(disk, ESP_START * 512)
    for path in ("loader/entries/aerynos-6.8.0-1.conf.tmp", "loader/loader.conf.tmp"):
        esp.write_atomic(path, b"someone else's temporary")
    report = sync_boot(root, esp=disk, root_arg=ROOT_A, bootloader=bootloader)
    assert report.removed == []
    assert esp_read(disk, "loader/loader.conf.tmp") == b"someone else's temporary"


def test_a_quoted_root_word_is_one_word() -> None:
    spaced = 'root=UUID=u rootflags="subvol=/my root"'
    assert is_ours(f"options {spaced} rw moss.fstx=1\n", spaced)
    assert not is_ours('options root=UUID=u rootflags="subvol=/my other" rw moss.fstx=1\n', spaced)
    assert installation_id(spaced) != installation_id('root=UUID=u rootflags="subvol=/my other"')
