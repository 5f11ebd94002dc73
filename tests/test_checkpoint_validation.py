"""Checkpoints that do not fit CONT.TASK stop with the keys involved (eval-only safety)."""
import pickle

import pytest
import torch
from detectron2.modeling import build_model

import mask2former  # noqa: F401
from conftest import FIXTURES, build_cfg
from continual.checkpoint import CheckpointMismatchError, check_checkpoint_for_step, checkpoint_step, read_model_state

TINY = FIXTURES / "ade_ps_t3_deltas_pos" / "config.yaml"


def _model(*opts):
    return build_model(build_cfg(TINY, list(opts)))


@pytest.fixture(scope="module")
def models():
    return {t: _model("CONT.TASK", str(t)) for t in (1, 2, 3)}


def test_matching_checkpoints_pass(models):
    check_checkpoint_for_step(models[3].state_dict(), models[3], 3, previous_step=False)
    check_checkpoint_for_step(models[2].state_dict(), models[3], 3, previous_step=True)
    assert checkpoint_step(models[3].state_dict()) == 3
    assert checkpoint_step(models[1].state_dict()) == 1


def test_eval_with_a_checkpoint_of_an_earlier_step_names_missing_prompts(models):
    with pytest.raises(CheckpointMismatchError) as err:
        check_checkpoint_for_step(models[2].state_dict(), models[3], 3, previous_step=False, source="final.pth")
    msg = str(err.value)
    assert "final.pth" in msg and "prompt_feat.2.weight" in msg and "class_embed.cls.4" in msg
    assert "CONT.TASK 2" in msg


def test_eval_with_a_checkpoint_of_a_later_step_names_unexpected_keys(models):
    with pytest.raises(CheckpointMismatchError) as err:
        check_checkpoint_for_step(models[3].state_dict(), models[2], 2, previous_step=False)
    msg = str(err.value)
    assert "unexpected" in msg and "prompt_feat.2.weight" in msg and "CONT.TASK 3" in msg


def test_wrong_class_split_names_the_shapes(models):
    other = _model("CONT.TASK", "3", "CONT.INC_CLS", "10")
    with pytest.raises(CheckpointMismatchError) as err:
        check_checkpoint_for_step(other.state_dict(), models[3], 3, previous_step=False)
    assert "class_embed.cls.2.layers.2.weight" in str(err.value)
    assert "CONT.INC_CLS" in str(err.value)


def test_wrong_prompt_count_names_the_shapes(models):
    other = _model("CONT.TASK", "3", "CONT.NUM_PROMPTS", "6")
    with pytest.raises(CheckpointMismatchError, match="prompt_feat.0.weight"):
        check_checkpoint_for_step(other.state_dict(), models[3], 3, previous_step=False)


def test_starting_a_step_from_its_own_checkpoint_is_refused(models):
    with pytest.raises(CheckpointMismatchError, match="--resume"):
        check_checkpoint_for_step(models[3].state_dict(), models[3], 3, previous_step=True)


def test_starting_a_step_with_missing_old_prompts_is_refused(models):
    sd = models[2].state_dict()
    sd.pop("sem_seg_head.predictor.prompt_feat.0.weight")
    with pytest.raises(CheckpointMismatchError, match="prompt_feat.0.weight"):
        check_checkpoint_for_step(sd, models[3], 3, previous_step=True)


def test_shallow_prompts_checkpoint_for_deep_model_is_refused(models):
    shallow = _model("CONT.TASK", "3", "CONT.PROMPT_DEEP", "False")
    with pytest.raises(CheckpointMismatchError, match="CONT.PROMPT_DEEP"):
        check_checkpoint_for_step(shallow.state_dict(), models[3], 3, previous_step=False)


def test_read_model_state_of_every_checkpoint_layout(tmp_path):
    weights = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2)}
    torch.save({"model": weights, "iteration": 5, "optimizer": {}}, tmp_path / "trainer.pth")
    torch.save(weights, tmp_path / "bare.pth")
    with open(tmp_path / "d2.pkl", "wb") as f:  # detectron2 model-zoo layout: numpy arrays
        pickle.dump({"model": {k: v.numpy() for k, v in weights.items()}, "__author__": "x"}, f)
    for name in ("trainer.pth", "bare.pth", "d2.pkl"):
        state = read_model_state(str(tmp_path / name))
        assert set(state) == set(weights), name
        for key, value in weights.items():
            assert isinstance(state[key], torch.Tensor) and torch.equal(state[key], value), (name, key)


def test_missing_backbone_keys_stop_with_the_likely_cause(models):
    sd = {k: v for k, v in models[3].state_dict().items() if not k.startswith("backbone.res5.")}
    with pytest.raises(CheckpointMismatchError) as err:
        check_checkpoint_for_step(sd, models[3], 3, previous_step=False, source="nobackbone.pth")
    msg = str(err.value)
    assert "nobackbone.pth" in msg and "backbone.res5" in msg and "MODEL.RESNETS.DEPTH" in msg
    head_only = {k: v for k, v in models[2].state_dict().items() if not k.startswith("backbone.")}
    with pytest.raises(CheckpointMismatchError, match="without its backbone"):
        check_checkpoint_for_step(head_only, models[3], 3, previous_step=True)


def test_a_backbone_of_another_depth_is_named():
    shallow = _model("CONT.TASK", "1", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")
    deep = _model("CONT.TASK", "1", "MODEL.RESNETS.DEPTH", "34", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")
    with pytest.raises(CheckpointMismatchError) as err:
        check_checkpoint_for_step(deep.state_dict(), shallow, 1, previous_step=False, source="r34.pth")
    msg = str(err.value)
    assert "unexpected" in msg and "backbone.res2.2" in msg and "MODEL.RESNETS.DEPTH" in msg
    assert "another depth" in msg and "'res4': 6" in msg and "'res4': 2" in msg


def test_extra_keys_outside_the_head_are_named(models):
    sd = dict(models[3].state_dict())
    sd["pixel_decoder_extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="pixel_decoder_extra.weight"):
        check_checkpoint_for_step(sd, models[3], 3, previous_step=False)
