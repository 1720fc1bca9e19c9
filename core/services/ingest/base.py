"""What every importer shares: the report, errors, where boxes come from (Detection), walking,
hashing, safe names and paths under the media folder, batched writes."""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core.config import settings

log = logging.getLogger("core.services.ingest")


KINDS = ("mot", "reid", "images", "videos")
Progress = Callable[[int, int, str], None]

# File-name patterns for re-ID folders: named groups identity / camera / view (all optional).
REID_PATTERNS = {
    "campus62": r"^(?P<camera>\d+)_(?P<view>\d+)$",  # CC_V.png, identity from the folder
    "market1501": r"^(?P<identity>-?\d+)_c(?P<camera>\d+)s\d+_(?P<view>\d+)",  # 0001_c1s1_001051_00
    "folder": r"^(?P<view>.+)$",  # identity from the folder, no camera
}
SPLIT_FOLDERS = {
    "train": "train", "bounding_box_train": "train", "query": "query", "gallery": "gallery",
    "bounding_box_test": "gallery", "test": "gallery", "val": "val", "all_imgs": "all",
}
MIN_CROP = 8  # pixels: smaller boxes (after clipping to the frame) are skipped


@dataclass
class IngestReport:
    source: str
    kind: str
    dataset: str
    added: int = 0
    duplicates: int = 0
    videos: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the operator should know (weak boxes, ...)

    def problem(self, where: str | Path, reason: str) -> None:
        # non-UTF-8 names are shown with U+FFFD so the report itself can be displayed and stored
        where = str(where).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        log.warning("skipped %s: %s", where, reason)
        self.problems.append((where, reason))

    def summary(self) -> str:
        return (f"{self.kind} {self.source} -> {self.dataset}: {self.added} added, "
                f"{self.duplicates} already present, {self.videos} videos, "
                f"{len(self.problems)} skipped")


class IngestError(ValueError):
    """The source as a whole cannot be ingested (wrong path or folder layout)."""


def _noop(done: int, total: int, msg: str) -> None:
    pass


@dataclass(frozen=True)
class Detection:
    """Where the boxes of raw footage come from (``videos``, and MOT folders without ground truth).

    In order: a detection file the site put beside a clip (:func:`core.model.detect.find_detection_file`:
    ``<clip>.det.txt``, ``<clip>.csv``, ``det/<clip>.txt``, a MOT folder's ``det/det.txt``); else
    the site's ONNX detector ``model`` (YOLOv5/v8/YOLOX/end-to-end exports, ``person_class`` by
    name or index, boxes over ``conf``); else OpenCV's HOG, the weak last resort. Tracklets come
    from ``tracker`` ("bytetrack", or "iou": the old greedy linker)."""

    model: str | None = None
    person_class: str | int = "person"
    conf: float = 0.25
    tracker: str = "bytetrack"
    layout: str = "auto"  # the model's output layout when its shape is ambiguous (core.model.detect.LAYOUTS)

    def __post_init__(self):
        from core.math.tracking import TRACKERS

        if self.tracker not in TRACKERS:
            raise IngestError(f"unknown tracker {self.tracker!r}: choose {' or '.join(TRACKERS)}")
        pc = str(self.person_class).strip() or "person"  # as typed: a class index is digits
        object.__setattr__(self, "person_class", int(pc) if pc.isdigit() else pc)

    def open(self):
        """The ONNX detector (loaded once per ingest), or None; :class:`IngestError` when the
        model cannot be used."""
        if not self.model:
            return None
        from core.model.detect import DetectionError, OnnxDetector

        try:
            return OnnxDetector(Path(self.model).expanduser(), person_class=self.person_class, conf=self.conf,
                                layout=self.layout)
        except DetectionError as exc:
            raise IngestError(f"detector {self.model}: {exc}") from None


HOG_WARNING = ("boxes from OpenCV's HOG detector, the weak last resort (small or partly hidden people are "
               "missed, shadows and benches found): give the site's detections (det/det.txt or "
               "<clip>.det.txt / <clip>.csv beside the clip) or its ONNX detector (--detector model.onnx)")


# --------------------------------------------------------------------------- walking

def _walk_files(root: Path, report: IngestReport) -> list[Path]:
    """Every regular file under ``root`` (symlinks not followed: no loops), sorted."""
    out = []

    def onerror(err: OSError) -> None:
        report.problem(err.filename or root, f"unreadable folder: {err.strerror}")

    for d, dirs, files in os.walk(root, onerror=onerror, followlinks=False):
        dirs.sort()
        for f in sorted(files):
            p = Path(d) / f
            if p.is_symlink() and not p.exists():
                report.problem(p, "broken symbolic link")
                continue
            out.append(p)
    return out


def _hash_file(p: Path) -> str:
    h = hashlib.sha1()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_name(raw: str, fallback: str = "sequence", limit: int = 64) -> str:
    """A name from a file (``seqinfo.ini``, a clip's file name) as one harmless path component
    and display id: letters, digits, ``.``, ``_``, ``-``; never empty, ``.`` or ``..``."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw)).strip("._-")[:limit]
    return s or fallback


def _source_id(*parts: str) -> str:
    """A stable hash naming one source (what identifies a sequence folder or a clip)."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _media_dir(dataset: str, *parts: str) -> Path:
    """``<data root>/media/<dataset>/<parts>``, refused when it would resolve anywhere else (a
    ``..`` or a symbolic link in the way)."""
    from core.config import OutsideDataRoot, inside_data_root

    media = settings().media_dir
    try:
        return inside_data_root(media.joinpath(dataset, *parts), media)
    except OutsideDataRoot as exc:
        raise IngestError(f"{exc}: crops are written only under {media}") from None


def _flush(store, dataset: str, records: list[dict], report: IngestReport) -> None:
    if records:
        added = store.add_records(dataset, records)
        report.added += added
        report.duplicates += len(records) - added
        records.clear()


