"""The Annotate page's pair view through streamlit.testing AppTest on real TUD-Campus tracklets
(MOT15 identities) with synthetic embeddings (identity centroid + noise: conftest's
tud_campus): a pair is shown, Same merges the two tracklets into one identity and
says which and how many crops it labelled, Undo splits them again, Different is never asked
again, a contradicting answer is shown with both sides, switching to the crop view gives the
pair back."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest


APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture
def ds(tud_clone):
    """A fresh clone per test: answers change the graph (deleted by ``dsname``)."""
    yield tud_clone
    from core.services.labeling import pairs

    pairs.clear_pairs(tud_clone)


def _open(name: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["dataset"] = name
    at.run()
    at.switch_page("pages/annotate.py").run()
    _ok(at)
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _tracklet_identities(name: str, node: str) -> set:
    from core.data import store

    ds = store.get_dataset(name)
    tracklets, idents = ds.values(["tracklet", "identity"])
    return {i for t, i in zip(tracklets, idents) if f"t:{t}" == node}


def test_same_merges_and_undo_splits(ds):
    from core.services.labeling import identity

    at = _open(ds)
    assert at.radio(key="ann_mode").value == "pairs"  # tracklets to compare: pairs first
    a, b = at.session_state["pair_nodes"]
    assert at.button(key="pair_same") and at.button(key="pair_different") and at.button(key="pair_unsure")
    assert any(m.value.startswith("**A: TUD-Campus:") for m in at.markdown)
    assert any(m.value.startswith("**B: TUD-Campus:") for m in at.markdown)
    assert any("Why this pair: P(same)" in c.value for c in at.caption)
    assert len([img for el in at.get("image") for img in el.proto.imgs]) >= 4  # crops and frame strips
    before = identity.load(ds)
    assert not before.graph.same(a, b)
    crops = before.crops(a) + before.crops(b)

    at.button(key="pair_same").click().run()
    _ok(at)
    after = identity.load(ds)
    assert after.graph.same(a, b)
    merged = after.names[a]
    # every crop of both tracklets now carries the merged identity; the page says which and how many
    assert _tracklet_identities(ds, a) == _tracklet_identities(ds, b) == {merged}
    moved = sum(before.crops(n) for n in (a, b) if before.names[n] != merged)  # the side renamed
    (msg,) = [s.value for s in at.success]
    assert msg.startswith(f"Same: merged into identity {merged} — ") and f"({crops} crops in" in msg
    assert f"— {moved} crop{'s' if moved != 1 else ''} labelled" in msg
    assert set(at.session_state["pair_nodes"]) != {a, b}  # the next pair is asked

    at.button(key="pair_undo").click().run()
    _ok(at)
    undone = identity.load(ds)
    assert not undone.graph.same(a, b)
    assert _tracklet_identities(ds, a) == {before.names[a]} and _tracklet_identities(ds, b) == {before.names[b]}
    assert set(at.session_state["pair_nodes"]) == {a, b}  # the undone pair is asked again
    assert any(s.value.startswith("Undid your 'same'") for s in at.success)


def test_different_is_not_asked_again(ds):
    from core.services.labeling import identity, pairs

    at = _open(ds)
    a, b = at.session_state["pair_nodes"]
    key = at.session_state["pair_item"]
    at.button(key="pair_different").click().run()
    _ok(at)
    assert identity.load(ds).graph.separated(a, b) is not None
    assert any(s.value.startswith("Different: ") and "kept apart" in s.value for s in at.success)
    seen = [at.session_state["pair_item"]]
    while seen[-1] is not None and len(seen) < 30:  # every next question, until nothing is left
        at.button(key="pair_unsure").click().run()
        _ok(at)
        seen.append(at.session_state["pair_item"])
    assert len(seen) >= 2 and seen[-1] is None and key not in seen
    assert any(s.value.startswith("Nothing left to ask") for s in at.success)
    assert at.button(key="pair_same").disabled and not at.button(key="pair_undo").disabled
    assert all(pairs.pair_key(c["a"], c["b"]) != key for c in pairs.compute_pairs(ds, k=100))


def test_a_contradicting_answer_is_shown_with_both_sides(ds):
    from core.services.labeling import identity

    at = _open(ds)
    a, b = at.session_state["pair_nodes"]
    identity.decide_pair(ds, "other-tab", a, b, "different", "bob")  # another operator, meanwhile
    at.button(key="pair_same").click().run()
    assert not at.exception, [e.value for e in at.exception]
    (warn,) = [w.value for w in at.warning]
    assert "Not applied" in warn and a in warn and b in warn and "contradicts" in warn
    assert not identity.load(ds).graph.same(a, b)  # nothing applied
    assert set(at.session_state["pair_nodes"]) != {a, b}  # and the next pair is asked


def test_switching_to_crops_gives_the_pair_back(ds):
    from core.data import store
    from core.services.labeling import LEASES

    at = _open(ds)
    key = at.session_state["pair_item"]
    held = {"_id": f"{ds}|pair:{key}", "session": at.session_state["annotate_session"]}
    assert store.db()[LEASES].count_documents(held) == 1
    at.radio(key="ann_mode").set_value("crops").run()
    _ok(at)
    assert store.db()[LEASES].count_documents(held) == 0
    assert at.session_state["annotate_item"] and at.button(key="cls_person")  # the crop view as before
