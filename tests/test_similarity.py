"""The persisted similarity index per model version (core.data.similarity, FiftyOne Brain on
LanceDB): the neighbours of brute force on real crops, an index that outlives its process, and
re-embedding that updates it instead of rebuilding it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.config import REPO
from core.data import similarity, store
from tests.conftest import ingest_campus62


@pytest.fixture
def crops(dsname, tmp_path):
    """Real campus62 crops (12 identities, two cameras), embedded with the packaged model."""
    from core.services.embedding import embed_dataset

    ingest_campus62(dsname, tmp_path / "c", slice(12))
    embed_dataset(dsname, version="base")
    return dsname


def _vectors(name: str) -> tuple[list[str], np.ndarray]:
    cols = store.embedded_columns(name, "base", [])
    X = cols["X"] / np.linalg.norm(cols["X"], axis=1, keepdims=True)
    return cols["id"], X


def _built(name: str) -> tuple[str, int]:
    """(when the brain run was made, how many vectors its table holds)."""
    ds = store.get_dataset(name)
    info = ds.get_brain_info(similarity.brain_key("base"))
    return str(info.timestamp), similarity.index(name, "base", build=False).total_index_size


def test_the_index_answers_the_brute_force_neighbours_on_real_crops(crops):
    ids, X = _vectors(crops)
    assert len(ids) > 100 and store.get_dataset(crops).list_brain_runs() == []  # built on first use
    for q in range(0, len(ids), len(ids) // 10):
        got, dists, vecs = similarity.nearest(crops, "base", X[q], 10)
        sims = X @ X[q]
        want = np.argsort(-sims, kind="stable")[:10]
        assert got == [ids[j] for j in want]
        assert np.allclose(dists, 1.0 - sims[want], atol=1e-5)
        assert np.allclose(vecs / np.linalg.norm(vecs, axis=1, keepdims=True), X[want], atol=1e-6)
    assert _built(crops)[1] == len(ids)


def test_more_like_this_survives_a_restart_without_rebuilding(crops):
    """A second process (the worker, the CLI, an app restart) reads the same index: same answer,
    same brain run, nothing recomputed."""
    from core.services.embedding import similar

    ids, _ = _vectors(crops)
    here = similar(crops, ids[3], k=8)
    before = _built(crops)
    code = ("import json, sys; from core.services.embedding import similar; "
            f"print(json.dumps(similar({crops!r}, {ids[3]!r}, k=8)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert [s for s, _ in there] == [s for s, _ in here] and ids[3] not in [s for s, _ in here]
    assert np.allclose([d for _, d in there], [d for _, d in here], atol=1e-6)
    assert _built(crops) == before


def test_reembedding_updates_the_index_in_place_and_deleting_the_dataset_drops_it(crops, tmp_path):
    from core.services.embedding import embed_dataset

    ids, X = _vectors(crops)
    similarity.nearest(crops, "base", X[0], 5)  # build it
    when, size = _built(crops)
    ingest_campus62(crops, tmp_path / "more", slice(12, 15))
    embed_dataset(crops, version="base")
    ids2, X2 = _vectors(crops)
    assert len(ids2) > len(ids)
    assert _built(crops) == (when, len(ids2))  # the same run, grown: not rebuilt
    new = [k for k, s in enumerate(ids2) if s not in set(ids)]
    got, dists, _ = similarity.nearest(crops, "base", X2[new[0]], 1)
    assert got == [ids2[new[0]]] and dists[0] < 1e-5
    tables = Path(similarity.uri())
    assert any(tables.glob(f"{similarity._table_name(crops, 'base')}*"))
    store.delete_dataset(crops)
    assert not any(tables.glob(f"{similarity._table_name(crops, 'base')}*"))


def test_a_build_killed_midway_is_built_again_and_never_appended_to(crops, monkeypatch):
    """A build that died after FiftyOne registered its run (a job killed while the vectors went
    in) leaves a run without results and a partial table: within the grace it reads as another
    process's build under way; after it, the next lookup builds a fresh table and answers as
    brute force does, with each vector once."""
    from fiftyone.brain.internal.core import lancedb as fo_lancedb

    ids, X = _vectors(crops)
    real_add = fo_lancedb.LanceDBSimilarityIndex.add_to_index

    def dies_midway(self, embeddings, sample_ids, **kw):
        real_add(self, embeddings[:50], sample_ids[:50], **kw)  # a part went in, then the process died
        raise RuntimeError("killed")

    monkeypatch.setattr(fo_lancedb.LanceDBSimilarityIndex, "add_to_index", dies_midway)
    with pytest.raises(RuntimeError, match="killed"):
        similarity.nearest(crops, "base", X[0], 5)
    monkeypatch.setattr(fo_lancedb.LanceDBSimilarityIndex, "add_to_index", real_add)
    assert store.get_dataset(crops).list_brain_runs(type="similarity") == [similarity.brain_key("base")]
    with pytest.raises(store.StoreError, match="being built by another process"):
        similarity.nearest(crops, "base", X[0], 5)
    monkeypatch.setattr(similarity, "BUILD_GRACE_S", 0)
    got, _, _ = similarity.nearest(crops, "base", X[7], 10)
    assert got == [ids[j] for j in np.argsort(-(X @ X[7]), kind="stable")[:10]]
    assert _built(crops)[1] == len(ids)


def test_identity_suggestions_from_the_index_are_the_brute_force_ones(crops, monkeypatch):
    """The nearest labelled crops from the index's 20 nearest (all crops carry an ingested
    identity: "trust") and, where those hold too few labelled ones (four operator labels:
    "verify"), from the labelled vectors: the same values and distances as a search over every
    labelled vector."""
    from core.services import labeling
    from core.services.labeling import suggestions

    ids, _ = _vectors(crops)
    similarity.index(crops, "base")
    monkeypatch.setattr(suggestions, "INDEX_CANDIDATES", 20)
    for sid in ids[::40]:
        labeling.decide(crops, "s", sid, "op", identity=f"op-{sid[-4:]}")
    real_index = suggestions.similarity.index
    for mode in ("trust", "verify"):
        for sid in ids[5::25]:
            x = suggestions._vector(crops, sid)
            got = suggestions.nearest_labelled(crops, sid, x, "identity", mode, 15)
            monkeypatch.setattr(suggestions.similarity, "index", lambda *a, **k: None)
            want = suggestions.nearest_labelled(crops, sid, x, "identity", mode, 15)
            monkeypatch.setattr(suggestions.similarity, "index", real_index)
            assert [v for v, _ in got] == [v for v, _ in want] and len(got) == min(15, len(want))
            assert np.allclose([d for _, d in got], [d for _, d in want], atol=1e-5)
            if mode == "verify":
                assert {v for v, _ in got} <= {f"op-{s[-4:]}" for s in ids[::40]}
