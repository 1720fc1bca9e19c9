"""Embedding spread over workers (core.jobs.tasks.spread_embedding): real worker processes on
loopback against one MongoDB take the shards, every sample is embedded by exactly one shard,
and a worker killed mid-shard leaves its shard to the other."""
import os
import signal
import time

import pytest

from core.data import jobs, store
from tests.conftest import Worker, ingest_campus62


@pytest.fixture
def crops(dsname, tmp_path):
    """Real campus62 crops: 24 identities, two cameras."""
    return ingest_campus62(dsname, tmp_path / "c", slice(24))


def _shard_records(run: str) -> list[dict]:
    """Each shard job's record (worker pid, args) with its state and result."""
    out = []
    for rec in store.db()[jobs.COLLECTION].find({"kind": "embed_shard", "args.run": run}):
        job = jobs.get(rec["_id"])
        out.append({**rec, "state": job["state"], "result": job["result"]})
    return out


def _wait_finished(run: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while not jobs.run_status(run)["finished"]:
        assert time.time() < deadline, f"run not finished in {timeout} s: {jobs.run_status(run)}"
        time.sleep(0.5)
    return jobs.run_status(run)


def _each_sample_once(name: str, completed: list[dict], n: int) -> None:
    """Every sample embedded, by exactly one completed shard; the run finished by one of them."""
    assert sorted(r["args"]["shard"] for r in completed) == list(range(n))
    ids = store.view_columns(name, [store.embedding_field("base")])
    assert all(v is not None for v in ids[store.embedding_field("base")])
    shard_ids = [i for r in completed for i in r["args"]["ids"]]
    assert sorted(shard_ids) == sorted(ids["id"])  # disjoint and complete
    assert sum(r["result"]["embedded"] for r in completed) == len(ids["id"])
    assert sum(bool(r["result"]["finished_run"]) for r in completed) == 1
    assert store.active_model(name) == "base"


def test_two_workers_share_the_shards_and_embed_each_sample_once(crops, worker):
    from core.jobs import tasks

    other = Worker().start()
    try:
        run = tasks.spread_embedding(crops, 8)
        rec = _wait_finished(run)
    finally:
        other.stop()
    recs = _shard_records(run)
    completed = [r for r in recs if r["state"] == "completed"]
    assert len(recs) == len(completed) == rec["n"] == 8  # no shard ran twice, none was retried
    _each_sample_once(crops, completed, 8)
    assert {r["worker_pid"] for r in completed} == {worker.proc.pid, other.proc.pid}
    last = next(r for r in completed if r["result"]["finished_run"])
    assert last["result"]["map_points"] == len(store.view_columns(crops, [])["id"])


def test_a_worker_killed_mid_shard_leaves_its_shard_to_the_other(crops, worker):
    from core.jobs import tasks

    run = tasks.spread_embedding(crops, 2)
    deadline = time.time() + 120
    while True:  # the session's worker has started one of the shards (its job process is loading)
        mine = store.db()[jobs.COLLECTION].find_one({"args.run": run, "worker_pid": worker.proc.pid})
        if mine:
            break
        assert time.time() < deadline, "the worker took no shard"
        time.sleep(0.02)
    killed = mine["args"]["shard"]
    worker.kill()  # the machine is gone: the worker and the job's process (its own process group)
    os.kill(mine["pid"], signal.SIGKILL)
    other = Worker().start()  # finds the dead job at start: failed, its shard queued again
    try:
        rec = _wait_finished(run)
    finally:
        other.stop()
        worker.start()  # the session's worker, for the tests after this one
    recs = _shard_records(run)
    dead = [r for r in recs if r["args"]["shard"] == killed and r["args"]["attempt"] == 1]
    assert [r["state"] for r in dead] == ["failed"] and "died" in (jobs.get(dead[0]["_id"])["error"] or "")
    completed = [r for r in recs if r["state"] == "completed"]
    (again,) = [r for r in completed if r["args"]["shard"] == killed]
    assert again["args"]["attempt"] == 2 and again["worker_pid"] == other.proc.pid
    assert rec["attempts"][str(killed)] == 2
    _each_sample_once(crops, completed, 2)
