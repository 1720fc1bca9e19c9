"""Model export: verified ONNX (+ int8) with metadata and a model card (see :mod:`core.services.export`)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


from core.services.export.base import (ExportError, ONNX_TOLERANCE, Progress, VERIFY_CROPS, _noop, _staged, _write_json, model_export_name, retrieval_metrics, safe_export_path)

from core.services.export.card import (_set_metadata, _version_record, model_card, model_metadata)
log = logging.getLogger(__name__)


# --- model export --------------------------------------------------------------------------


def _ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _load_crops(paths: Sequence[str], size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """Decoded crops ``[N, H, W, 3]`` BGR uint8 and the indices of ``paths`` that decoded."""
    from core.model import embed

    imgs, ok = [], []
    for i, p in enumerate(paths):
        try:
            imgs.append(embed.load_image(p, size))
            ok.append(i)
        except ValueError as exc:
            log.warning("skipped %s: %s", p, exc)
    h, w = size
    return (np.stack(imgs) if imgs else np.zeros((0, h, w, 3), np.uint8)), ok


def _run_ort(sess, x: np.ndarray, batch: int = 64) -> tuple[np.ndarray, float]:
    """Embeddings ``[N, D]`` and milliseconds per image."""
    t0 = time.perf_counter()
    out = [sess.run(None, {"image": x[i: i + batch]})[0] for i in range(0, len(x), batch)]
    ms = 1000 * (time.perf_counter() - t0) / max(1, len(x))
    return (np.concatenate(out) if out else np.zeros((0, 0), np.float32)), ms


def spread_by_identity(identities: Sequence, cap: int, rng: np.random.Generator,
                       first: set | frozenset = frozenset()) -> list[int]:
    """Indices (ascending) of at most ``cap`` items spread evenly over their identities: one item
    per identity per pass (identities in ``first`` first in each pass, then the others, each group
    in an order shuffled by ``rng``; items within an identity shuffled), until ``cap``. Every
    identity keeps an item while ``cap`` is at least the number of identities."""
    n = len(identities)
    if n <= cap:
        return list(range(n))
    groups: dict[str, list[int]] = {}
    for i, x in enumerate(identities):
        groups.setdefault(str(x), []).append(i)
    names = sorted(groups)
    names = [names[i] for i in rng.permutation(len(names))]
    first = {str(x) for x in first}
    names = [x for x in names if x in first] + [x for x in names if x not in first]
    queues = [[groups[x][i] for i in rng.permutation(len(groups[x]))] for x in names]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < cap:
        for q in queues:
            if depth < len(q):
                chosen.append(q[depth])
                if len(chosen) == cap:
                    break
        depth += 1
    return sorted(chosen)


def eval_set(dataset: str, max_query: int = 200, max_gallery: int = 1000, seed: int = 0,
             ) -> dict[str, list] | None:
    """Query/gallery crops of ``dataset`` (``split`` field or tag "query"/"gallery", with an
    identity): {q_paths, q_ids, q_cams, q_keys, g_paths, g_ids, g_cams, g_keys}, or None when it
    has no such split. Keys are sample ids: a crop tagged both is on both sides, and scoring with
    the keys keeps a query from finding itself, with or without cameras.

    Above the caps, crops are drawn spread over identities (:func:`spread_by_identity`, seeded):
    queries first, then the gallery with the chosen queries' identities first in each pass, so
    no identity vanishes the way it would under a cut by file path."""
    from core.data import store

    rng = np.random.default_rng(seed)
    cols: dict[str, tuple[list, ...]] = {}
    for split, key in (("query", "q"), ("gallery", "g")):
        cols[key] = tuple(store.split_columns(dataset, split, ["id", "filepath", "identity", "camera"]))
        if not cols[key][0]:
            return None
    g_idents = {str(x) for x in cols["g"][2]}
    out: dict[str, list] = {}
    q_sel = spread_by_identity(cols["q"][2], max_query, rng, first=g_idents)
    g_sel = spread_by_identity(cols["g"][2], max_gallery, rng, first={str(cols["q"][2][i]) for i in q_sel})
    for key, sel in (("q", q_sel), ("g", g_sel)):
        ids, paths, idents, cams = cols[key]
        out[f"{key}_keys"] = [ids[i] for i in sel]
        out[f"{key}_paths"] = [paths[i] for i in sel]
        out[f"{key}_ids"] = [idents[i] for i in sel]
        out[f"{key}_cams"] = [cams[i] for i in sel]
    return out


def onnx_max_abs_diff(model, onnx_file, x: np.ndarray) -> tuple[float, np.ndarray]:
    """(largest |ONNX Runtime - PyTorch| component, ONNX embeddings [N, D]) of crops ``x``
    [N, H, W, 3] BGR uint8 through ``model`` (eval mode) and the graph in ``onnx_file`` (a path,
    or an ONNX Runtime session of it)."""
    import torch

    model = model.eval()
    with torch.inference_mode():
        ref = np.concatenate([model(torch.from_numpy(x[i: i + 64])).numpy() for i in range(0, len(x), 64)])
    sess = onnx_file if hasattr(onnx_file, "run") else _ort_session(Path(onnx_file))
    got, _ = _run_ort(sess, x)
    if got.shape != ref.shape:
        return float("inf"), got
    return float(np.abs(got - ref).max()), got


def _check_diff(diff: float, tolerance: float, what: str, n: int) -> None:
    if not diff <= tolerance:  # NaN fails too
        raise ExportError(f"{what} disagrees with PyTorch: max abs difference {diff:.3g} on {n} real "
                          f"crops, above the tolerance {tolerance:g}; the ONNX graph is not the "
                          "model: re-export it (and report the version if it persists)")


def verify_onnx(version: str, paths: Sequence[str], onnx_file: str | os.PathLike | None = None,
                tolerance: float = ONNX_TOLERANCE, n: int = VERIFY_CROPS) -> dict[str, Any]:
    """Check the ONNX file of model ``version`` (default: :func:`core.model.embed.onnx_path`, what the
    embedding jobs run) against its PyTorch model on up to ``n`` real crops spread over
    ``paths``. Returns ``{"max_abs_diff", "verified_on", "tolerance", "onnx"}``; raises
    :class:`ExportError` with the figure and the tolerance when it is above ``tolerance``."""
    from core.model import embed

    f = Path(onnx_file) if onnx_file is not None else embed.onnx_path(version)
    model, cfg = embed.load_model(version)
    paths = [os.fspath(p) for p in paths]
    pick = paths[:: max(1, len(paths) // n)][:n]
    x, _ok = _load_crops(pick, tuple(cfg.crop_size))
    if len(x) == 0:
        raise ExportError(f"no crop to verify the ONNX model of {version} on: none of {len(pick)} decoded")
    diff, _ = onnx_max_abs_diff(model, f, x)
    _check_diff(diff, tolerance, f"the ONNX model of {version} ({f})", len(x))
    log.info("ONNX of %s verified on %d crops: max abs diff %.2e", version, len(x), diff)
    return {"max_abs_diff": diff, "verified_on": int(len(x)), "tolerance": tolerance, "onnx": str(f)}


def _verify_paths(dataset: str | None, verify_on: Sequence[str] | None, n: int = 16) -> list[str]:
    if verify_on:
        return [os.fspath(p) for p in verify_on]
    if not dataset:
        return []
    from core.data import store

    return store.crop_paths(dataset, n)


def export_model(version: str = "base", out_name: str | None = None, *,
                 dataset: str | None = None, int8: bool = False,
                 verify_on: Sequence[str] | None = None, opset: int = 17,
                 tolerance: float = ONNX_TOLERANCE,
                 overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Export model ``version`` to ``exports_dir/out_name`` (default ``model-VERSION-TIME``):
    ``model.onnx`` (+ ``model.int8.onnx``), ``MODEL_CARD.md`` and ``report.json``.

    Verification: embeddings of real crops (``verify_on`` paths, else up to 16 crops of
    ``dataset``) by PyTorch and by ONNX Runtime; ``max_abs_diff`` is their largest difference,
    and above ``tolerance`` the export fails (:class:`ExportError`, nothing left under its name).
    ``dataset`` also gives the version's registry record and, when it has query/gallery
    splits, the retrieval metrics of fp32 (and int8) on them. int8 uses static QDQ quantization
    calibrated on the gallery (or verification) crops. Returns the report dict."""
    import onnx

    from core.model import embed

    if opset < 17:
        raise ExportError(f"opset {opset} is too old: use 17 or newer")
    progress = progress or _noop
    paths = _verify_paths(dataset, verify_on)
    if not paths:
        raise ExportError("no crops to verify the ONNX model on: pass a dataset with crops or "
                          "image paths")
    final = safe_export_path(out_name or model_export_name(version))
    steps = 5 + int(int8)
    t0 = time.perf_counter()
    progress(0, steps, f"loading model {version}")
    try:
        model, cfg = embed.load_model(version)
    except embed.EmbedError as exc:
        raise ExportError(str(exc)) from None
    rnd, metrics = _version_record(version, dataset)
    meta = model_metadata(version, cfg, rnd, metrics, opset, embed.person_head(version))
    doc = f"Vigil re-ID embedding model {version}: uint8 BGR NHWC crops -> unit embeddings"
    report: dict[str, Any] = {"version": version, "dataset": dataset, "opset": opset,
                              "metadata": meta, "training_round": rnd}
    with _staged(final, overwrite) as tmp:
        fp32 = tmp / "model.onnx"
        progress(1, steps, "exporting ONNX")
        embed.export_onnx(model, fp32, opset=opset)
        _set_metadata(fp32, meta, doc)
        onnx.checker.check_model(str(fp32), full_check=True)
        report["checker"] = "passed"

        progress(2, steps, "verifying against PyTorch")
        x, ok = _load_crops(paths, tuple(cfg.crop_size))
        if len(x) == 0:
            raise ExportError("none of the verification crops could be decoded")
        sess = _ort_session(fp32)
        report["max_abs_diff"], got = onnx_max_abs_diff(model, sess, x)
        report["tolerance"] = tolerance
        _check_diff(report["max_abs_diff"], tolerance, f"the exported ONNX model of {version}", len(x))
        report["verified_on"] = len(x)
        report["verify_paths"] = [paths[i] for i in ok]

        progress(3, steps, "retrieval metrics")
        ev = eval_set(dataset) if dataset else None
        qx = gx = None
        if ev is not None:
            qx, q_ok = _load_crops(ev["q_paths"], tuple(cfg.crop_size))
            gx, g_ok = _load_crops(ev["g_paths"], tuple(cfg.crop_size))
            qi = [ev["q_ids"][i] for i in q_ok]
            qc = [ev["q_cams"][i] for i in q_ok]
            qk = [ev["q_keys"][i] for i in q_ok]
            gi = [ev["g_ids"][i] for i in g_ok]
            gc = [ev["g_cams"][i] for i in g_ok]
            gk = [ev["g_keys"][i] for i in g_ok]
            cams = all(c is not None for c in qc + gc)

            def evaluate_model(s) -> dict[str, float]:
                qe, ms = _run_ort(s, qx)
                ge, ms2 = _run_ort(s, gx)
                m = retrieval_metrics(qe, qi, ge, gi, qc if cams else None, gc if cams else None,
                                      q_keys=qk, g_keys=gk)  # a query never finds itself
                m["ms_per_image"] = round((ms * len(qx) + ms2 * len(gx)) / (len(qx) + len(gx)), 3)
                return m

            report["eval"] = {"queries": len(qx), "gallery": len(gx), "cross_camera": cams,
                              "identities": len(set(map(str, qi)) | set(map(str, gi))),
                              "in_both": len(set(qk) & set(gk))}
            report["metrics"] = {"fp32": evaluate_model(sess)}
        else:
            report["metrics"] = {}
        report["size_mb"] = {"fp32": round(fp32.stat().st_size / 1e6, 2)}

        if int8:
            progress(4, steps, "int8 quantization")
            q8 = tmp / "model.int8.onnx"
            calib = gx if gx is not None and len(gx) else x
            calib = calib[:: max(1, len(calib) // 64)][:64]  # spread over the set, bounded time
            report["int8_method"] = _quantize(fp32, q8, calib)
            _set_metadata(q8, {**meta, "quantization": report["int8_method"]}, doc + " (int8)")
            s8 = _ort_session(q8)
            e8, _ = _run_ort(s8, x)
            report["int8_max_abs_diff"] = float(np.abs(e8 - got).max())
            report["int8_mean_cosine"] = float(np.mean(np.sum(e8 * got, axis=1)))  # unit rows
            report["size_mb"]["int8"] = round(q8.stat().st_size / 1e6, 2)
            if ev is not None:
                report["metrics"]["int8"] = evaluate_model(s8)
        progress(steps - 1, steps, "model card")
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["onnx"] = str(final / "model.onnx")
        report["onnx_int8"] = str(final / "model.int8.onnx") if int8 else None
        report["card"] = str(final / "MODEL_CARD.md")
        report["path"] = str(final)
        (tmp / "MODEL_CARD.md").write_text(model_card(report, cfg))
        _write_json(tmp / "report.json", report)
    progress(steps, steps, "done")
    log.info("exported model %s to %s (max abs diff %.2e)", version, final,
             report["max_abs_diff"])
    return report


def _quantize(src: Path, dst: Path, calib: np.ndarray) -> str:
    """int8 copy of ``src``: static QDQ (per-channel int8 weights, uint8 activations) calibrated
    on ``calib`` [N, H, W, 3] crops; dynamic (uint8 weights) when there are none."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib is None or len(calib) == 0:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
        return "dynamic (uint8 weights)"
    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        base = pre
    except Exception as exc:  # noqa: BLE001 - pre-processing only improves the result
        log.info("quantization pre-processing skipped: %s", exc)
        base = src

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"image": calib[i: i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.it, None)

    try:
        quantize_static(str(base), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
    finally:
        pre.unlink(missing_ok=True)
    return f"static QDQ (int8 per-channel weights, uint8 activations, {len(calib)} " \
           "calibration crops)"


