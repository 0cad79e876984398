"""Recovery on every start (reference mode): finish or undo whatever a crash interrupted.

The rule: once the intent record is durable the staged tree is complete and durable too, so an interrupted
switch is completed (rolled forward).  Without an intent record nothing has been switched, so half-made work is
discarded (rolled back): leftover staging (upstream #576), a state row without a tree, a tree without a state
row.  An old tree left in staging after an exchange is archived, never deleted.  Each repair is made durable
before the next; running recovery twice is harmless.
"""
from __future__ import annotations

import os

from reference_impl import mutants
from reference_impl.fsutil import fsync_dir
from reference_impl.installation import ROOT_LINKS, read_state_id
from reference_impl.swap import SwapStrategy, renameat2_exchange, switch_symlink, update_root_links
from reference_impl.transaction import Intent, Transaction, remove_tree
from stonelab.errors import StonelabError


def recover(tx: Transaction) -> list[str]:
    inst = tx.inst
    notes: list[str] = []
    if not inst.moss.is_dir():
        return notes
    for leftover in ("usr.next", *(f"{name}.next" for name in ROOT_LINKS)):
        path = inst.root / leftover
        if path.is_symlink():
            path.unlink()
            notes.append(f"removed the half-made link {path}")
    intent = Intent.read(inst.intent)
    if intent is not None and intent.phase == "switching" and intent.new is not None:
        notes += _complete(tx, intent)
    elif intent is not None:  # interrupted while staging: discard it all
        remove_tree(inst.staging)
        inst.intent.unlink(missing_ok=True)
        fsync_dir(inst.moss)
        notes.append("rolled back a transaction interrupted while staging")
    notes += _tidy_staging(tx)
    notes += _finish_repairs(tx)
    notes += _drop_treeless_states(tx)
    notes += _drop_stateless_trees(tx)
    if inst.isolation.exists():
        remove_tree(inst.isolation)
    if notes:
        if inst.trees.is_dir():
            fsync_dir(inst.trees)
        for note in notes:
            tx.say(f"recovery: {note}")
    return notes


def _complete(tx: Transaction, intent: Intent) -> list[str]:
    inst = tx.inst
    notes = []
    strategy = SwapStrategy(intent.strategy)
    if tx.active_state() != intent.new:
        if strategy is SwapStrategy.EXCHANGE:
            staged = read_state_id(inst.staging_usr) if inst.staging_usr.is_dir() else None
            if staged != intent.new and inst.archived(intent.new).is_dir() and not inst.staging.exists():
                os.rename(inst.trees / str(intent.new), inst.staging)  # activation: tree not yet moved
                staged = intent.new
            if staged == intent.new:
                if not inst.usr.exists():
                    inst.usr.mkdir()
                renameat2_exchange(inst.staging_usr, inst.usr)
                fsync_dir(inst.root)
                notes.append(f"completed the interrupted switch of /usr to state {intent.new}")
        else:
            staged = read_state_id(inst.staging_usr) if inst.staging_usr.is_dir() else None
            if staged == intent.new:
                inst.archived(intent.new).parent.mkdir(parents=True, exist_ok=True)
                os.rename(inst.staging_usr, inst.archived(intent.new))
                fsync_dir(inst.trees)
            if inst.archived(intent.new).is_dir():
                switch_symlink(inst, intent.new, durable=True)
                notes.append(f"completed the interrupted switch of /usr to state {intent.new}")
    if tx.active_state() != intent.new:
        notes.append(f"could not complete the switch to state {intent.new} (its tree is gone); "
                     f"state {tx.active_state()} stays active")
    elif strategy is SwapStrategy.EXCHANGE and intent.op != "repair":
        if inst.staging_usr.is_dir() and read_state_id(inst.staging_usr) == intent.old and intent.old is not None:
            if mutants.active("recover-by-deleting"):
                remove_tree(inst.staging)
            else:
                tx._archive_staged(intent.old)
            notes.append(f"archived the previous tree of state {intent.old}")
    update_root_links(inst, durable=True)
    boot = intent.boot_config()
    if boot is not None and tx.active_state() == intent.new:
        try:
            boot(inst, intent.new)
            notes.append(f"synchronised boot entries for state {intent.new}")
        except StonelabError as err:
            notes.append(f"boot entries for state {intent.new} could not be written: {err}")
    inst.intent.unlink(missing_ok=True)
    fsync_dir(inst.moss)
    return notes


def _tidy_staging(tx: Transaction) -> list[str]:
    """Staging without an intent record: partial work, or the old tree an upstream crash left after exchange."""
    inst = tx.inst
    if not inst.staging.exists():
        return []
    staged = read_state_id(inst.staging_usr) if inst.staging_usr.is_dir() else None
    known = staged is not None and tx.dbs.state.get(staged) is not None
    if known and mutants.active("recover-by-deleting"):
        remove_tree(inst.staging)
        return [f"removed the tree of state {staged} found in staging"]
    if known and staged != tx.active_state() and not inst.archived(staged).exists():
        inst.archived(staged).parent.mkdir(parents=True, exist_ok=True)
        os.rename(inst.staging_usr, inst.archived(staged))
        remove_tree(inst.staging)
        return [f"archived the tree of state {staged} found in staging"]
    remove_tree(inst.staging)
    return [f"removed leftover staging {inst.staging}"]


def _finish_repairs(tx: Transaction) -> list[str]:
    """`state verify --repair` on a filesystem without exchange renames the damaged tree away, then the fresh
    one in; a crash between the two leaves the fresh tree under ``root/repair-<id>/usr``."""
    inst = tx.inst
    notes = []
    for repair in inst.trees.glob("repair-*") if inst.trees.is_dir() else []:
        state_id = repair.name.removeprefix("repair-")
        target = inst.trees / state_id / "usr"
        if state_id.isdigit() and (repair / "usr").is_dir() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(repair / "usr", target)
            notes.append(f"completed the interrupted repair of state {state_id}")
        remove_tree(repair)
    return notes


def _drop_treeless_states(tx: Transaction) -> list[str]:
    inst = tx.inst
    active = tx.active_state()
    gone = [s.id for s in tx.dbs.state.all() if s.id != active and not inst.archived(s.id).is_dir()]
    if not gone or mutants.active("keep-treeless-states"):
        return []
    tx.dbs.state.remove(gone)
    return [f"dropped state {i}: recorded but its tree never made it to disk" for i in gone]


def _drop_stateless_trees(tx: Transaction) -> list[str]:
    inst = tx.inst
    known = {s.id for s in tx.dbs.state.all()}
    notes = []
    for state_id in inst.archived_ids():
        if state_id not in known:
            remove_tree(inst.trees / str(state_id))
            notes.append(f"removed the tree of state {state_id}, which has no state row (interrupted prune)")
    return notes
