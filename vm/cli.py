"""``stonelab vm run|shell|probe``: boot a lab guest, run a command in it, or get a shell."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vm.accel import ACCELS, AccelChoice, AccelSelector
from vm.host import default_kernel, kernel_from_path, qemu_binary
from vm.machine import Machine, _die_with_parent, agent_config, uefi_config
from vm.qemu import CACHE_MODES, DEFAULT_CACHE, DiskSpec, qemu_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("vm", help="boot lab guests in QEMU (KVM where it really works, else TCG)")
    sub = parser.add_subparsers(dest="vm_command", metavar="VM_COMMAND")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kernel", type=Path, help="guest kernel (default: the newest /boot/vmlinuz-*)")
        p.add_argument("--accel", choices=ACCELS, default="auto",
                       help="accelerator; auto probes KVM with a short test boot and falls back to TCG")
        p.add_argument("--disk", type=Path, action="append", default=[],
                       help="attach a raw disk image as virtio-blk (/dev/vda, /dev/vdb, ...)")
        p.add_argument("--cache", choices=CACHE_MODES, default=DEFAULT_CACHE,
                       help=f"QEMU disk cache mode (default {DEFAULT_CACHE}; see docs/ARCHITECTURE.md)")
        p.add_argument("--memory", type=int, default=1024, help="guest memory in MiB (default 1024)")
        p.add_argument("--cpus", type=int, default=1)

    run = sub.add_parser("run", help="boot, run CMD in the guest, print its output, exit with its status")
    common(run)
    run.add_argument("--uefi", type=Path, metavar="DISK",
                     help="boot OVMF → the bootloader on DISK's ESP instead of the kernel directly")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds the command may take")
    run.add_argument("--console-log", type=Path, help="keep the serial console log here")
    run.add_argument("cmd", nargs=argparse.REMAINDER,
                     help="-- CMD [ARG ...]: run exactly these words in the guest (no shell: use -- sh -c '...')")
    run.set_defaults(func=cmd_run)

    shell = sub.add_parser("shell", help="an interactive shell on the guest console (exit it to power off)")
    common(shell)
    shell.set_defaults(func=cmd_shell)

    probe = sub.add_parser("probe", help="show which accelerator guests would use, and why")
    probe.add_argument("--kernel", type=Path)
    probe.add_argument("--accel", choices=ACCELS, default="auto")
    probe.set_defaults(func=cmd_probe)


def _kernel(args):
    return kernel_from_path(args.kernel) if args.kernel else default_kernel()


def _choose(args, kernel) -> AccelChoice:
    choice = AccelSelector().choose(kernel, args.accel)
    print(f"stonelab: {choice.describe()}", file=sys.stderr)  # user-facing: which accelerator, and why
    return choice


def _disks(args) -> list[DiskSpec]:
    from vm.errors import VmError

    for disk in args.disk:
        if not disk.is_file():
            raise VmError(f"{disk}: disk image not found")
    return [DiskSpec(disk.resolve(), cache=args.cache) for disk in args.disk]


def cmd_probe(args) -> int:
    kernel = _kernel(args)
    choice = AccelSelector().choose(kernel, args.accel)
    print(f"{choice.accel}\t{choice.reason}")
    return 0


def cmd_run(args) -> int:
    from vm.errors import VmError

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise VmError("stonelab vm run: no command given (usage: stonelab vm run [options] -- CMD ...)")
    qemu_binary()
    kernel = _kernel(args)
    choice = _choose(args, kernel)
    config = agent_config(kernel, choice, _disks(args), memory_mb=args.memory, cpus=args.cpus)
    if args.uefi:
        if not args.uefi.is_file():
            raise VmError(f"{args.uefi}: disk image not found")
        config = uefi_config(choice, DiskSpec(args.uefi.resolve(), cache=args.cache), extra_disks=config.disks,
                             memory_mb=args.memory, cpus=args.cpus)
    with Machine(config, console_log=args.console_log) as machine:
        result = machine.execute(command, timeout=args.timeout)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        sys.stdout.flush()
        if result.timed_out:
            print(f"stonelab: the guest command timed out after {args.timeout:g}s", file=sys.stderr)
        machine.shutdown()
    return exit_status(result)


def exit_status(result) -> int:
    """The guest command's status as a shell reports it: its exit code, 128+N when killed by signal N, 124 when
    it ran out of time (as timeout(1))."""
    if result.timed_out:
        return 124
    if result.exit_code < 0:
        return 128 - result.exit_code
    return result.exit_code


def cmd_shell(args) -> int:
    qemu = qemu_binary()
    kernel = _kernel(args)
    choice = _choose(args, kernel)
    config = agent_config(kernel, choice, _disks(args), memory_mb=args.memory, cpus=args.cpus, mode="shell")
    workdir = Path(tempfile.mkdtemp(prefix="stonelab-vm-shell-"))
    try:
        argv = qemu_args(config, workdir)
        argv[argv.index("-serial") + 1] = "mon:stdio"  # Ctrl-A x quits QEMU, Ctrl-C goes to the guest
        argv[argv.index("-monitor"):argv.index("-monitor") + 2] = []
        print("stonelab: guest shell on the serial console; `exit` powers off, Ctrl-A x kills the guest",
              file=sys.stderr)
        return subprocess.run([qemu, *argv], preexec_fn=_die_with_parent).returncode
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
