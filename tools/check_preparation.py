#!/usr/bin/env python
"""Check this installation's ADE20K panoptic preparation against a preparation fixture.

Usage: python tools/check_preparation.py FIXTURE_DIR [FIXTURE_DIR ...] [--verbose]

A preparation fixture (``"kind": "ade20k_panoptic_preparation"`` in its ``manifest.json``) holds
small raw annotations and what the official preparation script wrote for them::

    <fixture>/raw/ADEChallengeData2016/{images,annotations,annotations_instance}/{training,validation}/
    <fixture>/official/myade20k_panoptic_{train,val}.json
    <fixture>/official/myade20k_panoptic_{train,val}/*.png

The tool runs ``datasets/prepare_ade20k_pan_seg.py`` on the raw annotations (into a temporary
folder; the fixture is not modified) and compares, image by image, with the official output:
the same images, the same segments in the same order with the same ``category_id``, ``area``,
``bbox`` and ``iscrowd`` (integers), and the same pixels for every segment, no pixel of an
unlisted segment. Segment ids and colours may differ. A folder without ``manifest.json`` whose
sub-folders are fixtures (e.g. ``tests/fixtures/ade20k_panoptic_preparation``) checks them all.

It prints PASS/FAIL per image (and per segment with ``--verbose``; failing segments always),
and exits with status 1 if anything differs, 2 if an argument is not a preparation fixture.
"""
import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

KIND = "ade20k_panoptic_preparation"
SPLITS = ("train", "val")
COMPARED_KEYS = ("category_id", "area", "bbox", "iscrowd")


@dataclass
class SegmentResult:
    index: int  # position in segments_info, 0-based
    ok: bool
    detail: str


@dataclass
class ImageResult:
    split: str
    image_id: str
    problems: List[str] = field(default_factory=list)  # image-level differences
    segments: List[SegmentResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.segments)


def _load_prepare_script():
    import importlib.util

    path = os.path.join(REPO, "datasets", "prepare_ade20k_pan_seg.py")
    spec = importlib.util.spec_from_file_location("_eclipse_prepare_ade20k_pan_seg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_ids(path: str) -> np.ndarray:
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _same_int(a, b) -> bool:
    """Equal, and both integers (a box [1.0, ...] is not the official [1, ...])."""
    if isinstance(a, list) or isinstance(b, list):
        return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                and all(_same_int(x, y) for x, y in zip(a, b)))
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return is_int(a) and is_int(b) and a == b


def _describe(seg: Dict) -> str:
    return ", ".join(f"{k} {seg.get(k)!r}" for k in COMPARED_KEYS)


def compare_image(split: str, expected_ann: Dict, expected_png: str, actual_ann: Dict,
                  actual_png: str) -> ImageResult:
    """Compare one image's ``segments_info`` and PNG with the expected (official) ones."""
    result = ImageResult(split, str(expected_ann["image_id"]))
    for name, png in (("expected", expected_png), ("our", actual_png)):
        if not os.path.isfile(png):
            result.problems.append(f"{name} panoptic PNG {png} is missing")
    if result.problems:
        return result
    exp_ids, act_ids = _read_ids(expected_png), _read_ids(actual_png)
    if exp_ids.shape != act_ids.shape:
        result.problems.append(f"PNG size {act_ids.shape} != expected {exp_ids.shape}")
        return result
    exp_segs, act_segs = expected_ann["segments_info"], actual_ann["segments_info"]
    for name, segs, ids, png in (("expected", exp_segs, exp_ids, expected_png),
                                 ("our", act_segs, act_ids, actual_png)):
        listed = [s["id"] for s in segs]
        if len(set(listed)) != len(listed):
            result.problems.append(f"{name} segments_info lists a segment id twice")
        unlisted = sorted(set(np.unique(ids).tolist()) - set(listed) - {0})
        if unlisted:
            count = int(np.isin(ids, unlisted).sum())
            result.problems.append(f"{name} PNG {png} has {count} pixels of segment ids {unlisted} "
                                   "that segments_info does not list")
    if len(exp_segs) != len(act_segs):
        result.problems.append(f"{len(act_segs)} segments != expected {len(exp_segs)}: ours "
                               f"{[s['category_id'] for s in act_segs]}, expected "
                               f"{[s['category_id'] for s in exp_segs]} (category ids in order)")
    for i in range(max(len(exp_segs), len(act_segs))):
        if i >= len(exp_segs) or i >= len(act_segs):
            seg = act_segs[i] if i < len(act_segs) else exp_segs[i]
            where = "ours only" if i < len(act_segs) else "expected only"
            result.segments.append(SegmentResult(i, False, f"{where}: {_describe(seg)}"))
            continue
        exp, act = exp_segs[i], act_segs[i]
        diffs = [f"{k} {act.get(k)!r} != expected {exp.get(k)!r}"
                 for k in COMPARED_KEYS if not _same_int(act.get(k), exp.get(k))]
        exp_mask, act_mask = exp_ids == exp["id"], act_ids == act["id"]
        differing = int(np.count_nonzero(exp_mask != act_mask))
        if differing:
            diffs.append(f"{differing} pixels differ (ours {int(act_mask.sum())} visible, "
                         f"expected {int(exp_mask.sum())})")
        detail = "; ".join(diffs) if diffs else f"{_describe(exp)}, {int(exp_mask.sum())} visible pixels"
        result.segments.append(SegmentResult(i, not diffs, detail))
    return result


def compare_split(split: str, expected_json: str, expected_dir: str, actual_json: str,
                  actual_dir: str) -> Tuple[List[str], List[ImageResult]]:
    """Compare a prepared split with the expected one. Returns split-level problems and one
    result per image (expected images first, in their order, then images only we wrote)."""
    with open(expected_json) as f:
        expected = json.load(f)
    with open(actual_json) as f:
        actual = json.load(f)
    problems = []
    exp_cats = [(c["id"], c["isthing"]) for c in expected["categories"]]
    act_cats = [(c["id"], c["isthing"]) for c in actual["categories"]]
    if exp_cats != act_cats:
        problems.append(f"categories (id, isthing) differ: ours {act_cats}, expected {exp_cats}")
    exp_order = [img["id"] for img in expected["images"]]
    act_order = [img["id"] for img in actual["images"]]
    if exp_order != act_order and sorted(map(str, exp_order)) == sorted(map(str, act_order)):
        problems.append(f"images are listed in another order: ours {act_order}, expected {exp_order}")
    act_images = {img["id"]: img for img in actual["images"]}
    act_anns = {a["image_id"]: a for a in actual["annotations"]}
    exp_anns = {a["image_id"]: a for a in expected["annotations"]}
    results = []
    for exp_img in expected["images"]:
        image_id = exp_img["id"]
        if image_id not in exp_anns:
            results.append(ImageResult(split, str(image_id), [f"{expected_json} has no annotation for it"]))
            continue
        exp_ann = exp_anns[image_id]
        if image_id not in act_images or image_id not in act_anns:
            results.append(ImageResult(split, str(image_id), [f"missing from {actual_json}"]))
            continue
        act_img, act_ann = act_images[image_id], act_anns[image_id]
        result = compare_image(split, exp_ann, os.path.join(expected_dir, exp_ann["file_name"]),
                               act_ann, os.path.join(actual_dir, act_ann["file_name"]))
        for key in ("file_name", "width", "height"):
            if act_img.get(key) != exp_img.get(key):
                result.problems.insert(0, f"image {key} {act_img.get(key)!r} != expected {exp_img.get(key)!r}")
        if act_ann["file_name"] != exp_ann["file_name"]:
            result.problems.insert(0, f"annotation file_name {act_ann['file_name']!r} != expected "
                                      f"{exp_ann['file_name']!r}")
        results.append(result)
    for image_id in act_order:
        if image_id not in set(exp_order):
            results.append(ImageResult(split, str(image_id), [f"not in {expected_json}"]))
    return problems, results


def is_fixture(path: str) -> bool:
    manifest = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest):
        return False
    with open(manifest) as f:
        return json.load(f).get("kind") == KIND


def expand_fixtures(paths: Sequence[str]) -> List[str]:
    """Fixture folders named by ``paths`` (a folder of fixtures stands for all of them).

    Raises:
        ValueError: a path is neither a preparation fixture nor a folder of them.
    """
    out = []
    for path in paths:
        if is_fixture(path):
            out.append(path)
            continue
        children = sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isdir(path) else []
        children = [c for c in children if is_fixture(c)]
        if not children:
            raise ValueError(f"{path}: not an ADE20K panoptic-preparation fixture (no manifest.json with "
                             f'"kind": "{KIND}") nor a folder of such fixtures')
        out.extend(children)
    return out


def check_fixture(path: str, workers: int = 1, work_dir: Optional[str] = None
                  ) -> Tuple[List[str], List[ImageResult]]:
    """Prepare the fixture's raw annotations and compare with its official output."""
    prepare = _load_prepare_script()
    raw = os.path.join(path, "raw", "ADEChallengeData2016")
    official = os.path.join(path, "official")
    splits = [s for s in SPLITS if os.path.isfile(os.path.join(official, f"{prepare.PREFIX}_panoptic_{s}.json"))]
    if not splits:
        return [f"{official} holds no {prepare.PREFIX}_panoptic_{{train,val}}.json"], []
    problems, results = [], []
    with tempfile.TemporaryDirectory(dir=work_dir) as out:
        for split in splits:
            ours_json = prepare.prepare_split(raw, split, workers=workers, output_dir=out)
            name = f"{prepare.PREFIX}_panoptic_{split}"
            split_problems, split_results = compare_split(
                split, os.path.join(official, f"{name}.json"), os.path.join(official, name),
                ours_json, os.path.join(out, name))
            problems += [f"{split}: {p}" for p in split_problems]
            results += split_results
    return problems, results


def format_results(problems: List[str], results: List[ImageResult], verbose: bool = False) -> str:
    lines = [f"FAIL {p}" for p in problems]
    for r in results:
        count = len(r.segments)
        lines.append(f"{'PASS' if r.ok else 'FAIL'} {r.split} {r.image_id} ({count} segments)")
        lines += [f"    FAIL {p}" for p in r.problems]
        for s in r.segments:
            if verbose or not s.ok:
                lines.append(f"    {'PASS' if s.ok else 'FAIL'} segment {s.index + 1}: {s.detail}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="+", help="preparation fixture folders, or folders of them")
    parser.add_argument("--verbose", "-v", action="store_true", help="also list the segments that pass")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        fixtures = expand_fixtures(args.fixtures)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = 0
    for path in fixtures:
        problems, results = check_fixture(path, workers=args.workers)
        ok = not problems and all(r.ok for r in results)
        failed += not ok
        segments = sum(len(r.segments) for r in results)
        print(f"== {path}")
        print(format_results(problems, results, args.verbose))
        print(f"{'PASS' if ok else 'FAIL'}: {sum(r.ok for r in results)}/{len(results)} images, "
              f"{sum(s.ok for r in results for s in r.segments)}/{segments} segments identical")
    print(f"{'FAIL' if failed else 'PASS'}: {len(fixtures) - failed}/{len(fixtures)} fixtures reproduce the "
          "official ADE20K panoptic preparation")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
