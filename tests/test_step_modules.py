"""One owner for "the modules of step t": a decoder subclass that adds a per-step bank, and
nothing else, gets it initialised, trainable at its step, frozen afterwards, and validated in
checkpoints (docs/design.md#per-step-modules)."""
import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

import mask2former  # noqa: F401
from conftest import FIXTURES, build_cfg
from continual.checkpoint import CheckpointMismatchError, check_checkpoint_for_step, new_step_keys
from continual.prompt_tuning import freeze_for_prompt_tuning, initialize_new_step, trainable_parameter_names
from continual.trainer import build_param_groups
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
)

TINY = FIXTURES / "ade_ps_t3_deltas_pos" / "config.yaml"
DUMMY_VALUE = 0.25


@TRANSFORMER_DECODER_REGISTRY.register()
class _DecoderWithDummyBank(MultiScaleMaskedTransformerDecoder):
    """The production decoder plus one per-step module: a linear layer per incremental step."""

    STEP_BANKS = MultiScaleMaskedTransformerDecoder.STEP_BANKS + ("prompt_dummy",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        width = self.query_feat.weight.shape[1]
        self.prompt_dummy = nn.ModuleList(nn.Linear(width, 3) for _ in range(len(self.prompt_feat)))

    @torch.no_grad()
    def initialize_step_module(self, name, module):
        if name.startswith("prompt_dummy."):
            for p in module.parameters():
                p.fill_(DUMMY_VALUE)
            return True
        return super().initialize_step_module(name, module)


FREEZE = ["CONT.BACKBONE_FREEZE", "True", "CONT.CLS_HEAD_FREEZE", "True", "CONT.MASK_HEAD_FREEZE", "True",
          "CONT.PIXEL_DECODER_FREEZE", "True", "CONT.QUERY_EMBED_FREEZE", "True", "CONT.TRANS_DECODER_FREEZE", "True"]


def _model(step):
    torch.manual_seed(step)
    cfg = build_cfg(TINY, ["MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "_DecoderWithDummyBank",
                           "CONT.TASK", str(step), *FREEZE])
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def models():
    return {t: _model(t) for t in (1, 2)}


def test_the_new_bank_is_a_step_module(models):
    _, model = models[2]
    names = list(model.sem_seg_head.predictor.step_modules(2))
    assert "prompt_dummy.1" in names and "prompt_dummy.0" not in names
    assert names[-1] == "class_embed.cls.3"


def test_initialised_at_its_step(models):
    _, model = models[2]
    before = model.sem_seg_head.predictor.prompt_dummy[0].weight.clone()
    written = initialize_new_step(model)
    pred = model.sem_seg_head.predictor
    assert {"prompt_dummy.1.weight", "prompt_dummy.1.bias"} <= set(written)
    assert torch.all(pred.prompt_dummy[1].weight == DUMMY_VALUE)
    assert torch.equal(pred.prompt_dummy[0].weight, before)  # the previous step's is left alone
    # the built-in rules still apply
    assert torch.allclose(pred.prompt_feat[1].weight, pred.query_feat.weight.mean(0).expand(pred.prompt_feat[1].weight.shape))


def test_trainable_at_its_step_frozen_after(models):
    cfg, model = models[2]
    freeze_for_prompt_tuning(model, cfg.CONT)
    trainable = set(trainable_parameter_names(model))
    assert "sem_seg_head.predictor.prompt_dummy.1.weight" in trainable
    assert "sem_seg_head.predictor.prompt_dummy.0.weight" not in trainable
    grouped = {id(p) for g in build_param_groups(cfg, model) for p in g["params"]}
    assert id(model.sem_seg_head.predictor.prompt_dummy[1].weight) in grouped
    assert id(model.sem_seg_head.predictor.prompt_dummy[0].weight) not in grouped


def test_validated_in_checkpoints(models):
    _, step1 = models[1]
    _, step2 = models[2]
    assert {"sem_seg_head.predictor.prompt_dummy.1.weight", "sem_seg_head.predictor.prompt_dummy.1.bias"} <= set(
        new_step_keys(step2, 2))
    # the previous step's checkpoint lacks only step 2's modules, the new bank's entry included
    check_checkpoint_for_step(step1.state_dict(), step2, 2, previous_step=True)
    # evaluation needs the bank's entry of every step
    state = {k: v for k, v in step2.state_dict().items() if "prompt_dummy.0." not in k}
    with pytest.raises(CheckpointMismatchError, match="prompt_dummy.0.weight"):
        check_checkpoint_for_step(state, step2, 2, previous_step=False)
    # a checkpoint that already holds step 2's entry is not step 1's
    with pytest.raises(CheckpointMismatchError, match="already holds step 2"):
        check_checkpoint_for_step(step2.state_dict(), step2, 2, previous_step=True)


def test_head_rejects_unsupported_transformer_in_feature():
    cfg = build_cfg(TINY, ["MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res5"])
    with pytest.raises(ValueError, match="TRANSFORMER_IN_FEATURE='res5'.*multi_scale_pixel_decoder"):
        build_model(cfg)


def test_head_runs_a_frozen_pixel_decoder_without_autograd():
    cfg = build_cfg(TINY, ["CONT.TASK", "1"])
    model = build_model(cfg)
    head = model.sem_seg_head.train()
    feats = {k: torch.randn(1, s.channels, 64 // s.stride, 64 // s.stride, requires_grad=True)
             for k, s in model.backbone.output_shape().items()}
    for p in head.pixel_decoder.parameters():
        p.requires_grad_(False)
    out_frozen = head(feats)
    for p in head.pixel_decoder.parameters():
        p.requires_grad_(True)
    out_trainable = head(feats)
    # frozen: the mask features carry no graph back to the backbone features
    out_frozen["pred_masks"].sum().backward()
    assert all(v.grad is None for v in feats.values())
    out_trainable["pred_masks"].sum().backward()
    assert any(v.grad is not None and v.grad.abs().sum() > 0 for v in feats.values())
