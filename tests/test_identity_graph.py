"""The identity graph and the pair selection math, on plain data and arrays."""
import numpy as np
import pytest

from core.math.graph import IdentityGraph, Link, build, component_names, overlapping, tally
from core.math import pair_select as ps


def test_merge_chains_and_conflicts_keep_both_sides():
    g = IdentityGraph(["a", "b", "c", "d"])
    assert g.link(Link("a", "b", False, "frame")) is None
    assert g.link(Link("b", "c", True, ref="d1")) is None
    assert g.link(Link("c", "d", True, ref="d2")) is None
    assert g.component("d") == ["b", "c", "d"]
    # a "same" across the cannot-link is refused and names what is in the way
    c = g.link(Link("a", "d", True, ref="d3"))
    assert c is not None and c.blocking[0].source == "frame"
    assert c.a_side == ["a"] and c.b_side == ["b", "c", "d"]
    assert not g.same("a", "d") and g.conflicts == [c]
    # a "different" inside one component is refused with the chain of must-links joining them
    c2 = g.link(Link("b", "d", False, ref="d4"))
    assert c2 is not None and [ln.ref for ln in c2.blocking] == ["d1", "d2"]
    assert g.same("b", "d")
    # the cannot-link followed the merge: c is held apart from a too
    assert g.separated("a", "c") is not None
    assert tally(g).merged == 1 and tally(g).conflicts == 2


def test_cannot_links_survive_unions_in_both_directions():
    g = IdentityGraph("abcdef")
    g.link(Link("a", "b", False))
    g.link(Link("c", "d", False))
    g.link(Link("b", "c", True))  # {b,c}: apart from a and d
    g.link(Link("e", "f", True))
    g.link(Link("f", "a", True))  # {a,e,f}
    assert g.separated("e", "c") is not None and g.separated("d", "b") is not None
    assert g.check(Link("e", "b", True)) is not None
    assert g.check(Link("d", "e", True)) is None  # d is apart from {b,c}, not from {a,e,f}
    assert sorted(g.cannot_pairs()) == sorted({tuple(sorted((g.find("a"), g.find("b")))),
                                               tuple(sorted((g.find("c"), g.find("d"))))})


def test_build_orders_trusted_data_operator_and_soft_links():
    nodes = ["t1", "t2", "t3"]
    ingested = {"t1": "P7", "t2": "P7"}
    different = [Link("t1", "t2", False, ref="x")]
    # trusted: the file's link stands; the operator's "different" is a conflict
    g = build(nodes, ingested_names=ingested, decisions=different, trust_ingested=True)
    assert g.same("t1", "t2") and len(g.conflicts) == 1
    # to be verified: the operator's word beats the file, silently
    g = build(nodes, ingested_names=ingested, decisions=different, trust_ingested=False)
    assert not g.same("t1", "t2") and g.conflicts == []
    # free constraints come first and are never overridden
    g = build(nodes, free=[Link("t1", "t3", False, "frame")], decisions=[Link("t1", "t3", True, ref="y")])
    assert not g.same("t1", "t3") and g.conflicts[0].link.ref == "y"
    # undo = replay without the decision
    assert not build(nodes, decisions=[]).same("t1", "t2")


def test_component_names_majority_duplicates_and_unnamed():
    g = IdentityGraph(["a", "b", "c", "d", "e", "f"])
    g.link(Link("a", "b", True))
    g.link(Link("c", "d", True))
    names = {"a": "P1", "b": "P2", "c": "P1"}
    out = component_names(g, names, weights={"a": 1, "b": 5, "c": 3})
    assert out["a"] == out["b"] == "P2"  # 5 crops say P2
    assert out["c"] == out["d"] == "P1"
    assert out["e"] is None and out["f"] is None  # lone nodes nobody named
    g.link(Link("e", "f", True))
    out2 = component_names(g, names, weights={"a": 1, "b": 5, "c": 3})
    assert out2["e"] == out2["f"] and out2["e"].startswith("g-")
    # two components wanting one name: the heavier keeps it, the other is told apart
    g2 = IdentityGraph(["x", "y"])
    out3 = component_names(g2, {"x": "P", "y": "P"}, weights={"x": 1, "y": 4})
    assert out3["y"] == "P" and out3["x"] == "P~2"
    # a typed name outvotes any number of crops that came with another
    out4 = component_names(g, names, weights={"a": 1, "b": 5, "c": 3}, strong={"a": "Typed"})
    assert out4["a"] == out4["b"] == "Typed" and out4["c"] == "P1"


def test_overlapping_tracklets_are_cannot_linked_per_sequence():
    spans = {"s1/1": ("s1", 0, 10), "s1/2": ("s1", 10, 20), "s1/3": ("s1", 21, 30),
             "s2/1": ("s2", 0, 30), "crop": (None, None, None)}
    links = overlapping(spans)
    assert {(ln.a, ln.b) for ln in links} == {("s1/1", "s1/2")}
    assert all(not ln.same and ln.source == "frame" for ln in links)


def test_link_sources_are_checked():
    with pytest.raises(ValueError):
        Link("a", "b", True, source="guess")


# ---- pair selection ------------------------------------------------------------------------

def test_component_vectors_and_candidates_skip_blocked_pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    comp = np.repeat(np.arange(10), 4)
    cv = ps.component_vectors(x, comp)
    assert cv.shape == (10, 8) and np.allclose(np.linalg.norm(cv, axis=1), 1, atol=1e-5)
    blocked = {(0, 1), (2, 3)}
    a, b, cos = ps.candidates(cv, 3, lambda i, j: np.array([(x, y) not in blocked for x, y in zip(i, j)]))
    assert len(a) and (a < b).all() and not ({*zip(a.tolist(), b.tolist())} & blocked)
    assert len(set(zip(a.tolist(), b.tolist()))) == len(a)  # each pair once
    assert np.all(np.diff(cos) <= 1e-6)  # most similar first
    sim = cv @ cv.T
    assert np.allclose(cos, sim[a, b], atol=1e-5)


def _candidates_by_loop(cv, k, blocked):
    """The pair sift as a plain loop (what candidates() did before it worked on arrays): the
    independent reference for the array version."""
    from core.math.neighbours import topk

    want = min(len(cv) - 1, k * 3)
    idx, sim = topk(cv, cv, want, exclude_self=True)
    pairs = {}
    for i in range(len(cv)):
        got = 0
        for j, sj in zip(idx[i].tolist(), sim[i].tolist()):
            if got >= k:
                break
            key = (min(i, j), max(i, j))
            if key in pairs or not blocked(*key):
                pairs.setdefault(key, sj)
                got += 1
    return pairs


def test_candidates_on_arrays_are_the_loops_pairs():
    """On a seeded mixture of 150 clusters (2,000 x 64), with 4,000 random pairs and
    every same-side pair not allowed, the array sift gives exactly the loop's pairs and cosines."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(150, 64))
    x = (centres[rng.integers(0, 150, 2000)] + 0.6 * rng.normal(size=(2000, 64))).astype(np.float32)
    cv = ps.unit(x)
    bad = {(int(i), int(j)) for i, j in np.sort(rng.integers(0, 2000, (4000, 2)), axis=1) if i != j}
    side = rng.integers(0, 2, 2000)
    for k in (1, 4, 8):
        ref = _candidates_by_loop(cv, k, lambda i, j: (i, j) in bad or side[i] == side[j])
        a, b, cos = ps.candidates(cv, k, lambda i, j: np.array(
            [(x_, y_) not in bad for x_, y_ in zip(i.tolist(), j.tolist())]) & (side[i] != side[j]))
        got = dict(zip(zip(a.tolist(), b.tolist()), cos.tolist()))
        assert set(got) == set(ref) and len(got) == len(a)
        assert np.allclose([got[p] for p in ref], list(ref.values()), atol=1e-5)
        assert np.all(np.diff(cos) <= 1e-6)


def test_calibrator_prior_then_fit():
    cal = ps.PairCalibrator(threshold=0.6).fit([], [])
    assert not cal.fitted_ and cal.predict(np.array([0.6]))[0] == pytest.approx(0.5)
    cos = [0.9, 0.85, 0.8, 0.75, 0.3, 0.35, 0.4, 0.45]
    same = [True] * 4 + [False] * 4
    cal = ps.PairCalibrator(threshold=0.6).fit(cos, same)
    p = cal.predict(np.array([0.95, 0.2]))
    assert cal.fitted_ and p[0] > 0.8 and p[1] < 0.2
    assert ps.operating_threshold(np.linspace(0, 1, 101), np.array([])) == pytest.approx(0.99)
    assert ps.operating_threshold(np.array([]), np.array([0.2, 0.4, 0.9])) == pytest.approx(0.4)


def test_order_prefers_uncertain_pairs_and_spreads_over_people():
    rng = np.random.default_rng(0)
    # pairs 0..3 all involve component 0 and sit at the boundary; pair 4 is a bit less uncertain
    a = np.array([0, 0, 0, 0, 5, 7])
    b = np.array([1, 2, 3, 4, 6, 8])
    p = np.array([0.5, 0.5, 0.5, 0.5, 0.4, 0.99])
    top = ps.order_pairs(p, None, a, b, 2, rng, strategy="uncertainty")
    assert top[0] in (0, 1, 2, 3) and top[1] == 4  # diversity: not a second question on component 0
    assert 5 not in ps.order_pairs(p, None, a, b, 5, rng, strategy="uncertainty")  # the near-certain last
    boosted = ps.order_pairs(p, np.array([1, 1, 1, 1, 1, 200.0]), a, b, 1, rng, strategy="uncertainty")
    assert boosted[0] == 5
    likely = ps.order_pairs(p, None, a, b, 2, rng)
    assert ps.DEFAULT_PAIR_ORDER == "likely" and likely[0] == 5  # the near-certain "same" first
    r = ps.order_pairs(p, None, a, b, 6, np.random.default_rng(1), strategy="random")
    assert sorted(r.tolist()) == list(range(6))
    with pytest.raises(ValueError):
        ps.order_pairs(p, None, a, b, 2, rng, strategy="nope")


def test_camera_centring_finds_other_camera_partners_a_camera_bias_hides():
    rng = np.random.default_rng(0)
    people = rng.normal(size=(20, 32))
    bias = {"c1": 4 * rng.normal(size=32), "c2": 4 * rng.normal(size=32)}
    x, cams, who = [], [], []
    for cam in bias:
        for pid in range(20):
            for _ in range(3):
                x.append(people[pid] + bias[cam] + 0.3 * rng.normal(size=32))
                cams.append(cam)
                who.append(pid)
    x, who = np.array(x), np.array(who)

    def partner_hits(v):
        v = ps.unit(v)
        c1 = np.array(cams) == "c1"
        sim = v[c1] @ v[~c1].T
        return float((who[~c1][sim.argmax(1)] == who[c1]).mean())

    assert partner_hits(ps.camera_centred(x, cams)) > partner_hits(x) + 0.3
    assert partner_hits(ps.camera_centred(x, cams)) > 0.9
    out = ps.camera_centred(x[:7], ["c1"] * 6 + [None])
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)  # no camera of one crop left at zero


def test_component_names_are_stable_when_an_answer_changes_one_component():
    """Five tracklets that all came as "P": P, P~2 ... by size. Joining the two smallest renames
    the crops of the one that joined, nobody else's; a split keeps the names of the parts that
    were not cut off; naming the written names again changes nothing (a fixpoint)."""
    w = {"t1": 9, "t2": 7, "t3": 5, "t4": 4, "t5": 3}
    names = {n: "P" for n in w}
    g = IdentityGraph(w)
    first = component_names(g, names, w, current={})
    assert [first[n] for n in w] == ["P", "P~2", "P~3", "P~4", "P~5"]
    assert component_names(g, names, w, current=first) == first  # fixpoint
    g.link(Link("t4", "t5", True))  # 4 + 3 crops: now heavier than t3 (5)
    joined = component_names(g, names, w, current=first)
    assert {n for n in w if joined[n] != first[n]} == {"t5"} and joined["t5"] == "P~4"
    # without the written names, the old numbering by size renames t3 and t4 too
    fresh = component_names(g, names, w)
    assert fresh["t3"] != first["t3"] and fresh["t4"] != first["t4"]
    # a split: {t1, t2} was one identity "P"; cut apart, t1 (heavier) keeps P, t2 takes a free number
    g2 = IdentityGraph(w)
    g2.link(Link("t1", "t2", True))
    whole = component_names(g2, names, w, current={})
    assert whole["t1"] == whole["t2"] == "P" and whole["t3"] == "P~2"
    cut = component_names(IdentityGraph(w), names, w, current=whole)
    assert [cut[n] for n in ("t1", "t3", "t4", "t5")] == ["P", "P~2", "P~3", "P~4"] and cut["t2"] == "P~5"
    # a name typed by an operator still wins over the written one; a written name of another
    # person is never kept
    typed = component_names(g, names, w, strong={"t3": "Q"}, current=joined)
    assert typed["t3"] == "Q" and {n: typed[n] for n in w if n != "t3"} == {n: joined[n] for n in w if n != "t3"}
    stolen = component_names(IdentityGraph(["x", "y"]), {"x": "A", "y": "B"}, current={"x": "B"})
    assert stolen == {"x": "A", "y": "B"}


def test_claims_of_the_changed_components_name_as_a_full_run_does():
    """The kept claims of untouched components plus fresh claims of the joined ones assign the same
    names as naming the whole new graph; the copy the answer was applied to leaves the old graph
    as it was. Random joins over 60 nodes with clashing names, several seeds."""
    from core.math.graph import assign_names, name_claims

    for seed in range(8):
        rng = np.random.default_rng(seed)
        nodes = [f"n{i:02d}" for i in range(60)]
        w = {n: int(rng.integers(1, 9)) for n in nodes}
        names = {n: f"P{rng.integers(0, 6)}" for n in nodes if rng.random() < 0.7}
        g = IdentityGraph(nodes)
        claims = name_claims(g, names, w)
        current = assign_names(g, claims)
        claims = name_claims(g, names, w, current=current)
        for _step in range(25):
            a, b = rng.choice(nodes, 2, replace=False)
            before = g.components()
            new = g.copy()
            if new.link(Link(str(a), str(b), bool(rng.random() < 0.8))) is not None:
                continue
            assert g.components() == before  # the copy is independent
            stale = {g.find(str(a)), g.find(str(b))}
            kept = {r: c for r, c in claims.items() if r not in stale}
            kept.update(name_claims(new, names, w, current=current, roots=[str(a), str(b)]))
            out = assign_names(new, kept)
            assert out == component_names(new, names, w, current=current)
            g, current = new, out
            claims = name_claims(g, names, w, current=current)  # as written: the next step's input


def test_resettling_the_answered_part_is_the_replay_when_ingested_names_are_to_be_verified():
    """Ingested names to be verified are applied after the operator's answers, so a new answer
    cannot simply be added to the graph: the components it touches, closed over shared names
    (:func:`name_closure`), are replayed alone (:meth:`IdentityGraph.resettle`). Over random
    graphs (clashing names, frame cannot-links, answers that split a named identity or join
    two) the result is the whole replay's: the same components and cannot-links."""
    from core.math.graph import name_closure, name_links

    def shape(g):
        comps = g.components()
        first = {n: c[0] for c in comps for n in c}
        return comps, sorted({tuple(sorted((first[a], first[b]))) for a, b in g.cannot_pairs()})

    for seed in range(12):
        rng = np.random.default_rng(seed)
        nodes = [f"n{i:02d}" for i in range(50)]
        top = {n: f"P{rng.integers(0, 8)}" for n in nodes if rng.random() < 0.8}
        free = [Link(*sorted(map(str, rng.choice(nodes, 2, replace=False))), False, "frame") for _ in range(6)]
        answers: list[Link] = []
        confirmed = build(nodes, free=free, decisions=answers)
        g = build(nodes, free=free, ingested_names=top, decisions=answers, trust_ingested=False)
        for step in range(20):
            a, b = map(str, rng.choice(nodes, 2, replace=False))
            ln = Link(a, b, bool(rng.random() < 0.5), "operator", f"d{step}")
            new_conf = confirmed.copy()
            if new_conf.link(ln) is not None:
                continue  # refused on the confirmed graph: the service replays (and decide_pair refuses)
            answers.append(ln)
            roots = name_closure(g, top, [a, b])
            part = {n for r in roots for n in g.members(r)}
            new_g = g.copy()
            assert new_g.resettle(part, new_conf.applied, name_links({n: top[n] for n in part if n in top}, "ingested"))
            whole = build(nodes, free=free, ingested_names=top, decisions=answers, trust_ingested=False)
            assert shape(new_g) == shape(whole), (seed, step)
            assert shape(g) == shape(build(nodes, free=free, ingested_names=top, decisions=answers[:-1],
                                            trust_ingested=False))  # the old graph untouched
            g, confirmed = new_g, new_conf
