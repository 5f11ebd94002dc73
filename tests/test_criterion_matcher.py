"""
Tests of the Hungarian matcher and the set criterion.

Fixture tests replay the official training step (tests/fixtures/<name>/train.pt) with the
stored matcher points, matchings and criterion points injected; unit tests check the
formulas on small hand-built cases.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mask2former.modeling.criterion import (
    SetCriterion,
    point_dice_loss,
    point_sigmoid_ce_loss,
    sigmoid_focal_class_loss,
    weight_losses,
    weighted_total,
)
from mask2former.modeling.matcher import HungarianMatcher

FIXTURE_ROOT = Path(__file__).parent / "fixtures"
FIXTURES = sorted(p.parent.name for p in FIXTURE_ROOT.glob("*/train.pt"))


# --------------------------------------------------------------------------- helpers
def _load_fixture(name):
    folder = FIXTURE_ROOT / name
    train = torch.load(folder / "train.pt", weights_only=True)
    with open(folder / "manifest.json") as f:
        settings = json.load(f)["train"]["criterion"]
    return train, settings


def _build(settings, weight_dict):
    m = settings["matcher"]
    matcher = HungarianMatcher(
        cost_class=m["cost_class"],
        cost_mask=m["cost_mask"],
        cost_dice=m["cost_dice"],
        num_points=m["num_points"],
    )
    criterion = SetCriterion(
        num_classes=settings["num_classes"],
        matcher=matcher,
        weight_dict=dict(weight_dict),
        eos_coef=settings["eos_coef"],
        losses=["labels", "masks"],
        num_points=settings["num_points"],
        oversample_ratio=settings["oversample_ratio"],
        importance_sample_ratio=settings["importance_sample_ratio"],
        class_loss="focal" if settings["focal"] else "ce",
        focal_alpha=settings["focal_alpha"],
        focal_gamma=settings["focal_gamma"],
    )
    return matcher, criterion


def _predictions(outputs):
    """Final output first, then every aux output (the fixtures' matcher-call order)."""
    return [outputs] + list(outputs.get("aux_outputs", []))


def _assert_loss_close(actual, expected, key):
    a, e = float(actual), float(expected)
    atol = 1e-5 if abs(e) < 1 else 0.0
    assert math.isfinite(a), key
    assert abs(a - e) <= atol + 1e-5 * abs(e), f"{key}: {a} vs {e}"


def _targets_clone(targets):
    return [{"labels": t["labels"].clone(), "masks": t["masks"].clone()} for t in targets]


def _outputs_requiring_grad(outputs):
    def leaf(d):
        return {k: d[k].detach().clone().requires_grad_(True) for k in ("pred_logits", "pred_masks")}

    out = leaf(outputs)
    out["aux_outputs"] = [leaf(a) for a in outputs.get("aux_outputs", [])]
    return out


def _tiny_criterion(class_loss="focal", num_classes=4, num_points=64, eos_coef=0.1):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        eos_coef=eos_coef,
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        class_loss=class_loss,
        focal_alpha=5.0,
        focal_gamma=1.0,
    )


def _random_batch(gen, batch=2, queries=6, num_classes=4, size=(8, 12), tgt_scale=4, counts=(3, 2)):
    h, w = size
    outputs = {
        "pred_logits": torch.randn(batch, queries, num_classes + 1, generator=gen),
        "pred_masks": torch.randn(batch, queries, h, w, generator=gen) * 3,
    }
    targets = []
    for b in range(batch):
        n = counts[b]
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (n,), generator=gen),
                "masks": torch.rand(n, h * tgt_scale, w * tgt_scale, generator=gen) > 0.5,
            }
        )
    return outputs, targets


# --------------------------------------------------------------------------- fixtures
needs_fixtures = pytest.mark.skipif(not FIXTURES, reason="no fixture with train.pt found")


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_matcher_reproduces_official_indices(name):
    train, settings = _load_fixture(name)
    matcher, _ = _build(settings, train["weight_dict"])
    predictions = _predictions(train["predictor_out"])
    assert len(train["matcher_indices"]) == len(predictions)
    for m, pred in enumerate(predictions):
        indices = matcher(pred, train["targets"], point_coords=train["matcher_point_coords"][m])
        expected = train["matcher_indices"][m]
        assert len(indices) == len(expected)
        for b, ((src, tgt), (src_ref, tgt_ref)) in enumerate(zip(indices, expected)):
            assert src.dtype == torch.int64 and tgt.dtype == torch.int64
            assert torch.equal(src, src_ref), f"call {m} image {b}: {src} vs {src_ref}"
            assert torch.equal(tgt, tgt_ref), f"call {m} image {b}: {tgt} vs {tgt_ref}"


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_losses_reproduce_official(name):
    train, settings = _load_fixture(name)
    _, criterion = _build(settings, train["weight_dict"])
    losses = criterion(
        train["predictor_out"],
        _targets_clone(train["targets"]),
        indices=train["matcher_indices"],
        point_coords=train["criterion_point_coords"],
    )
    expected = train["loss_dict_unweighted"]
    assert list(losses) == list(expected)
    for key in expected:
        _assert_loss_close(losses[key], expected[key], key)

    weighted = weight_losses(losses, train["weight_dict"])
    assert list(weighted) == list(train["loss_dict"])
    for key, value in train["loss_dict"].items():
        _assert_loss_close(weighted[key], value, key)
    _assert_loss_close(weighted_total(losses, train["weight_dict"]), train["total_loss"], "total")


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_full_path_with_injected_matcher_points(name):
    """Matching computed by the criterion itself (only the points injected)."""
    train, settings = _load_fixture(name)
    _, criterion = _build(settings, train["weight_dict"])
    losses = criterion(
        train["predictor_out"],
        _targets_clone(train["targets"]),
        point_coords=train["criterion_point_coords"],
        matcher_point_coords=train["matcher_point_coords"],
    )
    for key, value in train["loss_dict_unweighted"].items():
        _assert_loss_close(losses[key], value, key)


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_gradients_exist_and_are_finite(name):
    train, settings = _load_fixture(name)
    _, criterion = _build(settings, train["weight_dict"])
    outputs = _outputs_requiring_grad(train["predictor_out"])
    losses = criterion(
        outputs,
        _targets_clone(train["targets"]),
        indices=train["matcher_indices"],
        point_coords=train["criterion_point_coords"],
    )
    total = weighted_total(losses, train["weight_dict"])
    total.backward()
    for pred in _predictions(outputs):
        for key in ("pred_logits", "pred_masks"):
            grad = pred[key].grad
            assert grad is not None, key
            assert torch.isfinite(grad).all(), key
            assert grad.abs().sum() > 0, key


# --------------------------------------------------------------------------- matcher units
def test_matcher_recovers_known_permutation():
    gen = torch.Generator().manual_seed(0)
    num_classes, queries, h, w = 5, 7, 16, 24
    labels = torch.tensor([3, 0, 4, 1])
    tgt_masks = torch.rand(len(labels), h * 4, w * 4, generator=gen) > 0.5
    # predictions at 1/4 resolution: strongly confident copies of the targets
    low_res = F.avg_pool2d(tgt_masks.float()[:, None], 4)[:, 0]
    perm = torch.tensor([5, 2, 0, 6])  # target j is predicted by query perm[j]
    pred_masks = torch.full((1, queries, h, w), -20.0)
    pred_logits = torch.full((1, queries, num_classes + 1), -5.0)
    pred_logits[0, :, num_classes] = 5.0
    for j, q in enumerate(perm):
        pred_masks[0, q] = (low_res[j] - 0.5) * 40.0
        pred_logits[0, q, labels[j]] = 10.0
        pred_logits[0, q, num_classes] = -5.0

    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=256)
    torch.manual_seed(0)
    (src, tgt), = matcher(
        {"pred_logits": pred_logits, "pred_masks": pred_masks},
        [{"labels": labels, "masks": tgt_masks}],
    )
    assert src.dtype == torch.int64 and tgt.dtype == torch.int64
    assert torch.equal(src, torch.sort(perm).values)
    assert {int(q): int(t) for q, t in zip(src, tgt)} == {int(q): j for j, q in enumerate(perm)}


def test_matcher_zero_targets_returns_empty():
    gen = torch.Generator().manual_seed(1)
    outputs, targets = _random_batch(gen, counts=(0, 2))
    targets[0] = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 48, dtype=torch.bool)}
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=32)
    indices = matcher(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64 and indices[0][1].dtype == torch.int64
    assert len(indices[1][0]) == 2 and sorted(indices[1][1].tolist()) == [0, 1]


def test_matcher_cost_matches_pairwise_loop():
    """The batched pairwise costs equal the per-pair point losses, and the class cost is softmax."""
    gen = torch.Generator().manual_seed(2)
    outputs, targets = _random_batch(gen, batch=1, counts=(3,))
    coords = torch.rand(50, 2, generator=gen)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=3.0, num_points=50)
    cost = matcher.compute_cost(
        outputs["pred_logits"][0], outputs["pred_masks"][0],
        targets[0]["labels"], targets[0]["masks"], coords,
    )
    grid = (2 * coords - 1)[None, :, None, :]
    p = F.grid_sample(outputs["pred_masks"][0][:, None], grid.expand(6, -1, -1, -1), align_corners=False)[:, 0, :, 0]
    t = F.grid_sample(targets[0]["masks"].float()[:, None], grid.expand(3, -1, -1, -1), align_corners=False)[:, 0, :, 0]
    probs = outputs["pred_logits"][0].softmax(-1)
    for q in range(6):
        for j in range(3):
            ce = point_sigmoid_ce_loss(p[q : q + 1], t[j : j + 1], 1.0)
            dice = point_dice_loss(p[q : q + 1], t[j : j + 1], 1.0)
            expected = 5.0 * ce + 3.0 * dice - 2.0 * probs[q, targets[0]["labels"][j]]
            assert torch.allclose(cost[q, j], expected, atol=1e-5), (q, j)


def test_matcher_rejects_wrong_number_of_point_sets():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _random_batch(gen)
    matcher = HungarianMatcher(num_points=16)
    with pytest.raises(ValueError):
        matcher(outputs, targets, point_coords=[torch.rand(16, 2)])


# --------------------------------------------------------------------------- criterion units
def test_criterion_handles_images_without_targets():
    gen = torch.Generator().manual_seed(4)
    outputs, targets = _random_batch(gen, counts=(0, 0))
    for t in targets:
        t["labels"] = torch.zeros(0, dtype=torch.int64)
        t["masks"] = torch.zeros(0, 32, 48, dtype=torch.bool)
    criterion = _tiny_criterion()
    assert criterion.get_num_masks(targets, "cpu") == 1.0  # clamped
    outputs = _outputs_requiring_grad(outputs)
    torch.manual_seed(0)
    losses = criterion(outputs, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    # every query targets no-object
    expected_ce = sigmoid_focal_class_loss(
        outputs["pred_logits"].detach(), torch.full((2, 6), 4, dtype=torch.int64), 5.0, 1.0
    )
    assert torch.allclose(losses["loss_ce"], expected_ce)
    weighted_total(losses, criterion.weight_dict).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert outputs["pred_masks"].grad is not None


def test_criterion_mixed_empty_and_nonempty_images():
    gen = torch.Generator().manual_seed(5)
    outputs, targets = _random_batch(gen, counts=(0, 2))
    targets[0] = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 48, dtype=torch.bool)}
    criterion = _tiny_criterion()
    assert criterion.get_num_masks(targets, "cpu") == 2.0
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"] * 0.5, "pred_masks": outputs["pred_masks"] * 0.5}
    ]
    outputs = _outputs_requiring_grad(outputs)
    torch.manual_seed(0)
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    weighted_total(losses, criterion.weight_dict).backward()  # loss_*_0 has no weight: dropped
    assert outputs["aux_outputs"][0]["pred_logits"].grad is None
    assert torch.isfinite(outputs["pred_masks"].grad).all()
    # image 0 has no matched query, so only image 1 masks get a mask-loss gradient
    assert outputs["pred_masks"].grad[0].abs().sum() == 0
    assert outputs["pred_masks"].grad[1].abs().sum() > 0


def test_ce_class_loss_matches_hand_computation():
    gen = torch.Generator().manual_seed(6)
    num_classes = 3
    logits = torch.randn(2, 4, num_classes + 1, generator=gen)
    targets = [
        {"labels": torch.tensor([2, 0]), "masks": torch.zeros(2, 8, 8, dtype=torch.bool)},
        {"labels": torch.tensor([1]), "masks": torch.zeros(1, 8, 8, dtype=torch.bool)},
    ]
    indices = [(torch.tensor([1, 3]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    criterion = _tiny_criterion(class_loss="ce", num_classes=num_classes, eos_coef=0.25)
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, 3.0)["loss_ce"]

    # query -> class: image 0: q1 -> 0, q3 -> 2; image 1: q2 -> 1; everything else no-object (3)
    target = [[3, 0, 3, 2], [3, 3, 1, 3]]
    num, den = 0.0, 0.0
    for b in range(2):
        for q in range(4):
            c = target[b][q]
            weight = 0.25 if c == num_classes else 1.0
            logp = logits[b, q, c].item() - math.log(sum(math.exp(v) for v in logits[b, q].tolist()))
            num += -weight * logp
            den += weight
    assert loss.item() == pytest.approx(num / den, rel=1e-6)


def test_focal_class_loss_matches_hand_computation():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]]])  # [1, 2, K+1=3]
    target_classes = torch.tensor([[1, 2]])
    alpha, gamma = 5.0, 1.0
    total, count = 0.0, 0
    for q in range(2):
        for c in range(3):
            l = logits[0, q, c].item()
            y = 1.0 if c == target_classes[0, q].item() else 0.0
            p = 1.0 / (1.0 + math.exp(-l))
            bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
            p_t = p if y == 1.0 else 1 - p
            total += alpha * bce * (1 - p_t) ** gamma
            count += 1
    expected = 50.0 * total / count
    got = sigmoid_focal_class_loss(logits, target_classes, alpha, gamma)
    assert got.item() == pytest.approx(expected, rel=1e-6)

    # same through the criterion: query 0 matched to a class-1 target, query 1 unmatched
    criterion = _tiny_criterion(num_classes=2)
    targets = [{"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4, dtype=torch.bool)}]
    loss = criterion.loss_labels(
        {"pred_logits": logits}, targets, [(torch.tensor([0]), torch.tensor([0]))], 1.0
    )["loss_ce"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_mask_losses_match_hand_computation_with_injected_points():
    gen = torch.Generator().manual_seed(7)
    outputs, targets = _random_batch(gen, counts=(2, 1))
    indices = [(torch.tensor([0, 4]), torch.tensor([1, 0])), (torch.tensor([3]), torch.tensor([0]))]
    coords = torch.rand(3, 40, 2, generator=gen)
    criterion = _tiny_criterion()
    losses = criterion.loss_masks(outputs, targets, indices, 3.0, point_coords=coords)

    pairs = [(0, 0, 1), (0, 4, 0), (1, 3, 0)]  # (image, query, target), concatenation order
    ce_sum, dice_sum = 0.0, 0.0
    for j, (b, q, t) in enumerate(pairs):
        grid = (2 * coords[j] - 1)[None, :, None, :]
        x = F.grid_sample(outputs["pred_masks"][b, q][None, None], grid, align_corners=False).flatten()
        y = F.grid_sample(targets[b]["masks"][t].float()[None, None], grid, align_corners=False).flatten()
        ce_sum += F.binary_cross_entropy_with_logits(x, y).item()
        s = x.sigmoid()
        dice_sum += 1 - (2 * (s * y).sum().item() + 1) / (s.sum().item() + y.sum().item() + 1)
    assert losses["loss_mask"].item() == pytest.approx(ce_sum / 3.0, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice_sum / 3.0, rel=1e-5)


def test_target_masks_of_different_sizes_are_padded_not_rescaled():
    criterion = _tiny_criterion()
    small = torch.ones(1, 4, 4, dtype=torch.bool)
    large = torch.zeros(1, 8, 8, dtype=torch.bool)
    targets = [{"labels": torch.tensor([0]), "masks": small}, {"labels": torch.tensor([0]), "masks": large}]
    indices = [(torch.tensor([0]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([0]))]
    masks = criterion._matched_target_masks(targets, indices, "cpu")
    assert masks.shape == (2, 8, 8)
    assert masks[0, :4, :4].eq(1).all() and masks[0, 4:].eq(0).all() and masks[0, :, 4:].eq(0).all()


def test_random_point_path_is_deterministic_under_seed():
    gen = torch.Generator().manual_seed(8)
    outputs, targets = _random_batch(gen)
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"].flip(1), "pred_masks": outputs["pred_masks"].flip(1)}
    ]
    criterion = _tiny_criterion()

    torch.manual_seed(123)
    first = criterion(outputs, targets)
    torch.manual_seed(123)
    second = criterion(outputs, targets)
    torch.manual_seed(321)
    third = criterion(outputs, targets)

    assert list(first) == ["loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"]
    for key in first:
        assert torch.isfinite(first[key])
        assert torch.equal(first[key], second[key]), key
    assert any(not torch.equal(first[k], third[k]) for k in ("loss_mask", "loss_dice"))


def test_weight_losses_drops_unweighted_keys():
    losses = {"loss_ce": torch.tensor(2.0), "loss_mask": torch.tensor(3.0), "loss_extra": torch.tensor(7.0)}
    weights = {"loss_ce": 0.5, "loss_mask": 2.0, "loss_dice": 1.0}
    weighted = weight_losses(losses, weights)
    assert list(weighted) == ["loss_ce", "loss_mask"]
    assert weighted["loss_ce"].item() == 1.0 and weighted["loss_mask"].item() == 6.0
    assert weighted_total(losses, weights).item() == 7.0


def test_invalid_configuration_raises():
    with pytest.raises(ValueError):
        _tiny_criterion(class_loss="softmax_focal")
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)
