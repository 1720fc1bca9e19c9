"""Tracklet context for a crop: its tracklet's boxes by frame, movement path and a strip of
video frames with the box drawn."""
from __future__ import annotations

import logging

import numpy as np

from core.data import store
from core.services.labeling.base import _oid

log = logging.getLogger(__name__)


def _tracklet_boxes(name: str, tracklet: str) -> tuple[np.ndarray, np.ndarray]:
    """(frames int [M], boxes float [M, 4] x, y, w, h) of the tracklet's crops, by frame."""
    frames, boxes = store.tracklet_values(name, tracklet, ["frame", "bbox"])
    if not frames:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float64)
    order = np.argsort(frames, kind="stable")
    return np.asarray(frames, np.int64)[order], np.asarray(boxes, np.float64)[order]


def tracklet_path(name: str, tracklet: str) -> list[tuple[int, float, float]]:
    """Movement path of a tracklet: (frame, cx, cy) of its crops' box centres (bottom-centre is
    where the feet are; the centre is what the box plot shows), sorted by frame."""
    frames, boxes = _tracklet_boxes(name, tracklet)
    return [(int(f), float(b[0] + b[2] / 2), float(b[1] + b[3] / 2)) for f, b in zip(frames, boxes)]


def tracklet_strip(name: str, sample_id: str, n: int = 8) -> list[tuple[int, np.ndarray]]:
    """Up to ``n`` frames spanning the crop's tracklet (``frame_first``..``frame_last``), each an
    RGB uint8 [H, W, 3] with the box drawn (interpolated between the tracklet's crops; the
    crop's own frame in a thicker box). [] for samples without a tracklet or video (re-ID)."""
    import cv2

    from core.data import media

    doc = store.sample_collection(name)[0].find_one(
        {"_id": _oid(sample_id)}, {"tracklet": 1, "video_path": 1, "frame_first": 1, "frame_last": 1, "frame": 1})
    if not doc or not doc.get("tracklet") or not doc.get("video_path"):
        return []
    first, last = doc.get("frame_first"), doc.get("frame_last")
    frames, boxes = _tracklet_boxes(name, doc["tracklet"])
    if first is None or last is None:
        if not len(frames):
            return []
        first, last = int(frames[0]), int(frames[-1])
    wanted = sorted({int(round(v)) for v in np.linspace(first, last, max(1, n))})
    own = doc.get("frame")
    if own is not None and own not in wanted and len(wanted):
        wanted[int(np.argmin([abs(w - own) for w in wanted]))] = int(own)
        wanted = sorted(set(wanted))
    try:
        got = media.read_frames(doc["video_path"], wanted)
    except Exception as exc:  # noqa: BLE001 - a missing clip only costs the strip
        log.warning("no frame strip for %s: %s", sample_id, exc)
        return []
    out = []
    for fn in wanted:
        img = got.get(fn)
        if img is None:
            continue
        img = img.copy()
        if len(frames):
            b = [np.interp(fn, frames, boxes[:, c]) for c in range(4)]
            x0, y0 = int(round(b[0])), int(round(b[1]))
            x1, y1 = int(round(b[0] + b[2])), int(round(b[1] + b[3]))
            thick = 3 if fn == own else 2
            colour = (0, 0, 255) if fn == own else (0, 220, 255)
            cv2.rectangle(img, (x0, y0), (x1, y1), colour, thick)
        out.append((fn, np.ascontiguousarray(img[:, :, ::-1])))
    return out
