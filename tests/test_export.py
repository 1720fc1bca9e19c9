"""Export: FiftyOne round trip, class tree, COCO boxes, manifest, path safety, verified ONNX."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import need_shared, tamper_onnx

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reid_ds():
    """campus62 val crops (192 images; tags query/gallery/all; cameras 01/02) with labelling
    fields and condition tags on some query crops, and two fake embedding fields."""
    from core.data import store
    from core.services.ingest import ingest

    name = "export_reid"
    store.delete_dataset(name)
    ingest(need_shared("reid", "campus62", "val"), "reid", name)
    ds = store.get_dataset(name)
    q = ds.match_tags("query").sort_by("filepath")
    ids = q.values("id")
    rng = np.random.default_rng(0)
    when = datetime(2026, 5, 4, 12, 30, 0)
    store.set_values(name, "flagged", {i: k % 3 == 0 for k, i in enumerate(ids)})
    store.set_values(name, "flag_reason", {i: "kNN disagreement" for i in ids[::3]})
    store.set_values(name, "behaviour", {i: "loitering" for i in ids[1::4]})
    store.set_values(name, "labelled_by", {i: "ana" for i in ids[::2]})
    store.set_values(name, "labelled_at", {i: when for i in ids[::2]})
    store.set_values(name, "emb_v1", {i: rng.normal(size=8).astype(np.float32) for i in ids[:20]})
    store.set_values(name, "emb_v2", {i: rng.normal(size=8).astype(np.float32) for i in ids})
    ds.select(ids[:5]).tag_samples("night")
    ds.select(ids[3:7]).tag_samples("occluded")
    yield name
    store.delete_dataset(name)


def _tree_snapshot(root: Path) -> set[str]:
    """Every path under ``root`` but the database's own files (MongoDB writes them whenever any
    job or test touches the database, which says nothing about where an export wrote)."""
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] != "db"}


# --------------------------------------------------------------------------- dataset formats

def test_fiftyone_round_trip_keeps_labels_tags_flags(reid_ds):
    import fiftyone as fo

    from core.services import export
    from core.data import store
    from core.config import settings

    rep = export.export_dataset(reid_ds, "fiftyone", "rt/query", tags=["query"],
                                include_embeddings="v2")
    out = Path(rep["path"])
    assert out == (settings().exports_dir / "rt" / "query").resolve() and rep["count"] == 28
    assert rep["dropped_fields"] == ["emb_v1"]
    back = fo.Dataset.from_dir(str(out), dataset_type=fo.types.FiftyOneDataset,
                               name=reid_ds + "_back")
    try:
        src = store.get_dataset(reid_ds).match_tags("query")
        fields = ["identity", "label", "camera", "flagged", "flag_reason", "behaviour",
                  "labelled_by", "labelled_at"]
        a = {s.ingest_key: s for s in src}
        b = {s.ingest_key: s for s in back}
        assert set(a) == set(b) and len(b) == 28
        for key, s in a.items():
            t = b[key]
            for f in fields:
                assert s[f] == t[f], (key, f)
            assert sorted(s.tags) == sorted(t.tags)
            np.testing.assert_array_equal(s["emb_v2"], t["emb_v2"])
            assert t.filepath.startswith(str(out))  # media travelled with the export
            assert os.path.exists(t.filepath)
        assert "emb_v1" not in back.get_field_schema()
        assert back.count_sample_tags()["night"] == 5
        assert sum(back.values("flagged")) == sum(src.values("flagged")) == 10
    finally:
        back.delete()


def test_classification_tree_one_folder_per_identity(reid_ds):
    from core.services import export
    from core.data import store

    schema_before = set(store.get_dataset(reid_ds).get_field_schema())
    rep = export.export_dataset(reid_ds, "classification-tree", "tree", tags=["gallery"],
                                by="identity")
    out = Path(rep["path"])
    want = store.counts(reid_ds, "identity", store.filtered_view(reid_ds, tags=["gallery"]))
    got = {d.name: len(list(d.iterdir())) for d in out.iterdir() if d.is_dir()}
    assert got == want and sum(got.values()) == rep["count"] == 181
    assert set(store.get_dataset(reid_ds).get_field_schema()) == schema_before  # untouched


def test_manifest_csv_parquet_and_embeddings(reid_ds):
    import pandas as pd

    from core.services import export
    from core.data import store

    rep = export.export_dataset(reid_ds, "manifest", "man", tags=["query"],
                                include_embeddings="v1")
    out = Path(rep["path"])
    csv = pd.read_csv(out / "manifest.csv", dtype={"identity": str, "camera": str})
    pq = pd.read_parquet(out / "manifest.parquet")
    assert len(csv) == len(pq) == 28 and list(pq.columns) == list(export.MANIFEST_COLUMNS)
    assert pq["flagged"].sum() == 10 and (pq["labelled_by"] == "ana").sum() == 14
    assert csv["identity"].tolist() == pq["identity"].tolist()
    night = pq[pq["tags"].map(lambda t: "night" in list(t))]
    assert len(night) == 5 and all("night" in list(c) for c in night["condition_tags"])
    emb = np.load(out / "embeddings_v1.npy")
    ids = (out / "embeddings_v1.ids.txt").read_text().split()
    assert ids == pq["id"].tolist() and emb.shape == (28, 8)
    vecs = dict(zip(*store.get_dataset(reid_ds).select(ids).values(["id", "emb_v1"])))
    for i, sid in enumerate(ids):
        if vecs[sid] is None:
            assert np.isnan(emb[i]).all()
        else:
            np.testing.assert_allclose(emb[i], vecs[sid], rtol=0, atol=0)
    assert np.isfinite(emb).all(axis=1).sum() == 20


def test_coco_frames_reload_with_same_boxes(dsname):
    import fiftyone as fo

    from core.services import export
    from core.data import store
    from core.services.ingest import ingest

    ingest(need_shared("mot", "PETS09-S2L1"), "mot", dsname, every_n=50)
    rep = export.export_dataset(dsname, "coco", "coco", max_frames=5, frame_step=7)
    out = Path(rep["path"])
    assert rep["frames"] == 5 and rep["boxes"] > 5
    back = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset,
                               data_path=str(out / "data"), labels_path=str(out / "labels.json"),
                               name=dsname + "_coco")
    try:
        back.compute_metadata()
        gt = next(f for f, t in back.get_field_schema(embedded_doc_type=fo.Detections).items())
        video = store.get_videos(dsname).first()
        w, h = video.metadata.frame_width, video.metadata.frame_height
        assert len(back) == 5
        n_boxes = 0
        for s in back:
            fn = int(Path(s.filepath).stem.rsplit("_", 1)[1])
            assert (s.metadata.width, s.metadata.height) == (w, h)
            want = sorted([d.bounding_box[0] * w, d.bounding_box[1] * h, d.bounding_box[2] * w,
                           d.bounding_box[3] * h] for d in video.frames[fn]["detections"].detections)
            got = sorted([d.bounding_box[0] * w, d.bounding_box[1] * h, d.bounding_box[2] * w,
                          d.bounding_box[3] * h] for d in s[gt].detections)
            assert len(got) == len(want)
            np.testing.assert_allclose(got, want, atol=1.0)
            assert {d.label for d in s[gt].detections} == {"person"}
            n_boxes += len(got)
        assert n_boxes == rep["boxes"]
    finally:
        back.delete()


# --------------------------------------------------------------------------- path safety

def test_path_escapes_are_refused(reid_ds, tmp_path):
    from core.services import export

    root = export.export_root()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "inner").mkdir(exist_ok=True)
    (root / "link-in").symlink_to(root / "inner", target_is_directory=True)
    parent_before = _tree_snapshot(root.parent)
    tmp_x_before = os.path.lexists("/tmp/x")
    for bad in ["../x", "a/../../x", "/tmp/x", str(outside / "x"), "link-out", "link-out/x",
                "", "  ", ".", str(root)]:
        with pytest.raises(export.ExportError):
            export.safe_export_path(bad)
        if bad:  # an empty out_name means "generate one"
            with pytest.raises(export.ExportError):
                export.export_dataset(reid_ds, "manifest", bad, tags=["query"])
    assert list(outside.iterdir()) == []
    assert os.path.lexists("/tmp/x") == tmp_x_before
    assert _tree_snapshot(root.parent) == parent_before
    # inside stays allowed: nested names, absolute paths inside, symlinks that stay inside
    assert export.safe_export_path("a/b") == root / "a" / "b"
    assert export.safe_export_path(str(root / "c")) == root / "c"
    assert export.safe_export_path("link-in/y") == root / "inner" / "y"


def test_failed_export_leaves_nothing_and_existing_is_kept(reid_ds):
    from core.services import export

    root = export.export_root()
    before = _tree_snapshot(root)
    with pytest.raises(export.ExportError, match="classification tree by"):
        export.export_dataset(reid_ds, "classification-tree", "bad-by", by="camera")
    with pytest.raises(export.ExportError, match="no embeddings"):
        export.export_dataset(reid_ds, "fiftyone", "bad-emb", include_embeddings="nope")
    assert _tree_snapshot(root) == before  # no half folder, no staging left behind
    export.export_dataset(reid_ds, "manifest", "keep", tags=["query"])
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_dataset(reid_ds, "manifest", "keep", tags=["gallery"])
    rep = export.export_dataset(reid_ds, "manifest", "keep", tags=["gallery"], overwrite=True)
    assert rep["count"] == 181 and not [p for p in root.iterdir() if p.name.startswith(".")]


def test_cli_export_dataset_prints_where_it_wrote(reid_ds, capsys):
    import argparse

    from core.cli import export as cli_export
    from core.services import export

    p = argparse.ArgumentParser()
    cli_export.add_commands(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["export-dataset", "--dataset", reid_ds, "--format", "classification-tree",
                      "--tag", "query", "--out", "cli-tree"])
    assert a.fn(a) == 0
    out = capsys.readouterr().out
    assert "wrote 28 items" in out and str(export.safe_export_path("cli-tree")) in out
    a = p.parse_args(["export-dataset", "--dataset", reid_ds, "--out", "../escape"])
    assert a.fn(a) == 2 and "'..'" in capsys.readouterr().err


# --------------------------------------------------------------------------- model export

_ORT_CHILD = textwrap.dedent("""
    import json, sys
    import cv2, numpy as np, onnxruntime as ort
    model, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    h, w = json.loads(meta["input_size"])
    x = np.stack([cv2.resize(cv2.imread(p, cv2.IMREAD_COLOR), (w, h),
                             interpolation=cv2.INTER_LINEAR) for p in paths])
    emb = sess.run(None, {"image": x})[0]
    np.save(out, emb)
    assert "torch" not in sys.modules, "torch was imported"
    print(json.dumps({"meta": meta, "shape": list(emb.shape),
                      "torch": "torch" in sys.modules,
                      "input_shape": [str(d) for d in sess.get_inputs()[0].shape]}))
""")


def test_onnx_export_verified_with_metadata_and_int8(reid_ds, tmp_path):
    import onnx
    import torch

    from core.model import embed

    from core.services import export

    rep = export.export_model("base", "edge", dataset=reid_ds, int8=True)
    out = Path(rep["path"])
    assert rep["checker"] == "passed" and rep["max_abs_diff"] < 1e-4 and rep["verified_on"] == 16
    m = onnx.load(str(out / "model.onnx"))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    onnx.checker.check_model(m)
    meta = {p.key: p.value for p in m.metadata_props}
    for key in ("input_size", "channel_order", "mean", "std", "embedding_size",
                "brightness_invariant", "version", "training_round", "validation_metrics"):
        assert key in meta, key
    assert meta["channel_order"] == "BGR" and meta["version"] == "base"
    assert meta["embedding_size"] == "256" and meta["brightness_invariant"] == "false"
    assert export.read_metadata(out / "model.int8.onnx")["version"] == "base"

    # a fresh process that never imports torch runs the exported model on real crops
    paths = rep["verify_paths"][:8]
    res = subprocess.run([sys.executable, "-c", _ORT_CHILD, str(out / "model.onnx"),
                          str(tmp_path / "e.npy"), *paths], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    child = json.loads(res.stdout.strip().splitlines()[-1])
    assert child["torch"] is False and child["meta"]["embedding_size"] == "256"
    assert child["input_shape"][0] == "batch"  # dynamic batch
    model, cfg = embed.load_model("base")
    x = np.stack([embed.load_image(p, cfg.crop_size) for p in paths])
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    got = np.load(tmp_path / "e.npy")
    assert got.shape == ref.shape == (8, 256)
    assert np.abs(got - ref).max() < 1e-4

    fp32, int8 = rep["metrics"]["fp32"], rep["metrics"]["int8"]
    print(f"\nint8 vs fp32 on campus62 val ({rep['eval']['queries']} q / "
          f"{rep['eval']['gallery']} g): "
          f"fp32 rank-1 {fp32['rank1']:.3f} mAP {fp32['mAP']:.3f} {fp32['ms_per_image']:.1f} "
          f"ms/img {rep['size_mb']['fp32']} MB | int8 rank-1 {int8['rank1']:.3f} mAP "
          f"{int8['mAP']:.3f} {int8['ms_per_image']:.1f} ms/img {rep['size_mb']['int8']} MB | "
          f"int8 vs fp32 max abs diff {rep['int8_max_abs_diff']:.3f}, mean cosine "
          f"{rep['int8_mean_cosine']:.3f}")
    assert rep["eval"]["queries"] == 28 and rep["eval"]["gallery"] == 181
    assert fp32["n_queries"] == int8["n_queries"] == 28
    assert 0 < rep["int8_max_abs_diff"] < 0.5  # quantized, yet close
    card = (out / "MODEL_CARD.md").read_text()
    assert "rank-1" in card and "| int8 |" in card and "BGR" in card
    assert json.loads((out / "report.json").read_text())["max_abs_diff"] == rep["max_abs_diff"]


# --------------------------------------------------------------------------- page

def test_export_page_exports_a_tagged_view(reid_ds, worker):
    from streamlit.testing.v1 import AppTest

    from core.services import export
    from core.data import jobs

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.session_state["dataset"] = reid_ds
    at.run()
    at.switch_page("pages/export.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.radio(key="exp_scope").set_value("By tag")
    at.multiselect(key="exp_tags").set_value(["night"])
    at.selectbox(key="exp_fmt").set_value("classification-tree")
    at.text_input(key="exp_out").set_value("page-night")
    next(b for b in at.button if b.label == "Export dataset").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    job = jobs.list_jobs(reid_ds, kind="export_dataset", limit=1)[0]  # a background job
    assert job["args"]["tags"] == ["night"] and job["args"]["out_name"] == "page-night"
    assert jobs.wait(job["id"], timeout=240)["state"] == "completed", jobs.log_tail(job["id"])
    at.run()
    assert any("Wrote 5 items" in s.value for s in at.success), [s.value for s in at.success]
    out = export.safe_export_path("page-night")
    assert sum(1 for p in out.rglob("*.png")) == 5
    at.text_input(key="exp_out").set_value("../escape")
    next(b for b in at.button if b.label == "Export dataset").click()
    at.run()
    assert any("'..'" in e.value for e in at.error)


def test_version_record_from_registry_else_checkpoint(reid_ds):
    from core.model import embed
    from core.model import network
    from core.services import export, registry

    cfg = network.ModelConfig(emb_dim=32, brightness_invariant=True)
    model = network.build_model(cfg, pretrained=False)
    version = registry.new_version(reid_ds, "base", cfg.to_dict())
    embed.save_checkpoint(version, model, cfg, step=120, metrics={"rank1": 0.5})
    assert export._version_record(version, None) == (120, {"rank1": 0.5})  # checkpoint
    registry.finish(reid_ds, version, {"rank1": 0.75, "mAP": 0.6})
    rnd, metrics = export._version_record(version, reid_ds)  # the registry wins
    assert rnd == int(version.rsplit("r", 1)[1]) and metrics == {"rank1": 0.75, "mAP": 0.6}
    meta = export.model_metadata(version, cfg, rnd, metrics, 17)
    assert meta["brightness_invariant"] == "true" and meta["embedding_size"] == "32"
    assert json.loads(meta["validation_metrics"]) == metrics
    assert version in export.model_versions()


# --------------------------------------------------------------------------- hardening

def _campus_val_crops() -> list[str]:
    return sorted(str(p) for p in need_shared("reid", "campus62", "val", "all_imgs").rglob("*.png"))


def test_tampered_onnx_graph_fails_verification(data_root):
    """A round's model file (core.model.embed.onnx_path, what embedding jobs run) whose graph no longer
    matches its PyTorch model: verify_onnx raises with the figure and the tolerance."""
    from core.model import embed
    from core.model import network
    from core.services import export

    cfg = network.ModelConfig()
    embed.save_checkpoint("t-verify", network.build_model(cfg, pretrained=True), cfg, step=1)
    paths = _campus_val_crops()
    ok = export.verify_onnx("t-verify", paths)
    assert ok["verified_on"] == export.VERIFY_CROPS and ok["max_abs_diff"] < 1e-4, ok

    f = embed.onnx_path("t-verify")
    tamper_onnx(f)
    assert embed.onnx_path("t-verify") == f  # still considered fresh: only the check catches it
    with pytest.raises(export.ExportError, match=r"max abs difference .* above the tolerance 0\.0001") as e:
        export.verify_onnx("t-verify", paths)
    print(f"\ntampered graph (noise 2 % of its largest weight's spread): {e.value}")


def test_model_export_fails_above_the_tolerance_and_leaves_nothing(data_root):
    from core.services import export

    root = export.export_root()
    before = _tree_snapshot(root)
    paths = _campus_val_crops()[:8]
    # real fp32 differences are about 1e-6 (see export.ONNX_TOLERANCE): 1e-9 cannot be met
    with pytest.raises(export.ExportError, match=r"max abs difference [0-9.e-]+ on 8 real crops, "
                                                 r"above the tolerance 1e-09"):
        export.export_model("base", "too-strict", verify_on=paths, tolerance=1e-9)
    assert _tree_snapshot(root) == before and not export.safe_export_path("too-strict").exists()
    rep = export.export_model("base", "strict-ok", verify_on=paths)
    assert rep["max_abs_diff"] < rep["tolerance"] == export.ONNX_TOLERANCE


def test_eval_set_caps_spread_over_identities(reid_ds):
    """campus62 val: 28 queries and 181 gallery crops of 12 identities. A cut of the first crops
    by file path would keep 5 query identities and 3 gallery identities; drawn by identity, all
    12 stay on both sides, evenly."""
    from collections import Counter

    from core.services import export

    full = export.eval_set(reid_ds)
    assert len(full["q_paths"]) == 28 and len(full["g_paths"]) == 181
    everyone = set(full["q_ids"])
    assert len(everyone) == 12
    ev = export.eval_set(reid_ds, max_query=12, max_gallery=40)
    assert len(ev["q_paths"]) == 12 and len(ev["g_paths"]) == 40
    assert set(ev["q_ids"]) == everyone  # one query per identity
    per_id = Counter(ev["g_ids"])
    assert set(per_id) == everyone and max(per_id.values()) - min(per_id.values()) <= 1
    assert ev == export.eval_set(reid_ds, max_query=12, max_gallery=40)  # seeded
    other = export.eval_set(reid_ds, max_query=12, max_gallery=40, seed=1)
    assert set(other["q_ids"]) == everyone and other["g_keys"] != ev["g_keys"]
    # keys are the sample ids of the same rows
    assert len(set(ev["g_keys"])) == 40 and set(ev["g_keys"]) <= set(full["g_keys"])
    row = dict(zip(full["g_keys"], full["g_paths"]))
    assert all(row[k] == p for k, p in zip(ev["g_keys"], ev["g_paths"]))


def test_export_metrics_never_count_a_self_match(dsname):
    """A file in query/ and gallery/ is one sample with both tags. With cameras unknown, nothing
    but its key keeps it from being its own rank-1 match: an identity whose only gallery crop is
    its query's own file has nothing to find, so that query is skipped, never a hit."""
    from core.services import export
    from core.data import store
    from core.services.ingest import ingest

    ingest(need_shared("reid", "campus62", "val"), "reid", dsname)
    ds = store.get_dataset(dsname)
    ids, idents, tags = ds.values(["id", "identity", "tags"])
    store.set_values(dsname, "camera", {i: None for i in ids})
    both = [k for k, t in enumerate(tags) if {"query", "gallery"} <= set(t)]
    assert len(both) == 17  # campus62 val: 17 query files are also gallery files
    k0 = both[0]
    a = idents[k0]
    others = [ids[k] for k in range(len(ids)) if idents[k] == a and k != k0]
    ds.select(others).untag_samples(["query", "gallery"])
    store.set_values(dsname, "split", {i: None for i in others})
    n_queries = len(ds.match_tags("query"))

    rep = export.export_model("base", "self-match", dataset=dsname)
    m = rep["metrics"]["fp32"]
    assert m["n_skipped"] == 1 and m["n_queries"] == n_queries - 1, m
    assert rep["eval"]["cross_camera"] is False and rep["eval"]["in_both"] == 17
    print(f"\nself-match excluded: rank-1 {m['rank1']:.3f} mAP {m['mAP']:.3f} over {m['n_queries']} "
          f"queries (1 skipped: only itself in the gallery), cameras unknown")
