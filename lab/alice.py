"""ALICE's contract as an invariant: the switch of /usr must not reach the disk before the tree it publishes.

ALICE (Pillai et al., "All File Systems Are Not Created Equal", OSDI 2014) checks an application's update
protocol against the persistence properties a file system does *not* guarantee: a rename may be persisted before
the data written before it. For an atomic-update package manager the protocol's commit point is the switch of
/usr (``renameat2(RENAME_EXCHANGE)`` or the ``rename`` of the ``usr`` symlink); the contract is a durability
barrier (``syncfs``/``sync``, or ``fsync`` of the staged files) between the last change to the staged tree and
that switch. Judged on an strace of the step's transaction (system calls, file descriptors shown as paths).
"""
from __future__ import annotations

import re

from lab.invariants import CheckContext, Invariant, Outcome, register

CALL = re.compile(r"^(?:\d+\s+)?(\w+)\((.*)")
STAGED_CHANGES = ("write", "pwrite64", "link", "linkat", "symlink", "symlinkat", "mkdir", "mkdirat", "creat")
BARRIERS = ("syncfs", "sync")


def _is_switch(call: str, args: str) -> bool:
    if call == "renameat2" and "RENAME_EXCHANGE" in args and "/staging/usr" in args:
        return True
    return call in ("rename", "renameat", "renameat2") and re.search(r'usr\.next[^"]*", .*"[^"]*/usr"', args) is not None


def check_trace(lines: list[str]) -> tuple[list[str], str]:
    """(problems, evidence) for one transaction's strace lines."""
    problems, switches, last_change, last_barrier = [], 0, None, None
    for number, line in enumerate(lines, 1):
        match = CALL.match(line)
        if not match or "= -1" in line:
            continue
        call, args = match.groups()
        if call in BARRIERS:
            last_barrier = number
        elif call in ("openat", "open") and "O_CREAT" in args and "/staging/" in args:
            last_change = number
        elif call in STAGED_CHANGES and "/staging/" in args:
            last_change = number
        elif _is_switch(call, args):
            switches += 1
            if last_change is not None and (last_barrier is None or last_barrier < last_change):
                problems.append(f"trace line {number}: /usr switched ({call}) with no syncfs/sync after the last "
                                f"change to the staged tree (line {last_change}): a power cut can publish a tree "
                                "whose files never reached the disk")
            last_change = None
    evidence = (f"{switches} switch(es) of /usr, each after a durability barrier following the staged writes"
                if switches else "no switch of /usr in this step")
    return problems, evidence


@register
class Alice(Invariant):
    name = "alice"
    summary = ("ALICE's contract: a durability barrier (syncfs) separates the last write to the staged tree from "
               "the switch of /usr (checked on an strace of each transaction)")

    @classmethod
    def check(cls, ctx: CheckContext) -> Outcome:
        if ctx.trace is None:
            return Outcome((), "no transaction traced in this step")
        if not ctx.trace.exists():
            return Outcome((), "no trace (the vm target does not trace)")
        problems, evidence = check_trace(ctx.trace.read_text(errors="replace").splitlines())
        return Outcome(tuple(problems), evidence)
