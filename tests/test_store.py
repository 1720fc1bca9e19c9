"""The one door's fast reads against FiftyOne's own (TUD-Campus crops with vectors, in the test
database): plain columns and embedding vectors read with one projected find must give what
``values()`` gives, in the same order; the dataset stamp must move with every kind of write."""
from __future__ import annotations

import random

import numpy as np
import pytest


@pytest.fixture
def ds(tud_clone):
    return tud_clone


def test_plain_columns_are_what_fiftyone_reads(ds):
    from core.data import store

    d = store.get_dataset(ds)
    schema = d.get_field_schema()
    plain = [f for f in schema if f != "id" and (f == "tags" or store._plain(schema[f]))]
    assert {"identity", "tracklet", "frame", "bbox", "low_light", "brightness"} <= set(plain)
    got = store.view_columns(ds, plain)
    want = dict(zip(["id", *plain], d.values(["id", *plain])))
    assert got == want
    ids = random.Random(0).sample(want["id"], 25)
    some = store.view_columns(ds, ["identity", "frame"], ids + ["0" * 24])  # an id that is no sample
    assert some["id"] == ids
    assert some == dict(zip(["id", "identity", "frame"], d.select(ids, ordered=True).values(["id", "identity", "frame"])))
    mixed = store.view_columns(ds, ["identity", "created_at"])  # a date: FiftyOne reads it
    assert mixed["created_at"] == d.values("created_at")


@pytest.mark.parametrize("any_of", [None, ["labelled_by", "identity"], ["labelled_by"]])
def test_embedding_vectors_are_what_fiftyone_reads(ds, any_of):
    from fiftyone import ViewField as F

    from core.data import store

    d = store.get_dataset(ds)
    ef = store.embedding_field("base")
    got = store.embedded_columns(ds, "base", ["identity", "identity", "tags", "camera"], any_of=any_of)
    view = d.exists(ef)
    if any_of:
        expr = F(any_of[0]) != None  # noqa: E711
        for f in any_of[1:]:
            expr = expr | (F(f) != None)  # noqa: E711
        view = view.match(expr)
    ids, vecs, ident, tags, cam = view.values(["id", ef, "identity", "tags", "camera"])
    assert got["id"] == ids and got["identity"] == ident and got["tags"] == tags and got["camera"] == cam
    assert got["X"].dtype == np.float32 and np.array_equal(got["X"], np.stack(vecs).astype(np.float32)
                                                           if vecs else np.zeros((0, 1), np.float32))


def test_the_dataset_stamp_moves_with_every_write(ds):
    from core.data import store
    from core.services import labeling

    d = store.get_dataset(ds)
    ids = d.values("id")
    s0 = store.last_modified(ds)
    assert store.last_modified(ds) == s0  # reading changes nothing
    store.set_values(ds, "identity", {ids[0]: "x"})
    s1 = store.last_modified(ds)
    store.tag_samples(ds, [ids[1]], ["night"])
    s2 = store.last_modified(ds)
    labeling.decide(ds, "sess", ids[2], "op", label="person")  # Vigil's compare-and-set write
    s3 = store.last_modified(ds)
    d.delete_samples([ids[3]])
    s4 = store.last_modified(ds)
    assert len({s0, s1, s2, s3, s4}) == 5 and s4[1] == len(ids) - 1


def test_no_gc_pauses_the_collector_and_restores_what_was_there():
    import gc

    from core.data import store

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with store.no_gc():
            assert not gc.isenabled()
            with store.no_gc():  # nested: the outer one turns it back on, not the inner
                pass
            assert not gc.isenabled()
            raise RuntimeError("a failed read")
    assert gc.isenabled()
    gc.disable()
    try:
        with store.no_gc():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
