"""The default dataset of a first run: synthetic surveillance clips with MOT ground truth.

Generated offline in seconds, so ``make run`` needs no download: three fixed cameras (parking
lot, gate, corridor), each rendered by day and by night; sixteen walkers with distinct clothing
who appear in several cameras under the same identity (``identityScope=global`` in
``seqinfo.ini``); hard cast shadows, a static building shadow, a pillar that occludes people,
and loiterers who pace back and forth. The clips are written as MOT sequences and imported
through the same MOT importer as real footage. THIS IS SYNTHETIC DATA: it shows the workflow,
not real-world accuracy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

W, H, FPS, FRAMES = 320, 240, 10, 120


@dataclass(frozen=True)
class Walker:
    ident: int
    shirt: tuple[int, int, int]
    trousers: tuple[int, int, int]
    skin: tuple[int, int, int]
    height: int
    stripe: bool
    bag: bool


def _walkers(rng: np.random.Generator, n: int = 16) -> list[Walker]:
    palette = [(40, 40, 200), (200, 60, 40), (40, 170, 40), (30, 200, 220), (200, 200, 200),
               (30, 30, 30), (160, 40, 160), (0, 120, 255), (120, 80, 40), (255, 200, 120),
               (90, 90, 160), (60, 140, 140), (180, 180, 60), (20, 70, 20), (150, 150, 255),
               (220, 120, 200)]
    out = []
    for i in range(n):
        out.append(Walker(
            ident=i + 1, shirt=palette[i % len(palette)],
            trousers=palette[(i * 7 + 3) % len(palette)],
            skin=tuple(int(v) for v in rng.integers(90, 210, 3)),
            height=int(rng.integers(62, 84)), stripe=bool(i % 3 == 0), bag=bool(i % 4 == 1)))
    return out


def _background(camera: str, rng: np.random.Generator) -> np.ndarray:
    bg = np.zeros((H, W, 3), np.uint8)
    if camera == "parking":
        bg[:] = (95, 100, 100)
        for x in range(10, W, 50):  # parking bay lines
            cv2.line(bg, (x, 150), (x + 20, H), (210, 210, 210), 2)
        cv2.rectangle(bg, (0, 0), (W, 70), (130, 150, 160), -1)  # building
        for x in range(15, W, 40):
            cv2.rectangle(bg, (x, 15), (x + 20, 45), (80, 60, 40), -1)
        cv2.rectangle(bg, (230, 95), (300, 135), (60, 60, 150), -1)  # a parked car
    elif camera == "gate":
        bg[:] = (80, 130, 90)
        cv2.rectangle(bg, (0, 0), (W, 80), (150, 160, 170), -1)  # wall
        cv2.rectangle(bg, (120, 20), (200, 80), (60, 60, 60), -1)  # gate
        cv2.rectangle(bg, (0, 150), (W, H), (120, 120, 115), -1)  # pavement
    else:  # corridor
        bg[:] = (170, 175, 180)
        pts = np.array([[0, H], [110, 60], [210, 60], [W, H]], np.int32)
        cv2.fillPoly(bg, [pts], (120, 125, 135))
        for y in (90, 130, 180):
            cv2.line(bg, (0, y), (W, y), (150, 150, 150), 1)
    noise = rng.normal(0, 4, bg.shape)
    return np.clip(bg + noise, 0, 255).astype(np.uint8)


def _draw_person(img: np.ndarray, w: Walker, x: float, y_feet: float, t: int, scale: float) -> tuple:
    """Draw a walker with feet at (x, y_feet); returns its box [x, y, w, h]."""
    h = w.height * scale
    bw = h * 0.36
    x0, top = x - bw / 2, y_feet - h
    head_r = max(2, int(h * 0.09))
    cx = int(x)
    cv2.circle(img, (cx, int(top + head_r)), head_r, w.skin, -1)
    torso = (int(x0 + bw * 0.1), int(top + 2 * head_r), int(x0 + bw * 0.9), int(top + h * 0.58))
    cv2.rectangle(img, torso[:2], torso[2:], w.shirt, -1)
    if w.stripe:
        ym = (torso[1] + torso[3]) // 2
        cv2.line(img, (torso[0], ym), (torso[2], ym), (250, 250, 250), max(1, int(h * 0.04)))
    swing = np.sin(t * 0.6) * bw * 0.25
    hip = int(top + h * 0.58)
    for side in (-1, 1):
        fx = int(x + side * bw * 0.2 + side * swing)
        cv2.line(img, (int(x + side * bw * 0.15), hip), (fx, int(y_feet)), w.trousers, max(2, int(bw * 0.28)))
    if w.bag:
        cv2.rectangle(img, (int(x0 + bw), int(top + h * 0.35)), (int(x0 + bw * 1.3), int(top + h * 0.6)),
                      (30, 60, 90), -1)
    return [x0, top, bw * 1.3 if w.bag else bw, h]


def _cast_shadow(img: np.ndarray, box, direction: float, strength: float = 0.45) -> None:
    """A hard cast shadow: a dark soft-edged polygon from the feet along ``direction``."""
    x, y, bw, h = box
    feet = np.array([x + bw / 2, y + h])
    d = np.array([np.cos(direction), np.sin(direction) * 0.35]) * h * 0.9
    poly = np.array([feet + (-bw / 3, 0), feet + (bw / 3, 0), feet + d + (bw / 4, 0), feet + d - (bw / 4, 0)],
                    np.int32)
    mask = np.zeros(img.shape[:2], np.float32)
    cv2.fillPoly(mask, [poly], 1.0)
    mask = cv2.GaussianBlur(mask, (5, 5), 0)[..., None]
    img[:] = (img * (1 - strength * mask)).astype(np.uint8)


def _night(img: np.ndarray, rng: np.random.Generator, lamp: tuple[int, int]) -> np.ndarray:
    f = img.astype(np.float32) / 255.0
    f = np.power(f, 2.2) * 0.45
    yy, xx = np.mgrid[0:H, 0:W]
    spot = np.exp(-(((xx - lamp[0]) ** 2) + ((yy - lamp[1]) ** 2)) / (2 * 70.0 ** 2))[..., None]
    f = f * (0.35 + 1.2 * spot) + rng.normal(0, 0.025, f.shape)
    f[..., 0] *= 1.15  # sodium lamps / IR cast: bluish-green tint
    return np.clip(f * 255, 0, 255).astype(np.uint8)


def _paths(rng: np.random.Generator, walkers: list[Walker], loiterers: set[int]):
    """Per walker: (enter frame, start point, velocity) — loiterers pace slowly."""
    plans = {}
    for w in walkers:
        start = int(rng.integers(0, FRAMES // 2))
        y = float(rng.uniform(150, 225))
        left = bool(rng.integers(0, 2))
        speed = float(rng.uniform(2.5, 4.0))
        if w.ident in loiterers:
            plans[w.ident] = (0, (float(rng.uniform(80, 240)), y), 0.8, True)
        else:
            plans[w.ident] = (start, (-20.0 if left else W + 20.0, y), speed if left else -speed, False)
    return plans


SEQUENCES = [  # (name, camera, night, walker ids, loiterers, shadow direction, pillar x)
    ("parking-day", "parking", False, [1, 2, 3, 4, 5, 6, 7], {3}, 0.4, 150),
    ("parking-night", "parking", True, [1, 2, 8, 9, 10, 11], {9}, None, 150),
    ("gate-day", "gate", False, [4, 5, 8, 12, 13, 14], {13}, 2.6, None),
    ("gate-night", "gate", True, [3, 6, 7, 12, 15], set(), None, None),
    ("corridor-day", "corridor", False, [10, 11, 14, 15, 16, 2], {16}, 0.9, 60),
    ("corridor-night", "corridor", True, [1, 13, 16, 9, 5], {1}, None, 60),
]


def write_sequence(out: Path, name: str, camera: str, night: bool, ids: list[int], loiterers: set[int],
                   shadow_dir: float | None, pillar_x: int | None, walkers: dict[int, Walker],
                   rng: np.random.Generator) -> Path:
    seq = out / name
    (seq / "gt").mkdir(parents=True, exist_ok=True)
    bg = _background(camera, np.random.default_rng(hash(camera) % 2**32))
    if shadow_dir is not None:  # a static building shadow across the ground
        pts = np.array([[0, 160], [W // 2, 140], [W // 2 + 40, H], [0, H]], np.int32)
        m = np.zeros((H, W), np.float32)
        cv2.fillPoly(m, [pts], 1.0)
        bg = (bg * (1 - 0.5 * cv2.GaussianBlur(m, (7, 7), 0)[..., None])).astype(np.uint8)
    plans = _paths(rng, [walkers[i] for i in ids], loiterers)
    tmp = seq / f".{name}.tmp.mp4"
    vw = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
    rows = []
    for t in range(FRAMES):
        img = bg.copy()
        people = []
        for wid in ids:
            start, (x0, y), v, loiter = plans[wid]
            if t < start:
                continue
            dt = t - start
            x = x0 + (40 * np.sin(dt * 0.05) if loiter else v * dt)
            if x < -15 or x > W + 15:
                continue
            people.append((y, wid, x))
        for y, wid, x in sorted(people):  # far (higher on screen) first
            scale = 0.6 + 0.5 * (y - 140) / 100
            box = _draw_person(img, walkers[wid], x, y, t, scale)
            if shadow_dir is not None:
                _cast_shadow(img, box, shadow_dir)
            bx, by, bw, bh = box
            x1, y1 = max(0.0, bx), max(0.0, by)
            x2, y2 = min(W, bx + bw), min(H, by + bh)
            if x2 - x1 >= 8 and y2 - y1 >= 16:
                rows.append(f"{t + 1},{wid},{x1:.1f},{y1:.1f},{x2 - x1:.1f},{y2 - y1:.1f},1,-1,-1,-1")
        if pillar_x is not None:  # a pillar in front: partial occlusion
            cv2.rectangle(img, (pillar_x, 40), (pillar_x + 14, H), (70, 70, 80), -1)
        if night:
            img = _night(img, rng, lamp=(W // 3, 60))
        vw.write(img)
    vw.release()
    os.replace(tmp, seq / f"{name}.mp4")
    (seq / "gt" / "gt.txt").write_text("\n".join(rows) + "\n")
    (seq / "seqinfo.ini").write_text(
        f"[Sequence]\nname={name}\nimDir=img1\nframeRate={FPS}\nseqLength={FRAMES}\n"
        f"imWidth={W}\nimHeight={H}\nimExt=.jpg\ncamera={camera}\nidentityScope=global\n"
        f"synthetic=true\nnight={str(night).lower()}\n")
    return seq


def generate(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write the synthetic MOT sequences under ``out``; returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    walkers = {w.ident: w for w in _walkers(rng)}
    for name, camera, night, ids, loit, sdir, px in SEQUENCES:
        write_sequence(out, name, camera, night, ids, loit, sdir, px, walkers, rng)
    return out
