"""Test isolation: a temporary data root and database name for the whole session.

The environment is set before anything imports ``core.store`` (and with it FiftyOne), so tests
never touch an operator's ``datasets/`` or database.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="vigil-test-"))
os.environ["VIGIL_DATA_ROOT"] = str(_ROOT)
os.environ["VIGIL_DB_NAME"] = f"vigil_test_{uuid.uuid4().hex[:8]}"
os.environ.pop("FIFTYONE_DATABASE_URI", None)

from core.config import shared_data  # noqa: E402

SHARED = shared_data()


def need_shared(*parts: str) -> Path:
    """Path inside ../shared/data, or skip the test with a reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (see ../shared/data/README.md)")
    return p


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _ROOT


@pytest.fixture
def dsname(request) -> str:
    """A fresh dataset name per test, deleted afterwards."""
    name = "t_" + uuid.uuid4().hex[:10]
    yield name
    from core import store

    store.delete_dataset(name)
