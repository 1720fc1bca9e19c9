"""Person-ness: a light head that learns the operator's false-positive labels (pure: numpy and
scikit-learn, tested on arrays).

A crop labelled ``person`` is a positive; any other class (``shadow/noise``, ``vehicle``,
``animal``, ``other``, a site's own) is a false positive of the detector. A round fits a
logistic regression on the model's pooled backbone features of those crops (the same features
that feed the embedding head) and folds the feature standardisation into one linear layer, so
the model carries it as ``person = sigmoid(w . f + b)`` beside the embedding, in PyTorch and in
the exported ONNX graph alike.

Why a head beside the embedding and not the embedding itself: the identity losses pull crops of
one person together and push people apart; asking the same 256 dimensions to also separate
"person" from "shadow" competes with that, while the 1280 pooled features already carry it (an
ImageNet backbone knows benches, cars and tarmac). ``benchmarks/false_positives.py`` measures
both inputs (``--head-input``).

Regularisation is chosen per round by cross-validation on the round's own labels (class-balanced
log loss over ``C_GRID``; folds stratified, and grouped by tracklet so near-identical crops of one
tracklet never vouch for each other), never on the benchmark's evaluation crops; the out-of-fold scores of
the round's own persons give the threshold that keeps 99 % of them (:attr:`PersonHead.threshold`,
the model card's suggested operating point).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PERSON = "person"
MIN_PER_CLASS = 5  # labelled crops of each side before a head is fitted
C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # inverse L2 strength (standardised features), by CV
KEEP = 0.99  # share of persons an operating threshold keeps


class PersonnessError(ValueError):
    """Too few labels of one side to fit a head, with what to label."""


def is_person_label(label: object) -> bool | None:
    """True for ``person``, False for any other class, None for an unlabelled crop."""
    if label is None or label == "":
        return None
    return str(label) == PERSON


@dataclass
class PersonHead:
    """A fitted head: ``weight`` [D] and ``bias`` on raw features (standardisation folded in)."""

    weight: np.ndarray
    bias: float
    C: float
    cv_auc: float  # out-of-fold ROC AUC on the round's own labels
    threshold: float  # out-of-fold score that keeps KEEP of the round's persons
    fp_removed: float  # share of the round's own false positives under that threshold (out of fold)
    n_person: int
    n_other: int

    def score(self, features: np.ndarray) -> np.ndarray:
        return sigmoid(np.asarray(features, np.float64) @ self.weight + self.bias)

    def summary(self) -> dict:
        d = asdict(self)
        del d["weight"]
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def rejection(scores: np.ndarray, is_person: np.ndarray, keep: float = KEEP) -> dict[str, float]:
    """How well ``scores`` (higher: more a person) reject false positives: ROC AUC, the threshold
    that keeps ``keep`` of the persons, and the share of non-persons under it."""
    from sklearn.metrics import roc_auc_score

    s, y = np.asarray(scores, np.float64), np.asarray(is_person, bool)
    if y.all() or not y.any():
        raise PersonnessError("rejection needs persons and false positives both")
    ranked = np.sort(s[y])
    thr = float(ranked[int(np.floor(len(ranked) * (1.0 - keep) + 1e-9))])  # the highest that keeps >= keep
    return {"auc": float(roc_auc_score(y, s)), "threshold": thr,
            "fp_removed": float(np.mean(s[~y] < thr)), "persons_kept": float(np.mean(s[y] >= thr))}


def fit(features: np.ndarray, is_person: np.ndarray, seed: int = 0, groups=None) -> PersonHead:
    """Fit the head on pooled features ``[N, D]`` and labels (True: person). ``groups``: one key
    per crop (its tracklet): the cross-validation never splits a group, so crops of one tracklet,
    near copies of each other, cannot vouch for each other when ``C`` is chosen."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict

    x, y = np.asarray(features, np.float64), np.asarray(is_person, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        raise PersonnessError(
            f"person-ness needs at least {MIN_PER_CLASS} crops labelled person and {MIN_PER_CLASS} labelled "
            f"as something else (shadow, vehicle, animal, other); this round has {n_pos} and {n_neg}")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    if groups is not None:
        groups = np.asarray([str(g) for g in groups])
        n_splits = min(5, len(set(groups[y])), len(set(groups[~y])))
    else:
        n_splits = min(5, n_pos, n_neg)
    if n_splits < 2:
        raise PersonnessError("person-ness needs persons and false positives from at least two tracklets each")
    folds = (StratifiedGroupKFold if groups is not None else StratifiedKFold)(
        n_splits=n_splits, shuffle=True, random_state=seed)
    best = None
    for c in C_GRID:
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        oof = cross_val_predict(lr, z, y, cv=folds, method="decision_function", groups=groups)
        # a proper score (class-balanced log loss), not AUC: AUC ties across strengths on easy
        # labels and would pick the strongest, whose scores crowd around 0.5
        p = np.clip(sigmoid(oof), 1e-7, 1 - 1e-7)
        loss = -0.5 * (np.log(p[y]).mean() + np.log(1 - p[~y]).mean())
        if best is None or loss < best[0] - 1e-12:
            best = (loss, c, rejection(oof, y))
    _loss, c, r = best
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(z, y)
    w = lr.coef_[0] / sd
    b = float(lr.intercept_[0] - np.dot(lr.coef_[0], mu / sd))
    return PersonHead(weight=w, bias=b, C=float(c), cv_auc=r["auc"], threshold=float(sigmoid(r["threshold"])),
                      fp_removed=r["fp_removed"], n_person=n_pos, n_other=n_neg)
