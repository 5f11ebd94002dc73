"""Dataset registration, the synthetic generator, the preparation scripts and the mappers.

Everything runs on small data written to ``tmp_path``; ``DETECTRON2_DATASETS`` is pointed there
with ``monkeypatch`` (the registrations resolve their paths when a dataset is loaded).
"""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from panopticapi.utils import rgb2id

import mask2former  # noqa: F401  (registers the datasets)
from mask2former.config import add_maskformer2_config
from mask2former.data.dataset_mappers import (
    ColorAugSSD,
    ColorAugSSDTransform,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    UnreadableFileError,
    build_train_mapper,
)
from mask2former.data.datasets import ADE20K_150_CATEGORIES, DatasetFilesMissingError
from mask2former.data.datasets.synthetic import SYNTHETIC_CATEGORIES

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "datasets" / "README.md").read_text()

generate_synthetic = load_script("datasets/generate_synthetic.py")
prepare_ade20k_pan_seg = load_script("datasets/prepare_ade20k_pan_seg.py")
prepare_ade20k_sem_seg = load_script("datasets/prepare_ade20k_sem_seg.py")
prepare_coco_semseg = load_script("datasets/prepare_coco_semantic_annos_from_panoptic_annos.py")

NUM_TRAIN, NUM_VAL, SIZE = 4, 2, 64


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """A datasets root holding a small synthetic dataset (64x64 images)."""
    root = tmp_path_factory.mktemp("d2datasets")
    generate_synthetic.generate(str(root / "synthetic"), NUM_TRAIN, NUM_VAL, SIZE, seed=1)
    return root


@pytest.fixture
def synthetic_env(synthetic_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(synthetic_root))
    return synthetic_root


def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tiny_cfg(**input_overrides):
    """The synthetic training recipe shrunk to 64x64 crops, built without the YAML files."""
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.DATASETS.TRAIN = ("synthetic_panoptic_train",)
    cfg.INPUT.MIN_SIZE_TRAIN = (40,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MIN_SIZE_TEST = 48
    cfg.INPUT.MAX_SIZE_TEST = 1000
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (64, 64)
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.SIZE_DIVISIBILITY = 64
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.MASK_FORMER.TEST.MASK_BG = False
    for key, value in input_overrides.items():
        setattr(cfg.INPUT, key, value)
    return cfg


def _assert_valid_panoptic(json_file: Path, pan_dir: Path, sem_dir: Path = None, image_dir: Path = None):
    """Every segment's area/bbox match its pixels, and PQ(GT, GT) = 100."""
    from panopticapi.evaluation import pq_compute

    data = json.loads(json_file.read_text())
    assert data["categories"][0]["id"] == 0 and data["categories"][0]["name"] == "void"
    categories = {c["id"]: c for c in data["categories"]}
    images = {img["id"]: img for img in data["images"]}
    for ann in data["annotations"]:
        ids = rgb2id(np.asarray(Image.open(pan_dir / ann["file_name"]).convert("RGB")))
        segs = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == set(segs)
        for seg_id, seg in segs.items():
            mask = ids == seg_id
            assert seg["area"] == int(mask.sum()) > 0
            ys, xs = np.nonzero(mask)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert seg["iscrowd"] == 0
            assert seg["isthing"] == categories[seg["category_id"]]["isthing"]
        img = images[ann["image_id"]]
        assert ids.shape == (img["height"], img["width"])
        if image_dir is not None:
            assert Image.open(image_dir / img["file_name"]).size == (img["width"], img["height"])
        if sem_dir is not None:  # the raw semantic labels agree with the panoptic classes
            sem = np.asarray(Image.open(sem_dir / ann["file_name"]))
            for seg_id, seg in segs.items():
                assert (sem[ids == seg_id] == seg["category_id"]).all()
    results = pq_compute(str(json_file), str(json_file), str(pan_dir), str(pan_dir))
    assert results["All"]["pq"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------- generator
def test_generator_is_deterministic(tmp_path):
    for name in ("a", "b"):
        generate_synthetic.generate(str(tmp_path / name), 3, 2, (48, 40), seed=5)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 3 * (3 + 2) + 2  # image, label, panoptic PNG per image + 2 json
    assert first == second
    generate_synthetic.generate(str(tmp_path / "c"), 3, 2, (48, 40), seed=6)
    assert _files(tmp_path / "c") != first
    # fewer images in a second run: the stale files of the first are removed
    generate_synthetic.generate(str(tmp_path / "a"), 1, 2, (48, 40), seed=5)
    assert len(list((tmp_path / "a" / "images" / "training").iterdir())) == 1
    assert _files(tmp_path / "a")["synthetic_panoptic_val.json"] == first["synthetic_panoptic_val.json"]


def test_generator_writes_valid_panoptic_annotations(synthetic_root):
    root = synthetic_root / "synthetic"
    for split, folder in (("train", "training"), ("val", "validation")):
        _assert_valid_panoptic(
            root / f"synthetic_panoptic_{split}.json", root / f"synthetic_panoptic_{split}",
            sem_dir=root / "annotations" / folder, image_dir=root / "images" / folder,
        )
    data = json.loads((root / "synthetic_panoptic_train.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(range(11))
    assert len(data["images"]) == NUM_TRAIN


def test_generator_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert generate_synthetic.main(["--num-train", "1", "--num-val", "1", "--size", "32", "--seed", "2"]) == 0
    assert (tmp_path / "synthetic" / "synthetic_panoptic_val.json").is_file()
    assert len(DatasetCatalog.get("synthetic_panoptic_train")) == 1


# ----------------------------------------------------------------------------- registration
def test_synthetic_panoptic_dataset_loads(synthetic_env):
    dicts = DatasetCatalog.get("synthetic_panoptic_train")
    assert len(dicts) == NUM_TRAIN
    categories = {c["id"]: c for c in SYNTHETIC_CATEGORIES}
    root = synthetic_env / "synthetic"
    for d in dicts:
        assert set(d) == {"file_name", "image_id", "pan_seg_file_name", "sem_seg_file_name", "segments_info"}
        assert d["image_id"] == Path(d["file_name"]).stem
        assert Path(d["file_name"]).parent == root / "images" / "training"
        assert Path(d["pan_seg_file_name"]).parent == root / "synthetic_panoptic_train"
        assert Path(d["sem_seg_file_name"]).parent == root / "annotations" / "training"
        for seg in d["segments_info"]:
            assert seg["category_id"] in categories  # contiguous id = dataset id
            assert seg["isthing"] is bool(categories[seg["category_id"]]["isthing"])
    meta = MetadataCatalog.get("synthetic_panoptic_train")
    assert meta.thing_dataset_id_to_contiguous_id == {i: i for i in range(5, 11)}
    assert meta.stuff_dataset_id_to_contiguous_id == {i: i for i in range(11)}
    assert meta.stuff_classes[0] == "void" and len(meta.stuff_classes) == 11
    assert meta.thing_classes == ["square", "disc", "triangle", "ring", "cross", "bar"]
    assert meta.panoptic_json == str(root / "synthetic_panoptic_train.json")
    assert meta.as_dict()["panoptic_root"] == str(root / "synthetic_panoptic_train")
    assert (meta.evaluator_type, meta.ignore_label, meta.label_divisor) == ("ade20k_panoptic_seg", 255, 1000)


def test_synthetic_semantic_dataset_loads(synthetic_env):
    dicts = DatasetCatalog.get("synthetic_sem_seg_val")
    assert len(dicts) == NUM_VAL
    assert all(Path(d["file_name"]).stem == Path(d["sem_seg_file_name"]).stem for d in dicts)
    meta = MetadataCatalog.get("synthetic_sem_seg_val")
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
    assert meta.stuff_classes[:2] == ["void", "sky"]


def test_metadata_paths_follow_the_environment(tmp_path, monkeypatch):
    meta = MetadataCatalog.get("myade20k_panoptic_val")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "one"))
    assert meta.panoptic_root == str(tmp_path / "one" / "ADEChallengeData2016" / "myade20k_panoptic_val")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "two"))
    assert meta.get("image_root") == str(tmp_path / "two" / "ADEChallengeData2016" / "images" / "validation")
    assert meta.json_file.endswith("ade20k_instance_val.json")
    copied = pickle.loads(pickle.dumps(meta))  # e.g. sent to a spawned worker
    assert copied.panoptic_root == meta.panoptic_root and copied.thing_classes == meta.thing_classes


def test_ade20k_metadata_facts():
    meta = MetadataCatalog.get("myade20k_panoptic_train")
    assert len(ADE20K_150_CATEGORIES) == 151 and ADE20K_150_CATEGORIES[0]["name"] == "void"
    assert [c["name"] for c in ADE20K_150_CATEGORIES[1:4]] == ["wall", "building", "sky"]
    assert ADE20K_150_CATEGORIES[150]["name"] == "flag"
    assert len(meta.thing_classes) == 100 and len(meta.stuff_classes) == 151
    assert meta.stuff_dataset_id_to_contiguous_id == {i: i for i in range(151)}
    things = meta.thing_dataset_id_to_contiguous_id
    assert 8 in things and 13 in things and 150 in things and 1 not in things and 3 not in things
    assert (meta.evaluator_type, meta.ignore_label, meta.label_divisor) == ("ade20k_panoptic_seg", 255, 1000)
    sem = MetadataCatalog.get("myade20k_sem_seg_train")
    assert sem.stuff_classes == [c["name"] for c in ADE20K_150_CATEGORIES]
    assert (sem.evaluator_type, sem.ignore_label) == ("sem_seg", 255)
    coco = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert sorted(coco.stuff_dataset_id_to_contiguous_id.values()) == list(range(133))
    assert coco.thing_dataset_id_to_contiguous_id[1] == 0  # person
    assert (coco.evaluator_type, coco.label_divisor) == ("coco_panoptic_seg", 1000)


@pytest.mark.parametrize(
    "name, command",
    [
        ("myade20k_panoptic_train", "python datasets/prepare_ade20k_pan_seg.py"),
        ("myade20k_sem_seg_val", "wget http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"),
        ("coco_2017_val_panoptic_with_sem_seg", "python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py"),
        ("synthetic_panoptic_val", "python datasets/generate_synthetic.py"),
        ("synthetic_sem_seg_train", "python datasets/generate_synthetic.py"),
    ],
)
def test_missing_dataset_raises_actionable_error(tmp_path, monkeypatch, name, command):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get(name)
    message = str(info.value)
    dataset_dir = {"myade20k": "ADEChallengeData2016", "coco_2017": "coco", "synthetic": "synthetic"}
    folder = next(v for k, v in dataset_dir.items() if name.startswith(k))
    assert str(tmp_path / folder) in message  # the missing folder
    assert name in message and f"DETECTRON2_DATASETS={str(tmp_path)!r}" in message
    assert command in message and command in README
    assert isinstance(info.value, DatasetFilesMissingError)


def test_missing_file_inside_dataset_is_named(synthetic_root, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    victim = root / "synthetic" / "synthetic_panoptic_val" / "synthetic_val_00000002.png"
    victim.unlink()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    with pytest.raises(FileNotFoundError, match="synthetic_val_00000002.png"):
        DatasetCatalog.get("synthetic_panoptic_val")
    # an empty json is an error, never an empty dataset
    json_file = root / "synthetic" / "synthetic_panoptic_val.json"
    json_file.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(FileNotFoundError, match="lists no annotated image"):
        DatasetCatalog.get("synthetic_panoptic_val")


# ------------------------------------------------------------------------- ADE20K (fake tree)
def _write_fake_ade(root: Path) -> Path:
    """A 3-image ADEChallengeData2016 tree with raw semantic and instance annotations."""
    ade = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    h, w = 30, 40
    for folder, stems in (("training", ["ADE_train_00000001", "ADE_train_00000002"]),
                          ("validation", ["ADE_val_00000001"])):
        for sub in ("images", "annotations", "annotations_instance"):
            (ade / sub / folder).mkdir(parents=True)
        for stem in stems:
            sem = np.zeros((h, w), np.uint8)
            sem[:10], sem[10:20], sem[20:] = 3, 1, 4  # sky, wall, floor
            sem[12:18, 5:15] = 8                      # bed, which has an instance
            sem[22:26, 30:35] = 13                    # person without an instance -> void
            ins = np.zeros((h, w, 3), np.uint8)
            ins[12:18, 5:15] = (1, 1, 0)              # instance category 1 (bed), index 1
            ins[18:24, 20:28] = (8, 2, 0)             # instance category 8 (chair), over wall/floor
            Image.fromarray(sem).save(ade / "annotations" / folder / f"{stem}.png")
            Image.fromarray(ins).save(ade / "annotations_instance" / folder / f"{stem}.png")
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(ade / "images" / folder / f"{stem}.jpg", quality=95)
    return ade


def test_ade20k_panoptic_preparation_and_registration(tmp_path, monkeypatch):
    ade = _write_fake_ade(tmp_path)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert prepare_ade20k_pan_seg.main(["--workers", "1"]) == 0
    train = json.loads((ade / "myade20k_panoptic_train.json").read_text())
    for ann in train["annotations"]:
        ids = rgb2id(np.asarray(Image.open(ade / "myade20k_panoptic_train" / ann["file_name"]).convert("RGB")))
        assert ids.shape == (30, 40)
        # stuff segments keep the area of their semantic region (the chair hides part of it)
        visible = {s["category_id"]: int((ids == s["id"]).sum()) for s in ann["segments_info"]}
        assert visible == {3: 400, 1: 340 - 16, 4: 380 - 32, 8: 60, 20: 48}
        assert [s["id"] for s in ann["segments_info"]] == [1, 2, 3, 4, 5]
    data = json.loads((ade / "myade20k_panoptic_val.json").read_text())
    assert data["categories"] == ADE20K_150_CATEGORIES
    assert data["images"][0] == {"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg",
                                 "width": 40, "height": 30}

    dicts = DatasetCatalog.get("myade20k_panoptic_train")
    assert [d["image_id"] for d in dicts] == ["ADE_train_00000001", "ADE_train_00000002"]
    d = dicts[0]
    assert d["file_name"] == str(ade / "images" / "training" / "ADE_train_00000001.jpg")
    assert d["sem_seg_file_name"] == str(ade / "annotations" / "training" / "ADE_train_00000001.png")
    areas = {(s["category_id"], s["isthing"]): s["area"] for s in d["segments_info"]}
    # areas of the official preparation: a stuff area counts the pixels the chair (2x8 wall and
    # 4x8 floor pixels) paints over; the person without instance is void
    assert areas == {(3, False): 400, (1, False): 400 - 60, (4, False): 400 - 20,
                     (8, True): 60, (20, True): 48}
    assert [(s["category_id"]) for s in d["segments_info"]] == [1, 3, 4, 8, 20]  # stuff by id, then things
    assert len(DatasetCatalog.get("myade20k_sem_seg_train")) == 2


def test_ade20k_convert_annotation_rules():
    sem = np.full((6, 6), 1, np.uint8)
    sem[0, 0] = 3                                      # a sky pixel entirely under an instance
    ins = np.zeros((6, 6, 3), np.uint8)
    ins[:2, :2] = (4, 7, 0)                            # instance category 4 = person (13)
    id_map, segments = prepare_ade20k_pan_seg.convert_annotation(sem, ins, prepare_ade20k_pan_seg.builtin_catid_mapping())
    # the hidden sky pixel stays a segment of area 1, and the wall area includes the instance's pixels
    assert [(s["category_id"], s["area"]) for s in segments] == [(1, 35), (3, 1), (13, 4)]
    assert id_map.dtype == np.int32 and (id_map > 0).all() and not (id_map == 2).any()
    ins[0, 1] = (5, 7, 0)                              # one instance, two categories
    with pytest.raises(ValueError, match="instance 7"):
        prepare_ade20k_pan_seg.convert_annotation(sem, ins, prepare_ade20k_pan_seg.builtin_catid_mapping())


def test_ade20k_catid_mapping_file(tmp_path):
    mapping = prepare_ade20k_pan_seg.builtin_catid_mapping()
    assert len(mapping) == 100 and mapping[1] == 8 and mapping[4] == 13 and mapping[100] == 150
    path = tmp_path / "mapping.txt"
    path.write_text("Instance100\tSceneParse150\tFull\n" + "".join(f"{k}\t\t{v}\t\t0\n" for k, v in mapping.items()))
    assert prepare_ade20k_pan_seg.read_catid_mapping(str(path)) == mapping


def test_ade20k_preparation_without_instances_says_what_to_download(tmp_path):
    ade = _write_fake_ade(tmp_path)
    shutil.rmtree(ade / "annotations_instance")
    with pytest.raises(FileNotFoundError, match="annotations_instance.tar"):
        prepare_ade20k_pan_seg.prepare_split(str(ade), "train")


def test_prepare_ade20k_sem_seg(tmp_path):
    ade = _write_fake_ade(tmp_path)
    prepare_ade20k_sem_seg.main(["--dataset-dir", str(ade)])
    raw = np.asarray(Image.open(ade / "annotations" / "training" / "ADE_train_00000001.png"))
    out = np.asarray(Image.open(ade / "annotations_detectron2" / "training" / "ADE_train_00000001.png"))
    assert out.dtype == np.uint8 and out.shape == raw.shape
    assert (out[raw == 0] == 255).all() and (out[raw > 0] == raw[raw > 0] - 1).all()
    assert prepare_ade20k_sem_seg.convert_labels(np.array([0, 1, 150], np.uint8)).tolist() == [255, 0, 149]


# ---------------------------------------------------------------------------------- COCO
def test_prepare_coco_semantic_and_registration(tmp_path, monkeypatch):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "panoptic_val2017").mkdir()
    (coco / "val2017").mkdir()
    index = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    banner = next(c["id"] for c in COCO_CATEGORIES if c["name"] == "banner")
    ids = np.zeros((8, 10), np.int64)
    ids[:4, :5] = 1001      # person
    ids[4:, :5] = 70000     # car, crowd
    ids[:, 7:] = 5          # banner (stuff)
    segments = [
        {"id": 1001, "category_id": 1, "iscrowd": 0, "area": 20, "bbox": [0, 0, 5, 4]},
        {"id": 70000, "category_id": 3, "iscrowd": 1, "area": 20, "bbox": [0, 4, 5, 4]},
        {"id": 5, "category_id": banner, "iscrowd": 0, "area": 24, "bbox": [7, 0, 3, 8]},
    ]
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(coco / "panoptic_val2017" / "000000000139.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(coco / "val2017" / "000000000139.jpg")
    (coco / "annotations" / "panoptic_val2017.json").write_text(json.dumps({
        "images": [{"id": 139, "file_name": "000000000139.jpg", "width": 10, "height": 8}],
        "annotations": [{"image_id": 139, "file_name": "000000000139.png", "segments_info": segments}],
        "categories": [{"id": c["id"], "name": c["name"], "isthing": c["isthing"]} for c in COCO_CATEGORIES],
    }))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert prepare_coco_semseg.main(["--splits", "val", "--workers", "1"]) == 0
    sem = np.asarray(Image.open(coco / "panoptic_semseg_val2017" / "000000000139.png"))
    assert sem.dtype == np.uint8 and sem.shape == (8, 10)
    assert (sem[:4, :5] == 0).all()                    # person -> 0 (0-based)
    assert (sem[4:, :5] == index[3]).all() and index[3] == 2  # crowd car keeps its class
    assert (sem[:, 7:] == index[banner]).all()
    assert (sem[:, 5:7] == 255).all()                  # unlabeled

    (d,) = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert d["image_id"] == 139 and d["file_name"] == str(coco / "val2017" / "000000000139.jpg")
    assert d["sem_seg_file_name"] == str(coco / "panoptic_semseg_val2017" / "000000000139.png")
    assert [(s["category_id"], s["isthing"]) for s in d["segments_info"]] == [(0, True), (2, True), (index[banner], False)]


# -------------------------------------------------------------------------------- mappers
def _out_equal(a, b):
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["sem_seg"], b["sem_seg"])
    assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)
    assert torch.equal(a["instances"].gt_masks, b["instances"].gt_masks)


def test_panoptic_mapper_crop_and_pad(synthetic_env):
    d = DatasetCatalog.get("synthetic_panoptic_train")[0]
    mapper = MaskFormerPanopticDatasetMapper(_tiny_cfg(), True)
    out = mapper(d)
    image, sem, inst = out["image"], out["sem_seg"], out["instances"]
    # resized to 40x40 (no crop needed: the crop is larger), then padded to 64x64
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert (image[:, 40:, :] == 128).all() and (image[:, :, 40:] == 128).all()
    assert sem.dtype == torch.int64 and sem.shape == (64, 64)
    assert (sem[40:, :] == 255).all() and (sem[:, 40:] == 255).all() and (sem[:40, :40] != 255).all()
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_masks.dtype == torch.bool
    assert inst.gt_masks.shape == (len(inst.gt_classes), 64, 64) and inst.image_size == (64, 64)
    assert not inst.gt_masks[:, 40:, :].any() and not inst.gt_masks[:, :, 40:].any()
    for cls, mask in zip(inst.gt_classes.tolist(), inst.gt_masks):  # masks agree with sem_seg
        assert (sem[mask] == cls).all()
    assert sorted(inst.gt_classes.tolist()) == sorted(s["category_id"] for s in d["segments_info"])
    assert (out["height"], out["width"], out["file_name"], out["image_id"]) == (SIZE, SIZE, d["file_name"], d["image_id"])
    assert "pan_seg_file_name" not in out and "sem_seg_file_name" not in out

    # a larger resize is cropped to exactly 64x64: no padding
    out = MaskFormerPanopticDatasetMapper(_tiny_cfg(MIN_SIZE_TRAIN=(96,)), True)(d)
    assert out["image"].shape == (3, 64, 64) and (out["sem_seg"] != 255).all()
    # the category-area constraint inspects the class map derived from the panoptic PNG
    cfg = _tiny_cfg(MIN_SIZE_TRAIN=(96,))
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.5
    mapper = MaskFormerPanopticDatasetMapper(cfg, True)
    assert mapper._crop_inspects_classes
    out = mapper(d)
    assert out["image"].shape == (3, 64, 64) and out["instances"].gt_masks.shape[1:] == (64, 64)
    # inference: test resize, no padding
    out = MaskFormerPanopticDatasetMapper(_tiny_cfg(), False)(d)
    assert out["image"].shape == (3, 48, 48) and out["sem_seg"].shape == (48, 48)


def test_panoptic_mapper_is_deterministic_under_a_seed(synthetic_env):
    d = DatasetCatalog.get("synthetic_panoptic_train")[1]
    mapper = MaskFormerPanopticDatasetMapper(_tiny_cfg(MIN_SIZE_TRAIN=(64, 80, 96)), True)
    outputs = []
    for _ in range(2):
        np.random.seed(123)
        outputs.append(mapper(d))
    _out_equal(*outputs)
    different = []
    for seed in range(4):
        np.random.seed(seed)
        different.append(mapper(d)["image"])
    assert any(not torch.equal(different[0], x) for x in different[1:])


def _write_custom_panoptic(tmp_path: Path):
    """One 16x16 image: class-0 segment, a crowd segment of class 5, a class-6 segment, void."""
    ids = np.zeros((16, 16), np.int64)
    ids[:8] = 1        # category 0 ("background")
    ids[8:, :8] = 2    # crowd, category 5
    ids[8:, 8:12] = 3  # category 6; columns 12.. stay void
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "pan.png")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "img.png")
    return {
        "file_name": str(tmp_path / "img.png"),
        "image_id": "custom",
        "pan_seg_file_name": str(tmp_path / "pan.png"),
        "segments_info": [
            {"id": 1, "category_id": 0, "iscrowd": 0, "isthing": False},
            {"id": 2, "category_id": 5, "iscrowd": 1, "isthing": True},
            {"id": 3, "category_id": 6, "iscrowd": 0, "isthing": True},
        ],
    }


@pytest.mark.parametrize("mask_bg, expected", [(False, [6]), (True, [0, 6])])
def test_panoptic_mapper_drops_class0_and_crowd(tmp_path, mask_bg, expected):
    d = _write_custom_panoptic(tmp_path)
    cfg = _tiny_cfg(MIN_SIZE_TRAIN=(16,), COLOR_AUG_SSD=False, RANDOM_FLIP="none", SIZE_DIVISIBILITY=-1)
    cfg.MODEL.MASK_FORMER.TEST.MASK_BG = mask_bg
    out = MaskFormerPanopticDatasetMapper(cfg, True)(d)
    assert out["instances"].gt_classes.tolist() == expected
    assert out["instances"].gt_masks.sum(dim=(1, 2)).tolist() == [128, 32][-len(expected):]
    sem = out["sem_seg"]
    assert sem.shape == (16, 16)  # no padding
    assert (sem[:8] == 0).all() and (sem[8:, :8] == 5).all() and (sem[8:, 8:12] == 6).all()
    assert (sem[8:, 12:] == 255).all()  # void


def test_semantic_mapper(synthetic_env):
    d = DatasetCatalog.get("synthetic_sem_seg_train")[0]
    labels = np.asarray(Image.open(d["sem_seg_file_name"]))
    mapper = MaskFormerSemanticDatasetMapper(_tiny_cfg(), True)
    np.random.seed(0)
    out = mapper(d)
    sem, inst = out["sem_seg"], out["instances"]
    assert out["image"].shape == (3, 64, 64) and sem.shape == (64, 64) and sem.dtype == torch.int64
    assert (sem[40:, :] == 255).all() and (sem[:, 40:] == 255).all()
    present = sorted(set(np.unique(sem.numpy()).tolist()) - {255, 0})
    assert inst.gt_classes.tolist() == present
    assert set(present) <= set(np.unique(labels).tolist())
    for cls, mask in zip(present, inst.gt_masks):
        assert torch.equal(mask, sem == cls)
    assert inst.gt_masks.dtype == torch.bool and "sem_seg_file_name" not in out
    np.random.seed(0)
    _out_equal(out, mapper(d))

    # MASK_BG: class 0 becomes a target
    custom = dict(d, sem_seg_file_name=str(synthetic_env / "zeros.png"))
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(custom["sem_seg_file_name"])
    assert len(mapper(custom)["instances"]) == 0
    cfg = _tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.MASK_BG = True
    assert MaskFormerSemanticDatasetMapper(cfg, True)(custom)["instances"].gt_classes.tolist() == [0]


def test_test_time_dataset_mapper(synthetic_env):
    cfg = _tiny_cfg()
    mapper = DatasetMapper(cfg, False)
    for name in ("synthetic_panoptic_val", "synthetic_sem_seg_val"):
        d = DatasetCatalog.get(name)[0]
        out = mapper(d)
        assert out["image"].shape == (3, 48, 48)
        assert out["sem_seg"].shape == (48, 48) and out["sem_seg"].dtype == torch.int64
        assert int(out["sem_seg"].max()) <= 10 and (out["height"], out["width"]) == (SIZE, SIZE)


def test_unreadable_files_are_named(synthetic_env, tmp_path):
    d = DatasetCatalog.get("synthetic_panoptic_train")[0]
    truncated = tmp_path / "truncated.png"
    data = Path(d["pan_seg_file_name"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    mapper = MaskFormerPanopticDatasetMapper(_tiny_cfg(), True)
    with pytest.raises(UnreadableFileError, match="truncated.png") as info:
        mapper(dict(d, pan_seg_file_name=str(truncated)))
    assert info.value.filename == str(truncated) and "panoptic annotation" in str(info.value)
    assert isinstance(info.value, OSError)

    data = Path(d["file_name"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(UnreadableFileError, match="image file .*truncated.png"):
        mapper(dict(d, file_name=str(truncated)))
    with pytest.raises(UnreadableFileError, match="missing.png"):
        mapper(dict(d, file_name=str(tmp_path / "missing.png")))
    sem_dict = DatasetCatalog.get("synthetic_sem_seg_train")[0]
    with pytest.raises(UnreadableFileError, match="semantic annotation file .*truncated.png"):
        MaskFormerSemanticDatasetMapper(_tiny_cfg(), True)(dict(sem_dict, sem_seg_file_name=str(truncated)))
    # a 3-channel "label" image is rejected, naming the file
    with pytest.raises(UnreadableFileError, match="single-channel"):
        MaskFormerSemanticDatasetMapper(_tiny_cfg(), True)(dict(sem_dict, sem_seg_file_name=d["pan_seg_file_name"]))


def test_color_aug_ssd():
    rng = np.random.default_rng(0)
    image = rng.integers(20, 230, (24, 32, 3), dtype=np.uint8)
    tfm = ColorAugSSDTransform("RGB", brightness_delta=10.0, contrast_alpha=1.2, saturation_alpha=0.7,
                               hue_delta=5, contrast_last=True)
    out = tfm.apply_image(image)
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)
    # the channel order is respected: BGR in, BGR out gives the same colours
    bgr = ColorAugSSDTransform("BGR", 10.0, 1.2, 0.7, 5, True).apply_image(np.ascontiguousarray(image[:, :, ::-1]))
    assert np.array_equal(bgr[:, :, ::-1], out)
    assert np.array_equal(ColorAugSSDTransform("RGB").apply_image(image), image)
    seg = rng.integers(0, 5, (24, 32)).astype(np.uint8)
    assert tfm.apply_segmentation(seg) is seg
    assert ColorAugSSDTransform("RGB", brightness_delta=300.0).apply_image(image).min() == 255  # clipped

    aug = ColorAugSSD("RGB")
    results = []
    for seed in (3, 3, 4, 5, 6):
        np.random.seed(seed)
        aug_input = T.AugInput(image.copy(), sem_seg=seg.copy())
        T.AugmentationList([aug])(aug_input)
        assert aug_input.image.dtype == np.uint8 and aug_input.image.shape == image.shape
        assert np.array_equal(aug_input.sem_seg, seg)
        results.append(aug_input.image)
    assert np.array_equal(results[0], results[1])
    assert any(not np.array_equal(r, image) for r in results)


def test_build_train_mapper_from_the_official_configs():
    from conftest import build_cfg

    configs = REPO / "configs"
    cfg = build_cfg(configs / "ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml")
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, MaskFormerPanopticDatasetMapper)
    augs = mapper.augmentations.augs
    assert [type(a) for a in augs] == [T.ResizeShortestEdge, T.RandomCrop_CategoryAreaConstraint, ColorAugSSD, T.RandomFlip]
    assert augs[0].short_edge_length == tuple(range(320, 1281, 64)) and augs[0].max_size == 2560
    assert tuple(augs[1].crop_aug.crop_size) == (640, 640)
    assert (mapper.size_divisibility, mapper.ignore_label, mapper.remove_bkg) == (640, 255, True)

    cfg = build_cfg(configs / "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml")
    mapper = build_train_mapper(cfg)
    assert type(mapper) is MaskFormerSemanticDatasetMapper and mapper.size_divisibility == 512

    cfg = build_cfg(configs / "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
    mapper = build_train_mapper(cfg)
    augs = mapper.augmentations.augs
    assert [type(a) for a in augs] == [T.ResizeShortestEdge, T.RandomFlip]
    assert augs[0].short_edge_length == (800,) and augs[0].max_size == 1333
    assert mapper.size_divisibility <= 0
