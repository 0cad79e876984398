"""What a scenario's run concluded: the system under test passed or failed, the lab broke, or the case does
not apply to this combination of mode and swap strategy."""
from __future__ import annotations

import enum


class Verdict(enum.StrEnum):
    PASS = "pass"      # every invariant behaved as the scenario declares
    FAIL = "fail"      # the system under test broke a promise (or stopped showing a declared flaw)
    ERROR = "error"    # the lab itself could not run the scenario (bad environment, a bug in the lab)
    NOT_APPLICABLE = "n/a"  # a matrix cell that does not apply; the reason says why
