"""The pair queue asks the merges a clustering round proposed first: on the identity graph alone
(which proposals are still open), and on a real dataset (TUD-Campus tracklets with synthetic
embeddings, conftest's tud_clone) with the round recorded in the registry as a round records it
(new_version, then finish with ``proposals``)."""
from __future__ import annotations

import pytest

from core.math import pair_select as ps
from core.math.graph import IdentityGraph, Link

# TUD-Campus (every 10th frame): 8 tracks; only 1/8, 6/7 and 6/8 are never seen in one frame
T1, T6, T7, T8 = (f"t:TUD-Campus/{k}" for k in (1, 6, 7, 8))
WHY = "proposed by round {} (clustering joined these tracklets)"


def test_open_proposals_drop_what_the_graph_settled_and_sort_by_distance():
    g = IdentityGraph("abcdefgh")
    g.link(Link("a", "b", True, "operator"))  # a, b joined
    g.link(Link("c", "d", False, "frame"))  # c, d held apart
    rows = {"a": [0, 1, 2], "b": [3], "e": [4], "f": [5, 6], "g": [7], "h": [8]}
    props = [{"a": "e", "b": "f", "distance": 0.4},
             {"a": "a", "b": "b", "distance": 0.01},  # one component now
             {"a": "c", "b": "d", "distance": 0.02},  # cannot-linked
             {"a": "b", "b": "g", "distance": 0.1},  # b's identity is a's: asked as a | g
             {"a": "g", "b": "a", "distance": 0.2},  # the same two identities again
             {"a": "e", "b": "h", "distance": 0.3},  # answered
             {"a": "zz", "b": "e", "distance": 0.0},  # not a node (any more)
             {"a": "f", "b": "h", "distance": float("nan")},
             {"a": "g", "b": "h", "distance": 0.35}]  # queued elsewhere
    got = ps.open_proposals(g, rows, props, answered={("e", "h")}, exclude={"g|h"})
    assert got == [("a", "g", 0.1), ("e", "f", 0.4)]
    assert ps.open_proposals(g, rows, [], set()) == []


@pytest.fixture
def ds(tud_clone):
    yield tud_clone
    from core.services import registry
    from core.services.labeling import pairs

    pairs.clear_pairs(tud_clone)
    registry._coll().delete_many({"dataset": tud_clone})


def _round(name: str, proposals: list[dict] | None, status: str = "ready") -> str:
    """Record a round's version as core.services.rounds does: created training, then finished."""
    from core.services import registry

    v = registry.new_version(name, "base", {"pseudo": True})
    if status == "ready":
        extra = {} if proposals is None else {"proposals": proposals}
        registry.finish(name, v, {"recall@1": 0.5}, **extra)
    elif proposals is not None:
        registry.update(name, v, proposals=proposals)
        if status != "training":
            registry.fail(name, v, "test", cancelled=status == "cancelled")
    return v


def test_a_rounds_proposals_are_served_first_closest_first_ahead_of_the_queue(ds):
    from core.services.labeling import identity, pairs

    before = pairs.next_pair(ds, "tab0", k=5)  # a batch of candidates is queued already
    assert before is not None and not before.reason.startswith("proposed") and before.proposed_by is None
    askable = [identity.pair_key(T1, T8), identity.pair_key(T6, T7), identity.pair_key(T6, T8)]
    assert before.key in askable  # all others are seen in one frame
    props = [{"a": T6, "b": T8, "distance": 0.30}, {"a": T1, "b": T8, "distance": 0.10},
             {"a": T1, "b": T6, "distance": 0.05},  # seen in one frame: never asked
             {"a": T7, "b": T6, "distance": 0.20}]
    v = _round(ds, props)
    want = [k for k in askable if k != before.key]  # closest first; tab0 holds its pair
    served = []
    for i in range(len(want)):
        it = pairs.next_pair(ds, f"tab{i + 1}", k=5)
        assert it is not None and it.reason.startswith(WHY.format(v)), it.reason
        assert it.proposed_by == v and 0.0 <= it.p_same <= 1.0 and it.cosine is not None
        assert it.model_version == "base"
        served.append(it.key)
    assert served == want
    assert pairs.next_pair(ds, "tab9", k=5) is None  # every askable pair is leased
    assert pairs.next_pair(ds, "tab0", k=5).key == before.key  # leases kept
    assert pairs.next_pair(ds, "tab1", k=5).key == served[0]
    # the queue's own item of that pair was taken over, not doubled
    from core.services.labeling.base import PAIRS, _coll

    docs = list(_coll(PAIRS).find({"dataset": ds}))
    assert len({d["key"] for d in docs}) == len(docs) == 3


def test_proposals_come_before_the_candidates_of_the_same_batch(ds):
    from core.services.labeling import identity, pairs

    base = pairs.compute_pairs(ds, k=8, rng=0)
    assert len(base) >= 2
    last = (base[-1]["a"], base[-1]["b"])  # the candidate asked last without proposals
    v = _round(ds, [{"a": last[0], "b": last[1], "distance": 0.4}])
    it = pairs.next_pair(ds, "tab1", k=8, rng=0)
    assert it.key == identity.pair_key(*last) and it.reason.startswith(WHY.format(v))
    rest = [pairs.next_pair(ds, f"tab{i}", k=8, rng=0) for i in range(2, 2 + len(base))]
    assert [r.key for r in rest if r] == [identity.pair_key(c["a"], c["b"]) for c in base[:-1]]
    assert not any(r.proposed_by for r in rest if r)


def test_a_proposal_an_answer_has_joined_or_separated_is_not_served(ds):
    from core.services.labeling import identity, pairs

    identity.decide_pair(ds, "s0", T1, T8, "same", "ann")  # before the round finished
    v = _round(ds, [{"a": T1, "b": T8, "distance": 0.05},  # one identity now
                    {"a": T6, "b": T8, "distance": 0.10},  # T8 is T1's, seen with T6: held apart
                    {"a": T6, "b": T7, "distance": 0.30}])
    it = pairs.next_pair(ds, "tab1", k=5)
    assert it is not None and it.key == identity.pair_key(T6, T7) and it.reason.startswith(WHY.format(v))
    other = pairs.next_pair(ds, "tab2", k=5)
    assert other is None or "proposed" not in other.reason
    pairs.release_pairs(ds, "tab1")
    identity.decide_pair(ds, "s9", T6, T7, "different", "bob")  # answered elsewhere since it was queued
    while (it := pairs.next_pair(ds, "tab1", k=5)) is not None:
        assert "proposed" not in it.reason and it.key != identity.pair_key(T6, T7)
        identity.decide_pair(ds, "tab1", it.a.node, it.b.node, "different", "ann")


def test_without_open_proposals_the_queue_is_unchanged(ds):
    from core.services.labeling import pairs

    base = pairs.compute_pairs(ds, k=8, rng=0)
    assert base and not any(c.get("proposed_by") for c in base)
    _round(ds, None)  # a ready round that proposed nothing
    _round(ds, [{"a": T1, "b": T8, "distance": 0.1}], status="training")  # not finished
    _round(ds, [{"a": T6, "b": T8, "distance": 0.1}], status="failed")
    assert pairs.round_proposals(ds) == (None, [])
    assert pairs.compute_pairs(ds, k=8, rng=0) == base
    v = _round(ds, [{"a": T6, "b": T7, "distance": 0.1}])
    got = pairs.compute_pairs(ds, k=8, rng=0)
    assert got[0]["proposed_by"] == v and (got[0]["a"], got[0]["b"]) == tuple(sorted((T6, T7)))
    assert pairs.compute_pairs(ds, k=8, rng=0, proposals=False) == base
    rand = pairs.compute_pairs(ds, order="random", k=8, rng=0)  # the control stays the control
    assert not any(c.get("proposed_by") for c in rand)


def test_the_active_rounds_proposals_win_else_the_newest_ready_rounds(ds):
    from core.data import store
    from core.services.labeling import pairs

    v1 = _round(ds, [{"a": T1, "b": T8, "distance": 0.1}])
    v2 = _round(ds, [{"a": T6, "b": T7, "distance": 0.2}])
    _round(ds, None)  # newest, but proposed nothing
    assert pairs.round_proposals(ds)[0] == v2
    store.set_active_model(ds, v1)
    assert pairs.round_proposals(ds) == (v1, [{"a": T1, "b": T8, "distance": 0.1}])
