"""Map layout at scale: Vigil's ``core.math.layout.layout`` against FiftyOne's
``fiftyone.brain.compute_visualization(method="umap")`` on the same vectors, in the same run.

Vectors: N **distinct crops**, each embedded by the packaged model (256-D, unit rows). The
sources are every real crop: campus62's and every ground-truth person box of the three MOT clips
(``benchmarks/embed_throughput.source_crops``). Each source gives its own crop, its mirror image and
seeded training augmentations (``core.math.augment.augment``: colour, cast shadow, low light, motion
blur, occlusion) until N rows are made. The vectors are cached in
``benchmarks/out/cache/map_vectors_<N>_distinct.npz``; a row equal to an earlier one (an augmentation
that drew no change, or only the flip, repeats its crop or mirror) is dropped and made up for, and the count of distinct rows is printed.

Quality, both on the same vectors:
- trustworthiness (``sklearn.manifold.trustworthiness``, 10 neighbours) of the 2-D map on a
  seeded sample of 5,000 rows: how many 2-D neighbours are true neighbours in 256-D;
- "same-id 10-NN": the share of a point's 10 nearest 2-D neighbours from the same person
  (campus62 identity, MOT track); the same figure in 256-D is printed as the ceiling.

Target: 100k laid out in <= 30 s on 2 cores, ahead of FiftyOne, trustworthiness no worse than
FiftyOne's by more than 0.02. Writes ``benchmarks/out/map_scale.json``.

Every measurement runs in a fresh subprocess, so peak memory (RSS, sampled every 20 ms while the
timed call runs, plus the process's ``ru_maxrss``) and numba JIT compile time are per method.
"JIT" is a warm-up call on 2,000 points in the same process, timed separately from "run".
FiftyOne's run is bounded by ``--fo-timeout`` seconds and reported as such when it runs over.

    python benchmarks/map_scale.py                 # 10k and 100k
    python benchmarks/map_scale.py --sizes 10000 --fo-timeout 600
    python benchmarks/map_scale.py --end-to-end    # also compute_layout through FiftyOne (DB)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A scratch data root and database (made once by the driver, inherited by its workers): the
# benchmark never touches an operator's data.
if "VIGIL_MAPBENCH_SCRATCH" not in os.environ:
    os.environ["VIGIL_MAPBENCH_SCRATCH"] = tempfile.mkdtemp(prefix="vigil-mapbench-")
SCRATCH = Path(os.environ["VIGIL_MAPBENCH_SCRATCH"])
os.environ.setdefault("VIGIL_DATA_ROOT", str(SCRATCH / "data"))
os.environ.setdefault("VIGIL_DB_NAME", f"vigil_mapbench_{uuid.uuid4().hex[:6]}")

import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------------------------
# worker side (runs in a subprocess): one timed method, JSON result on the last stdout line
# ----------------------------------------------------------------------------------------------


def _peak_sampler():
    import threading

    import psutil

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "run": True}

    def loop():
        while state["run"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(0.02)

    th = threading.Thread(target=loop, daemon=True)
    th.start()

    def stop() -> float:
        state["run"] = False
        th.join()
        return max(state["peak"], proc.memory_info().rss) / 2**20

    return stop


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, vec_path: str, marker: str) -> dict:
    import psutil

    X = np.load(vec_path)
    small = X[:2000].copy()
    out: dict = {"method": method, "n": len(X), "dim": X.shape[1]}
    base, stop = 0.0, None  # RSS before the measured run, its peak-memory sampler

    def timed(warm_up, run):
        """JIT warm-up, then the measured run (the parent samples memory from the marker on)."""
        nonlocal base, stop
        t = time.time()
        warm_up()
        out["jit_s"] = time.time() - t
        base = psutil.Process().memory_info().rss / 2**20
        stop = _peak_sampler()
        Path(marker).touch()
        t = time.time()
        r = run()
        out["run_s"] = time.time() - t
        return r

    if method == "vigil":
        from core.math import layout as L

        Y = timed(lambda: L.layout(small, seed=0), lambda: L.layout(X, seed=0))
    elif method == "fiftyone":
        from core.data import store  # sets FiftyOne's environment

        import fiftyone as fo
        import fiftyone.brain as fob
        import umap

        ds = fo.Dataset(f"mapbench_fo_{uuid.uuid4().hex[:6]}")
        t = time.time()
        ds.add_samples([fo.Sample(filepath=f"/bench/{i}.png") for i in range(len(X))], progress=False)
        out["dataset_s"] = time.time() - t
        res = timed(lambda: umap.UMAP(random_state=None).fit_transform(small),  # FiftyOne's JIT warm-up
                    lambda: fob.compute_visualization(ds, embeddings=X, method="umap", verbose=False,
                                                      progress=False))
        Y = np.asarray(res.points)
        ds.delete()
    elif method == "vigil_e2e":
        from core.math import layout as L
        from core.services import projection
        from core.data import store

        import fiftyone as fo

        name = f"mapbench_{uuid.uuid4().hex[:6]}"
        ds = store.get_dataset(name, create=True)
        t = time.time()
        for s in range(0, len(X), 10_000):
            store.add_samples(ds, [fo.Sample(filepath=f"/bench/{i}.png", emb_base=X[i]) for i in range(s, min(len(X), s + 10_000))])
        out["dataset_s"] = time.time() - t
        m = timed(lambda: L.layout(small, seed=0), lambda: projection.compute_layout(name, "base"))
        t = time.time()
        again = projection.compute_layout(name, "base")
        out["cached_s"] = time.time() - t
        out["cache_hit"] = not again.computed
        Y = m.coords  # ids follow dataset order = X order
        store.delete_dataset(name)
    else:
        raise ValueError(method)
    out["peak_rss_mb"] = stop()
    out["rss_before_mb"] = base
    out["maxrss_mb"] = _maxrss_mb()
    Y = np.asarray(Y, dtype=np.float32)
    out["id10"] = identity_agreement(Y, np.load(_labels_path(vec_path)))
    out["trust"] = trust(X, Y)
    return out


TRUST_SAMPLE = 5000  # trustworthiness is quadratic in the rows: a seeded sample, the same for every method


def trust(X: np.ndarray, Y: np.ndarray, k: int = 10) -> float:
    from sklearn.manifold import trustworthiness

    s = np.sort(np.random.default_rng(0).choice(len(X), min(TRUST_SAMPLE, len(X)), replace=False))
    return float(trustworthiness(X[s], Y[s], n_neighbors=k))


def _labels_path(vec_path: str | Path) -> Path:
    return Path(str(vec_path).replace(".npy", "_identity.npy"))


def identity_agreement(V: np.ndarray, ident: np.ndarray, k: int = 10, sample: int = 2000) -> float:
    """Share of the k nearest neighbours (in V, any dimension) of sampled rows that show the same
    person (campus62 identity of the real crop a row derives from)."""
    from core.math.neighbours import topk

    q = np.random.default_rng(0).choice(len(V), min(sample, len(V)), replace=False)
    idx, _ = topk(V[q], V, k + 1, metric="l2")
    return float((ident[idx[:, 1:]] == ident[q][:, None]).mean())


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


class CropVariants:
    """The distinct crops behind the vectors: every real source crop
    (``embed_throughput.source_crops``) at the model's input size, then at variant 1 its mirror
    image and at variant v >= 2 a seeded ``core.math.augment.augment`` of it. ``keys``: each
    source's person (campus62 identity or MOT clip:track); ``cameras``: its camera."""

    def __init__(self, seed: int = 0):
        from core.model import embed

        sys.path.insert(0, str(REPO / "benchmarks"))
        from embed_throughput import source_crops

        self.seed = seed
        self.paths = source_crops(REPO / "benchmarks" / "out" / "cache" / "embed_crops")
        mot = [p.parent.name == "embed_crops" for p in self.paths]
        self.keys = np.array([f"mot:{p.name.split('_')[0]}:{p.stem.split('_')[-1]}" if m
                              else f"campus62:{p.parent.name}" for p, m in zip(self.paths, mot)])
        self.cameras = np.array([f"mot:{p.name.split('_')[0]}" if m else f"campus62:{p.stem.split('_')[0]}"
                                 for p, m in zip(self.paths, mot)])
        self.size = embed.model_config("base").input_size("crop")
        self._imgs: dict[int, np.ndarray] = {}

    def rows(self, n: int) -> list[tuple[int, int]]:
        """(variant v, source j) of the first n rows: every source at each variant in turn."""
        return [(i // len(self.paths), i % len(self.paths)) for i in range(n)]

    def make(self, vj: tuple[int, int]) -> np.ndarray:
        """Row ``(v, j)``'s image, [H, W, 3] BGR uint8."""
        from core.math import augment
        from core.model import embed

        v, j = vj
        if j not in self._imgs:
            self._imgs[j] = embed.load_image(self.paths[j], self.size)
        img = self._imgs[j]
        if v == 1:
            return augment.hflip(img)
        return img if v == 0 else augment.augment(img, np.random.default_rng([self.seed, v, j]))


def distinct_vectors(n: int, batch: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, 256] embeddings of n distinct crops (see the module docstring) and each row's
    person key [n] (campus62 identity or MOT clip:track); cached per n."""
    cache = REPO / "benchmarks" / "out" / "cache" / f"map_vectors_{n}_distinct.npz"
    if cache.exists():
        z = np.load(cache)
        return z["X"], z["key"]
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from core.model import embed

    src = CropVariants(seed)
    n_gen = n + n // 8 + batch  # ~7 % of augmentations draw no change (or only the flip): made and dropped
    rows = src.rows(n_gen)
    cfg = embed.model_config("base")
    sess = embed.onnx_session("base")
    X = np.empty((n_gen, cfg.emb_dim), np.float32)
    with ThreadPoolExecutor(2) as pool:
        for s0 in tqdm(range(0, n_gen, batch), desc=f"embedding {n} distinct crops", unit="batch"):
            x = np.stack(list(pool.map(src.make, rows[s0: s0 + batch])))
            X[s0: s0 + len(x)] = sess.run(None, {"image": x})[0]
    first = np.sort(np.unique(X, axis=0, return_index=True)[1])[:n]  # each distinct row once, in order
    if len(first) < n:
        sys.exit(f"only {len(first)} distinct vectors could be made, {n} asked")
    X, key = X[first], src.keys[[rows[i][1] for i in first]]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, X=X, key=key)
    return X, key


def run_worker(method: str, vec_path: Path, run_timeout: float) -> dict:
    """Run one method in a fresh process; ``run_timeout`` bounds the timed call only (the worker
    touches a marker file just before it), dataset creation and JIT warm-up are not counted.
    Output goes through files: FiftyOne's database service outlives the worker and would keep
    pipes open."""
    tag = f"{method}_{vec_path.stem}"
    marker, result, log_path = (SCRATCH / f"{tag}.{ext}" for ext in ("started", "json", "log"))
    for f in (marker, result):
        f.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", method, str(vec_path), str(marker), str(result)]
    with open(log_path, "w") as log_file:
        p = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while p.poll() is None and not marker.exists():
            time.sleep(0.5)
        try:
            p.wait(timeout=run_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return {"method": method, "timeout": run_timeout}
    if p.returncode != 0 or not result.exists():
        return {"method": method, "error": log_path.read_text().strip().splitlines()[-3:]}
    return json.loads(result.read_text())


def fmt(r: dict) -> str:
    name = {"vigil": "vigil layout()", "fiftyone": "fiftyone umap", "vigil_e2e": "vigil compute_layout (DB)"}[r["method"]]
    if "timeout" in r:
        return f"  {name:27s} DID NOT FINISH within {r['timeout']:.0f} s (killed; no result)"
    if "error" in r:
        return f"  {name:27s} ERROR {r['error']}"
    extra = ""
    if "cached_s" in r:
        extra = f"  cached call {r['cached_s']:.2f} s (hit={r['cache_hit']})"
    return (f"  {name:27s} run {r['run_s']:7.1f} s   JIT/warm-up {r.get('jit_s', 0):5.1f} s   "
            f"peak RSS {r['peak_rss_mb']:6.0f} MB (before {r['rss_before_mb']:5.0f} MB)   "
            f"same-id 10-NN {r['id10']:.3f}   trustworthiness {r['trust']:.3f}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--fo-timeout", type=float, default=600.0, help="seconds FiftyOne may run per size")
    ap.add_argument("--end-to-end", action="store_true", help="also time compute_layout via the DB")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, vec_path, marker, result = args.worker
        Path(result).write_text(json.dumps(worker(method, vec_path, marker)))
        return

    import psutil

    print(f"map_scale: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GB RAM; python {sys.version.split()[0]}", flush=True)
    try:
        _run_sizes(args)
    finally:
        import shutil

        shutil.rmtree(SCRATCH, ignore_errors=True)


def _run_sizes(args: argparse.Namespace) -> None:
    from core.data import store

    # The driver stays a database client for the whole run: FiftyOne stops its MongoDB service
    # when the last client exits, and a worker starting meanwhile then finds no server.
    store.dataset_names()
    X_all, key_all = distinct_vectors(max(args.sizes))
    report: dict = {}
    for n in args.sizes:
        X, key = X_all[:n], key_all[:n]
        distinct = len(np.unique(X, axis=0))
        path = SCRATCH / f"vectors_{n}.npy"
        np.save(path, X)
        np.save(_labels_path(path), key)
        print(f"\nN = {n:,} x {X.shape[1]}-D, {distinct:,} distinct rows ({len(set(key)):,} people), load average "
              f"{os.getloadavg()[0]:.1f}; same-id 10-NN in {X.shape[1]}-D (ceiling): {identity_agreement(X, key):.3f}",
              flush=True)
        results = [run_worker("vigil", path, 900)]
        print(fmt(results[-1]), flush=True)
        results.append(run_worker("fiftyone", path, args.fo_timeout))
        print(fmt(results[-1]), flush=True)
        if args.end_to_end:
            results.append(run_worker("vigil_e2e", path, 900))
            print(fmt(results[-1]), flush=True)
        v, f = results[0], results[1]
        if "run_s" in v and "run_s" in f:
            print(f"  -> vigil {f['run_s'] / v['run_s']:.1f}x faster than FiftyOne's UMAP; trustworthiness "
                  f"{v['trust']:.3f} vs {f['trust']:.3f} ({v['trust'] - f['trust']:+.3f}; target >= -0.02)", flush=True)
        elif "run_s" in v and "timeout" in f:
            print(f"  -> FiftyOne did not finish in {args.fo_timeout:.0f} s; vigil took {v['run_s']:.1f} s", flush=True)
        report[str(n)] = {
            "n": n, "distinct": distinct,
            "seconds": {r["method"]: r.get("run_s") for r in results},
            "ratios": {"fiftyone_over_vigil": f["run_s"] / v["run_s"]} if "run_s" in v and "run_s" in f else {},
            "trustworthiness": {r["method"]: r.get("trust") for r in results},
            "same_id_10nn": {r["method"]: r.get("id10") for r in results},
            "peak_rss_mb": {r["method"]: r.get("peak_rss_mb") for r in results},
            "timeouts": {r["method"]: r["timeout"] for r in results if "timeout" in r}}
    out = REPO / "benchmarks" / "out" / "map_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    big = report[str(max(args.sizes))]
    out.write_text(json.dumps({**big, "sizes": report}, indent=2))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
