"""The ADE20K panoptic preparation reproduces the official one.

``tests/fixtures/ade20k_panoptic_preparation/<fixture>/`` hold raw annotations and the output the
official preparation script wrote for them (see the README there); every such folder is a test
case. The rules themselves are also tested on small hand-made arrays.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, load_script

prepare = load_script("datasets/prepare_ade20k_pan_seg.py")
check_preparation = load_script("tools/check_preparation.py")

PREPARATION_FIXTURES = sorted(
    p for p in (FIXTURES / "ade20k_panoptic_preparation").iterdir() if check_preparation.is_fixture(str(p))
)
MAPPING = prepare.builtin_catid_mapping()


def test_there_are_preparation_fixtures():
    assert PREPARATION_FIXTURES, "tests/fixtures/ade20k_panoptic_preparation/ holds no fixture"


@pytest.mark.parametrize("fixture", PREPARATION_FIXTURES, ids=lambda p: p.name)
def test_preparation_reproduces_official_output(fixture, tmp_path):
    """Same images, same segments in the same order with the same category_id, area, bbox and
    iscrowd, and the same pixels per segment (ids and colours are free)."""
    raw = fixture / "raw" / "ADEChallengeData2016"
    manifest = json.loads((fixture / "manifest.json").read_text())
    splits = [s for s in ("train", "val") if (fixture / "official" / f"myade20k_panoptic_{s}.json").is_file()]
    assert splits
    for split in splits:
        ours = prepare.prepare_split(str(raw), split, workers=1, output_dir=str(tmp_path))
        name = f"myade20k_panoptic_{split}"
        problems, results = check_preparation.compare_split(
            split, str(fixture / "official" / f"{name}.json"), str(fixture / "official" / name),
            ours, str(tmp_path / name))
        report = check_preparation.format_results(problems, results)
        assert not problems and results and all(r.ok for r in results), report
        # the fixture exercises the official rules: some listed areas differ from the visible pixels
        stats = manifest.get("stats", {}).get(split)
        if stats:
            assert len(results) == stats["images"]
            assert sum(len(r.segments) for r in results) == stats["segments"]
            data = json.loads(Path(ours).read_text())
            differ = 0
            for ann in data["annotations"]:
                ids = check_preparation._read_ids(str(tmp_path / name / ann["file_name"]))
                differ += sum(s["area"] != int((ids == s["id"]).sum()) for s in ann["segments_info"])
            assert differ == stats["segments_whose_area_differs_from_their_pixels"]


def test_check_preparation_tool_passes_on_the_fixtures(capsys):
    assert check_preparation.main([str(FIXTURES / "ade20k_panoptic_preparation"), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert out.count("PASS train ") + out.count("PASS val ") >= len(PREPARATION_FIXTURES)
    assert "PASS segment 1:" in out
    assert out.rstrip().splitlines()[-1].startswith(f"PASS: {len(PREPARATION_FIXTURES)}/{len(PREPARATION_FIXTURES)} fixtures")


@pytest.mark.slow
def test_check_preparation_command_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    fixture = PREPARATION_FIXTURES[0]
    done = subprocess.run([sys.executable, str(REPO / "tools" / "check_preparation.py"), str(fixture)],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS: 1/1 fixtures" in done.stdout


def _corrupted_copy(tmp_path):
    src = PREPARATION_FIXTURES[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_check_preparation_tool_fails_on_a_corrupted_expected_output(tmp_path, capsys):
    fixture = _corrupted_copy(tmp_path)
    json_file = fixture / "official" / "myade20k_panoptic_val.json"
    data = json.loads(json_file.read_text())
    ann = data["annotations"][0]
    ann["segments_info"][0]["area"] += 1                       # a stuff area measured differently
    ann["segments_info"][1]["bbox"] = [float(v) for v in ann["segments_info"][1]["bbox"]]  # float box
    json_file.write_text(json.dumps(data))
    assert check_preparation.main([str(fixture)]) == 1
    out = capsys.readouterr().out
    image_id = ann["image_id"]
    assert f"FAIL val {image_id}" in out
    assert "FAIL segment 1: area" in out and "FAIL segment 2: bbox" in out
    assert out.rstrip().splitlines()[-1].startswith("FAIL: 0/1 fixtures")


def test_check_preparation_tool_fails_on_changed_pixels_and_order(tmp_path, capsys):
    fixture = _corrupted_copy(tmp_path)
    json_file = fixture / "official" / "myade20k_panoptic_train.json"
    data = json.loads(json_file.read_text())
    ann = data["annotations"][1]
    segs = ann["segments_info"]
    segs[0], segs[1] = segs[1], segs[0]                        # another segment order
    json_file.write_text(json.dumps(data))
    png = fixture / "official" / "myade20k_panoptic_train" / data["annotations"][0]["file_name"]
    rgb = np.array(Image.open(png).convert("RGB"))
    rgb[-1, -1] = 0                                            # one pixel made void
    Image.fromarray(rgb).save(png)
    assert check_preparation.main([str(fixture)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL train {data['annotations'][0]['image_id']}" in out and "1 pixels differ" in out
    assert f"FAIL train {ann['image_id']}" in out and "category_id" in out
    assert f"PASS train {data['annotations'][2]['image_id']}" in out


def test_check_preparation_tool_rejects_a_folder_that_is_no_fixture(tmp_path, capsys):
    assert check_preparation.main([str(tmp_path)]) == 2
    assert "not an ADE20K panoptic-preparation fixture" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the rules
def _labels(h=6, w=8):
    return np.zeros((h, w), np.uint8), np.zeros((h, w, 3), np.uint8)


def test_stuff_area_is_measured_before_instances_and_hidden_stuff_is_kept():
    sem, ins = _labels()
    sem[:3], sem[3:] = 1, 4                  # wall, floor
    sem[4, 0] = 3                            # one sky pixel, hidden below
    ins[3:, :2] = (4, 1, 0)                  # a person (instance category 4 -> 13) over floor and sky
    id_map, segs = prepare.convert_annotation(sem, ins, MAPPING)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in segs] == [
        (1, 1, 0, 24), (2, 3, 0, 1), (3, 4, 0, 23), (4, 13, 1, 6)]
    assert segs[1]["bbox"] == [0, 4, 1, 1] and segs[2]["bbox"] == [0, 3, 8, 3]
    assert all(type(v) is int for s in segs for v in s["bbox"] + [s["area"], s["iscrowd"], s["id"]])
    assert not (id_map == 2).any()                              # the sky is hidden but listed
    assert (id_map[3:, :2] == 4).all() and int((id_map == 3).sum()) == 23 - 5
    assert all(s["iscrowd"] == 0 for s in segs)


def test_segment_order_void_labels_and_uncovered_thing_pixels():
    sem, ins = _labels()
    sem[:, :2], sem[:, 2:4], sem[:, 4:6], sem[:, 6:] = 255, 12, 0, 8   # ignore, sidewalk, other, bed
    sem[0, 0] = 2                                                       # building
    ins[:2, 6:] = (1, 9, 0)                  # bed (instance category 1 -> 8), index 9
    ins[4:, 6:] = (2, 3, 0)                  # window (2 -> 9), index 3: drawn over bed-labelled pixels
    ins[5, 0] = (7, 0, 0)                    # a category without an index: no instance
    id_map, segs = prepare.convert_annotation(sem, ins, MAPPING)
    # stuff by increasing class id, then instances by increasing index (not by category)
    assert [(s["category_id"], s["area"]) for s in segs] == [(2, 1), (12, 12), (9, 4), (8, 4)]
    assert (id_map[:, 4:6] == 0).all() and (id_map[1:, :2] == 0).all()  # 0 and 255 stay void
    assert (id_map[2:4, 6:] == 0).all()      # bed pixels without an instance are void


def test_instances_in_index_order_and_thing_classes_from_the_mapping():
    sem, ins = _labels()
    sem[:] = 1
    ins[:, :4] = (3, 2, 0)
    ins[:, 4:] = (3, 1, 0)
    _, segs = prepare.convert_annotation(sem, ins, MAPPING)
    assert [(s["category_id"], s["bbox"]) for s in segs] == [(1, [0, 0, 8, 6]), (11, [4, 0, 4, 6]), (11, [0, 0, 4, 6])]
    # with a mapping that makes wall (1) a thing class, wall pixels are no stuff segment
    _, segs = prepare.convert_annotation(sem, ins, {3: 1})
    assert [(s["category_id"], s["isthing"]) for s in segs] == [(1, 1), (1, 1)]
    categories = prepare.panoptic_categories({3: 1})
    assert [c["id"] for c in categories if c["isthing"]] == [1]
    assert prepare.panoptic_categories() == [{**c} for c in prepare.ADE20K_150_CATEGORIES]


@pytest.mark.parametrize("change, message", [
    (lambda sem, ins: sem.__setitem__((0, 0), 151), "semantic label 151"),
    (lambda sem, ins: ins.__setitem__((0, 0), (5, 1, 0)), "instance 1"),          # two categories
    (lambda sem, ins: ins.__setitem__((slice(None), 7), (0, 2, 0)), "instance 2"),  # category 0
    (lambda sem, ins: ins.__setitem__((slice(None), 7), (101, 2, 0)), "instance 2"),  # not mapped
])
def test_inputs_the_official_script_cannot_convert_are_errors(change, message):
    sem, ins = _labels()
    sem[:] = 1
    ins[:2, :2] = (4, 1, 0)
    change(sem, ins)
    with pytest.raises(ValueError, match=message) as err:
        prepare.convert_annotation(sem, ins, MAPPING, name="some/file.png")
    assert "some/file.png" in str(err.value)


def _write_tree(root: Path, n=2, h=12, w=16):
    ade = root / "ADEChallengeData2016"
    rng = np.random.default_rng(3)
    for sub in ("images", "annotations", "annotations_instance"):
        (ade / sub / "training").mkdir(parents=True)
    for i in range(1, n + 1):
        stem = f"ADE_train_{i:08d}"
        sem = rng.choice(np.array([0, 1, 3, 4, 8], np.uint8), size=(h, w))
        ins = np.zeros((h, w, 3), np.uint8)
        ins[2:6, 3:9] = (1, 1, 0)
        ins[7:, 10:] = (4, 2, 0)
        Image.fromarray(sem).save(ade / "annotations" / "training" / f"{stem}.png")
        Image.fromarray(ins).save(ade / "annotations_instance" / "training" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            ade / "images" / "training" / f"{stem}.jpg")
    return ade


def test_output_is_deterministic_and_written_atomically(tmp_path):
    ade = _write_tree(tmp_path)
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        prepare.prepare_split(str(ade), "train", output_dir=str(out))
        outputs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0]) == ["myade20k_panoptic_train.json", "myade20k_panoptic_train/ADE_train_00000001.png",
                                  "myade20k_panoptic_train/ADE_train_00000002.png"]  # no temporary file left
    assert not (ade / "myade20k_panoptic_train.json").exists()  # --output-dir leaves the dataset alone


def test_a_failing_image_leaves_no_partial_json(tmp_path):
    ade = _write_tree(tmp_path)
    bad = ade / "annotations" / "training" / "ADE_train_00000002.png"
    Image.fromarray(np.full((12, 16), 200, np.uint8)).save(bad)
    with pytest.raises(ValueError, match="semantic label 200"):
        prepare.prepare_split(str(ade), "train")
    assert not (ade / "myade20k_panoptic_train.json").exists()
    assert not [p for p in (ade / "myade20k_panoptic_train").iterdir() if p.name.startswith(".")]


def test_label_images_of_the_wrong_kind_are_named(tmp_path):
    ade = _write_tree(tmp_path)
    bad = ade / "annotations_instance" / "training" / "ADE_train_00000001.png"
    good = bad.read_bytes()
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(bad)
    with pytest.raises(ValueError, match="must be an RGB PNG") as err:
        prepare.prepare_split(str(ade), "train")
    assert str(bad) in str(err.value)
    bad.write_bytes(good)
    bad = ade / "annotations" / "training" / "ADE_train_00000001.png"
    Image.fromarray(np.zeros((10, 16), np.uint8)).save(bad)
    with pytest.raises(ValueError, match="differs from image") as err:
        prepare.prepare_split(str(ade), "train")
    assert str(bad) in str(err.value)


def test_catid_mapping_file_is_validated(tmp_path):
    path = tmp_path / "mapping.txt"
    path.write_text("Instance100\tSceneParse150\tFull\n1\t151\t0\n")
    with pytest.raises(ValueError, match=f"{path}:2: semantic id 151"):
        prepare.read_catid_mapping(str(path))


def test_images_are_listed_in_the_official_order(tmp_path):
    for name in ("b.jpg", "a-b.jpg", "a.jpg", ".hidden.jpg", "c.png"):
        (tmp_path / name).write_bytes(b"")
    assert prepare.list_images(str(tmp_path)) == [("a-b", "a-b.jpg"), ("a", "a.jpg"), ("b", "b.jpg")]
    (tmp_path / "a.x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="same image id 'a'"):
        prepare.list_images(str(tmp_path))


def test_official_output_loads_unchanged(tmp_path, monkeypatch):
    """Files written by the official script load under the official names, hidden stuff segments
    (listed, no pixel) included with their official areas; the mapper gives them empty masks."""
    from detectron2.data import DatasetCatalog

    from mask2former.data.dataset_mappers import MaskFormerPanopticDatasetMapper

    fixture = PREPARATION_FIXTURES[0]
    ade = tmp_path / "ADEChallengeData2016"
    shutil.copytree(fixture / "raw" / "ADEChallengeData2016", ade)
    for p in (fixture / "official").iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, ade / p.name)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    official = json.loads((ade / "myade20k_panoptic_val.json").read_text())
    records = DatasetCatalog.get("myade20k_panoptic_val")
    assert [r["image_id"] for r in records] == [a["image_id"] for a in official["annotations"]]
    hidden = 0
    mapper = MaskFormerPanopticDatasetMapper(True, augmentations=[], image_format="RGB", ignore_label=255,
                                             size_divisibility=-1, remove_bkg=False)
    for record, ann in zip(records, official["annotations"]):
        assert [(s["id"], s["category_id"], s["area"]) for s in record["segments_info"]] == [
            (s["id"], s["category_id"], s["area"]) for s in ann["segments_info"]]
        out = mapper(dict(record))
        masks = out["instances"].gt_masks
        assert masks.shape[0] == len(ann["segments_info"])
        hidden += int((masks.flatten(1).sum(1) == 0).sum())
    assert hidden >= 1  # the fixture has completely hidden stuff segments
