"""Safe decoding of user media: every failure becomes a :class:`MediaError` with a reason an
operator can act on (corrupt, truncated, too large, not an image, unreadable)."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".webm"}
MAX_PIXELS = 50_000_000  # refuse larger images before decoding them (decompression bombs)


class MediaError(ValueError):
    """A file that cannot be used, with the reason."""


def check_name(path: Path) -> None:
    """File names must be valid UTF-8 (MongoDB stores them as strings)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise MediaError("file name is not valid UTF-8: rename the file") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image fully into BGR uint8 [H, W, 3] or raise MediaError with the reason."""
    path = Path(path)
    check_name(path)
    if not path.is_file():
        raise MediaError("file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise MediaError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise MediaError(
                    f"image is {w}x{h} ({w * h / 1e6:.0f} Mpx), over the {MAX_PIXELS / 1e6:.0f} Mpx"
                    " limit: downscale it first"
                )
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large ({exc.args[0].split('(')[1].split(')')[0]}), over the "
                         f"{MAX_PIXELS / 1e6:.0f} Mpx limit: downscale it first") from None
    except UnidentifiedImageError:
        raise MediaError("not an image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise MediaError("truncated image (file is incomplete)") from None
        raise MediaError(f"corrupt image: {msg}") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


def write_jpeg(path: Path, img: np.ndarray, quality: int = 95) -> None:
    """Write atomically (temp file, then rename) so a killed ingest leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise MediaError(f"could not encode {path.name}")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


class VideoReader:
    """Sequential frames of a video file, with a clear error for files that are not videos."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        check_name(self.path)
        if not self.path.is_file():
            raise MediaError("file not found")
        if self.path.stat().st_size == 0:
            raise MediaError("empty video file (0 bytes)")
        self.cap = cv2.VideoCapture(str(self.path))
        if not self.cap.isOpened():
            raise MediaError("not a readable video (unknown codec or not a video file)")
        self.width = int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS)) or 25.0
        self.frame_count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if self.width <= 0 or self.height <= 0:
            self.cap.release()
            raise MediaError("video has no decodable frames")

    def frames(self):
        """Yield (frame_number starting at 1, BGR frame)."""
        n = 0
        while True:
            ok, frame = self.cap.read()
            if not ok:
                break
            n += 1
            yield n, frame
        self.cap.release()
        if n == 0:
            raise MediaError("video has no decodable frames")


def read_frames(path: str | os.PathLike, wanted: list[int]) -> dict[int, np.ndarray]:
    """Frames (1-based numbers) of a video, for strips of a tracklet; decodes sequentially."""
    wanted_set = set(wanted)
    out: dict[int, np.ndarray] = {}
    if not wanted_set:
        return out
    cap = cv2.VideoCapture(str(path))
    first = min(wanted_set)
    cap.set(cv2.CAP_PROP_POS_FRAMES, first - 1)
    n = first - 1
    last = max(wanted_set)
    while n < last:
        ok, frame = cap.read()
        if not ok:
            break
        n += 1
        if n in wanted_set:
            out[n] = frame
    cap.release()
    return out
