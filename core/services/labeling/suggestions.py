"""Predictions from previously labelled samples: the model's kNN guess (for agreement),
identities to offer first, and "more like this" crops."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from core.data import similarity, store
from core.math import neighbours, strategies
from core.services.labeling.schema import label_schema
from core.services.labeling.vectors import _labelled_vectors, _vector


INDEX_CANDIDATES = 200  # the nearest samples read from the similarity index to find labelled ones among


def index_candidates(name: str, x: np.ndarray) -> tuple[list[str], np.ndarray] | None:
    """(ids, cosine distances) of the :data:`INDEX_CANDIDATES` + 1 samples nearest to ``x`` in
    the active version's similarity index; None without an index (yet). One index query (0.2 s
    at 100k crops): callers asking for several targets or modes share it."""
    version = store.active_model(name)
    try:
        if version:
            ids, dist, _X = similarity.nearest(name, version, x, INDEX_CANDIDATES + 1, build=False)
            return ids, dist
    except store.StoreError:  # no index yet, or being built elsewhere
        pass
    return None


def nearest_labelled(name: str, sample_id: str, x: np.ndarray, target: str, mode: str,
                     n: int, candidates: tuple[list[str], np.ndarray] | None = None) -> list[tuple[Any, float]]:
    """(value of ``target``, cosine distance) of the ``n`` labelled samples nearest to the
    vector ``x`` of ``sample_id`` (itself excluded), nearest first. Labelled: ``target`` set
    and, in "verify" mode, set by an operator (``labelled_by``).

    Where the active version's similarity index exists (:mod:`core.data.similarity`), its
    :data:`INDEX_CANDIDATES` nearest samples are read first: when ``n`` of them are labelled
    they are exactly the ``n`` nearest labelled ones (any other is farther than all of them).
    Otherwise (few labels among many samples, or no index yet) every labelled vector is read
    and searched (:func:`core.math.neighbours.topk`). ``candidates``: the result of
    :func:`index_candidates` for ``x`` when the caller has it (None: queried here)."""
    candidates = candidates or index_candidates(name, x)
    if candidates:
        ids, dist = candidates
        cols = store.view_columns(name, [target, "labelled_by"], ids)
        ok = {i: v for i, v, by in zip(cols["id"], cols[target], cols["labelled_by"])
              if v is not None and (mode != "verify" or by)}
        hits = [(ok[i], float(d)) for i, d in zip(ids, dist) if i in ok and i != sample_id]
        if len(hits) >= n or len(ids) <= INDEX_CANDIDATES:  # enough, or every sample was read
            return hits[:n]
    ids, X, vals = _labelled_vectors(name, target, mode)
    keep = [i for i, s in enumerate(ids) if s != sample_id]
    if not keep:
        return []
    order, sims = neighbours.topk(strategies.normalise(x[None]), strategies.normalise(X[keep]), n)
    return [(vals[keep[j]], float(1.0 - sim)) for j, sim in zip(order[0], sims[0])]


def neighbours_by_value(name: str, sample_id: str, target: str = "identity", mode: str | None = None,
                        k: int = 5, n_neighbors: int = 15, near: tuple | None = None) -> list[dict[str, Any]]:
    """Distinct values of ``target`` among the ``n_neighbors`` nearest labelled samples (cosine,
    the sample itself excluded; :func:`nearest_labelled`), closest first: [{value, distance,
    votes}] (at most ``k``). ``near``: (vector, index candidates) the caller already read."""
    mode = mode or label_schema(name).mode
    x, candidates = near if near is not None else (_vector(name, sample_id), None)
    if x is None:
        return []
    best: dict[Any, dict[str, Any]] = {}
    for v, d in nearest_labelled(name, sample_id, x, target, mode, n_neighbors, candidates):
        e = best.setdefault(v, {"value": v, "distance": d, "votes": 0})
        e["votes"] += 1
    return sorted(best.values(), key=lambda e: e["distance"])[:k]


def suggest_identities(name: str, sample_id: str, k: int = 5, n_neighbors: int = 15) -> list[dict[str, Any]]:
    """Identities to offer first: the nearest labelled identities ([{identity, distance, votes,
    verified}], closest first). In "verify" mode, when fewer than ``k`` verified identities are
    near, ingested (unverified) ones fill the list."""
    mode = label_schema(name).mode
    x = _vector(name, sample_id)
    if x is None:
        return []
    near = (x, index_candidates(name, x))  # one index query for both modes
    out = [{"identity": e["value"], "distance": e["distance"], "votes": e["votes"], "verified": True}
           for e in neighbours_by_value(name, sample_id, "identity", mode, k, n_neighbors, near)]
    if mode == "verify" and len(out) < k:
        have = {e["identity"] for e in out}
        for e in neighbours_by_value(name, sample_id, "identity", "trust", k * 2, n_neighbors, near):
            if e["value"] not in have and len(out) < k:
                out.append({"identity": e["value"], "distance": e["distance"], "votes": e["votes"], "verified": False})
    return out


def similar_crops(name: str, sample_id: str, k: int = 8) -> list[dict[str, Any]]:
    """"More like this" on the Annotate page: the ``k`` crops most like ``sample_id`` under the
    active model, re-ranked by shared neighbours (core.services.embedding.similar with ``rerank``), closest
    first: [{id, filepath, identity, camera, distance}]. Empty when the sample has no embedding."""
    from core.model import embed
    from core.services import embedding

    try:
        hits = embedding.similar(name, sample_id, k=k, rerank=True)
    except embed.EmbedError:
        return []
    cols = store.view_columns(name, ["filepath", "identity", "camera"], [h[0] for h in hits])
    return [{"id": s, "filepath": f, "identity": i, "camera": c, "distance": d}
            for (s, d), f, i, c in zip(hits, cols["filepath"], cols["identity"], cols["camera"])]


def predict(name: str, sample_id: str, target: str = "identity", mode: str | None = None,
            n_neighbors: int = 5) -> Any:
    """The kNN prediction of ``target`` from previously labelled samples (similarity-weighted
    vote of the ``n_neighbors`` nearest); None without embeddings or labels."""
    mode = mode or label_schema(name).mode
    x = _vector(name, sample_id)
    if x is None:
        return None
    votes: Counter = Counter()
    for v, d in nearest_labelled(name, sample_id, x, target, mode, n_neighbors):
        votes[v] += float(max(1.0 - d, 0.0) + 1e-6)
    return votes.most_common(1)[0][0] if votes else None
