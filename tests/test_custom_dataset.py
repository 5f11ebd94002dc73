"""Your own COCO-panoptic dataset (docs/custom_dataset.md): registration from a description file,
the errors when the class list and the annotations disagree, and the worked example end to end."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from script_runner import generate_synthetic_root

EXAMPLE = REPO / "docs" / "custom_dataset" / "shapes.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_synthetic_root(tmp_path_factory.mktemp("d2data"), "shapes", num_train=6, num_val=2, size=32)


def _description(tmp_path, data_root, name, edit=None, json_edit=None):
    """A copy of the example description (absolute root), optionally edited, with its own copy
    of the data when the json is edited."""
    desc = yaml.safe_load(EXAMPLE.read_text())
    desc["name"], desc["root"] = name, str(data_root / "shapes")
    if json_edit:
        root = tmp_path / name
        shutil.copytree(data_root / "shapes", root)
        path = root / "synthetic_panoptic_train.json"
        data = json.loads(path.read_text())
        json_edit(data)
        path.write_text(json.dumps(data))
        desc["root"] = str(root)
    if edit:
        edit(desc)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(desc))
    return str(path)


def test_registration_loads_both_splits_with_dataset_ids(tmp_path, data_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from mask2former.data.datasets.register_custom import register_custom_dataset, scenario_keys

    path = _description(tmp_path, data_root, "reg_ok")
    assert register_custom_dataset(path) == ["reg_ok_panoptic_train", "reg_ok_panoptic_val"]
    assert register_custom_dataset(path) == ["reg_ok_panoptic_train", "reg_ok_panoptic_val"]  # again: no-op
    train = DatasetCatalog.get("reg_ok_panoptic_train")
    assert len(train) == 6 and len(DatasetCatalog.get("reg_ok_panoptic_val")) == 2
    seg = {s["category_id"]: s["isthing"] for d in train for s in d["segments_info"]}
    assert set(seg) <= set(range(1, 11)) and seg.get(5) is True and seg.get(1) is False
    meta = MetadataCatalog.get("reg_ok_panoptic_val")
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.stuff_classes[6] == "disc"
    assert meta.thing_dataset_id_to_contiguous_id == {i: i for i in range(5, 11)}
    assert scenario_keys(path) == {"DATASET_NAME": "reg_ok", "CLASS_IDS": "[1,2,3,4,5,6,7,8,9,10]",
                                   "NUM_CLASSES": "11", "TRAIN_SET": "reg_ok_panoptic_train",
                                   "TEST_SET": "reg_ok_panoptic_val"}


def test_class_list_defaults_to_the_json_categories(tmp_path, data_root):
    from detectron2.data import MetadataCatalog

    from mask2former.data.datasets.register_custom import register_custom_dataset

    path = _description(tmp_path, data_root, "from_json", edit=lambda d: d.pop("classes"))
    register_custom_dataset(path)
    assert MetadataCatalog.get("from_json_panoptic_train").class_ids == list(range(1, 11))


def test_a_segment_outside_the_class_list_names_file_image_and_fix(tmp_path, data_root):
    from detectron2.data import DatasetCatalog

    from mask2former.data.datasets.register_custom import ClassListMismatchError, register_custom_dataset

    def drop_bar(desc):
        desc["classes"] = [c for c in desc["classes"] if c["name"] != "bar"]

    def add_bar_segment(data):  # make sure some image has a "bar" (id 10)
        data["annotations"][0]["segments_info"][-1]["category_id"] = 10

    path = _description(tmp_path, data_root, "no_bar", edit=drop_bar, json_edit=add_bar_segment)
    register_custom_dataset(path)
    with pytest.raises(ClassListMismatchError) as err:
        DatasetCatalog.get("no_bar_panoptic_train")
    text = str(err.value)
    assert "unknown category id 10" in text and "synthetic_panoptic_train.json" in text
    assert path in text and "add the class to 'classes'" in text


def test_class_list_and_json_categories_must_agree(tmp_path, data_root):
    from detectron2.data import DatasetCatalog

    from mask2former.data.datasets.register_custom import ClassListMismatchError, register_custom_dataset

    def rename(desc):
        desc["classes"][2]["name"] = "lake"
        desc["classes"][5]["isthing"] = False

    register_custom_dataset(_description(tmp_path, data_root, "renamed", edit=rename))
    with pytest.raises(ClassListMismatchError) as err:
        DatasetCatalog.get("renamed_panoptic_train")
    assert "class 3 is 'lake' in the class list but 'water' in the json" in str(err.value)
    assert "class 6 ('disc') is a stuff class in the class list but isthing=1 in the json" in str(err.value)


def test_order_entries_must_be_classes_of_the_dataset(tmp_path, data_root):
    from conftest import build_cfg
    from continual.scenario import Scenario
    from mask2former.data.datasets.register_custom import ClassListMismatchError, register_custom_dataset

    register_custom_dataset(_description(tmp_path, data_root, "order_chk"))
    cfg = build_cfg(REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml",
                    ["DATASETS.TRAIN", '("order_chk_panoptic_train",)', "CONT.ORDER", "[1,2,3,4,5,6,7,8,9,11]"])
    with pytest.raises(ClassListMismatchError, match=r"CONT.ORDER has class ids \[11\] .*ids \[1, 2, .*10\]"):
        Scenario.from_config(cfg)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["splits"]["val"].pop("json"), r"split 'val' lacks \['json'\]"),
    (lambda d: d["classes"].append({"id": 300, "name": "x", "isthing": True}), "ids must be integers in 1..254"),
    (lambda d: d.update(name="has space"), "'name' must be a word"),
    (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
])
def test_malformed_descriptions(tmp_path, data_root, edit, message):
    from mask2former.data.datasets.register_custom import load_dataset_description

    with pytest.raises(ValueError, match=message):
        load_dataset_description(_description(tmp_path, data_root, "bad", edit=edit))


@pytest.mark.slow
def test_the_worked_example_runs_end_to_end(tmp_path):
    """docs/custom_dataset/run_example.sh on a small dataset with a few iterations: ECLIPSE on a
    scenario of one's own (class order, 6 base classes, steps of 2), then the joint upper bound."""
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_ROOT=str(tmp_path / "out"),
               DETECTRON2_DATASETS=str(tmp_path / "data"), NUM_TRAIN="24", NUM_VAL="4", SIZE="64",
               STEP0_ITERS="4", ITERS="2", NUM_GPUS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               EXTRA_ARGS="INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 64 MODEL.MASK_FORMER.TRAIN_NUM_POINTS 256")
    res = subprocess.run(["bash", str(REPO / "docs" / "custom_dataset" / "run_example.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    task = tmp_path / "out" / "sha-pan_6-2-ov"
    metrics = json.loads((task / "shapes_6_2" / "metrics.json").read_text())
    assert {"0", "1", "2", "2-eval"} <= set(metrics)
    joint = json.loads((task / "shapes_6_2_joint" / "metrics.json").read_text())["0"]["panoptic_seg"]
    for key in ("PQ", "PQ_base", "PQ_old", "PQ_new", "PQ_novel"):
        assert key in joint
    assert "| joint upper bound |" in res.stdout
    # the scenario's own order: cross and bar (9, 10) are step 1's classes
    config = yaml.safe_load((task / "shapes_6_2" / "step1" / "config.yaml").read_text())
    assert config["CONT"]["ORDER"] == [1, 2, 3, 4, 5, 6, 9, 10, 7, 8]
