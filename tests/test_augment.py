"""Augmentations on real crops and frames: each does what its name says, and only that."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.math import augment as A
from core.math.conditions import blur, brightness
from tests.conftest import need_shared


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    p = need_shared("reid", "campus62", "train", "001", "01_1.png")
    img = cv2.imread(str(p))
    assert img is not None and img.shape == (128, 48, 3)
    return img


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    p = need_shared("mot", "PETS09-S2L1", "PETS09-S2L1.mp4")
    cap = cv2.VideoCapture(str(p))
    ok, img = cap.read()
    cap.release()
    assert ok and img.shape == (360, 480, 3)
    return img


def _dist_to_polygon_edge(shape, polygon) -> tuple[np.ndarray, np.ndarray]:
    """(inside mask [H, W] bool, distance [H, W] of each pixel to the polygon's edge)."""
    h, w = shape[:2]
    inside = np.zeros((h, w), np.uint8)
    cv2.fillPoly(inside, [polygon.reshape(-1, 1, 2)], 1)
    d_out = cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5)
    d_in = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    return inside.astype(bool), np.where(inside.astype(bool), d_in, d_out)


@pytest.mark.parametrize("which", ["crop", "frame"])
def test_shadow_darkens_only_its_polygon(which, request):
    img = request.getfixturevalue(which)
    checked = 0
    for seed in range(12):
        out, polygon, soft = A.cast_shadow(img, np.random.default_rng(seed), return_polygon=True)
        inside, dist = _dist_to_polygon_edge(img.shape, polygon)
        far = dist > np.ceil(3 * soft) + 2
        if not ((far & ~inside).sum() > 50 and (far & inside).sum() > 50):
            continue
        checked += 1
        # far outside: untouched, pixel for pixel
        np.testing.assert_array_equal(out[far & ~inside], img[far & ~inside])
        # deep inside: darker, by at least the smallest configured darkness (minus rounding)
        y_in, y_out = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
        deep = far & inside & (y_in > 20)
        ratio = y_out[deep].astype(float).sum() / y_in[deep].astype(float).sum()
        assert ratio < 1 - A.AugmentConfig().shadow_darkness[0] * 0.85 + 0.02
        assert (out[far & inside] <= img[far & inside]).all()
    assert checked >= 4


def test_shadow_mask_is_soft_and_bounded(frame):
    poly = np.array([[100, 100], [300, 80], [350, 300], [120, 280]], np.int32)
    m = A.shadow_mask(frame.shape, poly, softness_px=6.0)
    assert m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1
    assert m[190, 220] == pytest.approx(1.0) and m[10, 10] == 0.0
    edge = m[190, 100:121]  # across the left edge at x=110: a ramp, not a step
    assert 0.2 < edge[10] < 0.8 and edge[0] < 0.1 and edge[-1] > 0.9 and np.all(np.diff(edge) >= -1e-6)


def test_low_light_darkens_and_adds_noise(crop, frame):
    for img in (crop, frame):
        out = A.low_light(img, np.random.default_rng(0), gamma=2.2, gain=0.6, photons=50, read_noise=3)
        assert brightness(out) < 0.5 * brightness(img)
        # noise: the residual against the noiseless darkened image is large and zero-mean-ish
        clean = np.clip(0.6 * (img / 255.0) ** 2.2 * 255 + 0.5, 0, 255)
        resid = out.astype(float) - clean
        assert resid.std() > 2.5
        assert abs(resid.mean()) < 1.0
    # defaults draw from the config ranges and still darken
    assert brightness(A.low_light(frame, np.random.default_rng(1))) < brightness(frame)


def test_motion_blur_lowers_laplacian_variance(crop, frame):
    for img in (crop, frame):
        out = A.motion_blur(img, np.random.default_rng(0), length=9)
        assert blur(out) < 0.5 * blur(img)
        assert abs(brightness(out) - brightness(img)) < 2.0  # blur moves light, it does not remove it
    k = A.motion_blur_kernel(7, 0.0)
    assert k.shape == (7, 7) and k.sum() == pytest.approx(1.0) and k[3].sum() == pytest.approx(1.0)


def test_occlusion_erases_one_rectangle(crop):
    out = A.occlude(crop, np.random.default_rng(3))
    changed = (out != crop).any(axis=2)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 0
    box = np.zeros_like(changed)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    assert not (changed & ~box).any()  # nothing changed outside one rectangle
    area = box.sum() / changed.size
    lo, hi = A.AugmentConfig().occlude_area
    assert lo * 0.7 <= area <= hi * 1.3


def test_flip_and_color_jitter(crop):
    np.testing.assert_array_equal(A.hflip(A.hflip(crop)), crop)
    np.testing.assert_array_equal(A.hflip(crop)[:, 0], crop[:, -1])
    out = A.color_jitter(crop, np.random.default_rng(0))
    assert out.shape == crop.shape and out.dtype == np.uint8 and not np.array_equal(out, crop)


def test_augment_is_deterministic_and_pure(crop):
    before = crop.copy()
    cfg = A.AugmentConfig(p_flip=1, p_color=1, p_shadow=1, p_low_light=1, p_blur=1, p_occlude=1)
    a = A.augment(crop, np.random.default_rng(42), cfg)
    b = A.augment(crop, np.random.default_rng(42), cfg)
    c = A.augment(crop, np.random.default_rng(43), cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(crop, before)  # input untouched
    assert a.shape == crop.shape and a.dtype == np.uint8
    # all probabilities zero: identity (a copy)
    none = A.AugmentConfig(p_flip=0, p_color=0, p_shadow=0, p_low_light=0, p_blur=0, p_occlude=0)
    out = A.augment(crop, np.random.default_rng(0), none)
    np.testing.assert_array_equal(out, crop)
    assert out is not crop
    with pytest.raises(Exception):
        cfg.p_flip = 0.1  # frozen


def test_a_batch_on_threads_is_the_batch_of_one_thread(crop):
    """A training batch depends on its generator alone, not on how many threads augment it (so a
    round and its resumed twin see the same batches on any machine)."""
    from concurrent.futures import ThreadPoolExecutor

    imgs = np.stack([crop, A.hflip(crop), crop[::-1].copy()] * 8)
    one = A.augment_batch(imgs, np.random.default_rng(7))
    with ThreadPoolExecutor(4) as pool:
        many = A.augment_batch(imgs, np.random.default_rng(7), map_fn=pool.map)
    np.testing.assert_array_equal(one, many)
    assert one.shape == imgs.shape and one.dtype == np.uint8
    assert not np.array_equal(one[0], one[3])  # same input, its own draw
    assert not np.array_equal(one, A.augment_batch(imgs, np.random.default_rng(8)))
