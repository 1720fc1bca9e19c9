"""The default dataset of a first run (synthetic clips, see :mod:`core.data.synthetic`)."""
from __future__ import annotations

from typing import Callable

from core.data import store
from core.config import settings
from core.services.ingest import IngestReport, ingest
from core.data.synthetic import generate

DEMO_DATASET = "demo"


def ensure_demo(name: str = DEMO_DATASET, progress: Callable | None = None,
                embed: bool = True) -> IngestReport | None:
    """Generate and import the synthetic dataset unless ``name`` already has samples; with
    ``embed``, queue its embedding job (the worker of ``make run`` runs it, and the Map page shows
    the map when it is done) unless it is embedded or an embedding job is already queued or
    running. Returns the ingest report, or None when the dataset was already there."""
    report = None
    if not (name in store.dataset_names() and len(store.get_dataset(name)) > 0):
        out = generate(settings().media_dir / "synthetic-source")
        report = ingest(out, "mot", name, every_n=3, progress=progress)
    if embed:
        from core.jobs import tasks

        tasks.submit_embedding(name)
    return report

