"""Seeded bugs for the lab's own tests: ``STONELAB_MUTANT=name[,name...]`` switches them on (test use only).

A fault-injection lab must show that it catches real bugs; these are the bugs.  Each is a one-line deviation at
a named place, so a test can prove that the lab's verdict changes when it is switched on.

- ``skip-syncfs``: the transaction skips its syncfs before the intent record and the swap (the staged tree and
  the new state row need not be on disk when /usr switches) — reference_impl/transaction.py;
- ``no-flush``: the guest's root file system is mounted with ``barrier=0``, so fsync/syncfs write everything
  out but never send a cache FLUSH — a kernel or driver that forgets REQ_PREFLUSH/REQ_FUA (lab/vm_target.py).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

ENV_VAR = "STONELAB_MUTANT"
KNOWN = ("skip-syncfs", "no-flush")


def active(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``name`` is listed in ``$STONELAB_MUTANT`` (comma-separated)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return name in {part.strip() for part in value.split(",")}
