"""Where person boxes in raw footage come from, best first:

Size: the three box sources share one box contract and one trust boundary (file caps, no symlinks,
literal-only metadata); most of the file is the ONNX decoders of four YOLO output layouts.

1. **The site's detection files** (:func:`read_detections`, :func:`find_detection_file`):
   MOTChallenge ``det/det.txt`` rows or a CSV with a header, as a site's own detector wrote them.
2. **The site's own ONNX detector** (:class:`OnnxDetector`): the common YOLO exports
   (Ultralytics v8/v11, YOLOv5, Megvii YOLOX raw heads, end-to-end exports with NMS inside) run
   with ONNX Runtime on the CPU.
3. **OpenCV's HOG pedestrian detector** (:class:`HogDetector`), the last resort: weak boxes.

Every box is ``(x, y, w, h)`` in frame pixels (:data:`Box`); a detection is ``(box, score)``
(:data:`Det`).

Trust boundary: detection files and model files come from outside (a site's export, an
operator's upload). They are read as untrusted input: regular files only (symlinks refused),
size caps, text decoded as UTF-8 with replacement, every row checked (a bad row is reported
through ``problem(where, reason)`` and skipped), model metadata parsed with
``ast.literal_eval`` (never ``eval``), models run only with ONNX Runtime's CPU provider. What is
wrong reaches operators as a :class:`DetectionError` saying what to do, not as a traceback.

Pure of the database: numpy, OpenCV and ONNX Runtime only. Frame sampling (``every_n``) is the
caller's job; the detectors keep no state apart from the ONNX Runtime session.
"""
from __future__ import annotations

import ast
import math
import os
import stat
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # x, y, w, h in frame pixels
Det = tuple[Box, float]  # box, score
Problem = Callable[[str, str], None]  # problem(where, reason)

MAX_DET_FILE_BYTES = 200 * 1024 * 1024
MAX_DET_ROWS = 5_000_000
MAX_MODEL_BYTES = 1024 * 1024 * 1024
LAYOUTS = ("yolov8", "yolov5", "yolox", "e2e")
_STRIDES = (8, 16, 32)
_MAX_DETS = 300  # per frame, after NMS (as Ultralytics' max_det)


class DetectionError(ValueError):
    """A detection source that cannot be used; the message says what was wrong and what to do."""


def _open_regular(path: Path, cap: int, what: str) -> int:
    """File descriptor of a regular file no larger than ``cap``; symlinks are refused (opened
    with O_NOFOLLOW and checked with fstat, so the file checked is the file read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise DetectionError(f"{what} {path} does not exist; check the path") from None
    except OSError as e:
        if path.is_symlink():
            raise DetectionError(f"{what} {path} is a symlink; copy the file itself there") from None
        raise DetectionError(f"{what} {path} cannot be opened ({e.strerror}); check the path and its permissions") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DetectionError(f"{what} {path} is not a regular file; give the path of the file itself")
    if st.st_size > cap:
        os.close(fd)
        raise DetectionError(f"{what} {path} is {st.st_size / 2**20:.0f} MB, over the {cap / 2**20:.0f} MB "
                             "limit; split it or pass a smaller file")
    return fd


# --------------------------------------------------------------------------- detection files

_COLUMNS = {  # canonical name -> accepted header names
    "frame": ("frame", "frame_id", "frameid"),
    "x": ("x", "left"), "y": ("y", "top"), "w": ("w", "width"), "h": ("h", "height"),
    "score": ("score", "conf", "confidence"),
    "label": ("label", "class"),
}
_FORMATS = ("MOTChallenge det.txt rows 'frame,-1,left,top,width,height,score' (no header), or a CSV "
            "whose header names frame,x,y,w,h,score (or left/top/width/height, conf/confidence; "
            "optional label/class)")


def _fields(line: str) -> list[str]:
    """Comma-separated when the line has a comma (empty fields kept), else whitespace-separated."""
    if "," in line:
        return [f.strip().strip('"').strip("'") for f in line.split(",")]
    return line.split()


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_detections(path: str | Path, problem: Problem | None = None,
                    scale: tuple[float, float] = (1.0, 1.0)) -> dict[int, list[Det]]:
    """A site's detections: frame number (1-based) -> ``[(box, score), ...]``, frames in order.

    Two formats, told apart by whether the first non-empty line is all numbers:

    - MOTChallenge ``det/det.txt``: ``frame, id (-1), left, top, width, height, score[, x, y, z]``,
      no header, comma or whitespace separated.
    - CSV with a header row: columns ``frame, x, y, w, h, score`` (synonyms ``left, top, width,
      height``; ``conf, confidence``; ``score`` may be absent: 1.0). An optional ``label`` or
      ``class`` column keeps only rows labelled ``person`` (any case) or ``0`` (COCO's person).

    ``scale=(sx, sy)`` maps file coordinates to video pixels (e.g. MOT's seqinfo size vs a
    re-encoded clip). Lines starting with ``#`` are comments. A bad row (too few fields,
    non-numeric or non-finite values, frame < 1 or not whole, width/height <= 0) is reported
    through ``problem(f"{name}:{lineno}", reason)`` and skipped. Raises :class:`DetectionError`
    for a file that is not a regular file (symlinks included), over 200 MB or 5 M rows, with a
    header missing a needed column, or with no usable row at all.
    """
    path = Path(path)
    sx, sy = (float(v) for v in scale)
    if not (math.isfinite(sx) and math.isfinite(sy) and sx > 0 and sy > 0):
        raise DetectionError(f"scale must be two positive numbers, got {scale!r}")
    fd = _open_regular(path, MAX_DET_FILE_BYTES, "detection file")
    with os.fdopen(fd, "rb") as fh:
        text = fh.read(MAX_DET_FILE_BYTES + 1).decode("utf-8", errors="replace")
    report = problem or (lambda where, reason: None)
    lines = [(n, s.strip()) for n, s in enumerate(text.lstrip("\ufeff").splitlines(), 1)]
    lines = [(n, s) for n, s in lines if s and not s.startswith("#")]
    if len(lines) > MAX_DET_ROWS:
        raise DetectionError(f"{path.name} has {len(lines)} rows, over the {MAX_DET_ROWS} limit; split it per clip")
    if not lines:
        raise DetectionError(f"{path.name} is empty; expected {_FORMATS}")

    first = _fields(lines[0][1])
    if all(_is_number(f) for f in first):  # MOTChallenge: frame, id, left, top, w, h, score
        cols, label_col, need, rows = {"frame": 0, "x": 2, "y": 3, "w": 4, "h": 5, "score": 6}, None, 7, lines
    else:
        header = [f.lower() for f in first]
        cols = {}
        for canon, names in _COLUMNS.items():
            hit = next((i for i, f in enumerate(header) if f in names), None)
            if hit is not None:
                cols[canon] = hit
        missing = [c for c in ("frame", "x", "y", "w", "h") if c not in cols]
        if missing:
            raise DetectionError(f"{path.name}: the header ({', '.join(first)}) has no column for "
                                 f"{', '.join(missing)}; expected {_FORMATS}")
        label_col = cols.pop("label", None)
        need, rows = max(cols.values()) + 1, lines[1:]
        if label_col is not None:
            need = max(need, label_col + 1)

    out: dict[int, list[Det]] = {}
    bad = 0
    for lineno, line in rows:
        where = f"{path.name}:{lineno}"
        f = _fields(line)
        if len(f) < need:
            report(where, f"{len(f)} fields, expected at least {need}")
            bad += 1
            continue
        if label_col is not None and f[label_col].strip().lower() not in ("person", "0"):
            continue  # another class: not an error
        try:
            v = {k: float(f[i]) for k, i in cols.items()}
        except ValueError:
            report(where, f"not a number in {line[:80]!r}")
            bad += 1
            continue
        v.setdefault("score", 1.0)
        reason = ("a value is not finite" if not all(math.isfinite(x) for x in v.values()) else
                  "frame is not a whole number >= 1" if v["frame"] < 1 or v["frame"] != int(v["frame"]) else
                  "width or height <= 0" if v["w"] <= 0 or v["h"] <= 0 else None)
        if reason:
            report(where, reason)
            bad += 1
            continue
        box = (v["x"] * sx, v["y"] * sy, v["w"] * sx, v["h"] * sy)
        out.setdefault(int(v["frame"]), []).append((box, v["score"]))
    if not out:
        raise DetectionError(f"{path.name} has no usable detection row ({bad} bad of {len(rows)}); "
                             f"expected {_FORMATS}")
    return dict(sorted(out.items()))


def _plain_file(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.lstat().st_mode)  # lstat: a symlink is not a plain file
    except OSError:
        return False


def find_detection_file(clip: str | Path) -> Path | None:
    """The site's detection file beside a clip, by these conventions in order:
    ``<stem>.det.txt``, ``<stem>.csv``, ``det/<stem>.txt``, then ``det/det.txt`` (a MOT-style
    sequence folder holding the clip). Symlinks (the file, or the ``det`` folder) are ignored,
    not followed. None when there is none."""
    clip = Path(clip)
    folder, stem = clip.parent, clip.stem
    det = folder / "det"
    candidates = [folder / f"{stem}.det.txt", folder / f"{stem}.csv"]
    if det.is_dir() and not det.is_symlink():
        candidates += [det / f"{stem}.txt", det / "det.txt"]
    return next((p for p in candidates if _plain_file(p)), None)


# --------------------------------------------------------------------------- ONNX detector

def _literal(s: str | None):
    if not s:
        return None
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _class_names(meta: dict[str, str]) -> list[str] | None:
    """Class names from Ultralytics/YOLOv5 ``names`` metadata (a dict literal ``{0: 'person'}``
    or a list), or None."""
    names = _literal(meta.get("names"))
    if isinstance(names, dict) and names and all(isinstance(k, int) for k in names):
        return [str(names.get(i, "")) for i in range(max(names) + 1)]
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    return None


def _grid_count(h: int, w: int) -> int:
    return sum((h // s) * (w // s) for s in _STRIDES)


def _shape_layouts(shape: tuple[int, ...], h: int, w: int, ncls: int | None) -> list[str]:
    """Layouts an output of this shape could be ("yolov8t": transposed [1, N, 4+C])."""
    if len(shape) != 3 or shape[0] != 1:
        return []
    a, b, n = shape[1], shape[2], _grid_count(h, w)
    out = []
    if b == 6 and a <= 1000:
        out.append("e2e")
    if 5 <= a < b and (ncls is None or a - 4 == ncls):
        out.append("yolov8")
    if a == n and b >= 5 and ncls is not None and b - 4 == ncls:
        out.append("yolov8t")  # transposed: only when names metadata says 4+C (else YOLOX's shape)
    if a == n and b >= 6 and (ncls is None or b - 5 == ncls):
        out.append("yolox")
    if a == 3 * n and b >= 6 and (ncls is None or b - 5 == ncls):
        out.append("yolov5")
    return out


class OnnxDetector:
    """A site's person detector exported to ONNX, run with ONNX Runtime on the CPU.

    ``det(frame_bgr) -> [(box, score), ...]``: person boxes in frame pixels (clipped to the
    frame), score >= ``conf``, after NMS (``cv2.dnn.NMSBoxes`` at ``iou``), at most 300.

    Layouts (``layout=``):

    - ``"yolov8"``: Ultralytics v8/v11 (and YOLOv5u): ``[1, 4+C, N]`` (cx, cy, w, h, C class
      scores, no objectness), also accepted transposed ``[1, N, 4+C]``.
    - ``"yolov5"``: original YOLOv5: ``[1, N, 5+C]`` (cx, cy, w, h, objectness, class scores;
      score = objectness x class score), N = 3 anchors per grid cell.
    - ``"yolox"``: Megvii YOLOX raw head outputs as its export writes them by default
      (``decode_in_inference=False``): ``[1, N, 5+C]``, decoded here with grids for strides 8,
      16, 32 (xy = (out + grid) * stride, wh = exp(out) * stride).
    - ``"e2e"``: end-to-end exports with NMS inside (YOLOv10, YOLO26): ``[1, K, 6]`` =
      (x1, y1, x2, y2, score, class).
    - ``"auto"`` (default): from the model's metadata (Ultralytics writes ``names``, ``imgsz``,
      ``task``, ``author``) and the output shape: last dim 6 and K <= 1000 -> e2e; ``[1, 4+C, N]``
      with 4+C < N -> yolov8; ``[1, N, 5+C]`` with N = sum((S/s)^2 for s in 8, 16, 32) -> yolox,
      N = 3x that -> yolov5; ``[1, N, 4+C]`` -> transposed yolov8 only when ``names`` holds C
      classes (without metadata that shape reads as YOLOX). Ultralytics metadata rules out
      yolox/yolov5. When the shape still fits several, DetectionError names them: pass one.

    A box counts as a person when its best class is ``person_class``: a name looked up in the
    model's ``names`` metadata (any case), or an index. With no ``names`` metadata, ``"person"``
    means COCO index 0; any other name then needs an index.

    Preprocessing: YOLOv8/v5/e2e: letterbox to the input size keeping the aspect ratio, grey
    (114) padding centred, RGB, /255, NCHW float. YOLOX: resize by the ratio, pad bottom-right
    with 114, BGR, 0-255. Boxes are mapped back exactly (pad removed, the resize undone).
    Input size: the model's static input shape, else metadata ``imgsz``, else ``input_size``,
    else 640.

    The model file is untrusted: a regular ``.onnx`` file (no symlink) under 1 GB. One inference
    on a blank image at load checks that it runs and gives the output shape.
    """

    def __init__(self, path: str | Path, person_class: str | int = "person", conf: float = 0.25,
                 iou: float = 0.45, layout: str = "auto", input_size: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if layout not in (*LAYOUTS, "auto"):
            raise DetectionError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)} or 'auto'")
        if path.suffix.lower() != ".onnx":
            raise DetectionError(f"{path.name} is not an .onnx file; export the detector to ONNX first")
        os.close(_open_regular(path, MAX_MODEL_BYTES, "model file"))
        self.path, self.conf, self.iou = path, float(conf), float(iou)
        supported = ("supported: Ultralytics YOLOv8/v11 [1,4+C,N], YOLOv5 [1,N,5+C], YOLOX raw "
                     "[1,N,5+C], end-to-end [1,K,6] (x1,y1,x2,y2,score,class)")
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises several types for an unreadable model
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DetectionError(f"{path.name}: ONNX Runtime cannot load this model ({msg}); check that it is "
                                 f"a complete ONNX export of a detector ({supported})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise DetectionError(f"{path.name}: expected one image input [1, 3, H, W], got "
                                 f"{[(i.name, i.shape) for i in inputs]}; {supported}")
        self._input = inputs[0].name
        self._dtype = np.float16 if "float16" in inputs[0].type else np.float32
        meta = dict(self.session.get_modelmeta().custom_metadata_map or {})
        self.names = _class_names(meta)
        imgsz = _literal(meta.get("imgsz"))
        imgsz = [imgsz] * 2 if isinstance(imgsz, int) else list(imgsz) if isinstance(imgsz, (list, tuple)) else []
        for hw in (list(inputs[0].shape[2:]), imgsz, [input_size] * 2, [640, 640]):
            if len(hw) == 2 and all(type(v) is int and 0 < v <= 8192 for v in hw):
                self.size = (hw[0], hw[1])  # static input shape, else imgsz, else input_size, else 640
                break

        shape = tuple(self._forward(np.zeros((1, 3, *self.size), self._dtype)).shape)
        ncls = len(self.names) if self.names else None
        if layout == "auto":
            ultralytics = "ultralytics" in meta.get("author", "").lower() or "task" in meta
            cands = _shape_layouts(shape, *self.size, ncls) or _shape_layouts(shape, *self.size, None)
            if ultralytics:
                cands = [c for c in cands if c in ("yolov8", "yolov8t", "e2e")] or cands
            if not cands:
                raise DetectionError(f"{path.name}: output shape {list(shape)} fits no supported layout "
                                     f"(input {self.size[0]}x{self.size[1]}); {supported}")
            if len(cands) > 1:
                named = sorted({c.rstrip("t") for c in cands})
                raise DetectionError(f"{path.name}: output shape {list(shape)} could be "
                                     f"{' or '.join(named)}; pass layout= one of them explicitly")
            self.layout, self._transposed = cands[0].rstrip("t"), cands[0] == "yolov8t"
        else:
            three = len(shape) == 3 and shape[0] == 1
            a, b = (shape[1], shape[2]) if three else (0, 0)
            fits_it = three and {"yolov8": b >= 5, "yolov5": b >= 6, "e2e": b == 6,
                                 "yolox": b >= 6 and a == _grid_count(*self.size)}[layout]
            if not fits_it:
                raise DetectionError(f"{path.name}: output shape {list(shape)} does not fit layout {layout!r} "
                                     f"(input {self.size[0]}x{self.size[1]}); {supported}")
            self.layout, self._transposed = layout, layout == "yolov8" and not 5 <= a < b
        ncls = (shape[1] if self.layout == "yolov8" and not self._transposed else shape[2]) - (
            4 if self.layout == "yolov8" else 5)
        self.person = self._person_index(person_class, None if self.layout == "e2e" else ncls)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self.session.run(None, {self._input: x})[0], dtype=np.float32)
        except Exception as e:  # shown to operators: the first line of ORT's message, no traceback
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DetectionError(f"{self.path.name}: ONNX Runtime failed on this model ({msg}); check that the "
                                 f"input size {self.size[0]}x{self.size[1]} is what it was exported for "
                                 "(pass input_size=)") from None

    def _person_index(self, person_class: str | int, ncls: int | None) -> int:
        if isinstance(person_class, (int, np.integer)) and not isinstance(person_class, bool):
            idx = int(person_class)
        elif self.names:
            low = [n.lower() for n in self.names]
            if str(person_class).lower() not in low:
                raise DetectionError(f"{self.path.name} has no class {person_class!r}; its classes are "
                                     f"{', '.join(self.names[:80])}; pass one of them or an index")
            idx = low.index(str(person_class).lower())
        elif str(person_class).lower() == "person":
            idx = 0  # no names metadata: COCO order, person is class 0
        else:
            raise DetectionError(f"{self.path.name} has no 'names' metadata to look {person_class!r} up in; "
                                 "pass person_class as a class index")
        if idx < 0 or (ncls is not None and idx >= ncls):
            raise DetectionError(f"person class index {idx} is outside this model's {ncls} classes")
        return idx

    def _prepare(self, frame: np.ndarray) -> tuple[np.ndarray, float, float, float, float]:
        """Network input and the mapping back: frame = (model - (px, py)) / (sx, sy)."""
        (S_h, S_w), (h, w) = self.size, frame.shape[:2]
        r = min(S_h / h, S_w / w)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        img = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else frame
        if self.layout == "yolox":  # bottom-right pad, BGR, 0-255
            left = top = 0
            canvas = np.full((S_h, S_w, 3), 114, np.uint8)
            canvas[:nh, :nw] = img
            x = canvas.astype(np.float32)
        else:  # Ultralytics letterbox: centred grey pad, RGB, /255
            dw, dh = (S_w - nw) / 2, (S_h - nh) / 2
            top, left = round(dh - 0.1), round(dw - 0.1)
            canvas = cv2.copyMakeBorder(img, top, S_h - nh - top, left, S_w - nw - left,
                                        cv2.BORDER_CONSTANT, value=(114, 114, 114))
            x = canvas[:, :, ::-1].astype(np.float32) / 255.0
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=self._dtype)
        return x, left, top, nw / w, nh / h

    def _decode(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model-space corner boxes [M, 4] (x1, y1, x2, y2) and scores of the person rows."""
        p = out[0]
        if self.layout == "e2e":
            keep = (np.round(p[:, 5]) == self.person) & (p[:, 4] >= self.conf)
            return p[keep, :4], p[keep, 4]
        if self.layout == "yolov8":
            p = p if self._transposed else p.T
            cls = p[:, 4:]
            best, score = cls.argmax(1), cls[:, self.person]
        else:
            cls = p[:, 5:]
            best, score = cls.argmax(1), p[:, 4] * cls[:, self.person]
        keep = (best == self.person) & (score >= self.conf)
        p, score = p[keep], score[keep]
        xy, wh = p[:, :2], p[:, 2:4]
        if self.layout == "yolox":
            grid, stride = self._grid()
            xy = (xy + grid[keep]) * stride[keep]
            wh = np.exp(np.minimum(wh, 20.0)) * stride[keep]
        return np.concatenate([xy - wh / 2, xy + wh / 2], 1), score

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_grids"):
            grids, strides = [], []
            for s in _STRIDES:
                hs, ws = self.size[0] // s, self.size[1] // s
                xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
                grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
                strides.append(np.full((hs * ws, 1), s))
            self._grids = (np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32))
        return self._grids

    def __call__(self, frame_bgr: np.ndarray) -> list[Det]:
        frame = np.asarray(frame_bgr)
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        elif frame.ndim == 3 and frame.shape[2] == 4:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.size == 0:
            raise DetectionError(f"expected a BGR frame H x W x 3, got shape {frame.shape}")
        if frame.dtype != np.uint8:
            frame = np.clip(frame, 0, 255).astype(np.uint8)
        x, left, top, sx, sy = self._prepare(frame)
        boxes, scores = self._decode(self._forward(x))
        if not len(boxes):
            return []
        h, w = frame.shape[:2]
        boxes = (boxes - [left, top, left, top]) / [sx, sy, sx, sy]
        boxes = np.clip(boxes, 0, [w, h, w, h])
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        ok = (xywh[:, 2] > 0) & (xywh[:, 3] > 0) & np.isfinite(scores)
        return _nms(xywh[ok], scores[ok], self.conf, self.iou)[:_MAX_DETS]


def _nms(xywh: np.ndarray, scores: np.ndarray, min_score: float, iou: float) -> list[Det]:
    if not len(xywh):
        return []
    boxes, sc = [[float(v) for v in b] for b in xywh], [float(s) for s in scores]
    keep = np.ravel(cv2.dnn.NMSBoxes(boxes, sc, min_score, iou)) if boxes else []
    dets = [(tuple(boxes[i]), sc[i]) for i in keep]
    return sorted(dets, key=lambda d: -d[1])


# --------------------------------------------------------------------------- HOG

_HOG_PERSON = (0.25, 0.125)  # margin of the 64x128 window around the person, per side (x, y)


class HogDetector:
    """OpenCV's default HOG people detector: the last resort, when a site has neither
    detections nor a model. Its boxes are weak (missed people, false boxes on poles and
    shadows); a site's own detections (:func:`read_detections`) or ONNX model
    (:class:`OnnxDetector`) are better whenever there is one.

    CCTV people are small (PETS09 people are ~20x50 px at 480x360), under the 64x128 window the
    detector was trained on, so the frame is first upscaled by ``upscale`` (capped so the
    upscaled width stays within ``max_width``). Each window is trimmed to the person inside it
    (the INRIA training windows hold a ~32x96 person: a quarter of the width and an eighth of the
    height off each side) and mapped back to frame pixels; NMS at IoU 0.4 keeps boxes scoring
    >= ``min_score``. detectMultiScale: winStride (8, 8), padding (8, 8), scale 1.05.

    Evidence for the defaults, measured on PETS09-S2L1 (480x360 video; GT x 0.625), every 40th
    frame (20 frames, 111 GT people), a match at IoU >= 0.5, min_score 0.5, 2 CPU cores:

    ============  ==========  ======  ===========
    upscale       precision   recall  s per frame
    ============  ==========  ======  ===========
    1             0.17        0.02    0.02
    1.5           0.73        0.29    0.06
    2 (default)   0.88        0.78    0.12
    3             0.76        0.91    0.28
    ============  ==========  ======  ===========

    At upscale 1 it finds 2 of the 111 people (its 12 boxes were ~170 px tall windows). Without the
    trim, upscale 2 matches nothing at IoU 0.5 (0.61 / 0.54 at IoU 0.3): the window is far
    larger than the person. Upscale 3 finds more people but more false boxes, at 2.4x the time.
    """

    def __init__(self, upscale: float = 2.0, min_score: float = 0.5, max_width: int = 1600):
        if not (upscale > 0 and max_width > 0):
            raise ValueError("upscale and max_width must be positive")
        self.upscale, self.min_score, self.max_width = float(upscale), float(min_score), int(max_width)
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def __call__(self, frame_bgr: np.ndarray) -> list[Det]:
        frame = np.asarray(frame_bgr)
        h, w = frame.shape[:2]
        f = min(self.upscale, self.max_width / w)
        img = cv2.resize(frame, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR) if f != 1 else frame
        rects, weights = self._hog.detectMultiScale(img, winStride=(8, 8), padding=(8, 8), scale=1.05)
        if len(rects) == 0:
            return []
        mx, my = _HOG_PERSON
        r = np.asarray(rects, np.float64) / f
        xywh = np.stack([r[:, 0] + r[:, 2] * mx, r[:, 1] + r[:, 3] * my,
                         r[:, 2] * (1 - 2 * mx), r[:, 3] * (1 - 2 * my)], 1)
        x1y1 = np.clip(xywh[:, :2], 0, [w, h])
        x2y2 = np.clip(xywh[:, :2] + xywh[:, 2:], 0, [w, h])
        xywh = np.concatenate([x1y1, x2y2 - x1y1], 1)
        ok = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        return _nms(xywh[ok], np.ravel(weights).astype(np.float64)[ok], self.min_score, 0.4)
