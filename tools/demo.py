#!/usr/bin/env python
"""Run a trained checkpoint on images and save Visualizer overlays and the segments of each image.

    python tools/demo.py --config-file CONFIG --weights CHECKPOINT --input IMAGES... --output DIR \
        [--mode panoptic|semantic|both] [--scale S] [--device cpu] [KEY VALUE ...]

``--input`` takes image files, folders (their image files, sorted) and glob patterns (quote them,
e.g. ``'imgs/*.jpg'``); several may be given. The trailing ``KEY VALUE`` pairs override the
config as in ``train_continual.py``: give the step of the checkpoint and the step>0 keys, e.g.
``CONT.TASK 10 CONT.NUM_PROMPTS 10 ... CONT.LOGIT_MANI_DELTAS '[0.4,0.6,...]'`` for a final
ECLIPSE checkpoint. A step folder's ``config.yaml`` (written by ``train_continual.py``) already
holds them all.

For every image ``<stem>`` it writes to ``--output``:

* ``<stem>_panoptic.png`` and/or ``<stem>_semantic.png``: the prediction drawn over the image by
  Detectron2's ``Visualizer``;
* ``<stem>.json``: the input path, its size and the predicted segments. The model labels classes
  with **order positions** (1-based indices into ``CONT.ORDER``); each segment lists the position
  (``category_id``), the dataset's class id (``dataset_id``), its name, ``isthing`` and its area in
  pixels.

Class names and colours come from the metadata of the config's test set
(``MetadataCatalog.get(cfg.DATASETS.TEST[0])``); only the metadata is used, the dataset files are
not needed. The checkpoint is checked against ``CONT.TASK`` first
(:func:`continual.checkpoint.check_checkpoint_for_step`), so a checkpoint of another step or
split stops with the keys involved instead of running with random prompts.
"""
import argparse
import glob
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402
from PIL import Image  # noqa: E402

import mask2former  # noqa: E402,F401  (registers the model and the datasets' metadata)
from continual.checkpoint import CheckpointMismatchError, check_checkpoint_for_step, read_model_state  # noqa: E402
from continual.checkpoint_io import SafeCheckpointer  # noqa: E402
from continual.config import setup_cfg as build_config  # noqa: E402
from continual.io import atomic_write  # noqa: E402
from continual.joint import training_config  # noqa: E402
from continual.scenario import Scenario  # noqa: E402
from mask2former.data.dataset_mappers.file_reading import read_image_file  # noqa: E402

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassTable",
    "Predictor",
    "setup_cfg",
    "expand_inputs",
    "class_table",
    "draw_panoptic",
    "draw_semantic",
    "panoptic_segments",
    "semantic_segments",
    "run_on_images",
    "main",
]

logger = logging.getLogger("demo")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MODES = ("panoptic", "semantic", "both")
PALETTES = ("dataset", "distinct")
# distinct colours for --palette distinct (class k gets entry k-1, cycling)
_DISTINCT = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
             [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
             [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180],
             [0, 0, 128], [128, 128, 128]]
#: label of "no prediction" pixels in the semantic maps handed to the Visualizer (not drawn)
_NOT_DRAWN = 255


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="tools/demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="a config file, e.g. a step folder's config.yaml")
    p.add_argument("--weights", required=True, help="checkpoint (.pth / .pkl) of step CONT.TASK")
    p.add_argument("--input", required=True, nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--output", required=True, help="folder for the overlays and the JSON files")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="outputs to draw (default: panoptic if the config has PANOPTIC_ON, else semantic)")
    p.add_argument("--scale", type=float, default=None,
                   help="overlay scale (default: enlarge images smaller than 512 px so labels stay readable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the config's, cpu without a GPU)")
    p.add_argument("--palette", choices=PALETTES, default="dataset",
                   help="class colours: the dataset's (default) or a fixed set of distinct colours (use it "
                        "when the dataset's colours are those of the objects, as in the synthetic set)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- config
def setup_cfg(config_file: str, opts: Sequence[str] = (), mode: Optional[str] = None, device: Optional[str] = None):
    """The frozen config of ``config_file`` + ``opts`` with the outputs of ``mode`` switched on.

    ``mode`` None keeps the config's outputs (panoptic if ``PANOPTIC_ON``, else semantic).
    Returns ``(cfg, mode)``.
    """
    cfg = build_config(config_file, opts)
    test = cfg.MODEL.MASK_FORMER.TEST
    if mode is None:
        mode = "panoptic" if test.PANOPTIC_ON else "semantic"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    test.PANOPTIC_ON = mode in ("panoptic", "both")
    test.SEMANTIC_ON = mode in ("semantic", "both")
    test.INSTANCE_ON = False
    if device is not None:
        cfg.MODEL.DEVICE = device
    elif cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: the class names are taken from its metadata")
    cfg.freeze()
    return cfg, mode


# ----------------------------------------------------------------------------------- classes
@dataclass
class ClassTable:
    """What the model's order positions stand for. Index ``p`` = order position ``p``
    (1-based; index 0 is "void" / no class)."""

    names: List[str]
    colors: List[List[int]]
    dataset_ids: List[Optional[int]]
    isthing: List[bool]

    def metadata(self, name: str = "eclipse_demo"):
        """A detectron2 ``Metadata`` whose class index is the order position (not registered in
        the global catalog), for the Visualizer."""
        return Metadata(name=name).set(
            thing_classes=list(self.names), thing_colors=[list(c) for c in self.colors],
            stuff_classes=list(self.names), stuff_colors=[list(c) for c in self.colors],
        )

    def describe(self, position: int) -> Dict:
        position = int(position)
        if not 0 < position < len(self.names):
            raise ValueError(f"order position {position} outside 1..{len(self.names) - 1}")
        return {"category_id": position, "dataset_id": self.dataset_ids[position],
                "name": self.names[position]}


def _color_of(index: int) -> List[int]:
    rng = np.random.default_rng(index)
    return [int(v) for v in rng.integers(40, 256, 3)]


def class_table(cfg, palette: str = "dataset") -> ClassTable:
    """Order positions -> dataset classes via ``CONT.ORDER``, with names and colours from
    ``MetadataCatalog.get(cfg.DATASETS.TEST[0])`` (``palette="distinct"``: fixed distinct colours
    by order position instead of the dataset's).

    Position ``p`` is ``CONT.ORDER[p-1]``, a class id; the dataset's contiguous id is that minus
    the scenario's id offset (1 only for COCO with ``CONT.COCO_CORRECT_IDS``). ``stuff_classes``
    of the ADE20K, COCO and synthetic metadata list every class by contiguous id.
    """
    dataset = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(dataset)
    scenario = Scenario.from_config(cfg, dataset)
    all_names = list(meta.get("stuff_classes", None) or meta.get("thing_classes", None) or [])
    all_colors = list(meta.get("stuff_colors", None) or meta.get("thing_colors", None) or [])
    to_dataset = {}
    for key in ("stuff_dataset_id_to_contiguous_id", "thing_dataset_id_to_contiguous_id"):
        for dataset_id, contiguous in (meta.get(key, None) or {}).items():
            to_dataset[int(contiguous)] = int(dataset_id)
    things = {int(v) for v in (meta.get("thing_dataset_id_to_contiguous_id", None) or {}).values()}

    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {list(PALETTES)}, got {palette!r}")
    names, colors, dataset_ids, isthing = ["void"], [[0, 0, 0]], [None], [False]
    for position, class_id in enumerate(scenario.order, start=1):
        contiguous = int(class_id) - scenario.id_offset
        known = 0 <= contiguous < len(all_names)
        names.append(str(all_names[contiguous]) if known else f"class {class_id}")
        if palette == "distinct":
            color = _DISTINCT[(position - 1) % len(_DISTINCT)]
        elif 0 <= contiguous < len(all_colors):
            color = all_colors[contiguous]
        else:
            color = _color_of(position)
        colors.append([int(v) for v in color])
        dataset_ids.append(to_dataset.get(contiguous, contiguous if known else None))
        isthing.append(contiguous in things)
    if not all_names:
        logger.warning("the metadata of %s has no class names: positions are shown as 'class <id>'", dataset)
    return ClassTable(names, colors, dataset_ids, isthing)


# ----------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Image files from files, folders (image files directly inside, sorted) and glob patterns,
    in the order given, without duplicates. Raises ``FileNotFoundError`` naming the inputs that
    match no image."""
    files, unmatched = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f)))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(f for f in glob.glob(os.path.expanduser(item), recursive=True)
                           if os.path.isfile(f) and f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            unmatched.append(item)
        files.extend(found)
    if unmatched:
        raise FileNotFoundError(f"no image found for --input {' '.join(unmatched)} "
                                f"(files, folders and glob patterns of {', '.join(IMAGE_EXTENSIONS)} files)")
    seen, unique = set(), []
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


# ----------------------------------------------------------------------------------- model
class Predictor:
    """The model of ``cfg`` (step ``CONT.TASK``) with ``weights``, checked against the step.

    ``predictor(image)`` takes an RGB uint8 ``[H, W, 3]`` array and returns the model's outputs
    at the image's size (``panoptic_seg`` and/or ``sem_seg``).
    """

    def __init__(self, cfg, weights: str):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"checkpoint {weights!r} does not exist")
        self.cfg = cfg
        self.model = build_model(training_config(cfg)).eval()  # CONT.JOINT: one head for every class
        check_checkpoint_for_step(read_model_state(weights), self.model, cfg.CONT.TASK,
                                  previous_step=False, source=weights)
        SafeCheckpointer(self.model).load(weights)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    @torch.no_grad()
    def __call__(self, image_rgb: np.ndarray) -> Dict:
        image = image_rgb[:, :, ::-1] if self.input_format == "BGR" else image_rgb
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return self.model([{"image": tensor, "height": height, "width": width}])[0]


# ----------------------------------------------------------------------------------- results
def panoptic_segments(panoptic_seg, segments_info, classes: ClassTable) -> List[Dict]:
    """JSON-ready segments of a panoptic prediction (``category_id`` = order position)."""
    seg = panoptic_seg.cpu().numpy() if hasattr(panoptic_seg, "cpu") else np.asarray(panoptic_seg)
    ids, counts = np.unique(seg, return_counts=True)
    area = dict(zip(ids.tolist(), counts.tolist()))
    return [
        {"id": int(s["id"]), **classes.describe(s["category_id"]), "isthing": bool(s.get("isthing", False)),
         "area": int(area.get(int(s["id"]), 0))}
        for s in segments_info
    ]


def semantic_labels(sem_seg) -> np.ndarray:
    """Per-pixel order position (0 = no class) of a ``sem_seg`` output (channel = position)."""
    return sem_seg.argmax(dim=0).cpu().numpy().astype(np.int64)


def semantic_segments(labels: np.ndarray, classes: ClassTable) -> List[Dict]:
    """JSON-ready classes of a semantic map of order positions (0 = no class is skipped)."""
    ids, counts = np.unique(labels, return_counts=True)
    return [{**classes.describe(p), "area": int(n)} for p, n in zip(ids.tolist(), counts.tolist()) if p > 0]


def _auto_scale(image: np.ndarray, scale: Optional[float]) -> float:
    if scale is not None:
        return float(scale)
    return float(max(1.0, min(4.0, 512.0 / max(image.shape[:2]))))


def draw_panoptic(image_rgb: np.ndarray, panoptic_seg, segments_info, classes: ClassTable,
                  scale: Optional[float] = None) -> np.ndarray:
    """The panoptic prediction (segment ``category_id`` = order position) drawn over the image."""
    seg = panoptic_seg.cpu() if hasattr(panoptic_seg, "cpu") else torch.as_tensor(np.asarray(panoptic_seg))
    vis = Visualizer(image_rgb, classes.metadata(), scale=_auto_scale(image_rgb, scale),
                     instance_mode=ColorMode.IMAGE)
    infos = [dict(s, category_id=int(s["category_id"]), isthing=bool(s.get("isthing", False)))
             for s in segments_info]
    return vis.draw_panoptic_seg(seg, infos).get_image()


def draw_semantic(image_rgb: np.ndarray, labels: np.ndarray, classes: ClassTable,
                  scale: Optional[float] = None) -> np.ndarray:
    """A semantic map of order positions (0 = no class, not drawn) drawn over the image."""
    shown = np.where(labels > 0, labels, _NOT_DRAWN)
    vis = Visualizer(image_rgb, classes.metadata(), scale=_auto_scale(image_rgb, scale),
                     instance_mode=ColorMode.IMAGE)
    return vis.draw_sem_seg(shown, area_threshold=0, alpha=0.6).get_image()


def _unique_stems(files: Sequence[str]) -> List[str]:
    stems, used = [], {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        n = used.get(stem, 0)
        used[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


def run_on_images(predictor: Predictor, classes: ClassTable, files: Sequence[str], output: str,
                  mode: str, scale: Optional[float] = None) -> List[Dict]:
    """Predict every image of ``files`` and write its overlays and JSON to ``output``.

    Returns the per-image records (as written to ``<stem>.json``), with the paths of the
    overlays under ``"panoptic_overlay"`` / ``"semantic_overlay"``. An image that cannot be read
    is logged and skipped: its record holds only ``"file_name"`` and ``"error"`` (nothing is
    written for it) and the other images are still predicted.
    """
    os.makedirs(output, exist_ok=True)
    records = []
    for path, stem in zip(files, _unique_stems(files)):
        try:
            image = read_image_file(path, format="RGB")
        except OSError as e:  # a bad image is reported; the others are still predicted
            logger.error("%s: skipped (%s)", path, e)
            records.append({"file_name": os.path.abspath(path), "error": str(e)})
            continue
        outputs = predictor(image)
        record = {"file_name": os.path.abspath(path), "height": int(image.shape[0]), "width": int(image.shape[1]),
                  "config_task": int(predictor.cfg.CONT.TASK)}
        if mode in ("panoptic", "both"):
            panoptic_seg, segments_info = outputs["panoptic_seg"]
            record["panoptic_segments"] = panoptic_segments(panoptic_seg, segments_info, classes)
            overlay = os.path.join(output, f"{stem}_panoptic.png")
            _save_png(draw_panoptic(image, panoptic_seg, segments_info, classes, scale), overlay)
            record["panoptic_overlay"] = overlay
        if mode in ("semantic", "both"):
            labels = semantic_labels(outputs["sem_seg"])
            record["semantic_segments"] = semantic_segments(labels, classes)
            overlay = os.path.join(output, f"{stem}_semantic.png")
            _save_png(draw_semantic(image, labels, classes, scale), overlay)
            record["semantic_overlay"] = overlay
        with atomic_write(os.path.join(output, f"{stem}.json")) as f:
            json.dump(record, f, indent=2)
        records.append(record)
        found = record.get("panoptic_segments", record.get("semantic_segments", []))
        logger.info("%s: %s -> %s", path, ", ".join(s["name"] for s in found) or "nothing",
                    os.path.join(output, stem + "_*.png"))
    return records


def _save_png(array: np.ndarray, path: str) -> None:
    with atomic_write(path, binary=True) as f:
        Image.fromarray(array).save(f, format="PNG")


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    setup_logger(name="demo", abbrev_name="demo")
    try:
        files = expand_inputs(args.input)
        cfg, mode = setup_cfg(args.config_file, args.opts, args.mode, args.device)
        classes = class_table(cfg, args.palette)
        predictor = Predictor(cfg, args.weights)
    except (CheckpointMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = run_on_images(predictor, classes, files, args.output, mode, args.scale)
    failed = [r for r in records if "error" in r]
    logger.info("%d image(s): overlays and JSON in %s", len(records) - len(failed), args.output)
    if failed:
        print(f"error: {len(failed)} of {len(records)} image(s) could not be read and were skipped:", file=sys.stderr)
        for r in failed:
            print(f"  {r['error']}", file=sys.stderr)
        print("replace or remove these files; the other images' results are written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
