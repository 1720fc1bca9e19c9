"""Importers: MOT Challenge sequences, re-ID folders, plain image folders and raw video folders.

Every importer walks its source, turns each usable item into sample records (see the field list
in :mod:`core.data.store`), materialises person crops under ``<data root>/media/<dataset>/`` and
records a per-file reason for everything it skips in an :class:`IngestReport`. Nothing already
stored is changed: records are only added, and a record whose ``ingest_key`` is already in the
dataset is skipped, so ingesting the same source twice adds no duplicates.
"""
from __future__ import annotations

import configparser
import hashlib
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.math import conditions
from core.config import settings
from core.data.media import (IMAGE_EXTS, VIDEO_EXTS, MediaError, VideoReader, check_name, read_image, write_jpeg)

log = logging.getLogger(__name__)

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
    from core.math.tracking import detect_and_track

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
