"""False-positive rejection: how well a round's person-ness head (core.math.personness), learnt from a
budget of operator labels, rejects a weak detector's false positives on footage it never saw.

    .venv/bin/python benchmarks/false_positives.py [--budgets 0,50,200,all] [--steps N] [--head-input features|embedding]

Data: PETS09-S2L1, TUD-Campus and TUD-Stadtmitte (``../shared/data/mot``). On every ``--every``-th
frame, OpenCV's HOG people detector (core.model.detect.HogDetector, the last resort Vigil offers, run
with frames upscaled 1.5x, 2x and 3x and every window it fires on: a source of real false
positives: background, benches, shadows, groups, half people) gives boxes; each is labelled by its best overlap with the
ground-truth boxes of its frame: IoU >= 0.5 a person, IoU < 0.3 a false positive, in between
(loose boxes on a person) left out. Ground-truth person boxes of the same frames are the site's
good detections (person crops with identities, what a MOT ingest gives).

Each clip is cut by frame: the first ``--train-share`` of its frames trains, the rest
evaluates. A budget of B operator labels is B of the training part's HOG boxes, labelled with
their truth; with the training part's ground-truth crops (persons for free) they are the round's
class labels. Which B (``--picks``): ``queue`` (default), the ones Vigil's Annotate queue asks
first with its "Is this a person?" strategy (core.math.strategies.personness: before any head,
the lowest detector score first), as an operator working through the queue answers them;
``random``, B drawn at random (seeded), as an operator labelling whatever comes. Budget 0 has no false-positive label, so no head: its
row is the chance level, and the HOG score of the evaluation boxes is printed beside it as the
detector's own separation. Every budget's round (core.model.train.train_round, the default preset
with ``--steps``) trains the embedding on the training part's ground-truth identities; the head
is fitted on its final features.

Evaluated on the rest of each clip: its ground-truth crops and HOG persons (positives) against
its HOG false positives: ROC AUC and the share of false positives under the threshold that keeps
99 % of persons (``fp_removed_at_99``). Target: with 200 labels, AUC >= 0.95 and >= 80 % removed.

Writes ``benchmarks/out/false_positives.json`` (``{"budgets": {"0": {"auc", "fp_removed_at_99",
...}, ...}, "data": ..., "hog_score": ...}``) and ``false_positives.png``. Only a temporary data root is
written to.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, isolate, peak_rss_mb  # noqa: E402

ROOT = isolate("false-positives")

from core.math import personness  # noqa: E402
from core.config import settings, shared_data  # noqa: E402

log = logging.getLogger("false_positives")
SEQS = ("PETS09-S2L1", "TUD-Campus", "TUD-Stadtmitte")
PERSON_IOU, FP_IOU = 0.5, 0.3
HOG_UPSCALES = (1.5, 2.0, 3.0)  # three HOG runs: more of its real false positives to learn and score


def clip_crops(seq: Path, every: int, train_share: float, out_dir: Path, hog_min_score: float) -> list[dict]:
    """Ground-truth and HOG crops of one clip, labelled and split (see the module docstring)."""
    import cv2
    from tqdm import tqdm

    from core.model.detect import HogDetector
    from core.services.ingest import IngestReport, parse_gt, parse_seqinfo
    from core.math.tracking import iou

    info = parse_seqinfo(seq)
    boxes = parse_gt(seq / "gt" / "gt.txt", IngestReport(str(seq), "mot", "bench"))
    video = next(seq.glob("*.mp4"))
    cap = cv2.VideoCapture(str(video))
    w_vid, n_frames = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    scale = w_vid / info["width"]  # PETS09: a 480x360 re-encode of 768x576
    by_frame: dict[int, list] = {}
    for b in boxes:
        by_frame.setdefault(b.frame, []).append((b.track, tuple(v * scale for v in b.box)))
    split = int(n_frames * train_share)
    hogs = [HogDetector(upscale=u, min_score=hog_min_score) for u in HOG_UPSCALES]
    out: list[dict] = []
    fn = 0
    bar = tqdm(total=n_frames, desc=f"{seq.name}: HOG", unit="frame", leave=False, mininterval=5)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        fn += 1
        bar.update(1)
        if (fn - 1) % every:
            continue
        part = "train" if fn <= split else "eval"
        h, w = frame.shape[:2]

        def cut(box, name: str) -> str | None:
            x0, y0 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
            x1, y1 = min(w, int(round(box[0] + box[2]))), min(h, int(round(box[1] + box[3])))
            if x1 - x0 < 8 or y1 - y0 < 16:
                return None
            p = out_dir / seq.name / f"{fn:06d}-{name}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), frame[y0:y1, x0:x1])
            return str(p)

        gts = by_frame.get(fn, [])
        for track, box in gts:
            p = cut(box, f"gt{track}")
            if p:
                out.append({"path": p, "source": "gt", "person": True, "part": part,
                            "identity": f"{seq.name}:{track}", "camera": seq.name, "score": None})
        for i, (box, score) in enumerate(d for hog in hogs for d in hog(frame)):
            best = max((iou(box, g) for _t, g in gts), default=0.0)
            if FP_IOU <= best < PERSON_IOU:
                continue  # a loose box on a person: neither a clean person nor a false positive
            p = cut(box, f"hog{i}")
            if p:
                out.append({"path": p, "source": "hog", "person": best >= PERSON_IOU, "part": part,
                            "identity": None, "camera": seq.name, "score": float(score)})
    bar.close()
    cap.release()
    return out


def counts(rows: list[dict]) -> dict:
    def n(**kw) -> int:
        return sum(all(r[k] == v for k, v in kw.items()) for r in rows)

    return {part: {"gt_persons": n(part=part, source="gt"), "hog_persons": n(part=part, source="hog", person=True),
                   "hog_false_positives": n(part=part, source="hog", person=False)} for part in ("train", "eval")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0,50,200,all")
    ap.add_argument("--every", type=int, default=3, help="every Nth frame (default 3)")
    ap.add_argument("--train-share", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=150, help="round steps (the head reads the final features)")
    ap.add_argument("--head-input", choices=("features", "embedding"), default="features",
                    help="probe: fit the head on the pooled features (what a round does) or on the embedding")
    ap.add_argument("--hog-min-score", type=float, default=0.0,
                    help="HOG's lowest SVM score kept (0: every window it fires on, the site's worst case)")
    ap.add_argument("--picks", choices=("queue", "random"), default="queue",
                    help="which HOG boxes the operator labels: the Annotate queue's order, or at random")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from core.model import embed, train

    t0 = time.perf_counter()
    mot = shared_data() / "mot"
    # HOG is most of the run: its labelled crops are kept between runs of the same settings
    cache = REPO / "benchmarks" / "out" / "cache" / f"false_positives-e{a.every}-s{a.hog_min_score}-t{a.train_share}"
    if (cache / "rows.json").exists():
        rows = json.loads((cache / "rows.json").read_text())
        print(f"HOG crops from {cache} (delete it to detect again)")
    else:
        rows = []
        for s in SEQS:
            rows += clip_crops(mot / s, a.every, a.train_share, cache / "crops", a.hog_min_score)
        (cache / "rows.json").write_text(json.dumps(rows))
    data = counts(rows)
    print(f"data (HOG upscaled {'/'.join(map(str, HOG_UPSCALES))}x on every {a.every}th frame; first {a.train_share:.0%} of each clip trains): "
          + "; ".join(f"{p}: {d['gt_persons']} ground-truth persons, {d['hog_persons']} HOG persons, "
                      f"{d['hog_false_positives']} HOG false positives" for p, d in data.items()))
    train_rows = [r for r in rows if r["part"] == "train"]
    eval_rows = [r for r in rows if r["part"] == "eval"]
    y_eval = np.array([r["person"] for r in eval_rows])
    hog_eval = [r for r in eval_rows if r["source"] == "hog"]
    hog_ref = personness.rejection(np.array([r["score"] for r in hog_eval]), np.array([r["person"] for r in hog_eval])) \
        if len({r["person"] for r in hog_eval}) == 2 else None
    if hog_ref:
        print(f"reference: HOG's own score on the evaluation's HOG boxes: AUC {hog_ref['auc']:.3f}, "
              f"{100 * hog_ref['fp_removed']:.1f} % of false positives removed at 99 % of persons kept")

    samples = [(r["path"], r["identity"], r["camera"], 1.0) for r in train_rows if r["source"] == "gt"]
    hog_train = [r for r in train_rows if r["source"] == "hog"]
    free = [(r["path"], True) for r in train_rows if r["source"] == "gt"]
    rng = np.random.default_rng(a.seed)
    if a.picks == "random":
        order = rng.permutation(len(hog_train))
    else:  # the queue's own order over all of them: its first B are what it asks for B labels
        from core.math import strategies

        n = len(hog_train)
        sel = strategies.personness(np.zeros((n, 1), np.float32), np.zeros(n, bool), np.full(n, None), n, rng,
                                    det_score=np.array([r["score"] for r in hog_train], np.float32))
        order = np.asarray(sel.indices)
    results: dict[str, dict] = {}
    for b in a.budgets.split(","):
        budget = len(hog_train) if b == "all" else int(b)
        picked = [hog_train[i] for i in order[:budget]]
        classes = free + [(r["path"], r["person"]) for r in picked]
        n_fp = sum(not r["person"] for r in picked)
        key = "all" if b == "all" else str(budget)
        if n_fp < personness.MIN_PER_CLASS:
            results[key] = {"auc": 0.5, "fp_removed_at_99": 0.0, "labels": budget, "false_positive_labels": n_fp,
                            "note": "no head: too few false-positive labels to learn from (chance level)"}
            print(f"budget {key:>4}: {budget} labels ({n_fp} false positives): no head, chance level "
                  "(AUC 0.500, 0 % removed)")
            continue
        cfg = train.preset_config("default", steps=a.steps, seed=a.seed)
        tr = time.perf_counter()
        version = f"fp-{key}"
        res = train.train_round(samples, cfg, out_dir=settings().models_dir / version, classes=classes)
        if a.head_input == "embedding":  # probe: the same labels, the head on the 256-d embedding
            vecs, _e = embed.embed_paths([p for p, _ in classes], version=version, backend="torch")
            head = personness.fit(vecs, np.array([y for _, y in classes]), a.seed)
            ev, _e = embed.embed_paths([r["path"] for r in eval_rows], version=version, backend="torch")
            scores = head.score(ev)
        else:
            _v, _e, scores = embed.embed_paths([r["path"] for r in eval_rows], version=version, person=True)
        r = personness.rejection(scores, y_eval)
        hog_mask = np.array([x["source"] == "hog" for x in eval_rows])
        r_hog = personness.rejection(scores[hog_mask], y_eval[hog_mask]) if len(set(y_eval[hog_mask])) == 2 else None
        results[key] = {"auc": r["auc"], "fp_removed_at_99": r["fp_removed"], "persons_kept": r["persons_kept"],
                        "threshold": r["threshold"], "labels": budget, "false_positive_labels": n_fp,
                        "round_cv_auc": (res["person"] or {}).get("cv_auc"), "round_seconds": time.perf_counter() - tr,
                        "hog_boxes_only": None if r_hog is None else {"auc": r_hog["auc"], "fp_removed_at_99": r_hog["fp_removed"]}}
        print(f"budget {key:>4}: {budget} labels ({n_fp} false positives): AUC {r['auc']:.3f}, "
              f"{100 * r['fp_removed']:.1f} % of false positives removed at {100 * r['persons_kept']:.1f} % of persons kept"
              + (f" (HOG boxes alone: AUC {r_hog['auc']:.3f}, {100 * r_hog['fp_removed']:.1f} %)" if r_hog else "")
              + f"; round {time.perf_counter() - tr:.0f} s")
    t200 = results.get("200")
    if t200:
        ok = t200["auc"] >= 0.95 and t200["fp_removed_at_99"] >= 0.8
        print(f"target (200 labels: AUC >= 0.95, >= 80 % removed): {'met' if ok else 'NOT met'}")
    out = {"budgets": results, "data": data, "hog_score": hog_ref, "head_input": a.head_input, "picks": a.picks,
           "every": a.every,
           "train_share": a.train_share, "steps": a.steps, "seed": a.seed, "seconds": time.perf_counter() - t0,
           "peak_rss_mb": peak_rss_mb()}
    dst = REPO / "benchmarks" / "out"
    dst.mkdir(parents=True, exist_ok=True)
    name = "false_positives" + ("" if a.head_input == "features" else "_embedding_probe") \
        + ("" if a.picks == "queue" else "_random_picks")
    (dst / f"{name}.json").write_text(json.dumps(out, indent=2))
    plot(results, dst / f"{name}.png")
    print(f"wrote {dst / (name + '.json')} in {time.perf_counter() - t0:.0f} s, peak {peak_rss_mb():.0f} MB")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [results[k]["auc"] for k in keys], 0.4, label="ROC AUC")
    ax.bar(x + 0.2, [results[k]["fp_removed_at_99"] for k in keys], 0.4, label="false positives removed at 99 % persons")
    ax.axhline(0.95, color="C0", ls=":", lw=1)
    ax.axhline(0.8, color="C1", ls=":", lw=1)
    ax.set_xticks(x, [f"{k} labels" for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_title("False-positive rejection on unseen frames (PETS09, TUD)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
