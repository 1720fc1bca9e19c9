"""Image conditions computed at ingest: brightness, low-light/night flag, blur.

Pure functions on arrays (BGR uint8 as OpenCV decodes them); no FiftyOne, no Streamlit.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# The condition tags an operator puts on samples (Map, Annotate), that export keeps and that the
# misclustered scores and the queue's condition boost read: one vocabulary for all of them.
CONDITION_TAGS = ("night", "shadow", "occluded", "blur")

# Mean luma below this (0..255) counts as low light. Chosen on the real data: the low-light
# photographs of ../shared/data/lowlight sit mostly below 60, PETS09/TUD frames above 80.
LOW_LIGHT_BRIGHTNESS = 60.0
# Share of near-black pixels that also marks a frame as low light (night scenes with lamps).
DARK_PIXEL_LEVEL = 40
DARK_PIXEL_SHARE = 0.6


@dataclass(frozen=True)
class Conditions:
    brightness: float
    low_light: bool
    blur: float

    def as_fields(self) -> dict:
        return {"brightness": self.brightness, "low_light": self.low_light, "blur": self.blur}


def luma(img: np.ndarray) -> np.ndarray:
    """Luma (uint8 [H, W]) of a BGR [H, W, 3] or grey [H, W] image."""
    if img.ndim == 2:
        return img
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def brightness(img: np.ndarray) -> float:
    """Mean luma, 0..255."""
    return float(luma(img).mean())


def is_low_light(img: np.ndarray) -> bool:
    """True when the image is dark overall or mostly near-black (a night scene)."""
    y = luma(img)
    return bool(y.mean() < LOW_LIGHT_BRIGHTNESS or (y < DARK_PIXEL_LEVEL).mean() > DARK_PIXEL_SHARE)


def blur(img: np.ndarray) -> float:
    """Variance of the Laplacian of luma: low values mean a blurred image."""
    return float(cv2.Laplacian(luma(img), cv2.CV_64F).var())


def measure(img: np.ndarray) -> Conditions:
    return Conditions(brightness=brightness(img), low_light=is_low_light(img), blur=blur(img))
