"""The ``MaskFormer`` meta-architecture: normalise and pad images, run backbone and head,
compute the set-prediction losses in training and post-process in inference."""
from contextlib import nullcontext
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.structures import ImageList
from torch import Tensor, nn

from .modeling.cpu_conv import backbone_input, use_cpu_convolutions
from .modeling.criterion import SetCriterion, weight_losses
from .modeling.matcher import HungarianMatcher
from .modeling.postprocessing import PostProcessSettings, postprocess_batch
from .modeling.transformer_decoder.mask2former_transformer_decoder import step_class_groups

__all__ = ["MaskFormer", "build_criterion", "loss_weight_dict"]


def loss_weight_dict(cfg) -> Dict[str, float]:
    """Loss weights: class/mask/dice for the final prediction and, with deep supervision, for
    every auxiliary prediction (``loss_*_{i}``, i < DEC_LAYERS - 1)."""
    mf = cfg.MODEL.MASK_FORMER
    weights = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
    if mf.DEEP_SUPERVISION:
        for i in range(mf.DEC_LAYERS - 1):
            weights.update({f"{k}_{i}": v for k, v in list(weights.items())[:3]})
    return weights


def _class_loss_type(cfg) -> str:
    focal, softcls = cfg.MODEL.MASK_FORMER.FOCAL, cfg.CONT.SOFTCLS
    if focal and not softcls:
        return "focal"
    if not focal and softcls:
        return "ce"
    raise NotImplementedError(
        f"MODEL.MASK_FORMER.FOCAL={focal} with CONT.SOFTCLS={softcls} is not supported: use "
        "FOCAL True + CONT.SOFTCLS False (ECLIPSE's sigmoid focal loss, all official scripts) or "
        "FOCAL False + CONT.SOFTCLS True (Mask2Former's softmax cross-entropy). The official "
        "sigmoid cross-entropy for FOCAL False + SOFTCLS False is broken (docs/official_behaviours.md)."
    )


def build_criterion(cfg, num_classes: int) -> SetCriterion:
    """The set criterion for ``num_classes`` classes (no-object = ``num_classes``)."""
    mf = cfg.MODEL.MASK_FORMER
    if mf.SOFTMASK:
        raise NotImplementedError("MODEL.MASK_FORMER.SOFTMASK True is not supported (no official script uses it)")
    matcher = HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS,
    )
    return SetCriterion(
        num_classes,
        matcher=matcher,
        weight_dict=loss_weight_dict(cfg),
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        class_loss=_class_loss_type(cfg),
        focal_alpha=mf.FOCAL_ALPHA,
        focal_gamma=mf.FOCAL_GAMMA,
    )


def _float32_outputs(outputs: Dict) -> Dict:
    """The decoder's output dict with every floating-point tensor (``aux_outputs`` included)
    cast to float32 (differentiably), for the losses and the post-processing."""
    def cast(x):
        if isinstance(x, Tensor):
            return x.float() if x.is_floating_point() else x
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(cast(v) for v in x)
        return x

    return cast(outputs)


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask2Former for continual semantic / panoptic / instance segmentation.

    Training inputs carry ``instances.gt_classes`` as **order positions** 1..C of the current
    scenario (0 is background and never a target); they are shifted to 0-based labels here,
    unless label 0 is a real class (``MASK_BG`` or ``PER_PIXEL`` with semantic inference).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: SetCriterion,
        size_divisibility: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        postprocess: PostProcessSettings,
        shift_labels: bool = True,
        cpu_bf16: bool = False,
    ):
        """
        Args:
            backbone: a Detectron2 backbone.
            sem_seg_head: :class:`MaskFormerHead`.
            criterion: the training criterion (its ``weight_dict`` weights the losses).
            size_divisibility: pad the batch to a multiple of this (<0: the backbone's).
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            postprocess: inference settings, see :class:`PostProcessSettings`.
            shift_labels: subtract 1 from the ground-truth classes (order positions -> labels).
            cpu_bf16: on CPU, run backbone and head under ``torch.autocast("cpu", bfloat16)``
                (``MODEL.CPU_BF16``); their outputs are cast back to float32 before the losses
                and the post-processing.
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.postprocess_settings = postprocess
        self.shift_labels = shift_labels
        self.cpu_bf16 = cpu_bf16
        pixel_decoder = getattr(sem_seg_head, "pixel_decoder", None)
        if cpu_bf16 and pixel_decoder is not None:
            pixel_decoder.cpu_bf16 = True  # its linear layers and convolutions in bf16 too
        self._training_loss = None
        # oneDNN convolutions on CPU (same parameters; see modeling/cpu_conv.py)
        use_cpu_convolutions(self.backbone)
        use_cpu_convolutions(self.sem_seg_head)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        mf = cfg.MODEL.MASK_FORMER
        use_bg = (mf.TEST.MASK_BG or mf.PER_PIXEL) and mf.TEST.SEMANTIC_ON
        # a background class is class 0 of the base head (one more class)
        num_classes = sum(step_class_groups(cfg.CONT.BASE_CLS + int(use_bg), cfg.CONT.INC_CLS, cfg.CONT.TASK))
        # the official code reads the thing classes from the training set's metadata
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
        thing_ids = getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).values() if metadata else ()
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_criterion(cfg, num_classes),
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "postprocess": PostProcessSettings.from_config(cfg, num_classes, thing_ids),
            "shift_labels": not use_bg,
            "cpu_bf16": cfg.MODEL.CPU_BF16,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ pieces
    def preprocess_images(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise the ``image`` tensors [3, H, W] and pad them into one batch."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def prepare_targets(self, gt_instances, padded_size: Tuple[int, int]) -> List[Dict]:
        """Instances -> criterion targets ``{"labels": [n], "masks": bool [n, Hp, Wp]}``."""
        h_pad, w_pad = padded_size
        targets = []
        for inst in gt_instances:
            gt_masks = inst.gt_masks
            gt_masks = gt_masks.tensor if hasattr(gt_masks, "tensor") else gt_masks
            padded = torch.zeros((gt_masks.shape[0], h_pad, w_pad), dtype=gt_masks.dtype, device=gt_masks.device)
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            labels = inst.gt_classes - 1 if self.shift_labels else inst.gt_classes.clone()
            targets.append({"labels": labels, "masks": padded})
        return targets

    def set_training_loss(self, loss) -> None:
        """Compute the training losses with ``loss`` instead of the criterion (the distillation
        baselines, ``continual.distillation.setup_distillation``; None restores the criterion).

        ``loss(images=, features=, outputs=, gt_instances=, padded_size=)`` gets the normalised
        padded batch, the backbone features, the head outputs (training layout, with the mask
        features as ``outputs["features"]``) and the ground truth, and returns the weighted
        losses. It is not a submodule: a teacher it holds is neither saved nor trained.
        """
        self._training_loss = loss

    def losses(self, outputs: Dict, targets: List[Dict], **injected) -> Dict[str, Tensor]:
        """Weighted losses; keys without a weight are dropped. ``injected`` is passed to the
        criterion (fixed matchings / sampling points, for reference checks)."""
        return weight_losses(self.criterion(outputs, targets, **injected), self.criterion.weight_dict)

    def postprocess(self, outputs: Dict, image_sizes, output_sizes, padded_size) -> List[Dict]:
        """Decoder outputs -> per-image ``sem_seg`` / ``panoptic_seg`` / ``instances``."""
        return postprocess_batch(
            outputs["pred_logits"], outputs["pred_masks"], image_sizes, output_sizes, padded_size,
            self.postprocess_settings,
        )

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts from the dataset mapper with ``image`` (uint8 or
                float [3, H, W], RGB), optionally ``height``/``width`` (output size) and, in
                training, ``instances`` (``gt_classes`` as order positions, ``gt_masks``).
        Returns:
            training: dict of weighted losses. Inference: one dict per image (see
            :func:`postprocess_batch`).
        """
        images = self.preprocess_images(batched_inputs)
        bf16 = self.cpu_bf16 and images.tensor.device.type == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            # a frozen backbone (prompt tuning) keeps no autograd graph
            frozen = self.training and not any(p.requires_grad for p in self.backbone.parameters())
            with torch.no_grad() if frozen else nullcontext():
                features = self.backbone(backbone_input(images.tensor))
            outputs = self.sem_seg_head(features)
        if bf16:
            outputs = _float32_outputs(outputs)
        padded_size = tuple(images.tensor.shape[-2:])
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("training inputs need 'instances' (use a MaskFormer dataset mapper)")
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            if self._training_loss is not None:
                if bf16:  # the distillation losses (POD) compare the backbone features in float32
                    features = _float32_outputs(features)
                return self._training_loss(images=images.tensor, features=features, outputs=outputs,
                                           gt_instances=gt, padded_size=padded_size)
            return self.losses(outputs, self.prepare_targets(gt, padded_size))
        output_sizes = [self._output_size(x, s) for x, s in zip(batched_inputs, images.image_sizes)]
        return self.postprocess(outputs, images.image_sizes, output_sizes, padded_size)

    def _output_size(self, inputs: Dict, image_size) -> Tuple[int, int]:
        # With semantic inference on, the official code sizes every output like the
        # test-resized semantic ground truth (continual mIoU is computed at that resolution).
        if self.postprocess_settings.semantic_on and "sem_seg" in inputs:
            return tuple(inputs["sem_seg"].shape[-2:])
        return inputs.get("height", image_size[0]), inputs.get("width", image_size[1])
