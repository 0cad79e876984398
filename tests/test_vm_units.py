"""Fast tests of the VM layer (no guest boots): initramfs, disk images, accelerator choice, errors, the agent
protocol against a real local agent process, the console transport against a local shell."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from reference_impl.boot.esp import FAT32_MIN_CLUSTERS, MtoolsEsp, format_fat
import xxhash

from vm.accel import AccelSelector, ProbeResult, probe_kvm
from vm.console import Console
from vm.cpio import CpioWriter
from vm.disk import DiskLayout, build_disk, partition_table, uefi_esp_tree
from vm.errors import CommandFailed, GuestTimeout, MissingHostTool, VmError
from vm.host import Kernel, default_kernel, kernel_from_path, ovmf_files, qemu_binary
from vm.initramfs import build_initramfs, module_files
from vm.protocol import LineChannel, ProtocolError, decode, encode
from vm.qemu import DiskSpec, MachineConfig, UefiSpec, qemu_args
from vm.accel import AccelChoice
from vm.transport import AgentTransport, ConsoleTransport

REPO = Path(__file__).resolve().parents[1]
TCG = AccelChoice("tcg", "test")


def host_kernel() -> Kernel:
    try:
        kernel = default_kernel()
    except MissingHostTool as err:
        pytest.skip(str(err))
    if not kernel.has_modules:
        pytest.skip(f"{kernel.modules}: no module tree for the host kernel")
    return kernel


def cpio_listing(path: Path) -> list[str]:
    return subprocess.run(["cpio", "-it", "--quiet"], stdin=open(path, "rb"), capture_output=True, text=True,
                          check=True).stdout.split()


# -- initramfs ------------------------------------------------------------------------------------------------
def test_cpio_writer_is_readable_by_cpio(tmp_path):
    with open(tmp_path / "a.cpio", "wb") as out:
        archive = CpioWriter(out)
        archive.directory("d")
        archive.file("d/f", b"hello", 0o600)
        archive.symlink("d/l", "f")
        archive.char_device("d/console", 5, 1)
        archive.close()
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=open(tmp_path / "a.cpio", "rb"), cwd=dest, check=True,
                   capture_output=True)
    assert (dest / "d/f").read_bytes() == b"hello"
    assert stat.S_IMODE((dest / "d/f").stat().st_mode) == 0o600
    assert os.readlink(dest / "d/l") == "f"
    assert stat.S_ISCHR((dest / "d/console").lstat().st_mode)
    assert os.major((dest / "d/console").lstat().st_rdev) == 5


def test_agent_initramfs_has_modules_in_load_order_and_init(tmp_path):
    kernel = host_kernel()
    image = build_initramfs(kernel, "agent", cache=tmp_path)
    names = cpio_listing(image.path)
    assert "init" in names and "bin/busybox" in names and "dev/console" in names
    modules = [n.split("-", 1)[1] for n in sorted(n for n in names if n.startswith("mod/") and n.endswith(".ko"))]
    for needed in ("virtio_pci.ko", "virtio_blk.ko", "virtio_console.ko", "9pnet_virtio.ko", "9p.ko", "ext4.ko",
                   "vfat.ko", "overlay.ko"):
        assert needed in modules, (needed, modules)
    # dependencies come before their users
    assert modules.index("virtio.ko") < modules.index("virtio_pci.ko")
    assert modules.index("9pnet.ko") < modules.index("9pnet_virtio.ko") < modules.index("9p.ko")
    assert modules.index("jbd2.ko") < modules.index("ext4.ko")
    assert modules.index("fat.ko") < modules.index("vfat.ko")
    assert len(modules) == len(set(modules))


def test_initramfs_cache_is_keyed_by_inputs(tmp_path, monkeypatch):
    kernel = host_kernel()
    first = build_initramfs(kernel, "bare", cache=tmp_path)
    again = build_initramfs(kernel, "bare", cache=tmp_path)
    assert not first.cached and again.cached and again.path == first.path
    assert "init" in cpio_listing(first.path) and not any(n.startswith("mod/") and n != "mod" for n in
                                                           cpio_listing(first.path))
    monkeypatch.setattr("vm.initramfs.BARE_INIT", "#!/bin/sh\necho changed\n")
    changed = build_initramfs(kernel, "bare", cache=tmp_path)
    assert not changed.cached and changed.path != first.path
    assert not list((tmp_path / "initramfs").glob(".build-*")), "no temporary left behind"


def test_initramfs_default_cache_honours_xdg(tmp_path, monkeypatch):
    kernel = host_kernel()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    image = build_initramfs(kernel, "bare")
    assert image.path.parent == tmp_path / "stonelab" / "initramfs"


def test_module_files_of_a_kernel_without_modules_is_empty(tmp_path):
    kernel = Kernel(tmp_path / "vmlinuz", "9.9.9-none", tmp_path / "lib/modules/9.9.9-none")
    assert module_files(kernel) == []


# -- disks ----------------------------------------------------------------------------------------------------
def test_disk_image_gpt_layout_and_contents(tmp_path):
    esp, root = tmp_path / "esp", tmp_path / "root"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    (esp / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(b"efi" * 100)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_text("#!/bin/sh\n")
    layout = DiskLayout(esp_mib=40, root_mib=48)
    image = build_disk(tmp_path / "sut.img", layout, esp, root)
    assert image.path.stat().st_size == layout.total_bytes
    table = partition_table(image.path)
    assert table["label"] == "gpt"
    esp_part, root_part = table["partitions"]
    assert esp_part["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" and esp_part["start"] == 2048
    assert esp_part["size"] == 40 * 2048
    assert root_part["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    assert root_part["start"] * 512 == layout.root_offset and root_part["size"] == 48 * 2048
    fat = subprocess.run(["mtype", "-i", f"{image.path}@@{layout.esp_offset}", "::/EFI/BOOT/BOOTX64.EFI"],
                         capture_output=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, check=True).stdout
    assert fat == b"efi" * 100
    probe = subprocess.run(["blkid", "-p", "-o", "export", "--offset", str(layout.root_offset), str(image.path)],
                           capture_output=True, text=True, check=True).stdout
    assert "TYPE=ext4" in probe and "LABEL=sut-root" in probe
    ext = subprocess.run(["debugfs", "-R", "cat /usr/bin/tool", f"{image.path}?offset={layout.root_offset}"],
                         capture_output=True, text=True).stdout
    assert ext == "#!/bin/sh\n"


@pytest.mark.parametrize("esp_mib, root_mib", [(64, 256), (33, 8), (300, 512)])
def test_esp_is_fat32_by_cluster_count_and_takes_directories(tmp_path, esp_mib, root_mib):
    """Regression (issue 12): ``mkfs.vfat --offset`` sized the clusters of a 64 MiB ESP for the whole 320 MiB
    image, 16,000 clusters under a FAT32 boot sector, which mtools reads as FAT16 with no root directory slots:
    the guest's first boot sync failed with 'No directory slots'."""
    layout = DiskLayout(esp_mib=esp_mib, root_mib=root_mib)
    image = build_disk(tmp_path / "sut.img", layout)
    with open(image.path, "rb") as disk:
        disk.seek(layout.esp_offset)
        boot = disk.read(512)
    per_cluster, reserved, fats = boot[13], int.from_bytes(boot[14:16], "little"), boot[16]
    fat_sectors, total = int.from_bytes(boot[36:40], "little"), int.from_bytes(boot[32:36], "little")
    assert (total - reserved - fats * fat_sectors) // per_cluster >= FAT32_MIN_CLUSTERS
    esp = MtoolsEsp(image.path, layout.esp_offset)
    esp.write_atomic("loader/entries/a.conf", b"title a\n")
    esp.write_atomic("EFI/BOOT/BOOTX64.EFI", b"efi")
    assert [p.casefold() for p in esp.list_files()] == ["efi/boot/bootx64.efi", "loader/entries/a.conf"]


def test_format_fat_on_a_region_of_a_larger_image_is_fat32(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as disk:
        disk.truncate(400 << 20)
    format_fat(image, 1 << 20, 64 << 20)
    esp = MtoolsEsp(image, 1 << 20)
    esp.write_atomic("loader/entries/a.conf", b"x")
    assert esp.read("loader/entries/a.conf") == b"x"


def test_disk_layout_rejects_a_too_small_esp():
    with pytest.raises(VmError, match="too small for FAT32"):
        DiskLayout(esp_mib=8)


def test_uefi_esp_tree(tmp_path):
    kernel, initrd, boot = tmp_path / "k", tmp_path / "i", tmp_path / "sd.efi"
    for path in (kernel, initrd, boot):
        path.write_bytes(path.name.encode())
    tree = uefi_esp_tree(tmp_path / "esp", kernel, initrd, "console=ttyS0 x=1", boot)
    assert (tree / "EFI/BOOT/BOOTX64.EFI").read_bytes() == b"sd.efi"
    assert "options console=ttyS0 x=1" in (tree / "loader/entries/stonelab.conf").read_text()
    assert "timeout 0" in (tree / "loader/loader.conf").read_text()


# -- QEMU command line ----------------------------------------------------------------------------------------
def test_qemu_args_disk_cache_mode_and_devices(tmp_path):
    config = MachineConfig(accel=TCG, kernel=Kernel(Path("/k"), "r", Path("/m")), initrd=Path("/i"),
                           append="console=ttyS0", disks=[DiskSpec(Path("/d.img"), cache="writeback")],
                           uefi=UefiSpec(Path("/code.fd"), Path("/vars.fd")), debug_exit=True, ssh_forward_port=2222)
    args = qemu_args(config, tmp_path, tmp_path / "vars.fd")
    line = " ".join(args)
    assert "file=/d.img,if=none,id=disk0,format=raw,cache=writeback" in line
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'vars.fd'}" in line and "readonly=on,file=/code.fd" in line
    assert "name=org.stonelab.agent" in line and "name=stonelab" in line
    assert "isa-debug-exit,iobase=0xf4" in line and "hostfwd=tcp:127.0.0.1:2222-:22" in line
    assert args[args.index("-accel") + 1] == "tcg" and "-no-reboot" in args
    assert "readonly=on" in args[args.index("-virtfs") + 1]
    kvm = qemu_args(MachineConfig(accel=AccelChoice("kvm", "t")), tmp_path)
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"


def test_unknown_cache_mode_is_a_one_line_error():
    with pytest.raises(VmError, match=r"/d.img: unknown disk cache mode 'fast'"):
        DiskSpec(Path("/d.img"), cache="fast")


# -- accelerator choice ---------------------------------------------------------------------------------------
def fake_qemu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def probe_kernel(tmp_path: Path) -> Kernel:
    image = tmp_path / "vmlinuz-0.0-probe"
    image.write_bytes(b"kernel")
    return Kernel(image, "0.0-probe", tmp_path / "nomodules")


def test_probe_that_times_out_means_tcg_and_leaves_no_process(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    pidfile = tmp_path / "pid"
    qemu = fake_qemu(tmp_path, f"echo $$ > {pidfile}; echo 'Probing EDD ... ok'; exec sleep 100")
    started = time.monotonic()
    result = probe_kvm(probe_kernel(tmp_path), timeout=1.0, qemu=qemu, kvm_device=device)
    assert time.monotonic() - started < 5
    assert not result.works and "made no progress within 1s" in result.reason and "Probing EDD" in result.reason
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the hung probe guest must be killed"


def test_probe_that_reaches_init_means_kvm(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    qemu = fake_qemu(tmp_path, "echo 'STONELAB-BARE-OK uptime=0.4'; exec sleep 100")
    result = probe_kvm(probe_kernel(tmp_path), timeout=5.0, qemu=qemu, kvm_device=device)
    assert result.works and "reached its init under KVM" in result.reason


def test_probe_without_kvm_device(tmp_path):
    result = probe_kvm(probe_kernel(tmp_path), kvm_device=tmp_path / "absent")
    assert not result.works and "does not exist" in result.reason


def test_selector_caches_per_kernel_and_reports_reason(tmp_path):
    calls = []

    def probe(kernel, timeout):
        calls.append(kernel.image)
        return ProbeResult(False, "probe guest made no progress within 0.1s", 0.1)

    selector = AccelSelector(probe=probe, probe_timeout=0.1)
    kernel = probe_kernel(tmp_path)
    first = selector.choose(kernel)
    assert first.accel == "tcg" and "falling back to TCG" in first.reason and first.probe_seconds == 0.1
    assert selector.choose(kernel) == first and len(calls) == 1
    assert AccelSelector(probe=probe).choose(kernel).accel == "tcg" and len(calls) == 2  # no global cache
    assert selector.choose(kernel, "tcg").reason == "forced with --accel tcg"
    works = AccelSelector(probe=lambda k, t: ProbeResult(True, "reached init in 0.5s", 0.5))
    assert works.choose(kernel).accel == "kvm"
    with pytest.raises(VmError, match="unknown accelerator"):
        selector.choose(kernel, "hvf")


# -- errors ---------------------------------------------------------------------------------------------------
def test_missing_qemu_names_the_package():
    with pytest.raises(MissingHostTool, match=r"qemu-system-x86_64: not found .*apt-get install -y qemu-system-x86"):
        qemu_binary(path="/nonexistent")


def test_missing_kernel_names_the_package(tmp_path):
    with pytest.raises(MissingHostTool, match="linux-image-amd64"):
        default_kernel(boot_dir=tmp_path)
    with pytest.raises(MissingHostTool, match=rf"{tmp_path}/vmlinuz-x: kernel image not found"):
        kernel_from_path(tmp_path / "vmlinuz-x")


def test_missing_ovmf_names_the_package(tmp_path):
    with pytest.raises(MissingHostTool, match=r"OVMF_CODE_4M.fd: .* apt-get install -y ovmf"):
        ovmf_files(code=tmp_path / "OVMF_CODE_4M.fd")


def test_newest_kernel_is_the_default(tmp_path):
    for release in ("6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-30-amd64"):
        (tmp_path / f"vmlinuz-{release}").write_bytes(b"k")
    assert default_kernel(boot_dir=tmp_path).release == "6.1.0-10-amd64"


def test_cli_missing_kernel_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stonelab.cli", "vm", "run", "--kernel", str(tmp_path / "nope"),
                           "--accel", "tcg", "--", "true"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("stonelab: error: ")
    assert "nope: kernel image not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_missing_qemu_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "stonelab.cli", "vm", "run", "--accel", "tcg", "--", "true"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 2 and "qemu-system-x86" in proc.stderr and "Traceback" not in proc.stderr


def test_guest_timeout_message_carries_the_console_tail():
    err = GuestTimeout("the agent", 12, [f"line {n}" for n in range(40)])
    assert "after 12s" in str(err) and "line 0" in str(err) and "line 39" in str(err) and "\n" not in str(err)
    assert len(err.console_tail) == 40


def test_command_failed_message():
    err = CommandFailed("false", 1, "", "boom\n")
    assert str(err) == "guest command 'false' exited 1: boom"


# -- agent protocol against a real local agent process ---------------------------------------------------------
def test_encode_decode_roundtrip_and_malformed():
    message = {"id": 3, "op": "run", "command": "echo ü"}
    assert decode(encode(message).rstrip(b"\n")) == message
    with pytest.raises(ProtocolError, match="malformed"):
        decode(b"{not json")
    with pytest.raises(ProtocolError, match="not an object"):
        decode(b"[1]")


@pytest.fixture
def local_agent():
    # started as the guest's init starts it: without site (-S), the project on PYTHONPATH
    proc = subprocess.Popen([sys.executable, "-S", "-m", "vm.agent", "--stdio"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    transport = AgentTransport(LineChannel(proc.stdout.fileno(), proc.stdin.fileno()), lambda: ["(local)"],
                               request_margin=5)
    ready = transport.wait_ready(30, lambda: proc.poll() is None)
    assert ready["pid"] == proc.pid
    yield transport, proc
    proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


def test_agent_runs_commands(local_agent):
    agent, _ = local_agent
    result = agent.run("echo out; echo err >&2; exit 7", timeout=30)
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (7, "out\n", "err\n", False)
    assert agent.run(["printf", "%s", "a b"], timeout=30).stdout == "a b"
    slow = agent.run("sleep 5", timeout=0.5)
    assert slow.timed_out and slow.exit_code != 0 and slow.seconds < 4
    missing = agent.run(["/nonexistent/tool"], timeout=5)
    assert missing.exit_code == 127


def test_agent_files_and_tree_hash(local_agent, tmp_path):
    agent, _ = local_agent
    data = bytes(range(256)) * 10
    agent.write_file(str(tmp_path / "f.bin"), data, mode=0o640, fsync=True)
    assert (tmp_path / "f.bin").read_bytes() == data and stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640
    assert agent.read_file(str(tmp_path / "f.bin")) == data
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "g").write_text("g")
    os.symlink("g", tmp_path / "d" / "l")
    tree = agent.hash_tree(str(tmp_path))
    assert tree["f.bin"] == f"file:{xxhash.xxh3_128(data).hexdigest()}:640"
    assert tree["d/l"] == "link:g" and tree["d"].startswith("dir:")
    (tmp_path / "d" / "g").write_text("G")
    assert agent.hash_tree(str(tmp_path))["d/g"] != tree["d/g"]


def test_agent_reports_errors_and_keeps_serving(local_agent, tmp_path):
    agent, proc = local_agent
    with pytest.raises(VmError, match="read_file failed: FileNotFoundError"):
        agent.read_file(str(tmp_path / "absent"))
    with pytest.raises(VmError, match="unknown op 'dance'"):
        agent.request("dance", 5)
    os.write(proc.stdin.fileno(), b"{garbage\n")
    assert agent.run("echo still", timeout=10).stdout == "still\n"
    agent.request("shutdown", 10)
    assert proc.wait(10) == 0


def test_agent_answer_timeout_is_a_guest_timeout():
    read_fd, write_fd = os.pipe()  # nobody answers on read_fd
    sink_r, sink_w = os.pipe()
    try:
        agent = AgentTransport(LineChannel(read_fd, sink_w), lambda: ["console says hi"], request_margin=0.2)
        with pytest.raises(GuestTimeout, match="console says hi"):
            agent.run("true", timeout=0.1)
    finally:
        for fd in (read_fd, write_fd, sink_r, sink_w):
            os.close(fd)


# -- console transport against a local shell -----------------------------------------------------------------
def test_console_transport_over_a_local_shell(tmp_path):
    child = pexpect.spawn("/bin/sh", ["-i"], echo=True, env={"PS1": "$ ", "PATH": os.environ["PATH"]})
    console = Console(child, tmp_path / "console.log")
    try:
        transport = ConsoleTransport(console.send, console.wait_for)
        result = transport.run("echo hello; ls /nonexistent-dir", timeout=10)
        assert result.exit_code != 0 and "hello" in result.stdout and "nonexistent-dir" in result.stdout
        assert transport.run("true", timeout=10).exit_code == 0
        with pytest.raises(GuestTimeout, match="never-printed"):
            console.wait_for("never-printed", 0.3)
        assert b"hello" in (tmp_path / "console.log").read_bytes()
    finally:
        child.close(force=True)
        console.close()


# -- argv exactness, exit status, console files, nested logging -------------------------------------------------
def test_agent_runs_a_word_list_exactly(local_agent):
    agent, _ = local_agent
    words = ["a b", "it's", "$HOME", "*", "", "x;y"]
    result = agent.run([sys.executable, "-c", "import sys; print(sys.argv[1:])", *words], timeout=30)
    assert result.stdout == f"{words!r}\n"
    assert agent.run(["sh", "-c", "exit 3"], timeout=30).exit_code == 3


def test_vm_run_exit_status_mapping():
    from vm.cli import exit_status
    from vm.transport import RunResult

    assert exit_status(RunResult(3, "", "")) == 3
    assert exit_status(RunResult(0, "", "")) == 0
    assert exit_status(RunResult(-9, "", "")) == 137  # killed by SIGKILL, as a shell reports it
    assert exit_status(RunResult(-9, "", "", timed_out=True)) == 124


def test_shell_line_quotes_words():
    from vm.transport import shell_line

    assert shell_line("echo $HOME; exit 3") == "echo $HOME; exit 3"
    assert shell_line(["printf", "%s|", "a b", "it's"]) == "printf '%s|' 'a b' 'it'\"'\"'s'"


def test_console_transport_word_lists_and_files(tmp_path):
    child = pexpect.spawn("/bin/sh", ["-i"], echo=True, env={"PS1": "$ ", "PATH": os.environ["PATH"]})
    console = Console(child, None)
    try:
        transport = ConsoleTransport(console.send, console.wait_for)
        assert transport.run(["printf", "%s|", "a b", "it's"], timeout=10).stdout == "a b|it's|"
        data = os.urandom(3000) + b"\n\0end"
        transport.write_file(str(tmp_path / "blob"), data, mode=0o640)
        assert (tmp_path / "blob").read_bytes() == data
        assert stat.S_IMODE((tmp_path / "blob").stat().st_mode) == 0o640
        assert transport.read_file(str(tmp_path / "blob")) == data
        with pytest.raises(VmError, match="exited"):
            transport.read_file(str(tmp_path / "absent"))
    finally:
        child.close(force=True)
        console.close()


def test_nested_logs_timed_indented_blocks(caplog):
    import logging

    from vm.log import get_logger, nested

    log = get_logger("vm.test-nested")
    with caplog.at_level(logging.INFO, logger="vm.test-nested"):
        with nested(log, "outer"):
            with nested(log, "inner"):
                log.info("work")
        with pytest.raises(ValueError):
            with nested(log, "broken"):
                raise ValueError("no good")
    lines = [(r.indent, r.getMessage()) for r in caplog.records]
    assert lines[:3] == [("", "outer"), ("  ", "inner"), ("    ", "work")]
    assert lines[3][0] == "  " and re.fullmatch(r"inner \(\d+\.\d\d s\)", lines[3][1])
    assert lines[4][0] == "" and re.fullmatch(r"outer \(\d+\.\d\d s\)", lines[4][1])
    assert re.fullmatch(r"broken failed after \d+\.\d\d s: no good", lines[-1][1])


def test_qemu_process_logs_its_argv_and_is_reaped(tmp_path, caplog):
    import logging

    from vm.machine import QemuProcess

    with caplog.at_level(logging.DEBUG, logger="vm.machine"):
        with QemuProcess("/bin/sh", ["-c", "echo up; sleep 30"], tmp_path / "console.log") as process:
            process.console.wait_for("up", 10)
            assert process.alive
    assert not process.alive and process.exit_status == -9 and process.pidfd is None
    assert any(r.getMessage() == "qemu argv: /bin/sh -c 'echo up; sleep 30'" for r in caplog.records)


def test_machine_workdir_fits_unix_socket_paths_under_a_deep_tmpdir(tmp_path, monkeypatch):
    """CI failed once: a deep TMPDIR made every guest's QMP socket path longer than sun_path."""
    import tempfile

    from vm.machine import LONGEST_SOCKET, UNIX_PATH_MAX, workdir_base

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    prefix = f"stonelab-vm-{os.getpid()}-shared-"
    assert workdir_base(len(prefix)) == Path("/tmp")
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir_base(len(prefix))))
    try:
        assert len(str(workdir / LONGEST_SOCKET)) <= UNIX_PATH_MAX
    finally:
        workdir.rmdir()
    short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # a TMPDIR the sockets fit in is kept
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        assert workdir_base(len(prefix)) == short
    finally:
        short.rmdir()


class _FakeGuest:
    """Records what a VmTarget asks of its machine (a guest on the userland image: no host root)."""

    def __init__(self):
        self.config = type("Config", (), {"share_host_root": False})()
        self.running = True
        self.files: dict[str, bytes] = {}
        self.commands: list = []

    def succeed(self, command, timeout=600):
        self.commands.append(command)
        return ""

    def write_file(self, path, data, mode=None, fsync=False):
        self.files[path] = data


def test_vm_target_copies_host_files_and_directories_into_the_guest(tmp_path):
    from lab.vm_target import GUEST_PACKAGES, VmTarget

    target = object.__new__(VmTarget)   # no guest: only the copying logic
    target.machine, target.workdir, target._pushed, target._copies = _FakeGuest(), tmp_path, {}, 0
    target.power_on = lambda: None
    package = tmp_path / "hello.stone"
    package.write_bytes(b"stone")
    job = tmp_path / "crash-job-x"
    (job / "sub").mkdir(parents=True)
    (job / "job.json").write_text("{}")
    (job / "sub" / "data.bin").write_bytes(b"\0\1")
    guest_package = target.path_for_package(package)
    assert target.path_for_package(package) == guest_package            # a file: copied once per power-on
    assert target.machine.files[guest_package] == b"stone" and guest_package.startswith(GUEST_PACKAGES + "/")
    seen = []
    target._python = lambda argv, env="", timeout=0: seen.append(argv)
    target.run_guest(["-m", "lab.crash.materialize", str(job), "/not/below/the/workdir"], timeout=10)
    guest_job = seen[0][2]
    assert guest_job != str(job) and seen[0][3] == "/not/below/the/workdir"
    assert target.machine.files[f"{guest_job}/job.json"] == b"{}"
    assert target.machine.files[f"{guest_job}/sub/data.bin"] == b"\0\1"
    assert f"{guest_job}/sub" in target.machine.commands[-1]             # its directories made first
    target.run_guest(["-m", "lab.crash.materialize", str(job)], timeout=10)
    assert seen[1][2] != guest_job                                        # a directory: copied afresh each time


def test_vm_target_runs_guest_python_warm_with_its_environment(monkeypatch):
    """Every guest Python command of the VM target is a warm run (forked from the guest's zygote) with the
    variables as an environment, never a shell line; under limit_open_files a fresh process below ``ulimit -n``."""
    from lab.vm_target import VmTarget
    from reference_impl import mutants
    from vm.machine import PROJECT_DIR
    from vm.transport import RunResult

    calls = []

    class Machine:
        def execute(self, command, timeout=600, *, env=None, cwd=None, warm=False):
            calls.append((command, env, cwd, warm))
            return RunResult(0, "", "")

    target = object.__new__(VmTarget)
    target.machine, target.power_on = Machine(), lambda: None
    monkeypatch.setenv(mutants.ENV_VAR, "skip-syncfs")
    target._python(["-m", "lab.probe", "/mnt/sut"], {"STONELAB_FAULT": "blit.mid:pause"})
    command, env, cwd, warm = calls[-1]
    assert command == [sys.executable, "-m", "lab.probe", "/mnt/sut"] and warm and cwd == str(PROJECT_DIR)
    assert env == {"STONELAB_FAULT": "blit.mid:pause", mutants.ENV_VAR: "skip-syncfs"}
    target._python(["-m", "stonelab.cli", "install"], nofile=64)
    command, env, cwd, warm = calls[-1]
    assert not warm and isinstance(command, str) and command.startswith("ulimit -n 64 && ")
