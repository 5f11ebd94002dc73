"""Generated stand-ins for ADE20K and COCO in the official layouts (``generate_synthetic.py
--layout ade20k|coco``): the real registrations load them, every step of every official scenario
gets training images by the real step-membership code, and the panoptic files are valid.

These datasets are what the scenario-script tests run ``script/**/*.sh`` on
(``tests/tiny_model_overrides.txt`` holds the model shrink they pass as ``EXTRA_ARGS``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from panopticapi.utils import rgb2id

import mask2former  # noqa: F401  (registers the datasets)
from continual.scenario import Scenario, step_index_cache_path
from mask2former.data.datasets import ADE20K_150_CATEGORIES

from conftest import build_cfg, load_script

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL = 40, 4

ADE_PS_CONFIG = REPO / "configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml"
ADE_SS_CONFIG = REPO / "configs/ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml"
COCO_CONFIG = REPO / "configs/coco/panoptic-segmentation/continual_c.yaml"
# (config, BASE_CLS, INC_CLS, number of steps after step 0) of every script under script/
OFFICIAL_SCENARIOS = {
    "ade_ps/100_5": (ADE_PS_CONFIG, 100, 5, 10),
    "ade_ps/100_10": (ADE_PS_CONFIG, 100, 10, 5),
    "ade_ps/100_50": (ADE_PS_CONFIG, 100, 50, 1),
    "ade_ps/50_10": (ADE_PS_CONFIG, 50, 10, 10),
    "ade_ps/50_20": (ADE_PS_CONFIG, 50, 20, 5),
    "ade_ps/50_50": (ADE_PS_CONFIG, 50, 50, 2),
    "ade_ss/100_5": (ADE_SS_CONFIG, 100, 5, 10),
    "ade_ss/100_10": (ADE_SS_CONFIG, 100, 10, 5),
    "ade_ss/100_50": (ADE_SS_CONFIG, 100, 50, 1),
    "coco_ps/83_5": (COCO_CONFIG, 83, 5, 10),
    "coco_ps/83_10": (COCO_CONFIG, 83, 10, 5),
}
COCO_TRAIN = "coco_2017_train_panoptic"


generate_synthetic = load_script("datasets/generate_synthetic.py")


def _script_values(script):
    """BASE, INC and STEPS as the script under script/ sets them."""
    values = {}
    for line in (REPO / "script" / f"{script}.sh").read_text().splitlines():
        for part in line.split(";"):
            key, _, value = part.strip().partition("=")
            if key in ("BASE", "INC", "STEPS"):
                values[key] = int(value)
    return values["BASE"], values["INC"], values["STEPS"]


@pytest.fixture(scope="module")
def official_root(tmp_path_factory):
    """A datasets root with the generated ADEChallengeData2016/ and coco/ (default sizes)."""
    root = tmp_path_factory.mktemp("official")
    ade = generate_synthetic.generate_ade20k(str(root / "ADEChallengeData2016"), NUM_TRAIN, NUM_VAL, seed=0)
    coco = generate_synthetic.generate_coco(str(root / "coco"), NUM_TRAIN, NUM_VAL, seed=0)
    assert ade["missing_train_classes"] == [] and coco["missing_train_classes"] == []
    return root


@pytest.fixture
def official_env(official_root, monkeypatch):
    """``DETECTRON2_DATASETS`` = the generated root, and detectron2's builtin
    ``coco_2017_train_panoptic`` registered there.

    detectron2 fixes the paths of its builtin names when it is imported (the scenario scripts
    start a new process, so they see the variable); here the name is registered again with the
    same calls as ``detectron2/data/datasets/builtin.py`` and restored afterwards.
    """
    from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_COCO, _PREDEFINED_SPLITS_COCO_PANOPTIC
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
    from detectron2.data.datasets.coco_panoptic import register_coco_panoptic

    monkeypatch.setenv("DETECTRON2_DATASETS", str(official_root))
    saved_loader, saved_meta = DatasetCatalog[COCO_TRAIN], MetadataCatalog.get(COCO_TRAIN)
    DatasetCatalog.remove(COCO_TRAIN)
    MetadataCatalog.remove(COCO_TRAIN)
    panoptic_root, panoptic_json, _ = _PREDEFINED_SPLITS_COCO_PANOPTIC[COCO_TRAIN]
    image_root, instances_json = _PREDEFINED_SPLITS_COCO["coco"]["coco_2017_train"]
    register_coco_panoptic(
        COCO_TRAIN, _get_builtin_metadata("coco_panoptic_standard"), str(official_root / image_root),
        str(official_root / panoptic_root), str(official_root / panoptic_json), str(official_root / instances_json),
    )
    try:
        yield official_root
    finally:
        DatasetCatalog.remove(COCO_TRAIN)
        MetadataCatalog.remove(COCO_TRAIN)
        DatasetCatalog.register(COCO_TRAIN, saved_loader)
        MetadataCatalog[COCO_TRAIN] = saved_meta


# ------------------------------------------------------------------------------ the files
def test_layout_files(official_root):
    ade, coco = official_root / "ADEChallengeData2016", official_root / "coco"
    for split, folder in (("train", "training"), ("val", "validation")):
        n = NUM_TRAIN if split == "train" else NUM_VAL
        stems = [f"ADE_{split}_{i:08d}" for i in range(1, n + 1)]
        assert sorted(p.name for p in (ade / "images" / folder).iterdir()) == [f"{s}.jpg" for s in stems]
        for sub in (f"annotations/{folder}", f"annotations_instance/{folder}", f"myade20k_panoptic_{split}"):
            assert sorted(p.name for p in (ade / sub).iterdir()) == [f"{s}.png" for s in stems]
        data = json.loads((ade / f"myade20k_panoptic_{split}.json").read_text())
        assert data["categories"] == ADE20K_150_CATEGORIES

        names = sorted(p.name for p in (coco / f"{split}2017").iterdir())
        assert len(names) == n and all(len(name) == len("000000000001.jpg") for name in names)
        for sub in (f"panoptic_{split}2017", f"panoptic_semseg_{split}2017"):
            assert sorted(p.name for p in (coco / sub).iterdir()) == [x.replace(".jpg", ".png") for x in names]
        data = json.loads((coco / "annotations" / f"panoptic_{split}2017.json").read_text())
        assert [(c["id"], c["name"], c["isthing"]) for c in data["categories"]] == [
            (c["id"], c["name"], c["isthing"]) for c in COCO_CATEGORIES]
        instances = json.loads((coco / "annotations" / f"instances_{split}2017.json").read_text())
        assert len(instances["categories"]) == 80 and instances["annotations"]
    assert {p.name for p in official_root.glob("*.npy")} == {"mya_100-10-ov.npy", "mya_100-50-ov.npy", "mya_50-50-ov.npy"}


def _image_counts(json_file):
    counts = {}
    for ann in json.loads(Path(json_file).read_text())["annotations"]:
        for cat in {s["category_id"] for s in ann["segments_info"]}:
            counts[cat] = counts.get(cat, 0) + 1
    return counts


def test_every_category_is_in_a_few_training_images(official_root):
    ade = _image_counts(official_root / "ADEChallengeData2016" / "myade20k_panoptic_train.json")
    assert sorted(ade) == list(range(1, 151)) and max(ade.values()) <= 3
    coco = _image_counts(official_root / "coco" / "annotations" / "panoptic_train2017.json")
    assert sorted(coco) == sorted(c["id"] for c in COCO_CATEGORIES) and max(coco.values()) <= 3


def _check_panoptic(json_file, pan_dir, sem_dir, sem_value):
    data = json.loads(Path(json_file).read_text())
    isthing = {c["id"]: c["isthing"] for c in data["categories"]}
    void_images = 0
    for ann in data["annotations"]:
        ids = rgb2id(np.asarray(Image.open(pan_dir / ann["file_name"]).convert("RGB")))
        sem = np.asarray(Image.open(sem_dir / ann["file_name"]))
        segs = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == set(segs)
        assert sum(isthing[s["category_id"]] == 0 for s in segs.values()) == 2  # two stuff regions
        assert sum(isthing[s["category_id"]] == 1 for s in segs.values()) >= 3  # 3..4 shapes
        for seg_id, seg in segs.items():
            assert seg["area"] == int((ids == seg_id).sum()) > 0
            assert (sem[ids == seg_id] == sem_value(seg["category_id"])).all()
        void_images += bool((ids == 0).any())
    assert void_images >= 1  # every 4th image has a void strip
    return data


def test_panoptic_annotations_agree_with_semantic_labels(official_root):
    ade = official_root / "ADEChallengeData2016"
    coco = official_root / "coco"
    contiguous = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    for split, folder in (("train", "training"), ("val", "validation")):
        _check_panoptic(ade / f"myade20k_panoptic_{split}.json", ade / f"myade20k_panoptic_{split}",
                        ade / "annotations" / folder, lambda cat: cat)
        _check_panoptic(coco / "annotations" / f"panoptic_{split}2017.json", coco / f"panoptic_{split}2017",
                        coco / f"panoptic_semseg_{split}2017", contiguous.__getitem__)


@pytest.mark.parametrize("json_file, pan_dir", [
    ("ADEChallengeData2016/myade20k_panoptic_train.json", "ADEChallengeData2016/myade20k_panoptic_train"),
    ("ADEChallengeData2016/myade20k_panoptic_val.json", "ADEChallengeData2016/myade20k_panoptic_val"),
    ("coco/annotations/panoptic_train2017.json", "coco/panoptic_train2017"),
    ("coco/annotations/panoptic_val2017.json", "coco/panoptic_val2017"),
])
def test_ground_truth_scores_pq_100_against_itself(official_root, json_file, pan_dir):
    from panopticapi.evaluation import pq_compute

    json_file, pan_dir = str(official_root / json_file), str(official_root / pan_dir)
    results = pq_compute(json_file, json_file, gt_folder=pan_dir, pred_folder=pan_dir)
    assert results["All"]["pq"] == pytest.approx(1.0)
    assert results["All"]["n"] > 0


def test_instances_json_is_valid_coco(official_root):
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    coco = official_root / "coco"
    api = COCO(str(coco / "annotations" / "instances_val2017.json"))
    pan = json.loads((coco / "annotations" / "panoptic_val2017.json").read_text())
    things = {c["id"] for c in COCO_CATEGORIES if c["isthing"]}
    for ann in pan["annotations"]:
        ids = rgb2id(np.asarray(Image.open(coco / "panoptic_val2017" / ann["file_name"]).convert("RGB")))
        instances = api.loadAnns(api.getAnnIds(imgIds=[ann["image_id"]]))
        segments = [s for s in ann["segments_info"] if s["category_id"] in things]
        assert len(instances) == len(segments)
        for inst, seg in zip(instances, segments):
            assert inst["category_id"] == seg["category_id"] and inst["bbox"] == seg["bbox"]
            assert (mask_util.decode(inst["segmentation"]).astype(bool) == (ids == seg["id"])).all()


# ---------------------------------------------------------------------------- registrations
def test_registered_names_load(official_env):
    ade = official_env / "ADEChallengeData2016"
    coco = official_env / "coco"
    expected = {
        "myade20k_panoptic_train": (NUM_TRAIN, ade / "images" / "training"),
        "myade20k_panoptic_val": (NUM_VAL, ade / "images" / "validation"),
        "myade20k_sem_seg_train": (NUM_TRAIN, ade / "images" / "training"),
        "myade20k_sem_seg_val": (NUM_VAL, ade / "images" / "validation"),
        COCO_TRAIN: (NUM_TRAIN, coco / "train2017"),
        "coco_2017_val_panoptic_with_sem_seg": (NUM_VAL, coco / "val2017"),
        "coco_2017_train_panoptic_with_sem_seg": (NUM_TRAIN, coco / "train2017"),
    }
    for name, (n, image_root) in expected.items():
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == n, name
        assert all(Path(d["file_name"]).parent == image_root and Path(d["file_name"]).is_file() for d in dicts), name
    coco_train = DatasetCatalog.get(COCO_TRAIN)
    assert isinstance(coco_train[0]["image_id"], int)
    contiguous = {s["category_id"] for d in coco_train for s in d["segments_info"]}
    assert contiguous == set(range(133))  # 0-based, person = 0
    assert MetadataCatalog.get(COCO_TRAIN).panoptic_json == str(coco / "annotations" / "panoptic_train2017.json")
    ade_train = DatasetCatalog.get("myade20k_panoptic_train")
    assert {s["category_id"] for d in ade_train for s in d["segments_info"]} == set(range(1, 151))


def test_builtin_coco_train_panoptic_in_a_new_process(official_root):
    """As in the scripts: a fresh process with DETECTRON2_DATASETS set finds the builtin name."""
    code = (
        "import mask2former\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        f"d = DatasetCatalog.get({COCO_TRAIN!r})\n"
        f"print(len(d), MetadataCatalog.get({COCO_TRAIN!r}).json_file)\n"
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(official_root), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    count, json_file = out.stdout.split()
    assert int(count) == NUM_TRAIN
    assert Path(json_file) == official_root / "coco" / "annotations" / "instances_train2017.json"
    assert Path(json_file).is_file()


# ---------------------------------------------------------------------- continual scenarios
def _scenario_cfg(config, base, inc, task=0, *opts):
    # the script's overrides that decide the scenario and its task name
    return build_cfg(config, [
        "CONT.BASE_CLS", base, "CONT.INC_CLS", inc, "CONT.MODE", "overlap", "CONT.TASK", task,
        "MODEL.MASK_FORMER.TEST.MASK_BG", False, *opts,
    ])


@pytest.mark.parametrize("script", sorted(OFFICIAL_SCENARIOS))
def test_every_step_of_every_official_scenario_has_training_images(official_env, script):
    config, base, inc, steps = OFFICIAL_SCENARIOS[script]
    assert _script_values(script) == (base, inc, steps)
    cfg = _scenario_cfg(config, base, inc)
    scenario = Scenario.from_config(cfg)
    assert scenario.num_steps == steps + 1
    # the images and the membership source of build_step_train_loader (cache file, shipped
    # partition or computed)
    dicts = get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN), filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    assert len(dicts) == NUM_TRAIN
    cache = step_index_cache_path(scenario)
    for step in range(scenario.num_steps):
        indices = scenario.step_indices(dicts, step, cache_path=cache)
        assert len(indices) >= 1, f"{script}: step {step} has no training image"
    # the membership in use is the in-code overlap rule on these labels
    np.testing.assert_array_equal(np.load(cache), scenario.membership(dicts, num_workers=0))


def test_coco_steps_with_and_without_the_id_correction(official_env):
    """Order "c" names classes 1..133 while the loader's ids are 0..132. Unshifted (official),
    person (contiguous 0) is never trained and entry 133 never occurs; either way every step of
    83-5 and 83-10 keeps training images, because each step has another class too."""
    dicts = DatasetCatalog.get(COCO_TRAIN)
    for base, inc in ((83, 5), (83, 10)):
        official = Scenario.from_config(_scenario_cfg(COCO_CONFIG, base, inc))
        corrected = Scenario.from_config(_scenario_cfg(COCO_CONFIG, base, inc, 0, "CONT.COCO_CORRECT_IDS", True))
        assert official.zero_based_ids and official.id_offset == 0 and corrected.id_offset == 1
        for scenario in (official, corrected):
            assert (scenario.membership(dicts, num_workers=0).sum(axis=0) >= 1).all()
        step_of_133 = official.step_of_class(133)
        assert len(official.classes_of_step(step_of_133)) > 1


def test_split_files_stand_in_for_the_shipped_partitions(official_env):
    """mya_{100-10,100-50,50-50}-ov ship as partitions of the 20,210 real images; the generator
    writes the overlap membership of its images under those names, which the loader then uses."""
    dicts = DatasetCatalog.get("myade20k_sem_seg_train")
    for name, base, inc in (("mya_100-10-ov", 100, 10), ("mya_100-50-ov", 100, 50), ("mya_50-50-ov", 50, 50)):
        cfg = _scenario_cfg(ADE_SS_CONFIG, base, inc)
        scenario = Scenario.from_config(cfg)
        assert scenario.name == name
        matrix = np.load(official_env / f"{name}.npy")
        assert matrix.dtype == np.float64 and matrix.shape == (NUM_TRAIN, scenario.num_steps)
        np.testing.assert_array_equal(matrix, scenario.membership(dicts, num_workers=0))


# ------------------------------------------------------------------------------- generator
def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_and_protects_real_data(tmp_path):
    for name in ("a", "b"):
        generate_synthetic.generate_ade20k(str(tmp_path / name / "ADEChallengeData2016"), 3, 1, 48, seed=4)
        generate_synthetic.generate_coco(str(tmp_path / name / "coco"), 3, 1, 48, seed=4)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # a second, smaller run replaces the files of the first
    generate_synthetic.generate_coco(str(tmp_path / "a" / "coco"), 2, 1, 48, seed=4)
    assert len(list((tmp_path / "a" / "coco" / "train2017").iterdir())) == 2
    assert len(list((tmp_path / "a" / "coco" / "panoptic_semseg_train2017").iterdir())) == 2
    # a folder that the generator did not write is left alone
    real = tmp_path / "real" / "coco"
    real.mkdir(parents=True)
    (real / "annotations").mkdir()
    with pytest.raises(FileExistsError, match="not written by this generator"):
        generate_synthetic.generate_coco(str(real), 2, 1)


def test_command_line_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert generate_synthetic.main(["--layout", "coco", "--num-train", "2", "--num-val", "1", "--size", "40"]) == 0
    assert generate_synthetic.main(["--layout", "ade20k", "--num-train", "2", "--num-val", "1", "--no-split-files"]) == 0
    assert (tmp_path / "coco" / "annotations" / "panoptic_val2017.json").is_file()
    assert Image.open(tmp_path / "coco" / "val2017" / "000000900001.jpg").size == (40, 40)
    assert len(DatasetCatalog.get("myade20k_panoptic_train")) == 2
    assert not list(tmp_path.glob("*.npy"))
    assert generate_synthetic.main(["--num-train", "1", "--num-val", "1", "--size", "32"]) == 0  # synthetic
    assert len(DatasetCatalog.get("synthetic_sem_seg_train")) == 1
