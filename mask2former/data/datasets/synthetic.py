"""A synthetic panoptic world: textured stuff regions and coloured shapes, drawn from a seed.

It needs no download and is small enough for CPU training, so the demo and the tests can run
the whole method end to end. Category ids are 1..10 (0 is void), stuff first:

=====  ==========  =====  ===================================
 id     name       thing  look
=====  ==========  =====  ===================================
 1      sky         no     blue gradient band at the top
 2      grass       no     green, noisy
 3      water       no     cyan with horizontal stripes
 4      sand        no     yellow-brown, speckled
 5      square      yes    red filled square
 6      disc        yes    white filled circle
 7      triangle    yes    magenta filled triangle
 8      ring        yes    orange annulus
 9      cross       yes    black plus sign
 10     bar         yes    purple thin rectangle
=====  ==========  =====  ===================================
"""
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.structures import Instances

__all__ = ["SYNTHETIC_CATEGORIES", "render_sample", "sample_to_model_input"]

SYNTHETIC_CATEGORIES: List[Dict] = [
    {"id": 1, "name": "sky", "isthing": 0, "color": [70, 130, 220]},
    {"id": 2, "name": "grass", "isthing": 0, "color": [60, 160, 60]},
    {"id": 3, "name": "water", "isthing": 0, "color": [40, 190, 200]},
    {"id": 4, "name": "sand", "isthing": 0, "color": [200, 170, 100]},
    {"id": 5, "name": "square", "isthing": 1, "color": [220, 30, 30]},
    {"id": 6, "name": "disc", "isthing": 1, "color": [245, 245, 245]},
    {"id": 7, "name": "triangle", "isthing": 1, "color": [210, 40, 200]},
    {"id": 8, "name": "ring", "isthing": 1, "color": [250, 140, 20]},
    {"id": 9, "name": "cross", "isthing": 1, "color": [15, 15, 15]},
    {"id": 10, "name": "bar", "isthing": 1, "color": [110, 50, 170]},
]
_STUFF = [c for c in SYNTHETIC_CATEGORIES if not c["isthing"]]
_THINGS = [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]


def _stuff_texture(cat_id: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(SYNTHETIC_CATEGORIES[cat_id - 1]["color"], dtype=np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    yy = np.arange(h, dtype=np.float32)[:, None, None]
    if cat_id == 1:  # sky: vertical gradient
        img = img * (0.75 + 0.35 * yy / max(h - 1, 1))
    elif cat_id == 2:  # grass: strong noise
        img = img + rng.normal(0, 25, (h, w, 1))
    elif cat_id == 3:  # water: stripes
        img = img * (0.85 + 0.15 * np.sin(yy * 1.3))
    else:  # sand: speckles
        img = img + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255)


def _shape_mask(cat_id: int, h: int, w: int, cy: float, cx: float, r: float, rng) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if cat_id == 5:  # square
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if cat_id == 6:  # disc
        return dy**2 + dx**2 <= r**2
    if cat_id == 7:  # triangle pointing up
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if cat_id == 8:  # ring
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if cat_id == 9:  # cross
        t = max(r / 3, 1.5)
        return ((np.abs(dy) <= t) & (np.abs(dx) <= r)) | ((np.abs(dx) <= t) & (np.abs(dy) <= r))
    # bar: horizontal or vertical
    if rng.random() < 0.5:
        return (np.abs(dy) <= r / 3) & (np.abs(dx) <= r * 1.4)
    return (np.abs(dx) <= r / 3) & (np.abs(dy) <= r * 1.4)


def render_sample(
    rng: np.random.Generator, height: int = 128, width: int = 128, max_things: int = 4,
    thing_ids: Tuple[int, ...] = tuple(c["id"] for c in _THINGS),
) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Draw one image.

    Args:
        rng: the random generator (the sample is a pure function of its state).
        height, width: image size.
        max_things: at most this many thing instances (at least one).
        thing_ids: thing categories to draw from.
    Returns:
        image uint8 [H, W, 3] RGB; segment map int32 [H, W] with segment ids 1..n (0 = void);
        segments: list of ``{"id", "category_id", "isthing", "area"}``.
    """
    seg = np.zeros((height, width), dtype=np.int32)
    image = np.zeros((height, width, 3), dtype=np.float32)
    segments = []
    # stuff: a horizon splits the image into an upper and a lower region of different stuff
    upper, lower = rng.choice([c["id"] for c in _STUFF], size=2, replace=False)
    horizon = int(rng.integers(height // 4, 3 * height // 4))
    for cat, rows in ((upper, slice(0, horizon)), (lower, slice(horizon, height))):
        n = rows.stop - rows.start
        image[rows] = _stuff_texture(int(cat), n, width, rng)
        segments.append({"id": len(segments) + 1, "category_id": int(cat), "isthing": 0})
        seg[rows] = segments[-1]["id"]
    # things: painted on top, later ones occlude earlier ones
    for _ in range(int(rng.integers(1, max_things + 1))):
        cat = int(rng.choice(thing_ids))
        r = float(rng.uniform(0.08, 0.16) * min(height, width))
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        mask = _shape_mask(cat, height, width, cy, cx, r, rng)
        color = np.array(SYNTHETIC_CATEGORIES[cat - 1]["color"], dtype=np.float32)
        image[mask] = np.clip(color + rng.normal(0, 8, 3), 0, 255)
        segments.append({"id": len(segments) + 1, "category_id": cat, "isthing": 1})
        seg[mask] = segments[-1]["id"]
    # keep only segments that remain visible, with their areas
    visible = []
    for s in segments:
        area = int((seg == s["id"]).sum())
        if area > 0:
            visible.append({**s, "area": area})
    return image.round().astype(np.uint8), seg, visible


def sample_to_model_input(image: np.ndarray, seg: np.ndarray, segments: List[Dict], classes=None) -> Dict:
    """An in-memory training input in the format the ``MaskFormer`` model reads.

    Args:
        image, seg, segments: as returned by :func:`render_sample`.
        classes: category ids to keep as targets (others stay in the image, unlabelled, as in
            the continual protocol); ``None`` keeps all. With the identity class order the
            category id is the order position the model expects.
    """
    keep = [s for s in segments if classes is None or s["category_id"] in classes]
    h, w = seg.shape
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor([s["category_id"] for s in keep], dtype=torch.int64)
    masks = [torch.from_numpy(seg == s["id"]) for s in keep]
    inst.gt_masks = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "height": h,
        "width": w,
        "instances": inst,
    }
