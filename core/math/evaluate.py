"""Retrieval metrics for re-ID embeddings: CMC rank-k, mAP, per condition, match rates at a
threshold, and a before/after comparison. Pure functions on arrays (numpy only).

Protocol (as in the re-ID literature, Market-1501 / Zheng et al. 2015):

- Similarity is cosine (embeddings are L2-normalised here whatever they come in as).
- For each query, the gallery is ranked by decreasing similarity. When cameras are given for
  both query and gallery, gallery items of the *same identity seen by the same camera* are
  removed from that query's candidate list ("junk": they would make the task trivial, and they
  include the query image itself when it also sits in the gallery). Items of other identities
  from the same camera stay: they are legitimate distractors. A query is never its own
  candidate: given sample keys (``q_keys`` / ``g_keys``: sample ids or file hashes), a gallery
  item with the query's key is removed with or without cameras; in
  :func:`leave_one_out_metrics` the query's own row is.
- Rank-k (CMC): share of queries whose first correct match is among the top k candidates.
- AP: mean of precision@i over the ranks i of every correct match (all correct matches in the
  candidate list, not only the first R); mAP is its mean over queries.
- Queries with no correct match left in their candidate list are not scored; the count is
  reported as ``n_skipped``.

Ties in similarity are broken by gallery order (stable sort), so results are deterministic.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length. [N, D] -> [N, D] float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, D], [M, D] -> [N, M] cosine similarities."""
    return l2_normalize(a) @ l2_normalize(b).T


def _score(
    sim: np.ndarray, match: np.ndarray, valid: np.ndarray, ks: Sequence[int]
) -> dict[str, Any]:
    """Per-query CMC hits and AP from a similarity matrix.

    sim [Q, G] float, match [Q, G] bool (same identity), valid [Q, G] bool (candidate kept).
    Returns dict with ``rank{k}`` [Q'] bool, ``ap`` [Q'] float, ``scored`` [Q] bool.
    """
    q = sim.shape[0]
    order = np.argsort(-sim, axis=1, kind="stable")
    m = np.take_along_axis(match & valid, order, axis=1)
    v = np.take_along_axis(valid, order, axis=1)
    # position of each candidate among the valid ones (1-based); invalid ones get no rank
    pos = np.cumsum(v, axis=1)
    n_pos = m.sum(axis=1)
    scored = n_pos > 0
    first = np.where(m.any(axis=1), np.argmax(m, axis=1), 0)
    first_rank = pos[np.arange(q), first]  # 1-based rank of the first correct match
    hits_cum = np.cumsum(m, axis=1)
    prec_at_hit = np.where(m, hits_cum / np.maximum(pos, 1), 0.0)
    ap = prec_at_hit.sum(axis=1) / np.maximum(n_pos, 1)
    out: dict[str, Any] = {"scored": scored, "ap": ap[scored]}
    for k in ks:
        out[f"rank{k}"] = first_rank[scored] <= k
    return out


def _summary(s: dict[str, Any], ks: Sequence[int]) -> dict[str, float]:
    n = int(s["scored"].sum())
    res: dict[str, float] = {}
    for k in ks:
        res[f"rank{k}"] = float(s[f"rank{k}"].mean()) if n else float("nan")
    res["mAP"] = float(s["ap"].mean()) if n else float("nan")
    res["n_queries"] = n
    res["n_skipped"] = int((~s["scored"]).sum())
    return res


RERANK_MAX_ITEMS = 6000  # dense [N, N] float32 matrices: at 6000 items about 6 s and 0.6 GB


def k_reciprocal_distances(
    emb: np.ndarray, n_rows: int | None = None, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017, with the paper's k1=20, k2=6, lambda=0.3)
    of the items ``emb`` [N, D] among themselves: distances [n_rows, N] of the first ``n_rows``
    items (the queries; all N when None) to every item.

    Two items are close when they are in each other's nearest neighbours (k-reciprocal) and share
    many of them: the Jaccard distance of their expanded k-reciprocal sets, mixed with the original
    distance by ``lambda_value``. It uses the whole gallery's structure, so a crop from the other
    camera that only resembles the query through the other crops of the same person moves up.
    Pure numpy; quadratic memory: more than :data:`RERANK_MAX_ITEMS` items raise ValueError.
    """
    x = l2_normalize(emb)
    n = len(x)
    n_rows = n if n_rows is None else n_rows
    if n > RERANK_MAX_ITEMS:
        raise ValueError(f"re-ranking {n} items needs too much memory (limit {RERANK_MAX_ITEMS}); "
                         "evaluate without re-ranking")
    if n == 0:
        return np.zeros((n_rows, 0), np.float32)
    dist = np.clip(2.0 - 2.0 * (x @ x.T), 0.0, None)  # squared Euclidean of unit vectors
    dist /= np.maximum(dist.max(axis=1, keepdims=True), 1e-12)  # each row by its farthest item
    width = max(k1, k2) + 1  # only the nearest neighbours' order is used; sorted in row blocks
    rank = np.concatenate([np.argsort(dist[i: i + 512], axis=1, kind="stable")[:, :width]
                           for i in range(0, n, 512)])
    half = int(round(k1 / 2))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        return forward[(rank[forward, : k + 1] == i).any(axis=1)]

    v = np.zeros((n, n), np.float32)
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = [r]
        for c in r:  # add a neighbour's own reciprocal set when it mostly agrees with ours
            rc = reciprocal(c, half)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expanded.append(rc)
        e = np.unique(np.concatenate(expanded))
        w = np.exp(-dist[i, e])
        v[i, e] = w / w.sum()
    if k2 > 1:  # local query expansion over the k2 nearest (in blocks: [block, k2, N] at a time)
        v = np.concatenate([v[rank[i: i + 256, :k2]].mean(axis=1) for i in range(0, n, 256)])
    holders = [np.nonzero(v[:, j])[0] for j in range(n)]  # inverted index
    jaccard = np.empty((n_rows, n), np.float32)
    for i in range(n_rows):
        shared = np.zeros(n, np.float32)
        for j in np.nonzero(v[i])[0]:
            shared[holders[j]] += np.minimum(v[i, j], v[holders[j], j])
        jaccard[i] = 1.0 - shared / (2.0 - shared)
    return jaccard * (1.0 - lambda_value) + dist[:n_rows] * lambda_value


def _similarities(q_emb: np.ndarray, g_emb: np.ndarray, rerank: bool) -> np.ndarray:
    """[Q, G] cosine similarities, or minus the k-reciprocal distances when ``rerank``."""
    if not rerank:
        return cosine_similarity(q_emb, g_emb)
    q = len(q_emb)
    return -k_reciprocal_distances(np.concatenate([q_emb, g_emb]), q)[:, q:]


def _same_item(q_keys: Sequence | None, g_keys: Sequence | None, shape: tuple[int, int]) -> np.ndarray:
    """[Q, G] bool: gallery item j *is* query i (same sample id or file hash on both sides)."""
    if q_keys is None or g_keys is None:
        return np.zeros(shape, bool)
    q, g = np.asarray(q_keys, dtype=object), np.asarray(g_keys, dtype=object)
    if len(q) != shape[0] or len(g) != shape[1]:
        raise ValueError(f"{len(q)} query keys and {len(g)} gallery keys for a {shape} similarity matrix")
    return q[:, None] == g[None, :]


def _valid_mask(
    q_ids: np.ndarray, g_ids: np.ndarray, q_cams: np.ndarray | None, g_cams: np.ndarray | None,
    q_keys: Sequence | None = None, g_keys: Sequence | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    match = q_ids[:, None] == g_ids[None, :]
    valid = ~_same_item(q_keys, g_keys, match.shape)  # a query is never its own candidate
    if q_cams is not None and g_cams is not None:
        same_cam = np.asarray(q_cams)[:, None] == np.asarray(g_cams)[None, :]
        valid &= ~(match & same_cam)
    return match, valid


def retrieval_metrics(
    q_emb: np.ndarray,
    q_ids: Sequence,
    g_emb: np.ndarray,
    g_ids: Sequence,
    q_cams: Sequence | None = None,
    g_cams: Sequence | None = None,
    ks: Sequence[int] = (1, 5),
    query_mask: np.ndarray | None = None,
    rerank: bool = False,
    q_keys: Sequence | None = None,
    g_keys: Sequence | None = None,
) -> dict[str, float]:
    """Rank-k and mAP of queries [Q, D] against a gallery [G, D].

    With both ``q_cams`` and ``g_cams``, same-identity same-camera gallery items are removed
    from each query's candidates (cross-camera protocol, see module doc). ``q_keys`` [Q] /
    ``g_keys`` [G] (sample ids or file hashes): a gallery item with the query's own key is never
    its candidate, whatever the cameras say (a file tagged both query and gallery would otherwise
    find itself at similarity 1). ``query_mask`` [Q] bool scores only the selected queries (the
    gallery stays whole). ``rerank``: rank by :func:`k_reciprocal_distances` over queries and
    gallery instead of cosine similarity.
    Returns ``{"rank1", "rank5", "mAP", "n_queries", "n_skipped"}`` (rates in [0, 1]).
    """
    q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
    if query_mask is not None:
        sel = np.asarray(query_mask, bool)
        q_emb, q_ids = np.asarray(q_emb)[sel], q_ids[sel]
        q_cams = None if q_cams is None else np.asarray(q_cams)[sel]
        q_keys = None if q_keys is None else np.asarray(q_keys, dtype=object)[sel]
    match, valid = _valid_mask(q_ids, g_ids, q_cams, g_cams, q_keys, g_keys)
    s = _score(_similarities(q_emb, g_emb, rerank), match, valid, ks)
    return _summary(s, ks)


def leave_one_out_metrics(
    emb: np.ndarray, ids: Sequence, cams: Sequence | None = None, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Every item [N, D] queries all the others (itself excluded; with ``cams``, also its own
    identity seen by its own camera). Used for validation identities during training."""
    ids = np.asarray(ids)
    match, valid = _valid_mask(ids, ids, cams, cams)
    np.fill_diagonal(valid, False)
    return _summary(_score(cosine_similarity(emb, emb), match, valid, ks), ks)


def metrics_by_condition(
    q_emb: np.ndarray,
    q_ids: Sequence,
    g_emb: np.ndarray,
    g_ids: Sequence,
    conditions: Mapping[str, np.ndarray],
    q_cams: Sequence | None = None,
    g_cams: Sequence | None = None,
    ks: Sequence[int] = (1, 5),
    q_keys: Sequence | None = None,
    g_keys: Sequence | None = None,
) -> dict[str, dict[str, float]]:
    """``{"all": metrics, name: metrics of the queries where conditions[name] [Q] is True}``,
    e.g. conditions = {"day": ~low_light, "night": low_light, "shadow": flagged_shadow}.
    The gallery is the same for every condition."""
    kw = {"q_keys": q_keys, "g_keys": g_keys}
    out = {"all": retrieval_metrics(q_emb, q_ids, g_emb, g_ids, q_cams, g_cams, ks, **kw)}
    for name, mask in conditions.items():
        out[name] = retrieval_metrics(q_emb, q_ids, g_emb, g_ids, q_cams, g_cams, ks, query_mask=mask, **kw)
    return out


def _pair_sims(
    emb_a: np.ndarray, ids_a: Sequence, emb_b: np.ndarray | None, ids_b: Sequence | None,
    keys_a: Sequence | None = None, keys_b: Sequence | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [P], same-identity [P] bool) of all pairs a x b (pairs of an item with
    itself, by ``keys_a`` / ``keys_b``, left out), or of the unordered pairs i < j within a
    when b is None."""
    ids_a = np.asarray(ids_a)
    if emb_b is None:
        sim = cosine_similarity(emb_a, emb_a)
        same = ids_a[:, None] == ids_a[None, :]
        iu = np.triu_indices(len(ids_a), k=1)
        return sim[iu], same[iu]
    sim = cosine_similarity(emb_a, emb_b)
    same = ids_a[:, None] == np.asarray(ids_b)[None, :]
    keep = ~_same_item(keys_a, keys_b, sim.shape)
    return sim[keep], same[keep]


def match_rates(
    emb_a: np.ndarray,
    ids_a: Sequence,
    threshold: float,
    emb_b: np.ndarray | None = None,
    ids_b: Sequence | None = None,
    keys_a: Sequence | None = None,
    keys_b: Sequence | None = None,
) -> dict[str, float]:
    """At cosine-similarity ``threshold``: false match rate (share of different-identity pairs
    with similarity >= threshold) and true match rate (share of same-identity pairs >= it).
    Pairs are a x b (without an item paired with itself, by key), or all unordered pairs within
    a when b is None."""
    sim, same = _pair_sims(emb_a, ids_a, emb_b, ids_b, keys_a, keys_b)
    above = sim >= threshold
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    return {
        "threshold": float(threshold),
        "fmr": float(above[~same].mean()) if n_neg else float("nan"),
        "tmr": float(above[same].mean()) if n_pos else float("nan"),
        "n_pos_pairs": n_pos,
        "n_neg_pairs": n_neg,
    }


def threshold_at_fmr(
    emb_a: np.ndarray,
    ids_a: Sequence,
    target_fmr: float = 0.01,
    emb_b: np.ndarray | None = None,
    ids_b: Sequence | None = None,
    keys_a: Sequence | None = None,
    keys_b: Sequence | None = None,
) -> float:
    """The smallest cosine threshold whose false match rate is <= ``target_fmr`` (an operating
    point chosen on labelled data)."""
    sim, same = _pair_sims(emb_a, ids_a, emb_b, ids_b, keys_a, keys_b)
    neg = np.sort(sim[~same])[::-1]
    if len(neg) == 0:
        return -1.0
    k = int(np.floor(target_fmr * len(neg)))  # at most k negatives may sit at or above it
    if k >= len(neg):
        return float(neg[-1])
    return float(np.nextafter(neg[k], np.float32(np.inf)))


def evaluate(
    q_emb: np.ndarray,
    q_ids: Sequence,
    g_emb: np.ndarray,
    g_ids: Sequence,
    q_cams: Sequence | None = None,
    g_cams: Sequence | None = None,
    conditions: Mapping[str, np.ndarray] | None = None,
    threshold: float | None = None,
    target_fmr: float = 0.01,
    ks: Sequence[int] = (1, 5),
    q_keys: Sequence | None = None,
    g_keys: Sequence | None = None,
) -> dict[str, Any]:
    """Everything for one model version: overall and per-condition retrieval metrics, per query
    camera when cameras are known, and match rates at the operating ``threshold`` (query x
    gallery pairs; when None, the threshold giving ``target_fmr`` on these pairs is used).

    ``"reranked"`` repeats ``"all"`` ranked by :func:`k_reciprocal_distances` (empty when query
    and gallery together exceed :data:`RERANK_MAX_ITEMS`). ``q_keys`` / ``g_keys``: see
    :func:`retrieval_metrics` (a query never matches itself, in any block).

    Returns ``{"all": {...}, "by_condition": {name: {...}}, "by_camera": {cam: {...}},
    "at_threshold": {"threshold", "fmr", "tmr", ...}, "reranked": {...}}``.
    """
    conds = dict(conditions or {})
    keys = {"q_keys": q_keys, "g_keys": g_keys}
    by_cond = metrics_by_condition(q_emb, q_ids, g_emb, g_ids, conds, q_cams, g_cams, ks, **keys)
    res: dict[str, Any] = {"all": by_cond.pop("all"), "by_condition": by_cond, "by_camera": {}}
    if q_cams is not None and g_cams is not None:
        qc = np.asarray(q_cams)
        for cam in sorted(set(qc.tolist()), key=str):
            res["by_camera"][str(cam)] = retrieval_metrics(
                q_emb, q_ids, g_emb, g_ids, q_cams, g_cams, ks, query_mask=qc == cam, **keys
            )
    if threshold is None:
        threshold = threshold_at_fmr(q_emb, q_ids, target_fmr, g_emb, g_ids, q_keys, g_keys)
    res["at_threshold"] = match_rates(q_emb, q_ids, threshold, g_emb, g_ids, q_keys, g_keys)
    res["reranked"] = {}
    if len(q_emb) + len(g_emb) <= RERANK_MAX_ITEMS:
        res["reranked"] = retrieval_metrics(q_emb, q_ids, g_emb, g_ids, q_cams, g_cams, ks, rerank=True,
                                            **keys)
    return res


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> ``{"by_condition.night.mAP": 0.8, ...}`` (numbers only)."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, key + "."))
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            flat[key] = float(v)
    return flat


def compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Side-by-side rows for two versions' (possibly nested) metric dicts:
    ``[{"metric", "before", "after", "delta"}]`` in ``before``'s order, then keys only in
    ``after``. A side that lacks a metric has None (and delta None)."""
    fb, fa = flatten(before), flatten(after)
    keys = list(fb) + [k for k in fa if k not in fb]
    rows = []
    for k in keys:
        b, a = fb.get(k), fa.get(k)
        delta = a - b if a is not None and b is not None else None
        rows.append({"metric": k, "before": b, "after": a, "delta": delta})
    return rows
