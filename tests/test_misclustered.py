"""Misclustered candidates on synthetic arrays (Gaussian blobs, a two-camera set with one crop per
camera) and on the real campus62 crops with the packaged model's embeddings."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from core.math.misclustered import (MAX_CANDIDATE_SHARE, candidate_limit, condition_cluster_scores, condition_clusters, label_evidence, misclustered_candidates)
from tests.conftest import need_shared
from tests.test_strategies import D, blobs


def _plain_disagreement(x: np.ndarray, labels: np.ndarray, k: int = 10) -> np.ndarray:
    """The old score: share of the k nearest neighbours (cosine, itself excluded) with another label."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    nb = np.argsort(-s, axis=1)[:, :k]
    return (labels[nb] != labels[:, None]).mean(axis=1)


def _mislabel(labels: np.ndarray, rng: np.random.Generator, n_bad: int) -> np.ndarray:
    """Give n_bad random samples another (existing) label, in place; returns their indices."""
    names = np.unique(labels)
    bad = rng.choice(len(labels), n_bad, replace=False)
    for i in bad:
        labels[i] = rng.choice(names[names != labels[i]])
    return bad


def test_label_evidence_ranks_corrupted_labels_on_top():
    x, blob, _c = blobs(4, 40, seed=5)
    labels = np.array([f"id{b}" for b in blob], dtype=object)
    rng = np.random.default_rng(5)
    corrupted = _mislabel(labels, rng, 12)
    lab = np.ones(len(x), bool)
    lab[rng.choice(np.setdiff1d(np.arange(len(x)), corrupted), 10, replace=False)] = False
    ev = label_evidence(x, lab, labels, n_neighbors=10)
    assert np.isnan(ev.score[~lab]).all() and np.isfinite(ev.score[lab]).all()
    top = np.argsort(-np.nan_to_num(ev.score, nan=-1), kind="stable")[: len(corrupted)]
    assert np.isin(corrupted, top).mean() >= 0.9
    assert ev.score[corrupted].min() >= 0.5 and np.median(ev.score[lab]) == 0.0
    # its own identity ranks far (crops of its true blob come first), its neighbours are that blob
    assert (ev.own_rank[corrupted] >= 4 * ev.typical_rank).all() and ev.typical_rank <= 2
    assert (ev.rival_votes[corrupted] >= 8).all() and (ev.own_votes[corrupted] <= 1).all()
    assert (np.nan_to_num(ev.score) > 0).sum() == len(corrupted)  # nothing else is suspicious
    cand = misclustered_candidates(x, lab, labels, max_share=0.1)
    assert set(cand.order.tolist()) == set(corrupted.tolist())
    # 12 of 150 labels wrong is more than the default list holds (5 %, at least 10): the 10 best
    cand = misclustered_candidates(x, lab, labels)
    assert cand.limit == 10 and cand.dropped == 2 and np.isin(cand.order, corrupted).all()


def _two_camera(n_ids: int = 80, seed: int = 0, cam: float = 3.0, noise: float = 1.5):
    """n_ids identities seen once by each of two cameras: x = identity + camera offset + noise;
    the camera offset puts about half of every crop's neighbours in its own camera."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n_ids, D))
    c = 10 * c / np.linalg.norm(c, axis=1, keepdims=True)
    cam_v = rng.normal(size=(2, D))
    cam_v = cam * cam_v / np.linalg.norm(cam_v, axis=1, keepdims=True)
    ident, camera = np.repeat(np.arange(n_ids), 2), np.tile([0, 1], n_ids)
    x = c[ident] + cam_v[camera] + noise * rng.normal(size=(len(ident), D))
    labels = np.array([f"{i:04d}" for i in ident], dtype=object)
    return x.astype(np.float32), labels, rng


def test_one_crop_per_camera_gives_a_short_list_with_the_mislabelled_first():
    """With two crops per identity at most 1 of 10 neighbours can agree: the plain disagreement
    share flags every crop. The evidence discounts that, so the list is short and led by the
    relabelled crops, and each reason names the identity its neighbours belong to."""
    n_bad, found, lengths = 4, [], []
    for seed in range(5):
        x, labels, rng = _two_camera(seed=seed)
        bad = _mislabel(labels, rng, n_bad)
        assert (_plain_disagreement(x, labels) >= 0.5).mean() == 1.0  # what the old list showed
        cand = misclustered_candidates(x, np.ones(len(x), bool), labels)
        found.append(np.isin(cand.order[:n_bad], bad).sum())
        lengths.append(len(cand.order))
        assert (np.diff(cand.scores[cand.order]) <= 0).all()
        assert (cand.scores[np.setdiff1d(np.arange(len(x)), cand.order)] == 0).all()
        for i in cand.order:
            (r,) = cand.reasons[i]
            assert f"its own ({labels[i]})" in r and f"nearest {labels[i]} crop ranks" in r
            assert f"identity {cand.evidence.rival[i]}" in r
    assert max(lengths) <= 2 * n_bad, lengths
    assert sum(found) >= 0.8 * 5 * n_bad, found


def test_no_candidates_when_the_embedding_does_not_tell_identities_apart():
    x, labels, rng = _two_camera(seed=1, cam=12.0, noise=3.0)  # neighbours: the own camera only
    _mislabel(labels, rng, 4)
    ev = label_evidence(x, np.ones(len(x), bool), labels)
    assert ev.typical_rank * 2 > np.nanmax(ev.chance_rank)  # own identity no nearer than chance
    assert len(misclustered_candidates(x, np.ones(len(x), bool), labels).order) == 0
    # singletons and unlabelled samples carry no evidence
    lab = np.ones(len(x), bool)
    lab[::2] = False
    ev = label_evidence(x, lab, labels)
    assert np.isnan(ev.score[~lab]).all() and (np.isnan(ev.score) == (ev.own_size < 2)).all()
    assert (ev.own_size[lab] == 1).sum() >= 70


def test_candidate_list_is_capped_and_flags_always_stay():
    x, blob, _c = blobs(10, 40, seed=2)  # 400 samples, a quarter of them mislabelled
    labels = np.array([f"id{b}" for b in blob], dtype=object)
    rng = np.random.default_rng(2)
    _mislabel(labels, rng, 40)
    flags = np.zeros(len(x), bool)
    flags[rng.choice(len(x), 3, replace=False)] = True
    cand = misclustered_candidates(x, np.ones(len(x), bool), labels, flags=flags)
    limit = candidate_limit(len(x))
    assert limit == int(np.ceil(MAX_CANDIDATE_SHARE * len(x))) == cand.limit == 20
    assert limit < len(cand.order) <= limit + flags.sum() and np.isin(np.flatnonzero(flags), cand.order).all()
    assert cand.dropped > 0 and (cand.scores > 0).sum() == len(cand.order)
    assert sum(bool(r) for r in cand.reasons) == len(cand.order)
    assert candidate_limit(10) == 10 and candidate_limit(10**6) == 200
    wide = misclustered_candidates(x, np.ones(len(x), bool), labels, flags=flags, max_share=1.0, max_candidates=10**6)
    assert len(wide.order) > len(cand.order) and wide.dropped == 0


def _planted_dark_blob(seed: int = 0):
    """6 day identities (one blob each), a 'dark' blob of 30 samples whose identities are mixed
    (a night simulation: the model puts dark crops together) and one person seen only at night
    (dark and in its own blob: a genuine identity cluster, not a lighting artefact)."""
    rng = np.random.default_rng(seed)
    x, blob, _c = blobs(8, 30, seed)
    ids = np.array([f"p{b}" for b in blob], dtype=object)
    dark_blob = np.flatnonzero(blob == 6)
    ids[dark_blob] = rng.choice([f"p{b}" for b in range(6)], size=len(dark_blob))
    night_person = np.flatnonzero(blob == 7)
    dark = np.zeros(len(x), bool)
    dark[dark_blob] = dark[night_person] = True
    return x, ids, dark, dark_blob, night_person


def test_condition_clusters_finds_planted_dark_blob():
    x, ids, dark, dark_blob, night_person = _planted_dark_blob()
    found = condition_clusters(x, ids, {"night": dark}, n_neighbors=10)
    assert len(found) == 1, [(c["condition"], c["size"]) for c in found]
    c = found[0]
    assert c["condition"] == "night"
    assert set(c["members"].tolist()) <= set(dark_blob.tolist())
    assert c["size"] >= 0.9 * len(dark_blob)
    assert c["condition_purity"] > 0.9 and c["identity_purity"] < 0.5 and c["n_identities"] >= 4
    assert "night" in c["reason"]
    cs = condition_cluster_scores(x, ids, {"night": dark})
    assert cs.score.shape == (len(x),)
    assert (cs.score[~dark] == 0).all()
    assert cs.score[night_person].max() < 0.2 < cs.score[dark_blob].min()


def test_condition_clusters_without_identities_and_without_condition_structure():
    x, ids, dark, dark_blob, _np = _planted_dark_blob()
    found = condition_clusters(x, None, {"night": dark})
    assert {c["condition"] for c in found} == {"night"}
    assert all(np.isnan(c["identity_purity"]) for c in found)
    # a condition scattered at random over identity blobs is not a cluster
    rng = np.random.default_rng(1)
    scattered = rng.random(len(x)) < 0.3
    assert condition_clusters(x, ids, {"shadow": scattered}) == []


def test_misclustered_candidates_merges_reasons():
    x, ids, dark, dark_blob, night_person = _planted_dark_blob(seed=2)
    labels = ids.copy()
    day = np.flatnonzero(~dark)
    wrong = day[[3, 40, 77]]
    for i in wrong:
        labels[i] = "p5" if labels[i] != "p5" else "p0"
    flags = np.zeros(len(x), bool)
    flagged = day[100]
    flags[flagged] = True
    lab = np.ones(len(x), bool)
    cand = misclustered_candidates(x, lab, labels, conditions={"night": dark}, flags=flags, max_share=0.25)
    assert cand.scores.shape == (len(x),)
    top = cand.order[: len(dark_blob) + 10]
    assert np.isin(wrong, top).all()
    assert flagged in cand.order and any("operator" in r for r in cand.reasons[flagged])
    assert any("none its own" in r for r in cand.reasons[wrong[0]])
    assert np.isin(dark_blob, cand.order).mean() > 0.8
    assert any("night" in r for r in cand.reasons[dark_blob[0]])
    assert not np.isin(night_person, cand.order).any()
    assert len(cand.clusters) == 1
    assert (cand.scores[cand.order][:-1] >= cand.scores[cand.order][1:]).all()
    # with the default limit (5 % of 240, at least 10: 12) the list is cut, the flag stays
    capped = misclustered_candidates(x, lab, labels, conditions={"night": dark}, flags=flags)
    assert len(capped.order) == capped.limit + 1 == 13 and flagged in capped.order


def _campus62_crops():
    """Every distinct campus62 crop (train and val; a picture in two split folders once) and its
    identity (the folder name)."""
    root = need_shared("reid", "campus62")
    seen: dict[str, str] = {}
    for p in sorted(root.rglob("*.png")):
        seen.setdefault(hashlib.sha1(p.read_bytes()).hexdigest(), str(p))
    paths = sorted(seen.values())
    return paths, np.array([p.split("/")[-2] for p in paths], dtype=object)


def test_campus62_candidates_are_few_and_planted_label_errors_rise():
    from core.model import embed

    paths, ids = _campus62_crops()
    x, errors = embed.embed_paths(paths)
    assert not errors and len(paths) > 1000
    lab = np.ones(len(x), bool)
    plain = _plain_disagreement(x, ids)
    assert (plain >= 0.5).mean() > 0.9  # why the old list held nearly every crop
    cand = misclustered_candidates(x, lab, ids)
    print(f"campus62: {len(paths)} crops, {len(cand.order)} candidates (limit {cand.limit}); "
          f"old rule (>= half the neighbours another identity): {(plain >= 0.5).sum()}")
    assert len(cand.order) <= cand.limit == candidate_limit(len(x)) <= MAX_CANDIDATE_SHARE * len(x) + 1
    assert all(cand.reasons[i] for i in cand.order)
    # 20 crops given a wrong identity: the ranked list is enriched with them far above chance
    # (a random 40 of 1183 would hold 0.7 of them; the model barely matches across cameras)
    labels = ids.copy()
    bad = _mislabel(labels, np.random.default_rng(0), 20)
    cand = misclustered_candidates(x, lab, labels)
    hits = int(np.isin(bad, cand.order[:40]).sum())
    print(f"campus62 with 20 wrong identities: {len(cand.order)} candidates, {hits} of them in the top 40")
    assert hits >= 6 and len(cand.order) <= cand.limit


def test_compute_scores_stores_a_short_list(dsname):
    """The store side (what the embed job and the Map page use): campus62 val crops embedded with
    the packaged model; only the short list has a positive mis_score and reasons, flags included."""
    from core.services import analysis
    from core.services import embedding
    from core.data import store
    from core.services.ingest import ingest

    ingest(need_shared("reid", "campus62", "val"), "reid", dsname)
    embedding.embed_dataset(dsname, version="base")
    ids = sorted(store.get_dataset(dsname).values("id"))
    store.set_values(dsname, "flagged", {i: i in ids[:2] for i in ids})
    summary = analysis.compute_scores(dsname, "base")
    print("campus62 val scored:", summary)
    n = summary["scored"]
    assert n == len(ids) and summary["candidate_limit"] == candidate_limit(n) == 10
    assert 2 <= summary["candidates"] <= summary["candidate_limit"] + 2
    rows = analysis.candidates(dsname, limit=60)
    assert len(rows) == summary["candidates"]
    assert all(r["mis_reasons"] for r in rows) and {r["id"] for r in rows} >= set(ids[:2])
    scores = [r["mis_score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    vals = store.get_dataset(dsname).values(analysis.SCORE_FIELD)
    assert sum(v > 0 for v in vals) == len(rows)
