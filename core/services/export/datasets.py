"""Dataset export with FiftyOne's own exporters (see :mod:`core.services.export`)."""
from __future__ import annotations

import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np


from core.data import exporters
from core.math.conditions import CONDITION_TAGS
from core.services.export.base import (ExportError, FORMATS, MANIFEST_COLUMNS, Progress, _noop, _staged, _write_json, dataset_export_name, safe_export_path)

log = logging.getLogger(__name__)


# --- dataset export ------------------------------------------------------------------------


def export_dataset(name: str, fmt: str = "fiftyone", out_name: str | None = None, *,
                   view=None, ids: Sequence[str] | None = None,
                   filters: dict[str, Any] | None = None, tags: Sequence[str] | None = None,
                   saved_view: str | None = None, by: str = "identity",
                   include_embeddings: str | None = None, max_frames: int | None = None,
                   frame_step: int = 1, overwrite: bool = False,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Export a view of dataset ``name`` in format ``fmt`` (see the module doc) to
    ``exports_dir/out_name`` (default ``NAME-FMT-YYYYmmdd-HHMMSS``).

    The view is ``view``, or the dataset narrowed by ``ids`` / ``filters`` / ``tags`` /
    ``saved_view``. ``by`` picks the class field of a classification tree ("identity" or
    "label"). ``include_embeddings``: a model version whose vectors go along (fiftyone,
    manifest). ``max_frames`` / ``frame_step`` limit COCO frames. Returns
    ``{path, format, count, skipped, ...}`` (per format: classes, frames, boxes, files)."""
    from core.data import store

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    progress = progress or _noop
    final = safe_export_path(out_name or dataset_export_name(name, fmt))
    v = exporters.resolve_view(name, ids=ids, filters=filters, tags=tags, saved_view=saved_view, view=view)
    emb_field = None
    if include_embeddings:
        emb_field = store.embedding_field(include_embeddings)
        if emb_field not in v.get_field_schema():
            raise ExportError(f"dataset {name!r} has no embeddings of model "
                              f"{include_embeddings!r}: embed it with that version first")
    t0 = time.perf_counter()
    with _staged(final, overwrite) as tmp:
        if fmt == "fiftyone":
            rep = exporters.export_fiftyone(v, tmp, emb_field, progress)
        elif fmt == "classification-tree":
            rep = exporters.export_tree(v, tmp, by, progress)
        elif fmt == "coco":
            rep = exporters.export_coco(name, v, tmp, max_frames, frame_step, progress)
        else:
            rep = _export_manifest(name, v, tmp, include_embeddings, emb_field, progress)
        rep.update({"format": fmt, "dataset": name, "embeddings": include_embeddings,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "filters": filters or {}, "tags": list(tags or []), "saved_view": saved_view})
        _write_json(tmp / "export.json", rep)
    rep["path"] = str(final)
    rep["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("exported %s (%s, %d items) to %s", name, fmt, rep["count"], final)
    return rep


def manifest_rows(name: str, view) -> list[dict[str, Any]]:
    """One plain dict per sample of ``view`` with :data:`MANIFEST_COLUMNS` (missing fields are
    ``None``; ``tags`` and ``condition_tags`` are lists; datetimes ISO strings)."""
    from core.data import store

    schema = view.get_field_schema()
    want = ["id", "filepath", "tags", *[c for c in MANIFEST_COLUMNS
                                        if c not in ("id", "path", "tags", "condition_tags",
                                                     "model_version")]]
    have = [f for f in want if f in schema or f in ("id", "filepath", "tags")]
    n = len(view)
    vals = dict(zip(have, view.values(have))) if n else {f: [] for f in have}
    active = store.active_model(name)
    rows = []
    for i in range(n):
        r: dict[str, Any] = {}
        for c in MANIFEST_COLUMNS:
            if c == "path":
                r[c] = vals["filepath"][i]
            elif c == "tags":
                r[c] = list(vals["tags"][i] or [])
            elif c == "condition_tags":
                r[c] = [t for t in (vals["tags"][i] or []) if t in CONDITION_TAGS]
            elif c == "model_version":
                r[c] = active
            else:
                v = vals[c][i] if c in vals else None
                r[c] = v.isoformat() if isinstance(v, datetime) else v
        rows.append(r)
    return rows


def _export_manifest(name: str, view, out: Path, version: str | None, emb_field: str | None,
                     progress: Progress) -> dict:
    import pandas as pd

    n = len(view)
    progress(0, n, "reading fields")
    rows = manifest_rows(name, view)
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    if n:
        df.to_parquet(out / "manifest.parquet", index=False)
    else:  # an empty object column has no Parquet type: write strings
        df.astype("string").to_parquet(out / "manifest.parquet", index=False)
    csv = df.copy()
    for c in ("tags", "condition_tags"):
        csv[c] = csv[c].map(lambda x: ";".join(x) if isinstance(x, list) else "")
    csv.to_csv(out / "manifest.csv", index=False)
    files = ["manifest.csv", "manifest.parquet"]
    dim = None
    if emb_field:
        ids = list(df["id"])
        vecs = dict(zip(*view.values(["id", emb_field]))) if n else {}
        dim = next((len(v) for v in vecs.values() if v is not None), 0)
        arr = np.full((n, dim), np.nan, dtype=np.float32)
        for i, sid in enumerate(ids):
            if vecs.get(sid) is not None:
                arr[i] = np.asarray(vecs[sid], dtype=np.float32)
        stem = f"embeddings_{re.sub(r'[^A-Za-z0-9_.-]', '_', version)}"
        np.save(out / f"{stem}.npy", arr)
        (out / f"{stem}.ids.txt").write_text("\n".join(ids) + ("\n" if ids else ""))
        files += [f"{stem}.npy", f"{stem}.ids.txt"]
    progress(n, n, "done")
    return {"count": n, "skipped": 0, "files": files, "embedding_dim": dim}


