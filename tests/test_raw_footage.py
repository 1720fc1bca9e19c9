"""Raw footage end to end through the ingest: each detection source (the site's file beside a clip,
its ONNX detector, a MOT folder's det/det.txt, HOG as the last resort) on real TUD-Campus frames,
tracked by ByteTrack into tracklets in the database."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.data import store
from core.services.ingest import HOG_WARNING, Detection, IngestError, ingest
from tests.conftest import need_shared
from tests.test_detect import make_model

TUD = ("mot", "TUD-Campus")


def _gt_rows() -> list[list[float]]:
    """TUD-Campus ground truth rows ``frame, id, x, y, w, h`` (video pixels)."""
    rows = []
    for ln in need_shared(*TUD, "gt", "gt.txt").read_text().splitlines():
        p = ln.split(",")
        rows.append([int(p[0]), int(p[1]), *(float(v) for v in p[2:6])])
    return rows


def _iou(a, b) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def _clip(tmp_path: Path) -> Path:
    d = tmp_path / "clips"
    d.mkdir()
    shutil.copy(need_shared(*TUD, "TUD-Campus.mp4"), d / "gate.mp4")
    return d


def test_site_detection_file_beside_a_clip_gives_tracklets_of_one_person_each(dsname, tmp_path):
    clips = _clip(tmp_path)
    gt = _gt_rows()
    (clips / "gate.det.txt").write_text("".join(f"{f},-1,{x},{y},{w},{h},0.9\n" for f, _i, x, y, w, h in gt)
                                        + "7,-1,oops,1,2,3,0.5\n")
    report = ingest(clips, "videos", dsname, every_n=2)
    assert report.videos == 1 and report.added > 0 and not report.notes  # no HOG: no warning
    assert [p for p in report.problems if "gate.det.txt:" in p[0]]  # the bad row, with its line
    cols = store.view_columns(dsname, ["tracklet", "bbox", "frame", "detector", "det_score", "identity", "label"])
    assert set(cols["detector"]) == {"gate.det.txt"} and set(cols["det_score"]) == {0.9}
    assert set(cols["identity"]) == {None} and set(cols["label"]) == {None}  # nobody has said who or what
    by_frame: dict[int, list] = {}
    for f, i, x, y, w, h in gt:  # clipped to the 640x480 frame, as the crops are
        x0, y0, x1, y1 = max(0, x), max(0, y), min(640, x + w), min(480, y + h)
        by_frame.setdefault(f, []).append((i, (x0, y0, x1 - x0, y1 - y0)))
    owner: dict[str, list[int]] = {}
    for tr, box, fr in zip(cols["tracklet"], cols["bbox"], cols["frame"]):
        best = max(by_frame.get(fr, []), key=lambda ib: _iou(box, ib[1]))
        assert _iou(box, best[1]) > 0.9  # the crop is the site's box
        owner.setdefault(tr, []).append(best[0])
    purity = [max(np.bincount(ids)) / len(ids) for ids in owner.values()]
    assert np.mean(purity) > 0.95, purity
    assert 8 <= len(owner) <= 14  # 8 people; a few fragments at occlusions, never one per crop


def test_site_onnx_detector_runs_on_every_nth_frame(dsname, tmp_path):
    """A built end-to-end graph that always finds one person at model-space (100, 100)-(140, 180):
    a 640x480 frame letterboxes to 320x240 with 40 px above, so the frame box is (200, 120, 80, 160)."""
    clips = _clip(tmp_path)
    raw = np.zeros((1, 100, 6), np.float32)  # K = 100 detections, most empty
    raw[0, 0] = (100, 100, 140, 180, 0.9, 0)  # person
    raw[0, 1] = (10, 10, 60, 60, 0.95, 2)  # a car: not kept
    model = make_model(tmp_path / "site-det.onnx", raw)
    report = ingest(clips, "videos", dsname, every_n=10, detection=Detection(model))
    assert report.added == 8 and not report.notes  # frames 1, 11, ..., 71: one tracklet
    cols = store.view_columns(dsname, ["tracklet", "bbox", "detector", "det_score"])
    assert set(cols["detector"]) == {"onnx:site-det.onnx"} and len(set(cols["tracklet"])) == 1
    for box in cols["bbox"]:
        assert np.allclose(box, (200, 120, 80, 160), atol=1)
    crop = cv2.imread(store.view_columns(dsname, ["filepath"])["filepath"][0])
    assert crop.shape[:2] == (160, 80)


def test_mot_folder_with_the_sites_detections_and_no_ground_truth(dsname, tmp_path):
    real = need_shared(*TUD)
    seq = tmp_path / "site" / "cam1"
    (seq / "det").mkdir(parents=True)
    shutil.copy(real / "TUD-Campus.mp4", seq / "cam1.mp4")
    (seq / "seqinfo.ini").write_text("[Sequence]\nname=cam1\nimDir=img1\nframeRate=25\nseqLength=71\n"
                                     "imWidth=640\nimHeight=480\nimExt=.jpg\n")
    (seq / "det" / "det.txt").write_text("".join(f"{f},-1,{x},{y},{w},{h},0.8\n" for f, _i, x, y, w, h in _gt_rows()))
    report = ingest(seq.parent, "mot", dsname, every_n=5)
    assert report.videos == 1 and report.added > 20, report.problems
    cols = store.view_columns(dsname, ["identity", "label", "tracklet", "det_score"])
    assert set(cols["identity"]) == {None} and set(cols["label"]) == {None}
    assert set(cols["det_score"]) == {0.8} and 8 <= len(set(cols["tracklet"])) <= 14


def test_hog_is_the_last_resort_and_says_so(dsname, tmp_path):
    clips = _clip(tmp_path)
    report = ingest(clips, "videos", dsname, every_n=10)
    assert report.notes == [HOG_WARNING] and "weak" in HOG_WARNING and "--detector" in HOG_WARNING
    if report.added:
        assert set(store.view_columns(dsname, ["detector"])["detector"]) == {"hog"}


def test_a_detector_that_cannot_be_used_is_refused_before_anything_is_queued(dsname, tmp_path):
    from core.data import jobs
    from core.jobs import tasks

    clips = _clip(tmp_path)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(IngestError, match="ONNX Runtime cannot load"):
        tasks.submit_ingest(clips, "videos", dsname, detector=str(bad))
    with pytest.raises(IngestError, match="not an .onnx file"):
        tasks.submit_ingest(clips, "videos", dsname, detector=str(tmp_path / "model.pt"))
    raw = np.zeros((1, 100, 6), np.float32)
    with pytest.raises(IngestError, match="pedestrian"):  # a model without class names: an index is needed
        tasks.submit_ingest(clips, "videos", dsname, detector=make_model(tmp_path / "d.onnx", raw),
                            person_class="pedestrian")
    with pytest.raises(IngestError, match="could be e2e or yolov8"):  # ambiguous: the layout must be named
        tasks.submit_ingest(clips, "videos", dsname, detector=make_model(tmp_path / "a.onnx", np.zeros((1, 5, 6))))
    assert not jobs.list_jobs(dsname)  # nothing queued
