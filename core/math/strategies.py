"""Labelling-queue strategies and condition-cluster scores: pure functions on arrays.

Size: every query strategy has the same signature and shares the candidate / distance helpers and
the registry the queue reads; splitting them would scatter one table.

Query strategies follow modAL's style: plain functions with one shared signature ::

    strategy(embeddings [N, D], labelled bool [N], labels [N], k, rng, **options) -> Selection

``labels`` is read only where ``labelled`` is true. A :class:`Selection` holds ``k`` indices of
unlabelled samples, best first, without duplicates, the per-sample ``scores`` (NaN for labelled
samples; higher means "label this sooner") and one human-readable reason per selected index.
A strategy may also read per-sample scores through options (``personness``: the person-ness
head's scores and threshold, the detector's confidence; see :data:`NEEDS_SAMPLE_SCORES`).
Every strategy accepts ``boost`` (float [N], >= 0: night / shadow / flagged masks or a mix)
which raises those samples: scores are multiplied by ``1 + boost`` (``boost_mode="multiply"``,
the default) or ``boost`` is added (``boost_mode="add"``).

The light classifier behind least confidence, margin and entropy is a distance-weighted kNN on
cosine distance (sklearn ``KNeighborsClassifier(weights="distance")``): with one to three labels
per identity a logistic regression has too little to fit and gives overconfident, poorly
calibrated probabilities, while kNN needs no fitting, is deterministic, matches how re-ID
matching works (nearest gallery neighbour) and gives spread-out probabilities to samples that
lie between identities or far from all of them. ``classifier="logreg"`` is available.

Condition clusters (:func:`condition_cluster_scores` / :func:`condition_clusters`: neighbourhoods
that share a lighting condition much more than an identity, the model grouping by darkness) are
here too; :mod:`core.math.misclustered` merges them with kNN label evidence and operator flags into
the map's short list of misclustered candidates.

No streamlit, no fiftyone: numpy and scikit-learn only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from core.math import neighbours

log = logging.getLogger(__name__)

_EPS = 1e-12
_CHUNK = 4096
_CONTEST_J = 3  # knn_disagreement: nearest samples averaged on each side of the contest (one is noisy)


# --------------------------------------------------------------------------------------------
# Result type and shared plumbing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """One queue batch.

    indices: int [k'] (k' = min(k, #unlabelled)) into N, all unlabelled, unique, best first.
    scores:  float [N], the strategy's score per sample (NaN where labelled).
    reasons: one string per selected index, same order as ``indices``.
    strategy: the name of the strategy that produced it (after any fallback).
    """

    indices: np.ndarray
    scores: np.ndarray
    reasons: tuple[str, ...] = ()
    strategy: str = ""


def _as_inputs(embeddings: np.ndarray, labelled: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
    n = len(x)
    m = np.zeros(n, dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
    if m.shape != (n,):
        raise ValueError(f"labelled must be bool [{n}], got shape {m.shape}")
    if labels is None:
        y = np.full(n, None, dtype=object)
        if m.any():
            raise ValueError("labelled samples given but labels is None")
    else:
        y = np.asarray(labels, dtype=object)
        if y.shape != (n,):
            raise ValueError(f"labels must be [{n}], got shape {y.shape}")
    return x, m, y


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32 [N, D]); cosine similarity is then a dot product."""
    x = np.asarray(embeddings, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _apply_boost(scores: np.ndarray, boost, mode: str) -> np.ndarray:
    """Scores float [N] raised by boost float [N] (>= 0): ``*(1+boost)`` or ``+boost``."""
    if boost is None:
        return scores
    b = np.asarray(boost, dtype=np.float64)
    if b.shape != scores.shape:
        raise ValueError(f"boost must be float [{len(scores)}], got shape {b.shape}")
    b = np.nan_to_num(b, nan=0.0)
    if mode == "multiply":
        return scores * (1.0 + b)
    if mode == "add":
        return scores + b
    raise ValueError(f"boost_mode must be 'multiply' or 'add', not {mode!r}")


def _boost_note(boost, i: int) -> str:
    if boost is None:
        return ""
    b = float(np.nan_to_num(np.asarray(boost, dtype=np.float64)[i]))
    return f"; boosted x{1 + b:.2g} (condition/flag)" if b > 0 else ""


def _take_top(scores: np.ndarray, unl: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The k unlabelled indices with the highest score, best first; ties broken by rng."""
    cand = np.flatnonzero(unl)
    if len(cand) == 0 or k <= 0:
        return np.zeros(0, np.int64)
    tiebreak = rng.random(len(cand))
    s = np.nan_to_num(scores[cand], nan=-np.inf)
    order = np.lexsort((tiebreak, -s))  # primary: -score, secondary: random
    return cand[order[:k]].astype(np.int64)


def _finish(name: str, scores: np.ndarray, labelled: np.ndarray, idx: np.ndarray, reasons) -> Selection:
    scores = scores.astype(np.float64, copy=True)
    scores[labelled] = np.nan
    idx = np.asarray(idx, dtype=np.int64)
    return Selection(indices=idx, scores=scores, reasons=tuple(reasons), strategy=name)


# --------------------------------------------------------------------------------------------
# Light classifier
# --------------------------------------------------------------------------------------------


def class_probabilities(
    embeddings: np.ndarray,
    labelled: np.ndarray,
    labels,
    n_neighbors: int = 10,
    classifier: str = "knn",
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities for every sample from a classifier fitted on the labelled ones.

    Returns (probs float [N, C], classes object [C]). ``classifier="knn"``: distance-weighted
    kNN on cosine distance over the labelled samples (``min(n_neighbors, #labelled)``
    neighbours); ``"logreg"``: multinomial logistic regression on unit-normalised embeddings.
    """
    x, m, y = _as_inputs(embeddings, labelled, labels)
    xn = normalise(x)
    ylab = np.asarray([str(v) for v in y[m]], dtype=object)
    classes = np.unique(ylab) if len(ylab) else np.zeros(0, dtype=object)
    if len(classes) == 0:
        return np.zeros((len(x), 0)), classes
    if len(classes) == 1:
        return np.ones((len(x), 1)), classes
    if classifier == "knn":
        nn = int(min(n_neighbors, m.sum()))
        idx, sims = neighbours.topk(xn, xn[m], nn)
        # sklearn's weights="distance": 1/d, an exact duplicate (d == 0) takes all the weight.
        d = np.maximum(1.0 - sims.astype(np.float64), 0.0)
        w = 1.0 / np.maximum(d, 1e-6)
        cls_idx = np.searchsorted(classes, ylab)[idx]  # [N, nn]
        probs = np.zeros((len(x), len(classes)))
        np.add.at(probs, (np.repeat(np.arange(len(x)), nn), cls_idx.ravel()), w.ravel())
        probs /= probs.sum(axis=1, keepdims=True)
        return probs, classes
    if classifier == "logreg":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=10.0, max_iter=500)
        clf.fit(xn[m], ylab)
        return clf.predict_proba(xn), clf.classes_.astype(object)
    raise ValueError(f"classifier must be 'knn' or 'logreg', not {classifier!r}")


def _uncertainty(probs: np.ndarray, kind: str) -> np.ndarray:
    """Uncertainty in [0, 1] (float [N]) of class probabilities [N, C], C >= 2."""
    p = np.clip(probs, 0.0, 1.0)
    if kind == "least_confidence":
        return 1.0 - p.max(axis=1)
    if kind == "margin":
        top2 = -np.partition(-p, 1, axis=1)[:, :2]
        return 1.0 - (top2[:, 0] - top2[:, 1])
    if kind == "entropy":
        h = -(p * np.log(np.maximum(p, _EPS))).sum(axis=1)
        return h / np.log(p.shape[1])
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# Strategies (one signature)
# --------------------------------------------------------------------------------------------


def random(embeddings, labelled, labels, k, rng, boost=None, boost_mode="multiply", **_) -> Selection:
    """The control: uniform random unlabelled samples (a boost weights the draw)."""
    x, m, _y = _as_inputs(embeddings, labelled, labels)
    scores = _apply_boost(rng.random(len(x)), boost, boost_mode)
    idx = _take_top(scores, ~m, k, rng)
    return _finish("random", scores, m, idx, ["random draw" + _boost_note(boost, i) for i in idx])


def kcenter(embeddings, labelled, labels, k, rng, boost=None, boost_mode="multiply", **_) -> Selection:
    """k-center greedy (farthest first) on cosine distance: covers the embedding space.

    Each step takes the unlabelled sample farthest from every labelled or already chosen sample
    (its distance raised by ``boost``). With no labels yet the first pick is the sample nearest
    the mean embedding (the most typical one). scores [N] = distance to the nearest labelled
    sample before selection (1.0 where nothing is labelled).
    """
    x, m, _y = _as_inputs(embeddings, labelled, labels)
    xn = normalise(x)
    n_unl = int((~m).sum())
    k = int(min(max(k, 0), n_unl))
    dmin = neighbours.nearest_distance(xn, xn[m]).astype(np.float64)
    scores = np.where(np.isfinite(dmin), dmin, 1.0)
    gain = np.ones(len(x)) if boost is None else _apply_boost(np.ones(len(x)), boost, boost_mode)
    chosen: list[int] = []
    reasons: list[str] = []
    avail = ~m
    for step in range(k):
        if np.isinf(dmin).all():  # no labels and nothing chosen yet
            mean = xn.mean(axis=0)
            s = np.where(avail, xn @ mean, -np.inf) * gain
            i = int(_take_top(s, avail, 1, rng)[0])
            reasons.append("no labels yet: most typical sample (nearest the mean)" + _boost_note(boost, i))
        else:
            s = np.where(avail, dmin * gain, -np.inf)
            i = int(_take_top(s, avail, 1, rng)[0])
            reasons.append(f"far from everything labelled or queued (cosine distance {dmin[i]:.3f})"
                           + _boost_note(boost, i))
        chosen.append(i)
        avail[i] = False
        dmin = np.minimum(dmin, np.maximum(1.0 - xn @ xn[i], 0.0))
    return _finish("kcenter", _apply_boost(scores, boost, boost_mode), m, np.array(chosen, np.int64), reasons)


def _fallback_reason(m: np.ndarray, y: np.ndarray) -> str | None:
    if not m.any():
        return "no labels yet"
    if len({str(v) for v in y[m]}) < 2:
        return "only one class labelled"
    return None


def _diversity_fallback(why: str, x, m, y, k, rng, boost, boost_mode) -> Selection:
    """kcenter, for strategies that are undefined with no or one class labelled."""
    sel = kcenter(x, m, y, k, rng, boost=boost, boost_mode=boost_mode)
    return Selection(sel.indices, sel.scores, tuple(f"{why}: {r}" for r in sel.reasons), "kcenter")


def _uncertainty_strategy(kind: str) -> Callable[..., Selection]:
    def strategy(embeddings, labelled, labels, k, rng, boost=None, boost_mode="multiply",
                 n_neighbors: int = 10, classifier: str = "knn", **_) -> Selection:
        x, m, y = _as_inputs(embeddings, labelled, labels)
        why = _fallback_reason(m, y)
        if why:  # uncertainty is undefined: fall back to diversity
            return _diversity_fallback(why, x, m, y, k, rng, boost, boost_mode)
        probs, classes = class_probabilities(x, m, y, n_neighbors=n_neighbors, classifier=classifier)
        u = _uncertainty(probs, kind)
        scores = _apply_boost(u, boost, boost_mode)
        idx = _take_top(scores, ~m, k, rng)
        reasons = []
        for i in idx:
            top = np.argsort(-probs[i])[:2]
            reasons.append(f"{kind.replace('_', ' ')} {u[i]:.2f}: {classes[top[0]]} {probs[i, top[0]]:.2f}"
                           f" vs {classes[top[1]]} {probs[i, top[1]]:.2f}" + _boost_note(boost, i))
        return _finish(kind, scores, m, idx, reasons)

    strategy.__name__ = kind
    strategy.__doc__ = (f"{kind.replace('_', ' ').capitalize()} of a distance-weighted kNN (or logreg) fitted "
                        "on the labelled embeddings; falls back to kcenter with no or one class labelled.")
    return strategy


least_confidence = _uncertainty_strategy("least_confidence")
margin = _uncertainty_strategy("margin")
entropy = _uncertainty_strategy("entropy")


def _nearest_other_label(xn: np.ndarray, xl: np.ndarray, codes: np.ndarray, avoid: np.ndarray,
                         j: int = 1) -> np.ndarray:
    """float [N]: mean cosine similarity of each unit row of xn to its ``j`` nearest labelled rows
    of xl [L, D] whose label code (int [L]) differs from ``avoid`` (int [N]); fewer where fewer
    exist, -1 where there is none."""
    out = np.full(len(xn), -1.0, np.float32)
    if len(xl) == 0 or j <= 0:
        return out
    jj = min(j, len(xl))
    n_other = len(codes) - np.bincount(codes, minlength=int(max(codes.max(), avoid.max())) + 1)[avoid]
    take = np.minimum(n_other, jj)  # [N]
    step = max(1, min(_CHUNK, 2 ** 24 // len(xl)))
    for s in range(0, len(xn), step):
        block = xn[s:s + step] @ xl.T
        block[codes[None, :] == avoid[s:s + step, None]] = -np.inf
        best = -np.sort(-np.partition(block, block.shape[1] - jj, axis=1)[:, -jj:], axis=1)  # [B, jj] desc
        t = take[s:s + step]
        keep = np.arange(jj)[None, :] < t[:, None]
        out[s:s + step] = np.where(t > 0, np.where(keep, best, 0.0).sum(axis=1) / np.maximum(t, 1), -1.0)
    return out


def knn_disagreement(embeddings, labelled, labels, k, rng, boost=None, boost_mode="multiply",
                     n_neighbors: int = 10, **_) -> Selection:
    """Unlabelled samples whose nearest labelled neighbours disagree about the label.

    score [N] = (votes against the most common label among the ``n = min(n_neighbors,
    #labelled)`` nearest labelled samples + ``contest``) / (n + 1). ``contest`` in [0, 1] is the
    mean cosine distance to the 3 nearest labelled samples of the majority label over that to the
    3 nearest of any other label: one vote's worth for how close the other labels come. A sample
    whose n neighbours all agree but that lies half-way to another class so scores above one
    deep inside a class (the vote alone scores both 0), and more votes against always outrank
    fewer. Falls back to kcenter with no or one class labelled.
    """
    x, m, y = _as_inputs(embeddings, labelled, labels)
    why = _fallback_reason(m, y)
    if why:
        return _diversity_fallback(why, x, m, y, k, rng, boost, boost_mode)
    xn = normalise(x)
    ylab = np.asarray([str(v) for v in y[m]], dtype=object)
    names, lab_codes = np.unique(ylab, return_inverse=True)
    nn = int(min(n_neighbors, m.sum()))
    idx, sims = neighbours.topk(xn, xn[m], nn)
    codes = lab_codes[idx]  # [N, nn]
    votes = np.zeros((len(x), len(names)))
    np.add.at(votes, (np.repeat(np.arange(len(x)), nn), codes.ravel()), 1.0)
    top = votes.max(axis=1)
    # the majority label; ties go to the label of the nearest neighbour among the tied ones
    tied = votes[np.arange(len(x))[:, None], codes] == top[:, None]
    maj = codes[np.arange(len(x)), tied.argmax(axis=1)]
    # sims are sorted: the majority's first min(votes, _CONTEST_J) entries are its nearest
    is_maj = codes == maj[:, None]
    jm = np.minimum(top, _CONTEST_J)
    first = is_maj & (np.cumsum(is_maj, axis=1) <= jm[:, None])
    d_maj = np.maximum(1.0 - np.where(first, sims, 0.0).sum(axis=1) / jm, 0.0)
    d_other = np.maximum(1.0 - _nearest_other_label(xn, xn[m], lab_codes, maj, _CONTEST_J), 0.0)
    contest = np.clip(d_maj / np.maximum(d_other, _EPS), 0.0, 1.0)
    dis = (nn - top + contest) / (nn + 1)
    scores = _apply_boost(dis, boost, boost_mode)
    idx_sel = _take_top(scores, ~m, k, rng)
    reasons = [f"{int(nn - top[i])} of its {nn} nearest labelled samples disagree with the majority "
               f"'{names[maj[i]]}'; other labels lie at cosine distance {d_other[i]:.3f}, "
               f"'{names[maj[i]]}' at {d_maj[i]:.3f}" + _boost_note(boost, i) for i in idx_sel]
    return _finish("knn_disagreement", scores, m, idx_sel, reasons)


def uncertainty_diversity(embeddings, labelled, labels, k, rng, boost=None, boost_mode="multiply",
                          n_neighbors: int = 10, classifier: str = "knn", uncertainty: str = "margin",
                          candidates: int | None = None, **_) -> Selection:
    """Batch mode: uncertain, and spread out, so one batch is not ten near-copies of one crop.

    1. ``uncertainty`` (margin by default) of the kNN classifier, raised by ``boost``;
    2. greedy weighted k-center: each step takes the unlabelled sample maximising
       uncertainty x cosine distance to the nearest labelled *or already chosen* sample, so a
       near-copy of a chosen crop drops to the bottom, and uncertain samples far from anything
       labelled (a new identity, a new camera) rise.
    ``candidates`` (int or None = all) restricts step 2 to the ``candidates * k`` most uncertain
    samples, for very large pools; restricting it early hurts spread (the most uncertain samples
    often sit in one region), so the default scans every unlabelled sample (O(k N D)).
    Falls back to kcenter with no or one class labelled.
    """
    x, m, y = _as_inputs(embeddings, labelled, labels)
    why = _fallback_reason(m, y)
    if why:
        return _diversity_fallback(why, x, m, y, k, rng, boost, boost_mode)
    xn = normalise(x)
    probs, classes = class_probabilities(x, m, y, n_neighbors=n_neighbors, classifier=classifier)
    u = _uncertainty(probs, uncertainty)
    scores = _apply_boost(u, boost, boost_mode)
    n_unl = int((~m).sum())
    k = int(min(max(k, 0), n_unl))
    pool = _take_top(scores, ~m, n_unl if candidates is None else max(k, int(candidates) * k), rng)
    dmin = neighbours.nearest_distance(xn[pool], xn[m]).astype(np.float64)
    s_pool = np.maximum(scores[pool], 0.0) + 1e-9
    avail = np.ones(len(pool), dtype=bool)
    chosen, reasons = [], []
    for _step in range(k):
        obj = np.where(avail, s_pool * dmin, -np.inf)
        j = int(np.argmax(obj))
        i = int(pool[j])
        top = np.argsort(-probs[i])[:2]
        reasons.append(f"{uncertainty} uncertainty {u[i]:.2f} ({classes[top[0]]} vs {classes[top[1]]}), "
                       f"cosine distance {dmin[j]:.3f} to nearest labelled/queued" + _boost_note(boost, i))
        chosen.append(i)
        avail[j] = False
        dmin = np.minimum(dmin, np.maximum(1.0 - xn[pool] @ xn[i], 0.0))
    return _finish("uncertainty_diversity", scores, m, np.array(chosen, np.int64), reasons)


def _as_scores(values, n: int, what: str) -> np.ndarray:
    """float [N] with NaN where unknown (None or NaN), or all NaN when ``values`` is None."""
    if values is None:
        return np.full(n, np.nan)
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        v = values.astype(np.float64)
    else:
        v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"{what} must be float [{n}], got shape {v.shape}")
    return v


def personness(embeddings, labelled, labels, k, rng, person=None, person_threshold=None, det_score=None,
               boost=None, boost_mode="multiply", **_) -> Selection:
    """"Is this a person?", least sure first: per-crop scores, not the embeddings, decide.

    ``person`` (float [N] in 0..1, NaN / None where unknown): the active model's person-ness head;
    ``person_threshold``: its operating point (the score that keeps 99 % of the round's persons;
    None: 0.5); ``det_score`` (float [N], NaN / None where unknown): the detector's confidence.
    Three tiers, each before the next:

    1. crops with a person-ness score, nearest the threshold first (``|person - threshold|``
       ascending): the ones the model is least sure are people;
    2. crops without one but with a detector score, lowest first (no head yet, or its score
       failed for that crop);
    3. crops with neither, in a seeded random order.

    ``boost`` raises samples within their tier (a boosted crop never jumps a tier). scores [N] =
    tier + w / (1 + w), w the within-tier score (``1 - |person - threshold|``, ``1 -`` the
    detector score's rank among the tier, a random draw) after the boost, so they order as the
    batch does. With no score for any sample it falls back to kcenter, like the uncertainty
    strategies without labels. The queue reads these arrays from the store
    (:func:`core.services.labeling.queue.compute_batch`, see :data:`NEEDS_SAMPLE_SCORES`).

    Why the detector's lowest scores first before any head (benchmarks/false_positives.py, the
    first half of PETS09 and the TUD clips, HOG boxes): of the first 200 crops this order asks,
    148 are false positives, against 39 / 31 of 200 drawn at random (seeds 0 / 1); a round on
    those answers removes 82.8 / 82.5 % of the later frames' false positives at 99 % of persons
    kept (AUC 0.969 / 0.967), against 81.9 / 79.2 % (AUC 0.971 / 0.968) with random picks; at
    50 answers AUC 0.954 / 0.964 (random picks 0.929 / 0.949, measured before a round's batch
    augmentation took one generator per crop). A false positive is what the head lacks: the
    persons come free with the tracks.
    """
    x, m, y = _as_inputs(embeddings, labelled, labels)
    n = len(x)
    p = _as_scores(person, n, "person")
    d = _as_scores(det_score, n, "det_score")
    has_p, has_d = np.isfinite(p), np.isfinite(d)
    if not (has_p | has_d)[~m].any():
        return _diversity_fallback("no person-ness or detector scores", x, m, y, k, rng, boost, boost_mode)
    t = 0.5 if person_threshold is None or not np.isfinite(person_threshold) else float(person_threshold)
    tier = np.where(has_p, 2, np.where(has_d, 1, 0))
    w = rng.random(n)  # tier 0: seeded random order
    w[has_p] = 1.0 - np.abs(p[has_p] - t)
    in_d = np.flatnonzero(~has_p & has_d)
    if len(in_d):  # rank, not value: detectors' scores are on any scale (MOT det.txt, HOG margins)
        order = np.argsort(d[in_d], kind="stable")
        w[in_d[order]] = 1.0 - np.arange(len(in_d)) / len(in_d)
    w = np.maximum(_apply_boost(w, boost, boost_mode), 0.0)
    scores = tier + w / (1.0 + w)
    idx = _take_top(scores, ~m, k, rng)
    head = person is not None and bool(has_p.any())
    reasons = []
    for i in idx:
        if tier[i] == 2:
            thr = f"threshold {t:.2f}" if person_threshold is not None else "threshold 0.50 (the head's is unknown)"
            reasons.append(f"person-ness {p[i]:.2f}, {thr}: the model is unsure" + _boost_note(boost, i))
        elif tier[i] == 1:
            why = "no person-ness score for this crop" if head else "no person-ness head yet"
            reasons.append(f"detector score {d[i]:.2f}: lowest first, {why}" + _boost_note(boost, i))
        else:
            reasons.append("no person-ness or detector score: after those that have one, in random order"
                           + _boost_note(boost, i))
    return _finish("personness", scores, m, idx, reasons)


StrategyFn = Callable[..., Selection]

STRATEGIES: dict[str, StrategyFn] = {
    "random": random,
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
    "knn_disagreement": knn_disagreement,
    "kcenter": kcenter,
    "uncertainty_diversity": uncertainty_diversity,
    "personness": personness,
}
DEFAULT_STRATEGY = "uncertainty_diversity"
#: strategies that read per-sample scores besides the embeddings: the queue takes them from the
#: store and passes them as options (``person``, ``person_threshold``, ``det_score``)
NEEDS_SAMPLE_SCORES = frozenset({"personness"})
#: one line per strategy, for selectors and help texts
DESCRIPTIONS: dict[str, str] = {
    "random": "random: the control",
    "least_confidence": "least confidence of a kNN on the labels",
    "margin": "margin between the two likeliest labels",
    "entropy": "entropy of the label probabilities",
    "knn_disagreement": "nearest labelled neighbours disagree",
    "kcenter": "k-center: cover the embedding space",
    "uncertainty_diversity": "uncertain and spread out (the default)",
    "personness": "Is this a person? least sure first (person-ness head, else detector score)",
}


def select(name: str, embeddings, labelled, labels, k: int, rng: np.random.Generator | int | None = None,
           **options) -> Selection:
    """Run the strategy called ``name`` (an int or None rng is turned into a Generator)."""
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return STRATEGIES[name](embeddings, labelled, labels, k, rng, **options)


# --------------------------------------------------------------------------------------------
# Condition clusters (used by core.math.misclustered and the label-efficiency benchmark)
# --------------------------------------------------------------------------------------------


def _known(labels, n: int) -> np.ndarray:
    """bool [N]: which labels are present (not None / NaN / empty string)."""
    if labels is None:
        return np.zeros(n, dtype=bool)
    y = np.asarray(labels, dtype=object)
    return np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) != "" for v in y])



@dataclass(frozen=True)
class ConditionScores:
    """Per-sample neighbourhood statistics behind :func:`condition_clusters`.

    score:            float [N], max over conditions of the per-condition score (0 = fine).
    per_condition:    name -> float [N]: for samples that have the condition, how much more their
                      neighbourhood shares the condition than the identity (see the function).
    condition_share:  name -> float [N]: share of the n nearest neighbours with that condition.
    identity_share:   float [N]: share of labelled neighbours with the sample's own identity
                      (NaN where the sample or all its neighbours are unlabelled).
    neighbours:       int [N, n]: the neighbour indices used.
    """

    score: np.ndarray
    per_condition: dict[str, np.ndarray]
    condition_share: dict[str, np.ndarray]
    identity_share: np.ndarray
    neighbours: np.ndarray = field(repr=False)


def condition_cluster_scores(
    embeddings: np.ndarray,
    labels,
    conditions: Mapping[str, np.ndarray],
    n_neighbors: int = 10,
) -> ConditionScores:
    """Per-sample "grouped by condition, not by identity" scores (float [N] in [0, 1]).

    For a sample with condition c, with its ``n_neighbors`` nearest neighbours (cosine, all
    samples): ``enrich`` = how far the neighbours' share of c sits above the share of c in the
    whole set, rescaled to [0, 1]; then the score is ``enrich * (1 - identity_share)`` where
    identity_share is the share of labelled neighbours with the sample's own label. Without an
    identity for the sample (or labelled neighbours) identity_share counts as 0, so only the
    condition enrichment speaks. Samples without condition c score 0 for c.

    A darkened copy of a day crop whose neighbours are other darkened crops of other people
    scores near 1; its day original (neighbours: its own track) scores 0 (no condition); a
    person really seen only at night (neighbours dark *and* the same identity) scores near 0.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    xn = normalise(x)
    nb, _s = neighbours.topk(xn, xn, n_neighbors, exclude_self=True)
    known = _known(labels, n)
    y = np.asarray([str(v) for v in labels], dtype=object) if labels is not None else np.full(n, "", object)
    if nb.shape[1]:
        nb_known = known[nb]
        same = (y[nb] == y[:, None]) & nb_known
        cnt = nb_known.sum(axis=1)
        id_share = np.where(known & (cnt > 0), same.sum(axis=1) / np.maximum(cnt, 1), np.nan)
    else:
        id_share = np.full(n, np.nan)
    per, share = {}, {}
    for name, mask in conditions.items():
        c = np.asarray(mask, dtype=bool)
        if c.shape != (n,):
            raise ValueError(f"condition {name!r} must be bool [{n}], got shape {c.shape}")
        prev = c.mean() if n else 0.0
        sh = c[nb].mean(axis=1) if nb.shape[1] else np.zeros(n)
        enrich = np.clip((sh - prev) / max(1.0 - prev, _EPS), 0.0, 1.0) if prev < 1.0 else np.zeros(n)
        per[name] = np.where(c, enrich * (1.0 - np.nan_to_num(id_share, nan=0.0)), 0.0)
        share[name] = sh
    score = np.max(np.stack(list(per.values())), axis=0) if per else np.zeros(n)
    return ConditionScores(score, per, share, id_share, nb)


def condition_clusters(
    embeddings: np.ndarray,
    labels,
    conditions: Mapping[str, np.ndarray],
    n_neighbors: int = 10,
    min_score: float = 0.5,
    min_size: int = 5,
    scores: ConditionScores | None = None,
) -> list[dict]:
    """Neighbourhoods whose members share a condition much more than an identity.

    Samples with condition c and a per-condition score >= ``min_score`` (see
    :func:`condition_cluster_scores`) are linked to each other along the kNN graph; each
    connected group of at least ``min_size`` is reported, largest first, as a dict:
    ``condition``, ``members`` (int [M]), ``size``, ``condition_purity`` (mean share of the
    members' neighbours with the condition), ``identity_purity`` (mean share of the members'
    labelled neighbours with their own identity; NaN without identities), ``n_identities``
    (distinct identities among members), ``score`` (mean member score) and ``reason``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    cs = scores or condition_cluster_scores(embeddings, labels, conditions, n_neighbors)
    n = len(cs.score)
    known = _known(labels, n)
    y = np.asarray([str(v) for v in labels], dtype=object) if labels is not None else None
    out: list[dict] = []
    nb = cs.neighbours
    for name, per in cs.per_condition.items():
        hot = per >= min_score
        if hot.sum() < min_size or nb.shape[1] == 0:
            continue
        rows = np.repeat(np.arange(n), nb.shape[1])
        cols = nb.ravel()
        keep = hot[rows] & hot[cols]
        g = coo_matrix((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(n, n))
        _nc, comp = connected_components(g, directed=False)
        for c in np.unique(comp[hot]):
            members = np.flatnonzero(hot & (comp == c))
            if len(members) < min_size:
                continue
            cp = float(cs.condition_share[name][members].mean())
            ids = cs.identity_share[members]
            ip = float(np.nanmean(ids)) if np.isfinite(ids).any() else float("nan")
            n_ids = len({y[i] for i in members if known[i]}) if y is not None else 0
            id_txt = (f"only {ip:.0%} of their labelled neighbours share their identity"
                      f" ({n_ids} identities among them)") if np.isfinite(ip) else "identities unknown"
            out.append({
                "condition": name,
                "members": members,
                "size": int(len(members)),
                "condition_purity": cp,
                "identity_purity": ip,
                "n_identities": int(n_ids),
                "score": float(per[members].mean()),
                "reason": (f"{len(members)} '{name}' samples whose nearest neighbours are {cp:.0%} '{name}' "
                           f"but {id_txt}: the model groups them by {name}, not by who they are"),
            })
    out.sort(key=lambda d: (-d["size"], -d["score"]))
    return out
