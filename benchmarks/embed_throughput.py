"""Embedding throughput: FiftyOne's compute_embeddings, Vigil's ONNX Runtime path, and the bound.

Distinct real crops (no file repeated; the count of distinct file contents is printed and
written): every campus62 crop, every ground-truth person box of the three MOT clips cut from
its frame, then their mirror images where more are asked for (a mirrored crop is another image
of the same size). They are cut once into ``benchmarks/out/cache/embed_crops/``.

Three sides, the same network (packaged ImageNet MobileNetV2 + the "base" projection head), the
same weights and input size (the crop size of the model config, 256x128):

- FiftyOne: ``dataset.compute_embeddings(TorchImageModel(...))`` with FiftyOne's defaults
  (DataLoader, PIL decode, torchvision transforms, PyTorch eager).
- Vigil: ``core.services.embedding.embed_dataset`` (OpenCV decode/resize in a thread pool, ONNX
  Runtime, vectors written to the dataset).
- The bound: the same ONNX Runtime session alone on tensors decoded and resized beforehand (no
  file, no decode, no database): what the network costs on this machine.

Both file-reading sides are warm: each makes one untimed pass over the same files first (page
cache, lazy imports, sessions), then the timed one. Then Vigil's engine alone on ``--big``
distinct files to show the rate holds and memory stays bounded (streaming). Peak memory is the
resident set (process plus children, sampled every 10 ms). Targets: Vigil >= 6x FiftyOne and
>= 0.8 of the bound.

Writes ``benchmarks/out/embed_throughput.json`` ({"n", "distinct", "seconds", "ratios", ...}).
Runs in a temporary data root and database (never touches an operator's data):

    .venv/bin/python benchmarks/embed_throughput.py [--n 1000] [--big 9000]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "out"
MIN_SIDE = 12  # ground-truth boxes smaller than this (pixels) are left out


class PeakRSS:
    """Peak resident memory (this process + its children) while the block runs, in MiB."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.start = 0.0

    def _rss(self) -> float:
        total = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except Exception:  # noqa: BLE001 - a worker that just exited
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def source_crops(cache: Path) -> list[Path]:
    """Every real crop of distinct content: campus62's files and each MOT ground-truth box cut
    from its clip into ``cache`` (``<clip>_<frame>_<track>.png``, once)."""
    import cv2
    import numpy as np
    from tqdm import tqdm

    from core.config import shared_data

    data = shared_data()
    out: list[Path] = sorted((data / "reid" / "campus62").glob("*/*/*.png"))
    cache.mkdir(parents=True, exist_ok=True)
    for clip in sorted((data / "mot").iterdir()):
        gt = np.loadtxt(clip / "gt" / "gt.txt", delimiter=",", ndmin=2)
        done = cache / f"{clip.name}.done"
        files = [cache / f"{clip.name}_{int(r[0]):06d}_{int(r[1]):04d}.png" for r in gt]
        if not done.exists():
            cap = cv2.VideoCapture(str(clip / f"{clip.name}.mp4"))
            by_frame: dict[int, list[int]] = {}
            for k, r in enumerate(gt):
                by_frame.setdefault(int(r[0]), []).append(k)
            for frame in tqdm(range(1, max(by_frame) + 1), desc=f"cutting {clip.name}", unit="frame"):
                ok, img = cap.read()  # MOT frame 1 is the video's first
                if not ok:
                    break
                for k in by_frame.get(frame, ()):
                    r = gt[k]
                    x0, y0 = max(0, int(r[2])), max(0, int(r[3]))
                    x1, y1 = min(img.shape[1], int(r[2] + r[4])), min(img.shape[0], int(r[3] + r[5]))
                    if x1 - x0 >= MIN_SIDE and y1 - y0 >= MIN_SIDE:
                        cv2.imwrite(str(files[k]), img[y0:y1, x0:x1])
            cap.release()
            done.touch()
        out += [f for f in files if f.exists()]
    return _unique(out)


def distinct_crops(n: int, cache: Path) -> list[Path]:
    """``n`` crop files of distinct content (see the module docstring): :func:`source_crops`,
    then their mirror images where more are asked for."""
    import cv2
    import numpy as np

    out = source_crops(cache)
    mirrored = []
    for p in out[: max(0, n - len(out))]:
        m = cache / f"mirror_{hashlib.sha1(str(p).encode()).hexdigest()[:12]}.png"
        if not m.exists():
            cv2.imwrite(str(m), cv2.flip(cv2.imread(str(p)), 1))
        mirrored.append(m)
    out += mirrored
    out = _unique(out)
    if len(out) < n:
        sys.exit(f"only {len(out)} distinct crops can be made here, {n} asked")
    rng = np.random.default_rng(0)  # a fixed mix of sources for any n
    return [out[i] for i in sorted(rng.choice(len(out), n, replace=False))]


def _unique(paths: list[Path]) -> list[Path]:
    """``paths`` with each file content once (a few sources repeat a picture byte for byte)."""
    by_content: dict[str, Path] = {}
    for p in paths:
        by_content.setdefault(hashlib.sha1(p.read_bytes()).hexdigest(), p)
    return list(by_content.values())


def distinct_count(paths: list[Path]) -> int:
    return len({hashlib.sha1(p.read_bytes()).hexdigest() for p in paths})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="distinct crops for the three-way comparison")
    ap.add_argument("--big", type=int, default=9000,
                    help="distinct crops for the streaming run (0: skip; the real data makes 9398)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vigil-embbench-"))
    os.environ["VIGIL_DATA_ROOT"] = str(tmp)
    os.environ["VIGIL_DB_NAME"] = f"vigil_embbench_{uuid.uuid4().hex[:8]}"
    os.environ.pop("FIFTYONE_DATABASE_URI", None)

    from core.data import store  # sets FiftyOne's env first

    import fiftyone as fo
    import fiftyone.utils.torch as fout
    import numpy as np
    import torch
    from tqdm import tqdm

    from core.model import backbones, embed
    from core.services import embedding

    pool = distinct_crops(max(args.n, args.big), OUT / "cache" / "embed_crops")
    crops = pool[: args.n]
    distinct = distinct_count(crops)
    model, cfg = embed.load_model("base")
    size = cfg.input_size("crop")
    print(f"data: {len(crops)} crops ({distinct} distinct files) -> {size[0]}x{size[1]}; cores: {os.cpu_count()}; "
          f"torch threads: {torch.get_num_threads()}; batch {args.batch_size}; data root: {tmp}")

    name = "embbench"
    try:
        ds = store.get_dataset(name, create=True)
        store.add_samples(ds, [fo.Sample(filepath=str(p), kind="crop") for p in crops])

        # --- FiftyOne: TorchImageModel around the same network ---------------------------------
        bb = backbones.get_backbone(cfg.backbone)

        class Normalized(torch.nn.Module):  # FiftyOne's transforms already normalise
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m.forward_normalized(x)

        fo_model = fout.TorchImageModel(fout.TorchImageModelConfig({
            "model": Normalized(model),
            # torchvision Resize takes (H, W) although FiftyOne's docstring says (width, height)
            "image_size": list(size),
            "image_mean": list(bb.mean), "image_std": list(bb.std),
            "as_feature_extractor": True,
            "device": "cpu",
        }))
        ds.compute_embeddings(fo_model, embeddings_field="emb_warm", batch_size=args.batch_size,
                              progress=True)  # the untimed pass: page cache, lazy imports, allocator
        with PeakRSS() as mem_fo:
            t0 = time.perf_counter()
            ds.compute_embeddings(fo_model, embeddings_field="emb_fiftyone",
                                  batch_size=args.batch_size, progress=True)
            t_fo = time.perf_counter() - t0

        # --- Vigil: ONNX Runtime ---------------------------------------------------------------
        t0 = time.perf_counter()
        embed.onnx_path("base")
        t_export = time.perf_counter() - t0
        embedding.embed_dataset(name, "base", batch_size=args.batch_size)  # the untimed pass
        bar = tqdm(total=len(crops), desc="vigil embed_dataset", unit="img")
        with PeakRSS() as mem_v:
            t0 = time.perf_counter()
            report = embedding.embed_dataset(name, "base", progress=lambda d, t: bar.update(d - bar.n),
                                             batch_size=args.batch_size)
            t_v = time.perf_counter() - t0
        bar.close()
        assert report["embedded"] == len(crops), report

        # --- the bound: the same session on tensors decoded and resized beforehand -------------
        sess = embed.onnx_session("base")
        x = np.stack([embed.load_image(p, size) for p in crops])
        for s in range(0, min(len(x), 2 * args.batch_size), args.batch_size):  # warm
            sess.run(None, {"image": x[s: s + args.batch_size]})
        t0 = time.perf_counter()
        bound = [sess.run(None, {"image": x[s: s + args.batch_size]})[0] for s in range(0, len(x), args.batch_size)]
        t_bound = time.perf_counter() - t0

        a = np.stack(ds.values("emb_fiftyone")).astype(np.float32)
        b = np.stack(ds.values("emb_base")).astype(np.float32)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        agree = float((a * b).sum(1).mean())
        same_bound = float(np.abs(np.concatenate(bound) - b).max())

        rate = {"fiftyone": len(crops) / t_fo, "vigil": len(crops) / t_v, "bound": len(crops) / t_bound}
        ratios = {"vigil_over_fiftyone": rate["vigil"] / rate["fiftyone"], "vigil_over_bound": rate["vigil"] / rate["bound"]}
        print(f"ONNX export (once per model version): {t_export:.1f} s")
        print(f"FiftyOne compute_embeddings: {len(crops)} crops in {t_fo:.2f} s = {rate['fiftyone']:.1f} img/s, "
              f"peak RSS {mem_fo.peak:.0f} MiB (+{mem_fo.peak - mem_fo.start:.0f} MiB)")
        print(f"Vigil embed_dataset (ONNX Runtime): {len(crops)} crops in {t_v:.2f} s = {rate['vigil']:.1f} img/s, "
              f"peak RSS {mem_v.peak:.0f} MiB (+{mem_v.peak - mem_v.start:.0f} MiB)")
        print(f"bound (the ONNX Runtime session alone on pre-decoded, pre-resized tensors): {t_bound:.2f} s = "
              f"{rate['bound']:.1f} img/s; its vectors match Vigil's to {same_bound:.1e}")
        print(f"ratio Vigil / FiftyOne: {ratios['vigil_over_fiftyone']:.1f}x (target >= 6x); "
              f"Vigil / bound: {ratios['vigil_over_bound']:.2f} (target >= 0.8)")
        print(f"same network: mean cosine between the FiftyOne and Vigil fields {agree:.4f} (PIL vs OpenCV resize)")
        result = {"n": len(crops), "distinct": distinct, "batch_size": args.batch_size, "input_size": list(size),
                  "cpu_count": os.cpu_count(),
                  "seconds": {"fiftyone": t_fo, "vigil": t_v, "bound": t_bound, "onnx_export": t_export},
                  "rates": rate, "ratios": ratios,
                  "peak_rss_mib": {"fiftyone": mem_fo.peak, "vigil": mem_v.peak}, "mean_cosine_fo_vigil": agree}

        # --- streaming: --big distinct files ---------------------------------------------------
        if args.big:
            paths = pool[: args.big]
            n_big = distinct_count(paths)
            embed.embed_paths(paths[: args.batch_size * 2], batch_size=args.batch_size)  # warm
            bar = tqdm(total=len(paths), desc=f"vigil embed_paths {len(paths)}", unit="img")
            with PeakRSS() as mem_big:
                t0 = time.perf_counter()
                vecs, errors = embed.embed_paths(paths, batch_size=args.batch_size,
                                                 progress=lambda d, t: bar.update(d - bar.n))
                t_big = time.perf_counter() - t0
            bar.close()
            assert not errors and vecs.shape == (len(paths), cfg.emb_dim)
            print(f"Vigil embed_paths streaming: {len(paths)} images ({n_big} distinct files) in {t_big:.1f} s = "
                  f"{len(paths) / t_big:.1f} img/s, peak RSS {mem_big.peak:.0f} MiB "
                  f"(+{mem_big.peak - mem_big.start:.0f} MiB; the output alone is {vecs.nbytes / 2**20:.0f} MiB)")
            result["seconds"]["vigil_big"] = t_big
            result["big"] = {"n": len(paths), "distinct": n_big, "rate": len(paths) / t_big,
                             "peak_rss_mib": mem_big.peak}
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "embed_throughput.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {OUT / 'embed_throughput.json'}")
    finally:
        store.delete_dataset(name)


if __name__ == "__main__":
    main()
