"""The whole loop in a real browser: `make run`'s app driven by Playwright in Debian's Chromium.

Data page → Map (embed job, box selection, bulk tag) → Annotate (label items) → Train (a round in
the background, activate) → Export (dataset and ONNX model). Screenshots of every page go to
``artifacts/screenshots/``. The app shares this test session's data root and database, so the
test checks each step in FiftyOne itself.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / "artifacts" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"),
]

UNSUPERVISED = "Learn from unlabelled footage (pseudo-identities)"
_T0 = [time.time()]  # when make run started: the loop prints where its time goes


def _mark(what: str) -> None:
    print(f"[{time.time() - _T0[0]:6.1f} s] {what}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc, url: str, log_path: Path, what: str, timeout: float = 300) -> None:
    """Poll Streamlit's health endpoint until it answers; the log's tail when it never does."""
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not serve the app:\n" + log_path.read_text()[-3000:])
        time.sleep(0.5)


def stop_server(proc, log) -> None:
    """Stop a server started in its own session (its process group), then close its log."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@contextlib.contextmanager
def chromium_page():
    """A page of headless Debian Chromium (the flags of the design guide), 1400 x 1000."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def make_run(data_root):
    """``make run`` on a free port, on this session's data root and database. Streamlit's file
    watcher is off: it would put inotify watches on the whole checkout (the virtual environment
    too) and compete with the job worker for the two cores; nothing here edits the app's source."""
    from core.data import store

    store.dataset_names()  # this process brings up the shared MongoDB first
    port = _free_port()
    _T0[0] = time.time()
    log = open(data_root / "make-run.log", "w")
    proc = subprocess.Popen(["make", "run", f"PORT={port}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env={**os.environ, "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"})
    yield proc, f"http://127.0.0.1:{port}"
    stop_server(proc, log)


@pytest.fixture(scope="module")
def app(make_run, data_root):
    """The app's address once it serves (the browser starts meanwhile: see ``page``)."""
    proc, url = make_run
    wait_until_serving(proc, url, data_root / "make-run.log", "make run")
    return url


@pytest.fixture(scope="module")
def page(make_run):
    """Chromium, launched while ``make run`` generates the demo and starts its worker."""
    with chromium_page() as pg:
        yield pg


def _goto(page, app, path: str) -> None:
    page.goto(f"{app}/{path}")
    page.wait_for_selector("[data-testid='stAppViewContainer']")
    _settle(page, f"opening /{path}")


def _settle(page, doing: str = "the last action", timeout: float = 120) -> None:
    """Wait until Streamlit finished the current run (no running indicator); raise when it is
    still running after ``timeout`` seconds (a hung page must fail here, not three steps later)."""
    t0 = time.time()
    time.sleep(1.0)
    while time.time() - t0 < timeout:
        if page.locator("[data-testid='stStatusWidget']").count() == 0:
            return
        time.sleep(0.5)
    _shot(page, "unsettled")
    raise AssertionError(f"the app did not settle after {doing}: Streamlit was still running {timeout:.0f} s "
                         f"later on {page.url} (screenshot {SHOTS / 'unsettled.png'})")


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_operator_loop(page, app):  # page first: Chromium starts while make run works
    from core.data import jobs, store
    from core.services import registry

    _mark("app served, browser up")

    # Data page: the default dataset
    _goto(page, app, "")
    page.get_by_text("Samples per camera").wait_for()
    assert "demo" in store.dataset_names()
    _shot(page, "01-data")
    _mark("data page")

    # Map page: `make run` queued the demo's embedding (core.cli.demo); the map appears when it is
    # done, without a click
    _goto(page, app, "map")
    page.locator(".js-plotly-plot").first.wait_for(timeout=400_000)
    _settle(page, "drawing the map")
    assert store.active_model("demo") == "base"
    _shot(page, "02-map")
    _mark("map drawn")

    # a box selection over the middle of the map tags the selected samples
    plot = page.locator(".js-plotly-plot .nsewdrag").first
    box = plot.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.8, steps=12)
    page.mouse.up()
    page.get_by_text(re.compile(r"Selection: \d+ samples")).wait_for()
    _settle(page, "selecting on the map")  # its thumbnails and forms finish drawing before we type
    n_sel = int(re.search(r"Selection: (\d+)", page.get_by_text(re.compile(r"Selection: \d+ samples")).inner_text()).group(1))
    assert n_sel > 0
    tags = page.locator("[data-testid='stMultiSelect']").filter(has_text="Add condition tags")
    tags.locator("input").click()
    page.keyboard.type("shadow")
    # the highlighted option is taken with Enter, as an operator would; clicking it fails
    # when the dropdown opens below the fold of a long page
    page.locator("[role='option']").filter(has_text="shadow").first.wait_for()
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    tags.get_by_text("shadow").first.wait_for()  # the chosen tag shows in the widget
    page.get_by_role("button", name="Tag selection").click()
    page.get_by_text(re.compile(r"Tagged \d+ samples with shadow")).wait_for()
    assert store.tag_counts("demo").get("shadow") == n_sel
    _shot(page, "03-map-selection")
    _mark("tagged")
    # Clear selection empties it for good: the chart's own box selection must not bring it back
    page.get_by_role("button", name="Clear selection").click()
    _settle(page, "clearing the selection")
    assert page.get_by_text(re.compile(r"Selection: \d+ samples")).count() == 0

    # Annotate page: label a few queue items
    _goto(page, app, "annotate")
    # the demo's tracklets open the pair view first; the per-crop view labels class and identity
    page.get_by_text("Crops: class & identity").click()
    _settle(page, "opening the crop view")
    decided = 0
    for _ in range(3):
        page.get_by_role("button", name=re.compile(r"^person")).first.click()
        _settle(page, "labelling an item")
        decided += 1
    labelled = len(store.get_dataset("demo").exists("labelled_by"))
    assert labelled >= decided
    _shot(page, "04-annotate")
    _mark("labelled")
    page.get_by_text("More like this").click()  # the re-ranked neighbours of the current crop
    page.get_by_text(re.compile(r" · cam .* · \d\.\d\d")).first.wait_for(timeout=60_000)
    _settle(page, "showing More like this")
    _shot(page, "04b-more-like-this")
    _mark("more like this")

    # Train page: a short round in the background, its progress, then activate it; the knobs
    # are under Advanced (the operator sees one Retrain button). The round learns from unlabelled
    # footage (pseudo-identities): the switch is off by default on the demo (its MOT tracks come
    # with identities), so the operator turns it on
    _goto(page, app, "train")
    page.get_by_text(re.compile(r"Rounds on this machine train on (cpu|cuda)")).wait_for()
    switch = page.locator("[data-testid='stCheckbox']").filter(has_text=UNSUPERVISED)
    if not switch.locator("input").is_checked():
        switch.get_by_text(UNSUPERVISED).click()
    assert switch.locator("input").is_checked()
    page.locator("[data-testid='stExpander'] summary").filter(has_text="Advanced").click()
    # a small round (few steps, 4 x 4 crops a batch, the early blocks frozen, a re-clustering
    # at step 0 and at step 20): this checks the round's behaviour, not its quality
    # (tests/test_train.py does)
    knobs = {"Steps": 40, "Identities per batch (P)": 4, "Crops per identity (K)": 4,
             "Frozen early blocks (of 19)": 16, "Re-cluster every (steps)": 20}
    for label, value in knobs.items():
        box = page.get_by_role("spinbutton", name=label, exact=True)  # exact: "Steps" is in another label too
        box.fill(str(value))
        box.press("Tab")  # commits the value; Enter would submit the form: a second round
    page.get_by_role("button", name="Retrain").click()
    page.get_by_text(re.compile(r"Latest round: (queued|running)")).wait_for(timeout=60_000)
    (job,) = jobs.list_jobs("demo", kind="train")  # one click, one round, with the knobs' values
    cfg = job["args"]["config"]
    assert [cfg["steps"], cfg["ids_per_batch"], cfg["samples_per_id"], cfg["frozen_blocks"],
            cfg["recluster_every"]] == list(knobs.values()), cfg
    assert cfg.get("unsupervised", True) is True, cfg  # absent: the demo's auto is on
    _shot(page, "05-train-running")
    _mark("round queued")
    # .first: while the page reruns at the round's end, the old heading can still be there too
    page.get_by_text("Latest round: completed").first.wait_for(timeout=600_000)
    _settle(page, "the round's end")
    assert [j["id"] for j in jobs.list_jobs("demo", kind="train")] == [job["id"]]
    versions = [v for v in registry.list_versions("demo") if v["version"] != "base"]
    assert versions and versions[-1]["status"] == "ready"
    new = versions[-1]["version"]
    assert versions[-1]["metrics"]["all"]["mAP"] is not None
    rr = versions[-1]["metrics"]["reranked"]  # the same split, k-reciprocal re-ranked
    assert rr["n_queries"] == versions[-1]["metrics"]["all"]["n_queries"] and rr["mAP"] is not None
    trained = versions[-1]["train"]  # pseudo-identities: re-clustered at least at step 20
    assert trained["unsupervised"] is True and 20 in [r["step"] for r in trained["reclusters"]], trained
    assert trained["device"].startswith(("cpu", "cuda")) and isinstance(versions[-1]["proposals"], list)
    page.get_by_text(re.compile(r"Trained on (cpu|cuda).*pseudo-identities: last re-clustering \(step \d+\)"))\
        .first.wait_for()
    page.get_by_role("button", name="Activate").click()
    _settle(page, "activating the new version")
    assert store.active_model("demo") == new
    _shot(page, "06-train-done")
    _mark("round done, activated")

    # Export page: the dataset and the ONNX model
    _goto(page, app, "export")
    page.get_by_role("button", name="Export dataset").click()
    page.get_by_text(re.compile(r"[Ee]xported|[Ww]rote")).first.wait_for(timeout=300_000)
    page.get_by_text("Also int8").click()  # fp32 only here: tests/test_export.py covers int8
    _mark("dataset exported")
    page.get_by_role("button", name="Export and verify model").click()
    page.get_by_text(re.compile(r"max abs", re.I)).first.wait_for(timeout=300_000)
    _settle(page, "exporting the model")
    exports = store_exports()
    assert any(p.suffix == ".onnx" for p in exports), exports
    assert any(p.name in ("metadata.json", "samples.json", "manifest.csv") for p in exports), exports
    _shot(page, "07-export")
    _mark("model exported")


def store_exports() -> list[Path]:
    from core.config import settings

    return [p for p in settings().exports_dir.rglob("*") if p.is_file()]
