"""Seeded bugs for measuring the lab's detection power: test-only, off unless ``STONELAB_MUTANT=<name>[,<name>…]``
is set. The reference code asks ``active("name")`` where a bug is seeded; ``bench/mutants.py`` lists the names
and what each breaks. ``no-flush`` is seeded in the lab's guest instead (``lab/vm_target.py`` mounts the root
with ``barrier=0``: fsync/syncfs write everything out but never send a cache FLUSH, as a kernel or driver that
forgets REQ_PREFLUSH/REQ_FUA would); only the crash engine's volatile-cache model can see it."""
from __future__ import annotations

import os
from collections.abc import Mapping

ENV_VAR = "STONELAB_MUTANT"


def active(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """True when the seeded bug ``name`` is listed in ``$STONELAB_MUTANT`` (comma-separated) of ``environ``
    (default: this process's environment)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return name in {part.strip() for part in value.split(",")}
