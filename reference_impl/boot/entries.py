"""Type 1 boot entries (Boot Loader Specification) for states, and the files they need on the ESP.

Pure planning: from states to the ESP paths to write.  The entry format is blsforme's, minus the blank line
after ``linux`` (blsforme #71 — it breaks GRUB's BLS parser).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import xxhash

from reference_impl import mutants
from reference_impl.boot.esp import EspError
from reference_impl.boot.states import BootState, Kernel

ENTRIES_DIR = "loader/entries"
LOADER_CONF = "loader/loader.conf"
FSTX_OPTION = "moss.fstx="


@dataclass(frozen=True)
class Entry:
    name: str          # file name in loader/entries
    state_id: int
    kernel_version: str
    text: str

    @property
    def path(self) -> str:
        return f"{ENTRIES_DIR}/{self.name}"


@dataclass(frozen=True)
class BootPlan:
    files: dict[str, Path]      # ESP path -> source file (bootloader binaries, kernels, initrds)
    entries: list[Entry]        # newest state first
    loader_conf: str
    default_entry: str | None


def entry_name(state: BootState, kernel: Kernel, token: str | None = None) -> str:
    """``<entry token>-<kernel version>-<state id>.conf`` (the token defaults to the state's os-release ID)."""
    return f"{token or state.os_id}-{kernel.version}-{state.id}.conf"


def entry_text(state: BootState, kernel: Kernel, kernel_dir: str, root_arg: str) -> str:
    lines = [f"title {state.pretty_name} ({kernel.version})", f"linux /{kernel_dir}/vmlinuz"]
    lines += [f"initrd /{kernel_dir}/{initrd.name}" for initrd in kernel.initrds]
    options = [root_arg, "rw", *state.cmdline, f"{FSTX_OPTION}{state.id}"]
    lines.append("options " + " ".join(o for o in options if o))
    return "\n".join(lines) + "\n"


def _content_key(kernel: Kernel) -> str:
    digest = xxhash.xxh3_64()
    for path in (kernel.vmlinuz, *kernel.initrds):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


BOOTLOADER_PATHS = ("EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi")


def _blocked(directory: str, names: list[str], avoid: frozenset[str]) -> bool:
    """A file of ``avoid`` (casefolded ESP paths) sits at ``directory/<name>``, or at ``directory`` or one of its
    parents, where a directory would have to be."""
    parts = directory.split("/")
    prefixes = ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return any(p.casefold() in avoid for p in prefixes) or any(f"{directory}/{n}".casefold() in avoid
                                                                for n in names)


def plan_boot(states: list[BootState], root_arg: str, bootloader: Path | None,
              target: int | None = None, *, token: str | None = None,
              avoid: frozenset[str] = frozenset()) -> BootPlan:
    """Entries for every kernel of every state (newest state first, each state's newest kernel first) and the
    files they reference.

    Kernels live in ``EFI/<token>/<kver>/`` (token: the entry token, default the state's os-release ID); when
    two states ship different files under the same kernel version the older one gets ``<kver>-<content hash>``
    so that neither entry boots the other's kernel, and so does a kernel whose directory would hit one of
    ``avoid`` (casefolded ESP paths of files this installation does not own).  The default entry is the target
    state's newest kernel.  Raises EspError when no directory is free.
    """
    files: dict[str, Path] = {}
    entries: list[Entry] = []
    dirs: dict[tuple[str, str], str] = {}           # (os_id, content key) -> ESP dir
    taken: set[str] = set()
    for state in sorted(states, key=lambda s: s.id, reverse=True):
        for kernel in state.kernels:
            key = (token or state.os_id, _content_key(kernel))
            kernel_dir = dirs.get(key)
            if kernel_dir is None:
                names = ["vmlinuz", *(initrd.name for initrd in kernel.initrds)]
                base = f"EFI/{key[0]}/{kernel.version}"
                kernel_dir = next((d for d in (base, f"{base}-{key[1][:8]}", f"{base}-{key[1]}")
                                   if d not in taken and not _blocked(d, names, avoid)), None)
                if kernel_dir is None:
                    raise EspError(f"no free directory for kernel {kernel.version} below EFI/{key[0]}/: files "
                                   f"this installation did not write are in the way")
                dirs[key] = kernel_dir
                taken.add(kernel_dir)
                files[f"{kernel_dir}/vmlinuz"] = kernel.vmlinuz
                for initrd in kernel.initrds:
                    files[f"{kernel_dir}/{initrd.name}"] = initrd
            entries.append(Entry(entry_name(state, kernel, token), state.id, kernel.version,
                                 entry_text(state, kernel, kernel_dir, root_arg)))
    if bootloader is not None:
        for path in BOOTLOADER_PATHS:
            files[path] = bootloader
    default = next((e.name for e in entries if e.state_id == target), entries[0].name if entries else None)
    # An exact default (not blsforme's "<os-id>*" glob, which picks the highest kernel version rather than the
    # state just activated — moss #586).
    if default and mutants.active("glob-default-entry"):
        default = default.split("-")[0] + "*"  # blsforme's "<os-id>*" (moss #586)
    loader_conf = f"default {default}\ntimeout 3\n" if default else "timeout 3\n"
    return BootPlan(files, entries, loader_conf, default)


def merge_loader_conf(current: bytes | None, plan: BootPlan) -> bytes:
    """``loader.conf`` with the plan's ``default`` line and every other line of ``current`` kept (the file is
    shared: another installation, bootctl or the user may have set ``timeout``, ``console-mode``, ...)."""
    if current is None or plan.default_entry is None:
        return plan.loader_conf.encode() if current is None else current
    lines = current.decode(errors="replace").splitlines()
    line = f"default {plan.default_entry}"
    at = next((i for i, text in enumerate(lines) if text.split(maxsplit=1)[:1] == ["default"]), None)
    if at is None:
        lines.insert(0, line)
    else:
        lines[at] = line
    return ("\n".join(lines) + "\n").encode()


def parse_entry(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            fields.setdefault(key, []).append(value.strip())
    return fields


_CMDLINE_WORD = re.compile(r'(?:[^\s"]|"[^"]*(?:"|$))+')


def cmdline_words(options: str) -> list[str]:
    """The parameters of a kernel command line as the kernel splits them (``next_arg()`` in kernel/params.c):
    at blanks outside double quotes, so ``rootflags="subvol=/my root"`` is one word (quotes kept)."""
    return _CMDLINE_WORD.findall(options)


def entry_fstx(text: str) -> int | None:
    for options in parse_entry(text).get("options", []):
        for word in cmdline_words(options):
            if word.startswith(FSTX_OPTION) and word[len(FSTX_OPTION):].isdigit():
                return int(word[len(FSTX_OPTION):])
    return None


def entry_files(text: str) -> list[str]:
    """ESP paths an entry references (linux, initrd, efi), relative, as written."""
    fields = parse_entry(text)
    return [value.lstrip("/") for key in ("linux", "initrd", "efi") for value in fields.get(key, [])]
