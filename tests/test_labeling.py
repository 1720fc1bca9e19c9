"""Labelling queue, leases, decisions, undo, identities, progress and tracklet context on real
TUD-Campus crops (MOT15 identities). Embeddings are synthetic (identity centroid + noise, written
into ``emb_base``) so the tests stay fast and the kNN predictions are meaningful."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ds(tud_clone):
    """conftest's TUD-Campus clone, its queues cleared afterwards."""
    yield tud_clone
    from core.services import labeling

    labeling.wait_for_refills()
    labeling.clear_queue(tud_clone)


def _state(name, sid):
    from core.services import labeling

    return labeling.sample_state(name, sid)[0]


def _label_all(name, session, spec, out, stop_after=None, pause=0.0):
    from core.services import labeling

    while True:
        it = labeling.next_item(name, session, lease_s=60, queue=spec)
        if it is None:
            return
        out.append(it.sample_id)
        # a behaviour, not an identity: an identity names the crop's whole tracklet (the identity
        # graph, tests/test_identity.py), so two sessions on one tracklet would rightly conflict
        labeling.decide(name, session, it.sample_id, session, label="person",
                        behaviour=f"{session}:{it.sample_id}", expected_version=it.token)
        if pause:
            time.sleep(pause)
        if stop_after and len(out) >= stop_after:
            return


def _check_all_present(name, served: dict[str, list[str]]):
    from core.services import labeling
    from core.data import store

    everyone = [s for v in served.values() for s in v]
    assert len(everyone) == len(set(everyone)), "an item was served to two sessions"
    for a in served:
        for b in served:
            if a < b:
                assert not set(served[a]) & set(served[b])
    # every decision is in FiftyOne, by the session that made it, and in the log
    ds = store.get_dataset(name)
    by, ident = dict(zip(ds.values("id"), ds.values("labelled_by"))), dict(zip(ds.values("id"), ds.values("behaviour")))
    for session, sids in served.items():
        for s in sids:
            assert by[s] == session
            assert ident[s].startswith(session + ":")
    log = labeling.decisions(name, limit=1000)
    assert sorted(d.sample_id for d in log if d.kind == "label") == sorted(everyone)
    assert all(len(d["served_to"]) == 1 for d in store.db()[labeling.ITEMS].find({"dataset": name}))


def test_two_sessions_in_threads_share_the_dataset(ds):
    from core.services import labeling
    from core.data import store

    spec = labeling.QueueSpec(k=8, refill_below=3, seed=1)
    served: dict[str, list[str]] = {"alice": [], "bob": []}
    errors = []

    def run(session):
        try:
            _label_all(ds, session, spec, served[session])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(s,)) for s in served]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    labeling.wait_for_refills()
    # the queue refilled until every sample had a decision
    assert store.get_dataset(ds).exists("labelled_by").count() == len(store.get_dataset(ds))
    assert served["alice"] and served["bob"]
    _check_all_present(ds, served)


WORKER = """
import sys, json
from core.services import labeling
name, session, key = sys.argv[1:4]
print("ready", flush=True)
sys.stdin.readline()
out = []
while True:
    it = labeling.next_item(name, session, lease_s=60, queue=key, refill=False)
    if it is None:
        break
    out.append(it.sample_id)
    labeling.decide(name, session, it.sample_id, session, label="person",
                    behaviour=session + ":" + it.sample_id, expected_version=it.token)
print(json.dumps(out), flush=True)
"""


def test_two_processes_never_get_the_same_item(ds):
    import json

    from core.services import labeling

    spec = labeling.build_queue(ds, "random", k=40, seed=3, refill_below=0)
    proc = subprocess.Popen([sys.executable, "-c", WORKER, ds, "proc2", spec.key], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        mine: list[str] = []
        while True:
            it = labeling.next_item(ds, "proc1", lease_s=60, queue=spec.key, refill=False)
            if it is None:
                break
            mine.append(it.sample_id)
            labeling.decide(ds, "proc1", it.sample_id, "proc1", label="person",
                            behaviour=f"proc1:{it.sample_id}", expected_version=it.token)
        theirs = json.loads(proc.stdout.readline())
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert len(mine) + len(theirs) == 40
    assert theirs, "the second process got no work (not concurrent?)"
    _check_all_present(ds, {"proc1": mine, "proc2": theirs})


def test_lease_expiry_conflict_and_no_overwrite(ds):
    from core.services import labeling

    spec = labeling.build_queue(ds, "random", k=6, seed=2, refill_below=0)
    a = labeling.next_item(ds, "s1", lease_s=0.6, queue=spec.key, refill=False)
    assert labeling.next_item(ds, "s1", lease_s=0.6, queue=spec.key, refill=False).sample_id == a.sample_id
    b = labeling.next_item(ds, "s2", lease_s=60, queue=spec.key, refill=False)
    assert b.sample_id != a.sample_id  # a is still leased
    time.sleep(0.8)
    c = labeling.next_item(ds, "s3", lease_s=60, queue=spec.key, refill=False)
    assert c.sample_id == a.sample_id  # the expired lease went to another session
    assert labeling.renew(ds, "s1", a.sample_id) is False  # the tab came back too late
    labeling.decide(ds, "s3", c.sample_id, "carol", label="vehicle", expected_version=c.token)
    with pytest.raises(labeling.LabelConflict) as exc:
        labeling.decide(ds, "s1", a.sample_id, "alice", label="animal", expected_version=a.token)
    assert exc.value.theirs["label"] == "vehicle" and exc.value.theirs["labelled_by"] == "carol"
    assert exc.value.mine["label"] == "animal"
    st = _state(ds, a.sample_id)
    assert st["label"] == "vehicle" and st["labelled_by"] == "carol"  # nothing overwritten
    # the operator chose "keep mine": with the current token it is written, knowingly
    labeling.decide(ds, "s1", a.sample_id, "alice", label="animal", expected_version=exc.value.token)
    assert _state(ds, a.sample_id)["label"] == "animal"
    # release hands an item back at once
    assert labeling.release(ds, "s2") == 1
    assert labeling.next_item(ds, "s4", queue=spec.key, refill=False).sample_id == b.sample_id


def test_decision_fields_and_undo_restores_before_values(ds):
    from core.services import labeling
    from core.data import store

    it = labeling.next_item(ds, "u1", queue=labeling.QueueSpec(k=5, seed=4))
    before = _state(ds, it.sample_id)
    assert before["labelled_by"] is None and before["label"] == "person"
    d = labeling.decide(ds, "u1", it.sample_id, "alice", label="shadow/noise", identity="id-x", behaviour="loitering",
                        tags_add=["night", "occluded"], attributes={"access": "intruder"}, expected_version=it.token)
    s = store.get_dataset(ds).select([it.sample_id]).first()
    assert (s.label, s.identity, s.behaviour, s.labelled_by) == ("shadow/noise", "id-x", "loitering", "alice")
    assert {"night", "occluded"} <= set(s.tags) and s.attributes == {"access": "intruder"}
    assert s.labelled_at and s.label_round == 0 and s.label_version == 1
    assert d.before["label"] == "person" and d.after["identity"] == "id-x"
    # undo is refused when someone changed the sample since
    other = labeling.decide(ds, "u2", it.sample_id, "bob", label="other")
    assert labeling.undo(ds, "nobody") is None
    with pytest.raises(labeling.LabelConflict):
        labeling.undo(ds, "u1")
    assert _state(ds, it.sample_id)["label"] == "other"
    labeling.undo(ds, "u2")  # bob undoes his; now alice's undo goes through
    assert _state(ds, it.sample_id)["label"] == "shadow/noise"
    undone = labeling.undo(ds, "u1")
    assert undone.sample_id == it.sample_id
    after = _state(ds, it.sample_id)
    for f in ("label", "identity", "behaviour", "attributes", "labelled_by", "labelled_at", "tags"):
        assert after[f] == before[f], f
    assert other.kind == "label"
    # the undone item is served to the same session again
    assert labeling.next_item(ds, "u1", queue=labeling.QueueSpec(k=5, seed=4)).sample_id == it.sample_id
    # skip then undo re-serves too
    labeling.decide(ds, "u1", it.sample_id, "alice", skip=True)
    assert labeling.next_item(ds, "u1", queue=labeling.QueueSpec(k=5, seed=4)).sample_id != it.sample_id
    labeling.release(ds, "u1")
    assert labeling.undo(ds, "u1").kind == "skip"
    assert labeling.next_item(ds, "u1", queue=labeling.QueueSpec(k=5, seed=4)).sample_id == it.sample_id


def test_modes_decide_what_is_labelled_and_map_picks_go_first(ds):
    from core.services import labeling
    from core.data import store

    n = len(store.get_dataset(ds))
    # "trust": every crop arrived with a MOT identity, so nothing is left to label
    assert labeling.compute_batch(ds, labeling.QueueSpec(k=10, mode="trust")).rows == []
    # "verify": ingested identities are unverified; the batch has no duplicates
    b = labeling.compute_batch(ds, labeling.QueueSpec(k=10, mode="verify", seed=5))
    ids = [r.sample_id for r in b.rows]
    assert len(ids) == 10 == len(set(ids)) and b.n_candidates == n
    # a decided sample is never queued again; samples sent from the map come first
    labeling.decide(ds, "m", ids[0], "op", identity=b.rows[0].identity)
    sent = [s for s in store.get_dataset(ds).values("id") if s not in ids][:2]
    store.tag_samples(ds, sent, [labeling.TO_LABEL])
    b2 = labeling.compute_batch(ds, labeling.QueueSpec(k=10, mode="verify", seed=5))
    got = [r.sample_id for r in b2.rows]
    assert ids[0] not in got and set(got[:2]) == set(sent) and b2.n_labelled == 1
    assert "map" in b2.rows[0].reason
    # a view restricts the candidates (labelled samples outside it still inform the model)
    view = tuple(store.get_dataset(ds).values("id")[:6])
    b3 = labeling.compute_batch(ds, labeling.QueueSpec(k=10, seed=5, view_ids=view))
    assert b3.rows and {r.sample_id for r in b3.rows} <= set(view) - {ids[0]}
    # deciding removes the to-label tag
    labeling.decide(ds, "m", sent[0], "op", label="person")
    assert labeling.TO_LABEL not in store.get_dataset(ds).select([sent[0]]).first().tags


def test_identities_merge_flag_progress_and_agreement(ds):
    from core.services import labeling
    from core.data import store

    spec = labeling.QueueSpec(k=40, strategy="random", seed=6, refill_below=0)
    for _ in range(12):  # confirm ingested identities: the kNN model agrees more as labels accrue
        it = labeling.next_item(ds, "p", queue=spec, refill=False)
        labeling.decide(ds, "p", it.sample_id, "op", identity=it.identity, expected_version=it.token)
    it = labeling.next_item(ds, "p", queue=spec, refill=False)
    sugg = labeling.suggest_identities(ds, it.sample_id, k=3)
    assert sugg and sugg[0]["verified"] and sugg[0]["distance"] <= sugg[-1]["distance"]
    assert sugg[0]["identity"] == it.identity  # clustered embeddings: the nearest is right
    assert labeling.predict(ds, it.sample_id) == it.identity
    series = labeling.agreement_series(ds)
    assert len(series) >= 10 and series[-1]["n"] == len(series)
    assert series[-1]["cumulative"] > 0.5
    prog = labeling.progress(ds)
    assert prog["labelled"] == 12 and sum(prog["per_identity"].values()) == 12
    assert prog["per_class"] == {"person": 12} and prog["per_user"] == {"op": 12}
    # a fresh identity, then merge it away and undo the merge
    new = labeling.new_identity(ds)
    assert new not in labeling.identities(ds) and labeling.new_identity(ds) != new
    labeling.decide(ds, "p", it.sample_id, "op", identity=new, expected_version=it.token)
    target = sugg[0]["identity"]
    labeling.merge_identities(ds, target, new, "op", session_id="p")
    assert _state(ds, it.sample_id)["identity"] == target
    assert labeling.undo(ds, "p").kind == "merge"
    assert _state(ds, it.sample_id)["identity"] == new
    # flags are not labels
    assert labeling.flag(ds, [it.sample_id], "misclustered", "op") == 1
    s = store.get_dataset(ds).select([it.sample_id]).first()
    assert s.flagged and s.flag_reason == "misclustered"


def test_bulk_decision_is_checked_logged_and_undone_as_one_step(ds, monkeypatch):
    """The Map page's bulk actions: schema checks, compare-and-set per sample (a concurrent
    write is kept, not overwritten), one "bulk" log entry with before / after per sample, one
    undo step that restores what nobody changed since and lists the rest."""
    from core.services import labeling
    from core.data import store

    ids = store.get_dataset(ds).values("id")[:14]
    sel, later = ids[:10], ids[10:]
    for bad in ({"label": "dragon"}, {"tags_add": ["sparkly"]}, {}):  # refused, nothing written
        with pytest.raises(labeling.LabelingError):
            labeling.bulk_decide(ds, "map", sel, "alice", **bad)
    store.tag_samples(ds, sel[:2], [labeling.TO_LABEL])  # sent to the queue earlier
    before = {s: labeling.sample_state(ds, s) for s in sel}
    tags_before = {s: t for s, t in zip(sel, store.get_dataset(ds).select(sel, ordered=True).values("tags"))}
    # another operator labels sel[5] between the bulk action's read and its write
    from core.services.labeling import decision as labeling_decision  # where bulk_decide looks _state up

    raced, real_state = [], labeling_decision._state

    def racing_state(doc):
        if doc and str(doc.get("_id")) == sel[5] and not raced:
            raced.append(1)
            labeling.decide(ds, "bob-tab", sel[5], "bob", label="animal")
        return real_state(doc)

    monkeypatch.setattr(labeling_decision, "_state", racing_state)
    r = labeling.bulk_decide(ds, "map", [*sel, "0" * 24], "alice", label="vehicle", identity="id-bulk",
                             tags_add=["shadow"])
    monkeypatch.setattr(labeling_decision, "_state", real_state)
    assert raced and r.conflicts == [sel[5]] and r.missing == ["0" * 24]
    assert r.changed == [s for s in sel if s != sel[5]] and r.id
    assert _state(ds, sel[5])["label"] == "animal" and _state(ds, sel[5])["labelled_by"] == "bob"
    for s in r.changed:
        st = _state(ds, s)
        assert (st["label"], st["identity"], st["labelled_by"]) == ("vehicle", "id-bulk", "alice")
        assert "shadow" in st["tags"] and st["labelled_at"]
        assert st["label_version"] == int(before[s][0]["label_version"] or 0) + 1
    got = store.get_dataset(ds).select(sel[:2]).values("tags")
    assert all(labeling.TO_LABEL not in t for t in got)  # decided: no longer waiting in the queue
    # the log: one bulk entry (listed by decisions()), one entry per written sample
    head = labeling.decisions(ds, limit=5)[0]
    assert head.kind == "bulk" and head.id == r.id and head.after["identity"] == "id-bulk"
    items = {d.sample_id: d for d in labeling.decisions(ds, limit=100, items=True) if d.kind == "bulk_item"}
    assert sorted(items) == sorted(r.changed)
    for s, d in items.items():
        assert d.before == before[s][0] and d.after == _state(ds, s)
    # later: bob changes one of them, and the same tab labels another sample on the Annotate page
    labeling.decide(ds, "bob-tab", sel[3], "bob", identity="id-bob")
    labeling.decide(ds, "map", later[0], "alice", label="other")
    d = labeling.undo(ds, "map", "alice", kinds=("bulk",))  # the Map page's "Undo last bulk action"
    assert d.kind == "bulk" and d.not_restored == [sel[3]]
    for s in r.changed:
        if s == sel[3]:
            continue
        st, tok = labeling.sample_state(ds, s)
        assert tok == before[s][1], s  # every label field and condition tag as before
        assert st["label_version"] == int(before[s][0]["label_version"] or 0) + 2  # versions only grow
        assert sorted(store.get_dataset(ds).select([s]).first().tags) == sorted(tags_before[s])
    assert _state(ds, sel[3])["identity"] == "id-bob" and _state(ds, sel[5])["label"] == "animal"
    assert _state(ds, later[0])["label"] == "other"  # the later label decision is not touched
    assert labeling.undo(ds, "map", kinds=("bulk",)) is None  # one step, done once
    undo_entry = labeling.decisions(ds, limit=5)[0]
    assert undo_entry.kind == "undo"
    assert store.db()[labeling.DECISIONS].find_one({"_id": undo_entry.id})["not_restored"] == [sel[3]]
    assert labeling.undo(ds, "map").sample_id == later[0]  # plain undo: the label decision next
    # condition tags alone verify nothing; applying them again changes nothing and logs nothing
    t = labeling.bulk_decide(ds, "map", later, "alice", tags_add=["night"])
    assert t.changed == later and all(_state(ds, s)["labelled_by"] is None for s in later)
    again = labeling.bulk_decide(ds, "map", later, "alice", tags_add=["night"])
    assert again.id is None and again.unchanged == later and not again.changed
    assert labeling.undo(ds, "map", kinds=("bulk",)).id == t.id
    assert all("night" not in _state(ds, s)["tags"] for s in later)


def test_tracklet_strip_and_path(ds):
    from core.services import labeling
    from core.data import store

    view = store.get_dataset(ds)
    sid, tracklet, first, last = view.values(["id", "tracklet", "frame_first", "frame_last"])
    i = max(range(len(sid)), key=lambda j: last[j] - first[j])
    strip = labeling.tracklet_strip(ds, sid[i], n=5)
    assert 3 <= len(strip) <= 5
    frames = [f for f, _ in strip]
    assert frames == sorted(frames) and first[i] <= frames[0] and frames[-1] <= last[i]
    img = strip[0][1]
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    path = labeling.tracklet_path(ds, tracklet[i])
    assert len(path) >= 2 and [p[0] for p in path] == sorted(p[0] for p in path)
    # the box is drawn around the person: pixels changed only on the crop's box outline
    from core.data import media

    vp = view.values("video_path")[i]
    by_frame = {p[0] for p in path}
    fn, img = next((f, im) for f, im in strip if f in by_frame)
    x, y, w, h = next(b for t_, f_, b in zip(tracklet, view.values("frame"), view.values("bbox"))
                      if t_ == tracklet[i] and f_ == fn)
    raw = media.read_frames(vp, [fn])[fn][:, :, ::-1]
    ys, xs = np.nonzero((img.astype(int) - raw).any(axis=2))
    assert len(xs) > 2 * (w + h)  # a whole outline
    assert abs(xs.min() - x) <= 3 and abs(xs.max() - (x + w)) <= 3
    assert abs(ys.min() - y) <= 3 and abs(ys.max() - (y + h)) <= 3
    # a re-ID crop (no tracklet / video) has no strip
    store.set_values(ds, "tracklet", {sid[0]: None})
    assert labeling.tracklet_strip(ds, sid[0]) == []


def test_query_cli_prints_the_batch(ds, capsys):
    import argparse

    from core.cli import labeling as cli_labeling

    p = argparse.ArgumentParser()
    cli_labeling.add_commands(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["query", "--dataset", ds, "--strategy", "margin", "--k", "7"])
    assert a.fn(a) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [ln for ln in out if ln.strip() and ln.strip()[0].isdigit()]
    assert len(rows) == 7 and rows[0].split()[0] == "1"
    assert "TUD-Campus" in rows[0] and ".jpg" in rows[0]
    a = p.parse_args(["query", "--dataset", "no_such_ds", "--k", "3"])
    assert a.fn(a) == 2
