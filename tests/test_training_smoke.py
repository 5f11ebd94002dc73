"""A few optimisation steps of the tiny model on generated images reduce the loss."""
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import mask2former  # noqa: F401
from conftest import REPO, build_cfg
from continual.prompt_tuning import configure_trainable_parameters, initialize_new_step
from mask2former.data.datasets.synthetic import render_sample, sample_to_model_input

TINY = REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml"


def _batch(seed, classes, n=2, size=64):
    rng = np.random.default_rng(seed)
    return [sample_to_model_input(*render_sample(rng, size, size), classes=classes) for _ in range(n)]


def _fit(model, batch, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_step0_training_reduces_the_loss():
    torch.manual_seed(0)
    cfg = build_cfg(TINY, ["MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"])
    model = build_model(cfg)
    losses = _fit(model, _batch(0, classes=range(1, 7)), steps=8, lr=1e-3)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses


@pytest.mark.slow
def test_prompt_tuning_step_trains_only_the_new_prompts_and_reduces_the_loss():
    torch.manual_seed(0)
    cfg0 = build_cfg(TINY)
    base = build_model(cfg0)
    cfg1 = build_cfg(TINY, ["CONT.TASK", "1", "CONT.NUM_PROMPTS", "4", "MODEL.MASK_FORMER.CLASS_WEIGHT", "10.0",
                            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"])
    model = build_model(cfg1)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".prompt_" in k or "class_embed.cls.2." in k for k in missing)
    initialize_new_step(model)
    configure_trainable_parameters(model, cfg1)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    losses = _fit(model, _batch(1, classes={7, 8}), steps=8, lr=1e-3)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen parameter {n} changed"


def test_prompt_no_obj_mlp_gets_zero_gradients_and_weight_decay_as_in_the_official_code():
    """With ``CONT.PROMPT_NO_OBJ_MLP True`` the newest no-object head stays in the training graph
    without reaching the loss: its gradient is zeros (not None), so AdamW's decoupled weight
    decay still shrinks it; older (frozen) heads get no gradient and stay unchanged."""
    from continual.trainer import IncrementalTrainer

    torch.manual_seed(0)
    cfg = build_cfg(TINY, ["CONT.TASK", "2", "CONT.NUM_PROMPTS", "4", "CONT.PROMPT_NO_OBJ_MLP", "True",
                           "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "SOLVER.WEIGHT_DECAY", "0.05"])
    model = build_model(cfg)
    initialize_new_step(model)
    configure_trainable_parameters(model, cfg)
    pred = model.sem_seg_head.predictor
    newest, older = pred.prompt_no_obj_embed[-1], pred.prompt_no_obj_embed[0]
    assert all(p.requires_grad for p in newest.parameters())
    assert not any(p.requires_grad for p in pred.class_embed.cls[0].parameters())
    before = {n: p.detach().clone() for n, p in pred.prompt_no_obj_embed.named_parameters()}

    opt = IncrementalTrainer.build_optimizer(cfg, model)
    model.train()
    loss = sum(model(_batch(2, classes={9, 10})).values())
    opt.zero_grad()
    loss.backward()
    for p in newest.parameters():
        assert p.grad is not None and not p.grad.any()
    assert all(p.grad is None for p in older.parameters())
    opt.step()
    lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    for n, p in pred.prompt_no_obj_embed.named_parameters():
        if n.startswith("0."):
            assert torch.equal(p, before[n]), n
        else:  # a zero gradient leaves only the decay: p <- p * (1 - lr * wd)
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * wd), rtol=0, atol=1e-7)
            assert not torch.equal(p, before[n]), n
