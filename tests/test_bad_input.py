"""Bad input stops with a clear message, or is skipped when configured to; nothing is lost."""
import logging

import numpy as np
import pytest
import torch

from conftest import REPO, build_cfg

SYNTHETIC = REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_unreadable_image_is_named_or_skipped_when_configured(synthetic_data, caplog):
    import mask2former  # noqa: F401
    from detectron2.data import DatasetCatalog

    from mask2former.data.dataset_mappers import MaskFormerPanopticDatasetMapper
    from mask2former.data.dataset_mappers.file_reading import UnreadableFileError

    record = DatasetCatalog.get("synthetic_panoptic_train")[0]
    _truncate(synthetic_data / "synthetic" / "images" / "training" / record["file_name"].split("/")[-1])
    cfg = build_cfg(SYNTHETIC)
    with pytest.raises(UnreadableFileError, match=record["file_name"].split("/")[-1]):
        MaskFormerPanopticDatasetMapper(cfg, True)(record)

    cfg.DATALOADER.SKIP_UNREADABLE_FILES = True
    with caplog.at_level(logging.WARNING):
        assert MaskFormerPanopticDatasetMapper(cfg, True)(record) is None
    assert "skipping" in caplog.text and "SKIP_UNREADABLE_FILES" in caplog.text


def test_truncated_panoptic_annotation_is_named(synthetic_data):
    import mask2former  # noqa: F401
    from detectron2.data import DatasetCatalog

    from mask2former.data.dataset_mappers import MaskFormerPanopticDatasetMapper

    record = DatasetCatalog.get("synthetic_panoptic_train")[1]
    from pathlib import Path

    _truncate(Path(record["pan_seg_file_name"]))
    with pytest.raises(OSError, match="panoptic annotation.*" + Path(record["pan_seg_file_name"]).name):
        MaskFormerPanopticDatasetMapper(build_cfg(SYNTHETIC), True)(record)


def test_missing_dataset_root_names_the_path_and_the_command(tmp_path, monkeypatch):
    import mask2former  # noqa: F401
    from detectron2.data import DatasetCatalog

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get("myade20k_panoptic_train")
    assert "nowhere" in str(err.value) and "prepare_ade20k_pan_seg.py" in str(err.value)


def test_unknown_config_key_is_named_with_the_closest_known_key():
    from continual.config import merge_config

    cfg = build_cfg()
    with pytest.raises(KeyError) as err:
        merge_config(cfg, str(SYNTHETIC), ["CONT.NUM_PROMPT", "10"])
    assert "CONT.NUM_PROMPT in the command line" in str(err.value)
    assert "Did you mean CONT.NUM_PROMPTS" in str(err.value)


def test_setup_cfg_suggests_keys_and_needs_the_network_keys_first(tmp_path):
    from detectron2.config import get_cfg

    from continual.config import add_continual_config, setup_cfg

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {SYNTHETIC}\nCONT:\n  BACKBONE_FREEZ: True\n")
    with pytest.raises(KeyError) as err:
        setup_cfg(bad)
    assert f"CONT.BACKBONE_FREEZ in {bad}" in str(err.value) and "Did you mean CONT.BACKBONE_FREEZE" in str(err.value)
    cfg = setup_cfg(SYNTHETIC, ["CONT.TASK", "2"], freeze=True)
    assert cfg.CONT.TASK == 2 and cfg.is_frozen()
    with pytest.raises(KeyError, match="add_maskformer2_config"):
        add_continual_config(get_cfg())


def test_task_beyond_the_scenario_is_refused():
    from continual.scenario import Scenario

    cfg = build_cfg(SYNTHETIC, ["CONT.TASK", "3"])
    with pytest.raises(ValueError, match="CONT.TASK"):
        Scenario.from_config(cfg)


def test_non_finite_loss_stops_with_iteration_and_terms_and_keeps_the_checkpoint(synthetic_data, tmp_path):
    import mask2former  # noqa: F401
    from continual.config import setup_continual_names
    from continual.trainer import IncrementalTrainer

    cfg = build_cfg(SYNTHETIC, ["OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.MAX_ITER", "6",
                                "SOLVER.CHECKPOINT_PERIOD", "2", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
                                "INPUT.MIN_SIZE_TEST", "64", "CONT.RESULTS_DIR", str(tmp_path / "results")])
    setup_continual_names(cfg)
    trainer = IncrementalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    forward = trainer.model.forward

    def diverging(batched_inputs):
        losses = forward(batched_inputs)
        if trainer.iter == 3:
            losses["loss_dice"] = losses["loss_dice"] * float("nan")
        return losses

    trainer.model.forward = diverging
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    msg = str(err.value)
    assert "iteration=3" in msg and "loss_dice" in msg and "model_0000001.pth" in msg and "--resume" in msg
    step_dir = tmp_path / "out" / cfg.TASK_NAME / cfg.NAME / "step0"
    assert (step_dir / "model_0000001.pth").is_file()
    assert not (step_dir / "model_final.pth").exists()
    saved = torch.load(step_dir / "model_0000001.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())


@pytest.mark.parametrize("content", ["{\"annotations\": [", "[]", "{}"])
def test_invalid_panoptic_json_is_named(synthetic_data, content):
    import mask2former  # noqa: F401
    from detectron2.data import DatasetCatalog

    json_file = synthetic_data / "synthetic" / "synthetic_panoptic_train.json"
    json_file.write_text(content)
    with pytest.raises(ValueError) as err:
        DatasetCatalog.get("synthetic_panoptic_train")
    assert str(json_file) in str(err.value) and "Prepare it again" in str(err.value)


def test_unreadable_training_image_message_names_the_skip_key(synthetic_data):
    import mask2former  # noqa: F401
    from detectron2.data import DatasetCatalog

    from mask2former.data.dataset_mappers import MaskFormerPanopticDatasetMapper

    record = DatasetCatalog.get("synthetic_panoptic_train")[2]
    from pathlib import Path

    _truncate(Path(record["file_name"]))
    with pytest.raises(OSError) as err:
        MaskFormerPanopticDatasetMapper(build_cfg(SYNTHETIC), True)(record)
    assert Path(record["file_name"]).name in str(err.value) and "DATALOADER.SKIP_UNREADABLE_FILES" in str(err.value)


def test_truncated_validation_image_is_named_with_what_to_do(synthetic_data):
    import mask2former  # noqa: F401
    from detectron2.data import DatasetCatalog, DatasetMapper

    from continual.data import build_step_test_loader
    from mask2former.data.dataset_mappers.file_reading import UnreadableFileError

    record = DatasetCatalog.get("synthetic_panoptic_val")[1]
    from pathlib import Path

    _truncate(Path(record["file_name"]))
    cfg = build_cfg(SYNTHETIC, ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
    loader = build_step_test_loader(cfg, "synthetic_panoptic_val", DatasetMapper(cfg, False))
    with pytest.raises(UnreadableFileError) as err:
        for _ in loader:
            pass
    assert Path(record["file_name"]).name in str(err.value) and "--resume" in str(err.value)


def test_flags_are_accepted_after_the_overrides():
    from detectron2.engine import default_argument_parser

    from continual.cli import move_flags_first

    parser = default_argument_parser()
    argv = ["--config-file", "c.yaml", "CONT.TASK", "1", "SOLVER.BASE_LR", "-1e-4", "--resume", "--num-gpus", "2",
            "--eval-only", "NAME", "x"]
    args = parser.parse_args(move_flags_first(parser, argv))
    assert args.resume and args.eval_only and args.num_gpus == 2 and args.config_file == "c.yaml"
    assert args.opts == ["CONT.TASK", "1", "SOLVER.BASE_LR", "-1e-4", "NAME", "x"]


def test_an_int_is_accepted_for_a_float_key():
    from continual.config import merge_config

    cfg = build_cfg()
    merge_config(cfg, str(SYNTHETIC), ["CONT.DIST.KD_WEIGHT", "10", "SOLVER.BASE_LR", "1"])
    assert cfg.CONT.DIST.KD_WEIGHT == 10.0 and isinstance(cfg.CONT.DIST.KD_WEIGHT, float)
    assert isinstance(cfg.SOLVER.BASE_LR, float)
    with pytest.raises(ValueError):  # other type mismatches are still refused
        merge_config(build_cfg(), str(SYNTHETIC), ["CONT.TASK", "1.5"])


def test_an_int_is_accepted_for_a_float_key_in_a_config_file(tmp_path):
    from continual.config import merge_config

    config = tmp_path / "int_for_float.yaml"
    config.write_text(f"_BASE_: {SYNTHETIC}\nSOLVER:\n  BASE_LR: 1\nCONT:\n  DIST:\n    KD_WEIGHT: 10\n")
    cfg = merge_config(build_cfg(), str(config), [])
    assert cfg.CONT.DIST.KD_WEIGHT == 10.0 and isinstance(cfg.CONT.DIST.KD_WEIGHT, float)
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert cfg.MODEL.META_ARCHITECTURE == build_cfg(SYNTHETIC).MODEL.META_ARCHITECTURE  # the _BASE_ file merged
    config.write_text(f"_BASE_: {SYNTHETIC}\nCONT:\n  TASK: 1.5\n")
    with pytest.raises(ValueError):  # other type mismatches are still refused
        merge_config(build_cfg(), str(config), [])
    config.write_text(f"_BASE_: {SYNTHETIC}\nCONT:\n  NOT_A_KEY: 1\n")
    with pytest.raises(KeyError, match="unknown config key CONT.NOT_A_KEY"):
        merge_config(build_cfg(), str(config), [])


def test_broken_official_class_loss_combination_is_refused():
    from mask2former.maskformer_model import build_criterion

    cfg = build_cfg(SYNTHETIC, ["MODEL.MASK_FORMER.FOCAL", "False", "CONT.SOFTCLS", "False"])
    with pytest.raises(NotImplementedError, match="FOCAL=False with CONT.SOFTCLS=False"):
        build_criterion(cfg, 5)
    cfg = build_cfg(SYNTHETIC, ["MODEL.MASK_FORMER.FOCAL", "True", "CONT.SOFTCLS", "False"])
    assert build_criterion(cfg, 5).class_loss == "focal"
