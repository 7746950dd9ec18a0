"""Retention: pure code, no daemon.

``select_for_deletion`` never selects the newest step and keeps what it must (the newest
``max_to_keep``, pinned steps, multiples of ``keep_period``), deletes exactly the rest, and is
idempotent.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.drains.retention import select_for_deletion

# -- retention ---------------------------------------------------------------------------------

steps_st = st.lists(st.integers(min_value=0, max_value=10**6), max_size=30)


@settings(max_examples=200, deadline=None)
@given(steps_st, st.integers(min_value=-3, max_value=12), st.integers(min_value=-2, max_value=20),
       st.lists(st.integers(min_value=0, max_value=10**6), max_size=5))
def test_retention_properties(committed: list[int], max_to_keep: int, keep_period: int, pinned: list[int]) -> None:
    doomed = select_for_deletion(committed, max_to_keep, keep_period, pinned)
    steps = sorted(set(committed))
    assert doomed == sorted(doomed) and len(set(doomed)) == len(doomed)
    assert set(doomed) <= set(steps)
    if not steps:
        assert doomed == []
        return
    assert steps[-1] not in doomed  # never the newest, whatever the arguments say
    newest_kept = steps[-max(1, max_to_keep):]
    assert not set(newest_kept) & set(doomed)
    assert not set(pinned) & set(doomed)
    if keep_period > 0:
        assert all(s % keep_period for s in doomed)
    # exactly the rest is deleted
    must_keep = set(newest_kept) | set(pinned) | ({s for s in steps if s % keep_period == 0} if keep_period > 0
                                                  else set())
    assert doomed == [s for s in steps if s not in must_keep]


@settings(max_examples=100, deadline=None)
@given(steps_st, st.integers(min_value=1, max_value=10))
def test_retention_is_idempotent(committed: list[int], max_to_keep: int) -> None:
    doomed = select_for_deletion(committed, max_to_keep)
    left = sorted(set(committed) - set(doomed))
    assert select_for_deletion(left, max_to_keep) == []
    assert len(left) == min(len(set(committed)), max_to_keep)


@pytest.mark.parametrize("committed,kw,expected", [
    ([], {"max_to_keep": 3}, []),
    ([5], {"max_to_keep": 0}, []),
    ([1, 2, 3, 4, 5], {"max_to_keep": 2}, [1, 2, 3]),
    ([1, 2, 3, 4, 5], {"max_to_keep": 0}, [1, 2, 3, 4]),
    ([5, 1, 3, 3, 2, 4], {"max_to_keep": 2}, [1, 2, 3]),
    ([10, 20, 25, 30, 35], {"max_to_keep": 1, "keep_period": 10}, [25]),
    ([1, 2, 3, 4, 5], {"max_to_keep": 1, "pinned": [2, 99]}, [1, 3, 4]),
])
def test_retention_examples(committed: list[int], kw: dict[str, Any], expected: list[int]) -> None:
    assert select_for_deletion(committed, **kw) == expected
