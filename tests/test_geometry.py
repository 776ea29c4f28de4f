"""Tests for objloader.cam.geometry: boxes and background rectangles from masks.

The fast implementations are checked against independent slow ones: a brute-force search over
every rectangle (2-D prefix sums) for the background rectangle, and OpenCV's
connectedComponentsWithStats (plus explicit hole filling) for the object boxes.
"""

import cv2
import numpy as np
import pytest

from objloader.cam import (
    bg_rect,
    box_iou,
    largest_empty_rect,
    mask_to_boxes,
    pad_boxes,
    strip_bg_rect,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def to_pixels(rect, h, w):
    """Normalised (x0, y0, x1, y1) -> integer pixel edges, asserting they are on the grid."""
    rect = np.asarray(rect, np.float64)
    px = rect * np.array([w, h, w, h] * (rect.size // 4)).reshape(rect.shape)
    r = np.round(px).astype(int)
    np.testing.assert_allclose(px, r, atol=1e-4)
    return r


def brute_max_empty_area(bg):
    """Area of the largest all-background rectangle, trying every rectangle: O(H^2 W^2)."""
    h, w = bg.shape
    s = np.zeros((h + 1, w + 1), np.int64)
    s[1:, 1:] = (~bg).astype(np.int64).cumsum(0).cumsum(1)
    y0 = np.arange(h + 1)[:, None, None, None]
    y1 = np.arange(h + 1)[None, :, None, None]
    x0 = np.arange(w + 1)[None, None, :, None]
    x1 = np.arange(w + 1)[None, None, None, :]
    fg_count = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
    valid = (y1 > y0) & (x1 > x0) & (fg_count == 0)
    return int(np.where(valid, (y1 - y0) * (x1 - x0), 0).max())


def random_mask(rng, kind, h, w):
    """A uint8 mask of the given kind; soft values are used so thresholds matter."""
    m = np.zeros((h, w), np.uint8)
    if kind == "empty":
        pass
    elif kind == "full":
        m[:] = 255
    elif kind == "single_fg":
        m[rng.integers(h), rng.integers(w)] = 255
    elif kind == "single_bg":
        m[:] = 255
        m[rng.integers(h), rng.integers(w)] = 0
    elif kind == "lines":
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                m[rng.integers(h), :] = 255
            else:
                m[:, rng.integers(w)] = 255
    elif kind == "diagonal":
        for i in range(min(h, w)):
            m[i, i] = 255
    elif kind == "blobs":
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.integers(h), rng.integers(w)
            r = int(rng.integers(1, max(2, min(h, w) // 2 + 1)))
            if rng.random() < 0.5:
                cv2.circle(m, (int(cx), int(cy)), r, 255, -1)
            else:
                m[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = 255
    elif kind == "noise":
        m[rng.random((h, w)) < rng.uniform(0.02, 0.6)] = 255
    elif kind == "soft":
        m[:] = rng.integers(0, 256, (h, w))
    else:
        raise AssertionError(kind)
    return m


KINDS = ["empty", "full", "single_fg", "single_bg", "lines", "diagonal", "blobs", "noise", "soft"]


def filled_components(fg):
    """Independent reference for mask_to_boxes: 8-connected foreground components with their
    holes filled (holes = background not 4-connected to the image border), as CC stats rows
    (x, y, w, h, area)."""
    _, lab = cv2.connectedComponents((~fg).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    filled = fg | (~fg & ~np.isin(lab, border))
    _, _, stats, _ = cv2.connectedComponentsWithStats(filled.astype(np.uint8), connectivity=8)
    return stats[1:]


# --------------------------------------------------------------------------------------------
# largest_empty_rect
# --------------------------------------------------------------------------------------------


def test_largest_empty_rect_matches_brute_force():
    rng = np.random.default_rng(1234)
    for i in range(216):
        kind = KINDS[i % len(KINDS)]
        h, w = (int(v) for v in rng.integers(1, 25, size=2))
        m = random_mask(rng, kind, h, w)
        threshold = [0.2, 0.5, float(rng.uniform(0.05, 0.95))][i % 3]
        bg = m < threshold * 255

        rect = largest_empty_rect(m, threshold=threshold)
        assert rect.dtype == np.float32 and rect.shape == (4,)
        expected = brute_max_empty_area(bg)
        x0, y0, x1, y1 = to_pixels(rect, h, w)
        area = (x1 - x0) * (y1 - y0)
        assert area == expected, (kind, h, w, threshold)
        if expected == 0:
            assert not bg.any() and np.all(rect == 0)
        else:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert bg[y0:y1, x0:x1].all(), "rectangle contains foreground"
        # Deterministic: same input, same answer.
        np.testing.assert_array_equal(rect, largest_empty_rect(m.copy(), threshold=threshold))


def test_largest_empty_rect_special_cases():
    assert np.all(largest_empty_rect(np.full((5, 7), 255, np.uint8)) == 0)
    np.testing.assert_array_equal(largest_empty_rect(np.zeros((5, 7), np.uint8)), [0, 0, 1, 1])
    # Pixel-edge convention: background is exactly columns 3..5 of a width-10 image.
    m = np.full((4, 10), 255, np.uint8)
    m[:, 3:6] = 0
    np.testing.assert_allclose(largest_empty_rect(m), [0.3, 0.0, 0.6, 1.0], atol=1e-7)
    # A single background pixel.
    m = np.full((3, 4), 255, np.uint8)
    m[2, 1] = 0
    np.testing.assert_allclose(largest_empty_rect(m), [1 / 4, 2 / 3, 2 / 4, 1.0], atol=1e-7)
    # bool masks: True is object.
    b = np.zeros((4, 4), bool)
    b[:, 0] = True
    np.testing.assert_allclose(largest_empty_rect(b), [0.25, 0, 1, 1], atol=1e-7)


def test_largest_empty_rect_soft_threshold():
    # threshold 0.2 -> cut at exactly 51: 50 is background, 51 is foreground.
    m = np.zeros((2, 4), np.uint8)
    m[:, 2:] = 50
    np.testing.assert_allclose(largest_empty_rect(m, threshold=0.2), [0, 0, 1, 1])
    m[:, 2:] = 51
    np.testing.assert_allclose(largest_empty_rect(m, threshold=0.2), [0, 0, 0.5, 1])


def test_threshold_at_integer_levels():
    # A threshold of k / 255 makes the value k object (>=), for every level k.
    for k in range(1, 256):
        m = np.full((2, 3), k, np.uint8)
        assert not largest_empty_rect(m, threshold=k / 255).any()
        assert mask_to_boxes(m, threshold=k / 255).shape == (1, 4)
        m[0, 0] = k - 1
        np.testing.assert_allclose(
            largest_empty_rect(m, threshold=k / 255), [0, 0, 1 / 3, 1 / 2], atol=1e-7
        )


def test_mask_validation():
    with pytest.raises(ValueError):
        largest_empty_rect(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(TypeError):
        largest_empty_rect(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        mask_to_boxes(np.zeros((2, 2), np.uint8), threshold=1.5)


# --------------------------------------------------------------------------------------------
# mask_to_boxes
# --------------------------------------------------------------------------------------------


def test_mask_to_boxes_separated_rectangles():
    """Rectangles at least one pixel apart are exactly the components."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(6, 41, size=2))
        m = np.zeros((h, w), np.uint8)
        rects = []
        for _ in range(200):
            if len(rects) == 6:
                break
            x, y = int(rng.integers(w)), int(rng.integers(h))
            rw, rh = int(rng.integers(1, w - x + 1)), int(rng.integers(1, h - y + 1))
            # 8-connectivity: rectangles must not touch, even at a corner.
            if all(
                x > ox + ow or ox > x + rw or y > oy + oh or oy > y + rh
                for ox, oy, ow, oh in rects
            ):
                rects.append((x, y, rw, rh))
                # Soft values above the 0.5 cut still count as object.
                m[y : y + rh, x : x + rw] = rng.integers(128, 256)
        boxes = mask_to_boxes(m, min_area_frac=0.0, max_boxes=100)
        assert boxes.dtype == np.float32 and boxes.shape == (len(rects), 4)
        got = to_pixels(boxes, h, w)

        expected = np.array([(x, y, x + rw, y + rh) for x, y, rw, rh in rects])
        # Independent check of the expectation itself with OpenCV's labelling.
        fg = (m >= 128).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
        cc = np.array([(x, y, x + bw, y + bh) for x, y, bw, bh, _ in stats[1:]])
        np.testing.assert_array_equal(sorted(map(tuple, cc)), sorted(map(tuple, expected)))
        np.testing.assert_array_equal(sorted(map(tuple, got)), sorted(map(tuple, expected)))

        areas = (got[:, 2] - got[:, 0]) * (got[:, 3] - got[:, 1])
        assert np.all(np.diff(areas) <= 0), "boxes must be sorted by area, largest first"


def test_mask_to_boxes_matches_connected_components():
    """Arbitrary shapes (touching rectangles, discs, noise): same boxes, areas (holes filled),
    filtering and order as the connected-components reference."""
    rng = np.random.default_rng(99)
    for i in range(120):
        h, w = (int(v) for v in rng.integers(1, 33, size=2))
        m = random_mask(rng, ["blobs", "noise", "lines", "soft", "diagonal"][i % 5], h, w)
        min_area_frac = [0.0, 0.01, 0.05][i % 3]
        max_boxes = int(rng.integers(1, 10))
        fg = m >= 128

        stats = filled_components(fg)
        keep = [s for s in stats if s[4] >= min_area_frac * h * w]
        keep.sort(key=lambda s: (-s[4], s[1], s[0]))
        expected = np.array([(x, y, x + bw, y + bh) for x, y, bw, bh, _ in keep[:max_boxes]])

        boxes = mask_to_boxes(m, min_area_frac=min_area_frac, max_boxes=max_boxes)
        got = to_pixels(boxes, h, w).reshape(-1, 4)
        np.testing.assert_array_equal(got, expected.reshape(-1, 4))


def test_mask_to_boxes_empty_full_and_convention():
    assert mask_to_boxes(np.zeros((9, 5), np.uint8)).shape == (0, 4)
    assert mask_to_boxes(np.zeros((9, 5), np.uint8)).dtype == np.float32
    np.testing.assert_array_equal(mask_to_boxes(np.full((9, 5), 255, np.uint8)), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(mask_to_boxes(np.ones((1, 1), bool)), [[0, 0, 1, 1]])
    m = np.zeros((10, 10), np.uint8)
    m[2:4, 3:6] = 255  # columns 3..5, rows 2..3
    np.testing.assert_allclose(mask_to_boxes(m), [[0.3, 0.2, 0.6, 0.4]], atol=1e-7)


def test_mask_to_boxes_margin_and_clipping():
    m = np.zeros((20, 10), np.uint8)
    m[4:8, 2:6] = 255  # 4 x 4 box at x 2..6, y 4..8
    np.testing.assert_allclose(
        mask_to_boxes(m, margin=0.25), [[1 / 10, 3 / 20, 7 / 10, 9 / 20]], atol=1e-7
    )
    # A large margin is clipped to the image.
    np.testing.assert_allclose(mask_to_boxes(m, margin=2.0), [[0, 0, 1, 16 / 20]], atol=1e-7)
    # A box on the border stays inside the image.
    m = np.zeros((10, 10), np.uint8)
    m[0:3, 7:10] = 255
    np.testing.assert_allclose(mask_to_boxes(m, margin=0.5), [[0.55, 0, 1, 0.45]], atol=1e-6)
    with pytest.raises(ValueError):
        mask_to_boxes(m, margin=-0.1)


def test_mask_to_boxes_max_boxes_and_small_components():
    m = np.zeros((40, 40), np.uint8)
    m[0:2, 0:2] = 255  # area 4
    m[10:20, 10:20] = 255  # area 100
    m[30:36, 0:6] = 255  # area 36
    m[30:38, 20:30] = 255  # area 80
    boxes = mask_to_boxes(m, max_boxes=2, min_area_frac=0.0)
    np.testing.assert_allclose(
        to_pixels(boxes, 40, 40), [[10, 10, 20, 20], [20, 30, 30, 38]]
    )
    # 4 / 1600 < 0.01: the tiny component is dropped by default; the rest in area order.
    boxes = mask_to_boxes(m)
    np.testing.assert_allclose(
        to_pixels(boxes, 40, 40), [[10, 10, 20, 20], [20, 30, 30, 38], [0, 30, 6, 36]]
    )
    assert mask_to_boxes(m, max_boxes=0).shape == (0, 4)


def test_mask_to_boxes_holes():
    # A ring with a dot in its hole: one external contour, whose area includes the hole.
    m = np.zeros((20, 20), np.uint8)
    m[2:12, 2:12] = 255
    m[3:11, 3:11] = 0
    m[6, 6] = 255
    np.testing.assert_allclose(to_pixels(mask_to_boxes(m), 20, 20), [[2, 2, 12, 12]])
    # 36 ring pixels < 0.2 * 400 = 80 <= 100 enclosed pixels: kept.
    assert mask_to_boxes(m, min_area_frac=0.2).shape == (1, 4)
    assert mask_to_boxes(m, min_area_frac=0.26).shape == (0, 4)


def test_mask_to_boxes_soft_threshold():
    m = np.zeros((4, 4), np.uint8)
    m[1, 1] = 127
    m[2, 2] = 128
    # cut at 127.5: only the 128 pixel is object.
    np.testing.assert_allclose(mask_to_boxes(m, min_area_frac=0), [[0.5, 0.5, 0.75, 0.75]])
    # cut at 0.3 * 255 = 76.5: both pixels, diagonally adjacent, form one 8-connected object.
    np.testing.assert_allclose(
        mask_to_boxes(m, threshold=0.3, min_area_frac=0), [[0.25, 0.25, 0.75, 0.75]]
    )


def test_pad_boxes():
    boxes = np.arange(12, dtype=np.float32).reshape(3, 4) / 12
    out, n = pad_boxes(boxes, 5)
    assert out.shape == (5, 4) and out.dtype == np.float32 and n == 3
    np.testing.assert_array_equal(out[:3], boxes)
    assert np.all(out[3:] == 0)
    out, n = pad_boxes(boxes, 2)
    assert n == 2 and out.shape == (2, 4)
    np.testing.assert_array_equal(out, boxes[:2])
    out, n = pad_boxes(np.zeros((0, 4), np.float32), 8)
    assert n == 0 and out.shape == (8, 4) and not out.any()


# --------------------------------------------------------------------------------------------
# strip variant and dispatcher
# --------------------------------------------------------------------------------------------


def test_strip_bg_rect_hand_made():
    m = np.zeros((10, 20), np.uint8)
    m[2:5, 3:6] = 255  # fg box x 3..6, y 2..5; strips: left 30, right 140, top 40, bottom 100
    np.testing.assert_allclose(strip_bg_rect(m), [0.3, 0, 1, 1], atol=1e-7)
    m = np.zeros((20, 10), np.uint8)
    m[3:6, 4:7] = 255  # left 80, right 60, top 30, bottom 140
    np.testing.assert_allclose(strip_bg_rect(m), [0, 6 / 20, 1, 1], atol=1e-7)
    m = np.zeros((20, 10), np.uint8)
    m[12:18, 0:10] = 255  # top 120 beats bottom 20
    np.testing.assert_allclose(strip_bg_rect(m), [0, 0, 1, 12 / 20], atol=1e-7)
    m = np.zeros((10, 10), np.uint8)
    m[:, 0:5] = 255  # only the right strip
    np.testing.assert_allclose(strip_bg_rect(m), [0.5, 0, 1, 1], atol=1e-7)


def test_strip_bg_rect_edge_cases():
    # No foreground: the whole image is background.
    np.testing.assert_array_equal(strip_bg_rect(np.zeros((6, 6), np.uint8)), [0, 0, 1, 1])
    # Foreground box covers the image (two opposite corners suffice): no strip.
    m = np.zeros((6, 6), np.uint8)
    m[0, 0] = m[5, 5] = 255
    np.testing.assert_array_equal(strip_bg_rect(m), np.zeros(4))
    # Ties resolve left, right, top, bottom.
    m = np.zeros((9, 9), np.uint8)
    m[3:6, 3:6] = 255
    np.testing.assert_allclose(strip_bg_rect(m), [0, 0, 3 / 9, 1], atol=1e-7)
    m[:, 0:3] = 255  # left strip gone: right, top and bottom are all 27 -> right
    np.testing.assert_allclose(strip_bg_rect(m), [6 / 9, 0, 1, 1], atol=1e-7)
    m = np.zeros((9, 9), np.uint8)
    m[3:6, :] = 255  # left / right empty; top and bottom tie -> top
    np.testing.assert_allclose(strip_bg_rect(m), [0, 0, 1, 3 / 9], atol=1e-7)
    # Soft values: 51 is object at threshold 0.2, 50 is not.
    m = np.zeros((4, 4), np.uint8)
    m[:, 0] = 50
    np.testing.assert_array_equal(strip_bg_rect(m), [0, 0, 1, 1])
    m[:, 0] = 51
    np.testing.assert_allclose(strip_bg_rect(m), [0.25, 0, 1, 1])


def test_strip_is_never_larger_than_maxrect():
    rng = np.random.default_rng(5)
    for i in range(60):
        h, w = (int(v) for v in rng.integers(1, 20, size=2))
        m = random_mask(rng, KINDS[i % len(KINDS)], h, w)
        s, r = strip_bg_rect(m), largest_empty_rect(m)
        area = lambda b: float((b[2] - b[0]) * (b[3] - b[1]))  # noqa: E731
        assert area(s) <= area(r) + 1e-6
        x0, y0, x1, y1 = to_pixels(s, h, w)
        assert (m[y0:y1, x0:x1] < 51).all()


def test_bg_rect_dispatch():
    m = np.zeros((10, 10), np.uint8)
    m[2:4, 2:4] = 255
    np.testing.assert_array_equal(bg_rect(m), largest_empty_rect(m))
    np.testing.assert_array_equal(bg_rect(m, method="maxrect"), largest_empty_rect(m))
    np.testing.assert_array_equal(bg_rect(m, method="strip"), strip_bg_rect(m))
    np.testing.assert_array_equal(
        bg_rect(m, method="strip", threshold=0.9), strip_bg_rect(m, threshold=0.9)
    )
    with pytest.raises(ValueError, match="unknown bg_rect method 'biggest'"):
        bg_rect(m, method="biggest")


# --------------------------------------------------------------------------------------------
# box_iou
# --------------------------------------------------------------------------------------------


def test_box_iou():
    a = np.array([[0, 0, 0.5, 0.5], [0, 0, 1, 1], [0.2, 0.2, 0.2, 0.6]], np.float32)
    b = np.array([[0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5], [0.6, 0.6, 1, 1]], np.float32)
    iou = box_iou(a, b)
    assert iou.shape == (3, 3) and iou.dtype == np.float32
    np.testing.assert_allclose(iou[0], [1, 1 / 3, 0], atol=1e-6)
    np.testing.assert_allclose(iou[1], [0.25, 0.25, 0.16], atol=1e-6)
    np.testing.assert_allclose(iou[2], [0, 0, 0], atol=1e-6)  # zero-area box
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    assert box_iou(np.zeros((1, 4)), np.zeros((1, 4)))[0, 0] == 0  # no 0/0

    # Against a plain loop on random boxes.
    rng = np.random.default_rng(3)
    p, q = np.sort(rng.random((7, 2, 2)), axis=1), np.sort(rng.random((5, 2, 2)), axis=1)
    a = np.stack([p[:, 0, 0], p[:, 0, 1], p[:, 1, 0], p[:, 1, 1]], 1)
    b = np.stack([q[:, 0, 0], q[:, 0, 1], q[:, 1, 0], q[:, 1, 1]], 1)
    iou = box_iou(a, b)
    for i in range(7):
        for j in range(5):
            iw = max(0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            ih = max(0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            inter = iw * ih
            union = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1]) + (b[j, 2] - b[j, 0]) * (
                b[j, 3] - b[j, 1]
            ) - inter
            assert iou[i, j] == pytest.approx(inter / union, abs=1e-6)
