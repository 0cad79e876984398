"""Synchronise the ESP with the states on disk (blsforme's job), crash-safely, and report on it.

Order on the ESP: stale entries are removed first, then kernels no remaining entry references; bootloader and
kernel files are written (each atomically); ``boot.mid``; ``loader.conf`` and the entries last; then any other
stale kernel files.  So an entry never names a file that is not completely on the ESP.  The space needed is
checked before anything changes: a full ESP (moss #866) is a one-line error that leaves the ESP as it was.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reference_impl import mutants
from reference_impl.boot.device import (mount_of, parse_volume_spec, read_mountinfo, root_argument_for_path,
                                        root_argument_for_spec, volume_of_mount)
from reference_impl.boot.entries import (ENTRIES_DIR, LOADER_CONF, BootPlan, entry_files, entry_fstx, parse_entry,
                                         plan_boot)
from reference_impl.boot.esp import (TMP_SUFFIX, DirectoryEsp, EspFullError, EspMissingError, EspNotFatError,
                                     EspTarget, MtoolsEsp, format_fat)
from reference_impl.boot.gpt import EFIVARS_DIR, find_boot_partition, find_esp, has_gpt, read_gpt
from reference_impl.boot.states import active_state_id, bootable_states, read_state_ids, state_tree
from reference_impl.faults import fault_point

HOST_SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
ENTRY_LIMIT = 5


@dataclass(frozen=True)
class EspLocation:
    target: EspTarget
    image: Path | None = None      # set when the ESP can be (re)formatted: image/device, offset, size
    offset: int = 0
    size: int = 0
    loader: EspTarget | None = None  # the ESP, for systemd-boot, when ``target`` is an XBOOTLDR partition


@dataclass
class SyncReport:
    esp: str
    entries: list[str] = field(default_factory=list)
    default_entry: str | None = None
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    states_without_tree: list[int] = field(default_factory=list)
    formatted: bool = False
    notes: list[str] = field(default_factory=list)


# -- finding the ESP ------------------------------------------------------------------------------------------------

def _image_location(path: Path, efivars: Path) -> EspLocation:
    if has_gpt(path):
        disk = read_gpt(path)
        part = find_boot_partition(disk, efivars)
        if part is None:
            raise EspMissingError(f"{path}: the GPT has no ESP or XBOOTLDR partition (deleted or retyped?)")
        loader = None
        if part.is_xbootldr:
            esp = find_esp(disk, efivars)
            if esp is None:
                raise EspMissingError(f"{path}: XBOOTLDR partition {part.number} but no ESP for the bootloader")
            loader = MtoolsEsp(path, esp.offset)
        return EspLocation(MtoolsEsp(path, part.offset), path, part.offset, part.size, loader)
    size = _device_size(path)
    return EspLocation(MtoolsEsp(path, 0), path, 0, size)


def _device_size(path: Path) -> int:
    with open(path, "rb") as dev:
        return dev.seek(0, os.SEEK_END)


def resolve_esp(esp: EspTarget | Path | str | None, root: Path, *, efivars: Path = EFIVARS_DIR,
                require_vfat: bool = True) -> EspLocation:
    """An ESP given as a mounted directory, a FAT image/device, a GPT disk image (its ESP), ``IMG:PARTNUM``,
    an EspTarget, or None: discovered (a vfat mount at <root>/boot, /efi or /boot/efi, else the GPT of the disk
    holding <root>, preferring the partition named by LoaderDevicePartUUID)."""
    if esp is None:
        return discover_esp(root, efivars=efivars)
    if not isinstance(esp, (str, Path)):
        return EspLocation(esp)
    path = Path(esp)
    if path.is_dir():
        return EspLocation(DirectoryEsp(path, require_vfat=require_vfat))
    if path.exists():
        return _image_location(path, efivars)
    volume = parse_volume_spec(str(esp))
    if volume.partition is None:
        return _image_location(Path(volume.path), efivars)
    return EspLocation(MtoolsEsp(Path(volume.path), volume.offset), Path(volume.path), volume.offset, volume.size)


def discover_esp(root: Path, *, efivars: Path = EFIVARS_DIR,
                 mountinfo: Path = Path("/proc/self/mountinfo"), sysfs: Path = Path("/sys")) -> EspLocation:
    mounts = read_mountinfo(mountinfo)
    for sub in ("boot", "efi", "boot/efi"):
        candidate = Path(os.path.realpath(root / sub))
        mount = mount_of(candidate, mounts)
        if mount is not None and mount.mount_point == str(candidate) and mount.fstype in ("vfat", "msdos"):
            return EspLocation(DirectoryEsp(candidate, mountinfo=mountinfo))
    mount = mount_of(root, mounts)
    if mount is None:
        raise EspMissingError(f"{root}: no ESP found (not mounted at /boot or /efi, and {root} is on no known "
                              f"mount); pass --esp")
    volume = volume_of_mount(mount, sysfs)
    if volume.partition is None:
        raise EspMissingError(f"{root}: no ESP found ({volume.path} is not a GPT partition); pass --esp")
    disk_node = Path("/dev") / Path(os.path.realpath(sysfs / "dev" / "block" / mount.major_minor)).parent.name
    return _image_location(disk_node, efivars)


# -- sync -----------------------------------------------------------------------------------------------------------

def find_bootloader(tree: Path | None) -> Path | None:
    if tree is not None:
        for lib in ("lib", "lib64"):
            candidate = tree / lib / "systemd" / "boot" / "efi" / "systemd-bootx64.efi"
            if candidate.is_file():
                return candidate
    return HOST_SYSTEMD_BOOT if HOST_SYSTEMD_BOOT.is_file() else None


def _is_ours(text: str, root_arg: str) -> bool:
    """An entry this root wrote: it carries moss.fstx= and this root's root= (another installation sharing the
    ESP writes entries of the same shape for its own root)."""
    if entry_fstx(text) is None:
        return False
    words = {w for options in parse_entry(text).get("options", []) for w in options.split()}
    return set(root_arg.split()) <= words


def _round_up(size: int, cluster: int) -> int:
    return -(-size // cluster) * cluster if size else 0


def _differs(target: EspTarget, esp_path: str, source: Path | bytes) -> bool:
    current = target.read(esp_path)
    if current is None:
        return True
    if isinstance(source, bytes):
        return current != source
    if len(current) != source.stat().st_size:
        return True
    return current != source.read_bytes()


def sync_boot(root: Path, *, esp: EspTarget | Path | str | None = None, root_arg: str | None = None,
              root_device: str | None = None, efivars: Path = EFIVARS_DIR, target: int | None = None,
              limit: int = ENTRY_LIMIT, bootloader: Path | None = None, rebuild: bool = False,
              require_vfat: bool = True, environ: Mapping[str, str] | None = None) -> SyncReport:
    """Make the ESP boot the target (default: active) state and up to ``limit - 1`` other states."""
    root = Path(root)
    location = resolve_esp(esp, root, efivars=efivars, require_vfat=require_vfat)
    esp_target = location.target
    report = SyncReport(esp_target.describe())
    try:
        esp_target.check()
    except EspNotFatError:
        if not rebuild or location.image is None:
            raise
        format_fat(location.image, location.offset, location.size)
        report.formatted = True
        esp_target.check()
    if root_arg is None:
        if root_device is not None:
            root_arg = root_argument_for_spec(root_device)
        else:
            root_arg = root_argument_for_path(root)
    states, report.states_without_tree = bootable_states(root, limit, target)
    target_id = target if target is not None else active_state_id(root)
    target_state = next((s for s in states if s.id == target_id), states[0] if states else None)
    if bootloader is None:
        bootloader = find_bootloader(target_state.tree if target_state else None)
    if bootloader is None:
        report.notes.append("no systemd-boot binary in the state or on the host: bootloader not installed")
    if location.loader is not None and bootloader is not None:
        # $BOOT is XBOOTLDR: kernels and entries go there, systemd-boot itself onto the ESP.
        location.loader.check()
        for path in plan_boot([], root_arg, bootloader).files:
            if _differs(location.loader, path, bootloader):
                location.loader.write_atomic(path, bootloader)
                report.written.append(f"ESP:{path}")
        bootloader = None
    plan = plan_boot(states, root_arg, bootloader, target_id)
    if not plan.entries:
        report.notes.append("no state has a kernel in usr/lib/kernel/<version>/vmlinuz: no boot entries")
    for state_id in report.states_without_tree:
        report.notes.append(f"state {state_id}: tree is gone, no boot entry")
    _apply(esp_target, plan, root_arg, report, environ)
    return report


def _apply(esp: EspTarget, plan: BootPlan, root_arg: str, report: SyncReport,
           environ: Mapping[str, str] | None) -> None:
    existing = esp.list_files()
    wanted_entries = {entry.path.casefold() for entry in plan.entries}
    wanted_files = {path.casefold() for path in plan.files}

    # Entries this root wrote (moss.fstx= and our root=) that are no longer wanted; files any other entry on the
    # ESP references (another installation, a hand-written entry) are never touched.
    ours: dict[str, str] = {}
    foreign_refs: set[str] = set()
    for path in existing:
        if path.casefold().startswith(ENTRIES_DIR + "/") and path.endswith(".conf"):
            text = (esp.read(path) or b"").decode(errors="replace")
            if _is_ours(text, root_arg):
                ours[path] = text
            else:
                foreign_refs |= {ref.casefold() for ref in entry_files(text)}
    stale_entries = [p for p in ours if p.casefold() not in wanted_entries]
    kept_refs = foreign_refs | {ref.casefold() for p, text in ours.items() if p not in stale_entries
                                for ref in entry_files(text)}
    managed_dirs = {p.rsplit("/", 2)[0].casefold() + "/" for p in plan.files if p.startswith("EFI/")
                    and p.count("/") >= 3}
    managed_dirs |= {ref.rsplit("/", 2)[0].casefold() + "/" for text in ours.values()
                     for ref in entry_files(text) if ref.count("/") >= 3}

    def managed(path: str) -> bool:
        folded = path.casefold()
        return any(folded.startswith(d) for d in managed_dirs) and not folded.startswith(ENTRIES_DIR + "/")

    stale_files = [p for p in existing if p.casefold() not in wanted_files | foreign_refs and managed(p)]
    leftovers = [p for p in existing if p.endswith(TMP_SUFFIX) and (
        managed(p) or p.casefold().startswith("loader/") or p[:-len(TMP_SUFFIX)].casefold() in wanted_files)]

    writes: list[tuple[str, Path | bytes]] = [(p, s) for p, s in plan.files.items() if _differs(esp, p, s)]
    late: list[tuple[str, Path | bytes]] = [(LOADER_CONF, plan.loader_conf.encode())]
    late += [(e.path, e.text.encode()) for e in reversed(plan.entries)]   # the default entry last
    late = [(p, s) for p, s in late if _differs(esp, p, s)]

    # Space check before touching anything (moss #866: ENOSPC half-way leaves a mess).
    cluster = max(esp.cluster_size(), 512)
    need = sum(_round_up(s.stat().st_size if isinstance(s, Path) else len(s), cluster) for _p, s in writes + late)
    need += 8 * cluster   # new directories and long-name slots
    reclaim = sum(_round_up(len(esp.read(p) or b""), cluster) for p in stale_entries + stale_files + leftovers)
    free = esp.free_bytes()
    if writes and need > free + reclaim:
        raise EspFullError(f"{esp.describe()}: full: {need} bytes needed for {len(writes)} new files, {free} free "
                           f"and {reclaim} reclaimable; nothing changed, existing entries still boot")

    def remove(path: str) -> None:
        esp.remove(path)
        report.removed.append(path)

    for path in leftovers:
        remove(path)
    for path in stale_entries:
        remove(path)
    early = [p for p in stale_files if p.casefold() not in kept_refs]
    for path in early:
        remove(path)
    if mutants.active("boot-entry-before-kernel", environ):
        writes, late = late, writes
    for path, source in writes:
        esp.write_atomic(path, source)
        report.written.append(path)
    fault_point("boot.mid", environ)
    for path, source in late:
        esp.write_atomic(path, source)
        report.written.append(path)
    for path in stale_files:
        if path not in early:
            remove(path)
    for directory in sorted({p.rsplit("/", 1)[0] for p in report.removed if "/" in p}, reverse=True):
        esp.remove_empty_dirs(directory)
    report.entries = [e.name for e in plan.entries]
    report.default_entry = plan.default_entry


# -- status ---------------------------------------------------------------------------------------------------------

@dataclass
class EntryStatus:
    name: str
    state_id: int | None
    title: str
    missing_files: list[str]
    state_tree_exists: bool


@dataclass
class BootStatus:
    esp: str
    active_state: int | None
    states: list[int]
    entries: list[EntryStatus]
    default_entry: str | None
    problems: list[str]


def boot_status(root: Path, *, esp: EspTarget | Path | str | None = None, efivars: Path = EFIVARS_DIR,
                require_vfat: bool = True) -> BootStatus:
    """What the ESP would boot, and every way it disagrees with the states on disk."""
    root = Path(root)
    location = resolve_esp(esp, root, efivars=efivars, require_vfat=require_vfat)
    target = location.target
    target.check()
    files = target.list_files()
    folded = {p.casefold() for p in files}
    active = active_state_id(root)
    ids = read_state_ids(root)
    problems: list[str] = []
    entries: list[EntryStatus] = []
    for path in files:
        if not (path.casefold().startswith(ENTRIES_DIR + "/") and path.endswith(".conf")):
            continue
        text = (target.read(path) or b"").decode(errors="replace")
        fstx = entry_fstx(text)
        missing = [ref for ref in entry_files(text) if ref.casefold() not in folded]
        tree_ok = fstx is not None and fstx in ids and state_tree(root, fstx, active).is_dir()
        title = (parse_entry(text).get("title") or [""])[0]
        name = path.rsplit("/", 1)[-1]
        entries.append(EntryStatus(name, fstx, title, missing, tree_ok))
        if missing:
            problems.append(f"entry {name}: references missing {', '.join(missing)}")
        if fstx is not None and not tree_ok:
            problems.append(f"entry {name}: state {fstx} has no tree on disk (boots into emergency mode)")
    conf = (target.read(LOADER_CONF) or b"").decode(errors="replace")
    default = next((v for v in parse_entry(conf).get("default", [])), None)
    if active is not None and not any(e.state_id == active for e in entries):
        problems.append(f"active state {active} has no boot entry")
    if default is not None:
        default = default.strip('"')
        active_entries = [e.name for e in entries if e.state_id == active]
        if active_entries and default not in active_entries:
            problems.append(f"default entry {default} does not boot the active state {active}")
    loader_files = files if location.loader is None else location.loader.list_files()
    if not any(f.casefold() == "efi/boot/bootx64.efi" for f in loader_files):
        problems.append("no EFI/BOOT/BOOTX64.EFI on the ESP: the firmware finds no bootloader")
    return BootStatus(target.describe(), active, ids, entries, default, problems)

