"""People in raw footage: a detector (core.model.detect: the site's ONNX model, its precomputed boxes, or
HOG as the last resort) and a tracker that links detections into tracklets: ByteTrack (Kalman motion,
two-stage association; the default) or the original greedy IoU linker (``"iou"``). How well they
track: :mod:`core.math.mot_metrics`."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np



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


MIN_SIDE = 8  # pixels: a box smaller than this after clipping to the frame gives no crop


def clip_box(box, w: int, h: int) -> tuple[float, float, float, float] | None:
    """``box`` [x, y, w, h] clipped to a ``w`` x ``h`` frame on whole pixels, or None when under
    :data:`MIN_SIDE` a side."""
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, int(box[0] + box[2])), min(h, int(box[1] + box[3]))
    if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
        return None
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))


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


# --------------------------------------------------------------------------- trackers
#
# One small interface for both trackers: ``update(frame, dets)`` takes one sampled frame's
# detections ``[(box_xywh, score), ...]`` and returns ``[(track_id, frame, det_index), ...]``.
# ``frame`` may be an earlier sampled frame than the current one: ByteTrack confirms a track
# only after ``minimum_consecutive_frames`` matches, and when it does, the detections it took
# while tentative are handed out too (so a confirmed track keeps its first boxes). Track ids are
# small positive ints, in order of confirmation, stable for one tracker instance (one clip).

Det = tuple  # (box [x, y, w, h], score)
Assignment = tuple[int, int, int]  # (track_id, frame_number, index into that frame's dets)

TRACKERS = ("bytetrack", "iou")


@dataclass(frozen=True)
class ByteTrackConfig:
    """ByteTrack's thresholds, as Vigil uses them.

    high_score: detections at or above it take part in the first association (and may start
        tracks); those below only in the second, which extends existing tracks through
        low-confidence (occluded, blurred) boxes.
    activation: an unmatched high-score detection starts a (tentative) track only at or above it.
    match_iou: the least IoU between a track's Kalman-predicted box and a detection to match.
    lost_track_buffer: how many *sampled* frames a confirmed track survives unmatched before it
        ends (every 5th frame at 25 fps: 6 sampled frames ~ 1.2 s).
    min_consecutive: consecutive matched sampled frames (the starting one included) before a
        track is confirmed and gets an id; tentative tracks that miss a frame are dropped.

    Defaults were chosen on TUD-Stadtmitte only, degraded with a seed (1) the reported figures
    never use (``benchmarks/tracker_compare.py --tune``), by mean IDF1 over every_n 1 and 5.
    Grid (144 configs, activation >= high_score): high_score {0.5, 0.6, 0.7}, activation {0.6,
    0.7, 0.8}, match_iou {0.1, 0.2, 0.3}, lost_track_buffer {5, 15, 30}, min_consecutive {2, 3}.
    Best mean IDF1 0.889 (every 1: 0.898, every 5: 0.880, 0 ID switches at both), a tie of eight
    configs: high_score 0.5 or 0.6, activation 0.6, match_iou 0.3, buffer 15 or 30, min 2 or 3.
    Worst 0.683 (0.7 / 0.8 / 0.1 / 5 / 3); the library's own defaults (0.6 / 0.7 / 0.1 / 30 / 2)
    0.887, rank 23. Per value, best (mean over the rest of the grid): high_score 0.5 0.889
    (0.835), 0.6 0.889 (0.839), 0.7 0.853 (0.791); activation 0.6 0.889 (0.863), 0.7 0.888
    (0.848), 0.8 0.845 (0.779); match_iou 0.1 0.888, 0.2 0.879, 0.3 0.889; buffer 5 0.830
    (0.780), 15 0.889 (0.848), 30 0.889 (0.848); min_consecutive 2 0.889, 3 0.889. So: a high
    threshold of 0.7+ and a buffer of 5 hurt, the rest is nearly flat on this easy sequence.
    Among the tied best: high_score 0.6 (the library's, higher mean), buffer 15 (less room
    to revive a track onto someone else over a long gap: 15 sampled frames is 3 s at 25 fps,
    every 5th), min_consecutive 2 (a track's id comes one frame sooner).
    """
    # defaults: the evidence is in the docstring above
    high_score: float = 0.6
    activation: float = 0.6
    match_iou: float = 0.3
    lost_track_buffer: int = 15
    min_consecutive: int = 2


class Tracker:
    """Base of the trackers: ``update`` one sampled frame at a time (see the module note)."""
    name = ""

    def update(self, frame: int, dets: list[Det]) -> list[Assignment]:
        raise NotImplementedError


class IoUTracker(Tracker):
    """The original greedy IoU linker (see :func:`link`, whose behaviour it keeps): each frame's
    detections go to the active tracklet whose last box overlaps most (IoU >= ``iou_min``); a
    tracklet ends after ``max_missed`` sampled frames without a match; every unmatched detection
    starts a tracklet. With ``frame_size`` (w, h), boxes are clipped to the frame and detections
    whose clipped box is under 8 px a side are not taken, as the linker did when cutting crops."""
    name = "iou"

    def __init__(self, iou_min: float = 0.3, max_missed: int = 2,
                 frame_size: tuple[int, int] | None = None):
        self.iou_min, self.max_missed, self.frame_size = iou_min, max_missed, frame_size
        self._active: list[list] = []  # [track_id, last_box, missed]
        self._next = 1

    def _clip(self, box):
        if self.frame_size is None:
            return tuple(float(v) for v in box)
        return clip_box(box, *self.frame_size)

    def update(self, frame: int, dets: list[Det]) -> list[Assignment]:
        active = self._active
        pairs = sorted(((iou(t[1], d[0]), ti, di) for ti, t in enumerate(active)
                        for di, d in enumerate(dets)), reverse=True)
        used_t, used_d, out = set(), set(), []
        for v, ti, di in pairs:
            if v < self.iou_min or ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            box = self._clip(dets[di][0])
            if box is not None:
                active[ti][1], active[ti][2] = box, 0
                out.append((active[ti][0], frame, di))
        still = []
        for ti, t in enumerate(active):
            if ti not in used_t:
                t[2] += 1
            if t[2] <= self.max_missed:
                still.append(t)
        for di, d in enumerate(dets):
            if di not in used_d:
                box = self._clip(d[0])
                if box is not None:
                    still.append([self._next, box, 0])
                    out.append((self._next, frame, di))
                    self._next += 1
        self._active = still
        return out


class ByteTrack(Tracker):
    """Roboflow ``trackers``' ByteTrack (Kalman prediction, two-stage Hungarian IoU association)
    behind the :class:`Tracker` interface. ``frame_rate`` is the rate of the *sampled* frames
    (fps / every_n); the lost-track buffer is converted so that it counts sampled frames."""
    name = "bytetrack"

    def __init__(self, config: ByteTrackConfig | None = None, frame_rate: float = 30.0):
        from trackers import ByteTrackTracker

        self.config = c = config or ByteTrackConfig()
        self.frame_rate = float(frame_rate)
        # the library scales its buffer by frame_rate / 30: pass it pre-divided
        buffer = 0 if c.lost_track_buffer <= 0 else max(1, round(c.lost_track_buffer * 30.0 / self.frame_rate))
        self._bt = ByteTrackTracker(
            lost_track_buffer=buffer, frame_rate=self.frame_rate,
            track_activation_threshold=c.activation, minimum_consecutive_frames=c.min_consecutive,
            minimum_iou_threshold=c.match_iou, high_conf_det_threshold=c.high_score)
        self._bt.maximum_frames_without_update = max(0, int(c.lost_track_buffer))
        self._ids: dict[int, int] = {}        # library id (0-based) -> ours (1-based, dense)
        self._pending: dict[int, tuple] = {}  # id(tentative tracklet) -> (tracklet, [(frame, det)])

    def update(self, frame: int, dets: list[Det]) -> list[Assignment]:
        import supervision as sv

        n = len(dets)
        xywh = np.array([d[0] for d in dets], dtype=float).reshape(n, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        sd = sv.Detections(xyxy=xyxy, confidence=np.array([float(d[1]) for d in dets], dtype=float),
                           data={"det_index": np.arange(n)})
        res = self._bt.update(sd)
        got = {int(i): int(t) for i, t in zip(res.data.get("det_index", []), res.tracker_id)}
        out: list[Assignment] = []
        # which tracklet took each still-unconfirmed detection: the tentative tracklets updated
        # (or started) this frame, matched to the -1 detections by IoU of their state box
        free = [di for di, t in got.items() if t < 0]
        tentative = [t for t in self._bt.tracks if t.tracker_id == -1 and t.time_since_update == 0]
        if free and tentative:
            from scipy.optimize import linear_sum_assignment

            m = np.array([[_iou_xyxy(t.get_state_bbox(), xyxy[di]) for di in free] for t in tentative])
            for r, c in zip(*linear_sum_assignment(m, maximize=True)):
                if m[r, c] >= 0.5:
                    t = tentative[r]
                    self._pending.setdefault(id(t), (t, []))[1].append((frame, free[c]))
        alive = {id(t) for t in self._bt.tracks}
        for key in list(self._pending):
            t, held = self._pending[key]
            if t.tracker_id != -1:  # confirmed this frame: hand out what it took while tentative
                tid = self._our_id(t.tracker_id)
                out.extend((tid, f, di) for f, di in held)
                del self._pending[key]
            elif key not in alive:
                del self._pending[key]
        seen = {(f, di) for _, f, di in out}
        for di, t in sorted(got.items()):
            if t >= 0 and (frame, di) not in seen:
                out.append((self._our_id(t), frame, di))
        return sorted(out, key=lambda a: (a[1], a[0]))

    def _our_id(self, lib_id: int) -> int:
        if lib_id not in self._ids:
            self._ids[lib_id] = len(self._ids) + 1
        return self._ids[lib_id]


def _iou_xyxy(a, b) -> float:
    return iou((a[0], a[1], a[2] - a[0], a[3] - a[1]), (b[0], b[1], b[2] - b[0], b[3] - b[1]))


def make_tracker(tracker: str | Tracker = "bytetrack", config: ByteTrackConfig | None = None,
                 frame_rate: float = 30.0, frame_size: tuple[int, int] | None = None) -> Tracker:
    """A fresh tracker by name (``"bytetrack"`` or ``"iou"``); a :class:`Tracker` passes through."""
    if isinstance(tracker, Tracker):
        return tracker
    if tracker == "bytetrack":
        return ByteTrack(config, frame_rate=frame_rate)
    if tracker == "iou":
        return IoUTracker(frame_size=frame_size)
    raise ValueError(f"unknown tracker {tracker!r}: choose one of {', '.join(TRACKERS)}")


def sampled(frame: int, every_n: int) -> bool:
    """Whether ``frame`` (1-based) is one of the every-Nth frames Vigil looks at (1, 1+N, ...)."""
    return (frame - 1) % every_n == 0


def track_boxes(dets_by_frame: dict[int, list[Det]], tracker: str | Tracker = "bytetrack",
                config: ByteTrackConfig | None = None, every_n: int = 1, fps: float = 25.0,
                min_length: int = 1, last_frame: int | None = None
                ) -> dict[int, list[tuple[int, tuple[float, float, float, float], float]]]:
    """Track precomputed detections (no frames needed): every ``every_n``-th frame from 1 to
    ``last_frame`` (default: the last frame with detections; frames without any count as empty)
    goes to the tracker. Returns ``{track_id: [(frame, box_xywh, score), ...]}`` with tracks
    shorter than ``min_length`` dropped and ids renumbered 1..K in order of first frame."""
    last = last_frame if last_frame is not None else max(dets_by_frame, default=0)
    trk = make_tracker(tracker, config, frame_rate=fps / every_n)
    tracks: dict[int, list] = defaultdict(list)
    for fn in range(1, last + 1):
        if not sampled(fn, every_n):
            continue
        dets = dets_by_frame.get(fn, [])
        for tid, f, di in trk.update(fn, dets):
            box, score = dets_by_frame.get(f, [])[di] if f != fn else dets[di]
            tracks[tid].append((f, tuple(float(v) for v in box), float(score)))
    kept = sorted((sorted(v) for v in tracks.values() if len(v) >= min_length), key=lambda v: v[0][0])
    return {i: v for i, v in enumerate(kept, 1)}


