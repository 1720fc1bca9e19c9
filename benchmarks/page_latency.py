"""Page latency at 10k and 100k samples: the app (Streamlit, the pages of ``app.py``) driven by
Playwright in Debian's Chromium, each interaction timed from the operator's input to the moment
its result is on screen and the page's script has finished.

Data: a re-ID dataset of N **distinct crops** written as JPEG files, the same crops as
``map_scale.py``'s vectors (``map_scale.CropVariants``: every real source crop, its mirror image
and seeded ``core.math.augment`` variants; a crop equal to an earlier one is dropped), named
Market-1501 style (identity, camera), ingested by the real re-ID importer and embedded by the
real embed job (``core.jobs.tasks.embed_task``: packaged model, map layout, scores), with the
similarity index built. The 10k dataset is the first 10k crops; the 100k one those and 90k more.
Datasets live in a persistent data root under ``benchmarks/out/cache/page_latency`` (one
database per size) and are reused by later runs; ``--rebuild`` makes them again.

Timed, per size, in one fresh browser session against a freshly started app (so "first
render" includes the app's own caches filling, as for an operator opening it after a restart).
An action ends when the app's script run it caused has ended (Streamlit's own
``script_finished`` message on the page's websocket), its result is on screen and no element of
the previous run is left stale:

- ``app_cold_start``: the app process's first page (its imports, the database client);
- ``first_render_<page>``: opening each page until its last element is drawn (Map: the WebGL
  scatter of every sample);
- ``map_colour``: choosing another "Colour by" until the scatter shows the new traces;
- ``lasso_1000``: a lasso (Plotly's own lasso tool, drawn with the mouse) around the ~1,000
  points nearest a seeded point until "Selection: N samples" and its thumbnails are loaded;
- ``annotate_pair``: one pair answer ("Different") until the next pair is shown (the default
  view of a dataset with identities);
- ``annotate_crop``: one class decision ("person") in the crop view until the next item;
- ``similarity``: "More like this" until the re-ranked neighbours' thumbnails are shown.

Repeated actions (every one but first render) run ``--repeat`` times; the median is reported,
every run printed. Target (issue 17): every interaction <= 1 s at 10k and <= 2 s at 100k.
Writes ``benchmarks/out/page_latency.json``: ``{"10000": {ACTION: seconds}, "100000": {...}}``.

    python benchmarks/page_latency.py                   # 10k and 100k
    python benchmarks/page_latency.py --sizes 10000 --repeat 3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
CACHE = REPO / "benchmarks" / "out" / "cache" / "page_latency"
os.environ["VIGIL_DATA_ROOT"] = str(CACHE / "data")
os.environ.setdefault("VIGIL_DB_NAME", "pagebench_driver")
DATASET = "site"
FIRST = 10_000  # the crops of the smaller dataset; the larger one ingests these and the rest

import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------------------------
# data: distinct crop files, ingested and embedded once per size
# ----------------------------------------------------------------------------------------------


def write_crops(n: int) -> list[Path]:
    """The folders holding the first ``n`` distinct crops (``part0``: the first 10k, ``part1``: the
    rest), written once; Market-1501 names ``<identity>_c<camera>s1_<row>_00.jpg``."""
    import cv2
    from tqdm import tqdm

    from map_scale import CropVariants

    parts = [CACHE / "crops" / "part0", CACHE / "crops" / "part1"]
    need = [FIRST, n] if n > FIRST else [n]
    if any(int(d.name.split("_")[1]) >= n for d in (CACHE / "crops").glob("done_*")):
        return parts[: len(need)]
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    src = CropVariants(seed=0)
    pid = {k: i + 1 for i, k in enumerate(sorted(set(src.keys)))}
    cam = {c: i + 1 for i, c in enumerate(sorted(set(src.cameras)))}
    seen: set[str] = set()
    written, row = 0, 0
    bar = tqdm(total=n, desc=f"writing {n} distinct crops", unit="crop")
    while written < n:
        v, j = divmod(row, len(src.paths))  # variant v of source j, as map_scale's rows
        row += 1
        img = src.make((v, j))
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        h = hashlib.sha1(buf.tobytes()).hexdigest()
        if not ok or h in seen:  # an augmentation that drew no change repeats its crop: dropped
            continue
        seen.add(h)
        part = parts[0] if written < FIRST else parts[1]
        (part / f"{pid[src.keys[j]]:05d}_c{cam[src.cameras[j]]}s1_{row:06d}_00.jpg").write_bytes(buf.tobytes())
        written += 1
        bar.update()
    bar.close()
    (CACHE / "crops" / f"done_{n}").touch()
    return parts[: len(need)]


def prepare(n: int) -> dict:
    """In this process's database (VIGIL_DB_NAME): dataset ``site`` with the first ``n`` crops,
    embedded, laid out, scored and indexed; kept when it is already so."""
    from core.data import similarity, store
    from core.jobs import worker
    from core.jobs.tasks import embed_task
    from core.services import projection
    from core.services.ingest import ingest

    t0 = time.time()
    if DATASET in store.dataset_names():
        ds = store.get_dataset(DATASET)
        version = store.active_model(DATASET)
        if len(ds) == n and version and projection.cached_layout(DATASET, version):
            similarity.index(DATASET, version, build=True)
            return {"n": n, "reused": True}
        store.delete_dataset(DATASET)
    for part in write_crops(n):
        rep = ingest(part, "reid", DATASET, pattern="market1501")
        print(f"  ingested {part.name}: {rep.added} crops", flush=True)
    ds = store.get_dataset(DATASET)
    assert len(ds) == n, f"{len(ds)} samples ingested, {n} expected"
    embed_task(DATASET, {}, worker.LocalReporter(f"embed {n}"))
    similarity.index(DATASET, store.active_model(DATASET), build=True)
    return {"n": n, "reused": False, "seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------------------------
# the browser side
# ----------------------------------------------------------------------------------------------

class Runs:
    """The app's own end mark of each script run: Streamlit's ``script_finished`` message
    (status FINISHED_SUCCESSFULLY: a whole run, not a fragment's or one cut short by a rerun) on
    the page's websocket, counted as the browser receives them."""

    def __init__(self, page):
        self.done = 0
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        if isinstance(payload, (bytes, bytearray)):
            m = ForwardMsg()
            m.ParseFromString(bytes(payload))
            if m.WhichOneof("type") == "script_finished" and m.script_finished == ForwardMsg.FINISHED_SUCCESSFULLY:
                self.done += 1


RUNS: dict[int, Runs] = {}  # id(page) -> its runs


def _until(page, cond_js: str, after: int | None = None, timeout_s: float = 120) -> None:
    """Until a whole script run ended after the action (more than ``after`` runs done; None:
    any) and ``cond_js`` holds on screen with no element left stale (Streamlit marks what a run
    has not redrawn yet with ``data-stale``). (The running indicator is no end mark: it leaves
    with a 200 ms fade; the screen alone is none either: a rerun redraws element by element.)"""
    runs = RUNS[id(page)]
    deadline = time.perf_counter() + timeout_s
    js = f"() => ({cond_js}) && !document.querySelector('[data-stale=\"true\"]')"
    while True:
        page.wait_for_function(js, polling=20, timeout=max(1.0, deadline - time.perf_counter()) * 1000)
        if after is None or runs.done > after:
            return
        page.wait_for_timeout(10)  # lets the websocket events in
        if time.perf_counter() > deadline:
            raise TimeoutError("no script run ended after the action")


def _text_js(pattern: str) -> str:
    return f"/{pattern}/.test(document.body.innerText)"


PLOT = "document.querySelector('.js-plotly-plot')"
IMAGES_LOADED = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
MAIN_IMAGES = "Array.from(document.querySelectorAll(\"[data-testid='stMain'] img\")).map(i => i.src)"
DATA_DONE = _text_js("Open in FiftyOne App") + " && " + IMAGES_LOADED  # the Data page's last element


def new_page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(300_000)
    RUNS[id(page)] = Runs(page)
    return page


def first_render(page, app: str, path: str, cond_js: str) -> float:
    return timed(page, lambda: page.goto(f"{app}/{path}"), cond_js, 300)


def timed(page, act, cond_js: str, timeout_s: float = 120) -> float:
    """Seconds from ``act()`` to its result on screen (see :func:`_until`)."""
    before = RUNS[id(page)].done
    t = time.perf_counter()
    act()
    _until(page, cond_js, before, timeout_s)
    return time.perf_counter() - t


def colour_by(page, label: str) -> None:
    box = page.locator("[data-testid='stSelectbox']").filter(has_text="Colour by")
    box.locator("input").click()
    page.keyboard.type(label)
    page.locator("[role='option']").filter(has_text=label).first.wait_for()
    page.keyboard.press("Enter")


def lasso_polygon(page, target: int, rng: np.random.Generator, vertices: int = 40) -> list[tuple[float, float]]:
    """A circle (as page coordinates) around the ``target`` points nearest a seeded point of the
    scatter, inside the plot area."""
    g = page.evaluate("""() => { const d = document.querySelector('.js-plotly-plot');
        const xa = d._fullLayout.xaxis, ya = d._fullLayout.yaxis, r = d.getBoundingClientRect();
        const xs = [], ys = [];
        for (const t of d._fullData) { if (t.name === 'selected') continue;
          for (let i = 0; i < t.x.length; i++) { xs.push(xa._offset + xa.l2p(t.x[i])); ys.push(ya._offset + ya.l2p(t.y[i])); } }
        return {xs, ys, left: r.left, top: r.top, x0: xa._offset, y0: ya._offset, w: xa._length, h: ya._length}; }""")
    P = np.stack([g["xs"], g["ys"]], 1)
    for _ in range(200):
        c = P[rng.integers(len(P))]
        rad = np.sort(np.linalg.norm(P - c, axis=1))[target - 1] + 0.5
        if (c[0] - rad > g["x0"] + 2 and c[0] + rad < g["x0"] + g["w"] - 2
                and c[1] - rad > g["y0"] + 2 and c[1] + rad < g["y0"] + g["h"] - 2):
            a = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
            return [(g["left"] + c[0] + rad * np.cos(t), g["top"] + c[1] + rad * np.sin(t)) for t in a]
    raise RuntimeError("no seeded point has its 1,000 nearest points inside the plot")


def use_lasso(page) -> None:
    """Plotly's lasso tool, from the chart's mode bar (again when a redraw reset it)."""
    for _ in range(10):
        page.locator(".js-plotly-plot").first.hover()
        page.locator(".modebar-btn[data-title='Lasso Select']").first.click()
        time.sleep(0.3)
        if page.evaluate(f"() => {PLOT}._fullLayout.dragmode") == "lasso":
            return
    raise RuntimeError("the chart's lasso tool could not be chosen")


def lasso(page, poly) -> None:
    page.mouse.move(*poly[0])
    page.mouse.down()
    for p in [*poly[1:], poly[0]]:
        page.mouse.move(*p, steps=2)


def measure(n: int, port: int, repeat: int) -> dict[str, list[float]]:
    """Start the app on the size's database, drive it, return every timing per action."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, wait_until_serving

    env = {**os.environ, "VIGIL_DB_NAME": f"pagebench_{n}", "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"}
    log_path = CACHE / f"app_{n}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "streamlit"), "run", "app.py", "--server.address",
                             "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    app = f"http://127.0.0.1:{port}"
    out: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    try:
        wait_until_serving(proc, app, log_path, "streamlit")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update"])
            page = new_page(browser)
            pages = [page]
            try:
                drive(pages, browser, app, n, repeat, rng, out)
            except Exception:
                pages[-1].screenshot(path=str(CACHE / f"failed_{n}.png"), full_page=True)
                print(f"  failed: the page as it was is in {CACHE / f'failed_{n}.png'}", flush=True)
                raise
            browser.close()
    finally:
        from tests.test_browser import stop_server

        stop_server(proc, log)
    return out


def drive(pages: list, browser, app: str, n: int, repeat: int, rng, out: dict[str, list[float]]) -> None:
    """Every timed action, in an operator's order, into ``out``; ``pages[-1]`` is the page in use."""
    page = pages[-1]

    def rec(action: str, s: float) -> None:
        out.setdefault(action, []).append(s)
        print(f"    {action:24s} {s:6.2f} s", flush=True)

    # the app process's own start (imports, the database client) on its first page, then
    # each page's first render in a new browser session (the app's caches as it left them)
    rec("app_cold_start", first_render(page, app, "", DATA_DONE))
    page.close()
    page = new_page(browser)
    pages.append(page)
    rec("first_render_data", first_render(page, app, "", DATA_DONE))
    plotted = f"{PLOT} && {PLOT}._fullData && {PLOT}._fullData.length > 0"
    rec("first_render_map", first_render(page, app, "map", plotted + " && " + _text_js(
        "Select the top candidates on the map|No candidates yet") + " && " + IMAGES_LOADED))

    def traces() -> list[str]:
        return page.evaluate(f"() => {PLOT}._fullData.map(t => t.name)")

    for i in range(repeat):
        before = traces()
        label = "camera" if i % 2 == 0 else "identity"
        rec("map_colour", timed(page, lambda: colour_by(page, label),
                                f"{PLOT} && JSON.stringify({PLOT}._fullData.map(t => t.name)) !== "
                                f"{json.dumps(json.dumps(before))}"))
    for _ in range(repeat):
        use_lasso(page)
        poly = lasso_polygon(page, 1000, rng)
        lasso(page, poly)
        got = timed(page, page.mouse.up, _text_js(r"Selection: \d+ samples") + " && " + IMAGES_LOADED)
        sel = int(re.search(r"Selection: (\d+)", page.inner_text("body")).group(1))
        rec("lasso_1000", got)
        print(f"      (lasso took {sel} points)", flush=True)
        page.get_by_role("button", name="Clear selection").click()
        _until(page, "!" + _text_js(r"Selection: \d+ samples"))

    rec("first_render_annotate", first_render(page, app, "annotate", "(" + _text_js(
        "Same person\\?") + " || " + _text_js("samples have a human decision") + ") && " + IMAGES_LOADED))
    if "Same person?" in page.inner_text("body"):
        for _ in range(repeat):
            # the next pair is on screen when the sides' crops are others (two pairs can carry the
            # same identity names: crops an ingest named alike, asked to confirm)
            before = page.evaluate(f"() => {MAIN_IMAGES}")
            cond = (_text_js("Same person\\?") + f" && JSON.stringify({MAIN_IMAGES}) !== "
                    f"{json.dumps(json.dumps(before))} && {MAIN_IMAGES}.length > 0 && " + IMAGES_LOADED)
            rec("annotate_pair", timed(page, lambda: page.get_by_role("button", name="Different").click(),
                                       cond))
        page.get_by_text("Crops: class & identity").click()
        _until(page, _text_js(r"#\d+ of batch"))
    for _ in range(repeat):
        at = re.search(r"#\d+ of batch \d+", page.inner_text("body")).group(0)  # the next item: another place
        rec("annotate_crop", timed(page, lambda: page.get_by_role(
            "button", name=re.compile(r"^person")).first.click(),
            _text_js(r"#\d+ of batch \d+") + f" && !document.body.innerText.includes({json.dumps(at)})"))
    for i in range(repeat):
        toggle = page.locator("[data-testid='stCheckbox']").filter(has_text="More like this")
        if i:  # off, then on again: a fresh query
            toggle.get_by_text("More like this").click()
            _until(page, "!" + _text_js(r" · cam [^\n]* · \d\.\d\d"))
        rec("similarity", timed(page, lambda: toggle.get_by_text("More like this").click(),
                                _text_js(r" · cam [^\n]* · \d\.\d\d") + " && " + IMAGES_LOADED))
    rec("first_render_train", first_render(page, app, "train", _text_js("Roll back")))
    rec("first_render_export", first_render(page, app, "export", _text_js("The model export runs in the background")))
    page.screenshot(path=str(CACHE / f"last_{n}.png"), full_page=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--repeat", type=int, default=5, help="runs of each repeated action (median reported)")
    ap.add_argument("--rebuild", action="store_true", help="make the datasets again")
    ap.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        print(json.dumps(prepare(args.prepare)), flush=True)
        return

    from core.data import store
    from tests.test_browser import _free_port

    store.dataset_names()  # the driver stays a database client: MongoDB outlives each step
    print(f"page_latency: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    write_crops(max(args.sizes))
    report: dict = {}
    for n in args.sizes:
        env = {**os.environ, "VIGIL_DB_NAME": f"pagebench_{n}"}
        if args.rebuild:
            subprocess.run([sys.executable, "-c", "from core.data import store; store.delete_dataset('site')"],
                           cwd=REPO, env=env, check=False)
        t = time.time()
        subprocess.run([sys.executable, __file__, "--prepare", str(n)], env=env, check=True)
        print(f"\nN = {n:,} distinct crops (dataset ready in {time.time() - t:.0f} s); timings:", flush=True)
        runs = measure(n, _free_port(), args.repeat)
        report[str(n)] = {a: round(statistics.median(v), 3) for a, v in runs.items()}
        limit = 1.0 if n <= 10_000 else 2.0
        for a, s in report[str(n)].items():
            print(f"  {a:24s} median {s:6.2f} s  (target <= {limit:.0f} s: {'met' if s <= limit else 'MISSED'})",
                  flush=True)
    out = REPO / "benchmarks" / "out" / "page_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(out.read_text()) if out.exists() else {}  # a run of one size keeps the other's
    out.write_text(json.dumps({**kept, **report}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
