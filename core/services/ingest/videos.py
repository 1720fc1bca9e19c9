"""Raw video clips: boxes from the site's detection file, its ONNX detector or HOG, tracked by
ByteTrack, crops on every Nth frame."""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from core.math import conditions
from core.math.tracking import ByteTrackConfig, Det, Tracker, Tracklet, clip_box, make_tracker, sampled
from core.data.media import VIDEO_EXTS, MediaError, VideoReader, check_name, write_jpeg
from core.services.ingest.base import (Detection, HOG_WARNING, IngestReport, Progress, _flush, _hash_file, _media_dir, _walk_files, safe_name)

log = logging.getLogger("core.services.ingest")


# --------------------------------------------------------------------------- raw videos

def _clip_detections(found: Path | None, report: IngestReport) -> tuple[dict | None, str | None]:
    """The site's detection file ``found`` beside a clip (read, bad rows reported) and its name,
    or (None, None) when there is none; a file that cannot be used is reported and skipped."""
    from core.model import detect

    if found is None:
        return None, None
    try:
        return detect.read_detections(found, problem=report.problem), found.name
    except detect.DetectionError as exc:
        report.problem(found, f"{exc}: detections file not used")
        return None, None


def _ingest_videos(root: Path, dataset: str, every_n: int, report: IngestReport, progress: Progress,
                   detection: Detection | None = None) -> None:
    from core.data import store
    from core.model.detect import HogDetector, find_detection_file

    detection = detection or Detection()
    model = detection.open()
    hog = None
    files = _walk_files(root, report)
    det_file_of = {p: find_detection_file(p) for p in files if p.suffix.lower() in VIDEO_EXTS}
    videos, det_files = list(det_file_of), set(det_file_of.values())
    for p in files:
        if p not in det_file_of and p not in det_files:
            report.problem(p, f"unsupported file type {p.suffix or '(none)'}: videos are "
                              + ", ".join(sorted(VIDEO_EXTS)) + " (with the site's detections beside them)")
    for vi, p in enumerate(videos):
        try:
            check_name(p)
            key_video = "video:" + _hash_file(p)
            name = store.claim_sequence(dataset, safe_name(p.stem, "clip"), key_video[6:], p.stem)
            reader = VideoReader(p)
            dets, det_file = _clip_detections(det_file_of[p], report)
            if dets is not None:
                source, detector = det_file, None
            elif model is not None:
                source, detector = f"onnx:{Path(detection.model).name}", model
            else:
                hog = hog or HogDetector()
                source, detector = "hog", hog
                if HOG_WARNING not in report.notes:
                    report.notes.append(HOG_WARNING)
            tracks = detect_and_track(reader, every_n=every_n, detector=detector, detections=dets,
                                      tracker=detection.tracker,
                                      progress=lambda d, t: progress(d, t, f"{p.name}: detecting people ({source})"))
        except MediaError as exc:
            report.problem(p, str(exc))
            continue
        records = []
        detections: dict[int, list[dict]] = defaultdict(list)
        out_dir = _media_dir(dataset, "videos", f"{safe_name(p.stem, 'clip')}-{key_video[6:16]}")
        ds = store.get_dataset(dataset, create=True)
        have = store.existing_keys(ds)
        for t in tracks:
            first, last = t.frames[0], t.frames[-1]
            for fn, box, score, crop in zip(t.frames, t.boxes, t.scores, t.crops):
                detections[fn].append({"box": list(box), "track": t.track, "label": "person",
                                       "confidence": float(score)})
                key = f"{key_video}:{t.track}:{fn}"
                if key in have:
                    report.duplicates += 1
                    continue
                path = out_dir / f"{t.track:05d}" / f"{fn:06d}.jpg"
                write_jpeg(path, crop)
                records.append({
                    "det_score": float(score), "detector": source,
                    "filepath": str(path), "kind": "crop", "source_kind": "videos", "source": str(p),
                    "camera": name, "identity": None, "label": None, "split": None, "sequence": name,
                    "track": t.track, "frame": fn, "tracklet": f"{name}/{t.track}",
                    "frame_first": first, "frame_last": last, "bbox": [float(v) for v in box],
                    "video_path": str(p.resolve()), "ingest_key": key,
                    **conditions.measure(crop).as_fields(),
                })
        _flush(store, dataset, records, report)
        if store.add_video(dataset, key_video, str(p.resolve()), reader.width, reader.height, reader.fps,
                           reader.frame_count, detections,
                           {"sequence": name, "camera": name, "source_kind": "videos", "source": str(p)}):
            report.videos += 1
        progress(vi + 1, len(videos), p.name)


def detect_and_track(reader: VideoReader, every_n: int = 5, min_length: int = 2,
                     progress: Callable[[int, int], None] | None = None,
                     detector: Callable[[np.ndarray], list[Det]] | None = None,
                     tracker: str | Tracker = "bytetrack", config: ByteTrackConfig | None = None,
                     detections: dict[int, list[Det]] | None = None) -> list[Tracklet]:
    """Detect people on every Nth frame (``detector``: frame BGR -> ``[(box_xywh, score)]``,
    default :class:`core.model.detect.HogDetector`, the weak last resort; or ``detections``, precomputed per frame number, e.g. a site's
    det.txt) and track them (``tracker``: ``"bytetrack"`` or ``"iou"``, the old greedy linker).
    Precomputed detections are tracked on every frame (they cost nothing to get), a detector's on
    every Nth; either way crops are cut on every Nth frame. Boxes are clipped to the frame and each
    tracklet carries its crops; tracklets shorter than
    ``min_length`` detections are dropped as likely false positives, the rest numbered 1..K."""
    if detector is not None and detections is not None:
        raise ValueError("pass either a detector or precomputed detections, not both")
    if detector is None and detections is None:
        from core.model.detect import HogDetector

        detector = HogDetector()
    detect = detector
    fps = getattr(reader, "fps", 25.0) or 25.0
    trk = None
    tracks: dict[int, Tracklet] = {}
    recent: dict[int, list] = {}  # frame -> [(clipped box or None, score, crop)] for late hand-outs
    keep_back = (config or ByteTrackConfig()).min_consecutive + 1
    total = reader.frame_count
    # precomputed boxes cost nothing per frame: the tracker sees every frame (far fewer identity
    # switches, benchmarks/tracker_compare.py), crops are still cut on every Nth
    step = 1 if detections is not None else every_n
    for fn, frame in reader.frames():
        keep = sampled(fn, every_n)
        if not (keep or step == 1):
            continue
        h, w = frame.shape[:2]
        if trk is None:
            trk = make_tracker(tracker, config, frame_rate=fps / step, frame_size=(w, h))
        dets = detections.get(fn, []) if detections is not None else detect(frame)
        cut = []
        for box, score in dets:
            b = clip_box(box, w, h) if keep else None
            crop = None if b is None else frame[int(b[1]):int(b[1] + b[3]), int(b[0]):int(b[0] + b[2])].copy()
            cut.append((b, float(score), crop))
        recent[fn] = cut
        for old in [f for f in recent if f <= fn - keep_back * step]:
            del recent[old]
        for tid, f, di in trk.update(fn, [(list(b), s) for b, s in dets]):
            box, score, crop = recent[f][di]
            if box is None:
                continue
            t = tracks.setdefault(tid, Tracklet(track=tid))
            t.frames.append(f)
            t.boxes.append(box)
            t.scores.append(score)
            t.crops.append(crop)
        if progress and fn % (every_n * 10) == 1:
            progress(fn, total)
    kept = sorted((t for t in tracks.values() if len(t.frames) >= min_length),
                  key=lambda t: (t.frames[0], t.track))
    for i, t in enumerate(kept, 1):
        t.track = i
    return kept


