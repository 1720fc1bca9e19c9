"""MOT Challenge sequences: seqinfo, ground truth, detections (the site's det.txt or a detector)
tracked into tracklets, crops per frame."""
from __future__ import annotations

import configparser
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.math import conditions
from core.data.media import IMAGE_EXTS, VIDEO_EXTS, MediaError, VideoReader, read_image, write_jpeg
from core.services.ingest.base import (Detection, IngestError, IngestReport, MIN_CROP, Progress, _flush, _media_dir, _noop, _source_id, safe_name)

log = logging.getLogger("core.services.ingest")


# --------------------------------------------------------------------------- MOT

@dataclass
class MotBox:
    frame: int
    track: int
    box: tuple[float, float, float, float]  # x, y, w, h in the original (seqinfo) frame


def parse_seqinfo(seq: Path) -> dict:
    ini = seq / "seqinfo.ini"
    if not ini.is_file():
        raise MediaError("missing seqinfo.ini (MOT sequences need it for the frame size)")
    cp = configparser.ConfigParser()
    try:
        cp.read(ini)
        s = cp["Sequence"]
        info = {
            "name": s.get("name", seq.name), "width": int(s["imWidth"]), "height": int(s["imHeight"]),
            "fps": float(s.get("frameRate", 25)), "length": int(s.get("seqLength", 0)),
            "imdir": s.get("imDir", "img1"), "imext": s.get("imExt", ".jpg"),
            # Optional: identities are shared across the sequences of one site (multi-camera GT).
            "global_ids": s.get("identityScope", "sequence").strip().lower() == "global",
            "camera": s.get("camera", seq.name),
        }
    except (KeyError, ValueError, configparser.Error) as exc:
        raise MediaError(f"seqinfo.ini is malformed ({exc}): it needs [Sequence] imWidth and imHeight") from None
    return info


def parse_gt(gt: Path, report: IngestReport) -> list[MotBox]:
    """Rows ``frame,id,left,top,width,height,conf,...``; bad rows are reported and skipped."""
    if not gt.is_file():
        raise MediaError("missing gt/gt.txt")
    boxes = []
    try:
        text = gt.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise MediaError(f"gt/gt.txt unreadable: {exc.strerror}") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.replace(" ", "").split(",")
        try:
            fr, tid = int(float(parts[0])), int(float(parts[1]))
            x, y, w, h = (float(v) for v in parts[2:6])
            conf = float(parts[6]) if len(parts) > 6 and parts[6] else 1.0
        except (ValueError, IndexError):
            report.problem(f"{gt}:{i}", "malformed gt row: expected frame,id,left,top,width,height,...")
            continue
        if fr < 1 or w <= 0 or h <= 0 or not all(np.isfinite([x, y, w, h])):
            report.problem(f"{gt}:{i}", "invalid gt row: frame < 1 or non-positive box size")
            continue
        if conf == 0:  # MOT16+: conf 0 marks boxes to ignore
            continue
        boxes.append(MotBox(fr, tid, (x, y, w, h)))
    return boxes


def _find_sequences(root: Path) -> list[Path]:
    def is_seq(p: Path) -> bool:
        return (p / "gt").is_dir() or (p / "det").is_dir() or (p / "seqinfo.ini").exists()

    if is_seq(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and is_seq(p))


_NO_MOT = ("no MOT sequence in {root}: expected <seq>/seqinfo.ini, <seq>/gt/gt.txt (ground truth) or "
           "<seq>/det/det.txt (the site's detections), and <seq>/img1/ frames or one video file in <seq>/")


def _tracked_detections(seq: Path, info: dict, report: IngestReport, detection: Detection
                        ) -> tuple[list[MotBox], dict[tuple[int, int], float]]:
    """A MOT folder without ground truth: the site's ``det/det.txt`` (``frame,-1,box,score``),
    tracked (every frame) into tracklets with no identity. Returns the boxes as if they were
    ground truth, and each box's detection score by (track, frame)."""
    from core.model import detect
    from core.math import tracking

    try:
        dets = detect.read_detections(seq / "det" / "det.txt", problem=report.problem)
    except detect.DetectionError as exc:
        raise MediaError(f"det/det.txt: {exc}") from None
    tracks = tracking.track_boxes(dets, detection.tracker, fps=info["fps"], min_length=2)
    boxes, scores = [], {}
    for tid, rows in tracks.items():
        for fr, box, score in rows:
            boxes.append(MotBox(fr, tid, box))
            scores[(tid, fr)] = score
    if not boxes:
        raise MediaError("det/det.txt gave no tracklet of two or more boxes")
    return boxes, scores


def _ingest_mot_root(root: Path, dataset: str, every_n: int, report: IngestReport, progress: Progress,
                     detection: Detection | None = None) -> None:
    seqs = _find_sequences(root)
    if not seqs:
        raise IngestError(_NO_MOT.format(root=root))
    for seq in seqs:
        try:
            ingest_mot_sequence(seq, dataset, every_n, report, progress, detection)
        except MediaError as exc:
            report.problem(seq, str(exc))


def _frame_source(seq: Path, info: dict):
    """(kind, path): 'img1' folder of frames, or the single video file in the folder."""
    imdir = seq / info["imdir"]
    if imdir.is_dir() and any(imdir.iterdir()):
        return "frames", imdir
    videos = sorted(p for p in seq.iterdir() if p.suffix.lower() in VIDEO_EXTS and p.is_file())
    if len(videos) == 1:
        return "video", videos[0]
    if not videos:
        raise MediaError(f"no frames: neither {info['imdir']}/ nor a video file in the folder")
    raise MediaError(f"{len(videos)} video files in the folder: keep exactly one per sequence")


def _iter_source_frames(kind: str, src: Path, info: dict, report: IngestReport):
    """(width, height, fps, frame count, frames): frames yields (frame number, BGR image or
    None). A frame folder's corrupt, truncated or differently sized file yields None (reported),
    so the sequence goes on and the clip keeps one frame per number."""
    if kind == "video":
        reader = VideoReader(src)
        return reader.width, reader.height, reader.fps, reader.frame_count, reader.frames()
    numbered = []
    for p in sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        m = re.search(r"(\d+)", p.stem)
        if m:
            numbered.append((int(m.group(1)), p))
        else:
            report.problem(p, "frame file name has no frame number")
    if not numbered:
        raise MediaError(f"no frames: {src.name}/ holds no numbered image files")
    size = None
    for _fn, p in numbered:  # the frame size: the first frame that decodes
        try:
            size = read_image(p).shape[:2]
            break
        except MediaError:
            continue
    if size is None:
        raise MediaError(f"no frame in {src.name}/ can be decoded (all corrupt or unreadable)")

    def gen():
        for fn, p in numbered:
            try:
                img = read_image(p)
            except MediaError as exc:
                report.problem(p, f"{exc}: frame skipped")
                yield fn, None
                continue
            if img.shape[:2] != size:
                report.problem(p, f"frame is {img.shape[1]}x{img.shape[0]}, the sequence {size[1]}x{size[0]}: "
                                  "frame skipped")
                yield fn, None
                continue
            yield fn, img

    return size[1], size[0], info["fps"], len(numbered), gen()


def ingest_mot_sequence(seq: Path, dataset: str, every_n: int, report: IngestReport,
                        progress: Progress = _noop, detection: Detection | None = None) -> None:
    """One sequence: a video sample with tracked detections + every Nth-frame person crops.

    Ground truth (``gt/gt.txt``) gives tracks with identities; without it the site's detections
    (``det/det.txt``) are tracked into tracklets nobody has named yet (class unknown: the
    detector's false positives are among them, for the operator to label).

    ``seqinfo.ini``'s name is never a path: the sequence id (tracklets ``<id>/<track>``,
    per-sequence identities ``<id>:<track>``) is its safe form, claimed per source
    (:func:`core.data.store.claim_sequence`: a second site with the same name gets ``name~hash``);
    the name as written is kept in ``sequence_name``. Ingest keys and the media folder carry
    the source's hash (of the resolved sequence folder and its name), so sites never collide."""
    from core.data import store

    info = parse_seqinfo(seq)
    det_scores: dict[tuple[int, int], float] | None = None
    if not (seq / "gt" / "gt.txt").exists() and (seq / "det" / "det.txt").exists():
        boxes, det_scores = _tracked_detections(seq, info, report, detection or Detection())
    else:
        boxes = parse_gt(seq / "gt" / "gt.txt", report)
    if not boxes:
        raise MediaError("gt/gt.txt has no usable rows")
    src_kind, src = _frame_source(seq, info)
    raw_name = info["name"]
    # one source = one sequence folder: corrected annotations re-ingested from it add their new
    # boxes to the same sequence; another site's folder is another source whatever its name
    source_id = _source_id(str(seq.resolve()), raw_name)
    name = store.claim_sequence(dataset, safe_name(raw_name), source_id, raw_name)
    # datasets ingested before keys carried the source used mot:<name>:...; the source holding
    # the plain name is that one, so its old keys count as present (no duplicates on re-ingest)
    legacy = name == raw_name
    out_dir = _media_dir(dataset, "mot", f"{safe_name(raw_name)}-{source_id[:10]}")
    video_key = f"mot-video:{source_id}"
    width, height, fps, nframes, frames = _iter_source_frames(src_kind, src, info, report)
    sx, sy = width / info["width"], height / info["height"]  # PETS09 re-encode: 480/768 = 0.625

    by_track: dict[int, list[MotBox]] = defaultdict(list)
    for b in boxes:
        by_track[b.track].append(b)
    spans = {t: (min(b.frame for b in bs), max(b.frame for b in bs)) for t, bs in by_track.items()}
    by_frame: dict[int, list[MotBox]] = defaultdict(list)
    for b in boxes:
        by_frame[b.frame].append(b)

    ds = store.get_dataset(dataset, create=True)
    have = store.existing_keys(ds)

    def crop_key(t: int, f: int) -> str:
        return f"mot:{source_id}:{t}:{f}"

    video_path = str(src) if src_kind == "video" else None
    detections: dict[int, list[dict]] = defaultdict(list)
    records: list[dict] = []
    total = nframes or info["length"] or max(by_frame)
    written_frames = tmp_clip = None
    if src_kind == "frames":  # a browser-playable clip is needed for the video sample
        import cv2

        video_path = str(out_dir / f"{safe_name(raw_name)}.mp4")
        if not (store.has_video(dataset, video_key) and os.path.exists(video_path)):
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp_clip = video_path + ".tmp.mp4"
            written_frames = cv2.VideoWriter(tmp_clip, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    seen_frames = 0
    last = np.zeros((height, width, 3), np.uint8)
    try:
        for fn, img in frames:
            seen_frames += 1
            if written_frames is not None:  # a skipped frame repeats the last good one: numbers stay aligned
                written_frames.write(last if img is None else img)
            if seen_frames % 25 == 0:
                progress(seen_frames, total, f"{name}: frame {fn}")
            if img is None:
                continue
            last = img
            for b in by_frame.get(fn, ()):
                x, y, w, h = b.box[0] * sx, b.box[1] * sy, b.box[2] * sx, b.box[3] * sy
                x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
                x1, y1 = min(width, int(round(x + w))), min(height, int(round(y + h)))
                if x1 - x0 < MIN_CROP or y1 - y0 < MIN_CROP:
                    report.problem(f"{seq.name} frame {fn} track {b.track}",
                                   "box outside the frame (or under 8 px after clipping)")
                    continue
                box = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
                score = None if det_scores is None else det_scores.get((b.track, fn))
                detections[fn].append({"box": box, "track": b.track, "label": "person",
                                       **({} if score is None else {"confidence": score})})
                first, last_fn = spans[b.track]
                if (fn - first) % every_n:
                    continue
                key = crop_key(b.track, fn)
                if key in have or (legacy and f"mot:{raw_name}:{b.track}:{fn}" in have):
                    report.duplicates += 1
                    continue
                crop = img[y0:y1, x0:x1]
                path = out_dir / f"{b.track:05d}" / f"{fn:06d}.jpg"
                write_jpeg(path, crop)
                if det_scores is not None:  # the site's detections: nobody has said who, or what, it is
                    ident, label, extra = None, None, {"det_score": score, "detector": "det/det.txt"}
                else:
                    ident = str(b.track) if info["global_ids"] else f"{name}:{b.track}"
                    label, extra = "person", {}
                records.append({
                    **extra,
                    "filepath": str(path), "kind": "crop", "source_kind": "mot", "source": str(seq),
                    "camera": info["camera"], "identity": ident, "label": label, "split": None,
                    "sequence": name, "sequence_name": raw_name, "track": b.track, "frame": fn,
                    "tracklet": f"{name}/{b.track}", "frame_first": first, "frame_last": last_fn,
                    "bbox": box, "video_path": video_path, "ingest_key": key,
                    **conditions.measure(crop).as_fields(),
                })
            if len(records) >= 500:
                _flush(store, dataset, records, report)
        if written_frames is not None:
            written_frames.release()
            written_frames = None
            os.replace(tmp_clip, video_path)
    finally:  # a failure anywhere leaves no half-written clip behind
        if written_frames is not None:
            written_frames.release()
        if tmp_clip and os.path.exists(tmp_clip):
            os.unlink(tmp_clip)
    _flush(store, dataset, records, report)
    if legacy and store.has_video(dataset, f"mot-video:{raw_name}"):
        pass  # the clip of a dataset ingested before keys carried the source
    elif store.add_video(dataset, video_key, video_path, width, height, fps, seen_frames,
                       detections, {"sequence": name, "sequence_name": raw_name, "camera": info["camera"],
                                    "source_kind": "mot", "source": str(seq)}):
        report.videos += 1
    progress(total, total, f"{name}: done")


def load_mot_gt(seq) -> tuple[dict[int, list[tuple[int, tuple]]], dict]:
    """A MOT sequence folder's ground truth as ``{frame: [(identity, box_xywh), ...]}`` (rows with
    conf 0 left out) and its seqinfo (``width``, ``height``, ``fps``, ``length``)."""
    seq = Path(seq)
    gt: dict[int, list] = defaultdict(list)
    for b in parse_gt(seq / "gt" / "gt.txt", IngestReport(str(seq), "mot", "")):
        gt[b.frame].append((b.track, tuple(b.box)))
    return dict(gt), parse_seqinfo(seq)
