"""Per-dataset state written by two processes: an operator's activation and a background job's
writes (label schema, map and cluster records) never undo each other."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from core.services import labeling, registry
from core.data import store

REPO = Path(__file__).resolve().parent.parent

JOB = """
import sys, time
from core.services import labeling
from core.data import store
name, seconds = sys.argv[1], float(sys.argv[2])
print("ready", flush=True)
end, n = time.time() + seconds, 0
while time.time() < end:  # what a job writes beside an operator (a map record, the schema)
    labeling.set_label_schema(name, {"classes": ["person", f"c{n % 7}"]})
    store.set_state(name, "maps.map_base", {"n": n})
    n += 1
print("wrote", n, flush=True)
"""


def _dataset(tmp_path, name: str) -> list[str]:
    recs = []
    for k in range(4):
        p = tmp_path / f"{k}.jpg"
        cv2.imwrite(str(p), np.full((32, 16, 3), 40 * k, np.uint8))
        recs.append({"filepath": str(p), "kind": "crop", "identity": f"p{k}", "ingest_key": f"k{k}"})
    store.add_records(name, recs)
    return store.view_columns(name, [])["id"]


def test_activation_racing_a_job_is_never_undone(tmp_path, dsname):
    ids = _dataset(tmp_path, dsname)
    versions = ["base"]
    for _ in range(2):
        v = registry.new_version(dsname, "base", {})
        registry.finish(dsname, v, {})
        versions.append(v)
    for v in versions:
        store.set_values(dsname, store.embedding_field(v), {i: [1.0, 0.0] for i in ids})
    store.set_active_model(dsname, "base")
    job = subprocess.Popen([sys.executable, "-c", JOB, dsname, "8"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "ready"
    undone, n = [], 0
    end = time.time() + 6
    while time.time() < end:
        want = versions[n % 3]
        registry.activate(dsname, want)
        time.sleep(0.02)  # the job writes meanwhile
        got = store.active_model(dsname)
        if got != want:
            undone.append((want, got))
        n += 1
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0 and "wrote" in out
    assert not undone, f"{len(undone)} of {n} activations undone by the job, e.g. {undone[:3]}"
    st = store.state(dsname)
    last = int(out.split()[-1]) - 1  # the job's writes survived the activations too
    assert st["maps"]["map_base"] == {"n": last}
    assert labeling.label_schema(dsname).classes == ["person", f"c{last % 7}"]
    # the history grew with each activation and rolls back one step at a time
    assert st["model_history"][-1] == versions[(n - 2) % 3]
    assert registry.rollback(dsname) == versions[(n - 2) % 3]
    print(f"{n} activations raced {out.split()[-1]} job writes: none undone")


def test_a_default_never_overrides_an_operator(tmp_path, dsname):
    _dataset(tmp_path, dsname)
    assert store.active_model(dsname) is None
    assert store.set_active_model(dsname, "v-op")
    assert not store.set_active_model(dsname, "base", only_if_unset=True)  # what embed_dataset does
    assert store.active_model(dsname) == "v-op"


def test_state_is_seeded_from_old_dataset_info(tmp_path, dsname):
    _dataset(tmp_path, dsname)
    store.db()[store.STATE].delete_one({"_id": dsname})  # a dataset from before the state collection
    ds = store.get_dataset(dsname)
    ds.info = {"active_model": "old-r3", "model_history": ["base"]}
    ds.save()
    assert store.active_model(dsname) == "old-r3"
    assert registry.rollback(dsname) == "base"
