"""Procedural people and scenes for the synthetic world.

The synthetic copies of every dataset are drawn with these primitives so the
images carry a signal a model can learn from:

* an identity's look (clothing colours, pattern, bag, build) is a pure
  function of ``(world seed, namespace, identity)``, so the same person looks
  the same in every image and camera (only lighting changes per camera);
* each dataset has its own :class:`Style` (background palette and texture,
  colour cast, noise, blur) -- the domain gap the alignment modules close;
* scenes hold several people at different scales, drawn far-to-near so that
  nearer people and street furniture occlude the others.

Pure numpy; no file I/O here.
"""
from __future__ import annotations

import contextvars
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np


def stable_rng(*parts) -> np.random.Generator:
    """A generator seeded by a hash of ``parts`` (stable across runs/processes)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


# --------------------------------------------------------------------------- looks
_PALETTE = np.array(
    [
        [200, 30, 30], [30, 160, 40], [30, 60, 200], [230, 200, 30], [240, 240, 240],
        [25, 25, 25], [150, 60, 180], [240, 130, 20], [20, 170, 170], [120, 70, 30],
        [250, 120, 170], [90, 90, 90], [0, 90, 60], [140, 170, 255], [180, 0, 80],
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Appearance:
    top: tuple
    top2: tuple          # second colour for patterned tops
    pattern: int         # 0 plain, 1 horizontal stripes, 2 vertical split
    bottom: tuple
    skin: tuple
    hair: tuple
    shoes: tuple
    bag: tuple | None    # bag colour or None
    build: float         # width factor 0.8 .. 1.2


def appearance_for(seed: int, namespace: str, identity) -> Appearance:
    r = stable_rng("appearance", seed, namespace, identity)
    pick = lambda: tuple(int(c) for c in np.clip(_PALETTE[r.integers(len(_PALETTE))] + r.normal(0, 12, 3), 0, 255))
    skin_base = np.array([[255, 220, 185], [225, 170, 130], [170, 115, 80], [110, 70, 45]], np.float32)
    skin = tuple(int(c) for c in skin_base[r.integers(4)])
    hair = tuple(int(c) for c in np.clip(np.array([40, 30, 20]) * r.uniform(0.5, 3.0), 0, 255))
    bag = pick() if r.random() < 0.4 else None
    return Appearance(
        top=pick(), top2=pick(), pattern=int(r.integers(3)), bottom=pick(), skin=skin,
        hair=hair, shoes=pick(), bag=bag, build=float(r.uniform(0.8, 1.2)),
    )


# --------------------------------------------------------------------------- styles
@dataclass(frozen=True)
class Style:
    name: str
    bg_a: tuple            # two background colours the texture mixes
    bg_b: tuple
    texture: str           # gradient | stripes | blocks | noise | floor
    gain: tuple            # per-channel colour cast applied to the whole image
    noise: float           # gaussian pixel noise sigma
    blur: int              # box-blur radius (0 = sharp)
    brightness: float = 1.0


STYLES: dict[str, Style] = {
    "crowdhuman": Style("crowdhuman", (150, 110, 80), (210, 180, 140), "blocks", (1.08, 1.0, 0.88), 6.0, 0),
    "ecp": Style("ecp", (95, 100, 110), (160, 165, 175), "floor", (0.92, 0.97, 1.1), 4.0, 0),
    "ecp_night": Style("ecp_night", (20, 22, 40), (60, 60, 90), "floor", (0.9, 0.9, 1.2), 8.0, 0, 0.55),
    "msmt17": Style("msmt17", (70, 120, 60), (150, 190, 120), "gradient", (0.95, 1.08, 0.95), 5.0, 1),
    "cuhk03": Style("cuhk03", (120, 130, 170), (190, 200, 230), "stripes", (0.9, 0.95, 1.15), 7.0, 1),
    "luperson": Style("luperson", (170, 80, 60), (90, 150, 200), "noise", (1.05, 1.0, 1.0), 9.0, 0),
    "market1501": Style("market1501", (170, 160, 100), (220, 210, 160), "gradient", (1.1, 1.05, 0.85), 6.0, 1),
    "cuhk_sysu": Style("cuhk_sysu", (110, 90, 120), (200, 170, 150), "blocks", (1.0, 0.97, 1.03), 5.0, 0),
    "prw": Style("prw", (120, 125, 115), (175, 180, 165), "floor", (0.97, 1.03, 0.98), 5.0, 0),
    "posetrack21": Style("posetrack21", (60, 110, 150), (200, 190, 170), "stripes", (1.02, 1.0, 0.97), 6.0, 0),
    "coco": Style("coco", (140, 140, 120), (90, 120, 160), "blocks", (1.04, 1.0, 0.95), 5.0, 0),
    "crops": Style("crops", (100, 110, 90), (180, 170, 190), "gradient", (0.97, 1.0, 1.06), 6.0, 1),
}


# --------------------------------------------------------------------------- the domain-gap knob
#: The style every other dataset is measured against: the fine-tuning target of the benchmarks.
GAP_REFERENCE = "prw"
_GAP = contextvars.ContextVar("hybridps_domain_gap", default=1.0)


@contextmanager
def domain_gap(value: float):
    """Render every dataset with its style moved ``value`` of the way from the reference
    (target) style to its own: 0 = every dataset looks like the target, 1 = the built-in
    styles, > 1 = exaggerated differences (stronger colour casts, brightness, noise and blur
    that a model can overfit to).  The identity looks and scene layouts do not change."""
    if not value >= 0:
        raise ValueError(f"domain gap must be >= 0, got {value}")
    token = _GAP.set(float(value))
    try:
        yield
    finally:
        _GAP.reset(token)


def effective_style(style: Style) -> Style:
    """``style`` under the current domain gap (see :func:`domain_gap`)."""
    g = _GAP.get()
    ref = STYLES[GAP_REFERENCE]
    if g == 1.0 or style.name == GAP_REFERENCE:
        return style

    def mix(own, target, lo, hi):
        return tuple(float(np.clip(t + g * (o - t), lo, hi)) for o, t in zip(own, target))

    return replace(
        style,
        bg_a=mix(style.bg_a, ref.bg_a, 0, 255), bg_b=mix(style.bg_b, ref.bg_b, 0, 255),
        texture=style.texture if g > 0 else ref.texture,
        gain=mix(style.gain, ref.gain, 0.2, 3.0),
        noise=max(0.0, ref.noise + g * (style.noise - ref.noise)),
        blur=int(round(max(0.0, ref.blur + g * (style.blur - ref.blur)))),
        brightness=float(np.clip(ref.brightness + g * (style.brightness - ref.brightness), 0.1, 3.0)),
    )


def _background(style: Style, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    a = np.array(style.bg_a, np.float32)
    b = np.array(style.bg_b, np.float32)
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    if style.texture == "gradient":
        t = np.clip(0.6 * yy + 0.4 * xx * rng.uniform(0.5, 1.5), 0, 1)
    elif style.texture == "stripes":
        period = rng.uniform(8, 24)
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (xx * w) / period + rng.uniform(0, 6))) * np.ones_like(yy)
    elif style.texture == "blocks":
        bs = int(rng.integers(10, 30))
        grid = rng.random(((h + bs - 1) // bs, (w + bs - 1) // bs)).astype(np.float32)
        t = np.kron(grid, np.ones((bs, bs), np.float32))[:h, :w]
    elif style.texture == "floor":
        horizon = rng.uniform(0.3, 0.5)
        t = np.where(yy < horizon, 0.15 * np.ones_like(xx), 0.6 + 0.4 * (yy - horizon)) * np.ones_like(xx)
        t = t + 0.15 * (np.sin(xx * rng.uniform(20, 60)) > 0.9)
    else:  # noise
        small = rng.random((max(2, h // 8), max(2, w // 8))).astype(np.float32)
        t = np.kron(small, np.ones((8, 8), np.float32))[:h, :w]
        if t.shape != (h, w):
            t = np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1])), mode="edge")
    t = np.clip(t, 0, 1)[..., None]
    return a * (1 - t) + b * t


def _ellipse(canvas, cx, cy, rx, ry, color):
    h, w = canvas.shape[:2]
    x0, x1 = int(max(0, np.floor(cx - rx))), int(min(w, np.ceil(cx + rx) + 1))
    y0, y1 = int(max(0, np.floor(cy - ry))), int(min(h, np.ceil(cy + ry) + 1))
    if x1 <= x0 or y1 <= y0 or rx <= 0 or ry <= 0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    canvas[y0:y1, x0:x1][m] = color


def _rect(canvas, x1, y1, x2, y2, color):
    h, w = canvas.shape[:2]
    a, b = int(max(0, round(x1))), int(min(w, round(x2)))
    c, d = int(max(0, round(y1))), int(min(h, round(y2)))
    if b > a and d > c:
        canvas[c:d, a:b] = color


def draw_person(canvas: np.ndarray, box, look: Appearance, rng: np.random.Generator | None = None) -> None:
    """Draw a standing person filling ``box`` (x1, y1, x2, y2; may leave the
    canvas: parts outside are clipped)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = x2 - x1, y2 - y1
    if bw < 2 or bh < 4:
        return
    cx = (x1 + x2) / 2
    sway = 0.0 if rng is None else rng.uniform(-0.04, 0.04) * bw
    body_w = bw * 0.62 * look.build / 1.2
    # legs
    leg_top, leg_bot = y1 + 0.55 * bh, y2 - 0.04 * bh
    _rect(canvas, cx - body_w / 2, leg_top, cx - body_w * 0.05, leg_bot, look.bottom)
    _rect(canvas, cx + body_w * 0.05 + sway, leg_top, cx + body_w / 2 + sway, leg_bot, look.bottom)
    _rect(canvas, cx - body_w / 2, leg_bot, cx - body_w * 0.02, y2, look.shoes)
    _rect(canvas, cx + body_w * 0.02 + sway, leg_bot, cx + body_w / 2 + sway, y2, look.shoes)
    # torso + arms
    t_top, t_bot = y1 + 0.19 * bh, y1 + 0.57 * bh
    _rect(canvas, cx - body_w / 2, t_top, cx + body_w / 2, t_bot, look.top)
    if look.pattern == 1:
        n = 4
        for k in range(n):
            if k % 2:
                ya = t_top + (t_bot - t_top) * k / n
                _rect(canvas, cx - body_w / 2, ya, cx + body_w / 2, ya + (t_bot - t_top) / n, look.top2)
    elif look.pattern == 2:
        _rect(canvas, cx, t_top, cx + body_w / 2, t_bot, look.top2)
    arm_w = max(1.0, bw * 0.12)
    _rect(canvas, cx - body_w / 2 - arm_w, t_top + 0.02 * bh, cx - body_w / 2, y1 + 0.52 * bh, look.top)
    _rect(canvas, cx + body_w / 2, t_top + 0.02 * bh, cx + body_w / 2 + arm_w, y1 + 0.52 * bh, look.top)
    _rect(canvas, cx - body_w / 2 - arm_w, y1 + 0.52 * bh, cx - body_w / 2, y1 + 0.57 * bh, look.skin)
    _rect(canvas, cx + body_w / 2, y1 + 0.52 * bh, cx + body_w / 2 + arm_w, y1 + 0.57 * bh, look.skin)
    if look.bag is not None:
        _rect(canvas, cx + body_w / 2, y1 + 0.35 * bh, cx + body_w / 2 + arm_w * 1.8, y1 + 0.5 * bh, look.bag)
    # head
    hr = bh * 0.09
    _ellipse(canvas, cx, y1 + 0.1 * bh, hr * 0.85, hr, look.skin)
    _ellipse(canvas, cx, y1 + 0.06 * bh, hr * 0.9, hr * 0.55, look.hair)


def _finish(img: np.ndarray, style: Style, rng: np.random.Generator, light: float) -> np.ndarray:
    img = img * np.array(style.gain, np.float32) * style.brightness * light
    if style.blur:
        r = style.blur
        k = 2 * r + 1
        pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
        c = pad.cumsum(0).cumsum(1)
        c = np.pad(c, ((1, 0), (1, 0), (0, 0)))
        img = (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)
    img = img + rng.normal(0, style.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def camera_light(seed: int, namespace: str, camera) -> float:
    """Per-camera illumination factor (0.8 .. 1.15)."""
    return float(stable_rng("camera", seed, namespace, camera).uniform(0.8, 1.15))


def render_scene(
    style: Style,
    width: int,
    height: int,
    people: list[tuple[Appearance, list[float]]],
    rng: np.random.Generator,
    occluders: int = 0,
    light: float = 1.0,
) -> np.ndarray:
    """A scene with ``people`` (look, xyxy box).  People are drawn in order of
    their bottom edge (far first), then ``occluders`` poles/boxes on top.  The style is
    taken under the current domain gap (:func:`domain_gap`)."""
    style = effective_style(style)
    img = _background(style, height, width, rng)
    for look, box in sorted(people, key=lambda p: p[1][3]):
        draw_person(img, box, look, rng)
    for _ in range(occluders):
        kind = rng.integers(2)
        col = tuple(int(c) for c in rng.integers(30, 120, 3))
        if kind == 0:  # pole
            x = rng.uniform(0, width)
            _rect(img, x, rng.uniform(0, height * 0.3), x + max(2.0, width * 0.02), height, col)
        else:  # low box (car / bench)
            x = rng.uniform(0, width * 0.8)
            y = rng.uniform(height * 0.6, height * 0.85)
            _rect(img, x, y, x + rng.uniform(0.1, 0.3) * width, height, col)
    return _finish(img, style, rng, light)


def render_crop(
    style: Style, look: Appearance, width: int, height: int, rng: np.random.Generator, light: float = 1.0
) -> np.ndarray:
    """A re-ID crop: one person filling most of the frame, slightly jittered."""
    mx, my = rng.uniform(0.0, 0.12) * width, rng.uniform(0.0, 0.06) * height
    box = [mx, my, width - rng.uniform(0.0, 0.12) * width, height - rng.uniform(0.0, 0.05) * height]
    return render_scene(style, width, height, [(look, box)], rng, occluders=0, light=light)


def place_people(
    rng: np.random.Generator,
    width: int,
    height: int,
    n: int,
    min_h: float = 0.25,
    max_h: float = 0.8,
    allow_outside: bool = False,
) -> list[list[float]]:
    """Random standing-person boxes (aspect ~0.4) at different scales.  With
    ``allow_outside`` a box may cross the image border (amodal boxes)."""
    boxes = []
    for _ in range(n):
        h = rng.uniform(min_h, max_h) * height
        w = h * rng.uniform(0.35, 0.45)
        y2 = rng.uniform(max(h, height * 0.45), height * (1.08 if allow_outside else 1.0))
        if allow_outside:
            x1 = rng.uniform(-0.3 * w, width - 0.7 * w)
        else:
            x1 = rng.uniform(0, max(1.0, width - w))
        boxes.append([float(x1), float(y2 - h), float(x1 + w), float(y2)])
    return boxes


def encode(img: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(img).save(buf, format=fmt.upper())
    return buf.getvalue()
