"""Compare this implementation with a reference fixture recorded from the official code.

A fixture folder (format: ``tests/fixtures/README.md``) holds the official config, the head
weights, the backbone features of a small batch and every output the official model computed
from them. :func:`run_checks` rebuilds the model from the fixture's ``config.yaml``, loads the
weights and compares, with the tolerances of the fixture README (section 6):

* state-dict keys, order and shapes; strict loading of the head;
* eval mode: pixel-decoder outputs, raw class logits of every prediction-head call, final
  logits (after logit manipulation) and masks; post-processing of the stored decoder outputs
  (exact) and of our own (segments exact, <= 0.1 % of panoptic pixels may differ);
* train mode: predictor outputs, target preparation, Hungarian matching with the recorded
  sampling points, every loss, the total, and the gradients of the trainable parameters (and
  of the backbone features at step 0);
* steps > 0: the initialisation of the newest prompt set (``copy_init.pt``).
"""
import dataclasses
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from mask2former.modeling.criterion import weight_losses

from .config import setup_cfg
from .prompt_tuning import initialize_new_step

__all__ = ["CheckResult", "run_checks", "load_fixture_config", "format_table"]


@dataclasses.dataclass
class CheckResult:
    """One line of the report."""

    name: str
    ok: bool
    detail: str


def load_fixture_config(fixture_dir: str):
    """The fixture's resolved config, on CPU and without a weights file."""
    return setup_cfg(os.path.join(fixture_dir, "config.yaml"), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""], freeze=True)


def _load(fixture_dir: str, name: str):
    return torch.load(os.path.join(fixture_dir, name), map_location="cpu", weights_only=True)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _close(name: str, mine: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 0.0) -> CheckResult:
    if mine.shape != ref.shape:
        return CheckResult(name, False, f"shape {tuple(mine.shape)} != {tuple(ref.shape)}")
    diff = (mine.double() - ref.double()).abs()
    allowed = atol + rtol * ref.double().abs()
    ok = bool((diff <= allowed).all())
    return CheckResult(name, ok, f"max|diff| {diff.max().item() if diff.numel() else 0:.2e} (atol {atol:g}, rtol {rtol:g})")


class _Recorder:
    """Collects the outputs of every call of a module (a forward hook)."""

    def __init__(self, module: torch.nn.Module):
        self.outputs: List[torch.Tensor] = []
        self._handle = module.register_forward_hook(lambda m, i, o: self.outputs.append(o.detach().clone()))

    def close(self):
        self._handle.remove()


def run_checks(fixture_dir: str) -> List[CheckResult]:
    """Run every check the fixture's files allow; returns one result per check."""
    torch.manual_seed(0)
    manifest = json.load(open(os.path.join(fixture_dir, "manifest.json")))
    results: List[CheckResult] = []
    cfg, model = _build_and_check_keys(fixture_dir, results)
    if model is None:
        return results
    thing_ids = frozenset(manifest["conventions"]["metadata_thing_contiguous_ids"])
    model.postprocess_settings = dataclasses.replace(model.postprocess_settings, thing_ids=thing_ids)
    files = set(os.listdir(fixture_dir))
    if "inference.pt" in files:
        _check_inference(fixture_dir, model, results)
    if "train.pt" in files:
        _check_training(fixture_dir, manifest, model, results)
    if "copy_init.pt" in files:
        _check_copy_init(fixture_dir, manifest, model, results)
    return results


def _build_and_check_keys(fixture_dir, results):
    cfg = load_fixture_config(fixture_dir)
    model = build_model(cfg)
    ref = _load(fixture_dir, "model_head.pth")["model"]
    mine = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    same_order = list(mine) == list(ref)
    results.append(CheckResult("state-dict keys (order)", same_order,
                               f"{len(mine)} ours vs {len(ref)} reference" + ("" if same_order else
                               f"; only ours: {sorted(set(mine) - set(ref))[:5]}, only reference: {sorted(set(ref) - set(mine))[:5]}")))
    bad_shapes = [k for k in ref if k in mine and tuple(mine[k].shape) != tuple(ref[k].shape)]
    results.append(CheckResult("state-dict shapes", not bad_shapes, f"{len(bad_shapes)} mismatched {bad_shapes[:3]}"))
    if not same_order or bad_shapes:
        return cfg, None
    missing, unexpected = model.load_state_dict(ref, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    loaded = model.state_dict()
    exact = all(torch.equal(loaded[k], v) for k, v in ref.items())
    results.append(CheckResult("strict load of head weights", not missing and not unexpected and exact,
                               f"missing {missing[:3]}, unexpected {unexpected[:3]}, bit-exact read-back {exact}"))
    return cfg, model


@torch.no_grad()
def _check_inference(fixture_dir, model, results):
    model.eval()
    feats = _load(fixture_dir, "backbone_features.pt")["infer"]
    ref = _load(fixture_dir, "inference.pt")
    head = model.sem_seg_head
    mask_features, _, multi_scale = head.pixel_decoder.forward_features(feats)
    for i, (m, r) in enumerate(zip(multi_scale, ref["pixel_decoder"]["multi_scale_features"])):
        results.append(_close(f"pixel decoder multi_scale_features[{i}]", m, r, atol=1e-5))
    results.append(_close("pixel decoder mask_features", mask_features, ref["pixel_decoder"]["mask_features"], atol=1e-5))

    recorder = _Recorder(head.predictor.class_embed)
    try:
        out = head(feats)
    finally:
        recorder.close()
    raw = ref["class_logits_raw_per_layer"]
    ok = len(recorder.outputs) == len(raw)
    results.append(CheckResult("number of prediction-head calls", ok, f"{len(recorder.outputs)} vs {len(raw)}"))
    for i, (m, r) in enumerate(zip(recorder.outputs, raw)):
        results.append(_close(f"raw class logits, call {i}", m, r, atol=5e-5, rtol=1e-5))
    results.append(_close("decoder pred_logits (after logit manipulation)", out["pred_logits"],
                          ref["decoder_out"]["pred_logits"], atol=5e-5, rtol=1e-5))
    results.append(_close("decoder pred_masks", out["pred_masks"], ref["decoder_out"]["pred_masks"], atol=5e-5, rtol=1e-5))

    sizes = [(x["height"], x["width"]) for x in ref["inputs"]]
    stored = model.postprocess(
        {"pred_logits": ref["decoder_out"]["pred_logits"], "pred_masks": ref["decoder_out"]["pred_masks"]},
        ref["image_sizes"], sizes, ref["padded_size"],
    )
    for b, (mine, exp) in enumerate(zip(stored, ref["postprocessed"])):
        results += compare_postprocessed(mine, exp, f"post-processing (stored decoder_out), image {b}", exact=True)
    own = model.postprocess(out, ref["image_sizes"], sizes, ref["padded_size"])
    for b, (mine, exp) in enumerate(zip(own, ref["postprocessed"])):
        results += compare_postprocessed(mine, exp, f"post-processing (our decoder_out), image {b}", exact=False)


def dense_sem_seg(stored: Dict) -> torch.Tensor:
    """The dense [C+1, H, W] semantic output from the fixture's sparse storage."""
    dense = torch.zeros(stored["shape"], dtype=torch.float32)
    dense[stored["channels"]] = stored["values"].float()
    return dense


def decoded_instance_masks(stored: Dict) -> np.ndarray:
    """uint8 [K, H, W] instance masks from the fixture's bit-packed storage."""
    shape = stored["pred_masks_shape"]
    return np.unpackbits(stored["pred_masks_packed"].numpy(), count=int(np.prod(shape))).reshape(shape)


def compare_postprocessed(mine: Dict, ref: Dict, label: str, exact: bool) -> List[CheckResult]:
    """Compare one image's outputs. ``exact``: everything exact (stored decoder outputs);
    otherwise segments exact and at most 0.1 % of panoptic pixels may differ."""
    out = []
    if "panoptic_seg" in mine:
        pan, info = mine["panoptic_seg"]
        differ = int((pan != ref["panoptic_seg"]).sum()) if pan.shape == ref["panoptic_seg"].shape else pan.numel()
        allowed = 0 if exact else int(0.001 * pan.numel())
        same_info = info == [dict(s) for s in ref["segments_info"]]
        out.append(CheckResult(f"{label}: panoptic", same_info and differ <= allowed,
                               f"segments_info equal {same_info}, {differ} pixels differ (allowed {allowed})"))
    if "sem_seg" in mine:
        dense = dense_sem_seg(ref["sem_seg"])
        sem = mine["sem_seg"]
        if exact:
            atol = 0.0 if ref["sem_seg"]["values"].dtype == torch.uint8 else 1e-6
            out.append(_close(f"{label}: semantic", sem, dense, atol=atol))
        else:
            differ = int((sem.argmax(0) != dense.argmax(0)).sum()) if sem.shape == dense.shape else sem.numel()
            allowed = int(0.001 * sem[0].numel())
            out.append(CheckResult(f"{label}: semantic", differ <= allowed, f"{differ} pixels differ (allowed {allowed})"))
    if "instances" in mine:
        out.append(_compare_instances(mine["instances"], ref["instances"], label, exact))
    return out


def _compare_instances(inst: Instances, ref: Dict, label: str, exact: bool) -> CheckResult:
    def rows(scores, classes, masks):
        r = list(zip(scores.tolist(), classes.tolist(), masks))
        return sorted(r, key=lambda x: (-x[0], x[1]))

    ref_masks = decoded_instance_masks(ref)
    mine = rows(inst.scores, inst.pred_classes, inst.pred_masks.to(torch.uint8).numpy())
    theirs = rows(ref["scores"], ref["pred_classes"], ref_masks)
    if len(mine) != len(theirs):
        return CheckResult(f"{label}: instances", False, f"{len(mine)} vs {len(theirs)} instances")
    if exact:
        ok = all(c == rc and abs(s - rs) <= 1e-6 and np.array_equal(m, rm)
                 for (s, c, m), (rs, rc, rm) in zip(mine, theirs))
        return CheckResult(f"{label}: instances", ok, f"{len(mine)} instances, classes/masks exact, scores 1e-6")
    ok = sorted(c for _, c, _ in mine) == sorted(c for _, c, _ in theirs)
    return CheckResult(f"{label}: instances", ok, f"{len(mine)} instances, class sets equal {ok}")


def _check_training(fixture_dir, manifest, model, results):
    ref = _load(fixture_dir, "train.pt")
    model.train()
    trainable = set(manifest["trainable_parameter_names"])
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    backbone_trainable = manifest["train"]["backbone_trainable"]
    feats = {k: v.clone().requires_grad_(backbone_trainable) for k, v in
             _load(fixture_dir, "backbone_features.pt")["train"].items()}
    out = model.sem_seg_head(feats)
    exp = ref["predictor_out"]
    results.append(_close("train pred_logits", out["pred_logits"], exp["pred_logits"], atol=5e-5, rtol=1e-5))
    results.append(_close("train pred_masks", out["pred_masks"], exp["pred_masks"], atol=5e-5, rtol=1e-5))
    n_aux = len(out.get("aux_outputs", []))
    results.append(CheckResult("train aux_outputs count", n_aux == len(exp["aux_outputs"]), f"{n_aux} vs {len(exp['aux_outputs'])}"))
    for i, (m, r) in enumerate(zip(out.get("aux_outputs", []), exp["aux_outputs"])):
        results.append(_close(f"train aux_outputs[{i}] logits", m["pred_logits"], r["pred_logits"], atol=5e-5, rtol=1e-5))
        results.append(_close(f"train aux_outputs[{i}] masks", m["pred_masks"], r["pred_masks"], atol=5e-5, rtol=1e-5))

    instances = []
    for x in ref["inputs"]:
        inst = Instances((x["height"], x["width"]))
        inst.gt_classes = x["gt_classes_1based"].clone()
        inst.gt_masks = x["gt_masks"].clone()
        instances.append(inst)
    targets = model.prepare_targets(instances, tuple(ref["padded_size"]))
    same = all(torch.equal(t["labels"], r["labels"]) and torch.equal(t["masks"], r["masks"])
               for t, r in zip(targets, ref["targets"]))
    results.append(CheckResult("target preparation", same, "labels and padded masks exact"))

    predictions = [out] + list(out.get("aux_outputs", []))
    matcher = model.criterion.matcher
    for m, pred in enumerate(predictions[: len(ref["matcher_indices"])]):
        idx = matcher(pred, ref["targets"], point_coords=ref["matcher_point_coords"][m])
        ok = all(torch.equal(a.cpu(), ra) and torch.equal(b.cpu(), rb)
                 for (a, b), (ra, rb) in zip(idx, ref["matcher_indices"][m]))
        results.append(CheckResult(f"matcher indices, prediction {m}", ok, "with the recorded sampling points"))

    unweighted = model.criterion(out, ref["targets"], indices=ref["matcher_indices"],
                                 point_coords=ref["criterion_point_coords"])
    for k, r in ref["loss_dict_unweighted"].items():
        mine = unweighted.get(k)
        if mine is None:
            results.append(CheckResult(f"loss {k}", False, "missing"))
            continue
        results.append(_close(f"loss {k} (unweighted)", mine.detach(), r, atol=1e-5 if abs(r.item()) < 1 else 0.0, rtol=1e-5))
    weighted = weight_losses(unweighted, model.criterion.weight_dict)
    extra = sorted(set(weighted) - set(ref["loss_dict"]))
    results.append(CheckResult("weighted loss keys", not extra and set(ref["loss_dict"]) <= set(weighted), f"extra {extra}"))
    for k, r in ref["loss_dict"].items():
        if k in weighted:
            results.append(_close(f"loss {k} (weighted)", weighted[k].detach(), r, atol=0.0, rtol=1e-5))
    total = sum(weighted.values())
    results.append(_close("total loss", total.detach(), ref["total_loss"], atol=0.0, rtol=1e-5))

    total.backward()
    params = dict(model.named_parameters())
    for name, g_ref in ref["grads"].items():
        results.append(_compare_grad(f"grad {name}", params[name].grad, g_ref))
    for name, g_ref in (ref.get("backbone_feature_grads") or {}).items():
        results.append(_compare_grad(f"grad of backbone feature {name}", feats[name].grad, g_ref))
    ours = sorted(n for n, p in params.items() if p.requires_grad and not n.startswith("backbone."))
    theirs = sorted(n for n in manifest["trainable_parameter_names"] if not n.startswith("backbone."))
    results.append(CheckResult("trainable head parameters", ours == theirs, f"{len(ours)} vs {len(theirs)}"))


def _compare_grad(name: str, grad: Optional[torch.Tensor], ref: Optional[Dict]) -> CheckResult:
    # "no gradient" (None) and "a gradient of zeros" differ: AdamW applies weight decay to a
    # parameter with a zero gradient but skips one whose gradient is None.
    if ref is None:
        ok = grad is None
        return CheckResult(name, ok, "reference gradient is None, ours is " + ("None" if ok else "a tensor"))
    if grad is None:
        return CheckResult(name, False, "our gradient is None, the reference gradient is a tensor")
    values = grad.flatten()[:: ref["stride"]]
    ref_values = ref["values"].double()
    scale = ref_values.abs().max().item() if ref_values.numel() else 0.0
    diff = _max_abs(values, ref["values"])
    norm = grad.double().norm().item()
    ok = diff <= 1e-5 * scale + 1e-6 and abs(norm - ref["norm"]) <= 1e-5 * abs(ref["norm"]) + 1e-12
    return CheckResult(name, ok, f"max|diff| {diff:.2e} (max|g| {scale:.3g}), norm {norm:.6g} vs {ref['norm']:.6g}")


def _check_copy_init(fixture_dir, manifest, model, results):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initialize_new_step(model)
    after = model.state_dict()
    expected = _load(fixture_dir, "copy_init.pt")
    for k, v in expected.items():
        results.append(_close(f"step initialisation {k}", after[k], v, atol=1e-7))
    changed = sorted(k for k in after if k not in expected and not torch.equal(after[k], before[k]))
    results.append(CheckResult("step initialisation leaves other entries unchanged", not changed, f"changed: {changed[:5]}"))
    listed = sorted(manifest.get("copy_init_keys", expected.keys()))
    results.append(CheckResult("step initialisation key set", listed == sorted(expected), f"{len(listed)} keys"))


def format_table(results: List[CheckResult]) -> str:
    """A plain-text table of the results."""
    width = max(len(r.name) for r in results) if results else 10
    lines = [f"{'check':<{width}}  result  detail", "-" * (width + 60)]
    lines += [f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.detail}" for r in results]
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)
