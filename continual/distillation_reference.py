"""Compare :mod:`continual.distillation` with a distillation fixture of the official code.

A distillation fixture (``"kind": "distillation"`` in ``manifest.json``; format:
``tests/fixtures/distillation/README.md``) holds the recorded training-mode outputs of a new and
an old model on a small batch, and everything the official loss wrapper computed from them.
:func:`run_distillation_checks` reads every setting from the fixture's ``config.yaml`` and
compares, with the fixture's tolerances:

* the loss weights;
* the targets after pseudo-labelling (labels and masks exact) and the number of pseudo-labels;
* the matching of every prediction, with the recorded sampling points (exact);
* every loss before and after weighting and the total (1e-5 relative), and the key sets;
* the gradient of the total with respect to every new-model tensor (1e-4 of the largest
  reference magnitude); a missing gradient (``None``) and a zero gradient are different results.
"""
import dataclasses
import json
import os
from typing import Dict, List, Optional

import torch

from continual.config import setup_cfg
from continual.distillation import DistillationLoss

__all__ = ["DistillationCheck", "load_distillation_config", "run_distillation_checks", "format_checks",
           "compare_gradient"]

LOSS_RTOL = 1e-5
LOSS_ATOL = 1e-7
GRAD_RTOL = 1e-4


@dataclasses.dataclass
class DistillationCheck:
    """One line of the report."""

    name: str
    ok: bool
    detail: str


def load_distillation_config(fixture_dir: str):
    """The fixture's config merged over this project's defaults. Keys the official config has and
    ours lacks are accepted (they cannot influence the losses checked here)."""
    cfg = setup_cfg()
    cfg.set_new_allowed(True)
    cfg.merge_from_file(os.path.join(fixture_dir, "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _load(fixture_dir: str, name: str):
    return torch.load(os.path.join(fixture_dir, name), map_location="cpu", weights_only=True)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _student_leaves(inputs: Dict):
    """The new model's tensors as fresh leaves that require grad."""
    out = inputs["outputs"]
    outputs = {k: _leaf(v) for k, v in out.items() if k != "aux_outputs"}
    if "aux_outputs" in out:
        outputs["aux_outputs"] = [{k: _leaf(v) for k, v in a.items()} for a in out["aux_outputs"]]
    features = {k: _leaf(v) for k, v in inputs["features"].items()}
    return outputs, features


def _loss_check(name: str, mine: Optional[torch.Tensor], ref: torch.Tensor) -> DistillationCheck:
    if mine is None:
        return DistillationCheck(name, False, "missing in ours")
    diff = abs(mine.detach().double().item() - ref.double().item())
    allowed = LOSS_RTOL * abs(ref.item()) + LOSS_ATOL
    return DistillationCheck(name, diff <= allowed, f"{mine.item():.7g} vs {ref.item():.7g} (|diff| {diff:.2e})")


def compare_gradient(name: str, mine: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> DistillationCheck:
    """``None`` (no gradient flowed) only matches ``None``; tensors match within 1e-4 of the
    reference's largest magnitude (exactly when the reference is all zero)."""
    if ref is None or mine is None:
        ok = ref is None and mine is None
        what = lambda g: "None" if g is None else f"a tensor (max|g| {g.abs().max().item():.3g})"  # noqa: E731
        return DistillationCheck(name, ok, f"ours {what(mine)}, reference {what(ref)}")
    if mine.shape != ref.shape:
        return DistillationCheck(name, False, f"shape {tuple(mine.shape)} vs {tuple(ref.shape)}")
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    diff = (mine.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    return DistillationCheck(name, diff <= GRAD_RTOL * scale, f"max|diff| {diff:.2e} (max|g| {scale:.3g})")


def run_distillation_checks(fixture_dir: str) -> List[DistillationCheck]:
    """Run every check of one distillation fixture folder."""
    torch.manual_seed(0)
    manifest = json.load(open(os.path.join(fixture_dir, "manifest.json")))
    if manifest.get("kind") != "distillation":
        raise ValueError(f"{fixture_dir}: manifest kind is {manifest.get('kind')!r}, expected 'distillation'")
    cfg = load_distillation_config(fixture_dir)
    inputs, ref = _load(fixture_dir, "inputs.pt"), _load(fixture_dir, "expected.pt")
    results: List[DistillationCheck] = []
    loss_fn = DistillationLoss(cfg)

    counts = (loss_fn.num_classes, loss_fn.old_classes)
    expected_counts = (manifest.get("num_classes", counts[0]), manifest.get("old_classes", counts[1]))
    results.append(DistillationCheck("class counts (C, C_old)", counts == expected_counts,
                                     f"{counts} vs {expected_counts}"))
    same_weights = list(loss_fn.weight_dict.items()) == [(k, float(v)) for k, v in ref["weight_dict"].items()]
    bad = {k: (loss_fn.weight_dict.get(k), v) for k, v in ref["weight_dict"].items()
           if abs(loss_fn.weight_dict.get(k, float("nan")) - v) > 1e-12}
    results.append(DistillationCheck("loss weights", same_weights and not bad,
                                     f"{len(loss_fn.weight_dict)} vs {len(ref['weight_dict'])} keys; differing {bad}"))

    # targets after pseudo-labelling
    gt = [{"gt_classes": x["gt_classes_1based"], "gt_masks": x["gt_masks"]} for x in inputs["data"]]
    outputs_old = inputs["outputs_old"]
    targets = loss_fn.prepare_targets(gt, tuple(inputs["padded_size"]), outputs_old)
    same = len(targets) == len(ref["targets"]) and all(
        torch.equal(t["labels"], r["labels"]) and t["masks"].shape == r["masks"].shape
        and torch.equal(t["masks"].bool(), r["masks"].bool()) for t, r in zip(targets, ref["targets"]))
    results.append(DistillationCheck("targets after pseudo-labelling", same, "labels and masks exact; per image "
                                     f"labels {[t['labels'].tolist() for t in targets]}"))
    if "pseudo_labels_added" in manifest:
        mine = getattr(loss_fn, "last_pseudo_counts", [0] * len(targets)) if loss_fn.pseudo else [0] * len(targets)
        results.append(DistillationCheck("pseudo-labels per image", list(mine) == list(manifest["pseudo_labels_added"]),
                                         f"{mine} vs {manifest['pseudo_labels_added']}"))

    # matching with the recorded points (on the reference targets, to isolate failures)
    outputs, features = _student_leaves(inputs)
    predictions = [outputs] + list(outputs.get("aux_outputs", [])) if loss_fn.deep_supervision else [outputs]
    if len(predictions) != len(ref["matcher_indices"]):
        results.append(DistillationCheck("number of matcher calls", False,
                                         f"{len(predictions)} vs {len(ref['matcher_indices'])}"))
    matcher = loss_fn.criterion.matcher
    for m, pred in enumerate(predictions[: len(ref["matcher_indices"])]):
        idx = matcher(pred, ref["targets"], point_coords=ref["matcher_point_coords"][m])
        ok = len(idx) == len(ref["matcher_indices"][m]) and all(
            torch.equal(a.cpu(), ra) and torch.equal(b.cpu(), rb) for (a, b), (ra, rb) in zip(idx, ref["matcher_indices"][m]))
        results.append(DistillationCheck(f"matcher indices, prediction {m}", ok, "with the recorded sampling points"))

    # losses
    unweighted = loss_fn.unweighted(outputs, outputs_old, ref["targets"], features, inputs["features_old"],
                                    indices=ref["matcher_indices"], point_coords=ref["criterion_point_coords"])
    keys_ok = sorted(unweighted) == sorted(ref["loss_dict_unweighted"])
    results.append(DistillationCheck("unweighted loss keys", keys_ok,
                                     f"only ours {sorted(set(unweighted) - set(ref['loss_dict_unweighted']))}, only "
                                     f"reference {sorted(set(ref['loss_dict_unweighted']) - set(unweighted))}"))
    for k, r in ref["loss_dict_unweighted"].items():
        results.append(_loss_check(f"loss {k} (unweighted)", unweighted.get(k), r))
    weighted = {k: v * loss_fn.weight_dict[k] for k, v in unweighted.items() if k in loss_fn.weight_dict}
    results.append(DistillationCheck("weighted loss keys", sorted(weighted) == sorted(ref["loss_dict"]),
                                     f"only ours {sorted(set(weighted) - set(ref['loss_dict']))}, only reference "
                                     f"{sorted(set(ref['loss_dict']) - set(weighted))}"))
    for k, r in ref["loss_dict"].items():
        results.append(_loss_check(f"loss {k} (weighted)", weighted.get(k), r))
    total = sum(weighted.values())
    results.append(_loss_check("total loss", total, ref["total_loss"]))

    # gradients with respect to every new-model tensor
    total.backward()
    grads = ref["grads"]
    for k in ("pred_logits", "pred_masks"):
        results.append(compare_gradient(f"grad outputs.{k}", outputs[k].grad, grads["outputs"][k]))
    ref_aux = grads["outputs"].get("aux_outputs") or []
    aux = outputs.get("aux_outputs", [])
    if len(aux) != len(ref_aux):
        results.append(DistillationCheck("aux_outputs gradient count", False, f"{len(aux)} vs {len(ref_aux)}"))
    for i, (a, r) in enumerate(zip(aux, ref_aux)):
        for k in ("pred_logits", "pred_masks"):
            results.append(compare_gradient(f"grad outputs.aux_outputs[{i}].{k}", a[k].grad, r[k]))
    for k, r in grads["features"].items():
        results.append(compare_gradient(f"grad features.{k}", features[k].grad, r))
    mask_feats = outputs.get("features")
    results.append(compare_gradient("grad mask_features", None if mask_feats is None else mask_feats.grad,
                                    grads.get("mask_features")))
    return results


def format_checks(results: List[DistillationCheck]) -> str:
    """A plain-text table of the results."""
    width = max((len(r.name) for r in results), default=10)
    lines = [f"{'check':<{width}}  result  detail", "-" * (width + 60)]
    lines += [f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.detail}" for r in results]
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)
