"""Real-size models: state-dict keys, shapes, trainable parameters (tests/fixtures/keys)."""
import json

import pytest
from detectron2.modeling import build_model

import mask2former  # noqa: F401  (registers the model)
from conftest import FIXTURES, REPO, build_cfg
from continual.prompt_tuning import configure_trainable_parameters

KEY_FILES = sorted((FIXTURES / "keys").glob("*.json"))


def _build(spec):
    cfg = build_cfg(REPO / spec["config_file"], spec["opts"])
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    configure_trainable_parameters(model, cfg)
    return cfg, model


@pytest.mark.parametrize("key_file", KEY_FILES, ids=lambda p: p.stem)
def test_real_size_model_matches_official_layout(key_file):
    spec = json.loads(key_file.read_text())
    cfg, model = _build(spec)

    state = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert len(state) == spec["num_state_dict_entries"]
    assert state == spec["state_dict"]

    params = [[n, list(p.shape), p.requires_grad] for n, p in model.named_parameters()]
    assert params == spec["parameters"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == spec["trainable_parameter_names"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == spec["trainable_param_count"]
    assert sum(p.numel() for p in model.parameters()) == spec["total_param_count"]

    pred = model.sem_seg_head.predictor
    assert pred.class_groups == spec["cfg"]["decoder_classes"]
    assert pred.logit_deltas == spec["cfg"]["decoder_deltas_effective"]
    assert pred.num_layers == spec["cfg"]["decoder_num_layers(DEC_LAYERS-1)"]


def test_ade_panoptic_100_5_prompt_tuning_trains_487686_parameters():
    spec = json.loads((FIXTURES / "keys" / "ade_ps_100-5_task10.json").read_text())
    _, model = _build(spec)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 487_686
