"""Misclustered candidates: the short, ranked list of samples an operator should look at on the
map, each with the concrete evidence that put it there. Pure functions on arrays (numpy, scipy);
the store side is :mod:`core.services.analysis`.

Three kinds of evidence, merged by :func:`misclustered_candidates`:

- :func:`label_evidence`: a labelled crop whose own identity is no nearer to it than a random
  label's crops would be, while another identity crowds its neighbourhood (a wrong identity, or
  a crop the model cannot place);
- :func:`condition_cluster_scores` / :func:`condition_clusters` (in :mod:`core.math.strategies`,
  re-exported here): neighbourhoods that share a lighting condition much more than an identity
  (the model groups by darkness);
- operator flags.

Why not the plain kNN disagreement (the share of a crop's k nearest neighbours with another
label): with few crops per identity at most n - 1 of its k neighbours can agree, and a model that
does not yet match people across cameras puts mostly other people next to every crop. On the
two-camera campus62 set (1183 distinct crops, 16 per identity, 8 per camera) with the packaged
ImageNet model, 1162 crops had at least half their 10 neighbours from other identities (98 % of
the neighbours come from the crop's own camera), so nearly everything was a "candidate". The evidence
therefore discounts what is expected, in this data set and for this identity's size, and the
list is capped (:data:`MAX_CANDIDATES`, :data:`MAX_CANDIDATE_SHARE`).

No streamlit, no fiftyone.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from core.math.neighbours import topk
from core.math.strategies import (  # noqa: F401  (condition clusters are re-exported: one import for callers)
    ConditionScores,
    _as_inputs,
    condition_cluster_scores,
    condition_clusters,
    normalise,
)

_RANK_CHUNK = 1024  # rows per block of the rank-of-own-identity pass (the [block, L] matrix stays in cache)

log = logging.getLogger(__name__)

MAX_CANDIDATES = 200  # at most this many candidates in one list ...
MAX_CANDIDATE_SHARE = 0.05  # ... and at most this share of the samples (but at least MIN_CANDIDATE_LIMIT)
MIN_CANDIDATE_LIMIT = 10
TYPICAL_QUANTILE = 0.9  # "typical" own-identity rank: 9 in 10 labelled crops find their identity by it


def candidate_limit(n: int, max_share: float = MAX_CANDIDATE_SHARE, max_candidates: int = MAX_CANDIDATES) -> int:
    """How many candidates a list over ``n`` samples may hold (operator flags come on top):
    ``min(max_candidates, max(MIN_CANDIDATE_LIMIT, ceil(max_share * n)))``."""
    return int(min(max_candidates, max(MIN_CANDIDATE_LIMIT, math.ceil(max_share * n))))


def _ordinal(i: int) -> str:
    suffix = "th" if 10 <= i % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
    return f"{i}{suffix}"


# --------------------------------------------------------------------------------------------
# Label evidence (kNN, discounted by what is expected)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelEvidence:
    """Per-sample kNN evidence that a labelled sample's identity is wrong (see :func:`label_evidence`).

    Arrays are [N]; "scored" samples are labelled ones whose identity has another labelled crop.
    score:        float in [0, 1], NaN where not scored.
    own_rank:     int, 1 + how many other-identity labelled crops lie nearer than its nearest crop
                  of its own identity (1 = its nearest neighbour is its own); 0 where not scored.
    own_votes:    int, crops of its own identity among its ``n_neighbors`` nearest labelled crops.
    own_size:     int, labelled crops of its identity, itself included (0 where unlabelled).
    rival:        object, the most common other identity among those neighbours (None: none).
    rival_votes:  int, its crops among the neighbours; rival_size: int, its labelled crops.
    chance_rank:  float, the own_rank a random label with as many crops would reach on average:
                  n_labelled / own_size (NaN where not scored).
    typical_rank: float, the ``typical`` quantile of own_rank over the scored samples.
    n_neighbors:  the k used; n_labelled: labelled samples.
    """

    score: np.ndarray
    own_rank: np.ndarray
    own_votes: np.ndarray
    own_size: np.ndarray
    rival: np.ndarray
    rival_votes: np.ndarray
    rival_size: np.ndarray
    chance_rank: np.ndarray
    typical_rank: float
    n_neighbors: int
    n_labelled: int
    typical: float = TYPICAL_QUANTILE

    def reason(self, i: int, label) -> str:
        """The evidence for sample i in words (i must be scored)."""
        k, rv, ov = self.n_neighbors, int(self.rival_votes[i]), int(self.own_votes[i])
        own = "none its own" if ov == 0 else f"{ov} its own"
        if rv:
            whole = " (all it has)" if rv == self.rival_size[i] else ""
            first = f"{rv} of its {k} nearest labelled crops are identity {self.rival[i]}{whole}, {own} ({label})"
        else:
            first = f"its {k} nearest labelled crops are all its own ({label})"
        return (f"{first}; its nearest {label} crop ranks {_ordinal(int(self.own_rank[i]))} of the "
                f"{self.n_labelled - 1} others ({self.typical:.0%} of crops here meet their own identity by rank "
                f"{self.typical_rank:.0f}; a random label with as many crops would at about rank "
                f"{self.chance_rank[i]:.0f})")


def label_evidence(embeddings: np.ndarray, labelled: np.ndarray, labels, n_neighbors: int = 10,
                   typical: float = TYPICAL_QUANTILE) -> LabelEvidence:
    """How strongly the embedding contradicts each labelled sample's identity (cosine, among the
    labelled samples, itself excluded).

    Two facts per sample i with identity A (n_A labelled crops) over L labelled samples:
    ``own_rank`` r (where A's nearest other crop ranks among all of them) and the ``rival``
    B, the identity most common among its k nearest, with v_B of at most min(k, n_B) crops.
    What is expected is discounted twice: r is compared with the typical rank r0 in this data set
    and model (the ``typical`` quantile, 0.9: robust while fewer than 1 in 10 labels are wrong)
    and with the chance rank c = L / n_A that a random label of A's size would reach on average
    (large for small identities: with 2 crops, half the set), so ::

        score = clip(log(r / r0) / log(R / r0), 0, 1) * (0.5 + 0.5 * v_B / min(k, n_B)),
        R = max(c, 4 r0)

    0 while its own identity is as near as usual, 1 when it is as far as chance (and 4 times the
    typical rank) and another identity fills all the neighbour places it could. Where c < 2 x the
    median rank, the model does not tell this identity from a random set: score 0. Samples
    without a label, or the only labelled crop of their identity, have no such evidence (NaN).
    O(L^2 D) time, in row blocks.
    """
    x, m, y = _as_inputs(embeddings, labelled, labels)
    n = len(x)
    li = np.flatnonzero(m)
    L = len(li)
    score, chance = np.full(n, np.nan), np.full(n, np.nan)
    own_rank, own_votes, own_size = (np.zeros(n, np.int64) for _ in range(3))
    rival, rival_votes, rival_size = np.full(n, None, object), np.zeros(n, np.int64), np.zeros(n, np.int64)
    k = int(min(n_neighbors, L - 1))
    if k < 1:
        return LabelEvidence(score, own_rank, own_votes, own_size, rival, rival_votes, rival_size, chance,
                             float("nan"), max(k, 0), L, typical)
    names, codes = np.unique(np.asarray([str(v) for v in y[li]], dtype=object), return_inverse=True)
    sizes = np.bincount(codes)
    xl = normalise(x[li])
    nb, _ = topk(xl, xl, k, exclude_self=True)  # [L, k] the k nearest labelled crops, nearest first
    rank = np.empty(L, np.int64)  # a count over every row, not a kNN: one blocked pass of its own
    step = max(1, min(_RANK_CHUNK, 2 ** 24 // L))
    for s in range(0, L, step):
        block = xl[s:s + step] @ xl.T
        rows = np.arange(len(block))
        block[rows, rows + s] = -np.inf
        same = codes[s:s + step, None] == codes[None, :]
        same[rows, rows + s] = False
        best_own = np.where(same, block, -np.inf).max(axis=1)
        rank[s:s + step] = 1 + ((block > best_own[:, None]) & ~same).sum(axis=1)
    cn = codes[nb]  # [L, k] identity codes of the neighbours, nearest first
    own = cn == codes[:, None]
    cnt = (cn[:, :, None] == cn[:, None, :]).sum(axis=2)
    cnt[own] = 0
    pos = np.argmax(cnt * (k + 1) - np.arange(k), axis=1)  # most votes, then the nearest
    rows = np.arange(L)
    rv, rc = cnt[rows, pos], cn[rows, pos]
    n_own = sizes[codes]
    scored = n_own >= 2
    c = L / n_own
    r0 = max(1.0, float(np.quantile(rank[scored], typical))) if scored.any() else float("nan")
    r_med = float(np.median(rank[scored])) if scored.any() else float("nan")
    informative = scored & (c >= 2 * r_med)
    far = np.maximum(c, 4 * r0)
    rank_part = np.where(informative, np.clip(np.log(rank / r0) / np.log(far / r0), 0.0, 1.0), 0.0)
    rival_part = np.where(rv > 0, rv / np.minimum(k, sizes[rc]), 0.0)
    score[li] = np.where(scored, rank_part * (0.5 + 0.5 * rival_part), np.nan)
    chance[li] = np.where(scored, c, np.nan)
    own_rank[li] = np.where(scored, rank, 0)
    own_votes[li], own_size[li] = own.sum(axis=1), n_own
    rival[li] = np.where(rv > 0, names[rc], None)
    rival_votes[li], rival_size[li] = rv, np.where(rv > 0, sizes[rc], 0)
    return LabelEvidence(score, own_rank, own_votes, own_size, rival, rival_votes, rival_size, chance,
                         r0, k, L, typical)


# --------------------------------------------------------------------------------------------
# One ranked, capped list
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """Misclustered candidates.

    order:    int [M] sample indices with a positive score, highest first; M <= ``limit`` plus
              the operator-flagged samples.
    scores:   float [N] combined score (0 = not a candidate, also for those cut by the limit).
    reasons:  list (length N) of lists of strings: why each candidate is one (empty otherwise).
    parts:    name -> float [N] the component scores (disagreement = :attr:`LabelEvidence.score`,
              condition, flag), before thresholds and the limit.
    clusters: the condition clusters found (see :func:`condition_clusters`).
    evidence: the kNN label evidence behind "disagreement".
    limit:    the most candidates the list could hold (see :func:`candidate_limit`).
    dropped:  samples that passed a threshold but fell below the limit.
    """

    order: np.ndarray
    scores: np.ndarray
    reasons: list[list[str]]
    parts: dict[str, np.ndarray]
    clusters: list[dict]
    evidence: LabelEvidence | None = None
    limit: int = 0
    dropped: int = 0


def misclustered_candidates(
    embeddings: np.ndarray,
    labelled: np.ndarray,
    labels,
    conditions: Mapping[str, np.ndarray] | None = None,
    flags: np.ndarray | None = None,
    n_neighbors: int = 10,
    weights: Mapping[str, float] | None = None,
    min_disagreement: float = 0.5,
    min_condition: float = 0.5,
    max_share: float = MAX_CANDIDATE_SHARE,
    max_candidates: int = MAX_CANDIDATES,
) -> Candidates:
    """One short ranked list of samples the operator should look at, each with its reasons.

    combined [N] = w_disagreement * label evidence (:func:`label_evidence`, labelled samples) +
    w_condition * condition-cluster score + w_flag * operator flag, weights 1, 1, 1 by default. A
    component adds a reason when it passes its threshold (evidence >= ``min_disagreement``,
    condition score >= ``min_condition``, flag set); samples without a reason score 0. Of those
    with a reason, the ``candidate_limit(N, max_share, max_candidates)`` highest are kept (5 % of
    the samples, at least 10, at most 200 by default) and every operator-flagged sample; the rest
    score 0 and lose their reasons (counted in ``dropped``).
    """
    x, m, y = _as_inputs(embeddings, labelled, labels)
    n = len(x)
    w = {"disagreement": 1.0, "condition": 1.0, "flag": 1.0, **(weights or {})}
    ev = label_evidence(x, m, y, n_neighbors)
    ylab = np.where(m, y, None)
    cs = condition_cluster_scores(x, ylab, conditions or {}, n_neighbors) if conditions else None
    cond = cs.score if cs is not None else np.zeros(n)
    clusters = condition_clusters(x, ylab, conditions, n_neighbors, min_score=min_condition, scores=cs) if cs else []
    flg = np.zeros(n) if flags is None else np.asarray(flags, dtype=bool).astype(float)
    reasons: list[list[str]] = [[] for _ in range(n)]
    d0 = np.nan_to_num(ev.score, nan=0.0)
    for i in np.flatnonzero(d0 >= min_disagreement):
        reasons[i].append(ev.reason(i, y[i]))
    if cs is not None:
        for i in np.flatnonzero(cond >= min_condition):
            name = max(cs.per_condition, key=lambda c: cs.per_condition[c][i])
            reasons[i].append(f"in a '{name}' neighbourhood ({cs.condition_share[name][i]:.0%} '{name}') that does"
                              f" not share its identity: grouped by {name}")
    for i in np.flatnonzero(flg > 0):
        reasons[i].append("flagged by an operator")
    combined = w["disagreement"] * d0 + w["condition"] * cond + w["flag"] * flg
    has = np.array([bool(r) for r in reasons], dtype=bool)
    order = np.flatnonzero(has)
    order = order[np.argsort(-combined[order], kind="stable")]
    limit = candidate_limit(n, max_share, max_candidates)
    keep = np.zeros(n, dtype=bool)
    keep[order[~(flg[order] > 0)][:limit]] = True
    keep |= flg > 0
    cut = has & ~keep
    for i in np.flatnonzero(cut):
        reasons[i] = []
    combined = np.where(keep, combined, 0.0)
    order = order[keep[order]]
    if cut.any():
        log.info("%d misclustered candidates kept (limit %d), %d more cut", len(order), limit, int(cut.sum()))
    return Candidates(order, combined, reasons, {"disagreement": ev.score, "condition": cond, "flag": flg},
                      clusters, ev, limit, int(cut.sum()))
