"""Ingest and export as background jobs through a real worker, and the first run's demo that
queues its own embedding. Each test prints what it checked."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.services import export
from core.data import jobs, store
from core.jobs import tasks
from core.services.ingest import IngestError, ingest
from tests.conftest import need_shared


def _wait_progress(job_id: str, timeout: float = 120) -> dict:
    """The job once it runs and reported some progress."""
    end = time.time() + timeout
    while time.time() < end:
        j = jobs.get(job_id)
        assert j["state"] in ("queued", "running"), j
        if j["state"] == "running" and (j["progress"] or 0) > 0:
            return j
        time.sleep(0.2)
    raise TimeoutError(jobs.get(job_id))


def test_ingest_job_adds_samples_and_reports(worker, dsname):
    src = need_shared("mot", "TUD-Campus")
    job = tasks.submit_ingest(src, "mot", dsname, every_n=10)
    assert dsname in store.dataset_names()  # made at once: a delegated operation needs it
    done = jobs.wait(job, timeout=240)
    assert done["state"] == "completed", (done, jobs.log_tail(job))
    rep = done["result"]
    n = len(store.get_dataset(dsname))
    assert n > 0 and rep["added"] == n and rep["duplicates"] == 0
    assert rep["videos"] == 1 and rep["problems"] == [] and rep["problems_total"] == 0
    assert len(store.counts(dsname, "identity")) == 8
    assert f"{n} added" in rep["summary"] and rep["source"] == str(src)
    again = jobs.wait(tasks.submit_ingest(src, "mot", dsname, every_n=10), timeout=240)
    assert again["state"] == "completed" and again["result"]["added"] == 0
    assert again["result"]["duplicates"] == n and len(store.get_dataset(dsname)) == n
    print(f"ingest job: {n} crops of TUD-Campus added, 8 identities; the second job added 0, "
          f"{again['result']['duplicates']} already present")


def test_ingest_job_caps_its_problem_list(worker, dsname, tmp_path, monkeypatch):
    """Hundreds of unreadable files: the result keeps the first PROBLEMS_KEPT, counts them all."""
    src = next(need_shared("shadows").glob("*.jpg"))
    (tmp_path / "ok.jpg").write_bytes(src.read_bytes())
    n_bad = tasks.PROBLEMS_KEPT + 20
    for i in range(n_bad):
        (tmp_path / f"bad{i:04d}.jpg").write_bytes(b"not an image" * 10)
    job = tasks.submit_ingest(tmp_path, "images", dsname)
    done = jobs.wait(job, timeout=240)
    assert done["state"] == "completed", (done, jobs.log_tail(job))
    rep = done["result"]
    assert rep["added"] == 1 and rep["problems_total"] == n_bad
    assert len(rep["problems"]) == tasks.PROBLEMS_KEPT
    assert all(Path(f).name.startswith("bad") and "not an image" in why for f, why in rep["problems"])
    assert "bad0519.jpg" in jobs.log_tail(job, lines=n_bad + 50)  # the log has every skipped file
    print(f"ingest job: 1 added, {n_bad} skipped, {len(rep['problems'])} listed in the result")


def test_ingest_job_cancelled_mid_run(worker, dsname):
    job = tasks.submit_ingest(need_shared("mot", "PETS09-S2L1"), "mot", dsname, every_n=1)
    j = _wait_progress(job)
    jobs.cancel(job)
    t0 = time.time()
    end = jobs.wait(job, timeout=60)
    assert end["state"] == "cancelled", end
    assert "cancelled by operator" in jobs.log_tail(job)
    print(f"ingest job cancelled at {100 * j['progress']:.0f}% ({j['label']}); stopped "
          f"{time.time() - t0:.1f} s later with {len(store.get_dataset(dsname))} crops kept")


def test_bad_ingest_source_is_refused_before_queuing(dsname, tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        tasks.submit_ingest(tmp_path / "missing", "mot", dsname)
    with pytest.raises(IngestError, match="no MOT sequence"):
        tasks.submit_ingest(tmp_path, "mot", dsname)  # an empty folder
    with pytest.raises(store.StoreError, match="invalid dataset name"):
        tasks.submit_ingest(need_shared("mot", "TUD-Campus"), "mot", "bad/name")
    assert dsname not in store.dataset_names()
    assert jobs.list_jobs(dsname, kind="ingest") == []


@pytest.fixture(scope="module")
def campus(tmp_path_factory):
    name = "tasks_campus"
    ingest(need_shared("mot", "TUD-Campus"), "mot", name, every_n=10)
    yield name
    store.delete_dataset(name)


def test_export_dataset_job(worker, campus):
    out = f"job-tree-{time.time_ns()}"
    job = tasks.submit_export_dataset(campus, "classification-tree", out, by="identity")
    done = jobs.wait(job, timeout=240)
    assert done["state"] == "completed", (done, jobs.log_tail(job))
    rep = done["result"]
    n = len(store.get_dataset(campus))
    assert rep["count"] == n and rep["path"] == str(export.safe_export_path(out))
    assert len(rep["class_counts"]) == 8 and sum(c for _, c in rep["class_counts"]) == n
    assert sum(1 for p in Path(rep["path"]).rglob("*.jpg")) == n
    with pytest.raises(export.ExportError, match="already exists"):  # at once, nothing queued
        tasks.submit_export_dataset(campus, "classification-tree", out)
    with pytest.raises(export.ExportError, match="'..'"):
        tasks.submit_export_dataset(campus, "manifest", "../escape")
    assert len(jobs.list_jobs(campus, kind="export_dataset")) == 1
    print(f"export job: {n} crops in {len(rep['class_counts'])} identity folders at {rep['path']}")


def test_export_model_job(worker, campus):
    out = f"job-model-{time.time_ns()}"
    job = tasks.submit_export_model(campus, "base", out, int8=False)
    done = jobs.wait(job, timeout=300)
    assert done["state"] == "completed", (done, jobs.log_tail(job))
    rep = done["result"]
    assert rep["checker"] == "passed" and rep["max_abs_diff"] < export.ONNX_TOLERANCE and rep["verified_on"] > 0
    assert Path(rep["onnx"]).is_file() and Path(rep["card"]).is_file() and rep["onnx_int8"] is None
    print(f"model export job: {rep['onnx']}, max abs diff vs PyTorch {rep['max_abs_diff']:.1e} on "
          f"{rep['verified_on']} crops")


def test_export_job_cancelled_leaves_no_folder(worker, campus):
    out = f"job-cancel-{time.time_ns()}"
    job = tasks.submit_export_model(campus, "base", out, int8=True)
    _wait_progress(job)
    jobs.cancel(job)
    end = jobs.wait(job, timeout=120)
    assert end["state"] == "cancelled", end
    final = export.safe_export_path(out)
    assert not final.exists()
    assert not [p for p in final.parent.iterdir() if p.name.startswith(f".{out}.tmp-")]  # staging removed
    print("model export cancelled: no export folder, no staging folder left")


# --------------------------------------------------------------------------- first run

def test_demo_queues_its_embedding_once(dsname, capsys):
    from core.cli import demo
    from core.cli.main import main

    try:
        assert main(["demo", "--dataset", dsname]) == 0
        printed = capsys.readouterr().out
        queued = jobs.list_jobs(dsname, kind="embed")
        assert len(queued) == 1 and queued[0]["args"] == {}, queued
        assert queued[0]["state"] in ("queued", "running", "completed")
        assert queued[0]["id"] in printed and len(store.get_dataset(dsname)) > 0
        assert main(["demo", "--dataset", dsname]) == 0  # a second `make run`: nothing new
        assert "already present" in capsys.readouterr().out
        assert len(jobs.list_jobs(dsname, kind="embed")) == 1
        jobs.cancel(queued[0]["id"])
        store.set_active_model(dsname, "base")  # embedded: a later run queues nothing either
        assert demo.ensure_demo(dsname) is None
        assert len(jobs.list_jobs(dsname, kind="embed")) == 1
    finally:
        for j in jobs.list_jobs(dsname):
            jobs.cancel(j["id"])
            jobs.wait(j["id"], timeout=120)  # the worker is free before the dataset goes
    print(f"demo {dsname}: {len(store.get_dataset(dsname))} samples, one embedding job queued at "
          "creation, none on later runs")
