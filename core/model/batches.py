"""What a training batch holds: identity-balanced P x K batches (with guaranteed negatives put
together), which identities may be each other's negatives, and the pseudo-identities' cluster
memory. Pure numpy / torch, no database."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class WeightedIdentitySampler:
    """Identity-balanced batches: P identities x K crops, drawn by weight.

    An identity's chance is proportional to the sum of its crops' weights; within an identity,
    crops are drawn proportionally to their weights, without replacement while it has K or more
    (with replacement otherwise). Weighted variant of pytorch-metric-learning's MPerClassSampler.

    ``partners``: class -> classes known to be other people (cannot-links of the identity graph:
    tracklets seen in one frame, an operator's "different"). Every second identity of a batch
    is a partner of the one before it when it has one, so guaranteed negatives (often the
    hardest: same place, same light) meet in a batch for the triplet miner.
    """

    def __init__(self, labels: Sequence[int], weights: Sequence[float], p: int, k: int,
                 partners: dict[int, Sequence[int]] | None = None):
        labels = np.asarray(labels)
        w = np.clip(np.asarray(weights, np.float64), 1e-6, None)
        self.k = k
        self.classes = np.unique(labels)
        self.p = min(p, len(self.classes))
        self.members = [np.nonzero(labels == c)[0] for c in self.classes]
        self.member_p = [w[m] / w[m].sum() for m in self.members]
        cw = np.array([w[m].sum() for m in self.members])
        self.class_p = cw / cw.sum()
        pos = {int(c): i for i, c in enumerate(self.classes)}
        self.partners = {pos[int(c)]: [pos[int(o)] for o in others if int(o) in pos and int(o) != int(c)]
                         for c, others in (partners or {}).items() if int(c) in pos}

    def batch(self, rng: np.random.Generator) -> np.ndarray:
        """Indices [P * K] into the labels, grouped by identity."""
        chosen = rng.choice(len(self.classes), size=self.p, replace=False, p=self.class_p)
        for slot in range(1, len(chosen), 2):
            free = [o for o in self.partners.get(int(chosen[slot - 1]), ()) if o not in chosen]
            if free:
                chosen[slot] = free[int(rng.integers(len(free)))]
        out = []
        for c in chosen:
            m = self.members[c]
            out.append(rng.choice(m, size=self.k, replace=len(m) < self.k, p=self.member_p[c]))
        return np.concatenate(out)


class KnownNegativesMiner:
    """Batch-hard triplets (hardest positive, hardest negative per anchor, as
    pytorch-metric-learning's BatchHardMiner) whose negative is *known* to be another person:
    ``allowed`` [C, C] bool over the labels. Lone tracklets nobody has joined are one person
    each, but two of them seen by different cameras may well be one person: such pairs are not
    negatives (in one camera, or cannot-linked, they are). Anchors without an allowed negative
    in the batch are left out."""

    def __init__(self, allowed) -> None:
        import torch

        self.allowed = torch.as_tensor(allowed, dtype=torch.bool)

    def __call__(self, emb, labels):
        import torch
        import torch.nn.functional as F

        x = F.normalize(emb.detach(), dim=1)
        d = torch.cdist(x, x)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        allowed = self.allowed.to(labels.device)
        pos_d = d.masked_fill(~same | eye, float("-inf"))
        neg_d = d.masked_fill(same | ~allowed[labels][:, labels], float("inf"))
        p, n = pos_d.argmax(1), neg_d.argmin(1)
        ok = torch.isfinite(pos_d.max(1).values) & torch.isfinite(neg_d.min(1).values)
        a = torch.arange(len(labels), device=labels.device)
        return a[ok], p[ok], n[ok]


def known_negatives(train_ids: Sequence[str], cams_of: dict[str, set], open_ids: set[str],
                    cannot: Sequence[tuple[str, str]] = ()) -> np.ndarray | None:
    """[C, C] bool: which identities may serve as each other's negatives (see
    :class:`KnownNegativesMiner`); None when all may (nothing is open)."""
    idx = {x: i for i, x in enumerate(train_ids)}
    is_open = np.array([x in open_ids for x in train_ids])
    if not is_open.any():
        return None
    n = len(train_ids)
    allowed = np.ones((n, n), bool)
    for i, x in enumerate(train_ids):
        for j in range(n):
            if (is_open[i] or is_open[j]) and not (cams_of.get(x, set()) & cams_of.get(train_ids[j], set())):
                allowed[i, j] = False
    for a, b in cannot:
        if a in idx and b in idx:
            allowed[idx[a], idx[b]] = allowed[idx[b], idx[a]] = True
    return allowed


class ClusterMemory:
    """Cluster Contrast's memory (Dai et al. 2021): one unit centroid per pseudo-identity, the
    loss a softmax over all centroids at a low temperature (pytorch-metric-learning's
    NormalizedSoftmaxLoss, its class weights the centroids), the centroids moved toward each
    batch's crops by momentum, not by gradient. ``centroids`` [C, D]."""

    def __init__(self, centroids: np.ndarray, momentum: float, temperature: float, device: str = "cpu") -> None:
        import torch
        from pytorch_metric_learning import losses

        c, d = centroids.shape
        self.loss = losses.NormalizedSoftmaxLoss(num_classes=c, embedding_size=d, temperature=temperature)
        self.loss.W.requires_grad_(False)
        self.loss.W.data = torch.from_numpy(np.ascontiguousarray(centroids.T, np.float32)).to(device)
        self.momentum = momentum

    def __call__(self, emb, labels):
        return self.loss(emb, labels)

    def update(self, emb, labels) -> None:
        """Move each batch identity's centroid toward the mean of its crops, renormalised."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            x = F.normalize(emb.detach(), dim=1)
            w = self.loss.W.data
            for c in labels.unique():
                v = (1 - self.momentum) * w[:, c] + self.momentum * x[labels == c].mean(0)
                w[:, c] = v / v.norm().clamp_min(1e-12)

    def state(self):
        return self.loss.W.data.cpu()


class PseudoLabels:
    """What a round trains on when its identities come from clustering: each node (training
    identity) its pseudo-identity, the P x K sampler over those, the cluster memory, and the
    re-clusterings so far (:meth:`state` / :meth:`restore` make it part of the resumable loop).

    ``node`` [N] each training crop's node; ``weights`` [N]; ``cannot`` node pairs known to be two
    people (the sampler puts them in one batch, the clustering never joins them); ``fixed`` [n]
    True for verified nodes; ``cams`` [N] or None; ``memory`` (weight, momentum, temperature)."""

    def __init__(self, node: np.ndarray, weights: np.ndarray, p: int, k: int, cannot: Sequence[tuple[int, int]],
                 fixed: Sequence[bool], cams: Sequence | None, memory: tuple[float, float, float],
                 device: str = "cpu") -> None:
        self.node, self.weights, self.p, self.k = np.asarray(node), np.asarray(weights), p, k
        self.cannot, self.fixed, self.cams = list(cannot), list(fixed), cams
        self.memory_weight, self.momentum, self.temperature = memory
        self.device = device
        self.labels: np.ndarray | None = None  # [n] pseudo-identity of each node
        self.memory: ClusterMemory | None = None
        self.proposals: list[tuple[int, int, float]] = []
        self.reclusters: list[dict] = []

    def set(self, labels: np.ndarray, centroids: np.ndarray) -> None:
        """Train on ``labels`` [n] from now on, the memory starting at ``centroids`` [C, D]."""
        self.labels = np.asarray(labels, np.int64)
        partners: dict[int, list[int]] = {}
        for a, b in self.cannot:
            partners.setdefault(int(self.labels[a]), []).append(int(self.labels[b]))
            partners.setdefault(int(self.labels[b]), []).append(int(self.labels[a]))
        self.sampler = WeightedIdentitySampler(self.labels[self.node], self.weights, self.p, self.k, partners)
        self.memory = (ClusterMemory(centroids, self.momentum, self.temperature, self.device)
                       if self.memory_weight > 0 else None)

    def recluster(self, emb: np.ndarray, step: int, method: str, eps: float):
        """Pseudo-identities from the crops' current vectors ``emb`` [N, D] (core.math.pseudo)."""
        from core.math import pseudo
        from core.math.pair_select import component_vectors

        n = len(self.fixed)
        cl = pseudo.pseudo_identities(emb, self.node, n, self.cams, self.cannot, self.fixed, method, eps)
        self.set(cl.labels, component_vectors(emb, cl.labels[self.node], cl.n_labels))
        self.proposals = cl.proposals
        self.reclusters.append({"step": step, "nodes": n, "clusters": cl.clusters,
                                "merged_nodes": cl.merged_nodes, "vetoed": cl.vetoed})
        return cl

    def crop_labels(self, idx: np.ndarray) -> np.ndarray:
        return self.labels[self.node[idx]]

    def loss(self, emb, labels):
        """The weighted memory loss (0 without a memory)."""
        return 0.0 if self.memory is None else self.memory_weight * self.memory(emb, labels)

    def update(self, emb, labels) -> None:
        if self.memory is not None:
            self.memory.update(emb, labels)

    def state(self) -> dict | None:
        if self.labels is None:
            return None
        return {"labels": self.labels.tolist(), "reclusters": self.reclusters,
                "memory": None if self.memory is None else self.memory.state(),
                "proposals": [[int(a), int(b), float(d)] for a, b, d in self.proposals]}

    def restore(self, state: dict, emb_dim: int) -> None:
        mem = state["memory"]
        self.set(np.asarray(state["labels"], np.int64),
                 mem.numpy().T if mem is not None else np.zeros((1, emb_dim), np.float32))
        self.reclusters = list(state["reclusters"])
        self.proposals = [tuple(p) for p in state["proposals"]]
