"""Embedding throughput: FiftyOne's compute_embeddings vs Vigil's ONNX Runtime path, one run.

Both embed the same 640 campus62 crops (48x128 PNG, resized to 256x128) with the same network
(packaged ImageNet MobileNetV2 + the "base" projection head) and store the vectors in a field:

- FiftyOne: ``dataset.compute_embeddings(TorchImageModel(...))`` with FiftyOne's defaults
  (DataLoader, PIL decode, torchvision transforms, PyTorch eager).
- Vigil: ``core.services.embedding.embed_dataset`` (OpenCV decode/resize in a thread pool, ONNX Runtime).

Then Vigil's engine alone on 10,000 paths (the crops repeated) to show the rate holds and
memory stays bounded (streaming). Peak memory is the resident set (process plus children,
sampled every 10 ms) during each phase. Target: Vigil >= 6x FiftyOne.

Runs in a temporary data root and database (never touches an operator's data):

    .venv/bin/python benchmarks/embed_throughput.py [--n 640] [--big 10000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=640, help="crops for the FiftyOne comparison")
    ap.add_argument("--big", type=int, default=10_000, help="paths for the streaming run (0: skip)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vigil-embbench-"))
    os.environ["VIGIL_DATA_ROOT"] = str(tmp)
    os.environ["VIGIL_DB_NAME"] = f"vigil_embbench_{uuid.uuid4().hex[:8]}"
    os.environ.pop("FIFTYONE_DATABASE_URI", None)

    from core.data import store  # sets FiftyOne's env first
    from core.config import shared_data

    import fiftyone as fo
    import fiftyone.utils.torch as fout
    import numpy as np
    import torch
    from tqdm import tqdm

    from core.model import embed

    from core.services import embedding

    crops_dir = shared_data() / "reid" / "campus62" / "train"
    if not crops_dir.exists():
        sys.exit(f"real data not available: {crops_dir} (see ../shared/data/README.md)")
    crops = sorted(crops_dir.glob("*/*.png"))[: args.n]
    print(f"data: {len(crops)} campus62 crops (48x128 PNG) -> 256x128; cores: {os.cpu_count()}; "
          f"torch threads: {torch.get_num_threads()}; data root: {tmp}")

    name = "embbench"
    try:
        ds = store.get_dataset(name, create=True)
        store.add_samples(ds, [fo.Sample(filepath=str(p), kind="crop") for p in crops])

        # --- FiftyOne: TorchImageModel around the same network ---------------------------------
        model, cfg = embed.load_model("base")
        bb = embed.backbones.get_backbone(cfg.backbone)

        class Normalized(torch.nn.Module):  # FiftyOne's transforms already normalise
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m.forward_normalized(x)

        fo_model = fout.TorchImageModel(fout.TorchImageModelConfig({
            "model": Normalized(model),
            # torchvision Resize takes (H, W) although FiftyOne's docstring says (width, height)
            "image_size": list(cfg.crop_size),
            "image_mean": list(bb.mean), "image_std": list(bb.std),
            "as_feature_extractor": True,
            "device": "cpu",
        }))
        ds.limit(8).compute_embeddings(fo_model, embeddings_field="emb_warm", batch_size=8,
                                       progress=False)  # warm-up (lazy imports, allocator)
        with PeakRSS() as mem_fo:
            t0 = time.perf_counter()
            ds.compute_embeddings(fo_model, embeddings_field="emb_fiftyone",
                                  batch_size=args.batch_size, progress=True)
            t_fo = time.perf_counter() - t0
        rate_fo = len(crops) / t_fo

        # --- Vigil: ONNX Runtime ---------------------------------------------------------------
        t0 = time.perf_counter()
        embed.onnx_path("base")
        t_export = time.perf_counter() - t0
        embed.embed_paths(crops[:8])  # warm-up: session creation
        bar = tqdm(total=len(crops), desc="vigil embed_dataset", unit="img")

        def prog(done: int, total: int) -> None:
            bar.update(done - bar.n)

        with PeakRSS() as mem_v:
            t0 = time.perf_counter()
            report = embedding.embed_dataset(name, "base", progress=prog, batch_size=args.batch_size)
            t_v = time.perf_counter() - t0
        bar.close()
        rate_v = len(crops) / t_v
        assert report["embedded"] == len(crops), report

        a = np.stack(ds.values("emb_fiftyone")).astype(np.float32)
        b = np.stack(ds.values("emb_base")).astype(np.float32)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        agree = float((a * b).sum(1).mean())

        print(f"ONNX export (once per model version): {t_export:.1f} s")
        print(f"FiftyOne compute_embeddings: {len(crops)} crops in {t_fo:.2f} s = "
              f"{rate_fo:.1f} img/s, peak RSS {mem_fo.peak:.0f} MiB "
              f"(+{mem_fo.peak - mem_fo.start:.0f} MiB)")
        print(f"Vigil embed_dataset (ONNX Runtime): {len(crops)} crops in {t_v:.2f} s = "
              f"{rate_v:.1f} img/s, peak RSS {mem_v.peak:.0f} MiB "
              f"(+{mem_v.peak - mem_v.start:.0f} MiB)")
        print(f"ratio Vigil / FiftyOne: {rate_v / rate_fo:.1f}x (target >= 6x)")
        print(f"same network: mean cosine between the two fields {agree:.4f} "
              "(PIL vs OpenCV resize)")

        # --- streaming: 10k paths --------------------------------------------------------------
        if args.big:
            paths = [crops[i % len(crops)] for i in range(args.big)]
            bar = tqdm(total=len(paths), desc="vigil embed_paths 10k", unit="img")
            with PeakRSS() as mem_big:
                t0 = time.perf_counter()
                vecs, errors = embed.embed_paths(
                    paths, batch_size=args.batch_size,
                    progress=lambda d, t: bar.update(d - bar.n))
                t_big = time.perf_counter() - t0
            bar.close()
            assert not errors and vecs.shape == (len(paths), cfg.emb_dim)
            same = bool(np.array_equal(vecs[: len(crops)], vecs[len(crops): 2 * len(crops)]))
            print(f"Vigil embed_paths streaming: {len(paths)} images in {t_big:.1f} s = "
                  f"{len(paths) / t_big:.1f} img/s, peak RSS {mem_big.peak:.0f} MiB "
                  f"(+{mem_big.peak - mem_big.start:.0f} MiB; the output alone is "
                  f"{vecs.nbytes / 2**20:.0f} MiB); repeated crops identical: {same}")
    finally:
        store.delete_dataset(name)


if __name__ == "__main__":
    main()
