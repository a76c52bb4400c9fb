"""data_prep.canvas: boxes land exactly where the crop's pixels went."""
import numpy as np
import pytest

from hybridps.data_prep.canvas import (CONSTANT_FILL, apply_placement, expand_resize, plan_expand_resize,
                              plan_random_paste, random_paste)

RED = (230, 20, 20)
BLUE = (20, 20, 230)


def crop_with_inner_box(w=64, h=128):
    """A red crop with a blue inner rectangle; returns (img, whole box, inner box)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = RED
    inner = [16, 32, 48, 96]
    img[inner[1]:inner[3], inner[0]:inner[2]] = BLUE
    return img, [0, 0, w, h], inner


def nonfill_bbox(canvas, fill):
    mask = np.any(np.abs(canvas.astype(int) - np.array(fill)) > 30, axis=2)
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def colour_bbox(canvas, colour, tol=40):
    mask = np.all(np.abs(canvas.astype(int) - np.array(colour)) < tol, axis=2)
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", range(6))
def test_expand_resize_box_maps_onto_crop_pixels(seed):
    img, whole, inner = crop_with_inner_box()
    canvas, boxes = expand_resize(img, [whole, inner], np.random.default_rng(seed), out_size=(200, 300),
                                  ratio_range=(1.2, 3.0), fill="constant")
    assert canvas.shape == (300, 200, 3) and canvas.dtype == np.uint8
    # The whole-crop box is exactly the non-fill area (integer region, no slack).
    assert nonfill_bbox(canvas, CONSTANT_FILL) == [int(round(v)) for v in boxes[0]]
    assert np.allclose(boxes[0], np.round(boxes[0]))
    # The inner box matches the blue pixels up to one pixel of bilinear blur.
    assert np.abs(np.array(colour_bbox(canvas, BLUE)) - boxes[1]).max() <= 1.0
    # Pixels inside the mapped whole box are crop pixels (red or blue), outside are fill.
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    inside = canvas[y0:y1, x0:x1].astype(int)
    assert (np.abs(inside - CONSTANT_FILL).max(axis=2) > 30).all()


def test_expand_resize_ratio_range_honoured():
    lo, hi = 1.5, 2.5
    ratios = []
    for seed in range(200):
        p = plan_expand_resize((64, 128), np.random.default_rng(seed), (256, 512), (lo, hi))
        x0, y0, x1, y1 = p.region
        assert lo <= p.ratio[0] <= hi and p.ratio[0] == p.ratio[1]
        # crop and output have the same aspect here: canvas side / crop side == r on both axes
        assert abs(256 / (x1 - x0) - p.ratio[0]) / p.ratio[0] < 0.02
        assert abs(512 / (y1 - y0) - p.ratio[1]) / p.ratio[1] < 0.02
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 512
        ratios.append(p.ratio[0])
    assert min(ratios) < lo + 0.1 and max(ratios) > hi - 0.1                  # spans the range


@pytest.mark.parametrize("src", [(40, 100), (100, 40), (64, 64), (31, 97)])
def test_expand_resize_keeps_the_person_aspect_ratio(src):
    """One scale for both axes: a 0.40-aspect crop stays 0.40 on any canvas (up to the pixel
    snap), whatever the canvas aspect; it used to come out anywhere from 0.17 to 1.43."""
    want = src[0] / src[1]
    for seed in range(100):
        for out in ((80, 160), (256, 512), (300, 200)):
            p = plan_expand_resize(src, np.random.default_rng(seed), out, (1.0, 3.0))
            x0, y0, x1, y1 = p.region
            w, h = x1 - x0, y1 - y0
            # rounding each side to whole pixels moves the aspect by at most one pixel per side
            assert (w - 1) / (h + 1) <= want <= (w + 1) / max(h - 1, 1), (src, out, p.region)
            assert 0 <= x0 < x1 <= out[0] and 0 <= y0 < y1 <= out[1]


def test_expand_resize_ratio_one_fills_canvas():
    img, whole, _ = crop_with_inner_box()
    canvas, boxes = expand_resize(img, [whole], 0, out_size=(32, 64), ratio_range=(1.0, 1.0))
    assert boxes.tolist() == [[0, 0, 32, 64]]
    assert canvas.shape == (64, 32, 3)


def test_seeded_determinism():
    img, whole, inner = crop_with_inner_box()
    a = expand_resize(img, [whole, inner], np.random.default_rng(7), (128, 256))
    b = expand_resize(img, [whole, inner], np.random.default_rng(7), (128, 256))
    c = expand_resize(img, [whole, inner], np.random.default_rng(8), (128, 256))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    p = random_paste(img, [whole], np.random.default_rng(7), (256, 256), (0.5, 1.0))
    q = random_paste(img, [whole], np.random.default_rng(7), (256, 256), (0.5, 1.0))
    assert np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1])


@pytest.mark.parametrize("seed", range(4))
def test_random_paste_native_size_and_exact_box(seed):
    img, whole, inner = crop_with_inner_box()
    canvas, boxes = random_paste(img, [whole, inner], np.random.default_rng(seed), out_size=(300, 200), fill="constant")
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    assert (x1 - x0, y1 - y0) == (64, 128)                  # pasted at native size, no stretch
    assert np.array_equal(canvas[y0:y1, x0:x1], img)          # the very same pixels
    assert nonfill_bbox(canvas, CONSTANT_FILL) == [x0, y0, x1, y1]
    assert boxes[1].tolist() == [x0 + 16, y0 + 32, x0 + 48, y0 + 96]


def test_random_paste_downscales_when_too_big():
    img, whole, _ = crop_with_inner_box(w=64, h=128)
    canvas, boxes = random_paste(img, [whole], 1, out_size=(100, 64), fill="constant")
    x0, y0, x1, y1 = boxes[0]
    assert (y1 - y0) == 64 and abs((x1 - x0) - 32) <= 1      # fitted by height, aspect kept
    assert canvas.shape == (64, 100, 3)
    for seed in range(50):
        p = plan_random_paste((64, 128), seed, (512, 512), (0.5, 0.8))
        assert 0.5 <= p.scale <= 0.8
        assert abs((p.region[3] - p.region[1]) - round(128 * p.scale)) <= 1


@pytest.mark.parametrize("fill", ["mean", "constant", "replicate"])
def test_fills(fill):
    img, whole, _ = crop_with_inner_box()
    p = plan_expand_resize((64, 128), 5, (128, 256), (2.0, 2.0), fill=fill)
    canvas, _ = apply_placement(img, [whole], p)
    x0, y0, x1, y1 = p.region
    outside = np.ones(canvas.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    vals = canvas[outside]
    if fill == "constant":
        assert (vals == CONSTANT_FILL).all()
    elif fill == "mean":
        assert np.abs(vals.astype(int) - img.reshape(-1, 3).mean(0)).max() <= 1
    else:  # replicate: border rows/cols of the crop (all red here) continue outward
        assert np.abs(vals.astype(int) - RED).max() <= 2


def test_bad_arguments_raise_clearly():
    img, whole, _ = crop_with_inner_box()
    with pytest.raises(ValueError, match="ratio_range"):
        expand_resize(img, [whole], 0, ratio_range=(0.5, 2.0))
    with pytest.raises(ValueError, match="fill"):
        expand_resize(img, [whole], 0, fill="zeros")
    with pytest.raises(ValueError, match="HxWx3"):
        apply_placement(img[..., 0], [whole], plan_expand_resize((64, 128), 0))
