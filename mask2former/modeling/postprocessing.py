"""Inference-time post-processing of mask-classification outputs.

The decoder predicts, per image, ``Q`` queries, each with class logits over ``C + 1`` columns
(column ``C`` is "no object") and a mask logit map. This module turns them into Detectron2's
three output formats (semantic, panoptic, instance), reproducing the official ECLIPSE
implementation, including its quirks (docs/official_behaviours.md#post-processing and
#instance-thing-filter; tests/fixtures/README.md 4.3 / 4.6):

* ``use_sigmoid=True`` (``CONT.SOFTCLS False``, all ECLIPSE scripts): a query's score and label
  are the max of ``sigmoid`` over **all** ``C + 1`` columns, so a query whose best column is
  no-object is dropped even if some class column is also high. ``use_sigmoid=False`` is the
  standard Mask2Former softmax.
* Panoptic ``category_id`` is the model label **+ 1** (label 0 is the dataset's void / "other"
  class in ECLIPSE's label space), and ``isthing`` tests ``label + 1`` against the metadata's
  thing ids, whereas the instance routine tests the bare ``label``: the two differ by one.
* The hard-assignment semantic output has ``C + 1`` channels, channel 0 meaning "no segment".

The routines work on one image. :func:`postprocess_batch` is the batch entry point that the
meta-architecture calls: it upsamples the mask logits to the padded input size and crops/resizes
them to the requested output size before (or, for the semantic-only configs, after) inference.
"""
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, Instances

__all__ = [
    "PostProcessSettings",
    "class_scores_and_labels",
    "semantic_inference",
    "semantic_inference_soft",
    "panoptic_inference",
    "instance_inference",
    "upsample_masks",
    "inference_mask_input",
    "postprocess_image",
    "postprocess_batch",
    "queries_needed",
]

SEMANTIC_MODES = ("hard", "soft")


@dataclass(frozen=True)
class PostProcessSettings:
    """Everything the post-processing needs besides the network outputs and the image sizes.

    ``PostProcessSettings.from_config`` reads the official config keys; the defaults below are
    those of the official ECLIPSE scripts.
    """

    num_classes: int
    """C: number of classes seen so far; also the index of the no-object column."""

    thing_ids: FrozenSet[int] = frozenset()
    """Values of ``metadata.thing_dataset_id_to_contiguous_id`` (the dataset's thing ids)."""

    semantic_on: bool = False
    """Produce ``"sem_seg"`` (``MODEL.MASK_FORMER.TEST.SEMANTIC_ON``)."""

    panoptic_on: bool = True
    """Produce ``"panoptic_seg"`` (``MODEL.MASK_FORMER.TEST.PANOPTIC_ON``). Also switches on the
    thing-only filter of the instance output, as in the official code."""

    instance_on: bool = False
    """Produce ``"instances"`` (``MODEL.MASK_FORMER.TEST.INSTANCE_ON``)."""

    use_sigmoid: bool = True
    """Class scores by sigmoid over all C+1 columns (``CONT.SOFTCLS False``) instead of softmax."""

    semantic_mode: str = "hard"
    """``"hard"``: ECLIPSE's hard assignment with C+1 one-hot channels (``MASK_BG False``).
    ``"soft"``: Mask2Former's soft class-weighted mask sum with C channels (``MASK_BG True``);
    it always uses softmax class scores, whatever ``use_sigmoid`` says, like the official code."""

    object_mask_threshold: float = 0.0
    """A query is kept when its score is strictly above this
    (``MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD``)."""

    overlap_threshold: float = 0.0
    """A segment is dropped when (pixels it wins) / (pixels of its own mask) is below this
    (``MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD``)."""

    mask_threshold: float = 0.5
    """Mask probability at or above which a pixel belongs to a query's mask (hard-coded 0.5 in
    the official code)."""

    test_topk_per_image: int = 100
    """Instances kept per image before the thing filter (``TEST.DETECTIONS_PER_IMAGE``)."""

    sem_seg_postprocess_before_inference: bool = True
    """Crop and resize the mask logits to the output size before inference. When False (only
    allowed for semantic-only inference), the semantic map is computed at padded resolution and
    its C+1 channels are cropped and resized afterwards, which makes them fractional."""

    fix_instance_thing_filter: bool = False
    """Corrected behaviour: test ``label + 1`` (like panoptic) in the instance thing filter. The
    official code tests ``label``, which is off by one for ADE's 1-based thing ids."""

    def __post_init__(self):
        if self.semantic_mode not in SEMANTIC_MODES:
            raise ValueError(
                f"semantic_mode must be one of {SEMANTIC_MODES}, got {self.semantic_mode!r}"
            )
        if not self.sem_seg_postprocess_before_inference and (
            self.panoptic_on or self.instance_on or not self.semantic_on
        ):
            # Panoptic and instance outputs must be at output resolution, so only a
            # semantic-only configuration may defer the resize (the official code forces it).
            raise ValueError(
                "sem_seg_postprocess_before_inference=False is only valid for semantic-only "
                "inference"
            )
        # Tolerate any iterable from callers while keeping the dataclass hashable.
        object.__setattr__(self, "thing_ids", frozenset(int(i) for i in self.thing_ids))

    @property
    def instance_thing_ids(self) -> Optional[FrozenSet[int]]:
        """The set that the instance label is tested against, or None for no filtering."""
        if not self.panoptic_on:
            return None
        if self.fix_instance_thing_filter:
            return frozenset(i - 1 for i in self.thing_ids)
        return self.thing_ids

    @classmethod
    def from_config(cls, cfg, num_classes: int, thing_ids: Iterable[int] = ()):
        """Build the settings from a config with the official keys.

        Args:
            cfg: a config with ``MODEL.MASK_FORMER.TEST.*`` and, for continual runs, ``CONT.*``.
            num_classes: C, the number of classes of the current step (``sem_seg_head``'s).
            thing_ids: ``metadata.thing_dataset_id_to_contiguous_id.values()`` of the training
                dataset (empty for semantic-only datasets).
        """
        mf = cfg.MODEL.MASK_FORMER
        test = mf.TEST
        if mf.SOFTMASK:
            raise NotImplementedError("MODEL.MASK_FORMER.SOFTMASK=True is not supported")
        if mf.PER_PIXEL and test.SEMANTIC_ON:
            raise NotImplementedError("MODEL.MASK_FORMER.PER_PIXEL=True is not supported")
        # Without the continual keys the network is a plain Mask2Former (softmax scores), which
        # is also the official default of the model constructor.
        softcls = cfg.CONT.SOFTCLS if "CONT" in cfg else True
        return cls(
            num_classes=num_classes,
            thing_ids=frozenset(thing_ids),
            semantic_on=test.SEMANTIC_ON,
            panoptic_on=test.PANOPTIC_ON,
            instance_on=test.INSTANCE_ON,
            use_sigmoid=not softcls,
            semantic_mode="soft" if (test.MASK_BG and test.SEMANTIC_ON) else "hard",
            object_mask_threshold=test.OBJECT_MASK_THRESHOLD,
            overlap_threshold=test.OVERLAP_THRESHOLD,
            test_topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            sem_seg_postprocess_before_inference=(
                test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
                or test.PANOPTIC_ON
                or test.INSTANCE_ON
            ),
        )


_NOT_GIVEN = object()  # a keyword default distinct from None (None = no query kept)


def class_scores_and_labels(
    mask_cls: torch.Tensor, use_sigmoid: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best class of each query, no-object column included.

    Args:
        mask_cls: [Q, C+1] class logits.
        use_sigmoid: per-column sigmoid (ECLIPSE ``SOFTCLS False``) instead of softmax.

    Returns:
        scores: [Q] probability of the best column.
        labels: [Q] int64 index of the best column; ``C`` means no-object.
    """
    probs = mask_cls.sigmoid() if use_sigmoid else F.softmax(mask_cls, dim=-1)
    return probs.max(-1)


def _kept_queries(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    num_classes: int,
    object_mask_threshold: float,
    use_sigmoid: bool,
    in_place: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores [K], labels [K] and mask probabilities [K, H, W] of the non-no-object queries
    whose score is above the threshold, in query order. ``in_place``: ``mask_pred`` is a
    temporary nobody reads afterwards, which may hold the probabilities."""
    scores, labels = class_scores_and_labels(mask_cls, use_sigmoid)
    keep = _keep_rule(scores, labels, num_classes, object_mask_threshold)
    kept = keep.nonzero().squeeze(1)
    if kept.numel() == mask_pred.shape[0]:
        # every query kept (the usual case after postprocess_batch passed only the kept
        # queries' masks): no selection copy, and no fresh [K, H, W] tensor when allowed (a
        # fresh tensor of this size costs more in page faults than the sigmoid itself)
        return scores, labels, mask_pred.sigmoid_() if in_place else mask_pred.sigmoid()
    # index_select copies whole maps (a boolean index gathers element by element); the copy
    # then takes the sigmoid in place
    return scores[kept], labels[kept], mask_pred.index_select(0, kept).sigmoid_()


def _keep_rule(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, object_mask_threshold: float) -> torch.Tensor:
    """[Q] bool: the queries hard semantic / panoptic inference keep (best column not no-object,
    score above the threshold)."""
    return labels.ne(num_classes) & (scores > object_mask_threshold)


def _instance_topk(mask_cls: torch.Tensor, use_sigmoid: bool, topk_per_image: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores and flat (query * C + class) indices of the ``topk_per_image`` best (query, class)
    pairs, no-object excluded, in ``torch.topk(sorted=False)`` order."""
    class_probs = (mask_cls.sigmoid() if use_sigmoid else F.softmax(mask_cls, dim=-1))[:, :-1]
    # The official code fails when k exceeds Q*C; clamping only changes that error case.
    k = min(topk_per_image, class_probs.numel())
    return class_probs.flatten().topk(k, sorted=False)


def _best_query(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(scores.view(-1, 1, 1) * masks).argmax(0)`` (first query on ties), as a running
    maximum over the queries: no [K, H, W] product, and each step is a contiguous pass over one
    map, which on CPU is several times faster than ``argmax`` over the leading dimension.

    The winner map is kept in float (query numbers are exact integers there) and updated by
    arithmetic, ``winner += better * (k - winner)`` with ``better`` as 0/1: on CPU about half
    the time of ``masked_fill_``, whose kernel is not vectorised. An index map has no
    gradient: inputs that require one (inference called with autograd on) are detached."""
    scores, masks = scores.detach(), masks.detach()
    best = masks[0] * scores[0]
    winner = torch.zeros(masks.shape[1:], dtype=torch.float32, device=masks.device)
    candidate, better = torch.empty_like(best), torch.empty_like(winner)
    for k in range(1, masks.shape[0]):
        torch.mul(masks[k], scores[k], out=candidate)
        torch.gt(candidate, best, out=better)  # 1.0 where query k is strictly better
        winner.addcmul_(better, winner.neg().add_(k))
        torch.maximum(best, candidate, out=best)
    return winner.long()


def _assign_pixels(
    scores: torch.Tensor,
    masks: torch.Tensor,
    mask_threshold: float,
    overlap_threshold: float,
) -> Tuple[torch.Tensor, torch.Tensor, List[bool]]:
    """Hard pixel assignment shared by the semantic and panoptic routines.

    Each pixel goes to the query with the largest ``score * mask probability`` (first query on
    ties). Query k's segment is the set of pixels it wins where its own mask probability is at
    least ``mask_threshold``. A segment survives when it is non-empty and the fraction
    (pixels won) / (pixels of its own thresholded mask) is not below ``overlap_threshold``.

    Args:
        scores: [K] class scores of the kept queries (K >= 1).
        masks: [K, H, W] mask probabilities.

    Returns:
        winner: [H, W] int64 index of the winning query of every pixel.
        in_segment: [H, W] bool, the pixel lies in its winner's segment.
        survives: K bools, whether each query's segment is kept.
    """
    num_kept = scores.shape[0]
    winner = _best_query(scores, masks)
    # the winner's own thresholded mask at every pixel
    in_segment = masks.gather(0, winner.unsqueeze(0))[0] >= mask_threshold
    # Segments are disjoint (one winner per pixel), so every per-query area below is one
    # pass over the pixels instead of K full-image comparisons.
    flat_winner = winner.flatten()
    won_area = torch.bincount(flat_winner, minlength=num_kept).tolist()
    segment_area = torch.bincount(flat_winner[in_segment.flatten()], minlength=num_kept).tolist()
    # one map at a time (in cache) instead of a [K, H, W] bool stack and a cast for its sum
    mask_area = [int((mask >= mask_threshold).sum()) for mask in masks]

    survives = []
    for k in range(num_kept):
        ok = won_area[k] > 0 and mask_area[k] > 0 and segment_area[k] > 0
        # The ratio uses the pixels won, not the segment area; the official code does the same.
        if ok and won_area[k] / mask_area[k] < overlap_threshold:
            ok = False
        survives.append(ok)
    return winner, in_segment, survives


def _segments(mask_cls, mask_pred, num_classes, object_mask_threshold, overlap_threshold, mask_threshold,
              use_sigmoid, in_place=False):
    """``(labels, winner, in_segment, survives)`` of the kept queries (see :func:`_kept_queries`
    and :func:`_assign_pixels`), or None when no query is kept. Hard semantic and panoptic
    inference of one image share it (:func:`postprocess_image` computes it once for both)."""
    scores, labels, masks = _kept_queries(mask_cls, mask_pred, num_classes, object_mask_threshold, use_sigmoid,
                                          in_place)
    if labels.numel() == 0:
        return None
    return (labels,) + _assign_pixels(scores, masks, mask_threshold, overlap_threshold)


def semantic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    num_classes: int,
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    use_sigmoid: bool = True,
    segments=_NOT_GIVEN,
) -> torch.Tensor:
    """ECLIPSE's hard-assignment semantic segmentation (``MASK_BG False``) of one image.

    Every pixel of a surviving segment (see :func:`panoptic_inference`) gets ``label + 1``;
    other pixels get 0. The map is returned one-hot.

    Args:
        mask_cls: [Q, C+1] class logits.
        mask_pred: [Q, H, W] mask logits.
        num_classes: C.
        segments: the result of :func:`_segments` for these inputs, when the caller has it
            (computed here otherwise).

    Returns:
        [C+1, H, W] float32 one-hot map: channel 0 = no segment, channel ``c+1`` = label ``c``.
    """
    h, w = mask_pred.shape[-2:]
    if segments is _NOT_GIVEN:
        segments = _segments(mask_cls, mask_pred, num_classes, object_mask_threshold, overlap_threshold,
                             mask_threshold, use_sigmoid)
    semseg = torch.zeros((h, w), dtype=torch.long, device=mask_pred.device)
    if segments is not None:
        labels, winner, in_segment, survives = segments
        keep = torch.tensor(survives, dtype=torch.bool, device=labels.device)
        value_of_query = torch.where(keep, labels + 1, torch.zeros_like(labels))
        semseg = torch.where(in_segment, value_of_query[winner], semseg)
    return _one_hot_map(semseg, num_classes + 1)


def _one_hot_map(labels: torch.Tensor, channels: int) -> torch.Tensor:
    """``F.one_hot(labels, channels).permute(2, 0, 1).float()`` for an [H, W] map, by scattering
    ones into a float32 [channels, H, W] map (``F.one_hot`` builds an int64 [H, W, channels] map,
    then permutes and converts it: several times the memory traffic)."""
    out = torch.zeros((channels,) + tuple(labels.shape), device=labels.device)
    return out.scatter_(0, labels.unsqueeze(0), 1.0)


def semantic_inference_soft(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Mask2Former's soft semantic segmentation (ECLIPSE ``MASK_BG True``) of one image.

    Args:
        mask_cls: [Q, C+1] class logits (softmax scores are used, no-object column dropped).
        mask_pred: [Q, H, W] mask logits.

    Returns:
        [C, H, W] per-class sum over queries of class probability times mask probability.
    """
    class_probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", class_probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    num_classes: int,
    thing_ids: FrozenSet[int],
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    use_sigmoid: bool = True,
    category_offset: int = 1,
    segments=_NOT_GIVEN,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Panoptic segmentation of one image by hard pixel assignment.

    Queries whose best column is no-object, or whose score is not above
    ``object_mask_threshold``, are dropped. Each pixel goes to the remaining query with the
    largest ``score * sigmoid(mask)``; a query's segment is what it wins within its own
    thresholded mask. Empty segments and those whose won-area / mask-area ratio is below
    ``overlap_threshold`` are dropped. Stuff segments of one category share one id; thing
    segments get one id each. Ids are 1, 2, ... in query order.

    Args:
        mask_cls: [Q, C+1] class logits.
        mask_pred: [Q, H, W] mask logits.
        num_classes: C.
        thing_ids: category ids that are things; ``isthing = (label + category_offset) in
            thing_ids``.
        category_offset: added to the 0-based label to give ``category_id`` (1 in ECLIPSE,
            whose label space has the void class at 0; 0 in plain Mask2Former).
        segments: the result of :func:`_segments` for these inputs, when the caller has it
            (computed here otherwise).

    Returns:
        panoptic_seg: [H, W] int32 segment ids, 0 = void.
        segments_info: list of ``{"id", "isthing", "category_id"}`` in id order.
    """
    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    segments_info = []
    if segments is _NOT_GIVEN:
        segments = _segments(mask_cls, mask_pred, num_classes, object_mask_threshold, overlap_threshold,
                             mask_threshold, use_sigmoid)
    if segments is None:
        return panoptic_seg, segments_info
    labels, winner, in_segment, survives = segments
    segment_of_query = [0] * len(survives)
    stuff_segment = {}
    for k, (label, ok) in enumerate(zip(labels.tolist(), survives)):
        if not ok:
            continue
        category_id = label + category_offset
        isthing = category_id in thing_ids
        if not isthing and category_id in stuff_segment:
            segment_of_query[k] = stuff_segment[category_id]
            continue
        new_id = len(segments_info) + 1
        if not isthing:
            stuff_segment[category_id] = new_id
        segment_of_query[k] = new_id
        segments_info.append({"id": new_id, "isthing": isthing, "category_id": category_id})

    id_table = torch.tensor(segment_of_query, dtype=torch.int32, device=mask_pred.device)
    panoptic_seg = torch.where(in_segment, id_table[winner], panoptic_seg)
    return panoptic_seg, segments_info


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    num_classes: int,
    test_topk_per_image: int = 100,
    thing_ids: Optional[FrozenSet[int]] = None,
    use_sigmoid: bool = True,
) -> Instances:
    """Instance segmentation of one image: the top-k (query, class) pairs.

    Every query proposes every class; the ``test_topk_per_image`` pairs with the highest class
    probability are kept (unsorted, in ``torch.topk(sorted=False)`` order). With ``thing_ids``,
    only pairs whose 0-based label is in the set are kept: in the official code this tests the
    bare label although ``thing_ids`` holds ``label + 1`` values (see
    :attr:`PostProcessSettings.instance_thing_ids`). The final score is the class probability
    times the mean mask probability inside the binary mask (mask logit > 0).

    Args:
        mask_cls: [Q, C+1] class logits.
        mask_pred: [Q, H, W] mask logits.
        num_classes: C.
        thing_ids: labels to keep, or None to keep all.

    Returns:
        Instances of image size (H, W) with ``pred_masks`` [K, H, W] float 0/1, ``pred_boxes``
        (all zero), ``scores`` [K] and ``pred_classes`` [K] (0-based labels).
    """
    image_size = tuple(mask_pred.shape[-2:])
    topk_scores, topk_indices = _instance_topk(mask_cls, use_sigmoid, test_topk_per_image)
    topk_labels = topk_indices % num_classes
    topk_queries = topk_indices // num_classes

    if thing_ids is not None:
        keep = torch.tensor(
            [label in thing_ids for label in topk_labels.tolist()],
            dtype=torch.bool,
            device=topk_labels.device,
        )
        topk_scores, topk_labels, topk_queries = (
            topk_scores[keep], topk_labels[keep], topk_queries[keep]
        )

    binary, mean_mask_prob = _binary_masks_and_mean_prob(mask_pred, topk_queries)
    result = Instances(image_size)
    result.pred_masks = binary
    result.pred_boxes = Boxes(torch.zeros(binary.shape[0], 4, device=binary.device))
    result.scores = topk_scores * mean_mask_prob
    result.pred_classes = topk_labels
    return result


def _binary_masks_and_mean_prob(mask_pred: torch.Tensor, queries: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mask_pred[queries] > 0).float()`` and, per row, the mean sigmoid probability inside
    that binary mask (``1e-6`` added to the pixel count), as the official instance inference
    computes them; one mask at a time, written into the output and turned into 0/1 in place
    while it is in cache, instead of four full-size temporaries. Same values."""
    binary = mask_pred.new_empty((len(queries),) + tuple(mask_pred.shape[1:]))
    mean_prob = mask_pred.new_empty(len(queries))
    for row, query in enumerate(queries.tolist()):
        mask = binary[row]
        mask.copy_(mask_pred[query])
        positive = mask > 0
        mean_prob[row] = torch.where(positive, mask.sigmoid(), 0).sum() / (positive.sum() + 1e-6)
        mask.gt_(0)
    return binary, mean_prob


def upsample_masks(pred_masks: torch.Tensor, padded_size: Sequence[int]) -> torch.Tensor:
    """Upsample the decoder's mask logits to the padded input size.

    Args:
        pred_masks: [B, Q, h, w] mask logits (h, w = padded size / 4).
        padded_size: (Hp, Wp) of the padded input batch.

    Returns:
        [B, Q, Hp, Wp] bilinear (``align_corners=False``) upsampled logits (Q may be 0: an
        image where no query is kept).
    """
    if pred_masks.shape[1] == 0:  # F.interpolate rejects an empty channel dimension
        return pred_masks.new_zeros((pred_masks.shape[0], 0, *tuple(padded_size)))
    return F.interpolate(
        pred_masks, size=tuple(padded_size), mode="bilinear", align_corners=False
    )


def inference_mask_input(
    mask_pred: torch.Tensor,
    image_size: Sequence[int],
    output_size: Sequence[int],
    settings: PostProcessSettings,
) -> torch.Tensor:
    """The mask logits that the per-image routines receive.

    Args:
        mask_pred: [Q, Hp, Wp] mask logits at padded resolution.
        image_size: (h, w) of the unpadded input image.
        output_size: (height, width) requested for the outputs.

    Returns:
        [Q, height, width] (cropped to ``image_size`` and resized) when
        ``settings.sem_seg_postprocess_before_inference``, else ``mask_pred`` unchanged.
    """
    if not settings.sem_seg_postprocess_before_inference:
        return mask_pred
    if tuple(mask_pred.shape[-2:]) == tuple(image_size) == tuple(output_size):
        # nothing to crop, and bilinear resizing to the same size is the identity: skip a
        # full-resolution pass over every kept mask (same values)
        return mask_pred
    return sem_seg_postprocess(mask_pred, image_size, output_size[0], output_size[1])


def postprocess_image(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    image_size: Sequence[int],
    output_size: Sequence[int],
    settings: PostProcessSettings,
    scratch: bool = False,
) -> Dict:
    """Post-process one image.

    Args:
        mask_cls: [Q, C+1] class logits.
        mask_pred: [Q, Hp, Wp] mask logits at padded resolution (see :func:`upsample_masks`).
        image_size: (h, w) of the unpadded input image.
        output_size: (height, width) of the outputs.
        scratch: ``mask_pred`` is a temporary of the caller (as in :func:`postprocess_batch`),
            which may be overwritten when no enabled output reads the logits after the
            semantic / panoptic pixel assignment.

    Returns:
        dict with, as switched on in ``settings``: ``"sem_seg"`` [C+1, height, width] (C
        channels for ``semantic_mode="soft"``), ``"panoptic_seg"`` (int32 [height, width] ids,
        segments_info) and ``"instances"`` (:class:`Instances` of size (height, width)).
    """
    s = settings
    mask_pred = inference_mask_input(mask_pred, image_size, output_size, s)
    mask_cls = mask_cls.to(mask_pred)
    result = {}
    # hard semantic and panoptic inference assign the pixels with the same rule and thresholds:
    # done once here for both; the mask probabilities may overwrite the logits when the
    # instance and soft semantic outputs, which read the logits, are off
    soft_semantic = s.semantic_on and s.semantic_mode == "soft"
    segments = _NOT_GIVEN
    if s.panoptic_on or (s.semantic_on and not soft_semantic):
        in_place = scratch and not s.instance_on and not soft_semantic
        segments = _segments(mask_cls, mask_pred, s.num_classes, s.object_mask_threshold,
                             s.overlap_threshold, s.mask_threshold, s.use_sigmoid, in_place=in_place)

    if s.semantic_on:
        if s.semantic_mode == "soft":
            sem_seg = semantic_inference_soft(mask_cls, mask_pred)
        else:
            sem_seg = semantic_inference(
                mask_cls, mask_pred, s.num_classes, s.object_mask_threshold,
                s.overlap_threshold, s.mask_threshold, s.use_sigmoid, segments=segments,
            )
        if not s.sem_seg_postprocess_before_inference:
            sem_seg = sem_seg_postprocess(sem_seg, image_size, output_size[0], output_size[1])
        result["sem_seg"] = sem_seg

    if s.panoptic_on:
        result["panoptic_seg"] = panoptic_inference(
            mask_cls, mask_pred, s.num_classes, s.thing_ids, s.object_mask_threshold,
            s.overlap_threshold, s.mask_threshold, s.use_sigmoid, segments=segments,
        )

    if s.instance_on:
        result["instances"] = instance_inference(
            mask_cls, mask_pred, s.num_classes, s.test_topk_per_image,
            s.instance_thing_ids, s.use_sigmoid,
        )
    return result


def postprocess_batch(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    image_sizes: Sequence[Sequence[int]],
    output_sizes: Sequence[Sequence[int]],
    padded_size: Sequence[int],
    settings: PostProcessSettings,
) -> List[Dict]:
    """Post-process a batch of decoder outputs, as the meta-architecture's inference does.

    Args:
        pred_logits: [B, Q, C+1] final class logits (after the logit manipulation).
        pred_masks: [B, Q, Hp/4, Wp/4] final mask logits.
        image_sizes: B pairs (h, w), the unpadded input sizes.
        output_sizes: B pairs (height, width), the requested output sizes.
        padded_size: (Hp, Wp) of the padded input batch.
        settings: see :class:`PostProcessSettings`.

    Returns:
        B dicts, see :func:`postprocess_image`.
    """
    results = []
    for mask_cls, masks, image_size, output_size in zip(pred_logits, pred_masks, image_sizes, output_sizes):
        # only the queries some output can use are upsampled: the cost follows the kept
        # segments, not the number of queries (per-query upsampling is independent, so the
        # results are those of upsampling everything)
        needed = queries_needed(mask_cls, settings)
        if needed.numel() == 0:
            # keep one query so that the resizing ops see a non-empty tensor; it is not kept
            # by any routine, so the outputs are empty as they should be
            needed = needed.new_zeros(1)
        upsampled = upsample_masks(masks[needed].unsqueeze(0), padded_size)[0]
        results.append(postprocess_image(mask_cls[needed], upsampled, image_size, output_size, settings,
                                         scratch=True))
    return results


def queries_needed(mask_cls: torch.Tensor, settings: PostProcessSettings) -> torch.Tensor:
    """Indices (ascending) of the queries whose masks the enabled outputs can use.

    Hard semantic and panoptic inference use the queries kept by their score threshold;
    instance inference the queries of the top-k (query, class) pairs; soft semantic inference
    every query (the rules are those of the routines: ``_keep_rule`` and ``_instance_topk``). Passing only these queries, in their original order, to
    :func:`postprocess_image` gives the same results as passing all of them.

    Args:
        mask_cls: [Q, C+1] class logits of one image.
    """
    s = settings
    num_queries = mask_cls.shape[0]
    if s.semantic_on and s.semantic_mode == "soft":
        return torch.arange(num_queries, device=mask_cls.device)
    needed = torch.zeros(num_queries, dtype=torch.bool, device=mask_cls.device)
    if s.panoptic_on or s.semantic_on:
        scores, labels = class_scores_and_labels(mask_cls, s.use_sigmoid)
        needed |= _keep_rule(scores, labels, s.num_classes, s.object_mask_threshold)
    if s.instance_on:
        needed[_instance_topk(mask_cls, s.use_sigmoid, s.test_topk_per_image)[1] // s.num_classes] = True
    return needed.nonzero().flatten()
