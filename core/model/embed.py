"""Model versions on disk, ONNX export, batched ONNX Runtime extraction.

The network itself (:class:`core.model.network.EmbeddingModel`, its :class:`ModelConfig`) takes
what OpenCV decodes, ``[N, H, W, 3]`` BGR uint8, and gives unit vectors; this module keeps every
version of it (checkpoints, ONNX files, their sessions) and runs it over files.

Model versions: ``"base"`` is the packaged pretrained backbone with a deterministic head (seeded
orthogonal init, no file needed). Any other version ``V`` lives in
``settings().models_dir / V /`` as ``checkpoint.pt`` (dict: model, config, optimizer, step,
metrics; loaded with ``weights_only=True``) and ``model.onnx`` (exported on first use).

Extraction (:func:`embed_paths`) decodes and resizes in a thread pool while ONNX Runtime runs the
previous batch; at most ``batch_size * (prefetch + 1)`` images are held at once. Failed files
get a reason in ``errors`` and a NaN row in the output (rows stay aligned with ``paths``).

Pure of the database: the dataset level (writing vectors, "more like this") is
:mod:`core.services.embedding`.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import cv2
import numpy as np

from core.config import settings
from core.model.network import ModelConfig, build_model, torch_modules

if TYPE_CHECKING:
    from torch import nn

    from core.model.network import EmbeddingModel

log = logging.getLogger(__name__)

BASE = "base"
EXPORT_FORMAT = 1  # bump when the graph's input/output contract changes (re-exports stale files)
Progress = Callable[[int, int], None]


class EmbedError(RuntimeError):
    """A model version or dataset that cannot be embedded, with what to do about it."""


# --- model versions on disk --------------------------------------------------------------------

def version_dir(version: str) -> Path:
    if not version or "/" in version or "\\" in version or version.startswith("."):
        raise EmbedError(f"invalid model version {version!r}")
    return settings().models_dir / version


def checkpoint_path(version: str) -> Path:
    return version_dir(version) / "checkpoint.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(version: str, model: "nn.Module", config: ModelConfig,
                    optimizer: dict | None = None, step: int = 0,
                    metrics: dict | None = None) -> Path:
    """Write ``models_dir/version/checkpoint.pt`` atomically (and drop a stale ``model.onnx``)."""
    if version == BASE:
        raise EmbedError('"base" is the packaged model; save under another version name')
    p = checkpoint_path(version)
    atomic_torch_save({"model": model.state_dict(), "config": config.to_dict(),
                        "optimizer": optimizer, "step": int(step), "metrics": metrics or {}}, p)
    (p.parent / "model.onnx").unlink(missing_ok=True)
    return p


def load_checkpoint(version: str) -> dict[str, Any]:
    import torch

    p = checkpoint_path(version)
    if not p.exists():
        raise EmbedError(f"model version {version!r} has no checkpoint at {p}")
    return torch.load(p, map_location="cpu", weights_only=True)


def person_head(version: str) -> dict[str, Any] | None:
    """The summary of ``version``'s person-ness head as its round stored it in the checkpoint
    (:meth:`core.math.personness.PersonHead.summary`: counts, CV AUC, threshold, ...), ``{}`` for a
    head without one; None for a model without a head (``base``, no checkpoint)."""
    if version == BASE or not checkpoint_path(version).exists():
        return None
    ck = load_checkpoint(version)
    if not (ck.get("config") or {}).get("person_head"):
        return None
    return (ck.get("result") or {}).get("person") or {}


def load_model(version: str = BASE) -> tuple["EmbeddingModel", ModelConfig]:
    """The eval-mode model of ``version`` and its config. ``"base"`` needs no file."""
    if version == BASE:
        cfg = ModelConfig()
        return build_model(cfg, pretrained=True), cfg
    ck = load_checkpoint(version)
    cfg = ModelConfig.from_dict(dict(ck["config"]))
    model = build_model(cfg, pretrained=False)
    model.load_state_dict(ck["model"], strict=True)
    return model.eval(), cfg


def model_config(version: str = BASE) -> ModelConfig:
    return ModelConfig() if version == BASE else \
        ModelConfig.from_dict(dict(load_checkpoint(version)["config"]))


def _onnx_meta(version: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"export_format": EXPORT_FORMAT, "version": version}
    if version == BASE:
        meta["config"] = ModelConfig().to_dict()
    else:
        st = checkpoint_path(version).stat()
        meta["checkpoint"] = [st.st_size, st.st_mtime_ns]
    return meta


ONNX_OUTPUTS = ("embedding", "person")  # "person" only for a model with a person-ness head


def _WithPerson(model: "nn.Module") -> "nn.Module":
    """``model`` exported with both outputs (embedding, person-ness)."""
    _, nn = torch_modules()

    class WithPerson(nn.Module):
        def __init__(self, m: "nn.Module"):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_with_person(x)

    return WithPerson(model).eval()


def export_onnx(model: "nn.Module", path: Path, opset: int = 17) -> Path:
    """Export ``model`` (uint8 ``[N, H, W, 3]`` BGR -> ``embedding`` ``[N, D]``, and ``person``
    ``[N]`` in 0..1 when it has a person-ness head) with dynamic batch, height and width,
    atomically (temp file in the same folder, then rename)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    dummy = torch.zeros(2, 64, 32, 3, dtype=torch.uint8)
    outputs = ONNX_OUTPUTS if getattr(model, "person", None) is not None else ONNX_OUTPUTS[:1]
    try:
        model = model.eval()
        with torch.no_grad():
            torch.onnx.export(
                _WithPerson(model) if len(outputs) > 1 else model, (dummy,), tmp, input_names=["image"],
                output_names=list(outputs), opset_version=opset, dynamo=False,
                dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"}, **{o: {0: "batch"} for o in outputs}})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_EXPORT_LOCK = threading.Lock()


def onnx_path(version: str = BASE) -> Path:
    """``models_dir/version/model.onnx``, exported first when missing or stale."""
    d = version_dir(version)
    p, meta_p = d / "model.onnx", d / "model.onnx.json"
    with _EXPORT_LOCK:
        meta = _onnx_meta(version) if version == BASE or checkpoint_path(version).exists() else None
        if meta is None and not p.exists():
            raise EmbedError(f"model version {version!r} has neither checkpoint nor ONNX in {d}")
        fresh = p.exists() and (meta is None or (
            meta_p.exists() and json.loads(meta_p.read_text()) == meta))
        if not fresh:
            t0 = time.perf_counter()
            model, _ = load_model(version)
            export_onnx(model, p)
            tmp = meta_p.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, meta_p)
            log.info("exported %s to %s in %.1fs", version, p, time.perf_counter() - t0)
    return p


_SESSIONS: "OrderedDict[tuple, Any]" = OrderedDict()
_SESSION_LOCK = threading.Lock()


def onnx_providers() -> list[str]:
    """ONNX Runtime's CUDA provider first where this machine has a GPU (core.model.device) and the
    installed onnxruntime has the provider (onnxruntime-gpu), else the CPU alone."""
    import onnxruntime as ort

    from core.model import device

    if device.select() == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(version: str = BASE, threads: int | None = None):
    """A cached onnxruntime session (deterministic compute, fixed thread count; on the GPU where
    :func:`onnx_providers` has it)."""
    import onnxruntime as ort

    p = onnx_path(version)
    threads = threads or max(1, os.cpu_count() or 1)
    providers = onnx_providers()
    key = (str(p), p.stat().st_mtime_ns, threads, tuple(providers))
    with _SESSION_LOCK:
        if key in _SESSIONS:
            _SESSIONS.move_to_end(key)
            return _SESSIONS[key]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.use_deterministic_compute = True
    # no busy-waiting between ops: on a shared CPU (decode threads, other jobs) it only steals time
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(p), sess_options=so, providers=providers)
    with _SESSION_LOCK:
        _SESSIONS[key] = sess
        while len(_SESSIONS) > 4:
            _SESSIONS.popitem(last=False)
    return sess


# --- extraction --------------------------------------------------------------------------------

def load_image(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Decode ``path`` with OpenCV and resize to ``size`` (H, W): ``[H, W, 3]`` BGR uint8.

    Raises ValueError with a reason for a missing, unreadable or corrupt file."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ValueError(f"file not found: {p}")
    img = cv2.imread(p, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ValueError(f"cannot decode image (corrupt or unsupported): {p}")
    h, w = size
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return img


def _load_safe(path: str, size: tuple[int, int]) -> np.ndarray | str:
    try:
        return load_image(path, size)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file reason
        return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


def _batches(paths: Sequence[str], size: tuple[int, int], batch_size: int, threads: int,
             prefetch: int = 2) -> Iterator[tuple[int, list[np.ndarray | str]]]:
    """Yield (start index, decoded images or error strings) per batch, decoding ahead in a pool
    while the caller runs the model (at most ``prefetch + 1`` batches in memory)."""
    from collections import deque

    n = len(paths)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="embed-decode") as ex:
        pending: deque = deque()
        nxt = 0

        def submit() -> None:
            nonlocal nxt
            chunk = paths[nxt: nxt + batch_size]
            pending.append((nxt, [ex.submit(_load_safe, os.fspath(p), size) for p in chunk]))
            nxt += len(chunk)

        while nxt < n and len(pending) <= prefetch:
            submit()
        while pending:
            start, futs = pending.popleft()
            if nxt < n:
                submit()
            yield start, [f.result() for f in futs]


def embed_paths(paths: Sequence[str | os.PathLike], version: str = BASE, kind: str = "crop",
                batch_size: int = 64, threads: int = 2, progress: Progress | None = None,
                backend: str = "auto", ort_threads: int | None = None, person: bool = False,
                ) -> tuple[np.ndarray, dict[int, str]] | tuple[np.ndarray, dict[int, str], np.ndarray | None]:
    """Embed image files with model ``version``.

    Returns ``vectors`` float32 ``[N, D]`` aligned with ``paths`` (unit rows; a NaN row where the
    file failed) and ``errors`` {index: reason}. ``threads`` decode/resize workers;
    ``backend`` "onnx" (ONNX Runtime), "torch" (PyTorch eager: parity checks, and the GPU where
    onnxruntime has no CUDA provider) or "auto" (default): ONNX Runtime, unless this machine has a
    GPU that only torch can use.
    ``progress(done, total)`` after each batch. Memory stays bounded: images are decoded a few
    batches ahead and dropped after their batch. ``person``: also return the person-ness float32
    ``[N]`` (NaN where the file failed), or None for a model without a person-ness head."""
    paths = list(paths)
    n = len(paths)
    dev = "cpu"
    if backend == "auto":
        from core.model import device

        dev = device.select()
        backend = "torch" if dev == "cuda" and onnx_providers()[0] != "CUDAExecutionProvider" else "onnx"
    if backend == "onnx":
        sess = onnx_session(version, ort_threads)
        cfg = model_config(version)
        out_dim = sess.get_outputs()[0].shape[1]
        dim = out_dim if isinstance(out_dim, int) else cfg.emb_dim

        has_person = len(sess.get_outputs()) > 1

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            out = sess.run(None, {"image": x})
            return out[0], (out[1] if has_person else None)
    elif backend == "torch":
        import torch

        model, cfg = load_model(version)
        model.to(dev)
        dim = cfg.emb_dim
        has_person = model.person is not None

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            with torch.inference_mode():
                e, p = model.forward_with_person(torch.from_numpy(x).to(dev))
                return e.cpu().numpy(), (None if p is None else p.cpu().numpy())
    else:
        raise ValueError(f"unknown backend {backend!r}; use 'onnx' or 'torch'")
    size = cfg.input_size(kind)
    vectors = np.full((n, dim), np.nan, dtype=np.float32)
    scores = np.full(n, np.nan, dtype=np.float32) if has_person else None
    errors: dict[int, str] = {}
    done = 0
    for start, items in _batches(paths, size, batch_size, threads):
        ok = [i for i, it in enumerate(items) if isinstance(it, np.ndarray)]
        for i, it in enumerate(items):
            if not isinstance(it, np.ndarray):
                errors[start + i] = it
        if ok:
            x = np.stack([items[i] for i in ok])
            e, p = run(x)
            rows = [start + i for i in ok]
            vectors[rows] = e.astype(np.float32, copy=False)
            if scores is not None:
                scores[rows] = p
        done += len(items)
        if progress is not None:
            progress(done, n)
    if errors:
        log.warning("%d of %d files failed to embed (first: %s)", len(errors), n,
                    next(iter(errors.values())))
    return (vectors, errors, scores) if person else (vectors, errors)

