"""The active model's vectors of a dataset: how many samples have them, all of them with
chosen fields (queue computation, kNN predictions), and one sample's."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from core.data import store
from core.services.labeling.base import LabelingError


def embedding_status(name: str) -> dict[str, Any]:
    """{version, field, embedded, total}: how many samples have vectors of the active model."""
    ds = store.get_dataset(name)
    version = store.active_model(name)
    total = len(ds)
    if not version:
        return {"version": None, "field": None, "embedded": 0, "total": total}
    f = store.embedding_field(version)
    n = ds.exists(f).count() if f in ds.get_field_schema() else 0
    return {"version": version, "field": f, "embedded": n, "total": total}


def _load(name: str, fields: Sequence[str], labelled_only: str | None = None) -> dict[str, Any]:
    """ids, X float32 [N, D] (active model) and ``fields`` of every embedded sample.
    ``labelled_only``: "verify" keeps samples with ``labelled_by``; "trust" those with the
    target value or ``labelled_by`` (target passed through ``fields[0]``)."""
    version = store.active_model(name)
    if not version:
        raise LabelingError(f"dataset {name!r} has no embeddings yet: embed it first (Map or Annotate page)")
    any_of = {"verify": ["labelled_by"], "trust": ["labelled_by", fields[0]]}.get(labelled_only or "")
    out = store.embedded_columns(name, version, list(fields), any_of=any_of)
    if out is None:
        raise LabelingError(f"dataset {name!r} has no embeddings of model {version!r}: embed it first")
    out["version"] = version
    return out


def _labelled_vectors(name: str, target: str, mode: str) -> tuple[list[str], np.ndarray, list[Any]]:
    data = _load(name, [target, "labelled_by"], labelled_only=mode)
    vals = data.get(target) or [None] * len(data["id"])
    keep = [i for i, v in enumerate(vals) if v is not None]
    return [data["id"][i] for i in keep], data["X"][keep] if keep else np.zeros((0, 1), np.float32), [vals[i] for i in keep]


def _vector(name: str, sample_id: str) -> np.ndarray | None:
    """The active model's vector of one sample (float32 [D]), None when it has none."""
    version = store.active_model(name)
    if not version:
        return None
    ds = store.get_dataset(name)
    ef = store.embedding_field(version)
    if ef not in ds.get_field_schema():
        return None
    vals = ds.select([sample_id]).values(ef)
    if not vals or vals[0] is None:
        return None
    return np.asarray(vals[0], np.float32)
