"""Per-sample scores from the active embeddings, written back to FiftyOne: misclustered
candidates (kNN disagreement, condition clusters, operator flags) and model uncertainty.

They colour the map, order the candidate list, feed the labelling queue's condition boost and
weight the training sampler. Reads and writes go through :mod:`core.data.store`; the math is
:mod:`core.math.misclustered` and :mod:`core.math.strategies`. The candidate list is short by design: at
most ``misclustered.candidate_limit(N)`` samples (5 % of them, at least 10, at most 200) plus the
operator-flagged ones carry a positive ``mis_score`` and reasons; every other sample scores 0.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from core.math import misclustered, strategies
from core.data import store

log = logging.getLogger(__name__)

SCORE_FIELD, REASONS_FIELD, UNCERTAINTY_FIELD = "mis_score", "mis_reasons", "uncertainty"
CLUSTERS_INFO_KEY = "condition_clusters"


def load_matrix(name: str, version: str | None = None, fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """ids, vectors float32 [N, D] of ``version`` (default: active) and the requested fields,
    for the samples that have a vector."""
    version = version or store.active_model(name)
    if not version:
        raise store.StoreError(f"{name} has no active model: embed the dataset first")
    out = store.embedded_columns(name, version, list(fields))
    if out is None:
        raise store.StoreError(f"no embeddings of model {version!r} in {name!r}: embed the dataset first")
    out["version"] = version
    return out


def condition_masks(data: dict[str, Any]) -> dict[str, np.ndarray]:
    """bool [N] per condition: low light (measured or tagged night) and operator tags."""
    tags = [set(t or ()) for t in data["tags"]]
    low = np.array([bool(v) for v in data["low_light"]]) | np.array(["night" in t for t in tags])
    masks = {"low light": low}
    for tag in ("shadow", "occluded"):
        m = np.array([tag in t for t in tags])
        if m.any():
            masks[tag] = m
    return masks


def compute_scores(name: str, version: str | None = None, n_neighbors: int = 10) -> dict[str, Any]:
    """Score every embedded sample and store ``mis_score``, ``mis_reasons`` and ``uncertainty``;
    the condition clusters found go to the dataset's state. Returns a summary."""
    data = load_matrix(name, version, ("identity", "low_light", "tags", "flagged"))  # absent fields left out
    ids, X = data["id"], data["X"]
    if len(ids) < 3:
        return {"scored": 0}
    labels = np.array(data["identity"], dtype=object)
    labelled = np.array([v is not None for v in labels])
    flags = np.array([bool(v) for v in data.get("flagged", [False] * len(ids))])
    k = min(n_neighbors, len(ids) - 1)
    cand = misclustered.misclustered_candidates(X, labelled, labels, condition_masks(data), flags, n_neighbors=k)
    unc = np.nan_to_num(cand.parts["disagreement"], nan=0.0)
    if (~labelled).any() and len({str(v) for v in labels[labelled]}) >= 2:
        probs, _classes = strategies.class_probabilities(X, labelled, labels, n_neighbors=k)
        p = -np.sort(-probs, axis=1)
        unc = np.where(labelled, unc, 1.0 - (p[:, 0] - p[:, 1]))
    store.set_columns(name, {SCORE_FIELD: dict(zip(ids, map(float, cand.scores))),
                             REASONS_FIELD: dict(zip(ids, cand.reasons)),
                             UNCERTAINTY_FIELD: dict(zip(ids, map(float, unc)))})
    clusters = [{k2: (v if k2 != "members" else [ids[i] for i in v[:500]]) for k2, v in c.items()}
                for c in cand.clusters]
    store.set_state(name, CLUSTERS_INFO_KEY, {"version": data["version"], "clusters": clusters})
    log.info("%s: %d candidates (limit %d, %d more cut), %d condition clusters", name, len(cand.order),
             cand.limit, cand.dropped, len(clusters))
    return {"scored": len(ids), "candidates": int(len(cand.order)), "candidate_limit": cand.limit,
            "condition_clusters": len(clusters)}


def condition_clusters(name: str) -> list[dict[str, Any]]:
    return (store.state(name).get(CLUSTERS_INFO_KEY) or {}).get("clusters", [])


def candidates(name: str, limit: int = 200) -> list[dict[str, Any]]:
    """Samples with a misclustering score, highest first, with their reasons (at most ``limit``;
    :func:`compute_scores` keeps the list short, see the module doc)."""
    return store.top_rows(name, SCORE_FIELD, [REASONS_FIELD, "identity", "camera", "low_light"], limit=limit)


def refresh_map(dataset: str, version: str, reporter, lo: float = 0.0, hi: float = 1.0) -> dict[str, Any]:
    """Lay out the map of ``version`` (aligned to the previous one) and rescore the samples, as
    jobs do after embedding: ``reporter`` (a :class:`core.data.jobs.Reporter`) gets progress from
    ``lo`` to ``hi`` and may stop it."""
    from core.services import projection

    cb = reporter.span(lo, lo + 0.9 * (hi - lo), "map layout:", counts=False)
    m = projection.compute_layout(dataset, version, progress=lambda stage, fraction: cb(fraction, 1.0, stage))
    reporter.progress(lo + 0.9 * (hi - lo), "scoring misclustered samples")
    scores = compute_scores(dataset, version)
    return {"map_points": len(m.ids), "map_recomputed": m.computed, **scores}
