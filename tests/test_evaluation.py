"""Continual evaluation: PQ against panopticapi, order mapping, split arithmetic, semantic
confusion-matrix metrics and the result files (docs/design.md#evaluation)."""
import contextlib
import io
import json
import math
import os
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import MetadataCatalog

from continual.evaluation import (
    ContinualPanopticEvaluator,
    ContinualSemSegEvaluator,
    append_official_csv,
    append_official_per_class_csv,
    confusion_matrix,
    per_class_in_order,
    read_metrics_json,
    semantic_metrics,
    split_metrics,
    write_metrics_json,
    write_official_results,
)

H, W = 4, 8
# GT-json category order: void first, as myade20k; ids = contiguous ids
CATEGORIES = [
    {"id": 0, "name": "void", "isthing": 0},
    {"id": 1, "name": "wall", "isthing": 0},
    {"id": 2, "name": "floor", "isthing": 0},
    {"id": 3, "name": "person", "isthing": 1},
    {"id": 4, "name": "car", "isthing": 1},
    {"id": 5, "name": "sky", "isthing": 0},
]
WALL, FLOOR, PERSON, CAR, SKY = 1, 2, 3, 4, 5


def _region(rows, cols):
    m = np.zeros((H, W), dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


# image -> list of (segment id, category id, mask); uncovered pixels are VOID (0)
GT_IMAGES = {
    "a": [
        (1, WALL, _region((0, 2), (0, 8))),
        (2, PERSON, _region((2, 4), (0, 4))),
        (3, FLOOR, _region((2, 4), (4, 8))),
    ],
    "b": [
        (1, SKY, _region((0, 2), (0, 8))),
        (7, CAR, _region((2, 4), (0, 2))),
        (8, CAR, _region((2, 4), (2, 4))),
    ],
    "c": [
        (5, FLOOR, _region((0, 4), (0, 4))),
        (6, WALL, _region((0, 4), (4, 8))),
    ],
}


def _id_map(segments):
    img = np.zeros((H, W), dtype=np.int32)
    for sid, _, mask in segments:
        img[mask] = sid
    return img


def _write_png(path, id_map):
    from panopticapi.utils import id2rgb

    Image.fromarray(id2rgb(id_map.astype(np.int64))).save(path)


def make_dataset(root, images):
    """GT panoptic json + PNGs for ``images`` (names of GT_IMAGES); registers metadata and
    returns the dataset name."""
    gt_dir = root / "gt"
    gt_dir.mkdir(parents=True)
    anns, imgs = [], []
    for name in images:
        segs = GT_IMAGES[name]
        _write_png(gt_dir / f"{name}.png", _id_map(segs))
        imgs.append({"id": name, "file_name": f"{name}.jpg", "height": H, "width": W})
        anns.append(
            {
                "image_id": name,
                "file_name": f"{name}.png",
                "segments_info": [
                    {"id": sid, "category_id": cat, "iscrowd": 0, "area": int(mask.sum()), "bbox": [0, 0, 1, 1]}
                    for sid, cat, mask in segs
                ],
            }
        )
    gt_json = root / "gt.json"
    gt_json.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": CATEGORIES}))
    name = f"_test_eval_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(
        panoptic_json=str(gt_json),
        panoptic_root=str(gt_dir),
        thing_dataset_id_to_contiguous_id={c["id"]: c["id"] for c in CATEGORIES if c["isthing"]},
        stuff_dataset_id_to_contiguous_id={c["id"]: c["id"] for c in CATEGORIES},
        label_divisor=1000,
        ignore_label=255,
    )
    return name


@pytest.fixture
def dataset(tmp_path):
    names = []

    def make(images):
        name = make_dataset(tmp_path / f"ds{len(names)}", images)
        names.append(name)
        return name

    yield make
    for n in names:
        MetadataCatalog.remove(n)


# predictions, in DATASET category ids: image -> list of (segment id, category id, mask)
PRED_DATASET_IDS = {
    "a": [  # perfect
        (1, WALL, _region((0, 2), (0, 8))),
        (2, PERSON, _region((2, 4), (0, 4))),
        (3, FLOOR, _region((2, 4), (4, 8))),
    ],
    "b": [  # sky (not seen yet) predicted as wall, one car right, one car called a person
        (4, WALL, _region((0, 2), (0, 8))),
        (5, CAR, _region((2, 4), (0, 2))),
        (9, PERSON, _region((2, 4), (2, 4))),
    ],
    "c": [  # floor right, wall half-covered (IoU 0.5 -> not matched), plus a spurious car
        (1, FLOOR, _region((0, 4), (0, 4))),
        (2, WALL, _region((0, 4), (4, 6))),
        (3, CAR, _region((0, 4), (6, 8))),
    ],
}


def _model_outputs(preds, order):
    """Evaluator inputs/outputs with category ids turned into order positions."""
    position = {c: order.index(c) + 1 for c in order}
    inputs, outputs = [], []
    for name, segs in preds.items():
        inputs.append({"file_name": f"/images/{name}.jpg", "image_id": name, "height": H, "width": W})
        info = [{"id": sid, "isthing": None, "category_id": position[cat]} for sid, cat, _ in segs]
        outputs.append({"panoptic_seg": (torch.from_numpy(_id_map(segs)), info)})
    return inputs, outputs


def _direct_pq(gt_json, gt_dir, preds, out_dir):
    """panopticapi on prediction files written here, in dataset ids."""
    from panopticapi.evaluation import pq_compute

    out_dir.mkdir()
    data = json.loads(open(gt_json).read())
    data["annotations"] = []
    for name, segs in preds.items():
        _write_png(out_dir / f"{name}.png", _id_map(segs))
        data["annotations"].append(
            {"image_id": name, "file_name": f"{name}.png",
             "segments_info": [{"id": sid, "category_id": cat} for sid, cat, _ in segs]}
        )
    (out_dir / "pred.json").write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        return pq_compute(str(gt_json), str(out_dir / "pred.json"), gt_folder=str(gt_dir), pred_folder=str(out_dir))


def _run(name, preds, order, base, inc, step, **kw):
    ev = ContinualPanopticEvaluator(name, order, base, inc, step, **kw)
    ev.reset()
    inputs, outputs = _model_outputs(preds, order)
    for i, o in zip(inputs, outputs):
        ev.process([i], [o])
    return ev, ev.evaluate()["panoptic_seg"]


# ------------------------------------------------------------------------------------------------
# panoptic
# ------------------------------------------------------------------------------------------------
def test_panoptic_hand_computed(dataset, tmp_path):
    name = dataset(["a"])
    preds = {
        "a": [
            (1, WALL, _region((0, 2), (0, 8))),  # IoU 1
            (2, PERSON, _region((2, 4), (0, 3))),  # 6 of 8 px: IoU 0.75, TP
            (3, CAR, _region((2, 4), (3, 8))),  # car where there is none: FP car; floor FN
        ]
    }
    ev, res = _run(name, preds, [1, 2, 3, 4, 5], base=3, inc=1, step=1, output_dir=str(tmp_path / "inference"))
    # per class: wall pq=sq=rq=1; person pq=sq=.75 rq=1; floor, car: 0; void, sky: no tp/fp/fn
    expected = {
        "PQ": 43.75, "SQ": 43.75, "RQ": 50.0,
        "PQ_th": 37.5, "SQ_th": 37.5, "RQ_th": 50.0,
        "PQ_st": 50.0, "SQ_st": 50.0, "RQ_st": 50.0,
        # base = ids 1..3 (wall, floor, person); step 1 -> old = base; new = novel = ids 4.. / 1
        "PQ_base": 175 / 3, "SQ_base": 175 / 3, "RQ_base": 200 / 3,
        "PQ_old": 175 / 3, "RQ_old": 200 / 3,
        "PQ_new": 0.0, "PQ_novel": 0.0, "RQ_novel": 0.0,
        "PQ-1": 100.0, "PQ-3": 75.0, "RQ-3": 100.0, "PQ-2": 0.0, "PQ-0": 0.0,
        # segment counts: wall and person matched, floor missed (base); the car is a FP (novel)
        "TP_base": 2, "FP_base": 0, "FN_base": 1, "TP_novel": 0, "FP_novel": 1, "FN_novel": 0,
        "TP": 2, "FP": 1, "FN": 1,
    }
    for k, v in expected.items():
        assert res[k] == pytest.approx(v), k
    assert ev.per_class["category_id"] == [0, 1, 2, 3, 4, 5]
    assert ev.per_class["PQ"] == pytest.approx([0, 100, 0, 75, 0, 0])
    assert all(isinstance(v, float) for v in res.values())
    saved = json.loads((tmp_path / "inference" / "predictions.json").read_text())
    assert [a["image_id"] for a in saved["annotations"]] == ["a"]
    assert {s["category_id"] for s in saved["annotations"][0]["segments_info"]} == {WALL, PERSON, CAR}


def test_panoptic_matches_direct_pq_compute(dataset, tmp_path):
    name = dataset(["a", "b", "c"])
    ev, res = _run(name, PRED_DATASET_IDS, [1, 2, 3, 4, 5], base=3, inc=1, step=1)
    meta = MetadataCatalog.get(name)
    direct = _direct_pq(meta.panoptic_json, meta.panoptic_root, PRED_DATASET_IDS, tmp_path / "direct")
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for m in ("PQ", "SQ", "RQ"):
            assert res[m + suffix] == pytest.approx(100 * direct[group][m.lower()]), m + suffix
    pq = [direct["per_class"][c["id"]]["pq"] for c in CATEGORIES]
    assert ev.per_class["PQ"] == pytest.approx([100 * v for v in pq])
    # sky (id 5) is not seen at step 1 and counts as FN in "All"
    assert direct["All"]["n"] == 5
    assert res["PQ"] == pytest.approx(100 * sum(pq) / 5)
    assert res["PQ_base"] == pytest.approx(100 * (pq[1] + pq[2] + pq[3]) / 3)
    assert res["PQ_new"] == pytest.approx(100 * (pq[4] + pq[5]))
    assert res["PQ_novel"] == pytest.approx(100 * (pq[4] + pq[5]))


def test_panoptic_order_mapping(dataset, tmp_path):
    """A non-identity order: positions are mapped to the dataset ids, isthing recomputed, and
    the scores equal those of the same predictions under the identity order."""
    name = dataset(["a", "b", "c"])
    order = [3, 1, 4, 2, 5]  # position 1 = person (thing), 2 = wall, 3 = car, 4 = floor, 5 = sky
    ev, res = _run(name, PRED_DATASET_IDS, order, base=3, inc=1, step=1)
    _, res_id = _run(name, PRED_DATASET_IDS, [1, 2, 3, 4, 5], base=3, inc=1, step=1)
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "PQ-3", "RQ-4"):
        assert res[k] == pytest.approx(res_id[k])
    assert ev.order_position_to_dataset(1) == (PERSON, True)
    assert ev.order_position_to_dataset(2) == (WALL, False)
    assert ev.order_position_to_dataset(3) == (CAR, True)

    # what process() stored for image "a": dataset ids and recomputed isthing
    ev2 = ContinualPanopticEvaluator(name, order, 3, 1, 1)
    inputs, outputs = _model_outputs({"a": PRED_DATASET_IDS["a"]}, order)
    assert [s["category_id"] for s in outputs[0]["panoptic_seg"][1]] == [2, 1, 4]  # positions
    ev2.process(inputs, outputs)
    segs = ev2._predictions[0]["segments_info"]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segs] == [
        (1, WALL, False), (2, PERSON, True), (3, FLOOR, False)]
    assert outputs[0]["panoptic_seg"][1][0]["category_id"] == 2  # model output left untouched

    # official split (by dataset index) ignores the order; the by-order split follows it
    pq = {c: res[f"PQ-{c}"] for c in range(6)}
    assert res["PQ_base"] == pytest.approx((pq[1] + pq[2] + pq[3]) / 3)
    _, res_o = _run(name, PRED_DATASET_IDS, order, base=3, inc=1, step=1, split_by_order=True)
    assert res_o["PQ"] == pytest.approx(res["PQ"])
    assert res_o["PQ_base"] == pytest.approx((pq[PERSON] + pq[WALL] + pq[CAR]) / 3)
    assert res_o["PQ_new"] == pytest.approx(pq[FLOOR] + pq[SKY])
    assert res_o["PQ_novel"] == pytest.approx(pq[FLOOR] + pq[SKY])
    assert res_o["PQ_base"] != pytest.approx(res["PQ_base"])


def test_panoptic_label_map_outputs_and_bad_positions(dataset):
    name = dataset(["a"])
    ev = ContinualPanopticEvaluator(name, [1, 2, 3, 4, 99], 3, 1, 2)
    label = np.full((H, W), -1, dtype=np.int32)
    label[0:2] = 1 * 1000  # wall
    label[2:4, 0:4] = 3 * 1000 + 1  # person instance 1
    ev.process([{"file_name": "a.jpg", "image_id": "a"}], [{"panoptic_seg": (torch.from_numpy(label), None)}])
    segs = sorted(ev._predictions[0]["segments_info"], key=lambda s: s["id"])
    assert segs == [
        {"id": 1001, "category_id": WALL, "isthing": False},
        {"id": 3002, "category_id": PERSON, "isthing": True},
    ]
    res = ev.evaluate()["panoptic_seg"]
    assert res["PQ-1"] == pytest.approx(100.0) and res["PQ-3"] == pytest.approx(100.0)
    # an order entry naming no category fails loudly (COCO's entry 133 in the official code)
    with pytest.raises(KeyError):
        ev.order_position_to_dataset(5)
    with pytest.raises(ValueError):
        ev.order_position_to_dataset(0)


# ------------------------------------------------------------------------------------------------
# split arithmetic
# ------------------------------------------------------------------------------------------------
def test_split_metrics_step0():
    # [void, base1, base2, unseen3]; step 0: old = base, new divides by 1 + C0 (official), novel 0
    s = split_metrics([0.9, 0.4, 0.6, 0.0], base=2, inc=1, step=0)
    assert s == pytest.approx({"base": 0.5, "old": 0.5, "new": 0.0, "novel": 0.0})
    s = split_metrics([0.9, 0.4, 0.6, 0.9], base=2, inc=1, step=0)
    assert s["new"] == pytest.approx(0.9 / 3)


def test_split_metrics_step1_and_step2():
    v = [9.0, 0.1, 0.2, 0.3, 0.4]  # base 2, inc 2, step 1
    assert split_metrics(v, 2, 2, 1) == pytest.approx(
        {"base": 0.15, "old": 0.15, "new": 0.35, "novel": 0.35})
    # step 2, C = 6, two unseen classes (7, 8) counting 0 in the sums
    v = [9.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.0]
    s = split_metrics(v, base=2, inc=2, step=2)
    assert s["base"] == pytest.approx(0.15)
    assert s["old"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4) / 4)
    assert s["new"] == pytest.approx((0.5 + 0.6) / 2)
    assert s["novel"] == pytest.approx((0.3 + 0.4 + 0.5 + 0.6) / 4)
    # a seen-but-missed new class and an unseen class both count 0 (sum / (Cinc*T))
    s = split_metrics([0, 1.0, 1.0, 0.8, 0.0, 0.6, 0.0, 0.0], base=2, inc=2, step=2)
    assert s["novel"] == pytest.approx((0.8 + 0.6) / 4)
    assert s["new"] == pytest.approx(0.6 / 2)
    # offset 0 (no leading background entry)
    assert split_metrics([0.2, 0.4, 1.0], base=2, inc=1, step=1, offset=0) == pytest.approx(
        {"base": 0.3, "old": 0.3, "new": 1.0, "novel": 1.0})
    with pytest.raises(ValueError):
        split_metrics([0, 1], base=1, inc=0, step=1)


def test_per_class_in_order():
    per_class = {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}
    c2d = {i: i for i in range(5)}
    assert per_class_in_order(per_class, [3, 1, 4, 2, 133], c2d) == [0.0, 0.3, 0.1, 0.4, 0.2, 0.0]
    assert split_metrics(per_class_in_order(per_class, [3, 1, 4, 2], c2d), 2, 1, 1)["base"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------
# semantic
# ------------------------------------------------------------------------------------------------
def _one_hot(labels, n):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), n).permute(2, 0, 1).float()


SEM_GT = np.array([[0, 0, 1, 1], [2, 2, 3, 255]])
SEM_PRED = np.array([[0, 1, 1, 1], [2, 3, 3, 0]])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(SEM_PRED, SEM_GT, num_classes=4)
    expected = np.zeros((5, 5), dtype=np.int64)  # [pred, gt], row/col 4 = ignore
    expected[0, 0] = 1
    expected[1, 0] = 1
    expected[1, 1] = 2
    expected[2, 2] = 1
    expected[3, 2] = 1
    expected[3, 3] = 1
    expected[0, 4] = 1  # the ignored pixel
    np.testing.assert_array_equal(cm, expected)
    with pytest.raises(ValueError):
        confusion_matrix(SEM_PRED, np.array([[0, 0, 1, 1], [2, 2, 7, 255]]), num_classes=4)


def test_semantic_evaluator_by_hand(tmp_path):
    # C = 3 (base 2, inc 1, step 1): N = 4 classes incl. background 0
    ev = ContinualSemSegEvaluator("dummy", 3, 2, 1, 1, output_dir=str(tmp_path / "inf"), per_class_csv_name="Exp")
    ev.reset()
    ev.process([{"sem_seg": torch.as_tensor(SEM_GT), "file_name": "/img/a.jpg"}], [{"sem_seg": _one_hot(SEM_PRED, 4)}])
    # a second image that is all ignore changes nothing
    ev.process([{"sem_seg": torch.full((2, 2), 255), "file_name": "/img/b.jpg"}],
               [{"sem_seg": _one_hot(np.zeros((2, 2), int), 4)}])
    res = ev.evaluate()["sem_seg"]
    iou = [1 / 2, 2 / 3, 1 / 2, 1 / 2]  # tp / (gt + pred - tp): 1/2, 2/3, 1/2, 1/2
    acc = [1 / 2, 1.0, 1 / 2, 1.0]
    gt_count = [2, 2, 2, 1]
    exp = {
        "mIoU": sum(iou) / 4,
        "mIoU_no_bg": sum(iou[1:]) / 3,
        "mIoU_base": (iou[1] + iou[2]) / 2,
        "mIoU_old": (iou[1] + iou[2]) / 2,
        "mIoU_new": iou[3],
        "mIoU_novel": iou[3],
        "mACC": sum(acc) / 4,
        "pACC": 5 / 7,
        "fwIoU": sum(i * g for i, g in zip(iou, gt_count)) / 7,
        "fgIoU": 6 / 7,
    }
    for k, v in exp.items():
        assert res[k] == pytest.approx(100 * v, rel=1e-6), k
    for i in range(4):
        assert res[f"IoU-{i}"] == pytest.approx(100 * iou[i], rel=1e-6)
        assert res[f"ACC-{i}"] == pytest.approx(100 * acc[i], rel=1e-6)
    assert (tmp_path / "inf" / "sem_seg_evaluation.pth").exists()
    # the official per-class rows: float32 values joined by ".", no newline
    assert (tmp_path / "inf" / "iou.csv").read_text() == "Exp,1,50.0.66.66667.50.0.50.0"
    assert (tmp_path / "inf" / "acc.csv").read_text() == "Exp,1,50.0.100.0.50.0.100.0"
    # sem_seg_predictions.json: one RLE per predicted class and image, ids = order positions
    import pycocotools.mask as mask_util

    entries = json.loads((tmp_path / "inf" / "sem_seg_predictions.json").read_text())
    assert [(e["file_name"], e["category_id"]) for e in entries] == [
        ("/img/a.jpg", 0), ("/img/a.jpg", 1), ("/img/a.jpg", 2), ("/img/a.jpg", 3), ("/img/b.jpg", 0)]
    for e in entries[:4]:
        rle = dict(e["segmentation"], counts=e["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_util.decode(rle), (SEM_PRED == e["category_id"]).astype(np.uint8))
    # a second evaluation appends to the per-class files
    ev.evaluate()
    assert (tmp_path / "inf" / "iou.csv").read_text() == "Exp,1,50.0.66.66667.50.0.50.0" * 2


def test_semantic_prediction_ids_through_the_metadata(tmp_path):
    ev = ContinualSemSegEvaluator("dummy", 3, 2, 1, 1, output_dir=str(tmp_path), category_ids={0: 0, 1: 10, 2: 20, 3: 30})
    ev.process([{"sem_seg": torch.as_tensor(SEM_GT), "file_name": "a.jpg"}], [{"sem_seg": _one_hot(SEM_PRED, 4)}])
    ev.evaluate()
    entries = json.loads((tmp_path / "sem_seg_predictions.json").read_text())
    assert [e["category_id"] for e in entries] == [0, 10, 20, 30]
    ev = ContinualSemSegEvaluator("dummy", 3, 2, 1, 1, output_dir=str(tmp_path), category_ids={0: 0, 1: 10})
    with pytest.raises(ValueError, match="predicted class 2 has no category id"):
        ev.process([{"sem_seg": torch.as_tensor(SEM_GT), "file_name": "a.jpg"}], [{"sem_seg": _one_hot(SEM_PRED, 4)}])


def test_semantic_absent_class_and_step0():
    # step 0, C0 = 3: class 2 predicted but absent from GT -> IoU NaN, still in mIoU's denominator
    gt = np.array([[0, 1, 1, 3]])
    pred = np.array([[0, 1, 2, 3]])
    m = semantic_metrics(confusion_matrix(pred, gt, 4), base=3, inc=1, step=0)
    assert math.isnan(m["iou"][2])
    assert m["mIoU"] == pytest.approx((1 + 0.5 + 1) / 4)
    assert m["mIoU_no_bg"] == pytest.approx((0.5 + 1) / 3)
    assert math.isnan(m["mIoU_base"])  # the official np.sum propagates the NaN
    assert m["mIoU_new"] == 0.0 and m["mIoU_novel"] == 0.0
    assert m["mACC"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["pACC"] == pytest.approx(3 / 4)


def test_semantic_channel_check():
    ev = ContinualSemSegEvaluator("dummy", 3, 2, 1, 1)
    with pytest.raises(ValueError):
        ev.process([{"sem_seg": torch.zeros(2, 2, dtype=torch.long)}], [{"sem_seg": torch.zeros(3, 2, 2)}])
    with pytest.raises(ValueError):
        ContinualSemSegEvaluator("dummy", 4, 2, 1, 1)


# ------------------------------------------------------------------------------------------------
# result files
# ------------------------------------------------------------------------------------------------
def test_official_csv_rows(tmp_path):
    pan = tmp_path / "results" / "mya-pan_100-5-ov.csv"
    append_official_csv(str(pan), "Exp", 0, {"panoptic_seg": {"PQ": 41.5, "RQ": 50.0, "SQ": 80.25}}, "panoptic")
    append_official_csv(str(pan), "Exp", 1, {"PQ": 30.0, "RQ": 40.0, "SQ": 75.5, "PQ_base": 1.0}, "panoptic")
    assert pan.read_text() == "Exp,0,41.5,50.0,80.25,,,\nExp,1,30.0,40.0,75.5,,,\n"

    sem = {"sem_seg": {"mIoU": 35.5, "mIoU_base": 40.0, "mIoU_novel": 20.0, "mACC": 70.0, "pACC": 80.0}}
    paths = write_official_results(str(tmp_path / "res2"), "mya_100-10-ov", "Run", 2, sem)
    assert [os.path.basename(p) for p in paths] == ["mya_100-10-ov.csv", "mya_100-10-ov_acc.csv"]
    assert open(paths[0]).read() == "Run,2,40.0,20.0,35.5,\n"
    assert open(paths[1]).read() == "Run,2,70.0,80.0,-,\n"
    append_official_csv(paths[1], "Run", 3, sem, "semantic_acc")
    assert open(paths[1]).read() == "Run,2,70.0,80.0,-,\nRun,3,70.0,80.0,-,\n"
    with pytest.raises(ValueError):
        append_official_csv(paths[0], "Run", 3, sem, "instance")

    append_official_per_class_csv(str(tmp_path / "inf"), "Run", 1, [1.5, 2.0], [3.0, float("nan")])
    append_official_per_class_csv(str(tmp_path / "inf"), "Run", 2, [4.0], [5.0])
    assert (tmp_path / "inf" / "iou.csv").read_text() == "Run,1,1.5.2.0Run,2,4.0"
    assert (tmp_path / "inf" / "acc.csv").read_text() == "Run,1,3.0.nanRun,2,5.0"


def test_metrics_json_accumulates(tmp_path):
    path = str(tmp_path / "out" / "metrics.json")
    write_metrics_json(path, 0, {"panoptic_seg": {"PQ": 40.0, "PQ_base": np.float32(40.0)}})
    write_metrics_json(path, 1, {"panoptic_seg": {"PQ": 30.0, "PQ_novel": float("nan")}})
    write_metrics_json(path, 10, {"sem_seg": {"mIoU": 1.0}})
    write_metrics_json(path, 2, {"sem_seg": {"mIoU": 2.0}})
    write_metrics_json(path, "1-eval", {"sem_seg": {"mIoU": 3.0}})
    # a re-evaluation of step 1 adds / replaces metrics without losing the others
    data = write_metrics_json(path, 1, {"panoptic_seg": {"PQ": 31.0, "SQ": 70.0}, "sem_seg": {"mIoU": 5.0}})
    assert data == read_metrics_json(path)
    assert list(data) == ["0", "1", "1-eval", "2", "10"]
    assert data["0"] == {"panoptic_seg": {"PQ": 40.0, "PQ_base": 40.0}}
    assert data["1"] == {"panoptic_seg": {"PQ": 31.0, "PQ_novel": None, "SQ": 70.0}, "sem_seg": {"mIoU": 5.0}}
    assert data["10"] == {"sem_seg": {"mIoU": 1.0}}
    json.loads(open(path).read())  # strict JSON (no NaN)
    assert sorted(os.listdir(tmp_path / "out")) == ["metrics.json", "metrics.json.lock"]
