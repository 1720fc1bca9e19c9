"""The Data and Export pages queue background jobs (ingest, dataset and model export) instead of
working in the Streamlit script thread, show the job's progress, and its report when it ends."""
from __future__ import annotations

import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from core.data import jobs, store
from core.services.ingest import ingest
from tests.conftest import need_shared

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def _ingest_form(at: AppTest, path: str, kind: str, dataset: str, every: int = 10) -> None:
    next(t for t in at.text_input if t.label == "Folder on this machine").set_value(path)
    next(s for s in at.selectbox if s.label == "Kind").set_value(kind)
    next(t for t in at.text_input if t.label == "Into dataset").set_value(dataset)
    next(n for n in at.number_input if n.label == "Keep every Nth frame of a track").set_value(every)
    next(b for b in at.button if b.label == "Ingest").click()
    at.run()


def test_ingest_button_queues_a_job_and_shows_its_report(worker, dsname, tmp_path):
    src = need_shared("mot", "TUD-Campus")
    other = "t_" + dsname[2:][::-1]  # an existing dataset the page starts on
    ingest(src, "mot", other, every_n=20)
    try:
        at = AppTest.from_file(APP, default_timeout=60)
        at.session_state["dataset"] = other
        at.run()
        assert not at.exception, [e.value for e in at.exception]

        _ingest_form(at, str(tmp_path / "missing"), "mot", dsname)  # a bad path: said at once
        assert any("does not exist" in e.value for e in at.error), [e.value for e in at.error]
        assert dsname not in store.dataset_names() and not jobs.list_jobs(dsname)

        t0 = time.time()
        _ingest_form(at, str(src), "mot", dsname)
        took = time.time() - t0
        assert not at.exception, [e.value for e in at.exception]
        queued = jobs.list_jobs(dsname, kind="ingest")
        assert len(queued) == 1 and queued[0]["args"]["path"] == str(src), queued
        assert at.session_state["dataset"] == dsname  # the page follows the new dataset
        assert at.sidebar.selectbox[0].value == dsname

        done = jobs.wait(queued[0]["id"], timeout=240)
        assert done["state"] == "completed", (done, jobs.log_tail(done["id"]))
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        n = len(store.get_dataset(dsname))
        assert any("Ingest finished" in s.value and f"{n} added" in s.value for s in at.success), \
            [s.value for s in at.success]
        assert {m.label: m.value for m in at.metric}["Samples"] == str(n)
        print(f"Data page: the click queued job {done['id']} in {took:.1f} s; the worker added {n} "
              "crops and the page shows its report")
    finally:
        store.delete_dataset(other)


def test_export_page_queues_jobs_and_shows_reports(worker, dsname):
    from core.services import export

    ingest(need_shared("mot", "TUD-Campus"), "mot", dsname, every_n=10)
    n = len(store.get_dataset(dsname))
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["dataset"] = dsname
    at.run()
    at.switch_page("pages/export.py").run()
    assert not at.exception, [e.value for e in at.exception]

    out = f"page-tree-{time.time_ns()}"
    at.selectbox(key="exp_fmt").set_value("classification-tree")
    at.text_input(key="exp_out").set_value(out)
    next(b for b in at.button if b.label == "Export dataset").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    (job,) = jobs.list_jobs(dsname, kind="export_dataset")
    assert jobs.wait(job["id"], timeout=240)["state"] == "completed", jobs.log_tail(job["id"])

    m_out = f"page-model-{time.time_ns()}"
    at.checkbox(key="exp_int8").set_value(False)
    at.text_input(key="exp_m_out").set_value(m_out)
    next(b for b in at.button if b.label == "Export and verify model").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    (mjob,) = jobs.list_jobs(dsname, kind="export_model")
    assert jobs.wait(mjob["id"], timeout=300)["state"] == "completed", jobs.log_tail(mjob["id"])

    at.run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [s.value for s in at.success]
    assert any(f"Wrote {n} items (classification-tree)" in s for s in shown), shown
    assert any(str(export.safe_export_path(m_out) / "model.onnx") in s for s in shown), shown
    assert {m.label: m.value for m in at.metric}["onnx.checker"] == "passed"

    at.text_input(key="exp_out").set_value("../escape")  # refused at once, nothing queued
    next(b for b in at.button if b.label == "Export dataset").click()
    at.run()
    assert any("'..'" in e.value for e in at.error), [e.value for e in at.error]
    assert len(jobs.list_jobs(dsname, kind="export_dataset")) == 1
    print(f"Export page: dataset ({n} crops) and model exports ran as jobs; both reports shown")
