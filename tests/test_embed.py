"""Embedding engine on real campus62 crops: ONNX/PyTorch parity, exact reproducibility, bad
files, model versions on disk, rank-1 of the packaged weights, dataset-level embedding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.model import embed

from core.model import network

from core.services import embedding
from tests.conftest import need_shared


@pytest.fixture(scope="module")
def val() -> tuple[list[Path], list[Path]]:
    root = need_shared("reid", "campus62", "val")
    return sorted((root / "query").glob("*/*.png")), sorted((root / "gallery").glob("*/*.png"))


@pytest.fixture(scope="module")
def random_version() -> str:
    """A randomly initialised network saved as a model version (checkpoint -> ONNX)."""
    torch.manual_seed(1234)
    cfg = network.ModelConfig(seed=7)
    embed.save_checkpoint("random", network.build_model(cfg, pretrained=False), cfg)
    return "random"


def _rank1(q: np.ndarray, g: np.ndarray, qid: list[str], gid: list[str]) -> float:
    best = (q @ g.T).argmax(axis=1)
    return float(np.mean([qid[i] == gid[j] for i, j in enumerate(best)]))


def test_onnx_matches_pytorch_on_real_crops(val):
    paths = val[0][::4] + val[1][::60]  # 7 queries, 4 gallery crops of several people
    v_onnx, e1 = embed.embed_paths(paths, backend="onnx")
    v_torch, e2 = embed.embed_paths(paths, backend="torch")
    assert e1 == e2 == {}
    assert v_onnx.shape == (len(paths), 256) and v_onnx.dtype == np.float32
    assert np.abs(v_onnx - v_torch).max() <= 1e-4
    assert np.allclose(np.linalg.norm(v_onnx, axis=1), 1.0, atol=1e-5)


def test_brightness_invariant_input_is_in_the_exported_graph(val):
    cfg = network.ModelConfig(brightness_invariant=True)
    model = network.build_model(cfg)
    embed.save_checkpoint("bi", model, cfg)
    loaded, cfg2 = embed.load_model("bi")
    assert cfg2 == cfg
    paths = val[1][::40][:4]
    v_onnx, _ = embed.embed_paths(paths, version="bi")
    v_torch, _ = embed.embed_paths(paths, version="bi", backend="torch")
    assert np.abs(v_onnx - v_torch).max() <= 1e-4
    # a darkened copy embeds (almost) the same with the flag, clearly differently without it
    x = np.stack([embed.load_image(p, (128, 64)) for p in paths])
    dark = (x.astype(np.float32) * 0.35).round().astype(np.uint8)
    with torch.inference_mode():
        d_bi = 1 - (loaded(torch.from_numpy(x)) * loaded(torch.from_numpy(dark))).sum(1)
        plain = network.build_model()
        d_plain = 1 - (plain(torch.from_numpy(x)) * plain(torch.from_numpy(dark))).sum(1)
    assert d_bi.mean() < 0.5 * d_plain.mean(), (d_bi.mean(), d_plain.mean())


def test_reid_head_options_are_in_the_exported_graph(val):
    """Last stride 1, flip averaging and a batch-norm neck: ONNX matches PyTorch, a crop and its
    mirror embed identically, the final feature map is twice as fine."""
    cfg = network.ModelConfig(crop_size=(128, 64), last_stride=1, flip_average=True, neck=True)
    model = network.build_model(cfg)
    with torch.no_grad():  # trained neck statistics travel with the checkpoint
        model.neck.running_mean.uniform_(0.0, 0.5)
        model.neck.running_var.uniform_(0.5, 2.0)
    embed.save_checkpoint("reid-head", model, cfg)
    loaded, cfg2 = embed.load_model("reid-head")
    assert cfg2 == cfg and torch.equal(loaded.neck.running_var, model.neck.running_var)
    paths = val[1][::40][:4]
    v_onnx, _ = embed.embed_paths(paths, version="reid-head")
    v_torch, _ = embed.embed_paths(paths, version="reid-head", backend="torch")
    assert np.abs(v_onnx - v_torch).max() <= 1e-4
    x = np.stack([embed.load_image(p, (128, 64)) for p in paths])
    mirrored = np.ascontiguousarray(x[:, :, ::-1])
    plain = network.build_model(network.ModelConfig(crop_size=(128, 64)))
    with torch.inference_mode():
        assert torch.allclose(loaded(torch.from_numpy(x)), loaded(torch.from_numpy(mirrored)), atol=1e-5)
        assert not torch.allclose(plain(torch.from_numpy(x)), plain(torch.from_numpy(mirrored)), atol=1e-3)
        f = loaded.backbone(loaded.prepare(torch.from_numpy(x)))
        assert tuple(f.shape[2:]) == (8, 4)  # 128x64 / 16 instead of / 32
    with pytest.raises(ValueError, match="last_stride must be 1 or 2"):
        network.build_model(network.ModelConfig(last_stride=4), pretrained=False)


def test_normalize_luma_removes_gain_and_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 8, generator=g) * 0.5 + 0.25
    y = network.normalize_luma(x, eps=1e-5)
    assert y.shape == x.shape
    assert torch.allclose(network.normalize_luma(x * 0.6 + 0.05, eps=1e-5), y, atol=1e-3)
    # the default eps (noise floor for flat images) keeps it close
    assert torch.allclose(network.normalize_luma(x * 0.6 + 0.05), network.normalize_luma(x), atol=0.02)
    luma = (y * torch.tensor(network.LUMA).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(luma.mean(dim=(1, 2)), torch.tensor([0.45, 0.45]), atol=0.02)  # up to clipping


def test_rerunning_extraction_gives_identical_vectors(val):
    paths = val[1][:40]
    a, _ = embed.embed_paths(paths, batch_size=16)
    embed._SESSIONS.clear()  # a fresh onnxruntime session, as in another process
    b, _ = embed.embed_paths(paths, batch_size=16, threads=1)
    assert np.array_equal(a, b)
    c, _ = embed.embed_paths(paths, batch_size=16, ort_threads=1)
    assert np.array_equal(a, c)  # thread count does not change a bit (measured)
    d, _ = embed.embed_paths(paths, batch_size=7)
    assert np.abs(a - d).max() <= 1e-6  # nor batch composition (bit-equal here; CPU-dependent)


def test_base_head_is_reproducible_across_builds():
    a, b = network.build_model(), network.build_model()
    assert torch.equal(a.head.weight, b.head.weight)
    w = a.head.weight  # [256, 1280], orthonormal rows
    assert torch.allclose(w @ w.T, torch.eye(256), atol=1e-4)


def test_corrupt_and_missing_files_do_not_stop_a_run(val, tmp_path):
    good = val[1][:6]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:40])  # truncated PNG
    paths = [good[0], good[1], corrupt, good[2], tmp_path / "gone.png", *good[3:]]
    seen = []
    v, errors = embed.embed_paths(paths, batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert set(errors) == {2, 4}
    assert "decode" in errors[2] and "not found" in errors[4]
    assert np.isnan(v[[2, 4]]).all()
    ok = [i for i in range(len(paths)) if i not in errors]
    clean, _ = embed.embed_paths(good, batch_size=3)
    assert np.abs(v[ok] - clean).max() <= 1e-5
    assert seen[-1] == (len(paths), len(paths))


def test_packaged_weights_rank1_well_above_random_network(val, random_version):
    q, g = val
    assert len(q) + len(g) == 209
    qid, gid = [p.parent.name for p in q], [p.parent.name for p in g]
    v, _ = embed.embed_paths(q + g)
    r, _ = embed.embed_paths(q + g, version=random_version)
    base = _rank1(v[: len(q)], v[len(q):], qid, gid)
    rand = _rank1(r[: len(q)], r[len(q):], qid, gid)
    assert base >= 0.75, base  # measured 0.857 (24 of 28 queries)
    assert base >= rand + 0.4, (base, rand)


def test_checkpoint_roundtrip_and_stale_onnx(random_version):
    model, cfg = embed.load_model(random_version)
    ck = embed.load_checkpoint(random_version)
    assert set(ck) == {"model", "config", "optimizer", "step", "metrics"}
    assert isinstance(ck["config"], dict) and network.ModelConfig.from_dict(ck["config"]) == cfg
    p = embed.onnx_path(random_version)
    assert p.exists() and p.parent.name == random_version
    mtime = p.stat().st_mtime_ns
    assert embed.onnx_path(random_version).stat().st_mtime_ns == mtime  # cached, not re-exported
    # frozen blocks: the first blocks do not train
    frozen = network.build_model(network.ModelConfig(frozen_blocks=3), pretrained=False)
    blocks = list(frozen.backbone.children())
    assert not any(p.requires_grad for b in blocks[:3] for p in b.parameters())
    assert all(p.requires_grad for p in blocks[3].parameters())
    with pytest.raises(embed.EmbedError, match="no checkpoint"):
        embed.load_model("never-trained")


def test_embed_dataset_tracklets_and_similarity(val, dsname, tmp_path):
    from core.data import store
    import fiftyone as fo

    gallery = val[1]
    ids_by_person: dict[str, list[Path]] = {}
    for p in gallery:
        ids_by_person.setdefault(p.parent.name, []).append(p)
    people = sorted(ids_by_person)[:3]
    ds = store.get_dataset(dsname, create=True)
    samples = []
    for person in people:
        for j, p in enumerate(ids_by_person[person][:4]):
            samples.append(fo.Sample(filepath=str(p), kind="crop", identity=person,
                                     tracklet=f"{person}/{j // 2}"))
    missing = fo.Sample(filepath=str(tmp_path / "vanished.png"), kind="crop", identity="x")
    samples.append(missing)
    store.add_samples(ds, samples)
    assert store.active_model(dsname) is None

    seen = []
    report = embedding.embed_dataset(dsname, progress=lambda d, t: seen.append((d, t)))
    assert report["version"] == "base" and report["field"] == "emb_base"
    assert (report["embedded"], report["failed"], report["total"]) == (12, 1, 13)
    assert seen[-1] == (13, 13)
    assert store.active_model(dsname) == "base"
    ds = store.get_dataset(dsname)
    ids, vecs, errs = ds.values(["id", "emb_base", "embed_error"])
    by_id = dict(zip(ids, zip(vecs, errs)))
    assert by_id[missing.id][0] is None and "not found" in by_id[missing.id][1]
    good = [s for s in ids if s != missing.id]
    assert all(by_id[s][1] is None and len(by_id[s][0]) == 256 for s in good)

    # rerun after the file reappears: the error is cleared, the vectors are identical
    import shutil

    shutil.copy(gallery[-1], tmp_path / "vanished.png")  # a person not among the three
    again = embedding.embed_dataset(dsname)
    assert (again["embedded"], again["failed"]) == (13, 0)
    ids2, vecs2, errs2 = ds.values(["id", "emb_base", "embed_error"])
    assert all(e is None for e in errs2)
    for s, v in zip(ids2, vecs2):
        if s != missing.id:
            assert np.array_equal(np.asarray(v), np.asarray(by_id[s][0]))

    tr = embedding.tracklet_embeddings(dsname)
    assert len(tr) == 6
    t0 = f"{people[0]}/0"
    members = [np.asarray(v) for v, t in zip(*ds.values(["emb_base", "tracklet"])) if t == t0]
    m = np.mean(members, axis=0)
    assert np.allclose(tr[t0], m / np.linalg.norm(m), atol=1e-6)
    assert abs(np.linalg.norm(tr[t0]) - 1) < 1e-5

    query = ds.match({"identity": people[0]}).first().id
    nn = embedding.similar(dsname, query, k=5)
    assert len(nn) == 5 and query not in [s for s, _ in nn]
    dists = [d for _, d in nn]
    assert dists == sorted(dists) and 0 <= dists[0] < 1
    ident = dict(zip(*ds.values(["id", "identity"])))
    assert ident[nn[0][0]] == people[0]  # the nearest crop is the same person
    rr = embedding.similar(dsname, query, k=5, rerank=True)
    assert len(rr) == 5 and query not in [s for s, _ in rr]
    assert [d for _, d in rr] == sorted(d for _, d in rr) and all(0 <= d <= 1 for _, d in rr)
    assert ident[rr[0][0]] == people[0]
