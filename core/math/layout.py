"""Embedding map layout: PCA -> UMAP 2-D layouts, stable across model versions (pure: numpy,
scikit-learn, umap-learn). :func:`layout`, :func:`place`, :func:`align_to`,
:func:`knn_preservation`; cached per model version in the dataset by
:mod:`core.services.projection`.

How a layout is made (chosen by measurement, see ``benchmarks/map_scale.py``):

1. PCA to ``pca_dims`` (fitted on at most 20k rows, applied to all).
2. Landmarks: at most ``n_landmarks`` rows (seeded choice; all rows when N is small). Exact kNN
   among them (:func:`core.math.neighbours.topk`, faiss brute force in PCA space: deterministic
   and fast at this size), then umap-learn with that precomputed kNN. With a previous layout
   (``init``) UMAP starts from it and runs fewer, gentler epochs, so clusters stay where the
   operator last saw them. (AlignedUMAP keeps
   points a little closer but refits every version: 68 s warm for 2 x 4,000 points against
   3 s here, and it cannot reach 100k.)
3. The other rows are placed at the distance-weighted mean of their nearest landmarks' 2-D
   positions (the same exact kNN in PCA space), where ``umap.transform`` would rebuild a search
   index and run a further optimisation.
4. With ``init``, the result is mapped back onto the previous frame by a least-squares affine
   map fitted on the rows that had a previous position (UMAP rescales its start per axis).

Deterministic for a given seed (UMAP then runs its single-threaded optimiser).

The kNN was a hand-written numba kernel (float32 norms expanded: distances off by up to 1e-3)
until issue 17; faiss is exact to 5e-8 on the same PCA rows and gave the same maps on real
crops (map_scale's distinct vectors: trustworthiness 0.985 / 0.984 at 10k, 0.976 / 0.977 at
100k; same-person 10-NN 0.547 / 0.549 and 0.325 / 0.329; 100k laid out in 8.0 s against
10.4 s). On the test blobs both keep every 2-D neighbour in its blob over seeds 0-11, and the
closest points of two blobs stay 14-56x (kernel 19-54x) the median own-blob neighbour distance
apart.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

import numpy as np

from core.math.neighbours import topk

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]

PCA_FIT_ROWS = 20_000
N_LANDMARKS = 15_000
PLACE_K = 8


def _report(progress: Progress | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, float(fraction))


def pca_reduce(X: np.ndarray, dims: int = 50, seed: int = 0, fit_rows: int = PCA_FIT_ROWS) -> np.ndarray:
    """PCA of X float32 [N, D] to float32 [N, min(dims, D, N)] (fitted on at most ``fit_rows``)."""
    from sklearn.decomposition import PCA

    n, d = X.shape
    k = min(dims, d, n)
    if k >= d:
        return np.ascontiguousarray(X - X.mean(0), dtype=np.float32)
    rng = np.random.default_rng(seed)
    fit = X if n <= fit_rows else X[np.sort(rng.choice(n, fit_rows, replace=False))]
    with np.errstate(invalid="ignore", divide="ignore"):  # constant data: 0/0 variance ratio
        pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(fit)
    out = np.empty((n, k), dtype=np.float32)
    for s in range(0, n, 50_000):  # chunked: no float64 copy of a 100k x 1280 matrix
        out[s : s + 50_000] = pca.transform(X[s : s + 50_000])
    return out


def place(query: np.ndarray, ref: np.ndarray, ref_xy: np.ndarray, k: int = PLACE_K) -> np.ndarray:
    """2-D positions float32 [Q, 2] for ``query`` [Q, d]: the distance-weighted mean of the
    positions ``ref_xy`` [R, 2] of their k nearest ``ref`` [R, d] rows."""
    if len(query) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    idx, dist = topk(query, ref, k, metric="l2")
    # weights: a Gaussian on the distance relative to the nearest one (sharp, scale free)
    scale = np.maximum(dist[:, :1], 1e-6)
    w = np.exp(-((dist / scale) ** 2 - 1.0) / 2.0) if k > 1 else np.ones_like(dist)
    w /= w.sum(1, keepdims=True)
    return (w[:, :, None] * ref_xy[idx]).sum(1).astype(np.float32)


def align_to(Y: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Y [N, 2] mapped by the least-squares affine transform onto ``target`` [N, 2], fitted on
    the rows where target is finite (undoes UMAP's per-axis rescaling of its start layout)."""
    ok = np.isfinite(target).all(1)
    if ok.sum() < 3:
        return Y
    A = np.hstack([Y.astype(np.float64), np.ones((len(Y), 1))])
    M, *_ = np.linalg.lstsq(A[ok], target[ok].astype(np.float64), rcond=None)
    return (A @ M).astype(np.float32)


def fill_init(Z: np.ndarray, init: np.ndarray, k: int = PLACE_K) -> tuple[np.ndarray, np.ndarray]:
    """Previous positions ``init`` [N, 2] with NaN rows (new samples) filled from their nearest
    rows that have a position (kNN in the feature space Z [N, d]). Returns (filled, had_init)."""
    init = np.asarray(init, dtype=np.float32)
    ok = np.isfinite(init).all(1)
    out = init.copy()
    if (~ok).any():
        out[~ok] = place(Z[~ok], Z[ok], init[ok], k=k)
    return out, ok


def layout(
    X: np.ndarray,
    init: np.ndarray | None = None,
    pca_dims: int = 50,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    n_landmarks: int = N_LANDMARKS,
    n_epochs: int | None = None,
    init_learning_rate: float = 0.2,
    min_init_share: float = 0.2,
) -> np.ndarray:
    """2-D map float32 [N, 2] of embeddings X float32 [N, D] (PCA -> UMAP on landmarks -> place).

    ``init`` float32 [N, 2]: the previous layout of the same rows (NaN rows for new samples).
    When at least ``min_init_share`` of the rows have a previous position, UMAP starts from it
    (new rows filled from their nearest old neighbours), runs fewer epochs, and the result is
    mapped back onto the previous frame, so unchanged samples stay near where they were. The
    refinement from ``init`` runs 60 epochs at learning rate 0.2 (measured on blobs whose 15 %
    changed: untouched points move 4 % of the map's extent against 7.5 % at UMAP's default
    100 epochs x 1.0 and 30-40 % for a fresh layout, while the changed points still separate and
    kNN preservation equals a fresh layout's).
    ``progress(stage, fraction)`` is called with stages pca, neighbors, umap, place, done.
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"layout expects a [N, D] array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("layout: embeddings contain NaN or inf; re-embed the failed samples")
    n = len(X)
    if init is not None:
        init = np.asarray(init, dtype=np.float32)
        if init.shape != (n, 2):
            raise ValueError(f"init must be [N, 2] = [{n}, 2], got {init.shape}")
    if n == 0:
        return np.zeros((0, 2), dtype=np.float32)

    _report(progress, "pca", 0.0)
    Z = pca_reduce(X, pca_dims, seed)
    _report(progress, "pca", 1.0)

    use_init = init is not None and np.isfinite(init).all(1).mean() >= min_init_share
    start = None
    if use_init:
        start, _ = fill_init(Z, init)

    if n <= max(n_neighbors + 2, 8):  # too few rows for UMAP: PCA plane (or the previous map)
        Y = start if start is not None else _pca2(Z)
        _report(progress, "done", 1.0)
        return np.asarray(Y, dtype=np.float32)

    rng = np.random.default_rng(seed)
    lm = np.arange(n) if n <= n_landmarks else np.sort(rng.choice(n, n_landmarks, replace=False))
    Zl = Z[lm]

    _report(progress, "neighbors", 0.0)
    k = min(n_neighbors, len(lm) - 1)
    nn_i, nn_d = topk(Zl, Zl, k - 1, metric="l2", exclude_self=True)
    nn_i = np.hstack([np.arange(len(lm))[:, None], nn_i])  # umap expects self first
    nn_d = np.hstack([np.zeros((len(lm), 1), np.float32), nn_d])
    _report(progress, "neighbors", 1.0)

    epochs = n_epochs or (200 if start is None else 60)
    lr = 1.0 if start is None else init_learning_rate
    Yl = _umap(Zl, nn_i, nn_d, k, min_dist, seed, epochs, lr, None if start is None else start[lm], progress)

    _report(progress, "place", 0.0)
    Y = np.empty((n, 2), dtype=np.float32)
    Y[lm] = Yl
    rest = np.setdiff1d(np.arange(n), lm, assume_unique=True)
    for s in range(0, len(rest), 20_000):
        chunk = rest[s : s + 20_000]
        Y[chunk] = place(Z[chunk], Zl, Yl)
        _report(progress, "place", (s + len(chunk)) / max(1, len(rest)))
    if use_init:
        Y = align_to(Y, init)
    _report(progress, "done", 1.0)
    return Y


def _pca2(Z: np.ndarray) -> np.ndarray:
    Y = np.zeros((len(Z), 2), dtype=np.float32)
    if len(Z) > 1:
        u, s, _ = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
        m = min(2, len(s))
        Y[:, :m] = u[:, :m] * s[:m]
    return Y


def _umap(Z, nn_i, nn_d, k, min_dist, seed, epochs, lr, start, progress) -> np.ndarray:
    import warnings

    import umap

    _report(progress, "umap", 0.0)

    class _EpochFile:  # umap reports epochs through tqdm; bar_format "{n}/{total}" lands here
        def write(self, text: str) -> None:
            m = re.search(r"(\d+)/(\d+)", text)
            if m and int(m.group(2)):
                _report(progress, "umap", int(m.group(1)) / int(m.group(2)))

        def flush(self) -> None:
            pass

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=k,
        min_dist=min_dist,
        random_state=seed,
        n_epochs=epochs,
        learning_rate=lr,
        init="spectral" if start is None else start,
        precomputed_knn=(nn_i, nn_d),
        low_memory=True,
        verbose=False,
        tqdm_kwds={"disable": progress is None, "file": _EpochFile(), "bar_format": "{n}/{total}",
                   "mininterval": 0.5},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state; precomputed knn
        Y = reducer.fit_transform(Z)
    _report(progress, "umap", 1.0)
    return np.asarray(Y, dtype=np.float32)


def knn_preservation(X: np.ndarray, Y: np.ndarray, k: int = 10, sample: int = 2000, seed: int = 0) -> float:
    """Mean share of each sampled row's k nearest neighbours in X [N, D] that are also among
    its k nearest in Y [N, 2] (1.0 = local structure fully kept)."""
    rng = np.random.default_rng(seed)
    q = rng.choice(len(X), min(sample, len(X)), replace=False)
    hi, _ = topk(X[q], X, k + 1, metric="l2")
    lo, _ = topk(Y[q], Y, k + 1, metric="l2")
    hits = [len(set(a[1:]) & set(b[1:])) / k for a, b in zip(hi, lo)]
    return float(np.mean(hits))
