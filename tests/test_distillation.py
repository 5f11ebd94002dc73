"""The distillation baselines (CONT.DIST): official fixtures, and every branch's formula on small
tensors computed independently (explicit loops / probabilities)."""
import logging
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, check_results
from continual.config import setup_cfg
from continual.distillation import (
    DistillationLoss,
    add_pseudo_labels,
    distillation_weight_dict,
    focal_unbiased_ce_loss,
    kd_loss,
    l2_kd_loss,
    make_targets,
    mask_kd_loss,
    needs_teacher,
    pod_embedding,
    pod_loss,
    softmax_focal_loss,
    teacher_needs_aux,
    teacher_needs_features,
    unbiased_ce_loss,
    unbiased_kd_loss,
    unbiased_log_probs,
)
from continual.distillation_reference import compare_gradient, format_checks, run_distillation_checks
from mask2former.modeling.criterion import sigmoid_focal_class_loss

DIST_FIXTURES = sorted(p.parent for p in (REPO / "tests" / "fixtures" / "distillation").glob("*/manifest.json"))


# ----------------------------------------------------------------------------- fixtures
def test_distillation_fixtures_are_present():
    assert {"ade_ps_t1_kd_plain", "ade_ps_t2_comformer"} <= {p.name for p in DIST_FIXTURES}


@pytest.mark.parametrize("fixture", DIST_FIXTURES, ids=lambda p: p.name)
def test_distillation_fixture_is_reproduced(fixture):
    torch.set_num_threads(1)
    check_results(run_distillation_checks(str(fixture)), format_checks,
                  ("loss weights", "targets after pseudo-labelling", "matcher indices", "(unweighted)", "(weighted)",
                   "total loss", "grad outputs.pred_logits", "grad features.res2", "grad mask_features"))


def test_cli_dispatches_distillation_fixtures_and_fails_on_a_tampered_copy(tmp_path):
    fixture = DIST_FIXTURES[0]
    copy = tmp_path / fixture.name
    shutil.copytree(fixture, copy)
    expected = torch.load(copy / "expected.pt", weights_only=True)
    expected["loss_dict_unweighted"]["loss_kd"] = expected["loss_dict_unweighted"]["loss_kd"] * 1.01
    torch.save(expected, copy / "expected.pt")
    run = subprocess.run([sys.executable, "tools/check_reference.py", str(fixture), str(copy)], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    tables = run.stdout.split("== ")
    assert "0 failed" in tables[1] and "loss loss_kd (unweighted)" in tables[1]
    assert "1 failed" in tables[2]


def test_missing_and_zero_gradients_are_different_results():
    zero = torch.zeros(3)
    assert compare_gradient("g", None, None).ok
    assert compare_gradient("g", zero, zero.clone()).ok
    assert not compare_gradient("g", None, zero).ok
    assert not compare_gradient("g", zero, None).ok
    assert not compare_gradient("g", torch.tensor([0.0, 1e-6, 0.0]), zero).ok
    assert compare_gradient("g", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-5])).ok
    assert not compare_gradient("g", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.01])).ok


# ----------------------------------------------------------------------------- config
def _cfg(task=1, **dist):
    cfg = setup_cfg()
    cfg.CONT.BASE_CLS, cfg.CONT.INC_CLS, cfg.CONT.TASK, cfg.CONT.NUM_PROMPTS = 4, 2, task, 0
    mf = cfg.MODEL.MASK_FORMER
    mf.DEC_LAYERS, mf.TRAIN_NUM_POINTS, mf.DEEP_SUPERVISION = 3, 64, True
    mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT = 2.0, 5.0, 5.0
    mf.FOCAL, cfg.CONT.SOFTCLS = False, True
    mf.TEST.MASK_BG, mf.PER_PIXEL = False, False  # as in the official scripts (no background class)
    for k, v in dist.items():
        if k in ("FOCAL", "SOFTCLS"):
            setattr(mf if k == "FOCAL" else cfg.CONT, k, v)
        else:
            setattr(cfg.CONT.DIST, k, v)
    return cfg


def test_official_dist_keys_and_defaults():
    d = setup_cfg()
    assert dict(d.CONT.DIST) == {
        "POD_WEIGHT": 0.0, "KD_WEIGHT": 0.0, "ALPHA": 1.0, "UCE": False, "UKD": False, "L2": False,
        "KD_REW": False, "KD_DEEP": False, "USE_NEW": False, "CE_NEW": False, "EOS_POW": 0.0, "PSEUDO": False,
        "PSEUDO_TYPE": 0, "IOU_THRESHOLD": 0.5, "PSEUDO_THRESHOLD": 0.0, "MASK_KD": 0.0}


def test_teacher_requirements():
    assert not needs_teacher(_cfg())  # plain fine-tuning
    assert not needs_teacher(_cfg(task=0, KD_WEIGHT=1.0))
    assert needs_teacher(_cfg(KD_WEIGHT=1.0)) and needs_teacher(_cfg(PSEUDO=True)) and needs_teacher(_cfg(POD_WEIGHT=0.01))
    assert not needs_teacher(_cfg(MASK_KD=1.0))  # as in the official wrapper
    prompts = _cfg(KD_WEIGHT=1.0)
    prompts.CONT.NUM_PROMPTS = 4
    assert not needs_teacher(prompts)
    assert not teacher_needs_aux(_cfg(KD_WEIGHT=1.0))
    assert teacher_needs_aux(_cfg(KD_WEIGHT=1.0, KD_DEEP=True))
    assert teacher_needs_aux(_cfg(PSEUDO=True, MASK_KD=1.0, KD_DEEP=True))
    assert not teacher_needs_aux(_cfg(PSEUDO=True, KD_DEEP=True))
    assert teacher_needs_features(_cfg(POD_WEIGHT=0.01)) and not teacher_needs_features(_cfg(KD_WEIGHT=1.0))


def test_weight_dict():
    w = distillation_weight_dict(_cfg(KD_WEIGHT=3.0, MASK_KD=0.5, POD_WEIGHT=0.01))
    assert list(w)[:6] == ["loss_ce", "loss_mask", "loss_dice", "loss_kd", "loss_mask_kd", "loss_pod"]
    assert w["loss_kd"] == 3.0 and w["loss_mask_kd"] == 0.5
    assert w["loss_pod"] == pytest.approx(0.01 * math.sqrt(2 / 6))
    assert w["loss_kd_1"] == 3.0 and "loss_kd_2" not in w  # DEC_LAYERS - 1 = 2 auxiliary predictions
    assert distillation_weight_dict(_cfg(task=0, KD_WEIGHT=3.0))["loss_kd"] == 0.0


def test_configuration_errors_name_the_keys():
    with pytest.raises(ValueError, match="CONT.TASK"):
        DistillationLoss(_cfg(task=0))
    with pytest.raises(NotImplementedError, match="SOFTCLS"):
        DistillationLoss(_cfg(FOCAL=False, SOFTCLS=False))
    DistillationLoss(_cfg(FOCAL=False, SOFTCLS=False, UCE=True))  # UCE comes first: no sigmoid CE
    bg = _cfg(UKD=True, KD_WEIGHT=1.0)
    bg.MODEL.MASK_FORMER.TEST.MASK_BG, bg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True, True
    with pytest.raises(ValueError, match="UKD"):
        DistillationLoss(bg)


# ----------------------------------------------------------------------------- formulas
def _probs_logits(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_unbiased_log_probs_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)  # classes 0..2, no-object
    p = logits.softmax(-1)[0]
    out = unbiased_log_probs(logits, old_classes=1)[0]
    assert torch.allclose(out[:3], p[:3].log())
    assert torch.allclose(out[3], (p[3] + p[0]).log())  # no-object absorbs the old class


def test_unbiased_ce_and_focal_variants():
    logits = _probs_logits(0, (2, 3, 6))  # 5 classes + no-object, 2 old
    target = torch.tensor([[0, 5, 3], [5, 4, 1]])
    weight = torch.tensor([1, 1, 1, 1, 1, 0.1], dtype=torch.float64)
    num = den = 0.0
    nlls = []
    for b in range(2):
        for q in range(3):
            p = logits[b, q].softmax(-1)
            t = int(target[b, q])
            prob = p[5] + p[0] + p[1] if t == 5 else p[t]
            nlls.append(-prob.log())
            num, den = num + weight[t] * nlls[-1], den + weight[t]
    assert torch.allclose(unbiased_ce_loss(logits, target, 2, weight), num / den)
    nll = torch.stack(nlls)
    focal = (5.0 * (1 - torch.exp(-nll)) ** 1.0 * nll).mean()
    assert torch.allclose(focal_unbiased_ce_loss(logits, target, 2, alpha=5.0, gamma=1.0), focal)
    ce = torch.stack([-logits[b, q].log_softmax(-1)[target[b, q]] for b in range(2) for q in range(3)])
    assert torch.allclose(softmax_focal_loss(logits, target, alpha=2.0, gamma=2.0),
                          (2.0 * (1 - torch.exp(-ce)) ** 2 * ce).mean())


def _kl(p, log_q):
    return (p * (p.log() - log_q)).sum()


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_plain_and_unbiased_kd(reweight, temperature):
    student = _probs_logits(1, (2, 3, 7))  # 6 classes + no-object
    teacher = _probs_logits(2, (2, 3, 5))  # 4 old classes + no-object
    plain, unbiased, weights = [], [], []
    for b in range(2):
        for q in range(3):
            p = (teacher[b, q] * temperature).softmax(-1)
            kept = torch.cat([student[b, q, :4], student[b, q, -1:]])
            plain.append(_kl(p, kept.log_softmax(-1)))
            s = student[b, q].softmax(-1)
            merged = torch.cat([s[:4], s[4:].sum().view(1)])
            unbiased.append(_kl(p, merged.log()))
            weights.append((1 - p[-1]) ** 2 if reweight else torch.tensor(1.0, dtype=torch.float64))
    w = torch.stack(weights)
    expect_plain = (w * torch.stack(plain)).sum() / w.sum()
    expect_unbiased = (w * torch.stack(unbiased)).sum() / w.sum()
    assert torch.allclose(kd_loss(student, teacher, temperature, reweight), expect_plain)
    assert torch.allclose(unbiased_kd_loss(student, teacher, temperature, reweight), expect_unbiased)


def test_l2_kd_ignores_new_classes_and_temperature():
    student = _probs_logits(3, (1, 2, 5))
    teacher = _probs_logits(4, (1, 2, 3))
    per_query = []
    for q in range(2):
        s = torch.cat([student[0, q, :2], student[0, q, -1:]]).softmax(-1)
        per_query.append(((s - teacher[0, q].softmax(-1)) ** 2).sum())
    assert torch.allclose(l2_kd_loss(student, teacher), torch.stack(per_query).mean())
    moved = student.clone()
    moved[..., 2:4] += 3.0  # new-class logits do not matter
    assert torch.allclose(l2_kd_loss(moved, teacher), l2_kd_loss(student, teacher))


def test_mask_kd_is_bce_against_teacher_probabilities():
    new, old = _probs_logits(5, (1, 2, 3, 3)), _probs_logits(6, (1, 2, 3, 3))
    p, s = old.sigmoid(), new.sigmoid()
    expect = -(p * s.log() + (1 - p) * (1 - s).log()).mean()
    assert torch.allclose(mask_kd_loss(new, old), expect)


def test_pod_embedding_and_loss_by_hand():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    emb = pod_embedding(x)
    # scale 1: 4 + 4 values; scale 2: 4 cells x (2 + 2); scale 4: 16 cells x (1 + 1)
    assert emb.shape == (1, 8 + 16 + 32)
    assert torch.equal(emb[0, :4], x[0, 0].mean(-1)) and torch.equal(emb[0, 4:8], x[0, 0].mean(-2))
    assert torch.equal(emb[0, 8:10], torch.tensor([0.5, 4.5], dtype=torch.float64))  # cell (0,0), mean over width
    small = torch.ones(1, 1, 2, 2)
    assert pod_embedding(small).shape == (1, 4 + 8)  # 4x4 cells of a 2x2 map are empty: skipped
    a, b = _probs_logits(7, (2, 3, 4, 4)), _probs_logits(8, (2, 3, 4, 4))
    c, d = _probs_logits(9, (2, 5, 2, 2)), _probs_logits(10, (2, 5, 2, 2))
    per_image = (pod_embedding(a) - pod_embedding(b)).norm(dim=1) + (pod_embedding(c) - pod_embedding(d)).norm(dim=1)
    assert torch.allclose(pod_loss([a, c], [b, d]), per_image.mean() / 2)


# ----------------------------------------------------------------------------- pseudo-labels
def _teacher(logits, mask_logits):
    return {"pred_logits": torch.tensor([logits], dtype=torch.float32),
            "pred_masks": torch.tensor([mask_logits], dtype=torch.float32)}


def test_pseudo_labels_by_hand():
    big, low = 8.0, -8.0
    left = [[big, big, low, low]] * 4        # query 0: left half
    right = [[low, low, big, big]] * 4       # query 1: right half
    top = [[big] * 4, [big] * 4, [low] * 4, [low] * 4]  # query 2: top half, weaker score
    logits = [[5.0, 0.0, 0.0], [0.0, 4.0, 0.0], [2.0, 0.0, 1.9]]  # 2 old classes + no-object
    gt = {"gt_classes": torch.tensor([3]), "gt_masks": torch.zeros(1, 4, 4, dtype=torch.bool)}
    gt["gt_masks"][0, 0, 3] = True  # the ground truth covers the top-right pixel
    targets = make_targets([gt], (4, 4))
    added = add_pseudo_labels(targets, _teacher(logits, [left, right, top]), old_classes=2, softcls=True)
    assert added == [2]
    assert targets[0]["labels"].tolist() == [2, 0, 1]
    left_mask = torch.tensor(left) > 0
    right_mask = (torch.tensor(right) > 0) & ~gt["gt_masks"][0]
    assert torch.equal(targets[0]["masks"][1], left_mask) and torch.equal(targets[0]["masks"][2], right_mask)
    assert targets[0]["masks"].dtype == torch.bool

    # a threshold above a query's score drops it (strict comparison)
    targets = make_targets([gt], (4, 4))
    score1 = torch.tensor(logits[1]).softmax(-1).max().item()  # 0.96 (query 0: 0.99, query 2: 0.5)
    assert add_pseudo_labels(targets, _teacher(logits, [left, right, top]), 2, threshold=score1) == [1]
    assert targets[0]["labels"].tolist() == [2, 0]
    assert torch.equal(targets[0]["masks"][1], left_mask)

    # scores from the softmax (SOFTCLS True) or the sigmoid (False): [3, 3, -5] scores 0.5 / 0.95
    tie = [[3.0, 3.0, -5.0]]
    for softcls, expected in ((True, [0]), (False, [1])):
        targets = make_targets([gt], (4, 4))
        assert add_pseudo_labels(targets, _teacher(tie, [left]), 2, threshold=0.6, softcls=softcls) == expected


def test_pseudo_labels_skip_no_object_and_small_wins():
    full = [[8.0] * 4] * 4
    logits = [[0.0, 0.0, 9.0], [3.0, 0.0, 0.0]]  # query 0 predicts no-object
    targets = make_targets([{"gt_classes": torch.tensor([3]), "gt_masks": torch.zeros(1, 4, 4, dtype=torch.bool)}], (4, 4))
    assert add_pseudo_labels(targets, _teacher(logits, [full, full]), 2) == [1]
    assert targets[0]["labels"].tolist() == [2, 0]
    # ground truth covering more than half of the query's mask leaves it < 50 % of its own area
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :3] = True
    targets = make_targets([{"gt_classes": torch.tensor([3]), "gt_masks": gt}], (4, 4))
    assert add_pseudo_labels(targets, _teacher(logits, [full, full]), 2) == [0]
    with pytest.raises(ValueError, match="old_classes"):
        add_pseudo_labels(targets, _teacher(logits, [full, full]), 3)


# ----------------------------------------------------------------------------- the whole loss
def _outputs(seed, num_logits, b=2, q=5, aux=2, size=8, grad=True):
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        x = torch.randn(*shape, generator=g)
        return x.requires_grad_(grad)

    out = {"pred_logits": t(b, q, num_logits), "pred_masks": t(b, q, size, size),
           "aux_outputs": [{"pred_logits": t(b, q, num_logits), "pred_masks": t(b, q, size, size)} for _ in range(aux)],
           "features": t(b, 4, size, size)}
    feats = {k: t(b, 3, s, s) for k, s in (("res2", 8), ("res3", 4), ("res4", 2), ("res5", 1))}
    return out, feats


def _targets():
    masks = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    masks[0, 0, :16] = True
    masks[1, 0, :, 8:20] = True
    return make_targets([{"gt_classes": torch.tensor([5]), "gt_masks": masks[0]},
                         {"gt_classes": torch.tensor([6]), "gt_masks": masks[1]}], (32, 32))


def test_every_term_with_deep_kd_mask_kd_pod_and_l2():
    torch.manual_seed(0)
    cfg = _cfg(KD_WEIGHT=2.0, L2=True, KD_DEEP=True, MASK_KD=0.5, POD_WEIGHT=0.01)
    loss_fn = DistillationLoss(cfg)
    out, feats = _outputs(0, 7)
    old, feats_old = _outputs(1, 5, grad=False)
    losses = loss_fn(out, old, _targets(), feats, feats_old)
    for k in ("loss_kd", "loss_kd_0", "loss_kd_1", "loss_mask_kd", "loss_mask_kd_0", "loss_mask_kd_1", "loss_pod"):
        assert k in losses, k
    unweighted = loss_fn.unweighted(out, old, _targets(), feats, feats_old)
    assert torch.allclose(unweighted["loss_kd_1"], l2_kd_loss(out["aux_outputs"][1]["pred_logits"],
                                                             old["aux_outputs"][1]["pred_logits"]))
    assert torch.allclose(unweighted["loss_mask_kd"], mask_kd_loss(out["pred_masks"], old["pred_masks"]))
    assert torch.allclose(losses["loss_pod"], unweighted["loss_pod"] * 0.01 * math.sqrt(2 / 6))
    sum(losses.values()).backward()
    assert feats["res5"].grad is not None and out["features"].grad is not None
    assert feats_old["res2"].grad is None


def test_class_loss_branches_follow_the_official_order():
    logits = _probs_logits(11, (2, 5, 7)).float()
    target = torch.tensor([[0, 6, 5, 6, 6], [6, 4, 6, 1, 6]])
    uce_focal = DistillationLoss(_cfg(UCE=True, FOCAL=True))
    assert torch.allclose(uce_focal.class_loss(logits, target), focal_unbiased_ce_loss(logits, target, 4, 5.0, 1.0))
    uce = DistillationLoss(_cfg(UCE=True))
    weight = torch.tensor([1.0] * 6 + [0.1])
    assert torch.allclose(uce.class_loss(logits, target), unbiased_ce_loss(logits, target, 4, weight))
    soft_focal = DistillationLoss(_cfg(FOCAL=True, SOFTCLS=True))
    assert torch.allclose(soft_focal.class_loss(logits, target), softmax_focal_loss(logits, target, 5.0, 1.0))
    sig_focal = DistillationLoss(_cfg(FOCAL=True, SOFTCLS=False))
    assert torch.allclose(sig_focal.class_loss(logits, target), sigmoid_focal_class_loss(logits, target, 5.0, 1.0))
    ce = DistillationLoss(_cfg())
    assert torch.allclose(ce.class_loss(logits, target), F.cross_entropy(logits.transpose(1, 2), target, weight))


def test_kd_branch_selection_and_no_deep_kd_by_default():
    out, _ = _outputs(2, 7)
    old, _ = _outputs(3, 5, grad=False)
    cases = {(True, False): unbiased_kd_loss, (False, True): l2_kd_loss, (False, False): kd_loss}
    for (ukd, l2), fn in cases.items():
        loss_fn = DistillationLoss(_cfg(KD_WEIGHT=1.0, UKD=ukd, L2=l2, ALPHA=1.0))
        losses = loss_fn.unweighted(out, old, _targets())
        assert torch.allclose(losses["loss_kd"], fn(out["pred_logits"], old["pred_logits"]))
        assert "loss_kd_0" not in losses


def test_mask_kd_alone_is_inert_as_in_the_official_code(caplog):
    with caplog.at_level(logging.WARNING, logger="continual.distillation"):
        loss_fn = DistillationLoss(_cfg(MASK_KD=1.0))
    assert "MASK_KD" in caplog.text
    out, _ = _outputs(4, 7)
    old, _ = _outputs(5, 5, grad=False)
    assert "loss_mask_kd" not in loss_fn.unweighted(out, old, _targets())


def test_missing_teacher_outputs_are_named():
    out, feats = _outputs(6, 7)
    old, feats_old = _outputs(7, 5, grad=False)
    no_aux = {k: v for k, v in old.items() if k != "aux_outputs"}
    with pytest.raises(KeyError, match="KD_DEEP"):
        DistillationLoss(_cfg(KD_WEIGHT=1.0, KD_DEEP=True)).unweighted(out, no_aux, _targets())
    no_feats = {k: v for k, v in old.items() if k != "features"}
    with pytest.raises(KeyError, match="mask features"):
        DistillationLoss(_cfg(POD_WEIGHT=0.01)).unweighted(out, no_feats, _targets(), feats, feats_old)
    with pytest.raises(KeyError, match="res2"):
        DistillationLoss(_cfg(POD_WEIGHT=0.01)).unweighted(out, old, _targets(), None, feats_old)
    with pytest.raises(ValueError, match="outputs_old"):
        DistillationLoss(_cfg(KD_WEIGHT=1.0)).unweighted(out, None, _targets())
    with pytest.raises(ValueError, match="class logits"):
        DistillationLoss(_cfg(KD_WEIGHT=1.0)).unweighted(out, _outputs(8, 6, grad=False)[0], _targets())


def test_pseudo_labels_extend_num_masks_and_targets():
    loss_fn = DistillationLoss(_cfg(PSEUDO=True))
    old, _ = _outputs(9, 5, grad=False)
    targets = loss_fn.prepare_targets(
        [{"gt_classes": torch.tensor([5]), "gt_masks": torch.zeros(1, 32, 32, dtype=torch.bool)}] * 2, (32, 32), old)
    assert [len(t["labels"]) for t in targets] == [1 + n for n in loss_fn.last_pseudo_counts]
    assert all(label < 4 for t in targets for label in t["labels"][1:].tolist())  # only old classes
