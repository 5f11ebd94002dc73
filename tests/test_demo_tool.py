"""tools/demo.py: overlays and segments of a checkpoint on image files, folders and globs; a
checkpoint of another step stops with the keys involved."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, build_cfg, load_script

TINY = REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml"
SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
STEP1 = ["CONT.TASK", "1", "CONT.NUM_PROMPTS", "4", "MODEL.MASK_FORMER.CLASS_WEIGHT", "10.0",
         "CONT.LOGIT_MANI_DELTAS", "[0.4,0.6]"]
NAMES = {"sky", "grass", "water", "sand", "square", "disc", "triangle", "ring", "cross", "bar"}


demo = load_script("tools/demo.py")


def _save_checkpoint(opts, folder, name):
    import mask2former  # noqa: F401
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(build_cfg(TINY, opts))
    with torch.no_grad():  # make some queries predict classes so that the overlays show segments
        for p in model.sem_seg_head.predictor.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    DetectionCheckpointer(model, save_dir=str(folder)).save(name)
    return folder / f"{name}.pth"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from mask2former.data.datasets.synthetic import render_sample

    root = tmp_path_factory.mktemp("demo_tool")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        image, _, _ = render_sample(np.random.default_rng(i), 64, 64)
        Image.fromarray(image).save(images / f"img_{i}.png")
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "images": images,
            "step0": _save_checkpoint(SMALL, root, "step0"),
            "step1": _save_checkpoint(SMALL + STEP1, root, "step1")}


def _run_tool(*args):
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--config-file", str(TINY), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)


def _check_record(record, max_position, overlays):
    assert set(overlays) <= set(record)
    for key in overlays:
        with Image.open(record[key]) as im:
            assert im.size[0] >= 64 and im.size[1] >= 64
    for key in ("panoptic_segments", "semantic_segments"):
        for seg in record.get(key, []):
            assert 1 <= seg["category_id"] <= max_position
            assert seg["dataset_id"] == seg["category_id"]  # identity order
            assert seg["name"] in NAMES and seg["area"] > 0


@pytest.mark.slow
def test_demo_on_a_folder_writes_overlays_and_segments(assets, tmp_path):
    out = tmp_path / "vis"
    res = _run_tool("--weights", assets["step0"], "--input", assets["images"], "--output", out, *SMALL)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for i in range(3):
        assert (out / f"img_{i}_panoptic.png").is_file()
        record = json.loads((out / f"img_{i}.json").read_text())
        assert record["file_name"] == str(assets["images"] / f"img_{i}.png")
        assert (record["height"], record["width"]) == (64, 64)
        _check_record(record, 6, ["panoptic_overlay"])
        assert "semantic_segments" not in record
    assert not list(out.glob("notes*"))
    assert any(json.loads((out / f"img_{i}.json").read_text())["panoptic_segments"] for i in range(3))


@pytest.mark.slow
def test_demo_on_a_glob_with_a_later_step_and_both_outputs(assets, tmp_path):
    out = tmp_path / "vis"
    pattern = str(assets["images"] / "img_[12].png")
    res = _run_tool("--weights", assets["step1"], "--input", pattern, "--output", out, "--mode", "both",
                    *SMALL, *STEP1)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.json")) == ["img_1.json", "img_2.json"]
    for i in (1, 2):
        record = json.loads((out / f"img_{i}.json").read_text())
        assert record["config_task"] == 1
        _check_record(record, 8, ["panoptic_overlay", "semantic_overlay"])


def test_checkpoint_of_another_step_stops_with_the_keys(assets, tmp_path, capsys):
    code = demo.main(["--config-file", str(TINY), "--weights", str(assets["step0"]), "--input",
                      str(assets["images"]), "--output", str(tmp_path / "vis"), *SMALL, *STEP1])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit the model for CONT.TASK 1" in err
    assert "prompt_feat.0.weight" in err and "missing keys" in err
    assert not (tmp_path / "vis").exists()


def test_missing_inputs_and_checkpoints_are_named(assets, tmp_path, capsys):
    code = demo.main(["--config-file", str(TINY), "--weights", str(assets["step0"]), "--input",
                      str(tmp_path / "nothing" / "*.png"), "--output", str(tmp_path / "vis")])
    assert code == 2 and "nothing" in capsys.readouterr().err
    code = demo.main(["--config-file", str(TINY), "--weights", str(tmp_path / "missing.pth"), "--input",
                      str(assets["images"]), "--output", str(tmp_path / "vis")])
    assert code == 2 and "missing.pth" in capsys.readouterr().err


def test_expand_inputs_files_folders_globs(assets):
    folder = assets["images"]
    files = demo.expand_inputs([str(folder / "img_2.png"), str(folder), str(folder / "img_?.png")])
    assert [os.path.basename(f) for f in files] == ["img_2.png", "img_0.png", "img_1.png"]


def test_class_names_follow_the_class_order():
    order = [3, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    cfg, mode = demo.setup_cfg(str(TINY), ["CONT.ORDER", str(order)])
    assert mode == "panoptic"
    classes = demo.class_table(cfg)
    assert classes.names[:4] == ["void", "water", "sky", "grass"]
    assert classes.dataset_ids[1:4] == [3, 1, 2]
    assert classes.isthing[1:6] == [False, False, False, False, True]
    assert classes.describe(1) == {"category_id": 1, "dataset_id": 3, "name": "water"}
    meta = classes.metadata()
    assert meta.stuff_classes[1] == "water" and meta.thing_colors[1] == [40, 190, 200]


def test_draw_semantic_skips_pixels_without_a_class():
    cfg, _ = demo.setup_cfg(str(TINY), ["CONT.TASK", "0"], mode="semantic")
    classes = demo.class_table(cfg)
    image = np.full((64, 64, 3), 128, np.uint8)
    labels = np.zeros((64, 64), np.int64)
    labels[:16] = 2
    drawn = demo.draw_semantic(image, labels, classes, scale=1.0)
    assert drawn.shape == (64, 64, 3)
    assert (drawn[40:, :] == 128).all()  # no class: left as it was
    assert not (drawn[:16] == 128).all()
    assert demo.semantic_segments(labels, classes) == [
        {"category_id": 2, "dataset_id": 2, "name": "grass", "area": 1024}]


def test_a_bad_image_is_reported_and_the_others_are_written(assets, tmp_path, capsys):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(assets["images"], images)
    data = (images / "img_1.png").read_bytes()
    (images / "img_1.png").write_bytes(data[: len(data) // 3])
    out = tmp_path / "vis"
    code = demo.main(["--config-file", str(TINY), "--weights", str(assets["step0"]), "--input", str(images),
                      "--output", str(out), *SMALL])
    err = capsys.readouterr().err
    assert code == 1
    assert "img_1.png" in err and "1 of 3 image(s)" in err
    assert sorted(p.name for p in out.glob("*.json")) == ["img_0.json", "img_2.json"]
    assert (out / "img_0_panoptic.png").is_file() and (out / "img_2_panoptic.png").is_file()
    assert not list(out.glob(".*.tmp"))
