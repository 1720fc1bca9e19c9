"""Embeddings of a dataset: embed every sample with a model version, tracklet means, "more like this".

Composes :mod:`core.model.embed` (the network and batched extraction, pure of the database) with
:mod:`core.data.store` (where the vectors live): :func:`embed_dataset` writes
``store.embedding_field(version)`` and ``embed_error``; :func:`tracklet_embeddings`;
:func:`similar`.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from core.data import similarity, store
from core.model.embed import BASE, EmbedError, Progress, embed_paths, onnx_path

log = logging.getLogger(__name__)


ERROR_FIELD = "embed_error"



_WRITE_CHUNK = 4096



def embed_dataset(name: str, version: str | None = None, progress: Progress | None = None,
                  batch_size: int = 64, threads: int = 2, backend: str = "auto",
                  ids: list[str] | None = None, update_index: bool = True) -> dict[str, Any]:
    """Embed every sample of dataset ``name`` with ``version`` (None: the dataset's active model,
    else "base") into ``store.embedding_field(version)``.

    Crops use the config's crop size, samples of kind "image" its image size. A failed sample
    gets ``embed_error`` (its reason) and a ``None`` vector; successes clear ``embed_error``.
    Vectors are written in chunks of 4096 samples; a model with a person-ness head also writes
    each crop's score to ``store.person_field(version)``. Sets the active model when none is set.
    ``ids``: only these samples (a shard of a spread embedding, see :mod:`core.jobs.tasks`);
    ``update_index``: bring the version's similarity index up to date (a shard leaves that to
    the run's last shard: two writers of one index would race).
    Returns {version, field, total, embedded, failed, errors (sample id -> reason, first 100),
    seconds}."""

    t0 = time.perf_counter()
    ds = store.get_dataset(name)
    version = version or store.active_model(name) or BASE
    field = store.embedding_field(version)
    if backend == "onnx":
        onnx_path(version)  # export before the clock of the first batch; raises early
    view = ds if ids is None else ds.select(ids)
    ids, paths, kinds = view.values(["id", "filepath", "kind"]) if len(view) else ([], [], [])
    total = len(ids)
    embedded, failed = 0, 0
    errors_out: dict[str, str] = {}
    done_before = 0
    indexed: dict[str, Any] = {}
    by_kind: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        by_kind.setdefault("image" if k == "image" else "crop", []).append(i)
    for kind, idx in by_kind.items():
        for c0 in range(0, len(idx), _WRITE_CHUNK):
            chunk = idx[c0: c0 + _WRITE_CHUNK]

            def prog(d: int, _t: int, base: int = done_before) -> None:
                if progress is not None:
                    progress(base + d, total)

            vecs, errs, person = embed_paths([paths[i] for i in chunk], version=version, kind=kind,
                                             batch_size=batch_size, threads=threads, progress=prog,
                                             backend=backend, person=True)
            values: dict[str, Any] = {}
            err_values: dict[str, str | None] = {}
            for j, i in enumerate(chunk):
                sid = ids[i]
                if j in errs:
                    values[sid] = None
                    err_values[sid] = errs[j]
                    if len(errors_out) < 100:
                        errors_out[sid] = errs[j]
                else:
                    values[sid] = vecs[j]
                    err_values[sid] = None
            columns = {field: values, ERROR_FIELD: err_values}
            if person is not None and kind == "crop":
                columns[store.person_field(version)] = {
                    ids[i]: (None if j in errs else float(person[j])) for j, i in enumerate(chunk)}
            store.set_columns(name, columns)
            indexed.update(values)
            failed += len(errs)
            embedded += len(chunk) - len(errs)
            done_before += len(chunk)
    if total:  # a default for a fresh dataset; never over an operator's activation meanwhile
        store.set_active_model(name, version, only_if_unset=True)
    if update_index:
        similarity.update(name, version, indexed)  # an index already built takes the new vectors
    seconds = time.perf_counter() - t0
    log.info("embedded %s with %s: %d ok, %d failed in %.1fs", name, version, embedded, failed,
             seconds)
    return {"version": version, "field": field, "total": total, "embedded": embedded,
            "failed": failed, "errors": errors_out, "seconds": seconds}



def refresh_index(name: str, version: str) -> bool:
    """Bring an existing similarity index of ``version`` up to date with every stored vector
    (after a spread embedding, whose shards leave the index alone); False when none is built."""
    cols = store.view_columns(name, [store.embedding_field(version)])
    return similarity.update(name, version, dict(zip(cols["id"], cols[store.embedding_field(version)])))


def _columns(name: str, version: str, fields: list[str], any_of: list[str] | None = None) -> dict:
    out = store.embedded_columns(name, version, fields, any_of=any_of)
    if out is None:
        raise EmbedError(f"dataset {name!r} has no embeddings of model {version!r}; embed first")
    return out


def tracklet_embeddings(name: str, version: str | None = None) -> dict[str, np.ndarray]:
    """Tracklet (clip) embeddings: per value of the ``tracklet`` field, the mean of its crops'
    vectors, re-normalised to unit length. Returns {tracklet: [D] float32}."""
    version = version or store.active_model(name) or BASE
    cols = _columns(name, version, ["tracklet"], any_of=["tracklet"])
    groups: dict[str, list[np.ndarray]] = {}
    for t, v in zip(cols["tracklet"], cols["X"]):
        groups.setdefault(t, []).append(v)
    out = {}
    for t, vs in groups.items():
        m = np.mean(vs, axis=0)
        out[t] = (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)
    return out



RERANK_CANDIDATES = 100  # nearest samples that similar(rerank=True) re-ranks among themselves



def similar(name: str, sample_id: str, k: int = 12, version: str | None = None, rerank: bool = False,
            ) -> list[tuple[str, float]]:
    """"More like this": the ``k`` nearest samples to ``sample_id`` by cosine distance over the
    embeddings of ``version`` (None: the active model), nearest first, itself excluded. The
    neighbours come from the version's persisted similarity index (:mod:`core.data.similarity`,
    built on first use, shared with the worker, the CLI and the FiftyOne App).

    ``rerank``: the :data:`RERANK_CANDIDATES` nearest are re-ordered by k-reciprocal re-ranking
    (core.math.evaluate.k_reciprocal_distances) among themselves and the query, and the distances
    returned are the re-ranked ones (in [0, 1]): crops of the same person from another camera
    that resemble the query only through that person's other crops move up."""
    version = version or store.active_model(name) or BASE
    field = store.embedding_field(version)
    (vec,) = store.view_columns(name, [field], [sample_id])[field] or [None]
    if vec is None:
        raise EmbedError(f"sample {sample_id} has no embedding of model {version!r}")
    try:
        ids, dists, X = similarity.nearest(name, version, np.asarray(vec, np.float32),
                                           max(k + 1, RERANK_CANDIDATES if rerank else 0))
    except store.StoreError as exc:
        raise EmbedError(str(exc)) from exc
    keep = [j for j, s in enumerate(ids) if s != sample_id]
    out = [(ids[j], float(dists[j])) for j in keep]
    if rerank and out:
        from core.math.evaluate import k_reciprocal_distances

        d = k_reciprocal_distances(np.vstack([np.asarray(vec, np.float32), X[keep]]), n_rows=1)[0, 1:]
        out = [(out[o][0], float(d[o])) for o in np.argsort(d, kind="stable")]
    return out[:k]
