"""Export: curated datasets in standard formats and verified ONNX models for the edge.

Everything is written under ``settings().exports_dir`` and nowhere else:

- :func:`safe_export_path` turns an operator-given folder name into a path inside the export
  root and refuses anything that escapes it (``..``, an absolute path elsewhere, a symlink that
  points out, an empty name).
- Each export is written into a temporary sibling folder (``.NAME.tmp-*``) and renamed into
  place when complete, so a failed or killed export leaves no half folder under its name.

Dataset formats (:func:`export_dataset`), all with FiftyOne's own exporters:

==========================  ==================================================================
``fiftyone``                ``fo.types.FiftyOneDataset``: media, every field, tags, labelling
                            fields; embeddings only of the chosen model version
``classification-tree``     ``ImageClassificationDirectoryTree``: ``<class>/<image>`` by the
                            ``label`` or ``identity`` field (unlabelled samples are skipped)
``coco``                    ``COCODetectionDataset`` of video frames with person boxes (the
                            companion ``NAME__videos`` dataset), frames decoded with OpenCV
``manifest``                ``manifest.csv`` + ``manifest.parquet`` (one row per sample), plus
                            ``embeddings_<version>.npy`` [N, D] in manifest row order
==========================  ==================================================================

Model export (:func:`export_model`): ONNX (opset >= 17, dynamic batch) with metadata in
``metadata_props``, checked with ``onnx.checker``, verified against PyTorch on real crops with
ONNX Runtime (max abs difference; above :data:`ONNX_TOLERANCE` the export fails, and rounds run
the same check on their model file with :func:`verify_onnx`), optional int8 (ONNX Runtime static QDQ quantization
calibrated on real crops, dynamic when none) with retrieval metrics next to fp32, and a model
card (``MODEL_CARD.md``).

Progress callbacks are ``progress(done, total, msg)``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from core.config import settings

log = logging.getLogger(__name__)

Progress = Callable[..., None]
FORMATS = ("fiftyone", "classification-tree", "coco", "manifest")
TREE_FIELDS = ("identity", "label")
CONDITION_TAGS = ("night", "shadow", "occluded", "blur")
LABEL_FIELDS = ("behaviour", "flagged", "flag_reason", "labelled_by", "labelled_at")
MANIFEST_COLUMNS = (
    "id", "path", "label", "identity", "camera", "split", "kind", "sequence", "track", "frame",
    "brightness", "low_light", "blur", "condition_tags", "tags", "flagged", "flag_reason",
    "behaviour", "labelled_by", "labelled_at", "model_version",
)


# Largest |ONNX Runtime - PyTorch| embedding component allowed (fp32, unit vectors). Measured on
# 440 real campus62 crops at 128x64 (every val crop, a quarter of train), with export's and
# core.model.embed's sessions: the packaged base model 1.2e-6, a 40-step round 1.0e-6 (minimum cosine
# between the two 0.9999998). 1e-4 leaves about 80x that for other CPUs, kernels and thread
# counts, and bounds what a cosine similarity can move by to sqrt(D) * 1e-4 (0.0016 at D=256),
# well inside any match threshold's margin (1e-3 would allow 0.016). A corrupted graph shows:
# noise of 2 % of one layer's spread gives 3e-3 (tests/test_export.py).
ONNX_TOLERANCE = 1e-4
VERIFY_CROPS = 16  # real crops each verification runs through both runtimes


class ExportError(RuntimeError):
    """An export that cannot be done, with what the operator can do about it."""


def _noop(*_a: Any, **_k: Any) -> None:
    pass


# --- paths ---------------------------------------------------------------------------------

def export_root() -> Path:
    """The export folder of the data root (created on first use), fully resolved."""
    root = settings().exports_dir
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def safe_export_path(name: str | os.PathLike) -> Path:
    """The resolved path of export folder ``name`` inside :func:`export_root`.

    ``name`` is a folder name or a relative path (``site-a/round3``); an absolute path is
    accepted only when it lies inside the export root. Refused with :class:`ExportError`: empty
    names, ``..`` components, control characters, absolute paths elsewhere, and paths whose
    existing components are symlinks leading out of the root. Creates nothing but the root."""
    raw = os.fspath(name) if name is not None else ""
    if not raw or not raw.strip():
        raise ExportError("empty export name: give a folder name inside the export folder")
    if any(ord(c) < 32 for c in raw):
        raise ExportError(f"export name {raw!r} contains control characters")
    root = export_root()
    p = Path(raw)
    if ".." in p.parts:
        raise ExportError(f"export name {raw!r} contains '..': exports stay inside {root}")
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(root)
        except ValueError:
            raise ExportError(f"{raw} is outside the export folder {root}: give a folder name "
                              "inside it (absolute paths elsewhere are refused)") from None
    target = (root / p).resolve()  # follows symlinks of every existing component
    if target == root or not target.is_relative_to(root):
        where = "is the export folder itself" if target == root else \
            f"leads to {target} (a symbolic link points out of the export folder)"
        raise ExportError(f"export name {raw!r} {where}: choose a folder inside {root}")
    return target


def dataset_export_name(name: str, fmt: str) -> str:
    """The default folder name of a dataset export: ``NAME-FMT-YYYYmmdd-HHMMSS``."""
    return f"{name}-{fmt}-{datetime.now():%Y%m%d-%H%M%S}"


def model_export_name(version: str) -> str:
    """The default folder name of a model export: ``model-VERSION-YYYYmmdd-HHMMSS``."""
    return f"model-{version}-{datetime.now():%Y%m%d-%H%M%S}"


def export_target(name: str | os.PathLike, overwrite: bool = False) -> Path:
    """:func:`safe_export_path` of ``name``, refused with :class:`ExportError` when the folder
    exists and ``overwrite`` is not set (checked again, and acted on, when the export writes)."""
    final = safe_export_path(name)
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists: choose another name or overwrite it")
    return final


@contextmanager
def _staged(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder of ``final`` that is renamed to ``final`` on success and
    removed on failure (``final`` must come from :func:`safe_export_path`)."""
    export_target(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; exports are ordinary folders
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _safe_class_name(value: Any) -> str:
    """A class value as a single folder name (no separators, never '.' or '..')."""
    s = re.sub(r"[/\\\x00-\x1f]", "_", str(value)).strip()
    return "_" + s if s in ("", ".", "..") else s


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))


# --- dataset export ------------------------------------------------------------------------

def resolve_view(name: str, ids: Sequence[str] | None = None, filters: dict[str, Any] | None = None,
                 tags: Sequence[str] | None = None, saved_view: str | None = None, view=None):
    """The FiftyOne view to export: ``view`` as given, else the dataset (or its saved view
    ``saved_view``) narrowed to ``ids``, equality ``filters`` and required ``tags``."""
    from fiftyone import ViewField as F

    from core.data import store

    if view is not None:
        return view
    ds = store.get_dataset(name)
    if saved_view:
        if saved_view not in ds.list_saved_views():
            raise ExportError(f"dataset {name!r} has no saved view {saved_view!r}")
        v = ds.load_saved_view(saved_view)
    else:
        v = ds.view()
    if ids is not None:
        v = v.select(list(ids))
    for field, value in (filters or {}).items():
        if value is not None and value != "":
            v = v.match(F(field) == value)
    if tags:
        v = v.match_tags(list(tags), all=True)
    return v


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
    v = resolve_view(name, ids=ids, filters=filters, tags=tags, saved_view=saved_view, view=view)
    emb_field = None
    if include_embeddings:
        emb_field = store.embedding_field(include_embeddings)
        if emb_field not in v.get_field_schema():
            raise ExportError(f"dataset {name!r} has no embeddings of model "
                              f"{include_embeddings!r}: embed it with that version first")
    t0 = time.perf_counter()
    with _staged(final, overwrite) as tmp:
        if fmt == "fiftyone":
            rep = _export_fiftyone(v, tmp, emb_field, progress)
        elif fmt == "classification-tree":
            rep = _export_tree(v, tmp, by, progress)
        elif fmt == "coco":
            rep = _export_coco(name, v, tmp, max_frames, frame_step, progress)
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


def _export_fiftyone(view, out: Path, emb_field: str | None, progress: Progress) -> dict:
    """Full round trip: media, every field and tag; ``emb_*`` fields other than ``emb_field``
    are left out (they are large and belong to other model versions)."""
    import fiftyone as fo

    n = len(view)
    drop = [f for f in view.get_field_schema() if f.startswith("emb_") and f != emb_field]
    v = view.exclude_fields(drop) if drop else view
    progress(0, n, "writing FiftyOne dataset")
    v.export(export_dir=str(out), dataset_type=fo.types.FiftyOneDataset, export_media=True,
             overwrite=True, progress=False)  # overwrite: ``out`` is our own empty staging dir
    if drop:  # values are left out, but the dataset schema in metadata.json still declares them
        meta_p = out / "metadata.json"
        meta = json.loads(meta_p.read_text())
        meta["sample_fields"] = [f for f in meta.get("sample_fields", [])
                                 if f.get("name") not in drop]
        meta_p.write_text(json.dumps(meta))
    progress(n, n, "done")
    return {"count": n, "skipped": 0, "dropped_fields": drop}


def _export_tree(view, out: Path, by: str, progress: Progress) -> dict:
    """``out/<class>/<image>`` with FiftyOne's directory-tree exporter; the class comes from
    ``by`` (identity or label), read from the view, so the dataset is never modified."""
    import fiftyone as fo
    import fiftyone.utils.data.exporters as foue

    if by not in TREE_FIELDS:
        raise ExportError(f"classification tree by {by!r}: choose one of {', '.join(TREE_FIELDS)}")
    paths, values = view.values(["filepath", by]) if len(view) else ([], [])
    n = len(paths)
    classes: dict[str, int] = {}
    skipped = 0
    exporter = foue.ImageClassificationDirectoryTreeExporter(str(out), export_media=True)
    with exporter:
        exporter.log_collection(view)
        for i, (p, val) in enumerate(zip(paths, values), 1):
            if val is None or val == "":
                skipped += 1
            else:
                cls = _safe_class_name(val)
                exporter.export_sample(p, fo.Classification(label=cls))
                classes[cls] = classes.get(cls, 0) + 1
            if i % 50 == 0 or i == n:
                progress(i, n, f"{i}/{n} images")
    return {"count": sum(classes.values()), "skipped": skipped, "by": by, "classes": classes}


def _export_coco(name: str, view, out: Path, max_frames: int | None, frame_step: int,
                 progress: Progress) -> dict:
    """COCO detection of video frames with person boxes (``frames.detections`` of the
    companion video dataset), restricted to the sequences present in ``view``. Frames are
    decoded with OpenCV (no ffmpeg needed) into a staging folder and moved by the exporter."""
    import cv2
    import fiftyone as fo
    import fiftyone.utils.coco as fouc

    from core.data import store
    from core.data.media import read_frames

    vids = store.get_videos(name)
    if vids is None or len(vids) == 0:
        raise ExportError(f"dataset {name!r} has no videos with person boxes: COCO export needs "
                          "MOT sequences or videos ingested into it")
    seqs = {s for s in view.distinct("sequence") if s}
    if not seqs:
        raise ExportError("the chosen view holds no crops from a sequence: COCO export covers "
                          "the frames of the sequences in the view")
    plan: list[tuple[Any, list[int]]] = []
    budget = max_frames if max_frames is not None else float("inf")
    for s in vids.sort_by("sequence"):
        if s["sequence"] not in seqs or budget <= 0:
            continue
        fns = [fn for fn, fr in s.frames.items()
               if fr["detections"] is not None and len(fr["detections"].detections)]
        fns = sorted(fns)[:: max(1, frame_step)]
        fns = fns[: int(min(budget, len(fns)))]
        budget -= len(fns)
        if fns:
            plan.append((s, fns))
    total = sum(len(f) for _, f in plan)
    if total == 0:
        raise ExportError("no frames with person boxes in the chosen sequences")
    staging = out / ".frames"
    staging.mkdir()
    classes = sorted({d.label for s, fns in plan for fn in fns
                      for d in s.frames[fn]["detections"].detections if d.label})
    exporter = fouc.COCODetectionDatasetExporter(
        str(out), export_media="move", classes=classes,
        info={"description": f"Vigil export of {name}: person boxes of video frames"})
    done, boxes = 0, 0
    with exporter:
        exporter.log_collection(vids)
        for s, fns in plan:
            frames = read_frames(s.filepath, fns)
            for fn in fns:
                img = frames.get(fn)
                if img is None:
                    log.warning("%s: frame %d could not be decoded; skipped", s.filepath, fn)
                    continue
                fp = staging / f"{_safe_class_name(s['sequence'])}_{fn:06d}.jpg"
                if not cv2.imwrite(str(fp), img):
                    raise ExportError(f"could not write frame image {fp.name}")
                dets = s.frames[fn]["detections"]
                meta = fo.ImageMetadata(width=img.shape[1], height=img.shape[0])
                exporter.export_sample(str(fp), dets, metadata=meta)
                done += 1
                boxes += len(dets.detections)
                progress(done, total, f"{s['sequence']} frame {fn}")
    shutil.rmtree(staging, ignore_errors=True)
    return {"count": done, "skipped": total - done, "frames": done, "boxes": boxes,
            "classes": classes, "sequences": sorted(seqs & set(vids.distinct("sequence")))}


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


# --- retrieval metrics -----------------------------------------------------------------------

def retrieval_metrics(q_emb: np.ndarray, q_ids: Sequence, g_emb: np.ndarray, g_ids: Sequence,
                      q_cams: Sequence | None = None, g_cams: Sequence | None = None,
                      q_keys: Sequence | None = None, g_keys: Sequence | None = None,
                      ) -> dict[str, float]:
    """Cosine rank-1/rank-5/mAP of queries [Q, D] against a gallery [G, D] (cross-camera when
    cameras are given; a gallery item with the query's own key, its sample id, is never its
    candidate), from :func:`core.math.evaluate.retrieval_metrics`."""
    from core.math import evaluate

    return evaluate.retrieval_metrics(q_emb, q_ids, g_emb, g_ids, q_cams, g_cams, ks=(1, 5),
                                      q_keys=q_keys, g_keys=g_keys)


# --- choices for the UI and CLI ---------------------------------------------------------------

def embedding_versions(name: str) -> list[str]:
    """Model versions whose vectors dataset ``name`` holds (from its ``emb_*`` fields)."""
    from core.data import store

    schema = store.get_dataset(name).get_field_schema()
    out = []
    for v in ["base", *model_versions()]:
        if store.embedding_field(v) in schema and v not in out:
            out.append(v)
    known = {store.embedding_field(v) for v in out}
    out += sorted(f[4:] for f in schema if f.startswith("emb_") and f not in known)
    return out


def model_versions() -> list[str]:
    """"base" and every version with a checkpoint under the models folder (exportable)."""
    d = settings().models_dir
    found = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and (p / "checkpoint.pt").exists()) \
        if d.is_dir() else []
    return ["base", *[v for v in found if v != "base"]]


# --- model export --------------------------------------------------------------------------

def _version_record(version: str, dataset: str | None) -> tuple[int | None, dict[str, Any]]:
    """(training round, validation metrics) of ``version``: the model registry's record when
    there is one, else what the checkpoint holds; "base" has round 0 and no metrics."""
    if dataset and version != "base":  # registry.get would insert a "base" record
        try:
            from core.services import registry  # optional: fall back to the checkpoint without it

            rec = registry.get(dataset, version)
        except Exception as exc:  # noqa: BLE001 - the registry is optional: fall back
            log.debug("no registry record for %s/%s: %s", dataset, version, exc)
            rec = None
        if rec:
            rec = rec if isinstance(rec, dict) else getattr(rec, "__dict__", {})
            rnd = next((rec[k] for k in ("round", "training_round", "step") if rec.get(k)
                        is not None), None)
            return (int(rnd) if rnd is not None else None), dict(rec.get("metrics") or {})
    if version == "base":
        return 0, {}
    from core.model import embed

    ck = embed.load_checkpoint(version)
    return int(ck.get("step") or 0), dict(ck.get("metrics") or {})


def model_metadata(version: str, cfg, training_round: int | None, metrics: dict[str, Any],
                   opset: int, person: dict[str, Any] | None = None) -> dict[str, str]:
    """``metadata_props`` of an exported model (all values strings; JSON where structured)."""
    from core.model import backbones

    bb = backbones.get_backbone(cfg.backbone)
    extra = {} if person is None else {
        "person_output": "person", "person_head": json.dumps(person),
        "person_threshold": str(person.get("threshold", "")),
    }
    return {**extra,
        "vigil.format": "1",
        "version": version,
        "training_round": "" if training_round is None else str(training_round),
        "backbone": cfg.backbone,
        "input_name": "image",
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "input_size": json.dumps(list(cfg.crop_size)),  # (H, W) of crops
        "input_sizes": json.dumps({"crop": list(cfg.crop_size), "image": list(cfg.image_size)}),
        "channel_order": "BGR",
        "preprocessing": "in graph: BGR->RGB, /255, [luma normalisation], (x-mean)/std",
        "mean": json.dumps(list(bb.mean)),
        "std": json.dumps(list(bb.std)),
        "embedding_size": str(cfg.emb_dim),
        "output_name": "embedding",
        "output_normalized": "true",
        "brightness_invariant": "true" if cfg.brightness_invariant else "false",
        "validation_metrics": json.dumps(metrics, default=str),
        "opset": str(opset),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _set_metadata(path: Path, meta: dict[str, str], doc: str) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    m.producer_name = "vigil"
    m.doc_string = doc
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def _ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _load_crops(paths: Sequence[str], size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """Decoded crops ``[N, H, W, 3]`` BGR uint8 and the indices of ``paths`` that decoded."""
    from core.model import embed

    imgs, ok = [], []
    for i, p in enumerate(paths):
        try:
            imgs.append(embed.load_image(p, size))
            ok.append(i)
        except ValueError as exc:
            log.warning("skipped %s: %s", p, exc)
    h, w = size
    return (np.stack(imgs) if imgs else np.zeros((0, h, w, 3), np.uint8)), ok


def _run_ort(sess, x: np.ndarray, batch: int = 64) -> tuple[np.ndarray, float]:
    """Embeddings ``[N, D]`` and milliseconds per image."""
    t0 = time.perf_counter()
    out = [sess.run(None, {"image": x[i: i + batch]})[0] for i in range(0, len(x), batch)]
    ms = 1000 * (time.perf_counter() - t0) / max(1, len(x))
    return (np.concatenate(out) if out else np.zeros((0, 0), np.float32)), ms


def spread_by_identity(identities: Sequence, cap: int, rng: np.random.Generator,
                       first: set | frozenset = frozenset()) -> list[int]:
    """Indices (ascending) of at most ``cap`` items spread evenly over their identities: one item
    per identity per pass (identities in ``first`` first in each pass, then the others, each group
    in an order shuffled by ``rng``; items within an identity shuffled), until ``cap``. Every
    identity keeps an item while ``cap`` is at least the number of identities."""
    n = len(identities)
    if n <= cap:
        return list(range(n))
    groups: dict[str, list[int]] = {}
    for i, x in enumerate(identities):
        groups.setdefault(str(x), []).append(i)
    names = sorted(groups)
    names = [names[i] for i in rng.permutation(len(names))]
    first = {str(x) for x in first}
    names = [x for x in names if x in first] + [x for x in names if x not in first]
    queues = [[groups[x][i] for i in rng.permutation(len(groups[x]))] for x in names]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < cap:
        for q in queues:
            if depth < len(q):
                chosen.append(q[depth])
                if len(chosen) == cap:
                    break
        depth += 1
    return sorted(chosen)


def eval_set(dataset: str, max_query: int = 200, max_gallery: int = 1000, seed: int = 0,
             ) -> dict[str, list] | None:
    """Query/gallery crops of ``dataset`` (``split`` field or tag "query"/"gallery", with an
    identity): {q_paths, q_ids, q_cams, q_keys, g_paths, g_ids, g_cams, g_keys}, or None when it
    has no such split. Keys are sample ids: a crop tagged both is on both sides, and scoring with
    the keys keeps a query from finding itself, with or without cameras.

    Above the caps, crops are drawn spread over identities (:func:`spread_by_identity`, seeded):
    queries first, then the gallery with the chosen queries' identities first in each pass, so
    no identity vanishes the way it would under a cut by file path."""
    from fiftyone import ViewField as F

    from core.data import store

    ds = store.get_dataset(dataset)
    rng = np.random.default_rng(seed)
    cols: dict[str, tuple[list, ...]] = {}
    for split, key in (("query", "q"), ("gallery", "g")):
        v = ds.match(((F("split") == split) | F("tags").contains(split))
                     & (F("identity") != None)).sort_by("filepath")  # noqa: E711
        cols[key] = tuple(v.values(["id", "filepath", "identity", "camera"]))
        if not cols[key][0]:
            return None
    g_idents = {str(x) for x in cols["g"][2]}
    out: dict[str, list] = {}
    q_sel = spread_by_identity(cols["q"][2], max_query, rng, first=g_idents)
    g_sel = spread_by_identity(cols["g"][2], max_gallery, rng, first={str(cols["q"][2][i]) for i in q_sel})
    for key, sel in (("q", q_sel), ("g", g_sel)):
        ids, paths, idents, cams = cols[key]
        out[f"{key}_keys"] = [ids[i] for i in sel]
        out[f"{key}_paths"] = [paths[i] for i in sel]
        out[f"{key}_ids"] = [idents[i] for i in sel]
        out[f"{key}_cams"] = [cams[i] for i in sel]
    return out


def onnx_max_abs_diff(model, onnx_file, x: np.ndarray) -> tuple[float, np.ndarray]:
    """(largest |ONNX Runtime - PyTorch| component, ONNX embeddings [N, D]) of crops ``x``
    [N, H, W, 3] BGR uint8 through ``model`` (eval mode) and the graph in ``onnx_file`` (a path,
    or an ONNX Runtime session of it)."""
    import torch

    model = model.eval()
    with torch.inference_mode():
        ref = np.concatenate([model(torch.from_numpy(x[i: i + 64])).numpy() for i in range(0, len(x), 64)])
    sess = onnx_file if hasattr(onnx_file, "run") else _ort_session(Path(onnx_file))
    got, _ = _run_ort(sess, x)
    if got.shape != ref.shape:
        return float("inf"), got
    return float(np.abs(got - ref).max()), got


def _check_diff(diff: float, tolerance: float, what: str, n: int) -> None:
    if not diff <= tolerance:  # NaN fails too
        raise ExportError(f"{what} disagrees with PyTorch: max abs difference {diff:.3g} on {n} real "
                          f"crops, above the tolerance {tolerance:g}; the ONNX graph is not the "
                          "model: re-export it (and report the version if it persists)")


def verify_onnx(version: str, paths: Sequence[str], onnx_file: str | os.PathLike | None = None,
                tolerance: float = ONNX_TOLERANCE, n: int = VERIFY_CROPS) -> dict[str, Any]:
    """Check the ONNX file of model ``version`` (default: :func:`core.model.embed.onnx_path`, what the
    embedding jobs run) against its PyTorch model on up to ``n`` real crops spread over
    ``paths``. Returns ``{"max_abs_diff", "verified_on", "tolerance", "onnx"}``; raises
    :class:`ExportError` with the figure and the tolerance when it is above ``tolerance``."""
    from core.model import embed

    f = Path(onnx_file) if onnx_file is not None else embed.onnx_path(version)
    model, cfg = embed.load_model(version)
    paths = [os.fspath(p) for p in paths]
    pick = paths[:: max(1, len(paths) // n)][:n]
    x, _ok = _load_crops(pick, tuple(cfg.crop_size))
    if len(x) == 0:
        raise ExportError(f"no crop to verify the ONNX model of {version} on: none of {len(pick)} decoded")
    diff, _ = onnx_max_abs_diff(model, f, x)
    _check_diff(diff, tolerance, f"the ONNX model of {version} ({f})", len(x))
    log.info("ONNX of %s verified on %d crops: max abs diff %.2e", version, len(x), diff)
    return {"max_abs_diff": diff, "verified_on": int(len(x)), "tolerance": tolerance, "onnx": str(f)}


def _verify_paths(dataset: str | None, verify_on: Sequence[str] | None, n: int = 16) -> list[str]:
    if verify_on:
        return [os.fspath(p) for p in verify_on]
    if not dataset:
        return []
    from fiftyone import ViewField as F

    from core.data import store

    v = store.get_dataset(dataset).match(F("kind") != "image").sort_by("filepath")
    return list(v.limit(n).values("filepath"))


def export_model(version: str = "base", out_name: str | None = None, *,
                 dataset: str | None = None, int8: bool = False,
                 verify_on: Sequence[str] | None = None, opset: int = 17,
                 tolerance: float = ONNX_TOLERANCE,
                 overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Export model ``version`` to ``exports_dir/out_name`` (default ``model-VERSION-TIME``):
    ``model.onnx`` (+ ``model.int8.onnx``), ``MODEL_CARD.md`` and ``report.json``.

    Verification: embeddings of real crops (``verify_on`` paths, else up to 16 crops of
    ``dataset``) by PyTorch and by ONNX Runtime; ``max_abs_diff`` is their largest difference,
    and above ``tolerance`` the export fails (:class:`ExportError`, nothing left under its name).
    ``dataset`` also gives the version's registry record and, when it has query/gallery
    splits, the retrieval metrics of fp32 (and int8) on them. int8 uses static QDQ quantization
    calibrated on the gallery (or verification) crops. Returns the report dict."""
    import onnx

    from core.model import embed

    if opset < 17:
        raise ExportError(f"opset {opset} is too old: use 17 or newer")
    progress = progress or _noop
    paths = _verify_paths(dataset, verify_on)
    if not paths:
        raise ExportError("no crops to verify the ONNX model on: pass a dataset with crops or "
                          "image paths")
    final = safe_export_path(out_name or model_export_name(version))
    steps = 5 + int(int8)
    t0 = time.perf_counter()
    progress(0, steps, f"loading model {version}")
    try:
        model, cfg = embed.load_model(version)
    except embed.EmbedError as exc:
        raise ExportError(str(exc)) from None
    rnd, metrics = _version_record(version, dataset)
    meta = model_metadata(version, cfg, rnd, metrics, opset, embed.person_head(version))
    doc = f"Vigil re-ID embedding model {version}: uint8 BGR NHWC crops -> unit embeddings"
    report: dict[str, Any] = {"version": version, "dataset": dataset, "opset": opset,
                              "metadata": meta, "training_round": rnd}
    with _staged(final, overwrite) as tmp:
        fp32 = tmp / "model.onnx"
        progress(1, steps, "exporting ONNX")
        embed.export_onnx(model, fp32, opset=opset)
        _set_metadata(fp32, meta, doc)
        onnx.checker.check_model(str(fp32), full_check=True)
        report["checker"] = "passed"

        progress(2, steps, "verifying against PyTorch")
        x, ok = _load_crops(paths, tuple(cfg.crop_size))
        if len(x) == 0:
            raise ExportError("none of the verification crops could be decoded")
        sess = _ort_session(fp32)
        report["max_abs_diff"], got = onnx_max_abs_diff(model, sess, x)
        report["tolerance"] = tolerance
        _check_diff(report["max_abs_diff"], tolerance, f"the exported ONNX model of {version}", len(x))
        report["verified_on"] = len(x)
        report["verify_paths"] = [paths[i] for i in ok]

        progress(3, steps, "retrieval metrics")
        ev = eval_set(dataset) if dataset else None
        qx = gx = None
        if ev is not None:
            qx, q_ok = _load_crops(ev["q_paths"], tuple(cfg.crop_size))
            gx, g_ok = _load_crops(ev["g_paths"], tuple(cfg.crop_size))
            qi = [ev["q_ids"][i] for i in q_ok]
            qc = [ev["q_cams"][i] for i in q_ok]
            qk = [ev["q_keys"][i] for i in q_ok]
            gi = [ev["g_ids"][i] for i in g_ok]
            gc = [ev["g_cams"][i] for i in g_ok]
            gk = [ev["g_keys"][i] for i in g_ok]
            cams = all(c is not None for c in qc + gc)

            def evaluate_model(s) -> dict[str, float]:
                qe, ms = _run_ort(s, qx)
                ge, ms2 = _run_ort(s, gx)
                m = retrieval_metrics(qe, qi, ge, gi, qc if cams else None, gc if cams else None,
                                      q_keys=qk, g_keys=gk)  # a query never finds itself
                m["ms_per_image"] = round((ms * len(qx) + ms2 * len(gx)) / (len(qx) + len(gx)), 3)
                return m

            report["eval"] = {"queries": len(qx), "gallery": len(gx), "cross_camera": cams,
                              "identities": len(set(map(str, qi)) | set(map(str, gi))),
                              "in_both": len(set(qk) & set(gk))}
            report["metrics"] = {"fp32": evaluate_model(sess)}
        else:
            report["metrics"] = {}
        report["size_mb"] = {"fp32": round(fp32.stat().st_size / 1e6, 2)}

        if int8:
            progress(4, steps, "int8 quantization")
            q8 = tmp / "model.int8.onnx"
            calib = gx if gx is not None and len(gx) else x
            calib = calib[:: max(1, len(calib) // 64)][:64]  # spread over the set, bounded time
            report["int8_method"] = _quantize(fp32, q8, calib)
            _set_metadata(q8, {**meta, "quantization": report["int8_method"]}, doc + " (int8)")
            s8 = _ort_session(q8)
            e8, _ = _run_ort(s8, x)
            report["int8_max_abs_diff"] = float(np.abs(e8 - got).max())
            report["int8_mean_cosine"] = float(np.mean(np.sum(e8 * got, axis=1)))  # unit rows
            report["size_mb"]["int8"] = round(q8.stat().st_size / 1e6, 2)
            if ev is not None:
                report["metrics"]["int8"] = evaluate_model(s8)
        progress(steps - 1, steps, "model card")
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["onnx"] = str(final / "model.onnx")
        report["onnx_int8"] = str(final / "model.int8.onnx") if int8 else None
        report["card"] = str(final / "MODEL_CARD.md")
        report["path"] = str(final)
        (tmp / "MODEL_CARD.md").write_text(model_card(report, cfg))
        _write_json(tmp / "report.json", report)
    progress(steps, steps, "done")
    log.info("exported model %s to %s (max abs diff %.2e)", version, final,
             report["max_abs_diff"])
    return report


def _quantize(src: Path, dst: Path, calib: np.ndarray) -> str:
    """int8 copy of ``src``: static QDQ (per-channel int8 weights, uint8 activations) calibrated
    on ``calib`` [N, H, W, 3] crops; dynamic (uint8 weights) when there are none."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib is None or len(calib) == 0:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
        return "dynamic (uint8 weights)"
    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        base = pre
    except Exception as exc:  # noqa: BLE001 - pre-processing only improves the result
        log.info("quantization pre-processing skipped: %s", exc)
        base = src

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"image": calib[i: i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.it, None)

    try:
        quantize_static(str(base), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
    finally:
        pre.unlink(missing_ok=True)
    return f"static QDQ (int8 per-channel weights, uint8 activations, {len(calib)} " \
           "calibration crops)"


def model_card(report: dict[str, Any], cfg) -> str:
    """A short markdown model card from an :func:`export_model` report."""
    m = report["metadata"]
    lines = [
        f"# Vigil re-ID embedding model `{report['version']}`",
        "",
        f"Exported {m['exported_at']} · training round {m['training_round'] or '-'} · "
        f"backbone {cfg.backbone} · ONNX opset {report['opset']}",
        "",
        "## Input and output",
        "",
        f"- input `image`: uint8 `[N, {cfg.crop_size[0]}, {cfg.crop_size[1]}, 3]` **BGR** "
        f"(as OpenCV decodes), dynamic batch; whole images use {tuple(cfg.image_size)} (H, W)",
        f"- preprocessing is inside the graph: BGR->RGB, /255, "
        f"{'brightness-invariant luma normalisation, ' if cfg.brightness_invariant else ''}"
        f"mean {m['mean']}, std {m['std']}",
        f"- output `embedding`: float32 `[N, {cfg.emb_dim}]`, L2-normalised: compare with cosine "
        "similarity (a dot product)",
        *_person_card(m),
        "",
        "## Verification",
        "",
        f"- `onnx.checker`: {report.get('checker')}",
        f"- ONNX Runtime vs PyTorch on {report.get('verified_on')} real crops: max abs "
        f"difference {report.get('max_abs_diff', float('nan')):.2e} (the export fails above "
        f"{report.get('tolerance', ONNX_TOLERANCE):g})",
    ]
    if report.get("int8_max_abs_diff") is not None:
        lines.append(f"- int8 vs fp32 on the same crops: max abs difference "
                     f"{report['int8_max_abs_diff']:.3f}, mean cosine similarity "
                     f"{report['int8_mean_cosine']:.3f} ({report.get('int8_method')})")
    val = json.loads(m.get("validation_metrics") or "{}")
    if val:
        lines += ["", "## Validation metrics (training round)", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(val.items()) if not isinstance(v, dict)]
    mets = report.get("metrics") or {}
    if mets:
        ev = report.get("eval", {})
        lines += ["", f"## Retrieval on `{report.get('dataset')}` ({ev.get('queries')} queries, "
                      f"{ev.get('gallery')} gallery, "
                      f"{'cross-camera' if ev.get('cross_camera') else 'all cameras'})", "",
                  "| model | rank-1 | rank-5 | mAP | ms / image | size MB |",
                  "|---|---|---|---|---|---|"]
        for k, v in mets.items():
            lines.append(f"| {k} | {v['rank1']:.3f} | {v['rank5']:.3f} | {v['mAP']:.3f} | "
                         f"{v.get('ms_per_image', float('nan')):.2f} | "
                         f"{report['size_mb'].get(k, float('nan'))} |")
    lines += [
        "",
        "## Use and limits",
        "",
        "- Person re-identification embeddings for footage like the training data (camera "
        "angles, lighting, resolution); check rank-1/mAP on your own cameras before deploying.",
        "- Not a face recogniser; not for decisions about individuals without human review.",
        "- Metadata: `onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map`.",
        "",
    ]
    return "\n".join(lines)


def _person_card(meta: dict[str, str]) -> list[str]:
    """The model card's lines on the ``person`` output (none for a model without the head)."""
    if not meta.get("person_output"):
        return []
    h = json.loads(meta.get("person_head") or "{}")
    thr = h.get("threshold")
    return [
        "- output `person`: float32 `[N]` in 0..1, how much the crop looks like a person rather than a "
        "false positive of the detector (shadow, vehicle, animal, background), learnt from "
        f"{h.get('n_person', '?')} crops labelled person and {h.get('n_other', '?')} labelled otherwise",
        f"  - thresholding: drop a detection whose `person` is under **{thr:.3f}**: on the training round's "
        f"own labels (out of fold) that keeps 99 % of persons and removed {100 * h.get('fp_removed', 0):.0f} % "
        f"of false positives (cross-validated ROC AUC {h.get('cv_auc', float('nan')):.3f}); raise it to "
        "reject more, at the cost of missing people; check on your own cameras first"
        if thr is not None else "  - no threshold was recorded for this head",
    ]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (reads the protobuf; no torch)."""
    import onnx

    return {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False)
            .metadata_props}


# --- CLI -----------------------------------------------------------------------------------

def add_commands(subparsers) -> None:
    """Register ``export-dataset`` and ``export-model`` on the ``python -m core`` parser."""
    s = subparsers.add_parser("export-dataset", help="export a dataset view (FiftyOne, class "
                              "tree, COCO, manifest) under the data root's exports folder")
    s.add_argument("--dataset", required=True)
    s.add_argument("--format", default="fiftyone", choices=FORMATS)
    s.add_argument("--out", help="folder name inside the exports folder (default: generated)")
    s.add_argument("--by", default="identity", choices=TREE_FIELDS,
                   help="class field of a classification tree")
    s.add_argument("--tag", action="append", default=[], help="only samples with this tag "
                   "(repeatable: all must match)")
    s.add_argument("--camera", help="only samples of this camera")
    s.add_argument("--saved-view", help="a saved FiftyOne view of the dataset")
    s.add_argument("--embeddings", metavar="VERSION", help="include this model version's vectors")
    s.add_argument("--max-frames", type=int, help="COCO: at most this many frames")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_export_dataset)

    s = subparsers.add_parser("export-model", help="export a model version as verified ONNX "
                              "(+ int8) with a model card")
    s.add_argument("--version", default="base")
    s.add_argument("--dataset", help="for the version's metrics, verification crops and "
                   "query/gallery retrieval metrics")
    s.add_argument("--out", help="folder name inside the exports folder (default: generated)")
    s.add_argument("--int8", action="store_true", help="also write an int8 model")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_export_model)


def _bar(desc: str):
    from core.cli.bars import Bar

    return Bar(desc)


def _cmd_export_dataset(a) -> int:
    import sys

    from core.data import store

    bar = _bar(f"export {a.format}")
    try:
        rep = export_dataset(a.dataset, a.format, a.out, tags=a.tag or None,
                             filters={"camera": a.camera} if a.camera else None,
                             saved_view=a.saved_view, by=a.by, include_embeddings=a.embeddings,
                             max_frames=a.max_frames, overwrite=a.overwrite, progress=bar)
    except (ExportError, store.StoreError) as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    extra = f", {len(rep['classes'])} classes" if isinstance(rep.get("classes"), dict) else ""
    extra += f", {rep['boxes']} boxes" if "boxes" in rep else ""
    print(f"wrote {rep['count']} items ({rep['format']}{extra}, {rep['skipped']} skipped) "
          f"to {rep['path']}")
    return 0


def _cmd_export_model(a) -> int:
    import sys

    from core.data import store

    bar = _bar(f"export model {a.version}")
    try:
        rep = export_model(a.version, a.out, dataset=a.dataset, int8=a.int8,
                           overwrite=a.overwrite, progress=bar)
    except (ExportError, store.StoreError) as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(f"wrote {rep['onnx']} (max abs diff vs PyTorch {rep['max_abs_diff']:.2e} on "
          f"{rep['verified_on']} crops)")
    if rep.get("onnx_int8"):
        print(f"wrote {rep['onnx_int8']} ({rep['int8_method']})")
    for k, m in (rep.get("metrics") or {}).items():
        print(f"  {k}: rank-1 {m['rank1']:.3f}  mAP {m['mAP']:.3f}  {m['ms_per_image']:.2f} ms/img")
    print(f"model card: {rep['card']}")
    return 0
