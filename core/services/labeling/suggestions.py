"""Predictions from previously labelled samples: the model's kNN guess (for agreement),
identities to offer first, and "more like this" crops."""
from __future__ import annotations

from collections import Counter
from typing import Any

from core.data import store
from core.math import neighbours, strategies
from core.services.labeling.schema import label_schema
from core.services.labeling.vectors import _labelled_vectors, _vector


def neighbours_by_value(name: str, sample_id: str, target: str = "identity", mode: str | None = None,
                        k: int = 5, n_neighbors: int = 15) -> list[dict[str, Any]]:
    """Distinct values of ``target`` among the ``n_neighbors`` nearest labelled samples (cosine,
    the sample itself excluded), closest first: [{value, distance, votes}] (at most ``k``)."""
    mode = mode or label_schema(name).mode
    x = _vector(name, sample_id)
    if x is None:
        return []
    ids, X, vals = _labelled_vectors(name, target, mode)
    keep = [i for i, s in enumerate(ids) if s != sample_id]
    if not keep:
        return []
    order, sims = neighbours.topk(strategies.normalise(x[None]), strategies.normalise(X[keep]), n_neighbors)
    best: dict[Any, dict[str, Any]] = {}
    for j, sim in zip(order[0], sims[0]):
        v = vals[keep[j]]
        d = float(1.0 - sim)
        e = best.setdefault(v, {"value": v, "distance": d, "votes": 0})
        e["votes"] += 1
    return sorted(best.values(), key=lambda e: e["distance"])[:k]


def suggest_identities(name: str, sample_id: str, k: int = 5, n_neighbors: int = 15) -> list[dict[str, Any]]:
    """Identities to offer first: the nearest labelled identities ([{identity, distance, votes,
    verified}], closest first). In "verify" mode, when fewer than ``k`` verified identities are
    near, ingested (unverified) ones fill the list."""
    mode = label_schema(name).mode
    out = [{"identity": e["value"], "distance": e["distance"], "votes": e["votes"], "verified": True}
           for e in neighbours_by_value(name, sample_id, "identity", mode, k, n_neighbors)]
    if mode == "verify" and len(out) < k:
        have = {e["identity"] for e in out}
        for e in neighbours_by_value(name, sample_id, "identity", "trust", k * 2, n_neighbors):
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
    ids, X, vals = _labelled_vectors(name, target, mode)
    keep = [i for i, s in enumerate(ids) if s != sample_id]
    if not keep:
        return None
    order, sims = neighbours.topk(strategies.normalise(x[None]), strategies.normalise(X[keep]), n_neighbors)
    votes: Counter = Counter()
    for j, sim in zip(order[0], sims[0]):
        votes[vals[keep[j]]] += float(max(sim, 0.0) + 1e-6)
    return votes.most_common(1)[0][0]
