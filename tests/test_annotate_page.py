"""Annotate page through streamlit.testing AppTest on real TUD-Campus crops, embedded with the
packaged model through ONNX Runtime (no synthetic vectors: "More like this" and the identity
suggestions are judged on real embeddings): one click writes the label to FiftyOne, undo removes
it, a conflicting write is shown and resolved, never dropped."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import need_shared

APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture(scope="module")
def page_dataset():
    from core.services import embedding
    from core.services import labeling
    from core.data import store
    from core.services.ingest import ingest

    name = "ann_" + uuid.uuid4().hex[:6]
    ingest(need_shared("mot", "TUD-Campus"), "mot", name, every_n=10)
    report = embedding.embed_dataset(name, version="base")  # the real chain: packaged model, ONNX Runtime
    assert report["embedded"] == len(store.get_dataset(name)) and not report["failed"], report
    assert store.active_model(name) == "base"
    yield name
    labeling.wait_for_refills()
    labeling.clear_queue(name)
    store.delete_dataset(name)


def _open(name: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["dataset"] = name
    at.session_state["ann_mode"] = "crops"  # the per-crop view (pairs come first with tracklets)
    at.run()
    at.switch_page("pages/annotate.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _sample(name: str, sid: str):
    from core.data import store

    return store.get_dataset(name).select([sid]).first()


def test_label_one_item_then_undo(page_dataset):
    name = page_dataset
    at = _open(name)
    sid = at.session_state["annotate_item"]
    before = _sample(name, sid)
    assert before.label == "person" and before.labelled_by is None
    at.button(key="cls_vehicle").click().run()
    assert not at.exception, [e.value for e in at.exception]
    s = _sample(name, sid)
    assert s.label == "vehicle" and s.labelled_by == "operator" and s.labelled_at
    assert at.session_state["annotate_item"] != sid  # the next item is served
    at.button(key="undo").click().run()
    assert not at.exception, [e.value for e in at.exception]
    s = _sample(name, sid)
    assert s.label == "person" and s.labelled_by is None and s.labelled_at is None
    assert at.session_state["annotate_item"] == sid  # the undone item comes back


def test_conflict_is_shown_not_dropped(page_dataset):
    from core.services import labeling

    name = page_dataset
    at = _open(name)
    sid = at.session_state["annotate_item"]
    # another operator labels the same sample behind this tab's back
    labeling.decide(name, "other-tab", sid, "bob", label="animal")
    at.button(key="cls_vehicle").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert _sample(name, sid).label == "animal"  # nothing overwritten
    warn = " ".join(w.value for w in at.warning)
    assert "Conflict" in warn and "animal" in warn and "vehicle" in warn
    at.button(key="conflict_mine").click().run()
    assert not at.exception, [e.value for e in at.exception]
    s = _sample(name, sid)
    assert s.label == "vehicle" and s.labelled_by == "operator"
    kinds = [d.kind for d in labeling.decisions(name, limit=10)]
    assert "conflict" in kinds


def test_without_embeddings_the_page_offers_to_embed(page_dataset):
    from core.data import store

    name = page_dataset
    store.set_active_model(name, None)
    try:
        at = _open(name)
        assert any("no embeddings yet" in i.value for i in at.info)
        assert at.button(key="embed_now")
    finally:
        store.set_active_model(name, "base")


def test_more_like_this_is_reranked_and_shown(page_dataset):
    from core.services import labeling
    from core.data import store

    name = page_dataset
    at = _open(name)
    sid = at.session_state["annotate_item"]
    at.toggle(key="ann_similar").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    hits = labeling.similar_crops(name, sid, 8)
    assert len(hits) == 8 and sid not in [h["id"] for h in hits]
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    me = store.get_dataset(name).select([sid]).first()
    assert hits[0]["identity"] == me.identity  # TUD-Campus: the same track, a few frames away
    captions = [img.caption for el in at.get("image") for img in el.proto.imgs]
    assert [f"{h['identity'] or '?'} · cam {h['camera'] or '?'} · {h['distance']:.2f}" for h in hits] \
        == captions[-8:]  # the page shows the same 8 crops, in order
