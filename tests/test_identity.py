"""The identity graph on a real dataset (TUD-Campus, MOT15 tracks, in the test database): pair
answers through merge, conflict, cannot-link and undo, two operators at once, per-crop
identities joining the graph, and the pair queue's leases. After every step the decision log,
the graph replayed from it and the sample fields must agree."""
from __future__ import annotations

import threading

import pytest


# TUD-Campus (every 10th frame): 8 tracks; only 1/8, 6/7 and 6/8 are never seen in one frame
T1, T6, T7, T8 = (f"t:TUD-Campus/{k}" for k in (1, 6, 7, 8))


@pytest.fixture
def ds(tud_clone):
    return tud_clone


def agree(name: str):
    """The sample fields say what the graph replayed from the log says; returns the state."""
    from core.data import store
    from core.services.labeling import identity, replay

    st = identity.load(name)
    fresh = replay.replay(name)  # the state load() kept (if any) is the replay of this moment
    assert st.cols == fresh.cols and st.names == fresh.names and st.rows == fresh.rows
    assert st.graph.components() == fresh.graph.components()
    # an answer is applied to the kept state (replay.advance): it must be what a replay gives
    assert st.confirmed.components() == fresh.confirmed.components()
    cannot = lambda g: sorted(tuple(sorted((g.component(a)[0], g.component(b)[0]))) for a, b in g.cannot_pairs())  # noqa: E731
    assert cannot(st.graph) == cannot(fresh.graph) and cannot(st.confirmed) == cannot(fresh.confirmed)
    assert sorted(c.link.ref for c in st.confirmed.conflicts) == sorted(c.link.ref for c in fresh.confirmed.conflicts)
    assert sorted(st.claims.values()) == sorted(fresh.claims.values())
    cols = store.view_columns(name, ["identity", "graph_identity", "identity_base"])
    by_id = {sid: (i, gi, b) for sid, i, gi, b in zip(cols["id"], cols["identity"], cols["graph_identity"],
                                                     cols["identity_base"])}
    for node, ks in st.rows.items():
        want = st.names[node]
        for k in ks:
            ident, gi, base = by_id[st.cols["id"][k]]
            assert ident == (want if want is not None else base if gi else ident), (node, ident, want)
            if want is not None:
                assert ident == want
    # every standing pair answer is in the graph, or listed as a conflict
    applied = {ln.ref for ln in st.graph.applied if ln.ref}
    refused = {c.link.ref for c in st.graph.conflicts}
    for e in st.pairs:
        if e["answer"] != "unsure":
            assert e["_id"] in applied | refused
    return st


def identities_of(name: str, node: str) -> set:
    from core.data import store

    cols = store.view_columns(name, ["identity", "tracklet"])
    return {i for i, tr in zip(cols["identity"], cols["tracklet"]) if f"t:{tr}" == node}


def test_free_constraints_and_nothing_written_on_a_fresh_dataset(ds):
    from core.services.labeling import identity

    st = agree(ds)
    assert len(st.rows) == 8 and st.graph.separated(T1, T6) is not None  # seen in one frame
    assert st.graph.separated(T1, T8) is None
    assert identity.sync(ds)[1] == []  # ingested identities already say what the graph says


def test_merge_conflict_cannot_link_and_undo_keep_log_and_samples_agreeing(ds):
    from core.services.labeling import base, identity

    before8 = identities_of(ds, T8)
    # cannot-link from an operator: 6 and 7 are two people; a later "same" is refused
    identity.decide_pair(ds, "s2", T6, T7, "different", "bob")
    assert agree(ds).graph.separated(T6, T7) is not None
    with pytest.raises(identity.PairConflict) as exc:
        identity.decide_pair(ds, "s1", T7, T6, "same", "ann")
    assert exc.value.conflict.blocking[0].source == "operator"
    # merge: 6 and 8 are one person; the smaller side's crops take the larger's identity
    r = identity.decide_pair(ds, "s1", T6, T8, "same", "ann", model_version="base", p_same=0.5, cosine=0.4)
    assert r.identity and identities_of(ds, T6) == identities_of(ds, T8) == {r.identity}
    assert r.labelled > 0 and r.component_crops == agree(ds).component_crops(T6)
    # conflict: 1 is seen with 6 in one frame, so 1 = 8 would put one person in two places
    with pytest.raises(identity.PairConflict) as exc:
        identity.decide_pair(ds, "s1", T1, T8, "same", "ann")
    assert exc.value.conflict.blocking[0].source == "frame"
    assert set(exc.value.conflict.b_side) == {T6, T8}
    assert identities_of(ds, T1) == {"TUD-Campus:1"}
    assert base._coll(base.DECISIONS).count_documents({"dataset": ds, "kind": "pair_conflict"}) == 2
    agree(ds)
    # undo is a log entry: s1's merge goes (8 gets its own identity back), then s2's "different"
    assert identity.undo_pair(ds, "s1")["answer"] == "same"
    st = agree(ds)
    assert not st.graph.same(T6, T8) and identities_of(ds, T8) == before8
    assert identity.undo_pair(ds, "s2")["answer"] == "different"
    assert agree(ds).graph.separated(T6, T7) is None
    assert identity.undo_pair(ds, "s1") is None
    kinds = [d["kind"] for d in base._coll(base.DECISIONS).find({"dataset": ds}, sort=[("seq", 1)])]
    assert kinds.count("pair") == 2 and kinds.count("undo") == 2  # nothing is deleted


def test_two_operators_answering_at_once_end_in_the_state_of_the_whole_log(ds):
    from core.services.labeling import identity

    errors, results = [], []
    barrier = threading.Barrier(3)

    def answer(session, a, b, ans):
        barrier.wait()
        try:
            results.append(identity.decide_pair(ds, session, a, b, ans, session))
        except identity.PairConflict as exc:
            errors.append(exc)

    threads = [threading.Thread(target=answer, args=args) for args in
               (("s1", T6, T8, "same"), ("s2", T1, T8, "same"), ("s3", T6, T7, "different"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = agree(ds)
    # 6 = 8 and 1 = 8 cannot both stand (1 and 6 share a frame): exactly one of them is applied
    assert st.graph.same(T6, T8) != st.graph.same(T1, T8)
    refused = len(errors) + len(st.graph.conflicts)
    assert refused == 1 and len(results) + len(errors) == 3
    assert st.graph.separated(T6, T7) is not None


def test_a_typed_identity_names_its_whole_tracklet(ds):
    from core.data import store
    from core.services.labeling import decide

    cols = store.view_columns(ds, ["tracklet"])
    crop = next(sid for sid, tr in zip(cols["id"], cols["tracklet"]) if f"t:{tr}" == T7)
    decide(ds, "s1", crop, "ann", identity="Alice")
    assert identities_of(ds, T7) == {"Alice"}
    agree(ds)


def test_the_pair_queue_leases_each_pair_to_one_tab_and_never_asks_what_is_known(ds):
    from core.services.labeling import identity, pairs

    a = pairs.next_pair(ds, "tab1", k=5)
    b = pairs.next_pair(ds, "tab2", k=5)
    assert a is not None and b is not None and a.key != b.key
    assert pairs.next_pair(ds, "tab1", k=5).key == a.key  # a tab keeps its own pair
    st = identity.load(ds)
    for it in (a, b):
        assert not st.graph.same(it.a.node, it.b.node) and st.graph.separated(it.a.node, it.b.node) is None
        assert it.a.sample_ids and it.a.crops == st.component_crops(it.a.node)
    identity.decide_pair(ds, "tab1", a.a.node, a.b.node, "unsure", "ann")
    seen = set()
    while (it := pairs.next_pair(ds, "tab1", k=5)) is not None:
        assert it.key not in seen and it.key != a.key
        seen.add(it.key)
        identity.decide_pair(ds, "tab1", it.a.node, it.b.node, "different", "ann")
    assert b.key not in seen  # leased to the other tab all along
    pairs.release_pairs(ds, "tab2")
    it = pairs.next_pair(ds, "tab1", k=5)
    assert it is not None and it.key == b.key
    identity.decide_pair(ds, "tab1", it.a.node, it.b.node, "different", "ann")
    # every pair of identities is now answered or held apart: nothing is left to ask
    assert pairs.next_pair(ds, "tab1", k=5) is None and pairs.next_pair(ds, "tab2", k=5) is None
    agree(ds)


def test_the_queue_is_topped_up_in_the_background_before_it_runs_dry(ds):
    """With ``prefetch`` (the Annotate page), leasing from a queue with fewer than LOW_WATER
    pending pairs computes the next batch in a background process: the pairs are there before the
    queue runs dry, none twice, none the graph already knows; an empty queue waits for that
    batch instead of computing its own."""
    from core.services.labeling import base, identity, pairs

    coll = base._coll(base.PAIRS)

    def queued() -> list[str]:
        return [d["key"] for d in coll.find({"dataset": ds, "status": {"$in": ["pending", "leased"]}})]

    # TUD-Campus leaves three pairs to ask (the rest were seen in one frame): batches of one
    first = pairs.next_pair(ds, "tab1", k=1, prefetch=True)  # the first batch, leased at once
    top = pairs._TOPUPS.get((ds, "likely"))
    assert first is not None and top is not None
    top.join(60)
    keys = queued()
    assert len(keys) == 2 == len(set(keys))  # the next one is there before anyone ran out
    st = identity.load(ds)
    for d in coll.find({"dataset": ds, "status": "pending"}):
        assert not st.graph.same(d["a"], d["b"]) and st.graph.separated(d["a"], d["b"]) is None
    # without prefetch nothing runs in the background
    pairs._TOPUPS.clear()
    second = pairs.next_pair(ds, "tab2", k=1)
    assert second is not None and second.key != first.key and (ds, "likely") not in pairs._TOPUPS
    # a queue that runs dry while a top-up runs takes that top-up's batch (or finds it queued)
    top = pairs._top_up(ds, "likely", 1, True)
    third = pairs.next_pair(ds, "tab3", k=1)
    assert top is not None and not top.is_alive()
    assert third is not None and third.key not in (first.key, second.key)
    assert len(queued()) == 3 == len(set(queued()))
    pairs._TOPUPS.clear()


def test_cannot_links_become_guaranteed_negatives_in_training_batches(ds):
    """The graph's cannot-links reach the sampler: partners meet in batches far more often."""
    import numpy as np

    from core.services.labeling import identity
    from core.model.batches import WeightedIdentitySampler

    pairs_ = identity.cannot_identities(identity.load(ds))
    assert ("TUD-Campus:1", "TUD-Campus:6") in {tuple(sorted(p)) for p in pairs_}  # seen in one frame
    labels = np.repeat(np.arange(40), 4)
    partners = {0: [1]}  # of 40 people, 0 and 1 are known to be two
    with_p = WeightedIdentitySampler(labels, np.ones(len(labels)), 8, 4, partners)
    without = WeightedIdentitySampler(labels, np.ones(len(labels)), 8, 4)

    def together(s):
        rng = np.random.default_rng(0)
        n = 0
        for _ in range(400):
            got = set(labels[s.batch(rng)].tolist())
            n += {0, 1} <= got
        return n

    assert together(with_p) > 3 * together(without) > 0
    b = with_p.batch(np.random.default_rng(1))
    assert len(b) == 32 and len(set(labels[b].tolist())) == 8  # still P distinct identities x K


@pytest.mark.parametrize("mode", ["verify", "trust"])
def test_ingested_identities_are_verified_or_trusted_as_the_switch_says(ds, mode):
    """Two tracklets the data calls one person: to be verified, the queue may ask and a
    'different' splits them (the second keeps the name told apart); trusted, 'different' is a
    conflict with the data and nothing changes."""
    from core.services import labeling
    from core.data import store
    from core.services.labeling import identity, pairs

    labeling.set_label_schema(ds, {**vars(labeling.label_schema(ds)), "mode": mode})
    cols = store.view_columns(ds, ["tracklet"])
    store.set_values(ds, "identity", {sid: "P" for sid, tr in zip(cols["id"], cols["tracklet"])
                                      if f"t:{tr}" in (T6, T8)})
    st = identity.load(ds)
    assert st.graph.same(T6, T8)  # the data's link, either way
    assert st.confirmed.same(T6, T8) == (mode == "trust")
    assert pairs.implied(st, T6, T8) == (mode == "trust")  # only to be verified is it asked
    if mode == "trust":
        with pytest.raises(identity.PairConflict):
            identity.decide_pair(ds, "s1", T6, T8, "different", "ann")
        assert identities_of(ds, T6) == identities_of(ds, T8) == {"P"}
    else:
        identity.decide_pair(ds, "s1", T6, T8, "different", "ann")
        st = agree(ds)
        assert not st.graph.same(T6, T8)
        assert {*identities_of(ds, T6), *identities_of(ds, T8)} == {"P", "P~2"}


def test_lone_tracklets_are_negatives_only_where_they_are_known_to_be_other_people():
    """Two lone tracklets of different cameras may be one person: the miner never uses one as the
    other's negative; in one camera, or across a cannot-link, it does."""
    import torch

    from core.model.batches import KnownNegativesMiner, known_negatives

    ids = ["~c1/1", "~c1/2", "~c2/1", "P"]
    cams = {"~c1/1": {"c1"}, "~c1/2": {"c1"}, "~c2/1": {"c2"}, "P": {"c1", "c2"}}
    allowed = known_negatives(ids, cams, {i for i in ids if i.startswith("~")}, cannot=[("~c1/2", "~c2/1")])
    assert allowed[0, 1] and not allowed[0, 2] and allowed[1, 2]  # same camera / other camera / cannot-link
    assert allowed[0, 3] and allowed[2, 3]  # a named identity seen by their camera too
    assert known_negatives(["A", "B"], {"A": {"c1"}, "B": {"c2"}}, set()) is None  # named: all negatives
    # embeddings: ~c2/1 sits right next to ~c1/1 (same person?), ~c1/2 further away
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.98, 0.2], [0.97, 0.25]])
    labels = torch.tensor([1, 1, 2, 2, 0, 0])  # ~c1/2, ~c2/1, ~c1/1
    a, p, n = KnownNegativesMiner(allowed)(emb, labels)
    neg_of = dict(zip(a.tolist(), labels[n].tolist()))
    assert neg_of[4] == 1 and neg_of[5] == 1  # ~c1/1's negative: never the close ~c2/1 (label 2)
    assert set(neg_of) == set(range(6))


def test_the_kept_replay_is_given_only_while_nothing_it_reads_changed(ds):
    """load() replays the graph once and gives that state again while the samples, the log and
    the trust mode are as they were; another process's sample edit, a deleted sample and an
    answer each make the next load() the replay of the new moment."""
    from core.data import store
    from core.services.labeling import identity

    first = identity.load(ds)
    assert identity.load(ds) is first  # nothing changed: no second replay
    k = first.rows[T7][0]
    store.set_values(ds, "identity", {first.cols["id"][k]: "typed-elsewhere"})  # a job, the App, a CLI
    second = identity.load(ds)
    assert second is not first and second.cols["identity"][k] == "typed-elsewhere"
    store.get_dataset(ds).delete_samples([first.cols["id"][first.rows[T6][0]]])
    third = identity.load(ds)
    assert len(third.cols["id"]) == len(first.cols["id"]) - 1
    identity.decide_pair(ds, "s1", T1, T8, "same", "op")  # the log moves and the sync writes samples
    agree(ds)
    assert identity.load(ds).graph.same(T1, T8)
