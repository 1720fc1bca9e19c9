"""The Annotate page's pair view in a real browser: Streamlit driven by Playwright in Debian's
Chromium (the launch flags and the settle check of tests/test_browser.py), on a small dataset
with tracklets and embeddings (TUD-Campus every 10th frame and TUD-Stadtmitte every 20th, 102
crops, synthetic embeddings: no embedding job, no worker, no training). Three answers, by click
and by key; the merged identity is shown on the page and written to every crop of both tracklets
in FiftyOne."""
from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import fake_embeddings, need_shared
from tests.test_browser import CHROMIUM, SHOTS, _free_port, _settle, chromium_page, stop_server, wait_until_serving

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def pairs_dataset():
    from core.data import store
    from core.services.ingest import ingest

    name = "aaa_pairs_" + uuid.uuid4().hex[:6]  # first in the sidebar's dataset picker
    # two sequences: their tracklets are never seen together, so there is more to ask than
    # TUD-Campus alone leaves (most of its tracklets share frames: cannot-links)
    ingest(need_shared("mot", "TUD-Campus"), "mot", name, every_n=10)
    ingest(need_shared("mot", "TUD-Stadtmitte"), "mot", name, every_n=20)
    fake_embeddings(name)
    yield name
    store.delete_dataset(name)


@pytest.fixture(scope="module")
def app(data_root, pairs_dataset):
    """Streamlit alone (the pair view needs no job worker), on this session's data root and
    database (this process brought MongoDB up first)."""
    port = _free_port()
    log = open(data_root / "streamlit-pairs.log", "w")
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "streamlit"), "run", "app.py", "--server.address",
                             "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(proc, url, data_root / "streamlit-pairs.log", "streamlit", timeout=120)
    yield url
    stop_server(proc, log)


@pytest.fixture(scope="module")
def page(app):
    with chromium_page() as pg:
        yield pg


def test_pair_questions_merge_tracklets(app, page, pairs_dataset):
    from core.data import store
    from core.services.labeling import identity

    name = pairs_dataset
    # the app's root first: a server whose first request is a deep link serves Streamlit's
    # pages-folder navigation instead of app.py's st.navigation (Streamlit's v1 fallback)
    page.goto(app)
    page.wait_for_selector("[data-testid='stAppViewContainer']")
    _settle(page, "opening the app")
    page.goto(f"{app}/annotate")
    page.wait_for_selector("[data-testid='stAppViewContainer']")
    page.get_by_text("Same person?", exact=True).wait_for()  # pairs first: the dataset has tracklets to compare
    _settle(page, "opening the pair view")
    page.get_by_text(re.compile(r"Why this pair: P\(same\)")).wait_for()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "pairs-01-question.png"), full_page=True)

    # 1: Same, by click
    page.get_by_role("button", name=re.compile(r"^Same")).click()
    page.get_by_text(re.compile(r"Same: merged into identity \S+ — \d+ crops? labelled")).wait_for()
    _settle(page, "answering Same")
    # 2: Different, by its key
    page.evaluate("document.activeElement && document.activeElement.blur()")  # keys go to the page
    page.keyboard.press("n")
    page.get_by_text(re.compile(r"^Different: .* kept apart")).wait_for()
    _settle(page, "answering Different")
    # 3: Same, by its key
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("y")
    page.get_by_text(re.compile(r"Same: merged into identity \S+ — \d+ crops? labelled")).wait_for()
    _settle(page, "answering Same again")
    page.screenshot(path=str(SHOTS / "pairs-02-merged.png"), full_page=True)
    text = page.get_by_text(re.compile(r"Same: merged into identity")).inner_text()
    merged = re.search(r"merged into identity (\S+) — (\d+) crops? labelled", text)
    assert merged, text

    entries = identity.pair_entries(name)
    assert [e["answer"] for e in entries] == ["same", "different", "same"], entries
    ds = store.get_dataset(name)
    ds.reload()
    tracklets, idents = ds.values(["tracklet", "identity"])

    def of(node: str) -> set:
        return {i for t, i in zip(tracklets, idents) if f"t:{t}" == node}

    last = entries[-1]
    assert of(last["a"]) == of(last["b"]) == {merged.group(1)}  # the page's identity, on both tracklets
    first = entries[0]
    assert len(of(first["a"]) | of(first["b"])) == 1  # the first merge holds too
    state = identity.load(name)
    assert state.graph.same(first["a"], first["b"]) and state.graph.same(last["a"], last["b"])
    assert state.graph.separated(entries[1]["a"], entries[1]["b"]) is not None
