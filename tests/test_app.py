"""AppTest smoke tests: every page renders without an exception on a real dataset."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import need_shared

APP = Path(__file__).resolve().parent.parent / "app.py"
PAGES = ["pages/data.py", "pages/map.py", "pages/annotate.py", "pages/train.py", "pages/export.py"]


@pytest.fixture(scope="module")
def small_dataset():
    from core import store
    from core.ingest import ingest

    name = "apptest"
    ingest(need_shared("mot", "TUD-Campus"), "mot", name, every_n=10)
    yield name
    store.delete_dataset(name)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(page, small_dataset):
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["dataset"] = small_dataset
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]


def test_data_page_shows_counts(small_dataset):
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["dataset"] = small_dataset
    at.run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Identities"] == "8"
