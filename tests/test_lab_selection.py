"""Case selection: -k expressions, tags, and the CI shard split (every case exactly once, deterministic)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.selection import SelectionError, keyword_matcher, parse_shard, select, shard

NAMES = ["install-upgrade-rollback", "upstream-power-cut[moss-compat/exchange]",
         "upstream-power-cut[reference/symlink]", "bad-input-is-refused"]


@pytest.mark.parametrize("expression, expected", [
    ("power", NAMES[1:3]),
    ("power and not moss-compat", [NAMES[2]]),
    ("install or bad", [NAMES[0], NAMES[3]]),
    ("not (power or bad)", [NAMES[0]]),
    ("UPSTREAM-POWER-CUT[reference/symlink]", [NAMES[2]]),
])
def test_keyword_expressions(expression, expected):
    match = keyword_matcher(expression)
    assert [n for n in NAMES if match(n)] == expected


@pytest.mark.parametrize("expression", ["", "a and", "(a", "a )", "and a", "a b"])
def test_malformed_keyword_is_one_line_error(expression):
    with pytest.raises(SelectionError) as info:
        keyword_matcher(expression)
    assert "\n" not in str(info.value)


def test_tags_and_keyword_combine():
    items = [("a-crash", ["default", "crash"]), ("b", ["default"]), ("c-crash", ["slow", "crash"])]
    chosen = select(items, name=lambda i: i[0], tags=lambda i: i[1], keyword="crash", wanted_tags=["default"])
    assert chosen == [items[0]]


@pytest.mark.parametrize("value", ["0/3", "4/3", "1", "a/b", "1/0"])
def test_bad_shard_values(value):
    with pytest.raises(SelectionError, match="I/N"):
        parse_shard(value)


@settings(max_examples=200, derandomize=True)
@given(st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=40), st.integers(1, 9), st.randoms())
def test_shards_cover_every_case_exactly_once_in_any_order(names, total, rnd):
    shuffled = list(names)
    rnd.shuffle(shuffled)
    slices = [shard(shuffled, index, total, key=str) for index in range(1, total + 1)]
    assert sorted(n for part in slices for n in part) == sorted(names)      # every case, once
    assert slices == [shard(names, index, total, key=str) for index in range(1, total + 1)]  # order-proof
    sizes = [len(part) for part in slices]
    assert max(sizes) - min(sizes) <= 1                                       # balanced
