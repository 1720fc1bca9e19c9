"""core.model.detect: detection files from PETS09 ground truth, ONNX detectors built here with known
raw outputs (one per layout) run by the real ONNX Runtime on a real PETS frame, and HOG on
real PETS frames."""
from __future__ import annotations

import math
import os

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.model import detect
from core.model.detect import DetectionError, HogDetector, OnnxDetector, find_detection_file, read_detections
from tests.conftest import need_shared

PETS = ("mot", "PETS09-S2L1")
S = 320  # model input; a 480x360 frame letterboxes to 320x240 (ratio 2/3), 40 px grey above and below
NAMES = "{0: 'person', 1: 'bicycle', 2: 'car'}"
ULTRA = {"names": NAMES, "author": "Ultralytics", "task": "detect", "imgsz": f"[{S}, {S}]"}
GRID = sum((S // s) ** 2 for s in (8, 16, 32))  # 2100 anchor points


def pets_gt(frames: int) -> dict[int, list[list[float]]]:
    """PETS09 GT boxes of the first ``frames`` frames, in the 480x360 video's pixels."""
    out: dict[int, list[list[float]]] = {}
    for line in (need_shared(*PETS, "gt", "gt.txt")).read_text().splitlines():
        p = line.split(",")
        if int(p[0]) <= frames and float(p[6]) != 0:
            out.setdefault(int(p[0]), []).append([float(v) * 0.625 for v in p[2:6]])
    return out


def pets_frames(n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(need_shared(*PETS, "PETS09-S2L1.mp4")))
    frames = [cap.read()[1] for _ in range(n)]
    cap.release()
    assert all(f is not None for f in frames)
    return frames


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    f = pets_frames(1)[0]
    assert f.shape == (360, 480, 3)
    return f


def iou(a, b) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def to_frame(x1, y1, x2, y2):
    """Model-space corners (letterbox of 480x360 into 320) -> frame (x, y, w, h)."""
    return (x1 * 1.5, (y1 - 40) * 1.5, (x2 - x1) * 1.5, (y2 - y1) * 1.5)


def make_model(path, raw: np.ndarray, meta: dict | None = None, size=S, dynamic=False) -> str:
    """An ONNX model whose output is ``raw`` (plus 0 x mean(images), so the input is used)."""
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                        ["batch", 3, "height", "width"] if dynamic else [1, 3, size, size])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(raw.shape))
    nodes = [
        helper.make_node("Constant", [], ["raw"], value=numpy_helper.from_array(raw.astype(np.float32))),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["raw", "nothing"], ["output0"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [inp], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta:
        helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


# Rows (cx, cy, w, h, person, bicycle, car) in model space, shared by the YOLOv8 tests.
V8_ROWS = {
    0: (120, 140, 40, 80, 0.90, 0, 0),     # the person: frame (150, 90, 60, 120)
    1: (122, 141, 40, 80, 0.80, 0, 0),     # its duplicate: NMS removes it
    2: (250, 200, 30, 60, 0.60, 0, 0),     # a second person
    3: (60, 100, 40, 40, 0.05, 0, 0.95),   # a car
    4: (200, 100, 30, 60, 0.10, 0, 0),     # a person under conf
    5: (80, 220, 30, 60, 0.50, 0, 0.70),   # best class car: not a person
    6: (310, 60, 40, 60, 0.70, 0, 0),      # a person over the frame's top/right edge: clipped
}
V8_EXPECT = [(to_frame(100, 100, 140, 180), 0.9), ((435.0, 0.0, 45.0, 75.0), 0.7),
             (to_frame(235, 170, 265, 230), 0.6)]


def v8_raw() -> np.ndarray:
    raw = np.zeros((GRID, 7), np.float32)
    for i, r in V8_ROWS.items():
        raw[i * 97 + 3] = r  # spread over the anchors
    return raw


def assert_dets(got, want, tol=1e-3):
    assert len(got) == len(want), got
    for (gb, gs), (wb, ws) in zip(got, want):
        assert np.allclose(gb, wb, atol=tol), (gb, wb)
        assert gs == pytest.approx(ws, abs=1e-5)


def test_yolov8_channels_first_auto_and_names(tmp_path, frame):
    path = make_model(tmp_path / "v8.onnx", v8_raw().T[None], ULTRA)
    det = OnnxDetector(path)
    assert (det.layout, det._transposed, det.size, det.person) == ("yolov8", False, (S, S), 0)
    assert_dets(det(frame), V8_EXPECT)
    # the class selected by name through the names metadata
    cars = OnnxDetector(path, person_class="car")
    assert [round(s, 2) for _, s in cars(frame)] == [0.95, 0.7]
    assert np.allclose(cars(frame)[0][0], to_frame(40, 80, 80, 120), atol=1e-3)
    with pytest.raises(DetectionError, match="no class 'dog'.*person, bicycle, car"):
        OnnxDetector(path, person_class="dog")
    # conf and iou are honoured: a higher conf keeps only the best; a loose iou keeps the duplicate
    assert len(OnnxDetector(path, conf=0.85)(frame)) == 1
    assert len(OnnxDetector(path, iou=0.99)(frame)) == 4


def test_yolov8_transposed(tmp_path, frame):
    raw = v8_raw()[None]  # [1, N, 4+C]
    det = OnnxDetector(make_model(tmp_path / "v8t.onnx", raw, ULTRA))
    assert (det.layout, det._transposed) == ("yolov8", True)
    assert_dets(det(frame), V8_EXPECT)
    # without metadata the shape [1, 2100, 7] reads as YOLOX: the layout can be forced
    bare = make_model(tmp_path / "v8t_bare.onnx", raw)
    assert OnnxDetector(bare).layout == "yolox"
    assert_dets(OnnxDetector(bare, layout="yolov8")(frame), V8_EXPECT)


def test_yolov5_objectness_times_class(tmp_path, frame):
    raw = np.zeros((3 * GRID, 8), np.float32)  # cx, cy, w, h, obj, person, bicycle, car
    raw[10] = (120, 140, 40, 80, 0.9, 0.8, 0, 0.1)   # 0.72
    raw[11] = (121, 140, 40, 80, 0.9, 0.7, 0, 0.1)   # duplicate
    raw[500] = (250, 200, 30, 60, 0.5, 0.4, 0, 0)    # 0.20: each part over conf, the product under
    raw[900] = (60, 100, 40, 40, 0.9, 0.1, 0, 0.9)   # car
    det = OnnxDetector(make_model(tmp_path / "v5.onnx", raw[None]))
    assert det.layout == "yolov5"
    assert_dets(det(frame), [(to_frame(100, 100, 140, 180), 0.72)])


def test_yolox_raw_grid_decode(tmp_path, frame):
    raw = np.zeros((GRID, 8), np.float32)
    # stride 16, cell (x=5, y=4): index 40*40 + 4*20 + 5; centre (120, 140), size 40x80
    cell = 40 * 40 + 4 * 20 + 5
    raw[cell] = (120 / 16 - 5, 140 / 16 - 4, math.log(40 / 16), math.log(80 / 16), 0.9, 0.9, 0, 0)
    raw[cell + 1] = (120 / 16 - 6, 140 / 16 - 4, math.log(40 / 16), math.log(80 / 16), 0.9, 0.8, 0, 0)  # same box
    # stride 8, cell (x=10, y=30): centre (84, 244), 16x32 -> partly below the picture, clipped
    c8 = 30 * 40 + 10
    raw[c8] = (0.5, 0.5, math.log(2), math.log(4), 0.8, 0.9, 0, 0)
    raw[7] = (3, 3, 1, 1, 0.9, 0.1, 0, 0.8)  # a car
    det = OnnxDetector(make_model(tmp_path / "yolox.onnx", raw[None]))
    assert det.layout == "yolox"
    # YOLOX: resized by 2/3 into the top-left corner, no centring pad
    want = [((150.0, 150.0, 60.0, 120.0), 0.81), ((114.0, 342.0, 24.0, 18.0), 0.72)]
    assert_dets(det(frame), want)


def test_e2e(tmp_path, frame):
    raw = np.zeros((300, 6), np.float32)
    raw[0] = (100, 100, 140, 180, 0.9, 0)
    raw[1] = (40, 80, 80, 120, 0.95, 2)    # a car
    raw[2] = (200, 100, 230, 160, 0.1, 0)  # under conf
    det = OnnxDetector(make_model(tmp_path / "e2e.onnx", raw[None], ULTRA))
    assert det.layout == "e2e"
    assert_dets(det(frame), [(to_frame(100, 100, 140, 180), 0.9)])


def test_preprocessing_letterbox_and_yolox(tmp_path, frame):
    v8 = OnnxDetector(make_model(tmp_path / "v8.onnx", v8_raw().T[None], ULTRA))
    x, left, top, sx, sy = v8._prepare(frame)
    assert x.shape == (1, 3, S, S) and x.dtype == np.float32 and (left, top) == (0, 40)
    assert sx == sy == pytest.approx(2 / 3)
    assert np.allclose(x[0, :, :40], 114 / 255) and np.allclose(x[0, :, 280:], 114 / 255)
    rgb = cv2.resize(frame, (320, 240))[:, :, ::-1].transpose(2, 0, 1) / 255.0
    assert np.allclose(x[0, :, 40:280], rgb, atol=1e-6)
    yx = OnnxDetector(make_model(tmp_path / "yolox.onnx", np.zeros((1, GRID, 8), np.float32)))
    x, left, top, _, _ = yx._prepare(frame)
    assert (left, top) == (0, 0) and np.allclose(x[0, :, 240:], 114)
    assert np.array_equal(x[0, :, :240], cv2.resize(frame, (320, 240)).transpose(2, 0, 1).astype(np.float32))


def test_input_size_from_metadata_when_dynamic(tmp_path, frame):
    meta = {**ULTRA, "imgsz": "[320, 320]"}
    det = OnnxDetector(make_model(tmp_path / "dyn.onnx", v8_raw().T[None], meta, dynamic=True), input_size=640)
    assert det.size == (S, S)
    assert_dets(det(frame), V8_EXPECT)


def test_ambiguous_and_bad_models(tmp_path, frame):
    # at 64x64 the grid has 84 points: [1, 84, 6] is YOLOX with one class or an e2e output
    amb = make_model(tmp_path / "amb.onnx", np.zeros((1, 84, 6), np.float32), size=64)
    with pytest.raises(DetectionError, match="e2e or yolox; pass layout="):
        OnnxDetector(amb)
    assert OnnxDetector(amb, layout="yolox").layout == "yolox"
    with pytest.raises(DetectionError, match="fits no supported layout.*YOLOv8"):
        OnnxDetector(make_model(tmp_path / "flat.onnx", np.zeros((1, 2100), np.float32)))
    with pytest.raises(DetectionError, match="does not fit layout 'yolox'"):
        OnnxDetector(make_model(tmp_path / "odd.onnx", np.zeros((1, 100, 8), np.float32)), layout="yolox")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00this is not a model" * 50)
    with pytest.raises(DetectionError, match="ONNX Runtime cannot load this model.*supported") as e:
        OnnxDetector(garbage)
    assert "Traceback" not in str(e.value)
    with pytest.raises(DetectionError, match="not an .onnx file"):
        OnnxDetector(tmp_path / "model.pt")
    link = tmp_path / "link.onnx"
    link.symlink_to(tmp_path / "amb.onnx")
    with pytest.raises(DetectionError, match="symlink"):
        OnnxDetector(link)
    with pytest.raises(DetectionError, match="no 'names' metadata"):
        OnnxDetector(make_model(tmp_path / "v5.onnx", np.zeros((1, 3 * GRID, 8), np.float32)), person_class="man")


# --------------------------------------------------------------------------- detection files

def test_mot_det_file_from_pets_gt(tmp_path):
    gt_path = need_shared(*PETS, "gt", "gt.txt")
    rows = [line.split(",") for line in gt_path.read_text().splitlines()]
    rows = [r for r in rows if int(r[0]) <= 50]
    det = tmp_path / "det.txt"
    det.write_text("".join(f"{r[0]},-1,{r[2]},{r[3]},{r[4]},{r[5]},0.9,-1,-1,-1\n" for r in rows))
    got = read_detections(det, scale=(0.625, 0.625))
    assert list(got) == sorted({int(r[0]) for r in rows})
    assert sum(len(v) for v in got.values()) == len(rows)
    first = [r for r in rows if r[0] == "1"]
    assert np.allclose([b for b, _ in got[1]], [[float(v) * 0.625 for v in r[2:6]] for r in first])
    assert {s for v in got.values() for _, s in v} == {0.9}
    # the same rows whitespace-separated, as some tools write them
    ws = tmp_path / "ws.txt"
    ws.write_text("".join(f"{r[0]} -1 {r[2]} {r[3]} {r[4]} {r[5]} 0.9\n" for r in rows))
    assert read_detections(ws) == read_detections(det)


def test_csv_with_header_and_labels(tmp_path):
    p = tmp_path / "clip.csv"
    p.write_text("\ufeffFrame, Left, Top, Width, Height, Confidence, Class\n"
                 "1, 10, 20, 30, 60, 0.8, person\n"
                 "1, 100, 20, 30, 30, 0.9, car\n"
                 "2, 11, 21, 30, 60, 0.7, 0\n"
                 "2, 50, 20, 30, 60, 0.7, 2\n"
                 "3, 12, 22, 30, 60, 0.6, PERSON\n")
    got = read_detections(p, scale=(2, 0.5))
    assert got == {1: [((20.0, 10.0, 60.0, 30.0), 0.8)], 2: [((22.0, 10.5, 60.0, 30.0), 0.7)],
                   3: [((24.0, 11.0, 60.0, 30.0), 0.6)]}
    q = tmp_path / "noscore.csv"
    q.write_text("frame,x,y,w,h\n4,1,2,3,4\n")
    assert read_detections(q) == {4: [((1.0, 2.0, 3.0, 4.0), 1.0)]}
    r = tmp_path / "nowidth.csv"
    r.write_text("frame,x,y,h,score\n1,1,2,3,0.5\n")
    with pytest.raises(DetectionError, match="no column for w"):
        read_detections(r)


def test_bad_rows_reported_and_skipped(tmp_path):
    p = tmp_path / "det.txt"
    p.write_bytes(b"1,-1,10,10,5,8,0.9\n"
                  b"x,-1,10,10,5,8,0.9\n"
                  b"2,-1,10,10,0,8,0.9\n"
                  b"\n"
                  b"0,-1,10,10,5,8,0.9\n"
                  b"3,-1,nan,10,5,8,0.9\n"
                  b"4,-1,1,2\n"
                  b"5,-1,1,2,3,4,\xff\xfe\n"
                  b"1.5,-1,1,2,3,4,0.5\n"
                  b"6,-1,1,2,3,4,0.5\n")
    seen = []
    got = read_detections(p, problem=lambda where, reason: seen.append((where, reason)))
    assert got == {1: [((10.0, 10.0, 5.0, 8.0), 0.9)], 6: [((1.0, 2.0, 3.0, 4.0), 0.5)]}
    assert [w for w, _ in seen] == [f"det.txt:{n}" for n in (2, 3, 5, 6, 7, 8, 9)]
    reasons = dict(seen)
    assert "width or height" in reasons["det.txt:3"] and "frame" in reasons["det.txt:5"]
    assert "not finite" in reasons["det.txt:6"] and "fields" in reasons["det.txt:7"]


def test_unusable_files_raise(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DetectionError, match="empty; expected MOTChallenge"):
        read_detections(empty)
    bad = tmp_path / "bad.txt"
    bad.write_text("1,-1,1,1,0,0,1\n2,-1,1,1,-3,4,1\n")
    with pytest.raises(DetectionError, match=r"no usable detection row \(2 bad of 2\)"):
        read_detections(bad)
    with pytest.raises(DetectionError, match="is not a regular file"):
        read_detections(tmp_path)
    with pytest.raises(DetectionError, match="does not exist"):
        read_detections(tmp_path / "missing.txt")
    link = tmp_path / "link.txt"
    link.symlink_to(bad)
    with pytest.raises(DetectionError, match="symlink"):
        read_detections(link)
    monkeypatch.setattr(detect, "MAX_DET_FILE_BYTES", 10)
    with pytest.raises(DetectionError, match="over the"):
        read_detections(bad)
    with pytest.raises(DetectionError, match="scale"):
        read_detections(bad, scale=(0, 1))


def test_find_detection_file(tmp_path):
    clip = tmp_path / "seq" / "cam1.mp4"
    (clip.parent / "det").mkdir(parents=True)
    clip.write_bytes(b"")
    real = tmp_path / "elsewhere.txt"
    real.write_text("1,-1,1,1,2,2,1\n")
    assert find_detection_file(clip) is None
    (clip.parent / "cam1.det.txt").symlink_to(real)  # a symlink is not followed
    assert find_detection_file(clip) is None
    (clip.parent / "det" / "det.txt").write_text("1,-1,1,1,2,2,1\n")
    assert find_detection_file(clip) == clip.parent / "det" / "det.txt"
    (clip.parent / "det" / "cam1.txt").write_text("1,-1,1,1,2,2,1\n")
    assert find_detection_file(clip) == clip.parent / "det" / "cam1.txt"
    (clip.parent / "cam1.csv").write_text("frame,x,y,w,h\n1,1,1,2,2\n")
    assert find_detection_file(clip) == clip.parent / "cam1.csv"
    os.unlink(clip.parent / "cam1.det.txt")
    (clip.parent / "cam1.det.txt").write_text("1,-1,1,1,2,2,1\n")
    assert find_detection_file(clip) == clip.parent / "cam1.det.txt"
    # a symlinked det/ folder is not followed either
    other = tmp_path / "seq2"
    other.mkdir()
    (other / "det").symlink_to(clip.parent / "det")
    assert find_detection_file(other / "cam1.mp4") is None


# --------------------------------------------------------------------------- HOG

def test_hog_upscaled_finds_pets_people():
    """Measured on frames 1-5: upscale 2 matches 12 of the 15 GT people at IoU >= 0.5 (every
    frame at least 2); upscale 1 matches none."""
    frames, gt = pets_frames(5), pets_gt(5)

    def matches(detector, thr):
        per_frame = []
        for i, f in enumerate(frames, 1):
            dets = detector(f)
            assert all(0 <= b[0] and b[0] + b[2] <= 480 + 1e-6 and b[1] + b[3] <= 360 + 1e-6 for b, _ in dets)
            per_frame.append(sum(any(iou(b, g) >= thr for b, _ in dets) for g in gt[i]))
        return per_frame

    up2 = matches(HogDetector(), 0.3)
    assert all(n >= 1 for n in up2), up2
    assert sum(matches(HogDetector(), 0.5)) >= 9
    assert sum(matches(HogDetector(upscale=1.0), 0.5)) < sum(matches(HogDetector(), 0.5))
