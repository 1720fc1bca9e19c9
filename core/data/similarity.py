"""One similarity index per model version, through FiftyOne Brain (``compute_similarity``).

The index of version V of dataset D is the brain run :func:`brain_key` (V) on D over V's
embedding field, so FiftyOne's own tools (``sort_by_similarity``, the App's similarity search)
use the same index as Vigil. It is built on first use, persisted, and kept current by
:func:`update` when a version is re-embedded (the new vectors are added, failed ones removed:
nothing else is recomputed).

Backend: ``VIGIL_SIMILARITY_URI``. Unset, or a folder: **LanceDB** tables under
``<data root>/similarity`` (embedded, files on disk, any number of processes read and write
them). ``http://``, ``https://`` or ``tcp://``: a **Milvus** server (standalone or cluster),
for sites past one machine. Milvus Lite (a local ``.db`` file) serves offline too, but takes an
exclusive lock on its file for as long as a process holds it, so the app, the worker and the CLI
could not share it (checked: a second process gets "Open local milvus failed"); hence LanceDB
for the embedded default.

Each lookup opens the index afresh (milliseconds): another process may have updated it since.
FiftyOne finds the backend's address in ``FIFTYONE_BRAIN_SIMILARITY_<BACKEND>_URI``, which
:func:`core.config.apply_fiftyone_env` sets from :func:`uri` (the App launched from Vigil too).
"""
from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np

from core.config import settings, similarity_backend as backend, similarity_uri as uri  # noqa: F401  (where, and which)
from core.data import store


BUILD_GRACE_S = 600  # a run without results younger than this is another process's build under way


def brain_key(version: str) -> str:
    """The brain run holding ``version``'s index (``sim_`` + the embedding field's slug)."""
    return "sim_" + store.embedding_field(version)[len("emb_"):]


def _table_name(name: str, version: str) -> str:
    """The prefix of the tables (LanceDB) or collections (Milvus: letters, digits, underscores)
    of dataset ``name``'s ``version``: the database's name too, since several databases may share
    one data root or one Milvus server. Each build adds its own suffix (:func:`index`)."""
    return "vigil_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{settings().db_name}__{name}__{version}")


def index(name: str, version: str, build: bool = True):
    """The ``fiftyone.brain.SimilarityIndex`` of ``version`` on dataset ``name``: loaded when
    it exists, else built from the version's embedding field (``build``; None without it).
    Raises :class:`core.data.store.StoreError` when the dataset has no embeddings of ``version``."""
    import fiftyone.brain as fob

    ds = store.get_dataset(name)
    key = brain_key(version)
    if key in ds.list_brain_runs():
        found = ds.load_brain_results(key, cache=False)
        if found is not None:
            return found
        # a run without results is being built by another process, or its build failed or was
        # killed midway: then it is built again
        age = (datetime.now(timezone.utc).replace(tzinfo=None) - ds.get_brain_info(key).timestamp).total_seconds()
        if age < BUILD_GRACE_S:
            raise store.StoreError(f"the similarity index of {version!r} in {name!r} is being built by "
                                   "another process: try again in a minute")
        ds.delete_brain_run(key)
    if not build:
        return None
    field = store.embedding_field(version)
    if field not in ds.get_field_schema() or not ds.exists(field).count():
        raise store.StoreError(f"no embeddings of model {version!r} in {name!r}: embed the dataset first")
    # a fresh table per build: a table left by a failed build is never appended to
    table = f"{_table_name(name, version)}__{uuid.uuid4().hex[:8]}"
    kw = {"table_name" if backend() == "lancedb" else "collection_name": table}
    try:
        return fob.compute_similarity(ds.exists(field), embeddings=field, backend=backend(), brain_key=key,
                                      metric="cosine", progress=False, **kw)
    except ValueError:
        ds.reload()
        found = ds.load_brain_results(key, cache=False) if key in ds.list_brain_runs() else None
        if found is not None:  # another process built it meanwhile
            return found
        raise


def update(name: str, version: str, vectors: dict[str, Any]) -> bool:
    """Bring an existing index of ``version`` up to date with ``{sample id: vector or None}``
    (None: the sample has no vector any more, it leaves the index). An index not built yet is
    left to its first use; returns whether one was updated."""
    idx = index(name, version, build=False)
    if idx is None:
        return False
    keep = {s: v for s, v in vectors.items() if v is not None}
    # out first, then in: FiftyOne's LanceDB backend appends an "overwritten" id a second time
    idx.remove_from_index(sample_ids=list(vectors), allow_missing=True)
    if keep:
        idx.add_to_index(np.stack([np.asarray(v, np.float32) for v in keep.values()]), list(keep))
    return True


def nearest(name: str, version: str, vector: np.ndarray, k: int,
            build: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The ``k`` samples nearest to ``vector`` in ``version``'s index, nearest first: their ids,
    cosine distances float32 [k] and stored vectors float32 [k, D] (the distances come from
    those vectors, which callers may re-rank with). Without ``build``, an index not built yet
    raises :class:`core.data.store.StoreError` instead of being built."""
    idx = index(name, version, build=build)
    if idx is None:
        raise store.StoreError(f"no similarity index of {version!r} in {name!r} yet")
    k = int(min(k, idx.total_index_size))
    if k <= 0:
        return [], np.zeros(0, np.float32), np.zeros((0, len(vector)), np.float32)
    q = np.asarray(vector, np.float32)
    ids, vecs = idx.sort_by_similarity(q, k=k).values(["id", store.embedding_field(version)])
    X = np.stack([np.asarray(v, np.float32) for v in vecs])
    cos = (X @ q) / np.maximum(np.linalg.norm(X, axis=1) * np.linalg.norm(q), 1e-12)
    return [str(s) for s in ids], np.maximum(0.0, 1.0 - cos).astype(np.float32), X
