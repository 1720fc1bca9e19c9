"""The default dataset of a first run (synthetic clips, see :mod:`core.synthetic`)."""
from __future__ import annotations

from typing import Callable

from core import store
from core.config import settings
from core.ingest import IngestReport, ingest
from core.synthetic import generate

DEMO_DATASET = "demo"


def ensure_demo(name: str = DEMO_DATASET, progress: Callable | None = None) -> IngestReport | None:
    """Generate and import the synthetic dataset unless ``name`` already has samples."""
    if name in store.dataset_names() and len(store.get_dataset(name)) > 0:
        return None
    out = generate(settings().media_dir / "synthetic-source")
    return ingest(out, "mot", name, every_n=3, progress=progress)
