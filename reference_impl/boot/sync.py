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
from reference_impl.boot.device import (check_disk_path, mount_of, parse_volume_spec, read_mountinfo, root_argument_for_path,
                                        root_argument_for_spec, volume_of_mount)
from reference_impl.boot.entries import (BOOTLOADER_PATHS, ENTRIES_DIR, LOADER_CONF, BootPlan, entry_files,
                                         entry_fstx, entry_name, merge_loader_conf, parse_entry, plan_boot)
from reference_impl.boot.ownership import (choose_token, configured_token, entry_root, format_record, is_ours,
                                           parse_record, record_path, remember_root, remembered_root)
from reference_impl.boot.esp import (TMP_SUFFIX, DirectoryEsp, EspFullError, EspMissingError, EspNotFatError,
                                     EspTarget, MtoolsEsp, format_fat)
from reference_impl.boot.gpt import EFIVARS_DIR, find_boot_partition, find_esp, has_gpt, read_gpt
from reference_impl.boot.states import (DEFAULT_OS_ID, active_state_id, bootable_states, read_state_ids,
                                        state_tree)
from reference_impl.faults import fault_point
from stonelab.errors import StonelabError

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
    entry_token: str | None = None


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
        check_disk_path(path)
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
              require_vfat: bool = True, environ: Mapping[str, str] | None = None, dry_run: bool = False,
              trees: Mapping[int, Path] | None = None) -> SyncReport:
    """Make the ESP boot the target (default: active) state and up to ``limit - 1`` other states.

    ``dry_run``: plan and check that everything fits (raising ``EspFullError`` when it cannot), write nothing —
    not even ``.moss/boot-root``. ``trees`` (state id -> its /usr) reads states from elsewhere than their place:
    a transaction checks the boot of a tree still in staging before its swap."""
    root = Path(root)
    location = resolve_esp(esp, root, efivars=efivars, require_vfat=require_vfat)
    esp_target = location.target
    report = SyncReport(esp_target.describe())
    try:
        esp_target.check()
    except EspNotFatError:
        if not rebuild or location.image is None or dry_run:
            raise
        format_fat(location.image, location.offset, location.size)
        report.formatted = True
        esp_target.check()
    if root_arg is None:
        if root_device is not None:
            root_arg = root_argument_for_spec(root_device)
        else:
            root_arg = root_argument_for_path(root)
    states, report.states_without_tree = bootable_states(root, limit, target, trees)
    problem = None if dry_run else remember_root(root, root_arg)
    if problem:
        report.notes.append(problem)
    target_id = target if target is not None else active_state_id(root)
    target_state = next((s for s in states if s.id == target_id), states[0] if states else None)
    if bootloader is None:
        bootloader = find_bootloader(target_state.tree if target_state else None)
    if bootloader is None:
        report.notes.append("no systemd-boot binary in the state or on the host: bootloader not installed")
    if location.loader is not None and bootloader is not None and not dry_run:
        # $BOOT is XBOOTLDR: kernels and entries go there, systemd-boot itself onto the ESP.
        location.loader.check()
        on_esp = {p.casefold(): p for p in location.loader.list_files()}
        for path in BOOTLOADER_PATHS:
            if not _may_replace_bootloader(location.loader, path, on_esp):
                report.notes.append(f"ESP:{path} is another boot loader (not systemd-boot): left alone")
            elif _differs(location.loader, path, bootloader):
                location.loader.write_atomic(path, bootloader)
                report.written.append(f"ESP:{path}")
        bootloader = None
    existing = esp_target.list_files()
    entries = _read_entries(esp_target, existing)
    os_id = target_state.os_id if target_state else DEFAULT_OS_ID
    token = configured_token(root, os_id, target_state.image_id if target_state else None)
    token = choose_token(token, root_arg, entries,
                         [entry_name(state, kernel, token.value) for state in states for kernel in state.kernels])
    owned = _owned_files(esp_target, existing, entries, root_arg)
    bootloader_paths = {p.casefold() for p in BOOTLOADER_PATHS}
    avoid = frozenset(p.casefold() for p in existing if p not in owned and p.casefold() not in bootloader_paths)
    plan = plan_boot(states, root_arg, bootloader, target_id, token=token.value, avoid=avoid)
    report.entry_token = token.value
    if not plan.entries:
        report.notes.append("no state has a kernel in usr/lib/kernel/<version>/vmlinuz: no boot entries")
    for state_id in report.states_without_tree:
        report.notes.append(f"state {state_id}: tree is gone, no boot entry")
    _apply(esp_target, plan, root_arg, report, environ, existing, entries, owned, dry_run)
    return report


def _read_entries(esp: EspTarget, existing: list[str]) -> dict[str, str]:
    """Every Type 1 entry on the ESP: path -> text."""
    return {path: (esp.read(path) or b"").decode(errors="replace") for path in existing
            if path.casefold().startswith(ENTRIES_DIR + "/") and path.casefold().endswith(".conf")}


def _owned_files(esp: EspTarget, existing: list[str], entries: dict[str, str], root_arg: str) -> set[str]:
    """ESP paths (as listed) this installation owns: in its ownership record, or referenced by its entries."""
    recorded = {p.casefold() for p in parse_record(esp.read(record_path(root_arg)))}
    recorded |= {ref.casefold() for text in entries.values() if is_ours(text, root_arg) for ref in entry_files(text)}
    bootloader_paths = {p.casefold() for p in BOOTLOADER_PATHS}
    return {p for p in existing if p.casefold() in recorded and p.casefold() not in bootloader_paths}


def _apply(esp: EspTarget, plan: BootPlan, root_arg: str, report: SyncReport, environ: Mapping[str, str] | None,
           existing: list[str], entries: dict[str, str], owned: set[str], dry_run: bool = False) -> None:
    folded_existing = {p.casefold(): p for p in existing}
    wanted_entries = {entry.path.casefold() for entry in plan.entries}
    kernel_files = {p: src for p, src in plan.files.items() if p not in BOOTLOADER_PATHS}
    wanted_files = {path.casefold() for path in plan.files}
    record = record_path(root_arg)

    # Entries this installation wrote (moss.fstx= and its root=) that are no longer wanted; files any other entry
    # on the ESP references (another installation, a hand-written entry) are never touched.
    ours = {path: text for path, text in entries.items() if is_ours(text, root_arg)}
    foreign_refs = {ref.casefold() for path, text in entries.items() if path not in ours
                    for ref in entry_files(text)}
    stale_entries = [p for p in ours if p.casefold() not in wanted_entries]
    kept_refs = foreign_refs | {ref.casefold() for p, text in ours.items() if p not in stale_entries
                                for ref in entry_files(text)}
    stale_files = [p for p in sorted(owned) if p.casefold() not in wanted_files | foreign_refs]
    own_targets = wanted_files | {p.casefold() for p in ours} | wanted_entries | {p.casefold() for p in owned}
    own_targets |= {LOADER_CONF.casefold(), record.casefold()}
    leftovers = [p for p in existing if p.endswith(TMP_SUFFIX) and p[:-len(TMP_SUFFIX)].casefold() in own_targets]

    writes: list[tuple[str, Path | bytes]] = []
    for path, source in plan.files.items():
        if path in BOOTLOADER_PATHS and not _may_replace_bootloader(esp, path, folded_existing):
            report.notes.append(f"{path} is another boot loader (not systemd-boot): left alone")
            continue
        if _differs(esp, path, source):
            writes.append((path, source))
    loader_conf = merge_loader_conf(esp.read(LOADER_CONF), plan)
    late: list[tuple[str, Path | bytes]] = [(LOADER_CONF, loader_conf)]
    late += [(e.path, e.text.encode()) for e in reversed(plan.entries)]   # the default entry last
    late = [(p, s) for p, s in late if _differs(esp, p, s)]

    previous = parse_record(esp.read(record))
    before = previous | {p for p in owned} | set(kernel_files)          # recorded before the first copy
    removed = set(stale_files)
    after = (before - removed) & ({p for p in owned} | set(kernel_files))
    record_before = format_record(root_arg, before) if set(kernel_files) - previous - set(owned) else None

    # Space check before touching anything (moss #866: ENOSPC half-way leaves a mess).
    cluster = max(esp.cluster_size(), 512)
    need = sum(_round_up(s.stat().st_size if isinstance(s, Path) else len(s), cluster) for _p, s in writes + late)
    need += 8 * cluster + 2 * _round_up(len(format_record(root_arg, before)), cluster)
    reclaim = sum(_round_up(len(esp.read(p) or b""), cluster) for p in stale_entries + stale_files + leftovers)
    free = esp.free_bytes()
    if writes and need > free + reclaim:
        raise EspFullError(f"{esp.describe()}: full: {need} bytes needed for {len(writes)} new files, {free} free "
                           f"and {reclaim} reclaimable; nothing changed, existing entries still boot")
    if dry_run:
        return

    def remove(path: str) -> None:
        esp.remove(path)
        report.removed.append(path)

    for path in leftovers:
        remove(path)
    if record_before is not None:
        esp.write_atomic(record, record_before)
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
    final = format_record(root_arg, after)
    if not after:
        if esp.read(record) is not None:
            esp.remove(record)
            esp.remove_empty_dirs(record.rsplit("/", 1)[0])
    elif esp.read(record) != final:
        esp.write_atomic(record, final)
    for directory in sorted({p.rsplit("/", 1)[0] for p in report.removed if "/" in p}, reverse=True):
        esp.remove_empty_dirs(directory)
    report.entries = [e.name for e in plan.entries]
    report.default_entry = plan.default_entry


def _may_replace_bootloader(esp: EspTarget, path: str, existing: dict[str, str]) -> bool:
    """A bootloader path is written when free or holding systemd-boot (bootctl's rule: another vendor's loader
    at the fallback path, e.g. shim or Windows', is never replaced)."""
    if path.casefold() not in existing:
        return True
    current = esp.read(existing[path.casefold()]) or b""
    return b"systemd-boot" in current


# -- status ---------------------------------------------------------------------------------------------------------

@dataclass
class EntryStatus:
    name: str
    state_id: int | None
    title: str
    missing_files: list[str]
    state_tree_exists: bool
    root: str = ""                 # the root=/rootflags=/rd.luks.uuid= words it boots
    owner: str = "this"            # "this" installation, "other" (moss.fstx=, another root), "foreign" (no moss.fstx=)


@dataclass
class BootStatus:
    esp: str
    active_state: int | None
    states: list[int]
    entries: list[EntryStatus]
    default_entry: str | None
    problems: list[str]
    root: str | None = None        # this installation's root= words, when known
    other_installations: list[str] = field(default_factory=list)   # entries that boot another root
    notes: list[str] = field(default_factory=list)


def _status_root(root: Path, root_arg: str | None, root_device: str | None) -> tuple[str | None, str | None]:
    if root_arg is not None:
        return root_arg, None
    if root_device is not None:
        return root_argument_for_spec(root_device), None
    remembered = remembered_root(root)
    if remembered is not None:
        return remembered, None
    try:
        return root_argument_for_path(root), None
    except StonelabError as err:
        return None, (f"this installation's root= is unknown ({err}); every moss.fstx= entry is taken as its own "
                      f"(pass --root-device to tell installations sharing the ESP apart)")


def boot_status(root: Path, *, esp: EspTarget | Path | str | None = None, efivars: Path = EFIVARS_DIR,
                require_vfat: bool = True, root_arg: str | None = None,
                root_device: str | None = None) -> BootStatus:
    """What the ESP would boot, and every way it disagrees with the states on disk.

    ``root_arg`` (or ``root_device``, else the root the last sync used, else the mount holding ``root``) tells
    this installation's entries from
    those of another installation sharing the ESP: those are listed in ``other_installations`` (with the root
    they boot) and not checked against this installation's states."""
    root = Path(root)
    location = resolve_esp(esp, root, efivars=efivars, require_vfat=require_vfat)
    target = location.target
    target.check()
    root_arg, note = _status_root(root, root_arg, root_device)
    files = target.list_files()
    folded = {p.casefold() for p in files}
    active = active_state_id(root)
    ids = read_state_ids(root)
    problems: list[str] = []
    others: list[str] = []
    entries: list[EntryStatus] = []
    for path, text in _read_entries(target, files).items():
        fstx = entry_fstx(text)
        owner = "foreign" if fstx is None else ("this" if root_arg is None or is_ours(text, root_arg) else "other")
        missing = [ref for ref in entry_files(text) if ref.casefold() not in folded]
        tree_ok = owner == "this" and fstx in ids and state_tree(root, fstx, active).is_dir()
        title = (parse_entry(text).get("title") or [""])[0]
        name = path.rsplit("/", 1)[-1]
        entry = EntryStatus(name, fstx if owner == "this" else None, title, missing, tree_ok, entry_root(text), owner)
        entries.append(entry)
        if owner == "other":
            others.append(f"entry {name} boots {entry.root or 'no root='}, not this installation's root "
                          f"({root_arg}): another installation's, left alone")
        if missing:
            problems.append(f"entry {name}: references missing {', '.join(missing)}")
        if owner == "this" and not tree_ok:
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
    return BootStatus(target.describe(), active, ids, entries, default, problems, root_arg, others,
                      [note] if note else [])
