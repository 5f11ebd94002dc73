"""Nothing a user trained is lost or silently wrong: damaged final checkpoints are repaired by
--resume, changed solver keys are applied on resume (the NaN advice works), the checkpoint a run
resumed from is cleaned up, and incomplete backbones stop."""
import hashlib
import logging
import pickle

import pytest
import torch

from conftest import REPO, build_cfg

SYNTHETIC = REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml"
SMALL = ["MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]


def _cfg(tmp_path, *opts):
    from continual.config import setup_continual_names

    cfg = build_cfg(SYNTHETIC, ["OUTPUT_DIR", str(tmp_path / "out"), "CONT.RESULTS_DIR", str(tmp_path / "results"),
                                *SMALL, *opts])
    setup_continual_names(cfg)
    return cfg


def _trainer(cfg, resume):
    import mask2former  # noqa: F401
    from continual.trainer import IncrementalTrainer

    trainer = IncrementalTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_resume_rewrites_a_truncated_final_checkpoint(synthetic_data, tmp_path):
    from continual.checkpoint_io import UnreadableCheckpointError
    from continual.trainer import StepAlreadyFinishedError

    cfg = _cfg(tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2")
    _trainer(cfg, resume=False).train()
    step_dir = tmp_path / "out" / cfg.TASK_NAME / cfg.NAME / "step0"
    final, periodic = step_dir / "model_final.pth", step_dir / "model_0000003.pth"
    good = _weights(final)
    # a process killed while writing model_final.pth non-atomically (MAX_ITER a multiple of
    # CHECKPOINT_PERIOD): the file is truncated and last_checkpoint still names the periodic one
    final.write_bytes(final.read_bytes()[:1000])
    (step_dir / "last_checkpoint").write_text("model_0000003.pth")
    periodic_sha = _sha(periodic)

    # a plain rerun does not call the step trained, and says how to repair it
    with pytest.raises(UnreadableCheckpointError) as err:
        _trainer(cfg, resume=False)
    assert str(final) in str(err.value) and "--resume" in str(err.value)
    assert _sha(periodic) == periodic_sha

    # --resume rewrites it from the last good state (and evaluates the step)
    (tmp_path / "results").exists() and [p.unlink() for p in (tmp_path / "results").iterdir()]
    _trainer(cfg, resume=True).train()
    repaired = _weights(final)
    assert repaired.keys() == good.keys() and all(torch.equal(good[k], repaired[k]) for k in good)
    assert (tmp_path / "results" / f"{cfg.TASK_NAME}.csv").is_file()
    with pytest.raises(StepAlreadyFinishedError):
        _trainer(cfg, resume=False)

    # last_checkpoint naming the damaged final file: the newest intact checkpoint is used instead
    final.write_bytes(b"")
    (step_dir / "last_checkpoint").write_text("model_final.pth")
    _trainer(cfg, resume=True).train()
    repaired = _weights(final)
    assert all(torch.equal(good[k], repaired[k]) for k in good)


@pytest.mark.slow
def test_the_nan_advice_works_lower_the_lr_and_resume(synthetic_data, tmp_path, caplog):
    cfg = _cfg(tmp_path, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.BASE_LR", "0.01")
    trainer = _trainer(cfg, resume=False)

    def diverge_when_lr_is_high(model):
        forward = model.forward

        def wrapped(batched_inputs):
            losses = forward(batched_inputs)
            if trainer.iter >= 3 and max(g["lr"] for g in trainer.optimizer.param_groups) > 1e-3:
                losses["loss_dice"] = losses["loss_dice"] * float("nan")
            return losses

        model.forward = wrapped

    diverge_when_lr_is_high(trainer.model)
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    msg = str(err.value)
    assert "SOLVER.BASE_LR" in msg and "--resume" in msg and "model_0000001.pth" in msg

    lower = cfg.clone()
    lower.defrost()
    lower.SOLVER.BASE_LR = 0.0001
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(lower, resume=True)
    assert "SOLVER" in caplog.text and "0.01" in caplog.text and "0.0001" in caplog.text
    assert trainer.start_iter == 2
    assert max(g["lr"] for g in trainer.optimizer.param_groups) <= 1e-4
    diverge_when_lr_is_high(trainer.model)
    trainer.train()
    step_dir = tmp_path / "out" / cfg.TASK_NAME / cfg.NAME / "step0"
    assert (step_dir / "model_final.pth").is_file()
    # the checkpoint the resumed run started from is cleaned up like any older periodic one
    assert not (step_dir / "model_0000001.pth").exists()
    assert (step_dir / "model_0000005.pth").is_file()


def _r18_backbone_pkl(path, drop=(), rename=None):
    """A detectron2-style ImageNet initialisation (.pkl, numpy arrays, no head) of the tiny R18."""
    import mask2former  # noqa: F401
    from detectron2.modeling import build_model

    model = build_model(build_cfg(SYNTHETIC, SMALL))
    arrays = {k[len("backbone."):]: v.numpy() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    for prefix in drop:
        arrays = {k: v for k, v in arrays.items() if not k.startswith(prefix)}
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test", "matching_heuristics": True}, f)
    return path


@pytest.mark.slow
def test_step0_backbone_initialisation_must_cover_the_backbone(synthetic_data, tmp_path):
    from continual.checkpoint import CheckpointMismatchError

    full = _r18_backbone_pkl(tmp_path / "r18.pkl")
    _trainer(_cfg(tmp_path, "MODEL.WEIGHTS", str(full), "NAME", "ok"), resume=False)  # head missing: fine

    partial = _r18_backbone_pkl(tmp_path / "r18_partial.pkl", drop=("res5.",))
    with pytest.raises(CheckpointMismatchError) as err:
        _trainer(_cfg(tmp_path, "MODEL.WEIGHTS", str(partial), "NAME", "partial"), resume=False)
    assert "r18_partial.pkl" in str(err.value) and "backbone.res5" in str(err.value)
    assert "MODEL.RESNETS.DEPTH" in str(err.value)
