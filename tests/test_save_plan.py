"""The per-tensor caches of the save and restore paths: LayoutMemo, SavePlanner, TypedViews.

Each cache must hand back exactly what the uncached path computes: the layout of
``tree.flatten``, the tensors of ``tensors_from_pb``, the bytes a per-tensor ``copy_`` writes;
a changed state shape, a changed layout or a different slot must never reuse a stale entry.
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch
from ckptd_client.restore.walk import Restorer
from ckptd_client.save.save_plan import SavePlanner
from ckptd_client.tree import copy_into, flatten

from ckptd.core.layout import layout_to_pb, tensors_from_pb
from ckptd.core.layout_memo import LayoutMemo
from tests.state_factory import every_value_state, torch_state


def _slot(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, max(nbytes, 1))


@pytest.mark.parametrize("make", [lambda: torch_state(3, 1), lambda: every_value_state(7),
                                  lambda: {"big": torch.randn(600_000).view(600, 1000).t(), "small": torch.ones(3)}])
def test_plan_and_copy_match_the_uncached_path(make) -> None:  # type: ignore[no-untyped-def]
    state = make()
    leaves, tensors, tree_json, nbytes = flatten(state)
    planner = SavePlanner()
    for _ in range(2):  # the second plan reuses the first's layout and the slot's views
        plan = planner.plan(state)
        assert (list(plan.tensors), plan.tree_json, plan.nbytes) == (tensors, tree_json, nbytes)
        mm, ref = _slot(nbytes), _slot(nbytes)
        base = torch.frombuffer(mm, dtype=torch.uint8)
        planner.copy(plan, "slot-a", mm, base)
        copy_into(ref, leaves, tensors)
        assert mm[:nbytes] == ref[:nbytes]
        planner.forget("slot-a")
        del base
    assert plan.reused
    assert planner.layout_pb(plan) == layout_to_pb(tensors, tree_json)


def test_changed_shape_or_values_are_never_served_stale() -> None:
    planner = SavePlanner()
    state = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2), "n": 1}
    first = planner.plan(state)
    state["n"] = 2  # a plain value changed: same layout, new tree
    second = planner.plan(state)
    assert second.reused and second.tensors is first.tensors and second.tree_json != first.tree_json
    state["b"] = torch.ones(3, 2)  # a shape changed: a new layout
    third = planner.plan(state)
    assert not third.reused and third.tensors[1].shape == (3, 2) and third.nbytes > first.nbytes
    mm = _slot(third.nbytes)
    base = torch.frombuffer(mm, dtype=torch.uint8)
    planner.copy(third, "s", mm, base)
    state["a"].add_(1)  # new values, same slot and layout: the cached views copy them
    planner.copy(third, "s", mm, base)
    assert np.frombuffer(mm, np.float32, 6, 0).tolist() == [1, 2, 3, 4, 5, 6]


def test_layout_memo_decodes_equal_layouts_to_one_tuple() -> None:
    memo = LayoutMemo(max_entries=2)
    _, tensors, tree_json, nbytes = flatten(torch_state(1, 0))
    msg = layout_to_pb(tensors, tree_json)
    a = memo.decode(msg)
    b = memo.decode(layout_to_pb(tensors, '{"other":1}'))  # the tree is not part of the key
    assert a is b and list(a) == tensors_from_pb(msg)
    assert memo.encode(a, tree_json) == msg
    assert memo.check(a, nbytes, tree_json) is memo.check(a, nbytes, tree_json)
    with pytest.raises(ValueError, match="outside the shard"):
        memo.check(a, nbytes - 1, tree_json)  # another shard size is validated again
    with pytest.raises(ValueError):
        memo.check(a, nbytes, '{"v":1}')  # a tree that does not reference the tensors
    import json

    t1, tree1 = memo.decode_with_tree(msg)  # a restore's client: tensors and parsed tree, once
    t2, tree2 = memo.decode_with_tree(layout_to_pb(tensors, tree_json))
    assert t1 is a and t2 is a and tree2 is tree1 and tree1 == json.loads(tree_json)
    t3, tree3 = memo.decode_with_tree(layout_to_pb(tensors, '{"other":1}'))  # the tree is part of this key
    assert t3 is a and tree3 == {"other": 1}
    assert memo.tree_json(tree1) is memo.tree_json(tree1) and json.loads(memo.tree_json(tree1)) == tree1


def test_restorer_batches_in_place_copies_and_keeps_identity() -> None:
    state = {"w": torch.randn(4, 3), "c": torch.randn(5, dtype=torch.complex64).conj(), "x": np.arange(3.0)}
    leaves, tensors, tree_json, nbytes = flatten(state)
    mm = _slot(nbytes)
    copy_into(mm, leaves, tensors)
    target = {"w": torch.zeros(4, 3), "c": torch.zeros(5, dtype=torch.complex64), "x": np.zeros(3)}
    w = target["w"]
    import json

    Restorer(mm, tensors).apply(json.loads(tree_json), target)
    assert target["w"] is w and torch.equal(w, state["w"])
    assert torch.equal(target["c"], state["c"].resolve_conj()) and target["x"].tolist() == [0.0, 1.0, 2.0]
