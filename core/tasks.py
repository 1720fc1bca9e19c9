"""The work behind each background job kind (see :data:`core.jobs.TASKS`).

Each task: ``fn(dataset, args, reporter) -> dict`` (JSON-safe summary). They run inside the
worker's child process, report progress through the :class:`core.jobs.Reporter` and stop when
it says so.
"""
from __future__ import annotations

from typing import Any

from core.jobs import Reporter


def embed_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Embed every sample with model ``args['version']`` (default: the active one)."""
    from core import embed

    def cb(done: int, total: int, msg: str = "") -> None:
        reporter.check()
        reporter.progress(done / total if total else 0.0, f"embedding {done}/{total}")

    return embed.embed_dataset(dataset, version=args.get("version"), progress=cb)


def layout_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Compute (or reuse) the map layout of a model version."""
    from core import projection

    def cb(stage: str, fraction: float) -> None:
        reporter.check()
        reporter.progress(fraction, f"layout: {stage}")

    return projection.compute_layout(dataset, args.get("version"), progress=cb)


def train_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """One fine-tuning round, then ONNX export, re-embedding, layout and evaluation."""
    from core import rounds

    return rounds.run_round(dataset, args, reporter)
