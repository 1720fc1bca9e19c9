"""The round's evaluation split (core.services.rounds): what a query may find, and empty splits refused
before any training. Real datasets in the test database; vectors written by hand where the
answer must be worked out exactly."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.services import registry, round_report, rounds
from core.data import store


def _records(tmp_path, rows):
    """Sample records for ``rows`` of (identity, tracklet, frame, tags), each with its own image."""
    out = []
    for k, (ident, tracklet, frame, tags) in enumerate(rows):
        p = tmp_path / f"{k:03d}.jpg"
        img = np.full((32, 16, 3), 20 + 7 * k % 230, np.uint8)
        cv2.imwrite(str(p), img)
        out.append({"filepath": str(p), "kind": "crop", "identity": ident, "tracklet": tracklet,
                    "frame": frame, "camera": None, "label": "person", "ingest_key": f"k{k}",
                    "tags": list(tags)})
    return out


def test_hold_out_leaves_the_query_tracklet_out_of_its_gallery(tmp_path, dsname):
    # six identities; p0..p2 have two tracklets each, p3..p5 one long tracklet each
    rows = []
    for i in range(6):
        for t in range(2 if i < 3 else 1):
            for f in range(0, 100, 10):
                rows.append((f"p{i}", f"seq/{i}{t}", f, ()))
    store.add_records(dsname, _records(tmp_path, rows))
    split = rounds.eval_split(rounds.round_columns(dsname))
    cols = store.view_columns(dsname, ["identity", "tracklet", "frame"])
    by_id = dict(zip(cols["id"], zip(cols["identity"], cols["tracklet"], cols["frame"])))
    assert split.problem is None and split.query
    assert split.q_keys == [by_id[q][1] for q in split.query]
    assert split.g_keys == [by_id[g][1] for g in split.gallery]
    for q in split.query:
        ident, tracklet, _ = by_id[q]
        # something to find outside its own tracklet, and its own tracklet is keyed out
        assert any(by_id[g][0] == ident and by_id[g][1] != tracklet for g in split.gallery)
    # identities seen in one tracklet only have nothing fair to find: no query of theirs
    single = {f"p{i}" for i in range(3, 6)}
    assert not {by_id[q][0] for q in split.query} & single


def test_round_refuses_a_split_with_nothing_to_find_before_training(tmp_path, dsname):
    from core.jobs import worker
    from core.model import train

    # lone tracklets of 3 crops: too short to find one half from the other
    rows = [(f"p{i}", f"seq/{i}", f, ()) for i in range(6) for f in range(0, 30, 10)]
    store.add_records(dsname, _records(tmp_path, rows))
    split = rounds.eval_split(rounds.round_columns(dsname))
    assert not split.query and "tracklet" in split.problem
    rep = worker.LocalReporter("test round")
    try:
        with pytest.raises(train.TrainingError, match="label the same person in another tracklet"):
            rounds.run_round(dsname, {"config": {"steps": 5}}, rep)
    finally:
        rep.close()
    failed = [v for v in registry.list_versions(dsname) if v["version"] != registry.BASE]
    assert failed and failed[-1]["status"] == "failed" and "evaluation split" in failed[-1]["error"]


def test_evaluate_cli_says_why_there_is_nothing_to_evaluate(tmp_path, dsname, capsys):
    from core.cli.main import main

    rows = [(f"p{i}", f"seq/{i}", f, ()) for i in range(6) for f in range(0, 30, 10)]
    store.add_records(dsname, _records(tmp_path, rows))
    assert main(["evaluate", "--dataset", dsname, "--version", "base"]) == 2
    assert "label the same person in another tracklet" in capsys.readouterr().err


def test_lone_tracklets_make_a_within_tracklet_split_and_train_as_themselves(tmp_path, dsname):
    """No identity spans two tracklets and nobody named the tracklets: each held-out tracklet's
    halves find each other, and the others train as one identity each."""
    rows = [(None, f"seq/{i}", f, ()) for i in range(8) for f in range(0, 60, 10)]
    rows += [(None, None, None, ())]  # a lone crop nobody named: neither query nor training
    store.add_records(dsname, _records(tmp_path, rows))
    rc = rounds.round_columns(dsname)
    split = rounds.eval_split(rc)
    assert split.problem is None and split.query and "within tracklet" in split.protocol
    cols = store.view_columns(dsname, ["tracklet", "frame"])
    frame = dict(zip(cols["id"], cols["frame"]))
    track = dict(zip(cols["id"], cols["tracklet"]))
    for q, qk in zip(split.query, split.q_keys):
        assert qk.startswith(track[q]) and qk[-2:] in ("#1", "#2")
        others = [g for g, gk in zip(split.gallery, split.g_keys) if track[g] == track[q] and gk != qk]
        assert others  # the other half is there to find
        half = sorted(frame[g] for g, gk in zip(split.gallery, split.g_keys) if gk == qk) + [frame[q]]
        assert max(half) < min(frame[g] for g in others) or min(half) > max(frame[g] for g in others)
    train = rounds.training_samples(rc, split.identities)
    assert {s[1] for s in train} == {f"~seq/{i}" for i in range(8)} - split.identities
    assert all(s[1] not in split.identities for s in train) and len(train) == 6 * (8 - len(split.identities))
    # the Train page's summary is the same split and training set
    plan = rounds.preview(dsname)
    assert (plan.identities, plan.crops, plan.lone, plan.held_out) == (
        8 - len(split.identities), len(train), 8 - len(split.identities), len(split.identities))
    assert plan.protocol == split.protocol and plan.problem is None


def test_too_few_identities_say_how_many_to_label(tmp_path, dsname):
    rows = [(f"p{i}", f"seq/{i}{t}", 0, ()) for i in range(3) for t in range(2)]
    store.add_records(dsname, _records(tmp_path, rows))
    split = rounds.eval_split(rounds.round_columns(dsname))
    assert not split.query and "label at least 6 people" in split.problem


def test_a_file_tagged_query_and_gallery_never_finds_itself(tmp_path, dsname):
    """One picture in query/ and gallery/ is one sample with both tags; cameras unknown, so only
    its key keeps it from matching itself at similarity 1."""
    rows = [("A", None, None, ("query", "gallery")), ("A", None, None, ("gallery",)),
            ("B", None, None, ("gallery",))]
    store.add_records(dsname, _records(tmp_path, rows))
    ids = store.view_columns(dsname, ["identity"])["id"]
    angle = {ids[0]: 0.0, ids[1]: 0.4, ids[2]: 0.2}  # the other A ranks behind B
    field = store.embedding_field("base")
    store.set_values(dsname, field, {i: [float(np.cos(a)), float(np.sin(a))] for i, a in angle.items()})
    rc = rounds.round_columns(dsname)
    split = rounds.eval_split(rc)
    assert split.query == [ids[0]] and ids[0] in split.gallery
    res = rounds.evaluate_version(dsname, "base", split, rc)
    assert res["all"]["n_queries"] == 1
    assert res["all"]["rank1"] == 0.0 and res["all"]["mAP"] == pytest.approx(0.5)
    assert res["reranked"]["rank1"] == 0.0


def test_merge_proposals_become_graph_nodes_and_the_summary_one_line(tmp_path, dsname):
    """A round's proposals name training identities ("~<tracklet>" or a name): the registry gets
    graph nodes, a named identity as its component's node with most crops; names the graph lacks,
    pairs it already joins and the malformed are left out; order (most confident first) kept."""
    from core.services.labeling import identity as graph_identity

    rows = [(None, f"seq/{i}", f, ()) for i in range(3) for f in range(0, 30, 10)]
    rows += [("ann", "seq/a1", f, ()) for f in range(0, 30, 10)] + [("ann", "seq/a2", 40, ())]
    store.add_records(dsname, _records(tmp_path, rows))
    state = graph_identity.load(dsname)
    assert state.graph.same("t:seq/a1", "t:seq/a2")
    props = [["~seq/0", "ann", 0.1], ["~seq/1", "~seq/2", 0.2], ["ann", "ann", 0.25], ["~seq/9", "~seq/0", 0.3],
             ["bob", "~seq/0", 0.4], ["~seq/2", "~seq/1", 0.5], ["~seq/0", "~seq/1", "far"], ["~seq/0"]]
    assert round_report.proposal_nodes(state, props) == [
        {"a": "t:seq/0", "b": "t:seq/a1", "distance": 0.1},  # seq/a1: 3 of ann's 4 crops
        {"a": "t:seq/1", "b": "t:seq/2", "distance": 0.2}]
    assert round_report.proposal_nodes(state, None) == []
    pseudo = {"reclusters": [{"step": 0, "nodes": 9, "clusters": 0, "merged_nodes": 0},
                             {"step": 200, "nodes": 9, "clusters": 2, "merged_nodes": 6}], "proposals": props}
    assert round_report.pseudo_summary(pseudo) == ("last re-clustering (step 200): 9 tracklets -> 5 pseudo-identities "
                                             "(6 tracklets joined into 2)")
    assert round_report.pseudo_summary(None) is None
