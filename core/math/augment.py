"""Surveillance augmentations for re-ID training: pure functions on BGR uint8 arrays.

Every random function takes a ``numpy.random.Generator`` and nothing else random, so one seed
gives one result. Images are ``[H, W, 3]`` uint8 BGR as OpenCV decodes them; every function
returns a new array of the same shape and dtype and never changes its input.

- :func:`low_light`: gamma darkening + Poisson shot noise + Gaussian read noise (a night camera).
- :func:`motion_blur`: a line kernel at a random angle (a walking person, a slow shutter).
- :func:`occlude`: random erasing of a rectangle (a pole, a bag, another person).
- :func:`cast_shadow`: a dark soft-edged polygon; only the polygon (and its soft edge) darkens.
- :func:`color_jitter`: brightness, contrast, saturation, hue.
- :func:`hflip`.

:func:`augment` composes them with the probabilities of a frozen :class:`AugmentConfig`;
:func:`augment_batch` does a training batch, one seeded generator per image (threads welcome).
The brightness-invariant input (per-image luma mean/std normalisation, `network.normalize_luma`) is part of the model (core.model.network) so training,
extraction and ONNX export apply it identically; it is not an augmentation.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and strengths of the training transform (see :func:`augment`)."""

    p_flip: float = 0.5
    p_color: float = 0.8
    brightness: float = 0.25  # multiplicative, +- this share
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.03  # share of the hue circle
    p_low_light: float = 0.2
    gamma: tuple[float, float] = (1.5, 3.0)
    gain: tuple[float, float] = (0.4, 0.9)
    photons: tuple[float, float] = (30.0, 200.0)  # full-well scale: fewer photons = more shot noise
    read_noise: tuple[float, float] = (1.0, 6.0)  # Gaussian sigma in grey levels
    p_blur: float = 0.2
    blur_length: tuple[int, int] = (3, 9)
    p_shadow: float = 0.25
    shadow_darkness: tuple[float, float] = (0.35, 0.7)  # share of light removed inside
    shadow_softness: tuple[float, float] = (0.005, 0.025)  # edge blur sigma, share of the diagonal
    p_occlude: float = 0.3
    occlude_area: tuple[float, float] = (0.03, 0.2)
    occlude_aspect: tuple[float, float] = (0.3, 3.3)


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def hflip(img: np.ndarray) -> np.ndarray:
    """Mirror left-right. [H, W, C] -> [H, W, C]."""
    return np.ascontiguousarray(img[:, ::-1])


def low_light(
    img: np.ndarray,
    rng: np.random.Generator,
    gamma: float | None = None,
    gain: float | None = None,
    photons: float | None = None,
    read_noise: float | None = None,
    cfg: AugmentConfig = AugmentConfig(),
) -> np.ndarray:
    """Night camera: ``gain * x**gamma`` on [0, 1] values, then Poisson shot noise at ``photons``
    per full-scale pixel and Gaussian read noise (sigma in grey levels). Unset strengths are drawn
    from ``cfg``'s ranges."""
    gamma = _u(rng, cfg.gamma) if gamma is None else gamma
    gain = _u(rng, cfg.gain) if gain is None else gain
    photons = _u(rng, cfg.photons) if photons is None else photons
    read_noise = _u(rng, cfg.read_noise) if read_noise is None else read_noise
    x = gain * (img.astype(np.float32) / 255.0) ** gamma
    x = rng.poisson(x * photons).astype(np.float32) / photons
    x = x * 255.0 + rng.normal(0.0, read_noise, size=img.shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def motion_blur_kernel(length: int, angle_deg: float) -> np.ndarray:
    """Normalised line kernel [k, k] (k = odd length) at ``angle_deg`` from the horizontal."""
    k = max(1, int(length)) | 1
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((k - 1) / 2.0, (k - 1) / 2.0), angle_deg, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (k, k), flags=cv2.INTER_LINEAR)
    s = kernel.sum()
    return kernel / s if s > 0 else np.eye(1, dtype=np.float32)


def motion_blur(
    img: np.ndarray,
    rng: np.random.Generator,
    length: int | None = None,
    angle_deg: float | None = None,
    cfg: AugmentConfig = AugmentConfig(),
) -> np.ndarray:
    """Convolve with a line kernel of ``length`` pixels at a random angle."""
    if length is None:
        length = int(rng.integers(cfg.blur_length[0], cfg.blur_length[1] + 1))
    angle_deg = float(rng.uniform(0.0, 180.0)) if angle_deg is None else angle_deg
    return cv2.filter2D(img, -1, motion_blur_kernel(length, angle_deg), borderType=cv2.BORDER_REFLECT)


def occlude(
    img: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig = AugmentConfig(),
) -> np.ndarray:
    """Random erasing: one rectangle of ``occlude_area`` share and ``occlude_aspect`` (h/w)
    filled with uniform noise (Zhong et al. 2017)."""
    h, w = img.shape[:2]
    out = img.copy()
    for _ in range(10):
        area = _u(rng, cfg.occlude_area) * h * w
        aspect = float(np.exp(rng.uniform(np.log(cfg.occlude_aspect[0]), np.log(cfg.occlude_aspect[1]))))
        eh, ew = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < eh < h and 0 < ew < w:
            y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            out[y : y + eh, x : x + ew] = rng.integers(0, 256, size=(eh, ew) + img.shape[2:], dtype=np.uint8)
            return out
    return out


def random_polygon(shape: tuple[int, int], rng: np.random.Generator, n_min: int = 3, n_max: int = 7) -> np.ndarray:
    """A random simple (star-shaped) polygon [K, 2] int32 (x, y) inside an image of ``shape``
    (H, W): vertices at sorted angles around a random centre, radii 25-70 % of the image size."""
    h, w = shape[:2]
    n = int(rng.integers(n_min, n_max + 1))
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, n))
    radius = rng.uniform(0.25, 0.7, n)
    xs = np.clip(cx + radius * w * np.cos(angles), 0, w - 1)
    ys = np.clip(cy + radius * h * np.sin(angles), 0, h - 1)
    return np.stack([xs, ys], axis=1).round().astype(np.int32)


def shadow_mask(shape: tuple[int, int], polygon: np.ndarray, softness_px: float) -> np.ndarray:
    """Float32 mask [H, W] in [0, 1]: 1 inside ``polygon`` [K, 2] (x, y), 0 outside, with a
    Gaussian-blurred edge of about ``softness_px`` pixels (sigma). Pixels farther than
    3 * sigma from the polygon's edge keep their hard value."""
    h, w = shape[:2]
    mask = np.zeros((h, w), np.float32)
    cv2.fillPoly(mask, [polygon.reshape(-1, 1, 2).astype(np.int32)], 1.0)
    if softness_px > 0:
        k = int(2 * np.ceil(3 * softness_px) + 1)
        mask = cv2.GaussianBlur(mask, (k, k), softness_px, borderType=cv2.BORDER_REPLICATE)
    return mask


def apply_shadow(img: np.ndarray, mask: np.ndarray, darkness: float) -> np.ndarray:
    """Darken ``img`` by ``darkness`` (share of light removed) where ``mask`` [H, W] is 1.
    Shadow light is skylight, slightly bluer: red and green lose a little more than blue (BGR)."""
    tint = np.array([0.85, 1.0, 1.05], np.float32)  # B, G, R weight of the darkening
    factor = 1.0 - np.clip(darkness * mask[..., None] * tint, 0.0, 1.0)
    return np.clip(img.astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8)


def cast_shadow(
    img: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig = AugmentConfig(),
    return_polygon: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, float]:
    """A synthetic cast shadow: a random dark soft-edged polygon. Only the polygon area (and its
    blurred edge) darkens. With ``return_polygon`` also returns (polygon [K, 2], softness_px)."""
    h, w = img.shape[:2]
    polygon = random_polygon((h, w), rng)
    softness_px = _u(rng, cfg.shadow_softness) * float(np.hypot(h, w))
    out = apply_shadow(img, shadow_mask((h, w), polygon, softness_px), _u(rng, cfg.shadow_darkness))
    return (out, polygon, softness_px) if return_polygon else out


def color_jitter(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Brightness and contrast (multiplicative, around the mean), saturation and hue (HSV)."""
    x = img.astype(np.float32)
    x *= 1.0 + rng.uniform(-cfg.brightness, cfg.brightness)
    mean = x.mean()
    x = (x - mean) * (1.0 + rng.uniform(-cfg.contrast, cfg.contrast)) + mean
    x = np.clip(x, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 3 and (cfg.saturation > 0 or cfg.hue > 0):
        hsv = cv2.cvtColor(x, cv2.COLOR_BGR2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue, cfg.hue) * 180.0) % 180.0
        hsv[..., 1] = np.clip(hsv[..., 1] * (1.0 + rng.uniform(-cfg.saturation, cfg.saturation)), 0, 255)
        x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
    return x


def augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """The training transform: flip, colour jitter, cast shadow, low light, motion blur,
    occlusion, each applied with its probability in ``cfg``. [H, W, 3] uint8 -> same."""
    out = img
    if rng.random() < cfg.p_flip:
        out = hflip(out)
    if rng.random() < cfg.p_color:
        out = color_jitter(out, rng, cfg)
    if rng.random() < cfg.p_shadow:
        out = cast_shadow(out, rng, cfg)
    if rng.random() < cfg.p_low_light:
        out = low_light(out, rng, cfg=cfg)
    if rng.random() < cfg.p_blur:
        out = motion_blur(out, rng, cfg=cfg)
    if rng.random() < cfg.p_occlude:
        out = occlude(out, rng, cfg)
    return out if out is not img else img.copy()


def augment_batch(
    imgs: Sequence[np.ndarray], rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
    map_fn: Callable = map,
) -> np.ndarray:
    """:func:`augment` of each image, stacked: ``[B, H, W, 3]``. Each image gets its own generator,
    seeded from ``rng``, so the batch is one result of ``rng`` whichever order ``map_fn`` (the
    builtin ``map``, or a thread pool's: OpenCV and numpy release the GIL) runs them in.
    A training step's batch on threads: 64 crops of 128x64 in 38 ms on 2 threads against 50 ms in
    one; at 256x128 91 ms against 171 ms (on a GPU the step waits for this, not the model: an
    H200 ran the default round at 12.7 steps/s, its 16 CPU cores alone at 8.3). A round's
    held-out mAP with these per-image generators (benchmarks/probe_campus62.py, split seeds 0 / 1):
    62.3 / 66.4, against 63.9 / 66.4 with one generator for the batch."""
    seeds = rng.integers(0, 2**63, size=len(imgs))
    out = list(map_fn(lambda k: augment(imgs[k], np.random.default_rng(int(seeds[k])), cfg), range(len(imgs))))
    return np.stack(out)
