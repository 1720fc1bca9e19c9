"""FiftyOne's own exporters and views for :mod:`core.services.export`: which samples an export
takes (:func:`resolve_view`) and the three formats FiftyOne writes (a FiftyOne dataset, a
classification directory tree, COCO detections of video frames). Each writes into a folder it is
handed (the service stages and renames it) and returns its part of the export report."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

Progress = Callable[..., None]
TREE_FIELDS = ("identity", "label")

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """An export that cannot be done, with what the operator can do about it."""


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



def export_fiftyone(view, out: Path, emb_field: str | None, progress: Progress) -> dict:
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



def export_tree(view, out: Path, by: str, progress: Progress) -> dict:
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



def export_coco(name: str, view, out: Path, max_frames: int | None, frame_step: int,
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


def _safe_class_name(value: Any) -> str:
    """A class value as a single folder name (no separators, never '.' or '..')."""
    s = re.sub(r"[/\\\x00-\x1f]", "_", str(value)).strip()
    return "_" + s if s in ("", ".", "..") else s
