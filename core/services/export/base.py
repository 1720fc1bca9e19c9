"""What both exports share: the export root, safe names and staged folders, the error type,
retrieval metrics and the versions on offer."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from core.config import settings

from core.data.exporters import ExportError
log = logging.getLogger(__name__)

Progress = Callable[..., None]
FORMATS = ("fiftyone", "classification-tree", "coco", "manifest")
LABEL_FIELDS = ("behaviour", "flagged", "flag_reason", "labelled_by", "labelled_at")
MANIFEST_COLUMNS = (
    "id", "path", "label", "identity", "camera", "split", "kind", "sequence", "track", "frame",
    "brightness", "low_light", "blur", "condition_tags", "tags", "flagged", "flag_reason",
    "behaviour", "labelled_by", "labelled_at", "model_version",
)


# Largest |ONNX Runtime - PyTorch| embedding component allowed (fp32, unit vectors). Measured on
# 440 real campus62 crops at 128x64 (every val crop, a quarter of train), with export's and
# core.model.embed's sessions: the packaged base model 1.2e-6, a 40-step round 1.0e-6 (minimum cosine
# between the two 0.9999998). 1e-4 leaves about 80x that for other CPUs, kernels and thread
# counts, and bounds what a cosine similarity can move by to sqrt(D) * 1e-4 (0.0016 at D=256),
# well inside any match threshold's margin (1e-3 would allow 0.016). A corrupted graph shows:
# noise of 2 % of one layer's spread gives 3e-3 (tests/test_export.py).
ONNX_TOLERANCE = 1e-4
VERIFY_CROPS = 16  # real crops each verification runs through both runtimes


def _noop(*_a: Any, **_k: Any) -> None:
    pass


# --- paths ---------------------------------------------------------------------------------

def export_root() -> Path:
    """The export folder of the data root (created on first use), fully resolved."""
    root = settings().exports_dir
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def safe_export_path(name: str | os.PathLike) -> Path:
    """The resolved path of export folder ``name`` inside :func:`export_root`.

    ``name`` is a folder name or a relative path (``site-a/round3``); an absolute path is
    accepted only when it lies inside the export root. Refused with :class:`ExportError`: empty
    names, ``..`` components, control characters, absolute paths elsewhere, and paths whose
    existing components are symlinks leading out of the root. Creates nothing but the root."""
    raw = os.fspath(name) if name is not None else ""
    if not raw or not raw.strip():
        raise ExportError("empty export name: give a folder name inside the export folder")
    if any(ord(c) < 32 for c in raw):
        raise ExportError(f"export name {raw!r} contains control characters")
    root = export_root()
    p = Path(raw)
    if ".." in p.parts:
        raise ExportError(f"export name {raw!r} contains '..': exports stay inside {root}")
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(root)
        except ValueError:
            raise ExportError(f"{raw} is outside the export folder {root}: give a folder name "
                              "inside it (absolute paths elsewhere are refused)") from None
    target = (root / p).resolve()  # follows symlinks of every existing component
    if target == root or not target.is_relative_to(root):
        where = "is the export folder itself" if target == root else \
            f"leads to {target} (a symbolic link points out of the export folder)"
        raise ExportError(f"export name {raw!r} {where}: choose a folder inside {root}")
    return target


def dataset_export_name(name: str, fmt: str) -> str:
    """The default folder name of a dataset export: ``NAME-FMT-YYYYmmdd-HHMMSS``."""
    return f"{name}-{fmt}-{datetime.now():%Y%m%d-%H%M%S}"


def model_export_name(version: str) -> str:
    """The default folder name of a model export: ``model-VERSION-YYYYmmdd-HHMMSS``."""
    return f"model-{version}-{datetime.now():%Y%m%d-%H%M%S}"


def export_target(name: str | os.PathLike, overwrite: bool = False) -> Path:
    """:func:`safe_export_path` of ``name``, refused with :class:`ExportError` when the folder
    exists and ``overwrite`` is not set (checked again, and acted on, when the export writes)."""
    final = safe_export_path(name)
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists: choose another name or overwrite it")
    return final


@contextmanager
def _staged(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder of ``final`` that is renamed to ``final`` on success and
    removed on failure (``final`` must come from :func:`safe_export_path`)."""
    export_target(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; exports are ordinary folders
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))


# --- retrieval metrics -----------------------------------------------------------------------

def retrieval_metrics(q_emb: np.ndarray, q_ids: Sequence, g_emb: np.ndarray, g_ids: Sequence,
                      q_cams: Sequence | None = None, g_cams: Sequence | None = None,
                      q_keys: Sequence | None = None, g_keys: Sequence | None = None,
                      ) -> dict[str, float]:
    """Cosine rank-1/rank-5/mAP of queries [Q, D] against a gallery [G, D] (cross-camera when
    cameras are given; a gallery item with the query's own key, its sample id, is never its
    candidate), from :func:`core.math.evaluate.retrieval_metrics`."""
    from core.math import evaluate

    return evaluate.retrieval_metrics(q_emb, q_ids, g_emb, g_ids, q_cams, g_cams, ks=(1, 5),
                                      q_keys=q_keys, g_keys=g_keys)


# --- choices for the UI and CLI ---------------------------------------------------------------

def embedding_versions(name: str) -> list[str]:
    """Model versions whose vectors dataset ``name`` holds (from its ``emb_*`` fields)."""
    from core.data import store

    schema = store.get_dataset(name).get_field_schema()
    out = []
    for v in ["base", *model_versions()]:
        if store.embedding_field(v) in schema and v not in out:
            out.append(v)
    known = {store.embedding_field(v) for v in out}
    out += sorted(f[4:] for f in schema if f.startswith("emb_") and f not in known)
    return out


def model_versions() -> list[str]:
    """"base" and every version with a checkpoint under the models folder (exportable)."""
    d = settings().models_dir
    found = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and (p / "checkpoint.pt").exists()) \
        if d.is_dir() else []
    return ["base", *[v for v in found if v != "base"]]


