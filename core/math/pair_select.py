"""Which pairs of identities to ask an operator about: pure math on arrays.

Candidates are each component's nearest components by the active model (a component's vector
is the mean of its crops' unit vectors, each camera's mean removed first), those seen by other
cameras first, never a pair already inside one component or held apart by a cannot-link. The
answer's value is estimated from a calibrated P(same | cosine): a one-feature logistic fit on
the pairs decided so far, and before there are enough of them a logistic step at the operating
threshold (the cosine that 1 % of guaranteed negatives, the
cannot-linked pairs, exceed; a candidate quantile when there are none).

Orders (one signature: ``order_pairs(p, boost, a, b, k, rng) -> indices``), each times the
night / shadow / flagged boost and picked greedily with a diversity factor so one batch does
not ask many questions about one person:

``likely`` (default)  the most probable "same" first: every "same" merges two identities and
                      labels all their crops, so it pays most while merges are still to be found
``uncertainty``       closeness to the decision boundary, 1 - |2 P(same) - 1|
``random``            the same candidates in random order (the control; no boost, no diversity)

Evidence for the default (benchmarks/label_efficiency.py's simulated operator on the training
pools only, never their evaluation sets; share of the true merges found after 25 / 50 / 100
answers, base model): campus62 per-camera tracklets likely 27 / 61 / 100 %, uncertainty
0 / 0 / 5 %, random 0-3 / 6-8 / 11-15 %; PETS09 + TUD fragments likely 18 / 33 / 58 %,
uncertainty 9 / 18 / 51 %, random 5-8 / 9-10 / 15-19 %. Before answers calibrate P(same), the
boundary sits at a guess (the median candidate without cannot-links), and the pairs there are
mostly two people.

Proposals: a training round that clusters lone tracklets into pseudo-identities records the
merges it is most sure of (``{"a", "b", "distance"}``, smaller = surer). They are asked first,
closest first (:func:`open_proposals` drops those the graph has settled since), ahead of the
nearest-neighbour candidates, in every order but ``random`` (the control stays the control).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from core.math.neighbours import topk

PAIR_ORDERS = ("likely", "uncertainty", "random")
DEFAULT_PAIR_ORDER = "likely"  # evidence in the module docstring
PRIOR_SCALE = 0.05  # cosine width of the prior's step (P from 0.27 to 0.73 across +-0.05)
MIN_FIT = 3  # decided pairs of each answer needed before the logistic fit replaces the prior
DIVERSITY = 0.35  # a component already asked about in this batch scales its next pairs by this
NEIGHBOURS = 8  # nearest identities per identity that become candidates
MIN_CAMERA_CROPS = 5  # crops a camera needs for its own mean in camera_centred
CROSS_CAMERA = 1.5  # pairs of identities seen by different cameras weigh this much more


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def camera_centred(x: np.ndarray, cams: Sequence[Any]) -> np.ndarray:
    """[N, D] unit vectors with each camera's mean removed (crops of unknown camera: the mean of
    all), renormalised. An ImageNet model's vectors carry each camera's look (light, colour,
    background) more than who is in them: on campus62's 124 per-camera tracklets with the
    packaged model, a tracklet's true other-camera partner ranked median 2nd among other-camera
    tracklets raw and 1st centred (in the 8 nearest: 71 % raw, 98 % centred)."""
    x = unit(x)
    out = x.copy()
    cams = np.array([str(c) if c is not None else "" for c in cams], dtype=object)
    for c in np.unique(cams):
        m = cams == c
        # a camera with a handful of crops has no mean worth the name: the overall one serves
        out[m] = x[m] - (x[m].mean(0) if c and m.sum() >= MIN_CAMERA_CROPS else x.mean(0))
    return unit(out)


def component_vectors(x: np.ndarray, comp: np.ndarray, n_comp: int | None = None) -> np.ndarray:
    """[C, D] unit mean of the unit vectors of each component's crops. ``x``: [N, D] crop
    vectors; ``comp``: [N] component index of each crop (0 .. C-1)."""
    comp = np.asarray(comp, np.int64)
    n_comp = int(comp.max()) + 1 if n_comp is None else n_comp
    out = np.zeros((n_comp, x.shape[1]), np.float32)
    np.add.at(out, comp, unit(x))
    return unit(out)


def candidates(cv: np.ndarray, k: int, allowed: Callable[[np.ndarray, np.ndarray], np.ndarray],
               nearest: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each component's ``k`` nearest others by cosine that ``allowed`` lets through; each
    unordered pair once. Returns (a [M], b [M], cosine [M]) with a < b, most similar first.

    ``allowed(i, j)``: bool [P] for index arrays ``i < j`` [P], False for pairs never to ask.
    The neighbours are :func:`core.math.neighbours.topk`'s (``cv`` unit rows): the ``3 k``
    nearest of each component are looked through (some are not allowed). ``nearest``: that
    search done once for several calls (indices, similarities [C, >= 3 k], best first).
    All in arrays: 100k components' 24 neighbours each are sifted in about a second (a loop
    over them took 19 s)."""
    c = len(cv)
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    if c < 2:
        return empty
    want = min(c - 1, k * 3)  # some neighbours are not allowed: look a little further
    idx, sim = nearest if nearest is not None else topk(cv, cv, want, exclude_self=True)
    idx, sim = idx[:, :want], sim[:, :want]
    row = np.broadcast_to(np.arange(c)[:, None], idx.shape)
    lo, hi = np.minimum(row, idx), np.maximum(row, idx)
    ok = (idx >= 0) & np.asarray(allowed(lo.ravel(), hi.ravel()), bool).reshape(idx.shape)  # -1: none found
    ok &= np.cumsum(ok, axis=1) <= k  # each component's first k allowed neighbours
    lo, hi, sim = lo[ok], hi[ok], sim[ok]
    if not len(lo):
        return empty
    _u, first = np.unique(lo * c + hi, return_index=True)  # a pair two components found: once
    first.sort()
    first = first[np.argsort(-sim[first], kind="stable")]
    return lo[first].astype(np.int64), hi[first].astype(np.int64), sim[first].astype(np.float32)


def operating_threshold(negatives: np.ndarray, fallback: np.ndarray, fmr: float = 0.01) -> float:
    """The cosine that a share ``fmr`` of guaranteed-negative pairs reaches (cannot-linked
    components); without negatives, the median of ``fallback`` (the candidates' cosines)."""
    negatives = np.asarray(negatives, np.float64)
    if len(negatives) >= 10:
        return float(np.quantile(negatives, 1.0 - fmr))
    fallback = np.asarray(fallback, np.float64)
    return float(np.median(fallback)) if len(fallback) else 0.5


class PairCalibrator:
    """P(same | cosine). ``fit`` on decided pairs (cosine, same?) uses a logistic regression once
    both answers have :data:`MIN_FIT` examples, else a step at ``threshold``
    (scikit-learn conventions: ``fit`` returns self, learned attributes end in ``_``)."""

    def __init__(self, threshold: float, scale: float = PRIOR_SCALE) -> None:
        self.threshold = threshold
        self.scale = scale

    def fit(self, cos: Sequence[float], same: Sequence[bool]) -> "PairCalibrator":
        cos, same = np.asarray(cos, np.float64).reshape(-1, 1), np.asarray(same, bool)
        self.fitted_ = bool(same.sum() >= MIN_FIT and (~same).sum() >= MIN_FIT)
        if self.fitted_:
            from sklearn.linear_model import LogisticRegression

            m = LogisticRegression(C=10.0).fit(cos, same)
            self.coef_, self.intercept_ = float(m.coef_[0, 0]), float(m.intercept_[0])
        else:
            self.coef_, self.intercept_ = 1.0 / self.scale, -self.threshold / self.scale
        return self

    def predict(self, cos: np.ndarray) -> np.ndarray:
        z = self.coef_ * np.asarray(cos, np.float64) + self.intercept_
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def uncertainty(p: np.ndarray) -> np.ndarray:
    """1 at P(same) = 0.5, 0 at certainty."""
    return 1.0 - np.abs(2.0 * np.asarray(p, np.float64) - 1.0)


def _greedy(scores: np.ndarray, a: np.ndarray, b: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Top-``k`` by score, each pick scaling the later pairs of its two components by
    ``diversity``."""
    scores = np.asarray(scores, np.float64)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    seen = np.zeros(int(max(a.max(initial=-1), b.max(initial=-1))) + 1, np.int64)  # picks per component
    out: list[int] = []
    live = np.ones(len(scores), bool)
    for _ in range(min(k, len(scores))):
        eff = np.where(live, scores * diversity ** (seen[a] + seen[b]), -np.inf)
        t = int(np.argmax(eff))
        out.append(t)
        live[t] = False
        seen[[a[t], b[t]]] += 1
    return np.array(out, np.int64)


def order_pairs(p: np.ndarray, boost: np.ndarray | None, a: np.ndarray, b: np.ndarray, k: int,
          rng: np.random.Generator, strategy: str = DEFAULT_PAIR_ORDER,
          diversity: float = DIVERSITY) -> np.ndarray:
    """Indices of the ``k`` candidate pairs to ask first (see the module docstring)."""
    if strategy not in PAIR_ORDERS:
        raise ValueError(f"unknown pair order {strategy!r}; use one of {PAIR_ORDERS}")
    n = len(p)
    if strategy == "random":
        return rng.permutation(n)[:k].astype(np.int64)
    value = uncertainty(p) if strategy == "uncertainty" else np.asarray(p, np.float64)
    s = value * (1.0 if boost is None else np.asarray(boost, np.float64))
    s = s + 1e-9 * rng.random(n)  # ties in random order
    return _greedy(s, a, b, k, diversity)


@dataclass
class CropMeta:
    """Per-crop columns the order looks at (aligned with the rows the graph's nodes index)."""

    camera: Sequence[Any]
    flagged: Sequence[bool]
    night: Sequence[bool]
    shadow: Sequence[bool]


def representative(members: Sequence[str], rows: Mapping[str, Sequence[int]]) -> str:
    """The node of a component a pair answer links: its largest tracklet (then the name)."""
    return max(members, key=lambda n: (len(rows.get(n, ())), n))


PROPOSED_REASON = "proposed by round {version} (clustering joined these tracklets)"


def _root_pair(graph, a: str, b: str) -> tuple[str, str]:
    ra, rb = graph.find(a), graph.find(b)
    return (ra, rb) if ra < rb else (rb, ra)


def open_proposals(graph, rows: Mapping[str, Sequence[int]], proposals: Sequence[Mapping[str, Any]],
                   answered: set, exclude: set = frozenset()) -> list[tuple[str, str, float]]:
    """The proposed merges still worth asking, closest first: ``(a, b, distance)`` with ``a``,
    ``b`` the representatives (:func:`representative`) of the two proposed nodes' components,
    each pair of components once. Dropped: a node not in ``graph``, two nodes now in one
    component or held apart by a cannot-link, a pair of components in ``answered`` (sorted
    root pairs) or whose representatives' key is in ``exclude``; a distance that is not a
    finite number."""
    out: list[tuple[str, str, float]] = []
    seen: set[tuple[str, str]] = set()
    good = []
    for pr in proposals:
        try:
            d = float(pr["distance"])
            a, b = str(pr["a"]), str(pr["b"])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(d):
            good.append((d, a, b))
    for d, a, b in sorted(good, key=lambda t: t[0]):  # stable: the round's order breaks ties
        if a not in graph or b not in graph or graph.same(a, b) or graph.separated(a, b) is not None:
            continue
        root = _root_pair(graph, a, b)
        if root in answered or root in seen:
            continue
        ra, rb = sorted((representative(graph.component(a), rows), representative(graph.component(b), rows)))
        if f"{ra}|{rb}" in exclude:
            continue
        seen.add(root)
        out.append((ra, rb, d))
    return out


def plan_pairs(graph, rows: Mapping[str, Sequence[int]], vectors: Sequence[Any], meta: CropMeta,
               answered: set, decided: Sequence[tuple[float, bool]], order: str = DEFAULT_PAIR_ORDER,
               k: int = 20, rng: np.random.Generator | None = None, exclude: set = frozenset(),
               boost: bool = True, proposals: Sequence[Mapping[str, Any]] = (),
               proposed_by: str | None = None) -> list[dict[str, Any]]:
    """The next ``k`` pair questions over ``graph`` (a :class:`core.math.graph.IdentityGraph`).

    ``rows``: node -> row indices into ``vectors`` (one vector or None per crop) and ``meta``;
    ``answered``: component-root pairs (sorted tuples) an operator already answered;
    ``decided``: (cosine, same?) of the answered pairs under this model, for the calibration.
    Returns dicts ``a``, ``b`` (representative nodes), ``cosine``, ``p_same``, ``score``,
    ``reason``, best first. The boost: a component with a flagged crop weighs 2x, its night
    and shadow shares add up to 0.5 each; a pair of identities seen by disjoint cameras weighs
    :data:`CROSS_CAMERA` more ("other cameras first").

    ``proposals`` (of round ``proposed_by``, see the module docstring) come first, closest
    first, up to ``k``: their cosine is the active model's between the two components (None
    when one has no vectors), their P(same) the calibrated one of that cosine (else
    1 - distance, clipped to [0, 1]); the candidates fill the rest of the ``k``. Ignored in the
    ``random`` order."""
    rng = rng if rng is not None else np.random.default_rng(0)
    props = open_proposals(graph, rows, proposals, answered, exclude)[:k] if proposals and order != "random" else []
    taken = {_root_pair(graph, pa, pb) for pa, pb, _ in props}
    comps = [m for m in graph.components() if any(vectors[r] is not None for n in m for r in rows.get(n, ()))]
    if len(comps) < 2:
        return _proposed(props, {}, None, order, proposed_by)
    x_rows, comp_of = [], []
    for ci, members in enumerate(comps):
        for n in members:
            x_rows.extend(r for r in rows.get(n, ()) if vectors[r] is not None)
            comp_of.extend(ci for r in rows.get(n, ()) if vectors[r] is not None)
    comp_of = np.asarray(comp_of)
    x = np.stack([np.asarray(vectors[r], np.float32) for r in x_rows])
    row_cams = [meta.camera[r] for r in x_rows]
    if len({c for c in row_cams if c is not None}) > 1:
        x = camera_centred(x, row_cams)
    cv = component_vectors(x, comp_of, len(comps))
    cams: list[set] = [set() for _ in comps]
    for c, cam in zip(comp_of, row_cams):
        if cam is not None:
            cams[c].add(cam)
    rep = [representative(m, rows) for m in comps]
    root = [graph.find(m[0]) for m in comps]
    pos = {r: i for i, r in enumerate(root)}
    n_c = len(comps)
    # pairs never to ask, as codes i * n_c + j (i < j): held apart by a cannot-link, answered,
    # proposed in this batch, or queued elsewhere (``exclude``: "rep_a|rep_b" keys)
    never = [(pos[ra], pos[rb]) for ra, rb in (*graph.cannot_pairs(), *answered, *taken)
             if ra in pos and rb in pos]
    at = {r: i for i, r in enumerate(rep)}
    for key in exclude:
        never.extend((at[key[:cut]], at[key[cut + 1:]]) for cut in range(len(key))
                     if key[cut] == "|" and key[:cut] in at and key[cut + 1:] in at)
    never_codes = np.unique(np.array([min(i, j) * n_c + max(i, j) for i, j in never], np.int64))
    cam_names = sorted({c for cs in cams for c in cs}, key=str)
    if len(cam_names) <= 62:  # each component's cameras as bits
        bit = {c: 1 << t for t, c in enumerate(cam_names)}
        masks = np.array([sum(bit[c] for c in cs) for cs in cams], np.int64)

        def apart(i: np.ndarray, j: np.ndarray) -> np.ndarray:  # disjoint cameras (unknown: not apart)
            return (masks[i] != 0) & (masks[j] != 0) & ((masks[i] & masks[j]) == 0)
    else:
        def apart(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            return np.array([bool(cams[x] and cams[y] and not (cams[x] & cams[y])) for x, y in zip(i, j)], bool)

    def asked_before(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.isin(i * n_c + j, never_codes)

    # other cameras first: each identity's nearest identities seen elsewhere, then fewer of its
    # own camera(s) (other times)
    # (approximate at scale: these are questions to ask, and 97 % of the true neighbours in a
    # fifth of the time is the better trade there; core.math.neighbours.APPROX_MIN_ROWS)
    nearest = topk(cv, cv, min(len(cv) - 1, NEIGHBOURS * 3), exclude_self=True, approximate=True) \
        if len(cv) > 1 else None
    a1, b1, c1 = candidates(cv, NEIGHBOURS, lambda i, j: ~asked_before(i, j) & apart(i, j), nearest)
    a2, b2, c2 = candidates(cv, NEIGHBOURS // 2, lambda i, j: ~asked_before(i, j) & ~apart(i, j), nearest)
    a, b, cos = np.concatenate([a1, a2]), np.concatenate([b1, b2]), np.concatenate([c1, c2])
    if not len(a) and not props:
        return []
    neg = [float(cv[pos[ra]] @ cv[pos[rb]]) for ra, rb in graph.cannot_pairs() if ra in pos and rb in pos]
    cal = PairCalibrator(operating_threshold(np.array(neg), cos)).fit([d[0] for d in decided], [d[1] for d in decided])
    pvec = {n: cv[pos[graph.find(n)]] for pa, pb, _ in props for n in (pa, pb) if graph.find(n) in pos}
    first = _proposed(props, pvec, cal, order, proposed_by)
    k -= len(first)
    if not len(a) or k <= 0:
        return first
    p = cal.predict(cos)
    size = np.bincount(comp_of, minlength=len(comps)).astype(float)
    flags, night, shadow = (np.zeros(len(comps)) for _ in range(3))
    for r, c in zip(x_rows, comp_of):
        flags[c] = max(flags[c], float(bool(meta.flagged[r])))
        night[c] += float(bool(meta.night[r]))
        shadow[c] += float(bool(meta.shadow[r]))
    cboost = 1.0 + flags + 0.5 * night / size + 0.5 * shadow / size
    cross = np.where(apart(a, b), CROSS_CAMERA, 1.0)
    pb = (np.maximum(cboost[a], cboost[b]) if boost else np.ones(len(a))) * cross
    value = {"uncertainty": uncertainty(p), "likely": p}.get(order, np.ones(len(p)))
    out = first
    for t in order_pairs(p, pb, a, b, k, rng, strategy=order):
        i, j = int(a[t]), int(b[t])
        why = [f"P(same) {p[t]:.2f}", f"cosine {cos[t]:.2f}"]
        if cross[t] > 1:
            why.append("other camera")
        if boost and pb[t] / cross[t] > 1:
            why.append("night / shadow / flagged")
        out.append({"a": rep[i], "b": rep[j], "cosine": float(cos[t]), "p_same": float(p[t]),
                    "score": float(value[t] * pb[t]), "reason": ", ".join(why)})
    return out


def _proposed(props: Sequence[tuple[str, str, float]], cvec: Mapping[str, np.ndarray],
              cal: PairCalibrator | None, order: str, version: str | None) -> list[dict[str, Any]]:
    """The question dicts of the open proposals ``props`` (in their order). ``cvec``: node ->
    unit vector of its component under the active model; ``cal``: P(same | cosine), or None."""
    out = []
    for pa, pb, d in props:
        va, vb = cvec.get(pa), cvec.get(pb)
        cos = float(va @ vb) if va is not None and vb is not None else None
        if cos is not None and cal is not None:
            p = float(cal.predict(np.array([cos]))[0])
        else:  # no vectors of the active model to calibrate: the round's own distance
            p = float(np.clip(1.0 - d, 0.0, 1.0))
        why = [PROPOSED_REASON.format(version=version or "?"), f"distance {d:.2f}", f"P(same) {p:.2f}"]
        if cos is not None:
            why.append(f"cosine {cos:.2f}")
        score = float(uncertainty(np.array([p]))[0]) if order == "uncertainty" else p
        out.append({"a": pa, "b": pb, "cosine": cos, "p_same": p, "score": score, "reason": ", ".join(why),
                    "proposed_by": version, "distance": d})
    return out
