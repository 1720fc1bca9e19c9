"""core.math.neighbours: the one exact kNN routine, checked against brute force."""
import numpy as np
import pytest

from core.math import neighbours
from core.math.strategies import normalise


def _data(seed=0, q=60, r=400, d=24):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(q, d)).astype(np.float32), rng.normal(size=(r, d)).astype(np.float32)


def test_l2_matches_brute_force_distances_and_order():
    q, r = _data()
    idx, dist = neighbours.topk(q, r, 5, metric="l2")
    d = ((q[:, None] - r[None]) ** 2).sum(-1)
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and idx.shape == (60, 5)
    assert (idx == np.argsort(d, 1)[:, :5]).all()
    assert np.allclose(dist, np.sqrt(np.sort(d, 1)[:, :5]), atol=1e-3)


def test_cosine_matches_brute_force_similarities_best_first():
    q, r = _data(1)
    qn, rn = normalise(q), normalise(r)
    idx, sim = neighbours.topk(qn, rn, 7)
    s = qn @ rn.T
    assert (idx == np.argsort(-s, 1)[:, :7]).all()
    assert np.allclose(sim, -np.sort(-s, 1)[:, :7], atol=1e-5)
    assert (np.diff(sim, axis=1) <= 1e-6).all()


def test_exclude_self_never_returns_the_row_and_keeps_the_rest():
    _, r = _data(2)
    rn = normalise(r)
    idx, sim = neighbours.topk(rn, rn, 4, exclude_self=True)
    assert not (idx == np.arange(len(r))[:, None]).any()
    s = rn @ rn.T
    np.fill_diagonal(s, -np.inf)
    assert (idx == np.argsort(-s, 1)[:, :4]).all()
    # duplicated rows: a row's twin ties with itself, and the row itself is still the one left out
    dup = np.concatenate([rn[:10], rn[:10]])
    idx, sim = neighbours.topk(dup, dup, 1, exclude_self=True)
    assert (idx[:, 0] == np.r_[np.arange(10, 20), np.arange(10)]).all() and np.allclose(sim, 1.0, atol=1e-5)


def test_k_is_capped_and_empty_inputs_give_empty_results():
    q, r = _data(3, q=5, r=3)
    idx, _ = neighbours.topk(q, r, 10, metric="l2")
    assert idx.shape == (5, 3)
    idx, _ = neighbours.topk(r, r, 10, metric="l2", exclude_self=True)
    assert idx.shape == (3, 2)
    idx, sc = neighbours.topk(q[:0], r, 3)
    assert idx.shape == (0, 0) and sc.shape == (0, 0)
    with pytest.raises(ValueError, match="unknown metric"):
        neighbours.topk(q, r, 2, metric="manhattan")


def test_nearest_distance_is_one_minus_the_best_similarity():
    q, r = _data(4)
    qn, rn = normalise(q), normalise(r)
    d = neighbours.nearest_distance(qn, rn)
    assert np.allclose(d, 1.0 - (qn @ rn.T).max(1), atol=1e-5)
    assert np.isinf(neighbours.nearest_distance(qn, rn[:0])).all()


def test_approximate_finds_most_true_neighbours_at_scale_and_is_exact_below_it():
    """The inverted file serves only from APPROX_MIN_ROWS rows on; there it finds most of the
    true neighbours (clustered data, as crops are), never a row itself, and flags what it missed."""
    rng = np.random.default_rng(5)
    n = neighbours.APPROX_MIN_ROWS
    centres = rng.normal(size=(400, 32))
    x = normalise((centres[rng.integers(0, 400, n)] + rng.normal(size=(n, 32))).astype(np.float32))
    q = x[:500]
    exact_idx, exact_sim = neighbours.topk(q, x, 10)
    idx, sim = neighbours.topk(q, x, 10, approximate=True)
    found = idx >= 0
    recall = np.mean([len(set(a[f]) & set(b)) / 10 for a, b, f in zip(idx, exact_idx, found)])
    assert 0.85 <= recall < 1.0  # approximate indeed, and close
    assert np.isnan(sim[~found]).all() and (np.diff(np.where(found, sim, -9), axis=1) <= 1e-6).all()
    own, _ = neighbours.topk(x[:300], x, 5, exclude_self=True, approximate=True)
    assert not (own == np.arange(300)[:, None]).any()
    small = x[: n - 1]
    a, sa = neighbours.topk(small[:50], small, 6, approximate=True)
    b, sb = neighbours.topk(small[:50], small, 6)
    assert (a == b).all() and np.allclose(sa, sb)
