"""Shared set-up for benchmark scripts: an isolated data root and peak-memory reading."""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def isolate(prefix: str) -> Path:
    """Point Vigil at a temporary data root and database (call before importing core.data.store)."""
    root = Path(tempfile.mkdtemp(prefix=f"vigil-bench-{prefix}-"))
    os.environ["VIGIL_DATA_ROOT"] = str(root)
    os.environ["VIGIL_DB_NAME"] = f"bench_{prefix}_{uuid.uuid4().hex[:6]}"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return root


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
