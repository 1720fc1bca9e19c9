"""Retrieval metrics on tiny hand-made embeddings whose answers are worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from core.math import evaluate as E


def unit(*angles: float) -> np.ndarray:
    """2-D unit vectors at the given angles (radians): cosine similarity = cos(angle difference)."""
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# one query (id A, camera 1) at angle 0; gallery ranked by angle: A/cam1, B/cam1, A/cam2
Q = unit(0.0)
G = unit(0.1, 0.2, 0.3)
G_IDS = ["A", "B", "A"]
G_CAMS = [1, 1, 2]


def test_map_differs_from_rank1():
    m = E.retrieval_metrics(Q, ["A"], G, G_IDS)
    # ranking A, B, A: first hit at rank 1; AP = (1/1 + 2/3) / 2
    assert m["rank1"] == 1.0 and m["rank5"] == 1.0
    assert m["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["n_queries"] == 1 and m["n_skipped"] == 0


def test_same_camera_same_identity_is_excluded():
    m = E.retrieval_metrics(Q, ["A"], G, G_IDS, q_cams=[1], g_cams=G_CAMS)
    # A/cam1 is junk -> candidates B, A: first hit at rank 2, AP = 1/2
    assert m["rank1"] == 0.0 and m["rank5"] == 1.0
    assert m["mAP"] == pytest.approx(0.5)
    # a different-identity item from the query's own camera stays a distractor
    m2 = E.retrieval_metrics(Q, ["A"], G, ["A", "A", "B"], q_cams=[1], g_cams=[2, 1, 1])
    assert m2["rank1"] == 1.0 and m2["mAP"] == pytest.approx(1.0)


def test_query_without_cross_camera_match_is_skipped():
    q = unit(0.0, 0.2)
    m = E.retrieval_metrics(q, ["A", "B"], G, G_IDS, q_cams=[1, 1], g_cams=G_CAMS)
    # query B/cam1: its only match B/cam1 is junk -> not scored
    assert m["n_queries"] == 1 and m["n_skipped"] == 1
    assert m["rank1"] == 0.0 and m["mAP"] == pytest.approx(0.5)


def test_rank5_and_several_queries():
    # gallery: 5 distractors closer than the one match -> rank 6
    g = unit(0.01, 0.02, 0.03, 0.04, 0.05, 0.06)
    m = E.retrieval_metrics(unit(0.0), ["A"], g, ["X", "Y", "Z", "U", "V", "A"], ks=(1, 5, 10))
    assert (m["rank1"], m["rank5"], m["rank10"]) == (0.0, 0.0, 1.0)
    assert m["mAP"] == pytest.approx(1 / 6)
    # two queries: mean over queries
    q = unit(0.0, 0.059)
    m = E.retrieval_metrics(q, ["A", "A"], g, ["X", "Y", "Z", "U", "V", "A"])
    assert m["rank1"] == 0.5 and m["mAP"] == pytest.approx((1 / 6 + 1) / 2)


def test_unnormalised_inputs_use_cosine():
    m = E.retrieval_metrics(Q * 7, ["A"], G * np.array([[3], [0.5], [9]], np.float32), G_IDS)
    assert m["mAP"] == pytest.approx((1 + 2 / 3) / 2)


def test_leave_one_out():
    emb = unit(0.0, 0.1, 1.0, 1.1, 2.0)
    ids = ["A", "A", "B", "B", "C"]
    m = E.leave_one_out_metrics(emb, ids)
    # A, A, B, B find their twin first; C has no match -> skipped
    assert m["rank1"] == 1.0 and m["mAP"] == 1.0 and m["n_queries"] == 4 and m["n_skipped"] == 1
    m = E.leave_one_out_metrics(emb, ids, cams=[1, 1, 1, 2, 1])
    # with cameras, A's twin is same-camera junk -> A skipped; B's twin is cross-camera
    assert m["n_queries"] == 2 and m["rank1"] == 1.0


def test_rank1_agrees_with_pytorch_metric_learning():
    pytest.importorskip("pytorch_metric_learning")
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    ids = np.repeat(np.arange(6), 5)
    emb = (centers[ids] + rng.normal(scale=1.2, size=(30, 16))).astype(np.float32)
    qi, gi = np.arange(0, 30, 5), np.setdiff1d(np.arange(30), np.arange(0, 30, 5))
    ours = E.retrieval_metrics(emb[qi], ids[qi], emb[gi], ids[gi])
    calc = AccuracyCalculator(include=("precision_at_1",), k=1, device=torch.device("cpu"),
                              knn_func=CustomKNN(CosineSimilarity()))
    ref = calc.get_accuracy(
        torch.from_numpy(E.l2_normalize(emb[qi])), torch.from_numpy(ids[qi]),
        torch.from_numpy(E.l2_normalize(emb[gi])), torch.from_numpy(ids[gi]),
        ref_includes_query=False,
    )
    assert ours["rank1"] == pytest.approx(ref["precision_at_1"])
    assert 0 < ours["rank1"] < 1  # a case that can fail both ways


def test_metrics_by_condition():
    q = unit(0.0, 0.24)  # query 0 (day) finds A first; query 1 (night) is nearest B
    res = E.metrics_by_condition(
        q, ["A", "A"], G, G_IDS,
        conditions={"day": np.array([True, False]), "night": np.array([False, True])},
    )
    assert res["day"]["rank1"] == 1.0 and res["day"]["n_queries"] == 1
    assert res["night"]["rank1"] == 0.0
    # night query at 0.24: B (0.04 away), A (0.06), A (0.14) -> AP = (1/2 + 2/3) / 2
    assert res["night"]["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert res["all"]["rank1"] == 0.5
    assert res["all"]["mAP"] == pytest.approx((res["day"]["mAP"] + res["night"]["mAP"]) / 2)


def test_match_rates_and_threshold():
    emb = unit(0.0, 0.1, 1.0, 1.2)
    ids = ["A", "A", "B", "B"]
    # pairs (angle diff): AA .1, BB .2 ; AB: 1.0, 1.2, 0.9, 1.1
    r = E.match_rates(emb, ids, threshold=float(np.cos(0.95)))
    assert r["n_pos_pairs"] == 2 and r["n_neg_pairs"] == 4
    assert r["tmr"] == 1.0 and r["fmr"] == 0.25  # only the 0.9-rad pair is above
    r = E.match_rates(emb, ids, threshold=float(np.cos(0.15)))
    assert r["tmr"] == 0.5 and r["fmr"] == 0.0
    t = E.threshold_at_fmr(emb, ids, target_fmr=0.0)
    assert E.match_rates(emb, ids, t)["fmr"] == 0.0 and t == pytest.approx(np.cos(0.9), abs=1e-6)
    t = E.threshold_at_fmr(emb, ids, target_fmr=0.5)
    assert E.match_rates(emb, ids, t)["fmr"] == 0.5
    # query x gallery pairs
    r = E.match_rates(Q, ["A"], float(np.cos(0.25)), G, G_IDS)
    assert r["n_pos_pairs"] == 2 and r["tmr"] == 0.5 and r["fmr"] == 1.0


def test_evaluate_and_compare():
    q = unit(0.0, 0.25)
    before = E.evaluate(q, ["A", "A"], G, G_IDS, q_cams=[1, 2], g_cams=G_CAMS,
                        conditions={"night": np.array([False, True])}, threshold=0.97)
    assert set(before) == {"all", "by_condition", "by_camera", "at_threshold", "reranked"}
    assert before["reranked"]["n_queries"] == before["all"]["n_queries"]
    assert set(before["by_camera"]) == {"1", "2"}
    assert before["at_threshold"]["threshold"] == 0.97
    after = E.evaluate(unit(0.3, 0.3), ["A", "A"], G, G_IDS, q_cams=[1, 2], g_cams=G_CAMS,
                       conditions={"night": np.array([False, True])}, threshold=0.97)
    rows = E.compare(before, after)
    by = {r["metric"]: r for r in rows}
    assert by["all.rank1"]["before"] is not None
    assert by["all.mAP"]["delta"] == pytest.approx(by["all.mAP"]["after"] - by["all.mAP"]["before"])
    assert "by_condition.night.mAP" in by and "at_threshold.fmr" in by
    rows = E.compare({"all": {"mAP": 0.5}}, {"all": {"mAP": 0.7, "rank1": 1.0}})
    assert rows == [
        {"metric": "all.mAP", "before": 0.5, "after": 0.7, "delta": pytest.approx(0.2)},
        {"metric": "all.rank1", "before": None, "after": 1.0, "delta": None},
    ]


def _two_people():
    """20 crops of A around angle 0 and 20 of B around 0.6 rad, and an A query that drifted to 0.27:
    nearer to A's closest crops than to B's, but B's near side beats A's far side."""
    g = unit(*np.linspace(-0.15, 0.15, 20), *np.linspace(0.45, 0.75, 20))
    return unit(0.27), ["A"], g, ["A"] * 20 + ["B"] * 20


def test_k_reciprocal_reranking_ranks_the_whole_person_first():
    q, q_ids, g, g_ids = _two_people()
    plain = E.retrieval_metrics(q, q_ids, g, g_ids)
    assert plain["rank1"] == 1.0 and plain["mAP"] < 0.9  # B crops interleave with A's far side
    rr = E.retrieval_metrics(q, q_ids, g, g_ids, rerank=True)
    assert rr["rank1"] == 1.0 and rr["mAP"] == pytest.approx(1.0)  # every A crop before any B crop
    d = E.k_reciprocal_distances(np.concatenate([q, g]))
    assert d.shape == (41, 41) and np.allclose(np.diag(d), 0, atol=1e-6)
    assert d.min() >= -1e-6 and d.max() <= 1 + 1e-6
    assert np.allclose(E.k_reciprocal_distances(np.concatenate([q, g]), n_rows=1), d[:1])


def test_reranking_beyond_the_memory_limit(monkeypatch):
    q, q_ids, g, g_ids = _two_people()
    monkeypatch.setattr(E, "RERANK_MAX_ITEMS", 10)
    with pytest.raises(ValueError, match="too much memory"):
        E.retrieval_metrics(q, q_ids, g, g_ids, rerank=True)
    res = E.evaluate(q, q_ids, g, g_ids)
    assert res["reranked"] == {} and res["all"]["n_queries"] == 1  # the rest is still evaluated


def test_query_is_never_its_own_candidate():
    """A file tagged both query and gallery is one sample on both sides: with cameras unknown it
    would find itself at similarity 1. Keys (sample ids) remove it from its own candidates, in
    the plain, per-condition, re-ranked and threshold blocks alike."""
    q = unit(0.0)
    g = unit(0.0, 0.2, 0.4)  # g[0] is the query itself; the next A is at rank 2
    g_ids = ["A", "B", "A"]
    naive = E.retrieval_metrics(q, ["A"], g, g_ids)
    assert naive["rank1"] == 1.0  # what the self-match did
    m = E.retrieval_metrics(q, ["A"], g, g_ids, q_keys=["s1"], g_keys=["s1", "s2", "s3"])
    assert m["rank1"] == 0.0 and m["mAP"] == pytest.approx(0.5)
    res = E.evaluate(q, ["A"], g, g_ids, conditions={"day": np.array([True])},
                     q_keys=["s1"], g_keys=["s1", "s2", "s3"])
    assert res["all"]["rank1"] == 0.0 and res["by_condition"]["day"]["rank1"] == 0.0
    assert res["reranked"]["rank1"] == 0.0
    # the self-pair is not a same-identity pair: one A-A pair (0.4 rad) is left
    assert res["at_threshold"]["n_pos_pairs"] == 1
    with pytest.raises(ValueError, match="keys"):
        E.retrieval_metrics(q, ["A"], g, g_ids, q_keys=["s1"], g_keys=["s1"])
