"""Nearest neighbours for dense batch math: one routine, faiss's flat indexes (exact), or an
inverted file where a caller accepts approximate neighbours at scale (``approximate``).

The query strategies' neighbour votes and distances to the labelled set, the identity
suggestions and the map layout (landmark kNN, placement, kNN preservation) go through
:func:`topk`. Lookups against a whole dataset ("more like this") use the persisted similarity
index instead (:mod:`core.data.similarity`), which answers the same neighbours.

faiss (``IndexFlatIP`` / ``IndexFlatL2``) is exact brute force with a BLAS product and a
compiled top-k heap: no approximation, no full [Q, R] matrix, results sorted best first.
Inputs are float32 [N, D]; ``metric="cosine"`` expects unit rows (see
:func:`core.math.strategies.normalise`) and scores are similarities, ``"l2"`` gives Euclidean
distances. Ties keep faiss's order (deterministic for the same input).
"""
from __future__ import annotations

import numpy as np

METRICS = ("cosine", "l2")


# approximate=True, from this many reference rows on: an inverted file (faiss IndexIVFFlat) with
# N / 40 lists up to 1,024 (k-means wants about 40 rows a list), 16 of them searched. Every row's 25 nearest among 100k distinct crop vectors
# (benchmarks/map_scale.py's cache), 2 cores: recall 0.972 in 2.1 s to build + 6.6 s to search,
# against 40 s exact (1,024 lists: 8 searched 0.934 in 4.1 s, 32 searched 0.991 in 12.1 s).
APPROX_MIN_ROWS = 20_000
APPROX_PROBES = 16


def _index(r: np.ndarray, metric: str, approximate: bool):
    import faiss

    d = r.shape[1]
    index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if approximate and len(r) >= APPROX_MIN_ROWS:  # the flat index becomes the lists' quantizer
        nlist = min(1024, len(r) // 40)
        mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.IndexIVFFlat(index, d, nlist, mt)
        sample = np.random.default_rng(0).choice(len(r), min(len(r), 40 * nlist), replace=False)
        index.train(r[np.sort(sample)])  # k-means on a seeded sample (faiss seeds its own, too)
        index.nprobe = APPROX_PROBES
    index.add(r)
    return index


def topk(query: np.ndarray, ref: np.ndarray, k: int, metric: str = "cosine",
         exclude_self: bool = False, approximate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest ``ref`` rows of each ``query`` row: (indices int64 [Q, k], scores
    float32 [Q, k]), best first; scores are cosine similarities (``"cosine"``, unit rows) or
    Euclidean distances (``"l2"``). ``k`` is capped at what ``ref`` holds. With ``exclude_self``
    ``query`` is ``ref`` and a row never finds itself. ``approximate``: an inverted file where
    ``ref`` has :data:`APPROX_MIN_ROWS` rows or more (about 97 % of the true neighbours, 5x
    faster at 100k; for suggestions such as pair candidates, never for figures); exact below.
    An approximate search may find fewer than ``k``: those places hold index -1 and score NaN."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    q = np.ascontiguousarray(query, dtype=np.float32)
    r = np.ascontiguousarray(ref, dtype=np.float32)
    k = int(min(k, len(r) - (1 if exclude_self else 0)))
    if k <= 0 or len(q) == 0:
        return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
    index = _index(r, metric, approximate)
    score, idx = index.search(q, k + (1 if exclude_self else 0))
    if exclude_self:  # drop each row's own hit (or, where ties hid it, the last one)
        own = idx == np.arange(len(q))[:, None]
        own[~own.any(axis=1), -1] = True
        keep = ~own
        idx = idx[keep].reshape(len(q), k)
        score = score[keep].reshape(len(q), k)
    score[idx < 0] = np.nan  # an approximate search that found fewer than asked
    if metric == "l2":
        score = np.sqrt(np.maximum(score, 0.0))  # faiss gives squared distances
    return idx.astype(np.int64), score.astype(np.float32)


def nearest_distance(query: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine distance (float32 [Q]) of each unit ``query`` row to its nearest unit ``ref`` row;
    inf for every row when ``ref`` is empty."""
    if len(ref) == 0:
        return np.full(len(query), np.inf, np.float32)
    _idx, sim = topk(query, ref, 1)
    return np.maximum(1.0 - sim[:, 0], 0.0).astype(np.float32)
