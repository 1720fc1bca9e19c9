"""Pseudo-identities from unlabelled footage: tracklets joined across cameras (as SpCL / Cluster
Contrast cluster unlabelled crops) under the identity graph's constraints. Pure numpy /
scikit-learn, tested on arrays.

    crop vectors of the current model -> each camera's mean removed (camera_centred)
      -> one unit vector per node (a lone tracklet, or an identity the operator verified)
      -> candidate links: ``mutual`` (default) nodes that are each other's nearest node in the
         other camera, cosine distance under eps; or ``dbscan`` (SpCL): DBSCAN over k-reciprocal
         Jaccard distances (core.math.evaluate's re-ranking, lambda 0)
      -> links applied shortest first (Kruskal) except those that would join two nodes known to
         be two people (a cannot-link: tracklets in one frame, an operator's "different"; or two
         verified identities)
      -> a label per node; a node no link reaches stays its own pseudo-identity.

The links applied are the round's proposed merges, most confident (shortest) first: the pair
queue asks the operator about them.

Why ``mutual`` is the default (campus62 *train* split, 124 per-camera tracklets of 62 people,
packaged model, pairs of tracklets put together: precision / recall): SpCL's recipe, DBSCAN on
k-reciprocal Jaccard distances between tracklets, reached 0.33 / 0.21 at best (k1 4-20, eps
0.3-0.9; 0.01 / 1.0 once eps lets it chain) and on crops (k1 20/30, node distance the mean) 0.50 /
0.13: inside one camera every tracklet looks alike (light, background), so the reciprocal
neighbourhoods are one camera's and chain it together. Mutual nearest neighbours across cameras
on camera-centred vectors: 0.84 / 0.34 at eps 0.5, 0.89 / 0.52 at 0.6, 0.88 / 0.56 at 0.7+.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.math.evaluate import k_reciprocal_distances
from core.math.graph import IdentityGraph, Link
from core.math.pair_select import camera_centred, component_vectors


@dataclass
class Clustering:
    """``labels`` [N] pseudo-identity per node (0 .. n_labels-1; a node alone keeps its own);
    ``proposals`` (i, j, distance) node pairs the clustering joined, shortest first; ``vetoed``:
    links refused because the two sides are known to be two people."""

    labels: np.ndarray
    proposals: list[tuple[int, int, float]] = field(default_factory=list)
    vetoed: int = 0

    @property
    def n_labels(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def merged_nodes(self) -> int:
        """Nodes that share their pseudo-identity with another node."""
        _, counts = np.unique(self.labels, return_counts=True)
        return int(counts[counts > 1].sum())

    @property
    def clusters(self) -> int:
        """Pseudo-identities of two or more nodes."""
        _, counts = np.unique(self.labels, return_counts=True)
        return int((counts > 1).sum())


def node_vectors(x: np.ndarray, node: np.ndarray, cams: Sequence | None, n_nodes: int) -> np.ndarray:
    """[n_nodes, D] unit mean of each node's crops after removing each camera's mean look.
    ``x`` [N, D] crop vectors, ``node`` [N] node index of each crop, ``cams`` [N] or None."""
    if cams is not None and len({str(c) for c in cams}) > 1:
        x = camera_centred(x, cams)
    return component_vectors(x, node, n_nodes)


def jaccard_distances(v: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """[N, N] symmetric k-reciprocal Jaccard distances between unit rows ``v`` (0 on the
    diagonal). ``k1`` is capped below N so a small set still has reciprocal neighbours."""
    n = len(v)
    k1 = max(1, min(k1, n - 1))
    k2 = max(1, min(k2, k1))
    d = k_reciprocal_distances(v, k1=k1, k2=k2, lambda_value=0.0).astype(np.float64)
    d = np.clip((d + d.T) / 2, 0.0, 1.0)
    np.fill_diagonal(d, 0.0)
    return d


METHODS = ("mutual", "dbscan")


def pseudo_identities(
    x: np.ndarray,
    node: np.ndarray,
    n_nodes: int,
    cams: Sequence | None = None,
    cannot: Iterable[tuple[int, int]] = (),
    fixed: Sequence[bool] | None = None,
    method: str = "mutual",
    eps: float = 0.6,
) -> Clustering:
    """Pseudo-identity of each of ``n_nodes`` nodes from crop vectors ``x`` [N, D] (``node`` [N]
    each crop's node, ``cams`` [N] each crop's camera or None). See the module docstring."""
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; use one of {METHODS}")
    node = np.asarray(node, np.int64)
    v = node_vectors(x, node, cams, n_nodes)
    if method == "dbscan":
        links = dbscan_links(jaccard_distances(v, 20, 6), eps)
    else:
        node_cam = [""] * n_nodes  # a node's camera; a verified identity seen by several: its main one
        if cams is not None:
            votes: dict[int, Counter] = {}
            for k, c in zip(node.tolist(), cams):
                votes.setdefault(k, Counter())[str(c)] += 1
            for k, vs in votes.items():
                node_cam[k] = vs.most_common(1)[0][0]
        links = mutual_links(cosine_distances(v), node_cam, eps)
    return cluster(n_nodes, links, cannot, fixed)


def cosine_distances(v: np.ndarray) -> np.ndarray:
    """[N, N] 1 - cosine similarity of unit rows ``v`` (float32: N tracklets take 4 N^2 bytes)."""
    d = 1.0 - v.astype(np.float32) @ v.T.astype(np.float32)
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, 2.0)


def mutual_links(dist: np.ndarray, cams: Sequence, eps: float) -> list[tuple[int, int, float]]:
    """Candidate links across cameras: for every two cameras, the node pairs that are each
    other's nearest node in the other camera, closer than ``eps``. Nodes of one camera are never
    linked directly (a person seen twice by one camera joins through another camera or an
    answer); with one camera (or none known), mutual nearest neighbours over all nodes."""
    cams = np.array([str(c) for c in cams], dtype=object)
    groups = [np.nonzero(cams == c)[0] for c in np.unique(cams)]
    one = len(groups) < 2
    pairs = [(np.arange(len(dist)),) * 2] if one else [
        (groups[i], groups[j]) for i in range(len(groups)) for j in range(i + 1, len(groups))]
    links = set()
    for a, b in pairs:
        sub = dist[np.ix_(a, b)].astype(np.float64)
        if one:
            np.fill_diagonal(sub, np.inf)
        if min(sub.shape) == 0 or (one and len(a) < 2):
            continue
        ab, ba = sub.argmin(1), sub.argmin(0)
        for i, j in enumerate(ab):
            if ba[j] == i and sub[i, j] < eps:
                links.add((int(min(a[i], b[j])), int(max(a[i], b[j])), float(sub[i, j])))
    return sorted(links, key=lambda t: (t[2], t[0], t[1]))


def dbscan_links(dist: np.ndarray, eps: float, min_samples: int = 2) -> list[tuple[int, int, float]]:
    """Candidate links of SpCL / Cluster Contrast: DBSCAN (scikit-learn) on precomputed
    distances, then every pair of nodes inside one of its clusters (the constrained union keeps
    their minimum spanning tree)."""
    from sklearn.cluster import DBSCAN

    raw = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dist)
    links = []
    for c in set(raw.tolist()) - {-1}:
        m = np.nonzero(raw == c)[0]
        iu, ju = np.triu_indices(len(m), 1)
        links += [(int(m[i]), int(m[j]), float(dist[m[i], m[j]])) for i, j in zip(iu, ju)]
    return sorted(links, key=lambda t: (t[2], t[0], t[1]))


def cluster(
    n: int,
    links: Iterable[tuple[int, int, float]],
    cannot: Iterable[tuple[int, int]] = (),
    fixed: Sequence[bool] | None = None,
) -> Clustering:
    """Pseudo-identities of ``n`` nodes: ``links`` (i, j, distance) applied shortest first
    (Kruskal) unless the two sides are known to be two people: a ``cannot`` pair between them,
    or a verified node (``fixed`` [n] True) on each side (distinct verified identities are
    distinct people). Nodes no link reaches keep a pseudo-identity of their own."""
    g = IdentityGraph(str(i) for i in range(n))
    for a, b in cannot:
        if a != b:
            g.link(Link(str(a), str(b), False, "frame"))
    verified = set() if fixed is None else {str(i) for i, f in enumerate(fixed) if f}
    has_fixed = {i: True for i in verified}  # root -> its component holds a verified node
    proposals, vetoed = [], 0
    for a, b, d in sorted(links, key=lambda t: (t[2], t[0], t[1])):
        ra, rb = g.find(str(a)), g.find(str(b))
        if ra == rb:
            continue
        if has_fixed.get(ra) and has_fixed.get(rb):
            vetoed += 1
            continue
        if g.link(Link(str(a), str(b), True, "tracklet"), record=False) is not None:
            vetoed += 1
            continue
        if has_fixed.pop(ra, False) | has_fixed.pop(rb, False):
            has_fixed[g.find(str(a))] = True
        proposals.append((int(a), int(b), float(d)))
    labels = np.zeros(n, np.int64)
    for k, comp in enumerate(g.components()):
        for s in comp:
            labels[int(s)] = k
    return Clustering(labels, proposals, vetoed)
