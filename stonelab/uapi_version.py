"""Version comparison by the UAPI Version Format Specification, the rules systemd-boot and kernel-install use to
order kernels and boot entries (systemd's ``strverscmp_improved()``).

Source: https://uapi-group.org/specifications/specs/version_format_specification/ .  In short, a version is
split into segments; characters other than ``A-Za-z0-9~-^.`` only separate; then, segment by segment:

- ``~`` sorts before everything, even the end of the string (``123~rc1 < 123``);
- the end of the string sorts before any further segment (``123 < 123.1``, ``123 < 123a``);
- ``-`` sorts before ``^`` and ``.`` (``123-3 < 123^1 < 123.1``) and before alphanumerics;
- ``^`` sorts before ``.`` (``123^post1 < 123.1``), ``.`` before a segment without a separator;
- a numeric segment sorts after an alphabetic one; numbers compare by value (``0010 == 10``, ``6.10 > 6.9``);
- alphabetic segments compare bytewise (``A < a``).

So ``6.10.0 > 6.9.0 > 6.8.0`` and ``6.9.0 > 6.9.0~rc3``; but ``6.9.0-rc3 > 6.9.0``, because ``-`` starts a release
suffix, not a pre-release (the specification's ``~`` is the pre-release marker): systemd-boot orders them so too.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

_SEPARATORS = "~-^."


def _valid(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char in _SEPARATORS)


def _run(text: str, start: int, digits: bool) -> int:
    end = start
    while end < len(text) and text[end].isascii() and (text[end].isdigit() if digits else text[end].isalpha()):
        end += 1
    return end


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, equal to or newer than ``b`` (UAPI rules; any strings, never raises)."""
    i = j = 0
    while True:
        while i < len(a) and not _valid(a[i]):
            i += 1
        while j < len(b) and not _valid(b[j]):
            j += 1
        if a[i:i + 1] == "~" or b[j:j + 1] == "~":
            if (a[i:i + 1] == "~") != (b[j:j + 1] == "~"):
                return -1 if a[i:i + 1] == "~" else 1
            i, j = i + 1, j + 1
        if i >= len(a) or j >= len(b):
            return _sign((i < len(a)) - (j < len(b)))
        for separator in "-^.":
            if a[i:i + 1] == separator or b[j:j + 1] == separator:
                if (a[i:i + 1] == separator) != (b[j:j + 1] == separator):
                    return -1 if a[i:i + 1] == separator else 1
                i, j = i + 1, j + 1
        a_digit = a[i:i + 1].isdigit() and a[i].isascii()
        b_digit = b[j:j + 1].isdigit() and b[j].isascii()
        if a_digit or b_digit:
            if a_digit != b_digit:
                return 1 if a_digit else -1
            end_a, end_b = _run(a, i, True), _run(b, j, True)
            num_a, num_b = a[i:end_a].lstrip("0"), b[j:end_b].lstrip("0")
            if len(num_a) != len(num_b):
                return -1 if len(num_a) < len(num_b) else 1
        else:
            end_a, end_b = _run(a, i, False), _run(b, j, False)
            num_a, num_b = a[i:end_a], b[j:end_b]
        if num_a != num_b:
            return -1 if num_a.encode() < num_b.encode() else 1
        i, j = end_a, end_b


version_key = functools.cmp_to_key(compare_versions)
"""A sort key: ``sorted(versions, key=version_key)`` orders oldest first."""


def newest(versions: Iterable[str]) -> str | None:
    """The newest of ``versions`` by the UAPI rules, or None for none."""
    return max(versions, key=version_key, default=None)
