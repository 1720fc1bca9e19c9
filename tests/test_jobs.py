"""Background jobs through a real worker: FiftyOne delegated operations on the test database."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from core.data import jobs, store
from core.services.ingest import ingest
from tests.conftest import need_shared


def _wait_running(job_id: str, min_progress: float = 0.05, timeout: float = 120) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        j = jobs.get(job_id)
        rec = store.db()[jobs.COLLECTION].find_one({"_id": job_id})
        if j["state"] == "running" and rec.get("pid") and (j["progress"] or 0) >= min_progress:
            return rec
        assert j["state"] in ("queued", "running"), j
        time.sleep(0.2)
    raise TimeoutError(jobs.get(job_id))


def test_embed_job_runs_in_the_worker(worker, dsname):
    ingest(need_shared("mot", "TUD-Campus"), "mot", dsname, every_n=10)
    job = jobs.submit(dsname, "embed", {})
    done = jobs.wait(job, timeout=240)
    assert done["state"] == "completed", (done, jobs.log_tail(job))
    ds = store.get_dataset(dsname)
    assert store.active_model(dsname) == "base"
    assert ds.exists("emb_base").count() == len(ds)
    assert ds.exists("map_base").count() == len(ds)  # the map is ready when the job ends
    assert done["result"]["embedded"] == len(ds)
    assert "embed" in jobs.log_tail(job)
    # and so is the Annotate page's first pair question: queued by the job, none asked twice
    from core.services.labeling import base, pairs

    queued = [d["key"] for d in base._coll(base.PAIRS).find({"dataset": dsname, "status": "pending"})]
    assert done["result"]["pairs_queued"] == len(queued) == len(set(queued)) > 0
    item = pairs.next_pair(dsname, "tab", k=5)
    assert item is not None and item.key in queued and pairs.prepare(dsname) == 0  # pending: nothing added
    print(f"embed job: {len(ds)} samples embedded and laid out")


def test_cancel_and_sigkill_leave_the_active_model_unchanged(worker, dsname):
    ingest(need_shared("reid", "campus62", "train"), "reid", dsname)
    n = len(store.get_dataset(dsname))
    labels_before = store.counts(dsname, "identity")

    # cancelled while running
    job = jobs.submit(dsname, "embed", {"version": "base"})
    _wait_running(job)
    jobs.cancel(job)
    end = jobs.wait(job, timeout=120)
    assert end["state"] == "cancelled", end

    # the job's process killed with SIGKILL mid-run: reported failed, never left running
    job = jobs.submit(dsname, "embed", {"version": "base"})
    rec = _wait_running(job)
    os.kill(rec["pid"], signal.SIGKILL)
    end = jobs.wait(job, timeout=60)
    assert end["state"] == "failed" and "died" in end["error"] + jobs.get(job)["error"], end

    assert store.active_model(dsname) is None  # neither job got to set a model
    assert store.counts(dsname, "identity") == labels_before and len(store.get_dataset(dsname)) == n
    print(f"cancel + SIGKILL: {n} samples and {len(labels_before)} identities before and after, active model unchanged")


def test_unknown_kind_and_missing_dataset_are_refused(dsname):
    with pytest.raises(jobs.JobError, match="unknown job kind"):
        jobs.submit(dsname, "dance", {})
    with pytest.raises(store.StoreError, match="does not exist"):
        jobs.submit(dsname, "embed", {})


def test_worker_recording_first_never_fails_the_submit():
    """A fast worker writes the job's record before submit() does: both writes are one upsert,
    and neither clobbers the other (the old submit's insert raised DuplicateKeyError here)."""
    job_id = "race-" + os.urandom(4).hex()
    jobs.record_job(job_id, "ds", "embed", {}, pid=os.getpid(), host="h")  # the worker, first
    store.db()[jobs.COLLECTION].update_one({"_id": job_id}, {"$push": {"history": {"step": 1}},
                                                            "$set": {"cancel": True}})
    jobs.record_job(job_id, "ds", "embed", {})  # then the submitter
    rec = store.db()[jobs.COLLECTION].find_one({"_id": job_id})
    assert rec["pid"] == os.getpid() and rec["history"] == [{"step": 1}] and rec["cancel"] is True
    assert rec["dataset"] == "ds" and rec["submitted_at"]


def test_reused_pid_does_not_keep_a_dead_job_running(worker, dsname):
    """The recorded pid now belongs to another live process (this test's own): the start time
    tells it apart, and the job is marked failed instead of 'running' forever."""
    ingest(need_shared("reid", "campus62", "train"), "reid", dsname)
    job = jobs.submit(dsname, "embed", {"version": "base"})
    rec = _wait_running(job)
    assert rec["pid_started"]
    store.db()[jobs.COLLECTION].update_one({"_id": job}, {"$set": {"pid": os.getpid()}})
    try:
        assert jobs.reconcile() >= 1
        end = jobs.get(job)
        assert end["state"] == "failed" and "died" in end["error"], end
    finally:
        jobs.cancel(job)  # the real job process stops at its next progress check
        try:
            psutil.Process(rec["pid"]).wait(timeout=120)  # the worker is free before the dataset goes
        except psutil.NoSuchProcess:
            pass
