"""The "personness" queue strategy ("Is this a person? least sure first"): the pure ordering on
arrays, then through the real queue on TUD-Campus crops made to look like raw footage (no class
label yet), with a round's person-ness scores and threshold, or only detector scores."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from core.math.strategies import STRATEGIES, personness, select


# --------------------------------------------------------------------------------------------
# Pure function on arrays
# --------------------------------------------------------------------------------------------


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def test_threshold_nearest_first_and_labelled_excluded():
    p = np.array([0.95, 0.40, 0.05, 0.31, 0.70, 0.29, 0.50, 0.33])
    lab = np.zeros(len(p), bool)
    lab[3] = True  # the nearest of all (0.31) is labelled already
    s = personness(_x(len(p)), lab, np.array(["person" if v else None for v in lab], object), 8,
                   np.random.default_rng(0), person=p, person_threshold=0.30)
    # |p - 0.30| ascending, index 3 left out
    assert s.indices.tolist() == [5, 7, 1, 6, 2, 4, 0]
    assert s.strategy == "personness" and np.isnan(s.scores[3])
    assert np.all(np.diff(s.scores[s.indices]) <= 0), "scores must order as the batch does"
    assert s.reasons[0].startswith("person-ness 0.29, threshold 0.30") and "unsure" in s.reasons[0]
    # without a known threshold the head is read at 0.5, and the reason says so
    s = personness(_x(len(p)), lab, np.where(lab, "person", None), 3,
                   np.random.default_rng(0), person=p)
    assert s.indices.tolist() == [6, 1, 7]
    assert "0.50" in s.reasons[0] and "unknown" in s.reasons[0]


def test_detector_score_fallback_and_unscored_last():
    n = 10
    det = np.array([0.9, 0.2, np.nan, 0.5, 0.1, np.nan, 0.7, 0.3, np.nan, 0.6])
    none = np.zeros(n, bool)
    s = select("personness", _x(n), none, None, n, 3, det_score=det)
    # no head: lowest detector score first, the crops with no score last
    assert s.indices[:7].tolist() == [4, 1, 7, 3, 9, 6, 0]
    assert set(s.indices[7:].tolist()) == {2, 5, 8}
    assert "detector score 0.10: lowest first, no person-ness head yet" in s.reasons[0]
    assert "random order" in s.reasons[-1]
    # the unscored tail is in a stable seeded order
    again = select("personness", _x(n), none, None, n, 3, det_score=list(det))
    assert np.array_equal(s.indices, again.indices)
    # a head, but one crop's person-ness failed: scored crops first, then that crop by its
    # detector score, then the rest
    p = np.full(n, np.nan)
    p[[0, 6]] = [0.52, 0.9]
    s = select("personness", _x(n), none, None, 4, 3, person=p, person_threshold=0.5, det_score=det)
    assert s.indices.tolist() == [0, 6, 4, 1]
    assert "no person-ness score for this crop" in s.reasons[2]


def test_boost_stays_within_its_tier_and_no_scores_falls_back():
    n = 6
    p = np.array([0.5, 0.45, 0.1, np.nan, np.nan, np.nan])
    det = np.array([np.nan, np.nan, np.nan, 0.2, 0.8, np.nan])
    boost = np.array([0.0, 0.0, 5.0, 0.0, 9.0, 9.0])
    s = select("personness", _x(n), np.zeros(n, bool), None, n, 0, person=p, person_threshold=0.5,
               det_score=det, boost=boost)
    # index 2 (far from the threshold) is boosted above the other head-scored crops, but the
    # boosted detector-only crop 4 stays behind every head-scored one
    assert s.indices.tolist() == [2, 0, 1, 4, 3, 5]
    # no scores at all: undefined, so diversity (kcenter) as the uncertainty strategies do
    s = select("personness", _x(n), np.zeros(n, bool), None, 3, 0)
    assert s.strategy == "kcenter" and len(set(s.indices.tolist())) == 3
    assert s.reasons[0].startswith("no person-ness or detector scores")
    with pytest.raises(ValueError):
        select("personness", _x(n), np.zeros(n, bool), None, 3, 0, person=np.ones(2))
    assert "personness" in STRATEGIES


# --------------------------------------------------------------------------------------------
# Through the real queue
# --------------------------------------------------------------------------------------------


@pytest.fixture
def raw(tud_clone):
    """TUD-Campus crops with their class labels removed, as raw footage arrives."""
    from core.services import labeling
    from core.data import store

    ids = store.get_dataset(tud_clone).values("id")
    store.set_values(tud_clone, "label", {i: None for i in ids})
    yield tud_clone, ids
    labeling.wait_for_refills()
    labeling.clear_queue(tud_clone)


def _serve(name, spec, n):
    from core.services import labeling

    sess = "s-" + uuid.uuid4().hex[:6]
    out = []
    for _ in range(n):
        it = labeling.next_item(name, sess, lease_s=60, queue=spec)
        assert it is not None
        out.append(it)
        labeling.decide(name, sess, it.sample_id, "op", label="person", expected_version=it.token)
    return out


def test_queue_serves_the_least_sure_first(raw):
    from core.services import labeling, registry
    from core.data import store
    from core.services.labeling.queue import person_threshold

    name, ids = raw
    assert len(ids) >= 30
    rng = np.random.default_rng(1)
    # a round with a person-ness head whose operating threshold is 0.3
    version = registry.new_version(name, "base", {"person_head": True})
    registry.finish(name, version, {}, train={"person": {"n_person": 40, "n_other": 12, "cv_auc": 0.9,
                                                         "threshold": 0.3, "fp_removed": 0.6}})
    ds = store.get_dataset(name)
    store.set_values(name, store.embedding_field(version), dict(zip(*ds.values(["id", store.embedding_field("base")]))))
    scores = {i: float(v) for i, v in zip(ids, rng.uniform(0.6, 1.0, len(ids)))}  # confident persons
    unsure = [ids[7], ids[3], ids[20], ids[11]]  # in order of |score - 0.3|
    for sid, v in zip(unsure, (0.30, 0.31, 0.27, 0.36)):
        scores[sid] = v
    scores[ids[5]] = 0.301  # the nearest of all, but an operator has classed it already
    labeling.decide(name, "m", ids[5], "op", label="shadow/noise")
    scores[ids[9]] = None  # its person-ness failed: after every scored crop
    store.set_values(name, store.person_field(version), scores)
    store.set_active_model(name, version)
    assert person_threshold(name, version) == pytest.approx(0.3)

    spec = labeling.QueueSpec(strategy="personness", target="label", k=len(ids), boost_conditions=False)
    served = _serve(name, spec, 4)
    assert [it.sample_id for it in served] == unsure
    assert served[0].strategy == "personness"
    assert served[0].reason == "person-ness 0.30, threshold 0.30: the model is unsure"
    b = labeling.compute_batch(name, spec)
    got = [r.sample_id for r in b.rows]
    assert ids[5] not in got and not set(unsure) & set(got)
    assert got[-1] == ids[9] and "random order" in b.rows[-1].reason  # no score of either kind
    rest = [scores[s] for s in got[:-1]]
    assert abs(rest[0] - 0.3) == min(abs(v - 0.3) for v in rest)
    assert rest == sorted(rest), "the rest: nearest the threshold (here: lowest) first"


def test_queue_falls_back_to_detector_score_without_a_head(raw):
    from core.services import labeling
    from core.data import store

    name, ids = raw  # model "base" active: no person-ness field
    assert len(ids) > 35
    rng = np.random.default_rng(2)
    det = {i: float(v) for i, v in zip(ids, rng.uniform(0.5, 1.0, len(ids)))}
    low = [ids[12], ids[2], ids[30]]
    for sid, v in zip(low, (0.11, 0.2, 0.33)):
        det[sid] = v
    for sid in ids[-5:]:
        det[sid] = None
    store.set_values(name, "det_score", det)
    spec = labeling.QueueSpec(strategy="personness", target="label", k=10, boost_conditions=False)
    served = _serve(name, spec, 3)
    assert [it.sample_id for it in served] == low
    assert served[0].reason == "detector score 0.11: lowest first, no person-ness head yet"
    b = labeling.compute_batch(name, labeling.QueueSpec(strategy="personness", target="label", k=len(ids)))
    tail = {r.sample_id for r in b.rows[-5:]}
    assert tail == set(ids[-5:])


def test_annotate_page_suggests_it_for_class_labels(raw):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from core.data import store

    name, ids = raw
    store.set_values(name, "det_score", {i: 0.9 - 0.01 * j for j, i in enumerate(ids)})  # last: lowest
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.session_state["dataset"] = name
    at.session_state["ann_mode"] = "crops"
    at.run()
    at.switch_page("pages/annotate.py").run()
    assert not at.exception, [e.value for e in at.exception]
    box = at.selectbox(key="ann_strategy")
    assert box.value == "uncertainty_diversity"
    assert "Is this a person? least sure first" in " ".join(box.options)
    at.radio(key="ann_target").set_value("label").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="ann_strategy").value == "personness"
    assert at.session_state["annotate_item"] == ids[-1]  # the lowest detector score is served first
    at.radio(key="ann_target").set_value("identity").run()  # back: the identity default again
    assert at.selectbox(key="ann_strategy").value == "uncertainty_diversity"
