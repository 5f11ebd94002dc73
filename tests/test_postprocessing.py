"""Tests of the semantic / panoptic / instance post-processing.

The fixture tests feed the official decoder outputs stored in ``tests/fixtures/*/inference.pt``
through :func:`postprocess_batch` and compare with the official post-processed results
(fixtures/README.md 4.6 and 5(b)3). Every setting comes from the fixture's manifest / config.
The remaining tests are small hand-checkable cases.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detectron2.config import CfgNode

from mask2former.modeling.postprocessing import (
    PostProcessSettings,
    inference_mask_input,
    instance_inference,
    panoptic_inference,
    postprocess_batch,
    postprocess_image,
    queries_needed,
    semantic_inference,
    semantic_inference_soft,
    upsample_masks,
)

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_DIRS = sorted(p.parent for p in FIXTURES.glob("*/inference.pt"))


# --------------------------------------------------------------------------------------------
# fixtures from the official implementation


def _settings_from_manifest(manifest):
    conv, cfg = manifest["conventions"], manifest["cfg"]
    return PostProcessSettings(
        num_classes=conv["num_classes"],
        thing_ids=frozenset(conv["metadata_thing_contiguous_ids"]),
        semantic_on=conv["semantic_on"],
        panoptic_on=conv["panoptic_on"],
        instance_on=conv["instance_on"],
        use_sigmoid=not cfg["SOFTCLS"],
        semantic_mode="soft" if (cfg["MASK_BG"] and conv["semantic_on"]) else "hard",
        object_mask_threshold=conv["object_mask_threshold"],
        overlap_threshold=conv["overlap_threshold"],
        test_topk_per_image=conv["test_topk_per_image"],
        sem_seg_postprocess_before_inference=conv["sem_seg_postprocess_before_inference"],
    )


def _load(fixture_dir):
    manifest = json.loads((fixture_dir / "manifest.json").read_text())
    data = torch.load(fixture_dir / "inference.pt", weights_only=True)
    return manifest, data


def _output_sizes(data):
    return [(inp["height"], inp["width"]) for inp in data["inputs"]]


@pytest.fixture(params=FIXTURE_DIRS, ids=[p.name for p in FIXTURE_DIRS])
def fixture_dir(request):
    return request.param


def test_fixtures_present():
    assert FIXTURE_DIRS, "no tests/fixtures/*/inference.pt found"


def test_settings_from_config_yaml_match_manifest(fixture_dir):
    manifest, _ = _load(fixture_dir)
    cfg = CfgNode(yaml.safe_load((fixture_dir / "config.yaml").read_text()))
    conv = manifest["conventions"]
    from_cfg = PostProcessSettings.from_config(
        cfg, conv["num_classes"], conv["metadata_thing_contiguous_ids"]
    )
    assert from_cfg == _settings_from_manifest(manifest)


def test_fixture_mask_inputs_match_checksums(fixture_dir):
    manifest, data = _load(fixture_dir)
    settings = _settings_from_manifest(manifest)
    pred_logits = data["decoder_out"]["pred_logits"]
    upsampled = upsample_masks(data["decoder_out"]["pred_masks"], data["padded_size"])
    expected = manifest["inference"]["postprocess_inputs"]
    assert len(expected) == len(data["inputs"])
    for b, (image_size, output_size) in enumerate(zip(data["image_sizes"], _output_sizes(data))):
        mask_in = inference_mask_input(upsampled[b], image_size, output_size, settings)
        ref = expected[b]
        assert list(pred_logits[b].shape) == ref["mask_cls_shape"]
        assert list(mask_in.shape) == ref["mask_pred_shape"]
        as64 = mask_in.double()
        assert math.isclose(as64.sum().item(), ref["mask_pred_sum"], rel_tol=1e-12, abs_tol=1e-9)
        assert math.isclose(
            as64.abs().sum().item(), ref["mask_pred_abs_sum"], rel_tol=1e-12, abs_tol=1e-9
        )


def _dense_sem_seg(stored):
    dense = torch.zeros(stored["shape"], dtype=torch.float32)
    dense[stored["channels"]] = stored["values"].float()
    return dense


def _instance_rows(scores, classes, masks):
    """Rows (score, class, mask) sorted by score descending, then class."""
    rows = list(zip(scores.tolist(), classes.tolist(), masks))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return rows


def test_fixture_postprocessing_matches_official(fixture_dir):
    manifest, data = _load(fixture_dir)
    settings = _settings_from_manifest(manifest)
    out = data["decoder_out"]
    results = postprocess_batch(
        out["pred_logits"].clone(),
        out["pred_masks"].clone(),
        data["image_sizes"],
        _output_sizes(data),
        data["padded_size"],
        settings,
    )
    assert len(results) == len(data["postprocessed"])
    for mine, ref in zip(results, data["postprocessed"]):
        expected_keys = {
            k for k, on in (
                ("sem_seg", settings.semantic_on),
                ("panoptic_seg", settings.panoptic_on),
                ("instances", settings.instance_on),
            ) if on
        }
        assert set(mine) == expected_keys
        assert expected_keys <= set(ref)

        if settings.panoptic_on:
            pan, info = mine["panoptic_seg"]
            assert pan.dtype == torch.int32
            assert torch.equal(pan, ref["panoptic_seg"])
            assert info == [dict(s) for s in ref["segments_info"]]

        if settings.semantic_on:
            dense = _dense_sem_seg(ref["sem_seg"])
            sem = mine["sem_seg"]
            assert sem.dtype == torch.float32 and sem.shape == dense.shape
            if ref["sem_seg"]["values"].dtype == torch.uint8:
                assert torch.equal(sem, dense)
            else:
                torch.testing.assert_close(sem, dense, atol=1e-6, rtol=0)

        if settings.instance_on:
            inst, ref_inst = mine["instances"], ref["instances"]
            k = ref_inst["num_instances"]
            assert tuple(inst.image_size) == tuple(ref_inst["image_size"])
            assert len(inst) == k
            shape = ref_inst["pred_masks_shape"]
            ref_masks = np.unpackbits(
                ref_inst["pred_masks_packed"].numpy(), count=int(np.prod(shape))
            ).reshape(shape)
            assert inst.pred_masks.dtype == torch.float32
            assert set(inst.pred_masks.unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(inst.pred_boxes.tensor, ref_inst["pred_boxes"])
            mine_rows = _instance_rows(
                inst.scores, inst.pred_classes, inst.pred_masks.to(torch.uint8).numpy()
            )
            ref_rows = _instance_rows(ref_inst["scores"], ref_inst["pred_classes"], ref_masks)
            for (s, c, m), (rs, rc, rm) in zip(mine_rows, ref_rows):
                assert c == rc
                assert abs(s - rs) <= 1e-6
                assert np.array_equal(m, rm)


# --------------------------------------------------------------------------------------------
# hand-checkable synthetic cases

H, W = 4, 6
BIG = 10.0


def _logits(rows, num_classes):
    """[Q, C+1] logits: each row is (column, logit) with every other column at -BIG."""
    cls = torch.full((len(rows), num_classes + 1), -BIG)
    for q, (col, value) in enumerate(rows):
        cls[q, col] = value
    return cls


def _half_masks(*regions):
    """[Q, H, W] logits: +BIG inside the region ("left", "right", "all", "none"), -BIG outside."""
    masks = torch.full((len(regions), H, W), -BIG)
    for q, region in enumerate(regions):
        if region == "left":
            masks[q, :, : W // 2] = BIG
        elif region == "right":
            masks[q, :, W // 2 :] = BIG
        elif region == "all":
            masks[q] = BIG
    return masks


def test_no_query_kept_gives_empty_outputs():
    num_classes = 3
    cls = _logits([(num_classes, 5.0), (num_classes, 2.0)], num_classes)
    masks = _half_masks("left", "all")
    pan, info = panoptic_inference(cls, masks, num_classes, frozenset({2}))
    assert pan.dtype == torch.int32 and pan.shape == (H, W)
    assert not pan.any() and info == []
    sem = semantic_inference(cls, masks, num_classes)
    assert sem.shape == (num_classes + 1, H, W)
    assert torch.equal(sem[0], torch.ones(H, W)) and not sem[1:].any()


def test_stuff_queries_of_one_class_merge():
    num_classes = 3
    # label 0 -> category 1, which is stuff because only category 2 is a thing
    cls = _logits([(0, 3.0), (0, 2.0)], num_classes)
    pan, info = panoptic_inference(cls, _half_masks("left", "right"), num_classes, frozenset({2}))
    assert info == [{"id": 1, "isthing": False, "category_id": 1}]
    assert torch.equal(pan, torch.ones(H, W, dtype=torch.int32))


def test_thing_queries_of_one_class_stay_separate():
    num_classes = 3
    # label 1 -> category 2, a thing
    cls = _logits([(1, 3.0), (1, 2.0)], num_classes)
    pan, info = panoptic_inference(cls, _half_masks("left", "right"), num_classes, frozenset({2}))
    assert info == [
        {"id": 1, "isthing": True, "category_id": 2},
        {"id": 2, "isthing": True, "category_id": 2},
    ]
    assert (pan[:, : W // 2] == 1).all() and (pan[:, W // 2 :] == 2).all()
    sem = semantic_inference(cls, _half_masks("left", "right"), num_classes)
    assert torch.equal(sem.argmax(0), torch.full((H, W), 2))


def test_overlap_threshold_drops_mostly_covered_segment():
    num_classes = 3
    # query 1 covers the whole image but wins only the right half (ratio 0.5)
    cls = _logits([(0, 3.0), (1, 1.0)], num_classes)
    masks = _half_masks("left", "all")
    things = frozenset({1, 2})
    pan, info = panoptic_inference(cls, masks, num_classes, things, overlap_threshold=0.4)
    assert [s["category_id"] for s in info] == [1, 2]
    assert (pan[:, W // 2 :] == 2).all()

    pan, info = panoptic_inference(cls, masks, num_classes, things, overlap_threshold=0.6)
    assert info == [{"id": 1, "isthing": True, "category_id": 1}]
    assert (pan[:, : W // 2] == 1).all() and (pan[:, W // 2 :] == 0).all()

    sem = semantic_inference(cls, masks, num_classes, overlap_threshold=0.6)
    assert (sem.argmax(0)[:, W // 2 :] == 0).all() and (sem.argmax(0)[:, : W // 2] == 1).all()


def test_empty_mask_is_skipped():
    num_classes = 3
    # query 1 wins the right half (its 0.0067 beats query 0's 4.5e-5) but its own mask is empty
    cls = _logits([(0, 3.0), (1, 3.0)], num_classes)
    masks = _half_masks("left", "none")
    masks[1] = -5.0
    pan, info = panoptic_inference(cls, masks, num_classes, frozenset({1, 2}))
    assert info == [{"id": 1, "isthing": True, "category_id": 1}]
    assert (pan[:, W // 2 :] == 0).all()
    sem = semantic_inference(cls, masks, num_classes)
    assert (sem[0][:, W // 2 :] == 1).all()


def test_softmax_branch_is_standard_mask2former():
    num_classes = 2
    cls = torch.tensor([[2.0, 0.0, 0.0], [-BIG, 1.5, -BIG]])
    masks = torch.full((2, H, W), 3.0)
    things = frozenset({0, 1, 2})

    # sigmoid: 0.881 (query 0) > 0.818 (query 1); softmax: 0.787 < 0.99998
    _, info = panoptic_inference(cls, masks, num_classes, things, use_sigmoid=True)
    assert [s["category_id"] for s in info] == [1]
    pan, info = panoptic_inference(
        cls, masks, num_classes, things, use_sigmoid=False, category_offset=0
    )
    assert info == [{"id": 1, "isthing": True, "category_id": 1}]
    assert torch.equal(pan, torch.ones(H, W, dtype=torch.int32))
    # plain Mask2Former's threshold on the softmax score drops query 0 (0.787 <= 0.8)
    p0 = math.exp(2.0) / (math.exp(2.0) + 2.0)
    sem = semantic_inference(
        cls, masks, num_classes, object_mask_threshold=0.8, use_sigmoid=False
    )
    assert torch.equal(sem.argmax(0), torch.full((H, W), 2))

    soft = semantic_inference_soft(cls, masks)
    probs = torch.softmax(cls, -1)[:, :-1]
    expected = probs.sum(0) * torch.sigmoid(torch.tensor(3.0))
    assert soft.shape == (num_classes, H, W)
    torch.testing.assert_close(soft[:, 0, 0], expected)
    q1_class0 = math.exp(-BIG) / (2 * math.exp(-BIG) + math.exp(1.5))
    sigmoid3 = 1 / (1 + math.exp(-3.0))
    assert math.isclose(soft[0, 0, 0].item(), (p0 + q1_class0) * sigmoid3, rel_tol=1e-6)

    inst = instance_inference(cls, masks, num_classes, test_topk_per_image=2, use_sigmoid=False)
    order = inst.scores.argsort(descending=True)
    assert inst.pred_classes[order].tolist() == [1, 0]
    mean_prob = torch.sigmoid(torch.tensor(3.0)) * (H * W) / (H * W + 1e-6)
    torch.testing.assert_close(
        inst.scores[order], torch.stack([probs[1, 1], probs[0, 0]]) * mean_prob
    )
    assert torch.equal(inst.pred_masks, torch.ones(2, H, W))


def test_instance_thing_filter_is_off_by_one_like_the_official_code():
    num_classes = 3
    cls = torch.zeros(2, num_classes + 1)
    masks = _half_masks("left", "right")
    things = frozenset({2})  # 1-based category 2 = label 1
    inst = instance_inference(cls, masks, num_classes, thing_ids=things)
    assert len(inst) == 2 and set(inst.pred_classes.tolist()) == {2}

    settings = PostProcessSettings(
        num_classes=num_classes, thing_ids=things, panoptic_on=True, instance_on=True,
        fix_instance_thing_filter=True,
    )
    assert settings.instance_thing_ids == frozenset({1})
    assert PostProcessSettings(num_classes=3, panoptic_on=False).instance_thing_ids is None
    _, info = panoptic_inference(_logits([(1, 3.0)], num_classes), masks[:1], num_classes, things)
    assert info[0]["isthing"] and info[0]["category_id"] == 2


def test_settings_reject_deferred_resize_with_panoptic():
    with pytest.raises(ValueError):
        PostProcessSettings(
            num_classes=3, semantic_on=True, panoptic_on=True,
            sem_seg_postprocess_before_inference=False,
        )
    with pytest.raises(ValueError):
        PostProcessSettings(num_classes=3, semantic_mode="bogus")


def test_batch_deferred_semantic_resize():
    torch.manual_seed(0)
    num_classes = 4
    settings = PostProcessSettings(
        num_classes=num_classes, semantic_on=True, panoptic_on=False,
        sem_seg_postprocess_before_inference=False,
    )
    logits = torch.randn(2, 5, num_classes + 1) * 3
    masks = torch.randn(2, 5, 8, 8) * 4
    out = postprocess_batch(logits, masks, [(32, 32), (24, 20)], [(32, 32), (50, 30)], (32, 32),
                            settings)
    assert out[0]["sem_seg"].shape == (num_classes + 1, 32, 32)
    assert out[1]["sem_seg"].shape == (num_classes + 1, 50, 30)
    # bilinear resizing of a one-hot map keeps the channel sum at 1
    torch.testing.assert_close(out[1]["sem_seg"].sum(0), torch.ones(50, 30))
    assert set(out[0]["sem_seg"].unique().tolist()) <= {0.0, 1.0}


def _reference_panoptic(mask_cls, mask_pred, num_classes, thing_ids, overlap_threshold):
    """Per-query loop version of the panoptic merging, to check the vectorised one."""
    scores, labels = mask_cls.sigmoid().max(-1)
    keep = labels.ne(num_classes) & (scores > 0.0)
    scores, labels, masks = scores[keep], labels[keep], mask_pred[keep].sigmoid()
    pan = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32)
    info, stuff, next_id = [], {}, 0
    if len(labels) == 0:
        return pan, info
    winner = (scores[:, None, None] * masks).argmax(0)
    for k in range(len(labels)):
        cat = int(labels[k]) + 1
        isthing = cat in thing_ids
        won = int((winner == k).sum())
        own = int((masks[k] >= 0.5).sum())
        seg = (winner == k) & (masks[k] >= 0.5)
        if won == 0 or own == 0 or int(seg.sum()) == 0 or won / own < overlap_threshold:
            continue
        if not isthing and cat in stuff:
            pan[seg] = stuff[cat]
            continue
        next_id += 1
        if not isthing:
            stuff[cat] = next_id
        pan[seg] = next_id
        info.append({"id": next_id, "isthing": isthing, "category_id": cat})
    return pan, info


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("overlap_threshold", [0.0, 0.5, 0.8])
def test_panoptic_matches_per_query_loop(seed, overlap_threshold):
    g = torch.Generator().manual_seed(seed)
    num_classes, queries = 6, 12
    cls = torch.randn(queries, num_classes + 1, generator=g) * 2
    masks = torch.randn(queries, 10, 14, generator=g) * 3
    things = frozenset({1, 3, 5})
    pan, info = panoptic_inference(
        cls, masks, num_classes, things, overlap_threshold=overlap_threshold
    )
    ref_pan, ref_info = _reference_panoptic(cls, masks, num_classes, things, overlap_threshold)
    assert torch.equal(pan, ref_pan)
    assert info == ref_info


# --------------------------------------------------------------------------------------------
# only the needed queries are upsampled


def _straightforward_batch(pred_logits, pred_masks, image_sizes, output_sizes, padded_size, settings):
    upsampled = upsample_masks(pred_masks, padded_size)
    return [postprocess_image(c, m, i, o, settings)
            for c, m, i, o in zip(pred_logits, upsampled, image_sizes, output_sizes)]


@pytest.mark.parametrize("outputs", [
    dict(panoptic_on=True),
    dict(panoptic_on=True, semantic_on=True, instance_on=True),
    dict(panoptic_on=False, semantic_on=True, sem_seg_postprocess_before_inference=False),
    dict(panoptic_on=False, semantic_on=True, semantic_mode="soft"),
    dict(panoptic_on=False, instance_on=True),
])
def test_upsampling_only_needed_queries_gives_the_straightforward_results(outputs):
    torch.manual_seed(3)
    num_classes, queries = 12, 60
    settings = PostProcessSettings(num_classes=num_classes, thing_ids=frozenset(range(1, 13, 2)),
                                   test_topk_per_image=20, **outputs)
    logits = torch.randn(2, queries, num_classes + 1) * 3
    logits[:, ::3, -1] += 8  # a third of the queries predict no-object
    masks = torch.randn(2, queries, 10, 14) * 4
    sizes, out_sizes, padded = [(40, 50), (33, 56)], [(40, 50), (70, 90)], (40, 56)
    fast = postprocess_batch(logits, masks, sizes, out_sizes, padded, settings)
    slow = _straightforward_batch(logits, masks, sizes, out_sizes, padded, settings)
    for a, b in zip(fast, slow):
        assert a.keys() == b.keys()
        if "panoptic_seg" in a:
            assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
            assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
        if "sem_seg" in a:
            assert torch.equal(a["sem_seg"], b["sem_seg"])
        if "instances" in a:
            rows = lambda inst: sorted(zip(inst.scores.tolist(), inst.pred_classes.tolist(),
                                           [m.numpy().tobytes() for m in inst.pred_masks]))
            assert rows(a["instances"]) == rows(b["instances"])


def test_only_kept_queries_are_needed():
    settings = PostProcessSettings(num_classes=3, panoptic_on=True)
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 5.0], [0, 4.0, 0, 0], [0, 0, 0, 9.0]])
    assert queries_needed(logits, settings).tolist() == [0, 2]
    assert queries_needed(torch.full((4, 4), -1.0).index_fill_(1, torch.tensor([3]), 5.0), settings).numel() == 0
    empty = postprocess_batch(torch.full((1, 4, 4), -1.0).index_fill_(2, torch.tensor([3]), 5.0),
                              torch.randn(1, 4, 4, 4), [(16, 16)], [(16, 16)], (16, 16), settings)
    assert empty[0]["panoptic_seg"][1] == [] and int(empty[0]["panoptic_seg"][0].abs().sum()) == 0
