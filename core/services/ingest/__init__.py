"""Importers: MOT Challenge sequences, re-ID folders, plain image folders and raw video folders.

Every importer walks its source, turns each usable item into sample records (see the field list
in :mod:`core.data.store`), materialises person crops under ``<data root>/media/<dataset>/`` and
records a per-file reason for everything it skips in an :class:`IngestReport`. Nothing already
stored is changed: records are only added, and a record whose ``ingest_key`` is already in the
dataset is skipped, so ingesting the same source twice adds no duplicates.

One module per source kind: ``mot`` (sequences: ground truth, or detections tracked into
tracklets), ``folders`` (re-ID folders and plain images), ``videos`` (raw clips: the site's
detections or detector, HOG as the last resort, ByteTrack); ``base`` what they share. Add a kind
there and its branch in :func:`ingest` (ARCHITECTURE.md).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from core.services.ingest.base import (HOG_WARNING, KINDS, MIN_CROP, REID_PATTERNS, SPLIT_FOLDERS, Detection, IngestError, IngestReport, Progress, _noop, safe_name)
from core.services.ingest.folders import _ingest_images, _ingest_reid
from core.services.ingest.mot import (_NO_MOT, MotBox, _find_sequences, _ingest_mot_root, ingest_mot_sequence, load_mot_gt, parse_gt, parse_seqinfo)
from core.services.ingest.videos import _ingest_videos, detect_and_track

log = logging.getLogger(__name__)

__all__ = ["HOG_WARNING", "KINDS", "MIN_CROP", "REID_PATTERNS", "SPLIT_FOLDERS", "Detection", "IngestError", "IngestReport",
           "MotBox", "check_source", "detect_and_track", "ingest", "ingest_mot_sequence", "load_mot_gt", "parse_gt",
           "parse_seqinfo", "safe_name"]


def ingest(path: str | Path, kind: str, dataset: str, every_n: int = 5,
           pattern: str = "campus62", progress: Progress | None = None,
           detection: Detection | None = None) -> IngestReport:
    """Ingest ``path`` as ``kind`` into ``dataset``; see the module docstring. ``detection``:
    where raw footage's boxes come from (:class:`Detection`)."""
    path = check_source(path, kind, every_n)
    detection = detection or Detection()
    progress = progress or _noop
    report = IngestReport(source=str(path), kind=kind, dataset=dataset)
    if kind == "mot":
        _ingest_mot_root(path, dataset, every_n, report, progress, detection)
    elif kind == "reid":
        _ingest_reid(path, dataset, pattern, report, progress)
    elif kind == "images":
        _ingest_images(path, dataset, report, progress)
    else:
        _ingest_videos(path, dataset, every_n, report, progress, detection)
    log.info(report.summary())
    return report


def check_source(path: str | Path, kind: str, every_n: int = 5) -> Path:
    """The source folder as a path, or :class:`IngestError` saying what is wrong with it (also
    called before an ingest job is queued, so a bad path is reported at once)."""
    path = Path(path).expanduser()
    if kind not in KINDS:
        raise IngestError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    if not path.exists():
        raise IngestError(f"{path} does not exist")
    if not path.is_dir():
        raise IngestError(f"{path} is not a folder: point at the folder that holds the {kind}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise IngestError(f"{path} is not readable: check its permissions")
    if every_n < 1:
        raise IngestError("every_n must be at least 1")
    if kind == "mot" and not _find_sequences(path):
        raise IngestError(_NO_MOT.format(root=path))
    return path


