"""The work behind each background job kind (see :data:`core.jobs.TASKS`).

Each task: ``fn(dataset, args, reporter) -> dict`` (JSON-safe summary). They run inside the
worker's child process, report progress through the :class:`core.jobs.Reporter` and stop when
it says so.
"""
from __future__ import annotations

from typing import Any

from core.jobs import Reporter


def _embed_cb(reporter: Reporter, lo: float, hi: float):
    def cb(done: int, total: int, msg: str = "") -> None:
        reporter.check()
        f = done / total if total else 0.0
        reporter.progress(lo + (hi - lo) * f, f"embedding {done}/{total}")
    return cb


def _layout_cb(reporter: Reporter, lo: float, hi: float):
    def cb(stage: str, fraction: float) -> None:
        reporter.check()
        reporter.progress(lo + (hi - lo) * fraction, f"map layout: {stage}")
    return cb


def refresh_map(dataset: str, version: str, reporter: Reporter, lo: float = 0.0, hi: float = 1.0) -> dict[str, Any]:
    """Lay out the map of ``version`` (aligned to the previous one) and rescore the samples."""
    from core import analysis, projection

    m = projection.compute_layout(dataset, version, progress=_layout_cb(reporter, lo, lo + 0.9 * (hi - lo)))
    reporter.progress(lo + 0.9 * (hi - lo), "scoring misclustered samples")
    scores = analysis.compute_scores(dataset, version)
    return {"map_points": len(m.ids), "map_recomputed": m.computed, **scores}


def embed_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Embed every sample with model ``args['version']`` (default: the active one), then lay out
    its map and score the samples, so the Map page is ready when the job ends."""
    from core import embed, store

    report = embed.embed_dataset(dataset, version=args.get("version"), progress=_embed_cb(reporter, 0.0, 0.6))
    version = args.get("version") or store.active_model(dataset)
    report.update(refresh_map(dataset, version, reporter, 0.6, 1.0))
    return report


def layout_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Compute (or reuse) the map layout of a model version and rescore the samples."""
    from core import store

    return refresh_map(dataset, args.get("version") or store.active_model(dataset), reporter)


def train_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """One fine-tuning round, then ONNX export, re-embedding, map, scores and evaluation."""
    from core import rounds

    return rounds.run_round(dataset, args, reporter)
