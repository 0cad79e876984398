"""One filesystem transaction: stage a tree, record the state, swap /usr, archive the old tree, sync boot.

Two modes share the sequence.  ``reference`` makes each step durable before the next depends on it (one syncfs
after staging, an intent record fsync'd before the swap, directory fsyncs after each rename) and, on every
start, :func:`recover` completes or rolls back whatever a crash interrupted.  ``moss-compat`` is upstream's exact
order with no syncs, no intent record and no recovery — the baseline the lab compares against.  Every window
and its recovery outcome is tabulated in docs/TRANSACTIONS.md.
"""
from __future__ import annotations

import enum
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from reference_impl.blit import BlitOptions, BlitReport, BlitStrategy, blit
from reference_impl.db import Databases, State
from reference_impl import mutants
from reference_impl.faults import fault_point
from reference_impl.fsutil import fsync_dir, syncfs
from reference_impl.installation import STATE_ID_FILE, Installation, read_state_id
from reference_impl.stone import LayoutEntry
from reference_impl.swap import (SwapStrategy, renameat2_exchange, switch_symlink, symlink_state,
                                 update_root_links)
from stonelab.errors import StonelabError

OS_RELEASE = """NAME="AerynOS"
ID=aerynos
PRETTY_NAME="AerynOS (stonelab reference)"
HOME_URL="https://aerynos.com"
"""



@dataclass(frozen=True)
class BootConfig:
    """Where boot entries go; recorded in the intent record so recovery can finish a boot sync."""

    esp: str
    root_device: str | None = None
    compat: bool = False

    def __call__(self, inst: Installation, state_id: int) -> None:
        from reference_impl.boot import EspMissingError, sync_boot
        try:
            sync_boot(inst.root, esp=self.esp, root_device=self.root_device, target=state_id)
        except EspMissingError:
            if not self.compat:
                raise
            # upstream: no ESP found → boot sync reports success having written nothing

    def check_fits(self, inst: Installation, state_id: int, trees: Mapping[int, Path]) -> None:
        """Before a swap (reference mode): raise StonelabError when the boot sync that follows it cannot fit the
        kernels and initrds it must copy on the ESP, so that the old state stays active. Other ESP problems
        (missing, not FAT) are left to the boot sync after the swap, which reports them (docs/TRANSACTIONS.md)."""
        from reference_impl.boot import EspError, EspFullError, sync_boot
        try:
            sync_boot(inst.root, esp=self.esp, root_device=self.root_device, target=state_id, dry_run=True,
                      trees=trees)
        except EspFullError as err:
            raise StonelabError(f"state {state_id} not activated, its boot entries would not fit: {err}") from None
        except EspError:
            pass


class Mode(enum.StrEnum):
    REFERENCE = "reference"
    MOSS_COMPAT = "moss-compat"


@dataclass(frozen=True)
class Settings:
    mode: Mode = Mode.REFERENCE
    swap: SwapStrategy = SwapStrategy.EXCHANGE  # resolved (never AUTO here)
    blit: BlitStrategy = BlitStrategy.AUTO
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def durable(self) -> bool:
        return self.mode is Mode.REFERENCE


@dataclass
class Intent:
    """Written (and fsync'd) before /usr is switched; removed when everything after it is done."""

    op: str  # "commit" | "activate" | "repair"
    phase: str  # "staging": nothing switched yet, roll back | "switching": staged tree durable, roll forward
    new: int | None
    old: int | None
    strategy: str
    esp: str | None = None
    root_device: str | None = None

    def boot_config(self) -> BootConfig | None:
        return BootConfig(self.esp, self.root_device) if self.esp else None

    @classmethod
    def read(cls, path: Path) -> Intent | None:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:
            raise StonelabError(f"{path}: unreadable intent record ({err}); inspect and remove it") from None

    def write(self, path: Path) -> None:
        if mutants.active("drop-intent-record"):
            return
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            json.dump(asdict(self), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, path)
        fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        # trees are staged read-only (mode & ~0o222) but directories stay writable, so rmtree works
        shutil.rmtree(path)


@dataclass
class Transaction:
    inst: Installation
    dbs: Databases
    settings: Settings
    boot: BootConfig | None = None
    log: TextIO = sys.stderr

    def fault(self, point: str) -> None:
        fault_point(point, self.settings.environ)

    def say(self, message: str) -> None:
        print(f"stonelab: {message}", file=self.log)

    # -- a new state -------------------------------------------------------------------------------------------
    def commit(self, entries: Iterable[LayoutEntry], selections, *, summary: str,
               run_triggers: Callable[[Path], None] | None = None) -> tuple[State, BlitReport]:
        inst = self.inst
        old = self.active_state()
        remove_tree(inst.staging)  # moss: the next install wipes staging; reference: recovery already did
        if self.settings.durable:
            Intent("commit", "staging", None, old, self.settings.swap.value).write(inst.intent)
        inst.staging_usr.mkdir(parents=True)
        self.fault("blit.begin")
        if mutants.active("swap-before-blit-complete"):
            entries = list(entries)[: len(list(entries)) // 2]
        report = blit(entries, inst.assets, inst.staging_usr,
                      BlitOptions(strategy=self.settings.blit, fsync=False,
                                  on_halfway=lambda: self.fault("blit.mid"),
                                  owners=self.settings.mode is Mode.REFERENCE))
        self.fault("blit.end")
        state = self.dbs.state.add(selections, summary=summary)
        self.fault("state.recorded")
        try:
            if not mutants.active("skip-state-id"):
                (inst.staging_usr / STATE_ID_FILE).write_text(str(state.id))
            os_release = inst.staging_usr / "lib" / "os-release"
            if not os_release.exists():
                os_release.parent.mkdir(parents=True, exist_ok=True)
                os_release.write_text(OS_RELEASE)
            if run_triggers is not None:
                run_triggers(inst.staging_usr)
            self._check_boot_fits(state.id, old, inst.staging_usr)
        except BaseException:
            if self.settings.durable:  # roll back: the state never existed
                remove_tree(inst.staging)
                self.dbs.state.remove([state.id])
                inst.intent.unlink(missing_ok=True)
            raise
        self.switch(self.intent("commit", state.id, old))
        return state, report

    # -- back to an archived state -----------------------------------------------------------------------------
    def activate(self, state_id: int) -> None:
        inst = self.inst
        old = self.active_state()
        if old == state_id:
            raise StonelabError(f"state {state_id} is already active")
        if not inst.archived(state_id).is_dir():
            raise StonelabError(f"{inst.archived(state_id)}: state {state_id} has no tree on disk")
        self._check_boot_fits(state_id, old, inst.archived(state_id))
        intent = self.intent("activate", state_id, old)
        if self.settings.swap is SwapStrategy.SYMLINK:
            self.switch(intent)
            return
        if inst.staging.exists() and any(inst.staging.iterdir()):
            # upstream #576; the reference's recovery has emptied staging before we get here
            raise StonelabError(f"{inst.staging}: staging is not empty; cannot activate state {state_id}")
        remove_tree(inst.staging)
        if self.settings.durable:
            intent.write(inst.intent)
        os.rename(inst.trees / str(state_id), inst.staging)
        if self.settings.durable:
            fsync_dir(inst.trees)
        self.switch(intent, intent_written=True)

    def _check_boot_fits(self, new: int, old: int | None, new_tree: Path) -> None:
        """Reference mode: a swap whose boot sync cannot fit on the ESP is refused before it happens (upstream
        swaps, then fails on ENOSPC: #866). moss-compat keeps upstream's order."""
        if self.boot is None or not self.settings.durable or mutants.active("swap-before-esp-check"):
            return
        trees = {new: new_tree} | ({old: self.inst.usr} if old is not None else {})
        self.boot.check_fits(self.inst, new, trees)

    def intent(self, op: str, new: int, old: int | None) -> Intent:
        boot = self.boot
        return Intent(op, "switching", new, old, self.settings.swap.value,
                      boot.esp if boot else None, boot.root_device if boot else None)

    # -- the shared tail: swap, archive, boot, done --------------------------------------------------------------
    def switch(self, intent: Intent, *, intent_written: bool = False) -> None:
        inst, durable = self.inst, self.settings.durable
        if durable:
            if not mutants.active("skip-syncfs"):
                syncfs(inst.root if inst.root.is_dir() else inst.moss)
            if not intent_written:
                intent.write(inst.intent)
        self.fault("swap.before")
        if self.settings.swap is SwapStrategy.EXCHANGE and mutants.active("archive-before-swap"):
            self._archive_staged(intent.old)
        if self.settings.swap is SwapStrategy.EXCHANGE:
            self._exchange()
        else:
            self._point_symlink(intent.new)
        self.fault("swap.after")
        if self.settings.swap is SwapStrategy.EXCHANGE:
            self._archive_staged(intent.old)
        update_root_links(inst, durable=durable)
        self.fault("archive.after")
        self.fault("boot.before")
        boot_error = None
        if self.boot is not None:
            try:
                self.boot(inst, intent.new)
            except StonelabError as err:  # /usr is switched for good; the ESP problem is reported, not undone
                boot_error = err
        if durable:
            inst.intent.unlink(missing_ok=True)
            fsync_dir(inst.moss)
        if boot_error is not None:
            raise StonelabError(f"state {intent.new} is active, but its boot entries were not written: "
                                f"{boot_error}")
        self.fault("commit.after")

    def _exchange(self) -> None:
        inst = self.inst
        if not inst.usr.exists() and not inst.usr.is_symlink():
            inst.usr.mkdir()
        renameat2_exchange(inst.staging_usr, inst.usr)
        if self.settings.durable:
            fsync_dir(inst.root)
            fsync_dir(inst.staging)

    def _point_symlink(self, state_id: int) -> None:
        inst, durable = self.inst, self.settings.durable
        target = inst.archived(state_id)
        if inst.staging_usr.is_dir() and read_state_id(inst.staging_usr) == state_id:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(inst.staging_usr, target)
            if durable:
                fsync_dir(target.parent)
            remove_tree(inst.staging)
        if inst.usr.is_dir() and not inst.usr.is_symlink():
            if any(inst.usr.iterdir()):
                raise StonelabError(f"{inst.usr}: a real, non-empty directory; cannot manage it with symlinks")
            inst.usr.rmdir()
        switch_symlink(inst, state_id, durable=durable)

    def _archive_staged(self, old: int | None) -> None:
        """After the exchange staging holds the previous /usr: archive it (or drop an unmanaged empty one)."""
        inst, durable = self.inst, self.settings.durable
        if old is not None and mutants.active("leave-staging"):
            return
        if old is not None:
            dest = inst.archived(old)
            if dest.exists():
                remove_tree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(inst.staging_usr, dest)
            if durable:
                fsync_dir(dest.parent)
        elif inst.staging_usr.is_dir() and any(inst.staging_usr.iterdir()):
            keep = inst.trees / "unmanaged-usr"  # a /usr no state owned: set aside, never deleted
            remove_tree(keep)
            os.rename(inst.staging_usr, keep)
            self.say(f"the unmanaged previous /usr was kept at {keep}")
        remove_tree(inst.staging)
        if durable:
            fsync_dir(inst.trees)

    def active_state(self) -> int | None:
        if self.inst.usr.is_symlink():
            return symlink_state(self.inst)
        return self.inst.active_state()
