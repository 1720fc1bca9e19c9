"""Scoring trackers on MOT ground truth: the simulated detector (:func:`degrade`: ground-truth
boxes dropped, jittered, with false boxes added, seeded) and the MOT metrics (:func:`mot_scores`:
IDF1, ID switches, MOTA with motmetrics) that ``benchmarks/tracker_compare.py`` and
``tests/test_tracking.py`` share. Kept apart from :mod:`core.math.tracking` (what ingest runs) because
it reads MOT folders through :mod:`core.services.ingest`, which imports the tracker."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from core.math.tracking import Det, iou

# Not in the benchmark script: the benchmark and the tests both need it, a test importing a
# script would run its set-up (benchmarks isolate the data root on import), and a copy in each
# would drift apart.

@dataclass(frozen=True)
class Degradation:
    """How :func:`degrade` turns ground-truth boxes into what a person detector would give.

    miss: share of true boxes dropped one at a time (a missed detection).
    run_start, run_len: per frame of an identity, the chance that an occlusion starts, and its
        length in frames (uniform in the range): every box of the run is dropped.
    jitter: sigma of the centre shift (as a share of the box width / height) and of the log
        of the width and height scale.
    false_rate: false boxes per true box of the frame (Poisson), at uniform positions in the
        image, with a (w, h) drawn from the sequence's true boxes.
    low_share: share of true boxes with a low score (occluded / blurred: ByteTrack's second
        association is for them); scores of true boxes are U(true_high) or U(true_low).
    false_score: scores of false boxes, U(range): low to mid, a few above the high threshold.
    """
    miss: float = 0.10
    run_start: float = 0.015
    run_len: tuple[int, int] = (3, 12)
    jitter: float = 0.05
    false_rate: float = 0.10
    low_share: float = 0.20
    true_high: tuple[float, float] = (0.65, 0.95)
    true_low: tuple[float, float] = (0.20, 0.60)
    false_score: tuple[float, float] = (0.10, 0.65)


def degrade(gt: dict[int, list[tuple[int, tuple]]], image_size: tuple[int, int], seed: int,
            d: Degradation | None = None) -> tuple[dict[int, list[Det]], dict]:
    """Simulated detections from ground truth ``{frame: [(identity, box_xywh), ...]}`` in a
    ``image_size`` (w, h) image: misses (single and occlusion runs), jittered boxes, false boxes,
    scores (see :class:`Degradation`). Returns ``({frame: [(box, score), ...]}, counts)``;
    the same ``seed`` gives the same detections."""
    d = d or Degradation()
    rng = np.random.default_rng(seed)
    W, H = image_size
    dropped: set[tuple[int, int]] = set()
    by_id: dict[int, list[int]] = defaultdict(list)
    for fn in sorted(gt):
        for tid, _ in gt[fn]:
            by_id[tid].append(fn)
    in_runs = 0
    for tid in sorted(by_id):
        run = 0
        for fn in by_id[tid]:
            if run == 0 and rng.random() < d.run_start:
                run = int(rng.integers(d.run_len[0], d.run_len[1] + 1))
            if run > 0:
                run -= 1
                in_runs += 1
                dropped.add((fn, tid))
            elif rng.random() < d.miss:
                dropped.add((fn, tid))
    sizes = np.array([b[2:4] for fn in gt for _, b in gt[fn]], dtype=float).reshape(-1, 2)
    out: dict[int, list[Det]] = {}
    n_true = n_false = n_low = 0
    for fn in sorted(gt):
        dets = []
        for tid, (x, y, w, h) in gt[fn]:
            if (fn, tid) in dropped:
                continue
            cx = x + w / 2 + rng.normal(0, d.jitter) * w
            cy = y + h / 2 + rng.normal(0, d.jitter) * h
            w2, h2 = w * np.exp(rng.normal(0, d.jitter)), h * np.exp(rng.normal(0, d.jitter))
            low = rng.random() < d.low_share
            n_low += low
            score = rng.uniform(*(d.true_low if low else d.true_high))
            dets.append(([cx - w2 / 2, cy - h2 / 2, w2, h2], float(score)))
            n_true += 1
        for _ in range(rng.poisson(d.false_rate * len(gt[fn]))):
            w, h = sizes[rng.integers(len(sizes))]
            x, y = rng.uniform(0, max(1.0, W - w)), rng.uniform(0, max(1.0, H - h))
            dets.append(([float(x), float(y), float(w), float(h)], float(rng.uniform(*d.false_score))))
            n_false += 1
        order = rng.permutation(len(dets))  # a detector's output order says nothing
        out[fn] = [dets[i] for i in order]
    total = sum(len(v) for v in gt.values())
    counts = {"gt_boxes": total, "kept": n_true, "missed": total - n_true,
              "missed_in_occlusion_runs": in_runs, "false": n_false, "low_score_true": n_low}
    return out, counts


def mot_scores(gt: dict[int, list[tuple[int, tuple]]], tracks: dict[int, list[tuple]],
               frames: list[int], max_iou_distance: float = 0.5) -> dict:
    """CLEAR-MOT and identity scores (motmetrics) of ``tracks`` (as :func:`track_boxes` returns)
    against ground truth on ``frames``: a track box matches a true box at IoU >= 1 - 0.5.
    Returns idf1, mota, id_switches, tracks, gt_ids, mostly_tracked, false_positives, misses."""
    import motmetrics as mm

    hyp: dict[int, list] = defaultdict(list)
    for tid, rows in tracks.items():
        for fn, box, _ in rows:
            hyp[fn].append((tid, box))
    acc = mm.MOTAccumulator(auto_id=True)
    for fn in frames:
        g, h = gt.get(fn, []), hyp.get(fn, [])
        dist = np.full((len(g), len(h)), np.nan)
        for i, (_, a) in enumerate(g):  # motmetrics' own iou_matrix needs numpy < 2
            for j, (_, b) in enumerate(h):
                v = 1.0 - iou(a, b)
                if v <= max_iou_distance:
                    dist[i, j] = v
        acc.update([t for t, _ in g], [t for t, _ in h], dist)
    names = ["idf1", "mota", "num_switches", "mostly_tracked", "num_unique_objects",
             "num_false_positives", "num_misses"]
    s = mm.metrics.create().compute(acc, metrics=names, name="x")
    r = {k: s[k].iloc[0] for k in names}
    return {"idf1": round(float(r["idf1"]), 4), "mota": round(float(r["mota"]), 4),
            "id_switches": int(r["num_switches"]), "tracks": len(tracks),
            "gt_ids": int(r["num_unique_objects"]), "mostly_tracked": int(r["mostly_tracked"]),
            "false_positives": int(r["num_false_positives"]), "misses": int(r["num_misses"])}
