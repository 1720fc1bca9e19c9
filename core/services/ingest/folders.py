"""Re-ID folders (campus62, Market-1501, one folder per identity) and plain image folders."""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path


from core.math import conditions
from core.data.media import IMAGE_EXTS, MediaError, read_image
from core.services.ingest.base import (IngestError, IngestReport, Progress, REID_PATTERNS, SPLIT_FOLDERS, _flush, _hash_file, _walk_files)

log = logging.getLogger("core.services.ingest")


# --------------------------------------------------------------------------- re-ID folders

def _ingest_reid(root: Path, dataset: str, pattern: str, report: IngestReport, progress: Progress) -> None:
    from core.data import store

    regex = re.compile(REID_PATTERNS.get(pattern, pattern))
    files = [p for p in _walk_files(root, report)]
    images = []
    for p in files:
        if p.suffix.lower() in IMAGE_EXTS:
            images.append(p)
        else:
            report.problem(p, f"unsupported file type {p.suffix or '(none)'} for a re-ID folder")
    if not images:
        raise IngestError(f"no images under {root}: a re-ID folder holds <identity>/<image> files")
    if all(p.parent == root for p in images) and "identity" not in regex.groupindex:
        raise IngestError(
            f"wrong folder layout in {root}: images must sit in one folder per identity "
            "(<root>/<identity>/<image>, optionally under train/ query/ gallery/), or choose a "
            "file-name pattern with an identity (e.g. market1501)")
    ds = store.get_dataset(dataset, create=True)
    have = store.existing_keys(ds)
    records: list[dict] = []
    seen: dict[str, dict] = {}
    extra_tags: dict[str, set[str]] = defaultdict(set)
    for i, p in enumerate(images, 1):
        if i % 100 == 0:
            progress(i, len(images), p.name)
        rel = p.relative_to(root)
        splits = [SPLIT_FOLDERS[part] for part in rel.parts[:-1] if part in SPLIT_FOLDERS]
        m = regex.search(p.stem)
        ident = (m.group("identity") if m and "identity" in regex.groupindex else None)
        if ident is None:
            if p.parent == root:
                report.problem(p, "image outside an identity folder (and the pattern gives no identity)")
                continue
            ident = p.parent.name
        if ident in {"-1"}:  # Market-1501 junk boxes
            ident = None
        try:
            img = read_image(p)
        except MediaError as exc:
            report.problem(p, str(exc))
            continue
        key = "sha1:" + _hash_file(p)
        tags = sorted(set(splits))
        if key in seen:  # the same picture in two split folders (campus62: query and gallery)
            extra_tags[key].update(tags)
            continue
        if key in have:
            extra_tags[key].update(tags)
            report.duplicates += 1
            continue
        camera = m.group("camera") if m and "camera" in regex.groupindex else None
        rec = {
            "filepath": str(p.resolve()), "kind": "crop", "source_kind": "reid", "source": str(root),
            "camera": camera, "identity": ident, "label": "person",
            "split": next((s for s in splits if s in ("train", "query", "gallery")), splits[0] if splits else None),
            "ingest_key": key, "tags": tags, "bbox": [0.0, 0.0, float(img.shape[1]), float(img.shape[0])],
            **conditions.measure(img).as_fields(),
        }
        seen[key] = rec
        records.append(rec)
    for key, tags in list(extra_tags.items()):
        if key in seen:
            seen[key]["tags"] = sorted(set(seen[key]["tags"]) | tags)
            del extra_tags[key]
    _flush(store, dataset, records, report)
    if extra_tags:
        store.add_tags_by_key(dataset, {k: sorted(v) for k, v in extra_tags.items() if v})
    progress(len(images), len(images), "done")


# --------------------------------------------------------------------------- plain images

def _ingest_images(root: Path, dataset: str, report: IngestReport, progress: Progress) -> None:
    from core.data import store

    files = _walk_files(root, report)
    ds = store.get_dataset(dataset, create=True)
    have = store.existing_keys(ds)
    records: list[dict] = []
    for i, p in enumerate(files, 1):
        if i % 50 == 0:
            progress(i, len(files), p.name)
        if p.suffix.lower() not in IMAGE_EXTS:
            report.problem(p, f"unsupported file type {p.suffix or '(none)'}: images are "
                              + ", ".join(sorted(IMAGE_EXTS)))
            continue
        try:
            img = read_image(p)
        except MediaError as exc:
            report.problem(p, str(exc))
            continue
        key = "sha1:" + _hash_file(p)
        if key in have:
            report.duplicates += 1
            continue
        have.add(key)
        records.append({
            "filepath": str(p.resolve()), "kind": "image", "source_kind": "images", "source": str(root),
            "camera": p.parent.name if p.parent != root else None, "identity": None, "label": None,
            "split": None, "ingest_key": key, **conditions.measure(img).as_fields(),
        })
        if len(records) >= 500:
            _flush(store, dataset, records, report)
    _flush(store, dataset, records, report)
    if not files:
        report.problem(root, "folder holds no files")
    progress(len(files), len(files), "done")


