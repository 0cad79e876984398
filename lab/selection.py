"""Which cases a run takes: tags, ``-k`` expressions (as pytest's: words matched as substrings of the case name,
combined with ``and``, ``or``, ``not`` and parentheses) and CI shards.

``shard(cases, index, total)`` is deterministic: cases are ordered by id and dealt round-robin, so N jobs given
``1/N`` … ``N/N`` over the same suite run every case exactly once, whatever the order files were listed in.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from stonelab.errors import StonelabError

T = TypeVar("T")
_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


class SelectionError(StonelabError):
    """A malformed ``-k`` expression or ``--shard`` value; one line."""


def keyword_matcher(expression: str) -> Callable[[str], bool]:
    """A predicate over case names for ``expression`` (``install and not moss-compat``); SelectionError when it
    does not parse. Matching is case-insensitive, words are substrings."""
    tokens = _TOKEN.findall(expression)
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if position >= len(tokens):
            raise SelectionError(f"-k {expression!r}: expression ends too early")
        position += 1
        return tokens[position - 1]

    def chain(operator: str, operand, combine) -> Callable[[str], bool]:
        left = operand()
        while peek() == operator:
            take()
            right, first = operand(), left
            left = lambda name, a=first, b=right: combine(a(name), b(name))  # noqa: E731
        return left

    def parse_or() -> Callable[[str], bool]:
        return chain("or", parse_and, lambda a, b: a or b)

    def parse_and() -> Callable[[str], bool]:
        return chain("and", parse_not, lambda a, b: a and b)

    def parse_not() -> Callable[[str], bool]:
        if peek() == "not":
            take()
            inner = parse_not()
            return lambda name: not inner(name)
        return parse_atom()

    def parse_atom() -> Callable[[str], bool]:
        token = take()
        if token == "(":
            inner = parse_or()
            if take() != ")":
                raise SelectionError(f"-k {expression!r}: missing ')'")
            return inner
        if token in (")", "and", "or"):
            raise SelectionError(f"-k {expression!r}: unexpected {token!r}")
        word = token.lower()
        return lambda name: word in name.lower()

    if not tokens:
        raise SelectionError("-k: empty expression")
    matcher = parse_or()
    if position != len(tokens):
        raise SelectionError(f"-k {expression!r}: unexpected {tokens[position]!r}")
    return matcher


def parse_shard(value: str) -> tuple[int, int]:
    """``"I/N"`` → (I, N) with 1 ≤ I ≤ N; SelectionError otherwise."""
    match = re.fullmatch(r"(\d+)/(\d+)", value.strip())
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise SelectionError(f"--shard {value!r}: expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(match.group(1)), int(match.group(2))


def shard(items: Sequence[T], index: int, total: int, key: Callable[[T], str]) -> list[T]:
    """The ``index``-th (1-based) of ``total`` disjoint slices covering ``items``: sorted by ``key``, dealt
    round-robin (so slices differ in size by at most one case)."""
    ordered = sorted(items, key=key)
    return [item for number, item in enumerate(ordered) if number % total == index - 1]


def select(items: Sequence[T], *, name: Callable[[T], str], tags: Callable[[T], Sequence[str]],
           keyword: str | None = None, wanted_tags: Sequence[str] = ()) -> list[T]:
    """``items`` that carry any of ``wanted_tags`` (all when empty) and whose name matches ``keyword``."""
    match = keyword_matcher(keyword) if keyword else (lambda _: True)
    return [item for item in items
            if (not wanted_tags or set(wanted_tags) & set(tags(item))) and match(name(item))]
