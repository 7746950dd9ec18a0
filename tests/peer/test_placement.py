"""Ring placement properties (ckptd/peers/placement.py): determinism, no self-placement, failure-domain
diversity, and minimal movement when a node leaves or joins."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.peers.placement import Member, coordinator_for, holders_of, normalize, place, preference, shard_key

NODE_IDS = [f"node-{i}" for i in range(12)]


@st.composite
def memberships(draw: st.DrawFn, min_size: int = 2) -> list[Member]:
    ids = draw(st.lists(st.sampled_from(NODE_IDS), min_size=min_size, max_size=10, unique=True))
    labelled = draw(st.booleans())
    domains = draw(st.lists(st.sampled_from(["r1", "r2", "r3", "r4"]), min_size=len(ids), max_size=len(ids)))
    return [Member(n, d if labelled else "") for n, d in zip(ids, domains)]


keys = st.builds(shard_key, st.sampled_from(["job-a", "llama", "x"]), st.integers(0, 63))


@settings(max_examples=120, deadline=None)
@given(memberships(), st.integers(0, 5), keys, st.randoms(use_true_random=False))
def test_deterministic_and_independent_of_member_order(ms: list[Member], k: int, key: str, rnd: random.Random) -> None:
    source = ms[0].node_id
    shuffled = list(ms)
    rnd.shuffle(shuffled)
    assert place(ms, k, key, source) == place(shuffled, k, key, source)
    assert place(ms, k, key, source) == place(ms + ms[:1], k, key, source)  # duplicates collapse


@settings(max_examples=120, deadline=None)
@given(memberships(), st.integers(0, 12), keys, st.data())
def test_never_on_the_source_and_every_candidate_once(ms: list[Member], k: int, key: str, data: st.DataObject) -> None:
    source = data.draw(st.sampled_from([m.node_id for m in ms] + ["outsider"]))
    p = place(ms, k, key, source)
    assert source not in p.order
    assert sorted(p.order) == sorted(m.node_id for m in ms if m.node_id != source)
    assert len(p.targets) == min(k, len(p.order))
    assert p.targets == p.order[:k]


@settings(max_examples=120, deadline=None)
@given(memberships(), st.integers(1, 6), keys)
def test_targets_prefer_distinct_domains_other_than_the_source(ms: list[Member], k: int, key: str) -> None:
    source = ms[0]
    dom = {m.node_id: m.domain for m in ms}
    p = place(ms, k, key, source.node_id)
    others = {m.domain for m in ms if m.domain != source.domain}
    distinct = {dom[t] for t in p.targets} - {source.domain}
    # as many distinct non-source domains as exist, up to k
    assert len(distinct) == min(k, len(others))
    # and no target shares the source's domain while another domain still had a free node
    outside = [m for m in ms if m.domain != source.domain]
    if len(outside) >= k:
        assert all(dom[t] != source.domain for t in p.targets)


@settings(max_examples=200, deadline=None)
@given(memberships(min_size=3), st.integers(1, 4), keys, st.data())
def test_removing_a_node_moves_only_its_share(ms: list[Member], k: int, key: str, data: st.DataObject) -> None:
    source = ms[0].node_id
    gone = data.draw(st.sampled_from([m.node_id for m in ms[1:]]))
    before = place(ms, k, key, source)
    after = place([m for m in ms if m.node_id != gone], k, key, source)
    assert set(before.targets) - {gone} <= set(after.targets)
    if gone not in before.targets:
        assert after.targets == before.targets
    # excluding a dead node is the same as removing it
    assert place(ms, k, key, source, exclude=[gone]) == after


@settings(max_examples=100, deadline=None)
@given(memberships(min_size=2), st.integers(1, 4), keys)
def test_adding_a_node_displaces_at_most_one_target(ms: list[Member], k: int, key: str) -> None:
    source = ms[0].node_id
    new = Member("node-new", ms[-1].failure_domain)
    before = place(ms, k, key, source)
    after = place([*ms, new], k, key, source)
    assert len(set(before.targets) - set(after.targets)) <= 1
    assert set(after.targets) - set(before.targets) <= {new.node_id} | set(before.fallbacks)


def test_unlabelled_placement_is_plain_rendezvous_and_spreads_ranks() -> None:
    ms = [Member(n) for n in NODE_IDS[:8]]
    counts: dict[str, int] = {}
    for rank in range(800):
        (t,) = place(ms, 1, shard_key("job", rank), "node-0").targets
        counts[t] = counts.get(t, 0) + 1
    assert set(counts) == {m.node_id for m in ms[1:]}
    assert min(counts.values()) > 800 / 7 * 0.6  # roughly even


def test_domains_example() -> None:
    ms = [Member("a", "r1"), Member("b", "r1"), Member("c", "r2"), Member("d", "r2"), Member("e", "r3")]
    p = place(ms, 2, shard_key("job", 0), "a")
    assert {m.failure_domain for m in ms if m.node_id in p.targets} == {"r2", "r3"}
    assert p.fallbacks[-1] == "b"  # the source's own domain comes last
    assert preference(ms, "k", "a")[:2] == place(ms, 2, "k", "a").targets


def test_conflicting_domains_rejected() -> None:
    with pytest.raises(ValueError, match="failure domains"):
        normalize([Member("a", "r1"), Member("a", "r2")])
    with pytest.raises(ValueError):
        place([Member("a")], -1, "k", "a")


def test_coordinator_and_holders() -> None:
    ms = [Member(n, f"r{i % 2}") for i, n in enumerate(NODE_IDS[:5])]
    c = coordinator_for(ms, "job")
    assert c == coordinator_for(list(reversed(ms)), "job") and c in NODE_IDS[:5]
    with pytest.raises(ValueError):
        coordinator_for([], "job")
    assert holders_of(ms, 2, "job", 3, "node-1") == place(ms, 2, shard_key("job", 3), "node-1").order
