"""AppTest smoke tests: every page renders without an exception on a real dataset, embedded and
laid out for real, so the Map and Annotate pages get past "embed first"; the Map page's bulk
actions go through the decision log; failures say what failed (only an outage blames the
database); the Train page shows one Retrain button with its knobs under Advanced."""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.conftest import ingest_campus62, need_shared

APP = Path(__file__).resolve().parent.parent / "app.py"
PAGES = ["pages/data.py", "pages/map.py", "pages/annotate.py", "pages/train.py", "pages/export.py"]
OUTAGE_TEXT = "database is not reachable"


@pytest.fixture(scope="module")
def small_dataset():
    """TUD-Campus every 10th frame, embedded with the packaged model (ONNX Runtime), its map laid
    out and its samples scored: what the embed job leaves behind (core.jobs.tasks.embed_task)."""
    from core.services import analysis, labeling, projection
    from core.services import embedding
    from core.data import store
    from core.services.ingest import ingest

    name = "apptest"
    ingest(need_shared("mot", "TUD-Campus"), "mot", name, every_n=10)
    embedding.embed_dataset(name, version="base")
    projection.compute_layout(name, "base", n_epochs=60)
    analysis.compute_scores(name, "base")
    yield name
    labeling.wait_for_refills()
    labeling.clear_queue(name)
    store.delete_dataset(name)


def _open(name: str, page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["dataset"] = name
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(at: AppTest) -> str:
    return " ".join(str(e.value) for kind in ("error", "warning", "info", "success", "markdown", "caption")
                    for e in getattr(at, kind))


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(page, small_dataset):
    _open(small_dataset, page)


def test_data_page_shows_counts(small_dataset):
    at = _open(small_dataset)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Identities"] == "8"


def test_map_page_draws_the_embedded_map(small_dataset):
    from core.data import store

    at = _open(small_dataset, "pages/map.py")
    n = len(store.get_dataset(small_dataset))
    assert not any("no embeddings yet" in i.value or "No map for" in i.value for i in at.info)
    charts = at.get("plotly_chart")
    assert charts, "the map chart is not drawn"
    assert any(f"{n} samples · box or lasso to select" in c.value for c in at.caption)
    assert "misclustered" in " ".join(s.value for s in at.subheader).lower()


def test_annotate_page_serves_an_embedded_item(small_dataset):
    from core.data import store

    at = _open(small_dataset, "pages/annotate.py", ann_mode="crops")
    assert not any("no embeddings yet" in i.value for i in at.info)
    sid = at.session_state["annotate_item"]
    assert sid in store.get_dataset(small_dataset).values("id")
    assert at.button(key="cls_person") and at.button(key="skip")
    shown = [img.url for el in at.get("image") for img in el.proto.imgs]
    assert shown, "the item's crop is not shown"


def test_map_bulk_action_is_logged_and_undone(small_dataset):
    """Set identity on a selection: compare-and-set writes, one "bulk" log entry, and the Map
    page's Undo last bulk action restores the samples."""
    from core.services import labeling
    from core.data import store

    name = small_dataset
    ds = store.get_dataset(name)
    ids, tracks = ds.values(["id", "tracklet"])
    sel = [i for i, t in zip(ids, tracks) if t == "TUD-Campus/4"][:5]  # one person's crops
    others = [i for i, t in zip(ids, tracks) if t == "TUD-Campus/4" and i not in sel]
    assert len(sel) == 5 and others
    before = {s: labeling.sample_state(name, s)[1] for s in sel + others}
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["dataset"] = name
    at.session_state[f"sel_{name}"] = sel
    at.run()
    at.switch_page("pages/map.py").run()
    assert any(s.value == "Selection: 5 samples" for s in at.subheader)
    next(t for t in at.text_input if t.label == "Set identity").input("id-from-map")
    next(b for b in at.form_submit_button if b.label == "Apply to selection").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Updated 5 samples with identity id-from-map" in s.value for s in at.success)
    ds.reload()
    got = dict(zip(*ds.select(sel).values(["id", "identity"])))
    assert set(got.values()) == {"id-from-map"}
    assert set(ds.select(sel).values("labelled_by")) == {"operator"}
    assert set(ds.select(others).values("identity")) == {"id-from-map"}  # the tracklet is one person
    head = labeling.decisions(name, limit=1)[0]
    assert head.kind == "bulk" and head.session_id == at.session_state["annotate_session"]
    at.button(key="bulk_undo").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Undid the bulk action" in s.value for s in at.success)
    assert {s: labeling.sample_state(name, s)[1] for s in sel + others} == before


# ---------------------------------------------------------------- failures say what failed
@pytest.mark.parametrize("page,target,doing", [
    (None, "core.services.datasets.summary", "Reading dataset 'apptest'"),  # the sidebar, on every page
    ("pages/map.py", "core.services.registry.list_versions", "Reading the dataset's models"),
    ("pages/annotate.py", "core.services.labeling.embedding_status", "Reading the dataset's embeddings"),
    ("pages/annotate.py", "core.services.labeling.next_item", "Getting the next item to label"),
    ("pages/annotate.py", "core.services.labeling.pairs.next_pair", "Getting the next pair"),
    ("pages/train.py", "core.services.registry.list_versions", "Reading the model versions"),
])
def test_a_bug_is_not_reported_as_a_database_outage(page, target, doing, small_dataset, monkeypatch):
    def broken(*a, **k):
        raise ValueError("field 'camera' holds a list where a string belongs")

    broken.__name__ = target.rsplit(".", 1)[1]
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["dataset"] = small_dataset
    if target == "core.services.labeling.next_item":  # the crop view's queue (TUD-Campus opens on pairs)
        at.session_state["ann_mode"] = "crops"
    at.run()
    monkeypatch.setattr(target, broken)
    st.cache_data.clear()  # the summary is cached until the dataset changes: read it again, as after a change
    (at.switch_page(page) if page else at).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = " ".join(e.value for e in at.error)
    assert doing in errors and "failed: field 'camera' holds a list where a string belongs" in errors, errors
    assert OUTAGE_TEXT not in errors and "Nothing you saved is lost" not in errors


def test_an_outage_is_still_reported_as_one(small_dataset, monkeypatch):
    import pymongo.errors

    def down(*a, **k):
        raise pymongo.errors.ServerSelectionTimeoutError("localhost:27017: connection refused")

    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["dataset"] = small_dataset
    at.run()
    monkeypatch.setattr("core.services.registry.list_versions", down)
    at.switch_page("pages/train.py").run()
    assert OUTAGE_TEXT in " ".join(e.value for e in at.error)


# ---------------------------------------------------------------- the Train page
def test_train_page_refuses_a_round_nothing_could_judge(small_dataset):
    """TUD-Campus alone: every identity is one tracklet, so the held-out tracklets' halves judge
    the round (within tracklet), but only 4 tracklets are left to train on; the page says both and
    Retrain is off."""
    at = _open(small_dataset, "pages/train.py")
    says = " ".join(m.value for m in at.markdown)
    assert "within tracklet" in says and "trains on **4 identities**" in says, says
    assert "needs at least 5 identities to train on" in _texts(at)
    assert at.form_submit_button[0].label == "Retrain" and at.form_submit_button[0].disabled


def test_train_page_one_retrain_button_knobs_under_advanced(dsname, tmp_path):
    from core.data import jobs
    from core.services import rounds
    from core.model.train import TrainConfig


    from core.services import embedding

    name = ingest_campus62(dsname, tmp_path / "c", slice(7), val=True)
    embedding.embed_dataset(name, version="base")  # a round starts from the active model
    at = _open(name, "pages/train.py")
    assert [b.label for b in at.form_submit_button] == ["Retrain"]
    # one sentence says what Retrain does
    cols = rounds.round_columns(name)
    split = rounds.eval_split(cols)
    n_train = len({s[1] for s in rounds.training_samples(cols, split.identities)})
    assert 2 <= n_train < 8 and len(split.identities) >= 3
    says = " ".join(m.value for m in at.markdown)
    assert re.search(rf"starts from model \*\*base\*\*, trains on \*\*{n_train} identities\*\*", says), says
    assert f"holds out **{len(split.identities)} other identities**" in says and "in the background" in says
    # every knob is under Advanced, none in the operator's way
    adv = next(e for e in at.expander if e.label.startswith("Advanced"))
    knobs = [w.label for kind in ("number_input", "toggle", "selectbox") for w in getattr(adv, kind)]
    assert {"Steps", "Learning rate", "Frozen early blocks (of 19)", "Identities per batch (P)",
            "Crops per identity (K)", "Last stride"} <= set(knobs)
    outside = [w.label for kind in ("number_input", "toggle") for w in getattr(at.main, kind)]
    assert sorted(outside) == sorted([UNSUPERVISED, *(w.label for kind in ("number_input", "toggle")
                                                      for w in getattr(adv, kind))])
    # Retrain queues a round whose config holds TrainConfig fields: the changed one, defaults elsewhere
    adv.number_input(key="train_steps").set_value(40)
    at.form_submit_button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = jobs.get(at.session_state["train_job"])
    try:
        cfg = job["args"]["config"]
        d = TrainConfig()
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        assert set(cfg) <= fields and cfg["steps"] == 40
        assert {k: v for k, v in cfg.items() if k != "steps"} == {k: getattr(d, k) for k in cfg if k != "steps"}
        assert TrainConfig.from_dict(cfg).steps == 40
    finally:
        jobs.cancel(job["id"])


UNSUPERVISED = "Learn from unlabelled footage (pseudo-identities)"


def _queued_config(at: AppTest) -> dict:
    """Click Retrain; the queued train job's config (the job cancelled at once)."""
    from core.data import jobs

    at.form_submit_button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = jobs.get(at.session_state["train_job"])
    jobs.cancel(job["id"])
    return job["args"]["config"]


def test_train_page_pseudo_identity_switch_goes_into_the_job(dsname, tmp_path):
    """campus62 has verified identities: the switch starts off (auto); turned on, the round's
    config says unsupervised True. The preset box offers what this machine's device fits, and
    the page says where rounds run."""
    from core.model import device, train
    from core.data import store

    name = ingest_campus62(dsname, tmp_path / "c", slice(7), val=True)
    store.set_active_model(name, "base")  # a round starts from the active model (nothing embeds here)
    at = _open(name, "pages/train.py")
    (switch,) = [t for t in at.toggle if t.label == UNSUPERVISED]
    assert switch.value is False and "Off by default here" in switch.help
    assert "nearest match in another camera" in switch.help and "override" in switch.help
    where = device.select()
    assert at.selectbox(key="train_preset").options == train.presets_for(where)
    assert f"Rounds on this machine train on **{device.describe(where)}**" in _texts(at)
    assert "unsupervised" not in _queued_config(at)  # untouched: auto, the round resolves it
    [t for t in at.toggle if t.label == UNSUPERVISED][0].set_value(True)  # sent with the Retrain click
    cfg = _queued_config(at)
    assert cfg["unsupervised"] is True and train.TrainConfig.from_dict(cfg).unsupervised is True


def test_train_page_pseudo_identities_on_by_default_for_lone_tracklets(dsname, tmp_path):
    """Tracklets nobody has named or joined (every training identity lone): the switch starts on
    and Retrain is enabled (lone tracklets are training identities); turned off, the round's
    config says unsupervised False."""
    from core.data import store
    from tests.test_rounds import _records

    rows = [(None, f"seq/{i}", f, ()) for i in range(10) for f in range(0, 60, 10)]
    store.add_records(dsname, _records(tmp_path, rows))
    store.set_active_model(dsname, "base")
    at = _open(dsname, "pages/train.py")
    (switch,) = [t for t in at.toggle if t.label == UNSUPERVISED]
    assert switch.value is True and "On by default here" in switch.help
    assert not at.form_submit_button[0].disabled, _texts(at)
    switch.set_value(False)  # in the form: sent with the Retrain click
    assert _queued_config(at)["unsupervised"] is False


def test_train_page_versions_table_is_readable(small_dataset):
    at = _open(small_dataset, "pages/train.py")
    table = at.dataframe[0].value
    assert not table.isna().any().any(), table
    assert not table.isin(["None", "nan", "NaN"]).any().any(), table
    base = table[table["version"] == "base"].iloc[0]
    assert base["active"] == "● active" and base["mAP"] == "–" and base["from"] == "–"


def test_train_page_resumes_a_cancelled_round(worker, dsname, tmp_path):
    """A round cancelled after its first evaluation offers 'Resume round V' on the Train page;
    the click queues a train job that continues V (no new version)."""
    from core.data import jobs
    from core.services import registry

    ingest_campus62(dsname, tmp_path / "c", slice(8), val=True)
    cfg = {"steps": 400, "eval_every": 5, "ids_per_batch": 4, "samples_per_id": 4, "min_val_ids": 3,
           "crop_size": [64, 32], "frozen_blocks": 16}  # small and quick: it is cancelled at step 7
    job = jobs.submit(dsname, "train", {"config": cfg})
    end = time.time() + 300
    while not any(h.get("step", 0) >= 7 for h in jobs.get(job)["history"]):  # past its first evaluation
        assert time.time() < end and jobs.get(job)["state"] in ("queued", "running"), jobs.get(job)
        time.sleep(0.5)
    jobs.cancel(job)
    assert jobs.wait(job, timeout=120)["state"] == "cancelled"
    (rec,) = [v for v in registry.list_versions(dsname) if v["version"] != registry.BASE]
    assert rec["status"] == "cancelled"

    at = _open(dsname, "pages/train.py")
    (button,) = [b for b in at.button if b.label.startswith("Resume round")]
    assert button.label == f"Resume round {rec['version']}"
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    resumed = jobs.get(at.session_state["train_job"])
    try:
        assert resumed["args"] == {"resume_version": rec["version"]} and resumed["id"] != job
    finally:
        jobs.cancel(resumed["id"])
        jobs.wait(resumed["id"], timeout=120)
    assert [v["version"] for v in registry.list_versions(dsname) if v["version"] != registry.BASE] == [rec["version"]]
