"""Query strategies on small synthetic arrays (Gaussian blobs); misclustered candidates are in
test_misclustered.py."""
from __future__ import annotations

import numpy as np
import pytest

from core.math.strategies import DEFAULT_STRATEGY, STRATEGIES, Selection, class_probabilities, select

D = 16


def blobs(n_blobs: int, per: int, seed: int = 0, spread: float = 1.0, radius: float = 10.0):
    """Points [n_blobs*per, D] around well separated centres; blob id int [N]; centres [B, D]."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, D))
    centres = radius * centres / np.linalg.norm(centres, axis=1, keepdims=True)
    blob = np.repeat(np.arange(n_blobs), per)
    x = centres[blob] + spread * rng.normal(size=(len(blob), D))
    return x.astype(np.float32), blob, centres


def labelled_setup(seed: int = 0, n_blobs: int = 5, per: int = 40, n_lab_per_blob: int = 2):
    x, blob, centres = blobs(n_blobs, per, seed)
    labels = np.array([f"id{b}" for b in blob], dtype=object)
    lab = np.zeros(len(x), bool)
    for b in range(n_blobs):
        lab[np.flatnonzero(blob == b)[:n_lab_per_blob]] = True
    return x, lab, labels, blob, centres


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_contract_and_determinism(name):
    x, lab, labels, _blob, _c = labelled_setup()
    a = select(name, x, lab, labels, 12, np.random.default_rng(7))
    b = select(name, x, lab, labels, 12, np.random.default_rng(7))
    assert isinstance(a, Selection)
    assert a.indices.dtype.kind == "i" and len(a.indices) == 12
    assert np.array_equal(a.indices, b.indices), "same seed must give the same batch"
    assert len(set(a.indices.tolist())) == 12, "duplicates in a batch"
    assert not lab[a.indices].any(), "a labelled sample was queued"
    assert a.scores.shape == (len(x),) and np.isnan(a.scores[lab]).all() and np.isfinite(a.scores[~lab]).all()
    assert len(a.reasons) == 12 and all(isinstance(r, str) and r for r in a.reasons)
    # labels of unlabelled samples are ignored: scrambling them must not change anything
    scrambled = labels.copy()
    scrambled[~lab] = "garbage"
    c = select(name, x, lab, scrambled, 12, np.random.default_rng(7))
    assert np.array_equal(a.indices, c.indices)


def test_random_depends_on_seed_and_default_is_registered():
    x, lab, labels, _b, _c = labelled_setup()
    a = select("random", x, lab, labels, 10, 1).indices
    b = select("random", x, lab, labels, 10, 2).indices
    assert not np.array_equal(a, b)
    assert DEFAULT_STRATEGY in STRATEGIES and DEFAULT_STRATEGY != "random"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_edge_cases(name):
    x, lab, labels, blob, _c = labelled_setup(per=10)
    rng = np.random.default_rng(0)
    # fewer unlabelled than k: everything unlabelled comes back once
    few = np.ones(len(x), bool)
    few[[3, 17, 29]] = False
    s = select(name, x, few, labels, 10, rng)
    assert sorted(s.indices.tolist()) == [3, 17, 29]
    # k = 0
    assert len(select(name, x, lab, labels, 0, rng).indices) == 0
    # no labels yet: falls back to diversity and covers the blobs
    s = select(name, x, np.zeros(len(x), bool), None, 5, rng)
    assert len(set(s.indices.tolist())) == 5
    if name != "random":
        assert len(set(blob[s.indices])) >= 4, "cold start should spread over the 5 blobs"
    # a single labelled class: still a valid batch
    one = np.zeros(len(x), bool)
    one[np.flatnonzero(blob == 0)[:3]] = True
    s = select(name, x, one, labels, 5, rng)
    assert len(set(s.indices.tolist())) == 5 and not one[s.indices].any()


def test_kcenter_covers_all_blobs():
    x, blob, _c = blobs(6, 30, seed=3)
    lab = np.zeros(len(x), bool)
    lab[np.flatnonzero(blob == 0)[:1]] = True
    s = select("kcenter", x, lab, np.array(["a"] * len(x), object), 5, 0)
    assert set(blob[s.indices]) == {1, 2, 3, 4, 5}


def test_batch_mode_spreads_over_clusters():
    """Two labelled blobs, four unlabelled ones: a batch of 5 reaches every unlabelled blob,
    where plain margin spends most of the batch in the one most ambiguous blob."""
    covered, covered_margin = [], []
    for seed in range(5):
        x, blob, _c = blobs(6, 40, seed)
        labels = np.array([f"id{b}" for b in blob], dtype=object)
        lab = np.isin(np.arange(len(x)), np.r_[np.flatnonzero(blob == 0)[:3], np.flatnonzero(blob == 1)[:3]])
        s = select(DEFAULT_STRATEGY, x, lab, labels, 5, np.random.default_rng(seed))
        covered.append(len(set(blob[s.indices])))
        covered_margin.append(len(set(blob[select("margin", x, lab, labels, 5, seed).indices])))
    assert min(covered) >= 4, covered
    assert np.mean(covered) > np.mean(covered_margin) + 1, (covered, covered_margin)


def _two_classes_with_midpoints(seed: int = 0):
    """Two labelled blobs A, B; unlabelled: their members, 5 points between them, and a tight
    clump of 20 near-copies also between them."""
    rng = np.random.default_rng(seed)
    x, blob, c = blobs(2, 40, seed)
    mid = (c[0] + c[1]) / 2
    between = mid + 0.6 * rng.normal(size=(5, D))
    clump = mid + 3.0 * rng.normal(size=D) * 0.3 + 0.01 * rng.normal(size=(20, D))
    xs = np.vstack([x, between, clump]).astype(np.float32)
    labels = np.array(["A"] * 40 + ["B"] * 40 + ["?"] * 25, dtype=object)
    lab = np.zeros(len(xs), bool)
    lab[:10] = lab[40:50] = True
    return xs, lab, labels, np.arange(80, 85), np.arange(85, 105)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("name", ["least_confidence", "margin", "entropy", "knn_disagreement"])
def test_uncertainty_picks_points_between_classes(name, seed):
    xs, lab, labels, between, clump = _two_classes_with_midpoints(seed)
    s = select(name, xs, lab, labels, 10, 0)
    ambiguous = set(between.tolist()) | set(clump.tolist())
    assert set(s.indices.tolist()) <= ambiguous, s.indices
    # and the blob members are scored below every in-between point (knn_disagreement too: an
    # in-between point whose nearest labelled samples all agree still scores above the members,
    # by how close the other label comes)
    sc = s.scores
    members = np.r_[10:40, 50:80]
    assert np.nanmax(sc[members]) < np.nanmin(sc[list(ambiguous)]) + 1e-9, (np.nanmax(sc[members]),
                                                                            np.sort(sc[list(ambiguous)])[:3])


def test_batch_mode_avoids_near_copies():
    xs, lab, labels, between, clump = _two_classes_with_midpoints()
    plain = select("margin", xs, lab, labels, 6, 0).indices
    batch = select("uncertainty_diversity", xs, lab, labels, 6, 0).indices
    assert np.isin(plain, clump).sum() >= 3  # the clump dominates plain uncertainty
    assert np.isin(batch, clump).sum() <= 1, batch
    assert np.isin(batch, between).sum() >= 4


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_boost_raises_condition_samples(name):
    x, lab, labels, blob, _c = labelled_setup(seed=4)
    boosted = np.array([np.flatnonzero((blob == b) & ~lab)[5] for b in range(5)])
    boost = np.zeros(len(x))
    boost[boosted] = 10.0
    s = select(name, x, lab, labels, 5, 0, boost=boost, boost_mode="add")
    assert set(s.indices.tolist()) == set(boosted.tolist())
    with pytest.raises(ValueError):
        select(name, x, lab, labels, 5, 0, boost=np.ones(3))


def test_class_probabilities_knn_and_logreg():
    x, lab, labels, blob, _c = labelled_setup(n_lab_per_blob=3)
    for clf in ("knn", "logreg"):
        p, classes = class_probabilities(x, lab, labels, classifier=clf)
        assert p.shape == (len(x), 5) and np.allclose(p.sum(axis=1), 1.0)
        acc = (classes[p.argmax(axis=1)] == labels).mean()
        assert acc > 0.95, (clf, acc)
