"""One real guest shared by the tests of this module (3 boots: start, power-on after a power cut, reboot), plus a
guest whose agent cannot start (a short boot): the Machine API, the agent, fault markers, crash semantics,
QMP, timeouts and clean-up."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from vm.agent import hash_tree
from vm.disk import DiskLayout, build_disk
from vm.errors import CommandFailed, GuestTimeout, VmError
from vm.machine import Machine, agent_config
from vm.qemu import DiskSpec

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[1]


def qemu_children() -> list[int]:
    """QEMU processes that are children of this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == str(os.getpid()) and fields.get("Name", "").startswith("qemu-system"):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def sut_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("sut-root")
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "os-release").write_text("NAME=stonelab-test\n")
    (root / "usr" / "lib" / "blob").write_bytes(os.urandom(200_000))
    os.symlink("os-release", root / "usr" / "lib" / "release-link")
    return root


@pytest.fixture(scope="module")
def machine(kernel, accel, sut_tree, tmp_path_factory):
    disk = build_disk(tmp_path_factory.mktemp("disk") / "sut.img", DiskLayout(40, 64), root_tree=sut_tree)
    config = agent_config(kernel, accel, [DiskSpec(disk.path)])
    with Machine(config, name="shared") as guest:
        yield guest
    assert qemu_children() == []
    assert not guest.workdir.exists()


def mount_sut(machine: Machine) -> None:
    # a huge commit interval and no background writeback: only sync/fsync make data durable
    machine.succeed("mkdir -p /mnt/sut && mount -o commit=3600 /dev/vda2 /mnt/sut && "
                    "echo 360000 > /proc/sys/vm/dirty_expire_centisecs && "
                    "echo 360000 > /proc/sys/vm/dirty_writeback_centisecs")


def test_succeed_fail_and_guest_userland(machine, accel):
    assert machine.boots and machine.boots[0]["ready_seconds"] > 0
    assert machine.succeed("echo hello") == "hello\n"
    assert "6." in machine.succeed("uname -r") or machine.succeed("uname -r")
    with pytest.raises(CommandFailed) as info:
        machine.succeed("echo bad >&2; exit 4")
    assert info.value.exit_code == 4 and "bad" in str(info.value)
    assert "no such" in machine.fail("ls /no/such/path").lower()
    with pytest.raises(CommandFailed):
        machine.fail("true")
    mounts = machine.succeed("cat /proc/mounts")
    assert " / erofs ro," in mounts and " /tmp tmpfs " in mounts and " /mnt tmpfs " in mounts
    machine.fail("touch /etc/stonelab-must-not-write")  # the userland image is read-only
    assert machine.succeed("ls /dev/virtio-ports").split() == ["org.stonelab.agent", "stonelab"]
    # the project's venv runs unchanged in the guest, at the same path
    out = machine.succeed(f"{REPO}/.venv/bin/stonelab --help", timeout=300)
    assert "usage: stonelab" in out


def test_files_tree_hash_and_sut_disk(machine, sut_tree):
    mount_sut(machine)
    guest = machine.hash_tree("/mnt/sut/usr")
    assert guest == hash_tree(str(sut_tree / "usr"))
    assert guest["lib/release-link"] == "link:os-release"
    machine.write_file("/tmp/x.bin", b"\0\1\2" * 1000, mode=0o600)
    assert machine.read_file("/tmp/x.bin") == b"\0\1\2" * 1000
    assert machine.succeed("stat -c %a /tmp/x.bin") == "600\n"


def test_wait_until_succeeds_and_console(machine):
    machine.succeed("(sleep 2; touch /tmp/later) >/dev/null 2>&1 &")
    machine.wait_until_succeeds("test -e /tmp/later", timeout=60)
    machine.succeed("echo STONELAB-CONSOLE-PROBE-$((6*7)) > /dev/console")
    assert machine.wait_for_console(r"STONELAB-CONSOLE-PROBE-(\d+)", 30).group(1) == "42"
    with pytest.raises(GuestTimeout, match="STONELAB-USERLAND"):  # the timeout carries the console tail
        machine.wait_for_console("never-shown", 0.5)


def test_unresponsive_guest_is_a_timeout_with_console_lines(machine):
    os.kill(machine.pid, signal.SIGSTOP)
    try:
        machine.agent.request_margin = 0.5
        with pytest.raises(GuestTimeout) as info:
            machine.execute("true", timeout=1)
        assert "STONELAB-INIT" in str(info.value) and 0 < len(info.value.console_tail) <= 40
    finally:
        machine.agent.request_margin = 30.0
        os.kill(machine.pid, signal.SIGCONT)
    # the late answer to the timed-out request is skipped, the next one pairs correctly
    assert machine.succeed("echo back") == "back\n"


def test_fault_marker_then_power_cut_loses_unsynced_data(machine):
    mount_sut(machine) if "/mnt/sut" not in machine.succeed("cat /proc/mounts") else None
    machine.succeed("echo durable > /mnt/sut/synced && sync")
    machine.succeed("echo volatile > /mnt/sut/unsynced")
    assert machine.succeed("cat /mnt/sut/unsynced") == "volatile\n"
    machine.crash_on_fault = True
    machine.succeed(f"STONELAB_FAULT=blit.mid:pause {sys.executable} -c "
                    "'from reference_impl.faults import fault_point; fault_point(\"blit.mid\")' >/dev/null 2>&1 &")
    assert machine.wait_for_fault(120) == "blit.mid"
    machine.crash_on_fault = False
    assert not machine.running and qemu_children() == []
    assert machine.exit_status == -signal.SIGKILL  # a SIGKILL, not a quit
    machine.start()
    assert len(machine.boots) == 2
    mount_sut(machine)
    assert machine.succeed("cat /mnt/sut/synced") == "durable\n"
    machine.fail("test -e /mnt/sut/unsynced")  # lost with the guest's page cache


def test_clean_reboot_keeps_unsynced_data(machine):
    # self-contained: pytest-xdist may run this test on a worker where the tests before it did not run
    mount_sut(machine) if "/mnt/sut" not in machine.succeed("cat /proc/mounts") else None
    boots = len(machine.boots)
    machine.succeed("echo kept > /mnt/sut/written-before-reboot")
    machine.reboot()
    assert len(machine.boots) == boots + 1
    mount_sut(machine)
    assert machine.succeed("cat /mnt/sut/written-before-reboot") == "kept\n"


def test_qmp_status_events_and_reset(machine, tmp_path):
    qmp = machine.qmp()
    assert qmp.status() == "running"
    qmp.execute("stop")
    assert qmp.status() == "paused"
    assert any(event["event"] == "STOP" for event in qmp.events(5))
    qmp.execute("cont")
    assert machine.succeed("echo alive") == "alive\n"
    with pytest.raises(Exception):
        qmp.screendump(tmp_path / "screen.ppm")  # no display device on a serial-console guest
    qmp.system_reset()  # with -no-reboot a reset ends the QEMU process
    machine.wait_for_exit(60)
    assert not machine.running


def test_agent_that_cannot_start_fails_cleanly(kernel, accel):
    config = agent_config(kernel, accel, python="/nonexistent/python3")
    guest = Machine(config, name="broken", boot_timeout=120)
    with pytest.raises(VmError) as info:
        with guest:
            pass
    assert "STONELAB-AGENT-EXITED" in str(info.value) or "before the guest agent was ready" in str(info.value)
    assert qemu_children() == [] and not guest.workdir.exists()
