"""Boot modes and the CLI, each one real guest: UEFI (OVMF → systemd-boot → entry), a foreign multiboot kernel
judged by isa-debug-exit, the console transport, `stonelab vm run` (exit status, and Ctrl-C leaves no QEMU)."""
from __future__ import annotations

import hashlib
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vm.accel import AccelChoice
from vm.disk import DiskLayout, build_disk, uefi_esp_tree
from vm.errors import MissingHostTool
from vm.host import OVMF_VARS, ovmf_files, systemd_boot
from vm.initramfs import build_initramfs
from vm.machine import PROJECT_DIR, Machine, agent_config, foreign_config, uefi_config
from vm.qemu import DiskSpec, MachineConfig, agent_append, debug_exit_outcome
from vm.transport import ConsoleTransport

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[1]


def test_uefi_chain_boots_the_disk_entry(kernel, accel, tmp_path):
    try:
        ovmf_files()
        boot_efi = systemd_boot()
    except MissingHostTool as err:
        pytest.skip(str(err))
    initrd = build_initramfs(kernel, "agent").path
    esp = uefi_esp_tree(tmp_path / "esp", kernel.image, initrd,
                        agent_append(sys.executable, str(PROJECT_DIR), extra="stonelab.test=uefi"), boot_efi)
    disk = build_disk(tmp_path / "uefi.img", DiskLayout(64, 16), esp_tree=esp)
    template = hashlib.sha256(OVMF_VARS.read_bytes()).hexdigest()
    with Machine(uefi_config(accel, DiskSpec(disk.path)), name="uefi") as guest:
        assert "stonelab.test=uefi" in guest.succeed("cat /proc/cmdline")
        guest.succeed("test -d /sys/firmware/efi")  # booted through firmware, not -kernel
        assert guest.uefi_vars.is_file() and guest.uefi_vars.parent == guest.workdir
        guest.shutdown()
    assert hashlib.sha256(OVMF_VARS.read_bytes()).hexdigest() == template  # only the private copy is written


def multiboot_kernel(path: Path, text: bytes, exit_value: int) -> Path:
    """A minimal foreign kernel: multiboot v1 (a.out kludge), prints ``text`` on COM1, exits via isa-debug-exit."""
    load = 0x100000
    magic, flags = 0x1BADB002, 0x00010000
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, load, load, 0, 0, load + 32)
    code = b""
    for byte in text:
        code += b"\x66\xba\xf8\x03" + bytes([0xB0, byte]) + b"\xee"  # mov dx,0x3f8; mov al,c; out dx,al
    code += b"\x66\xba\xf4\x00" + bytes([0xB0, exit_value]) + b"\xee"  # mov dx,0xf4; mov al,v; out dx,al
    code += b"\xf4\xeb\xfd"  # hlt; jmp back
    path.write_bytes(header + code)
    return path


def test_foreign_multiboot_kernel_and_debug_exit(accel, tmp_path):
    for value, outcome in ((0x10, "success"), (0x20, "failure")):
        image = multiboot_kernel(tmp_path / f"foreign-{value}.bin", b"FOREIGN-KERNEL-UP\n", value)
        with Machine(foreign_config(image, accel), name="foreign", transport=ConsoleTransport()) as guest:
            guest.wait_for_console("FOREIGN-KERNEL-UP", 60)
            status = guest.wait_for_exit(60)
        assert debug_exit_outcome(status) == outcome, status
    assert debug_exit_outcome(0) == "no verdict"


def test_console_transport_on_a_shell_guest(kernel, accel):
    config = agent_config(kernel, accel, mode="shell")
    with Machine(config, name="console", transport=ConsoleTransport()) as guest:
        guest.wait_for_console("STONELAB-SHELL", 120)
        assert guest.succeed("echo from-console; uname -s", timeout=60).splitlines()[-2:] == ["from-console", "Linux"]
        assert guest.execute("exit_with() { return $1; }; exit_with 5", timeout=60).exit_code == 5
        guest.shutdown()
        assert not guest.running


def test_cli_vm_run_keeps_argv_and_exit_status():
    # the words reach the guest exactly (no re-splitting, no shell), and the command's status comes back
    words = ["a b", "it's", "$HOME", "*", ""]
    proc = subprocess.run([str(REPO / ".venv/bin/stonelab"), "vm", "run", "--", "python3", "-c",
                           "import sys; print(6*7); print(sys.argv[1:]); sys.stderr.write('err\\n'); sys.exit(3)",
                           *words], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ["42", repr(words)]
    assert "err\n" in proc.stderr and "stonelab: accelerator " in proc.stderr


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _qemu_workdir(pid: int) -> Path:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    qmp = next(arg for arg in argv if arg.startswith(b"unix:") and b"qmp.sock" in arg)
    return Path(qmp[len(b"unix:"):].split(b",")[0].decode()).parent


def _wait_for_qemu_child(pid: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in _children(pid) if Path(f"/proc/{p}/comm").read_text().startswith("qemu-system")]
        if found:
            return found
        time.sleep(0.1)
    return []


def test_qemu_dies_with_a_killed_controller():
    # SIGKILL of the controlling process allows no clean-up code at all: PR_SET_PDEATHSIG takes QEMU down
    proc = subprocess.Popen([str(REPO / ".venv/bin/stonelab"), "vm", "run", "--accel", "tcg", "--", "sleep", "600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qemu = _wait_for_qemu_child(proc.pid)
        assert qemu, "the CLI did not start QEMU"
        workdir = _qemu_workdir(qemu[0])
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in qemu) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(not Path(f"/proc/{p}").exists() for p in qemu), "QEMU outlived its killed controller"
        assert workdir.is_dir()  # nothing could remove it yet ...
        Machine(MachineConfig(accel=AccelChoice("tcg", "test")), name="sweeper").close()
        assert not workdir.exists()  # ... the next machine sweeps it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_ctrl_c_leaves_no_qemu():
    proc = subprocess.Popen([str(REPO / ".venv/bin/stonelab"), "vm", "run", "--accel", "tcg", "--", "sleep", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        qemu = _wait_for_qemu_child(proc.pid, deadline - time.monotonic())
        assert qemu, "the CLI did not start QEMU"
        workdir = _qemu_workdir(qemu[0])
        assert workdir.is_dir()
        time.sleep(3)  # mid-boot
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGINT and "interrupted" in err
        assert all(not Path(f"/proc/{p}").exists() for p in qemu), "QEMU survived Ctrl-C"
        assert not workdir.exists(), "the machine's private directory survived Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_vm_shell_is_interactive():
    import pexpect

    child = pexpect.spawn(str(REPO / ".venv/bin/stonelab"), ["vm", "shell"], timeout=120, encoding="utf-8")
    try:
        child.expect("STONELAB-SHELL")
        child.expect(r"# ")
        child.sendline(f"echo sum-$((40+2)); {sys.executable} -c 'import vm; print(vm.__file__)'")
        child.expect("sum-42")
        child.expect(str(REPO / "vm" / "__init__.py"))
        child.sendline("exit")  # the init powers off when the shell ends
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
