"""Retrieval quality before and after one default fine-tuning round (core.model.train.train_round),
with the operator's identities (supervised) and with none (unsupervised: tracklets only).

    .venv/bin/python benchmarks/retrain_quality.py [--only campus62|mot] [--steps N] [--arms supervised,unsupervised]

Writes ``benchmarks/out/retrain_quality.json``: ``{"campus62_crosscam": {"base": {...},
"supervised": {...}, "unsupervised": {...}}, "mot": {...}}``, each ``{rank1, rank5, mAP,
seconds, peak_rss_mb}`` (``seconds`` the round's wall time, 0 for base; ``peak_rss_mb`` the
process's peak so far, so an upper bound for every arm after the first).

campus62: train on ``reid/campus62/train`` (62 identities; the supervised round holds out 20 % of
them for its own validation / early stopping; the unsupervised one sees each identity's crops of
one camera as a lone tracklet, 124 of them, and nothing else), evaluate ``val/query`` against
``val/gallery`` (12 other identities), base model vs the round's checkpoint. Two protocols are
printed; in both a query is
never its own candidate (17 of the 28 query files also sit, byte-identical, in the gallery: their
content hash is the key that removes the copy, ``core.math.evaluate`` ``q_keys`` / ``g_keys``):

- ``all``: every other gallery crop is a candidate.
- ``cross-cam``: Market-1501 protocol, same-identity same-camera gallery crops removed.

Each protocol is printed twice: ranked by cosine similarity (the embeddings alone), and ranked by
k-reciprocal re-ranking over query and gallery (core.math.evaluate.k_reciprocal_distances, the paper's
k1=20, k2=6, lambda=0.3, never tuned here): the ranking of the round report's re-ranked rows and
of "More like this" on the Annotate page.

MOT: person crops cut with OpenCV from PETS09-S2L1 (gt boxes x 0.625 for the 480x360 re-encode),
TUD-Campus and TUD-Stadtmitte (every 5th / 3rd frame, boxes >= 32 px high); identities split
60/40 by identity (seeded); test identities: first half of each track queries the second half.
Unsupervised arm: each training track a lone tracklet, its sequence its camera, tracks seen in
one frame cannot-linked (what the identity graph gives for free).

Prints wall time of each round and the process's peak resident memory. Writes only to a
temporary data root.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VIGIL_DATA_ROOT", tempfile.mkdtemp(prefix="vigil-bench-retrain-"))

from core.math import evaluate as ev  # noqa: E402
from core.config import settings, shared_data  # noqa: E402
from core.model.train import TrainConfig, load_crops, train_round  # noqa: E402

log = logging.getLogger("retrain_quality")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embed_arrays(version: str, x_by_size) -> tuple[np.ndarray, tuple[int, int]]:
    import torch

    from core.model.embed import load_model

    model, cfg = load_model(version)
    x = x_by_size(cfg.crop_size)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), 128):
            out.append(model(torch.from_numpy(x[i: i + 128])).numpy())
    return np.concatenate(out), cfg.crop_size


def fmt(m: dict) -> str:
    return f"rank-1 {100 * m['rank1']:5.1f} %  rank-5 {100 * m['rank5']:5.1f} %  mAP {100 * m['mAP']:5.1f} %"


OUT = Path(__file__).resolve().parent / "out" / "retrain_quality.json"


def figures(m: dict, seconds: float) -> dict:
    return {"rank1": round(float(m["rank1"]), 4), "rank5": round(float(m["rank5"]), 4),
            "mAP": round(float(m["mAP"]), 4), "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb())}


def lone(samples, cannot=()) -> dict:
    """Round arguments with identities hidden: each (identity, camera) a lone tracklet."""
    hidden = [(p, f"~{i}@{c}", c, w) for p, i, c, w in samples]
    return {"samples": hidden, "open_identities": sorted({s[1] for s in hidden}), "cannot": list(cannot)}


def run_round(name: str, samples, config: TrainConfig, **extra) -> tuple[str, dict, float]:
    version = f"bench-{name}"
    out_dir = settings().models_dir / version
    t0 = time.perf_counter()

    def prog(step, total, loss, metrics):
        if step % 50 == 0:
            m = f" val mAP {metrics['mAP']:.3f}" if metrics else ""
            print(f"  [{name}] step {step}/{total} loss {loss:.4f}{m} {time.perf_counter() - t0:.0f}s", flush=True)

    r = train_round(samples, config, init_version="base", out_dir=out_dir, progress=prog, **extra)
    secs = time.perf_counter() - t0
    iv, bv = r["init_metrics"], r["best_metrics"]
    print(f"  [{name}] round: {r['steps_run']} steps, best step {r['best_step']}, early stop "
          f"{r['stopped_early']}; round's own validation ({len(r['val_ids'])} ids, "
          f"{'cross-camera' if bv.get('cross_camera') else 'any other crop'}): mAP "
          f"{100 * iv['mAP']:.1f} % -> {100 * bv['mAP']:.1f} %, rank-1 {100 * iv['rank1']:.1f} % -> "
          f"{100 * bv['rank1']:.1f} %", flush=True)
    pseudo = r.get("pseudo") or {}
    for rc in pseudo.get("reclusters", []):
        print(f"  [{name}] pseudo-identities at step {rc['step']}: {rc['nodes']} tracklets, {rc['merged_nodes']} "
              f"joined into {rc['clusters']} cross-camera identities ({rc['vetoed']} links vetoed)", flush=True)
    if pseudo.get("proposals"):  # the hidden identities are in the tracklet names: "~<identity>@<camera>"
        links = pseudo["proposals"]
        right = sum(a[1:].split("@")[0] == b[1:].split("@")[0] for a, b, _d in links)
        print(f"  [{name}] last clustering's links: {right} of {len(links)} join one person", flush=True)
    return version, r, secs


def campus62(config: TrainConfig, arms: list[str], out: dict) -> None:
    root = shared_data() / "reid" / "campus62"
    if not root.exists():
        print(f"campus62: skipped, {root} is absent")
        return

    def listing(d: Path):
        ps = sorted(d.glob("*/*.png"))
        # the same picture sits in query/ and gallery/: its content hash keeps it from finding itself
        keys = [hashlib.sha1(p.read_bytes()).hexdigest() for p in ps]
        return [str(p) for p in ps], [p.parent.name for p in ps], [p.stem[:2] for p in ps], keys

    tr_p, tr_i, tr_c, _ = listing(root / "train")
    q_p, q_i, q_c, q_s = listing(root / "val" / "query")
    g_p, g_i, g_c, g_s = listing(root / "val" / "gallery")
    samples = [(p, i, c, 1.0) for p, i, c in zip(tr_p, tr_i, tr_c)]

    def evaluate(version: str) -> dict[str, dict]:
        e, size = embed_arrays(version, lambda s: load_crops(q_p + g_p, s))
        eq, eg = e[: len(q_p)], e[len(q_p):]
        out = {"size": size}
        keys = {"q_keys": q_s, "g_keys": g_s}  # a query is never its own candidate
        for rr, tag in ((False, ""), (True, " re-ranked")):
            out["all" + tag] = ev.retrieval_metrics(eq, q_i, eg, g_i, rerank=rr, **keys)
            out["cross-cam" + tag] = ev.retrieval_metrics(eq, q_i, eg, g_i, q_c, g_c, rerank=rr, **keys)
        return out

    print(f"campus62: train {len(tr_p)} crops / {len(set(tr_i))} ids; val query {len(q_p)}, gallery {len(g_p)}")
    before = evaluate("base")
    res = out.setdefault("campus62_crosscam", {})
    res["base"] = figures(before["cross-cam"], 0.0)
    for arm in arms:
        extra = lone(samples) if arm == "unsupervised" else {}
        version, r, secs = run_round(f"campus62-{arm}", extra.pop("samples", samples), config, **extra)
        after = evaluate(version)
        res[arm] = figures(after["cross-cam"], secs)
        for proto in ("all", "cross-cam"):
            print(f"campus62 {proto:9s} before (base, {before['size'][0]}x{before['size'][1]}): {fmt(before[proto])}")
            print(f"campus62 {proto:9s} after  ({arm}, {after['size'][0]}x{after['size'][1]}): {fmt(after[proto])}")
        for proto in ("all", "cross-cam"):
            rr = proto + " re-ranked"
            print(f"campus62 {proto:9s} re-ranked before: {fmt(before[rr])}   after ({arm}): {fmt(after[rr])}")
        print(f"campus62 {arm} round on {r['device']}: wall time {secs:.0f} s, peak memory so far {peak_mb():.0f} MB")


def mot_crops(seq: Path, scale: float, every: int, min_h: int = 32):
    """Person crops of one MOT sequence: list of (crop BGR, identity, frame)."""
    import cv2

    from core.services.ingest import IngestReport, parse_gt

    rep = IngestReport(str(seq), "mot", "bench")
    boxes = parse_gt(seq / "gt" / "gt.txt", rep)
    by_frame: dict[int, list] = {}
    for b in boxes:
        if b.frame % every == 0:
            by_frame.setdefault(b.frame, []).append(b)
    video = next(seq.glob("*.mp4"))
    cap = cv2.VideoCapture(str(video))
    out, n = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n += 1
        for b in by_frame.get(n, []):
            x, y, w, h = (v * scale for v in b.box)
            x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
            x1, y1 = min(frame.shape[1], int(round(x + w))), min(frame.shape[0], int(round(y + h)))
            if y1 - y0 >= min_h and x1 - x0 >= min_h // 4:
                out.append((frame[y0:y1, x0:x1].copy(), f"{seq.name}:{b.track}", n))
    cap.release()
    return out


def mot(config: TrainConfig, tmp: Path, arms: list[str], out: dict) -> None:
    import cv2

    base = shared_data() / "mot"
    seqs = [("PETS09-S2L1", 0.625, 5), ("TUD-Campus", 1.0, 3), ("TUD-Stadtmitte", 1.0, 3)]
    crops = []
    for name, scale, every in seqs:
        if (base / name).exists():
            crops += mot_crops(base / name, scale, every)
    if not crops:
        print(f"mot: skipped, {base} is absent")
        return
    paths = []
    for k, (img, ident, fr) in enumerate(crops):
        p = tmp / f"{k:05d}.png"
        cv2.imwrite(str(p), img)
        paths.append(str(p))
    idents = np.array([c[1] for c in crops])
    frames = np.array([c[2] for c in crops])
    ids = sorted(set(idents))
    counts = {i: int((idents == i).sum()) for i in ids}
    ids = [i for i in ids if counts[i] >= 4]
    rng = np.random.default_rng(0)
    perm = [ids[j] for j in rng.permutation(len(ids))]
    n_test = int(round(0.4 * len(perm)))
    test_ids, train_ids = set(perm[:n_test]), set(perm[n_test:])
    samples = [(paths[k], idents[k], idents[k].split(":")[0], 1.0) for k in range(len(paths)) if idents[k] in train_ids]
    q, g = [], []
    for i in sorted(test_ids):
        ks = np.nonzero(idents == i)[0]
        ks = ks[np.argsort(frames[ks])]
        q += ks[: len(ks) // 2].tolist()
        g += ks[len(ks) // 2:].tolist()
    print(f"mot: {len(crops)} crops, {len(ids)} identities; train {len(train_ids)} ids ({len(samples)} crops), "
          f"test {len(test_ids)} ids: query {len(q)} (first half of each track) vs gallery {len(g)} (second half)")

    def evaluate(version: str) -> tuple[dict, dict]:
        e, size = embed_arrays(version, lambda s: load_crops([paths[k] for k in q + g], s))
        eq, eg = e[: len(q)], e[len(q):]
        return tuple(ev.retrieval_metrics(eq, idents[q], eg, idents[g], rerank=rr) for rr in (False, True))

    before, before_rr = evaluate("base")
    res = out.setdefault("mot", {})
    res["base"] = figures(before, 0.0)
    frame_of = {paths[k]: (idents[k].split(":")[0], int(frames[k])) for k in range(len(paths))}
    for arm in arms:
        extra = {}
        if arm == "unsupervised":
            in_frame: dict[tuple, set] = {}
            for p, i, c, _w in samples:
                in_frame.setdefault(frame_of[p], set()).add(f"~{i}@{c}")
            cannot = sorted({(a, b) for ts in in_frame.values() for a in ts for b in ts if a < b})
            extra = lone(samples, cannot)
        version, r, secs = run_round(f"mot-{arm}", extra.pop("samples", samples), config, **extra)
        after, after_rr = evaluate(version)
        res[arm] = figures(after, secs)
        print(f"mot before (base):      {fmt(before)}")
        print(f"mot after  ({arm}): {fmt(after)}")
        print(f"mot re-ranked before: {fmt(before_rr)}   after ({arm}): {fmt(after_rr)}")
        print(f"mot {arm} round on {r['device']}: wall time {secs:.0f} s, peak memory so far {peak_mb():.0f} MB")


def plot(out: dict, path: Path) -> None:
    """mAP of base / supervised / unsupervised per set, as bars (``retrain_quality.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ["base", "supervised", "unsupervised"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k, arm in enumerate(arms):
        xs = [i + (k - 1) * 0.27 for i in range(len(out))]
        ys = [100 * r.get(arm, {}).get("mAP", float("nan")) for r in out.values()]
        ax.bar(xs, ys, width=0.27, label=arm)
        for x, y in zip(xs, ys):
            ax.text(x, y + 1, f"{y:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(out)), list(out))
    ax.set_ylabel("mAP %")
    ax.set_title("One default round: with labels, and with none")
    ax.set_ylim(0, 85)
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["campus62", "mot"])
    ap.add_argument("--steps", type=int, help="override TrainConfig.steps")
    ap.add_argument("--arms", default="supervised,unsupervised", help="comma-separated: supervised, unsupervised")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = TrainConfig() if a.steps is None else TrainConfig(steps=a.steps)
    arms = [x for x in a.arms.split(",") if x]
    if set(arms) - {"supervised", "unsupervised"}:
        ap.error(f"unknown arms {sorted(set(arms) - {'supervised', 'unsupervised'})}")
    print(f"default round: {config.to_dict()}")
    t0 = time.perf_counter()
    out: dict = {}
    if a.only in (None, "campus62"):
        campus62(config, arms, out)
    if a.only in (None, "mot"):
        with tempfile.TemporaryDirectory() as tmp:
            mot(config, Path(tmp), arms, out)
    for ds, r in out.items():
        if {"base", "supervised", "unsupervised"} <= set(r):
            gain_s, gain_u = r["supervised"]["mAP"] - r["base"]["mAP"], r["unsupervised"]["mAP"] - r["base"]["mAP"]
            share = gain_u / gain_s if gain_s > 0 else float("nan")
            print(f"{ds}: unsupervised recovers {100 * share:.0f} % of the supervised mAP gain "
                  f"({100 * gain_u:+.1f} vs {100 * gain_s:+.1f} points; target >= 50 %)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, OUT.with_suffix(".png"))
    print(f"wrote {OUT} and {OUT.with_suffix('.png').name}")
    print(f"total wall time {time.perf_counter() - t0:.0f} s, peak memory {peak_mb():.0f} MB "
          f"(2 shared cores: times are noisy)")


if __name__ == "__main__":
    main()
