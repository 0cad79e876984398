"""Seeded bugs for measuring the lab's detection power (``bench/mutants.py``): test-only, off unless
``STONELAB_MUTANT=<name>[,<name>…]`` is set. The reference code asks ``active("name")`` where a bug is seeded;
the list of names and what each breaks is in ``bench/mutants.py``."""
from __future__ import annotations

import os
from collections.abc import Mapping

ENV_VAR = "STONELAB_MUTANT"


def active(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """True when the seeded bug ``name`` is switched on in the environment."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return name in {part.strip() for part in value.split(",")}
