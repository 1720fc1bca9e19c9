"""Probe a round's settings without touching the benchmark's evaluation set.

    .venv/bin/python benchmarks/probe_campus62.py [--unsupervised] [--set field=value ...] [--seed N]

campus62 ``train/`` only (the benchmark evaluates on ``val/``, never seen here): 12 of its 62
identities (seeded) are held out, the round trains on the other 50 (``--unsupervised``: their
identities hidden, each identity's crops of one camera a lone tracklet), and the checkpoint is
scored cross-camera on the held-out 12 (every crop a query against the other camera's crops, so
a probe judges exactly what the defaults are for). Prints one line; writes only to a temporary
data root.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VIGIL_DATA_ROOT", tempfile.mkdtemp(prefix="vigil-probe-"))

from core.math import evaluate as ev  # noqa: E402
from core.config import settings, shared_data  # noqa: E402
from core.model.train import TrainConfig, _embed_array, load_crops, train_round  # noqa: E402


def split(split_seed: int = 0) -> tuple[list[Path], np.ndarray, np.ndarray, set[str]]:
    """campus62 ``train/`` crops, their identities and cameras, and the 12 held-out identities."""
    root = shared_data() / "reid" / "campus62" / "train"
    ps = sorted(root.glob("*/*.png"))
    ident = np.array([p.parent.name for p in ps])
    cam = np.array([p.stem[:2] for p in ps])
    ids = sorted(set(ident))
    rng = np.random.default_rng(split_seed)
    return ps, ident, cam, set(ids[i] for i in rng.permutation(len(ids))[:12])


def probe(cfg: TrainConfig, split_seed: int = 0, unsupervised: bool = False, version: str = "probe") -> dict:
    """Train ``cfg`` on the 50 training identities; base and round scored on the held-out 12."""
    ps, ident, cam, held = split(split_seed)
    tr = [k for k in range(len(ps)) if ident[k] not in held]
    if unsupervised:
        samples = [(str(ps[k]), f"~{ident[k]}-{cam[k]}", cam[k], 1.0) for k in tr]
        open_ids = sorted({s[1] for s in samples})
    else:
        samples = [(str(ps[k]), ident[k], cam[k], 1.0) for k in tr]
        open_ids = []
    t0 = time.perf_counter()
    r = train_round(samples, cfg, init_version="base", out_dir=settings().models_dir / version,
                    open_identities=open_ids)
    secs = time.perf_counter() - t0
    from core.model.embed import load_model

    te = [k for k in range(len(ps)) if ident[k] in held]
    out = {}
    for v in ("base", version):
        model, mcfg = load_model(v)
        e = _embed_array(model, load_crops([str(ps[k]) for k in te], mcfg.crop_size))
        out[v] = ev.leave_one_out_metrics(e, ident[te], cam[te])
    pseudo = r.get("pseudo") or {}
    return {"base_mAP": round(100 * out["base"]["mAP"], 1), "mAP": round(100 * out[version]["mAP"], 1),
            "rank1": round(100 * out[version]["rank1"], 1), "best_step": r["best_step"],
            "steps": r["steps_run"], "seconds": round(secs), "device": r["device"],
            "last_recluster": ((pseudo.get("reclusters") or [{}])[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unsupervised", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides field=value")
    ap.add_argument("--split-seed", type=int, default=0)
    a = ap.parse_args()
    over = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            over[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            over[k] = v
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **over})
    res = probe(cfg, a.split_seed, a.unsupervised)
    print(json.dumps({"set": over, "unsupervised": a.unsupervised, **res}), flush=True)


if __name__ == "__main__":
    main()
