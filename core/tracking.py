"""People in raw footage: OpenCV's built-in HOG pedestrian detector, linked into tracklets by
box overlap (greedy IoU matching between sampled frames)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from core.media import MediaError, VideoReader


@dataclass
class Tracklet:
    track: int
    frames: list[int] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # x, y, w, h
    scores: list[float] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    missed: int = 0


def iou(a, b) -> float:
    """IoU of two [x, y, w, h] boxes."""
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


_HOG = None


def detect_people(frame: np.ndarray, max_width: int = 640, min_score: float = 0.5) -> list[tuple[list[float], float]]:
    """HOG people detections as ([x, y, w, h] in frame pixels, score), after non-maximum suppression."""
    global _HOG
    if _HOG is None:
        _HOG = cv2.HOGDescriptor()
        _HOG.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    scale = min(1.0, max_width / frame.shape[1])
    small = cv2.resize(frame, None, fx=scale, fy=scale) if scale < 1 else frame
    rects, weights = _HOG.detectMultiScale(small, winStride=(8, 8), padding=(8, 8), scale=1.05)
    if len(rects) == 0:
        return []
    boxes = [[float(v) / scale for v in r] for r in rects]
    scores = [float(w) for w in np.ravel(weights)]
    keep = cv2.dnn.NMSBoxes(boxes, scores, min_score, 0.4)
    return [(boxes[i], scores[i]) for i in np.ravel(keep)]


def link(tracks: list[Tracklet], active: list[Tracklet], fn: int, dets, frame: np.ndarray,
         iou_min: float = 0.3, max_missed: int = 2) -> list[Tracklet]:
    """Greedy IoU matching of this frame's detections to the active tracklets."""
    pairs = sorted(((iou(t.boxes[-1], d[0]), ti, di) for ti, t in enumerate(active)
                    for di, d in enumerate(dets)), reverse=True)
    used_t, used_d = set(), set()
    h, w = frame.shape[:2]

    def add(t: Tracklet, det):
        box, score = det
        x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
        x1, y1 = min(w, int(box[0] + box[2])), min(h, int(box[1] + box[3]))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return
        t.frames.append(fn)
        t.boxes.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
        t.scores.append(score)
        t.crops.append(frame[y0:y1, x0:x1].copy())
        t.missed = 0

    for v, ti, di in pairs:
        if v < iou_min or ti in used_t or di in used_d:
            continue
        used_t.add(ti)
        used_d.add(di)
        add(active[ti], dets[di])
    still = []
    for ti, t in enumerate(active):
        if ti not in used_t:
            t.missed += 1
        if t.missed <= max_missed:
            still.append(t)
    for di, d in enumerate(dets):
        if di not in used_d:
            t = Tracklet(track=len(tracks) + 1)
            add(t, d)
            if t.frames:
                tracks.append(t)
                still.append(t)
    return still


def detect_and_track(reader: VideoReader, every_n: int = 5, min_length: int = 2,
                     progress: Callable[[int, int], None] | None = None) -> list[Tracklet]:
    """Detect people on every Nth frame and link them; tracklets shorter than ``min_length``
    detections are dropped as likely false positives."""
    tracks: list[Tracklet] = []
    active: list[Tracklet] = []
    total = reader.frame_count
    try:
        for fn, frame in reader.frames():
            if (fn - 1) % every_n:
                continue
            active = link(tracks, active, fn, detect_people(frame), frame)
            if progress and fn % (every_n * 10) == 1:
                progress(fn, total)
    except MediaError:
        raise
    kept = [t for t in tracks if len(t.frames) >= min_length]
    for i, t in enumerate(kept, 1):
        t.track = i
    return kept
