"""Host-side prerequisites: QEMU, the guest kernel, OVMF, systemd-boot — each missing one named with its package."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from stonelab.uapi_version import version_key
from vm.errors import MissingHostTool

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
BUSYBOX = Path("/bin/busybox")


def require_program(name: str, package: str, path: str | None = None) -> str:
    """Absolute path of ``name`` on PATH, or a one-line error naming the Debian package."""
    found = shutil.which(name, path=path)
    if not found:
        raise MissingHostTool(f"{name}: not found on PATH (install the Debian package {package}: "
                              f"apt-get install -y {package})")
    return found


def require_file(path: Path, package: str, what: str) -> Path:
    if not path.is_file():
        raise MissingHostTool(f"{path}: {what} is missing (install the Debian package {package}: "
                              f"apt-get install -y {package})")
    return path


def qemu_binary(path: str | None = None) -> str:
    return require_program("qemu-system-x86_64", "qemu-system-x86", path)


def busybox_binary(path: Path = BUSYBOX) -> Path:
    return require_file(path, "busybox-static", "the static busybox for the guest initramfs")


def ovmf_files(code: Path = OVMF_CODE, variables: Path = OVMF_VARS) -> tuple[Path, Path]:
    return (require_file(code, "ovmf", "the UEFI firmware (OVMF code)"),
            require_file(variables, "ovmf", "the UEFI variable store template (OVMF vars)"))


def systemd_boot(path: Path = SYSTEMD_BOOT) -> Path:
    return require_file(path, "systemd-boot-efi", "the systemd-boot EFI binary")


@dataclass(frozen=True)
class Kernel:
    """A guest Linux kernel and the module tree that belongs to it (``modules`` may be absent)."""

    image: Path
    release: str
    modules: Path

    @property
    def has_modules(self) -> bool:
        return self.modules.is_dir()


def default_kernel(boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> Kernel:
    """The newest ``/boot/vmlinuz-*`` (Debian's linux-image-amd64) by the UAPI version rules."""
    images = sorted(boot_dir.glob("vmlinuz-*"), key=lambda p: version_key(p.name[len("vmlinuz-"):]))
    if not images:
        raise MissingHostTool(f"{boot_dir}: no vmlinuz-* kernel found (install the Debian package "
                              f"linux-image-amd64: apt-get install -y linux-image-amd64, or pass --kernel)")
    return kernel_from_path(images[-1], modules_root)


def kernel_from_path(image: Path, modules_root: Path = Path("/lib/modules")) -> Kernel:
    image = Path(image)
    if not image.is_file():
        raise MissingHostTool(f"{image}: kernel image not found (install the Debian package linux-image-amd64 "
                              f"or pass an existing --kernel)")
    if not os.access(image, os.R_OK):
        raise MissingHostTool(f"{image}: kernel image is not readable")
    name = image.name
    release = name[len("vmlinuz-"):] if name.startswith("vmlinuz-") else ""
    return Kernel(image=image.resolve(), release=release, modules=modules_root / release if release else
                  modules_root / "__none__")
