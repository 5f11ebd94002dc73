"""The continual scenario (class order, steps, label tables, step membership) and step loaders."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, build_cfg

from continual.data import ContinualMapper, build_step_test_loader, build_step_train_loader
from continual.scenario import (
    Scenario,
    load_shipped_split,
    main,
    shipped_split_names,
    step_index_cache_path,
)

ADE_PS = REPO / "configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml"
ADE_SS = REPO / "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
COCO_C = REPO / "configs/coco/panoptic-segmentation/continual_c.yaml"

# a small scenario used by the hand-checked tests: steps [3, 1], [4, 2], [6, 5]
SMALL_ORDER = [3, 1, 4, 2, 6, 5]


def small(mode="overlap", **kw):
    return Scenario(SMALL_ORDER, 2, 2, mode, **kw)


def pan(*category_ids, crowd=()):
    """A panoptic dataset dict with one segment per id (``crowd`` ids marked iscrowd)."""
    segs = [{"id": i + 1, "category_id": c, "iscrowd": 0} for i, c in enumerate(category_ids)]
    segs += [{"id": 100 + i, "category_id": c, "iscrowd": 1} for i, c in enumerate(crowd)]
    return {"file_name": f"img_{'_'.join(map(str, category_ids))}.jpg", "segments_info": segs}


def coco_order():
    with open(COCO_C) as f:
        return yaml.safe_load(f)["CONT"]["ORDER"]


# ----------------------------------------------------------------------------- class order
@pytest.mark.parametrize(
    "num_classes, base, inc, expected",
    [
        (150, 100, 5, [100] + [5] * 10),
        (150, 100, 10, [100] + [10] * 5),
        (150, 100, 50, [100, 50]),
        (150, 50, 10, [50] + [10] * 10),
        (150, 50, 20, [50] + [20] * 5),
        (150, 50, 50, [50, 50, 50]),
        (133, 83, 5, [83] + [5] * 10),
        (133, 83, 10, [83] + [10] * 5),
    ],
)
def test_increments_of_official_scenarios(num_classes, base, inc, expected):
    order = coco_order() if num_classes == 133 else list(range(1, 151))
    assert len(order) == num_classes
    s = Scenario(order, base, inc)
    assert s.increments == expected
    assert s.num_steps == len(expected)
    assert sum(len(s.classes_of_step(t)) for t in range(s.num_steps)) == num_classes
    assert s.seen_classes(s.num_steps - 1) == order


def test_bad_increments_and_orders():
    with pytest.raises(ValueError, match="not a multiple of CONT.INC_CLS"):
        Scenario(range(1, 151), 100, 7)
    with pytest.raises(ValueError, match="BASE_CLS is larger"):
        Scenario(range(1, 11), 11, 1)
    assert Scenario(range(1, 11), 10, 0).increments == [10]
    with pytest.raises(ValueError, match="duplicate"):
        Scenario([1, 2, 2, 3], 2, 1)
    with pytest.raises(ValueError, match="0 .background."):
        Scenario([0, 1, 2], 1, 1)
    with pytest.raises(ValueError, match="255"):
        Scenario([1, 255, 2], 1, 1)
    with pytest.raises(ValueError, match="CONT.MODE"):
        Scenario([1, 2], 1, 1, "overlapping")


def test_classes_positions_and_steps():
    s = Scenario(range(1, 151), 100, 10)
    assert s.classes_of_step(0) == list(range(1, 101))
    assert s.classes_of_step(2) == list(range(111, 121))
    assert s.seen_classes(2) == list(range(1, 121))
    with pytest.raises(ValueError, match="0..5"):
        s.classes_of_step(6)

    s = small()
    assert [s.classes_of_step(t) for t in range(3)] == [[3, 1], [4, 2], [6, 5]]
    assert [s.order_position(c) for c in (3, 1, 4, 2, 6, 5)] == [1, 2, 3, 4, 5, 6]
    assert [s.step_of_class(c) for c in (3, 1, 4, 2, 6, 5)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(KeyError, match="7"):
        s.order_position(7)


# ----------------------------------------------------------------------------- label tables
def test_label_luts_by_hand():
    def nonzero(lut):
        return {i: int(v) for i, v in enumerate(lut) if v}

    for mode in ("overlap", "disjoint"):
        lut = small(mode).label_lut(1, train=True)
        assert lut.shape == (256,) and lut.dtype == np.int64
        # only step 1's classes (4 -> 3, 2 -> 4); old (3, 1) and future (6, 5) classes -> 0
        assert nonzero(lut) == {4: 3, 2: 4, 255: 255}
    assert nonzero(small("sequential").label_lut(1, train=True)) == {3: 1, 1: 2, 4: 3, 2: 4, 255: 255}
    for mode in ("overlap", "disjoint", "sequential"):
        test = small(mode).label_lut(1, train=False)
        assert nonzero(test) == {3: 1, 1: 2, 4: 3, 2: 4, 255: 255}
        assert test[0] == 0 and test[6] == 0 and test[5] == 0
    assert nonzero(small().label_lut(0, train=True)) == {3: 1, 1: 2, 255: 255}
    assert nonzero(small().label_lut(2, train=False)) == {3: 1, 1: 2, 4: 3, 2: 4, 6: 5, 5: 6, 255: 255}


# ----------------------------------------------------------------------------- membership
def test_panoptic_membership_overlap_vs_disjoint():
    dicts = [
        pan(3),  # step 0 only
        pan(3, 6),  # steps 0 and 2
        pan(4, crowd=(1,)),  # step 1 thing + step 0 crowd segment (crowd counts)
        pan(2, 5),  # steps 1 and 2
        pan(),  # no segment
        pan(7),  # class outside the order
        pan(1, 7),  # step 0 + outside the order
        pan(0, 4),  # void + step 1
    ]
    overlap = small("overlap").membership(dicts, num_workers=0)
    assert overlap.dtype == np.float64 and overlap.shape == (8, 3)
    np.testing.assert_array_equal(
        overlap,
        [[1, 0, 0], [1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]],
    )
    expected_disjoint = [
        [1, 0, 0],
        [0, 0, 1],  # step 0 fails because 6 is a future class; step 2 sees all of them
        [0, 1, 0],
        [0, 0, 1],
        [0, 0, 0],
        [0, 0, 0],
        [0, 0, 0],  # 7 is never allowed
        [0, 1, 0],  # 0 is always allowed
    ]
    for mode in ("disjoint", "sequential"):
        np.testing.assert_array_equal(small(mode).membership(dicts, num_workers=0), expected_disjoint)
    # threads give the same result
    np.testing.assert_array_equal(small("overlap").membership(dicts, num_workers=2), overlap)


def _png(path, values):
    arr = np.array(values, dtype=np.uint8).reshape(1, -1).repeat(2, axis=0)
    Image.fromarray(arr).save(path)
    return {"file_name": str(path).replace(".png", ".jpg"), "sem_seg_file_name": str(path)}


def test_semantic_membership_from_pngs(tmp_path):
    dicts = [
        _png(tmp_path / "a.png", [0, 3, 255]),
        _png(tmp_path / "b.png", [6, 255, 255]),
        _png(tmp_path / "c.png", [4, 5, 4]),
        _png(tmp_path / "d.png", [0, 0, 255]),
    ]
    s = small()
    assert s.image_class_ids(dicts[0]).tolist() == [0, 3, 255]
    np.testing.assert_array_equal(
        s.membership(dicts, num_workers=0), [[1, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 0]]
    )
    np.testing.assert_array_equal(
        small("disjoint").membership(dicts, num_workers=0),
        [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]],
    )


def test_membership_rejects_unsupported_dicts():
    with pytest.raises(KeyError, match="segments_info"):
        small().membership([{"file_name": "x.jpg"}], num_workers=0)
    with pytest.raises(ValueError, match="outside 0..255"):
        small().membership([pan(300)], num_workers=0)


# ----------------------------------------------------------------------------- cache
def test_cache_written_reused_and_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    s = small(name="tst-pan_2-2-ov")
    cache = step_index_cache_path(s)
    assert cache == str(tmp_path / "tst-pan_2-2-ov.npy")
    dicts = [pan(3), pan(3, 6), pan(4), pan(2, 5)]

    assert s.step_indices(dicts, 2, cache_path=cache).tolist() == [1, 3]
    saved = np.load(cache)
    assert saved.dtype == np.float64 and saved.shape == (4, 3)
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed

    # reused: the labels are not looked at again
    monkeypatch.setattr(Scenario, "membership", lambda *a, **k: pytest.fail("recomputed"))
    assert s.step_indices(dicts, 0, cache_path=cache).tolist() == [0, 1]

    with pytest.raises(ValueError, match="tst-pan_2-2-ov.npy.*shape \\(4, 3\\).*\\(5, 3\\).*delete it"):
        s.step_indices(dicts + [pan(1)], 0, cache_path=cache)
    np.save(cache, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="needs \\(4, 3\\)"):
        s.step_indices(dicts, 0, cache_path=cache)


# ----------------------------------------------------------------------------- shipped splits
SHIPPED = {
    "mya_100-10-ov": [13452, 1130, 1200, 1366, 1550, 1498],
    "mya_100-50-ov": [13452, 6744],
    "mya_50-50-ov": [8219, 6384, 5593],
    "mya_100-10-ov-b": [10375, 1362, 1346, 2084, 2609, 2420],
    "mya_100-50-ov-b": [10375, 9821],
    "mya_50-50-ov-b": [6659, 7483, 6054],
}
NO_STEP_ROWS = [5148, 5149, 5151, 5332, 5904, 6509, 13297, 14633, 14635, 14883, 15319, 15329, 15927, 19872]


def test_shipped_splits_have_documented_counts():
    assert shipped_split_names() == sorted(SHIPPED)
    for name, counts in SHIPPED.items():
        m = load_shipped_split(name)
        assert m.shape == (20210, len(counts)) and m.dtype == np.float64
        assert m.sum(0).astype(int).tolist() == counts
        per_row = m.sum(1)
        assert np.flatnonzero(per_row == 0).tolist() == NO_STEP_ROWS
        assert set(np.unique(per_row).tolist()) == {0.0, 1.0}
    a, b = load_shipped_split("mya_100-10-ov"), load_shipped_split("mya_100-50-ov")
    np.testing.assert_array_equal(a[:, 0], b[:, 0])
    np.testing.assert_array_equal(a[:, 1:].sum(1), b[:, 1])


def test_shipped_split_is_the_fallback_of_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(Scenario, "membership", lambda *a, **k: pytest.fail("recomputed"))
    s = Scenario(range(1, 151), 100, 10, name="mya_100-10-ov")
    cache = str(tmp_path / "mya_100-10-ov.npy")
    dicts = [{}] * 20210  # the partition does not read the labels
    idx = s.step_indices(dicts, 1, cache_path=cache)
    assert len(idx) == 1130
    np.testing.assert_array_equal(np.load(cache), load_shipped_split("mya_100-10-ov"))
    with pytest.raises(ValueError, match="mya_100-10-ov.step_index.npy.*20210 rows.*100 images"):
        Scenario(range(1, 151), 100, 10, name="mya_100-10-ov").step_indices([{}] * 100, 0)


def test_install_splits_cli(tmp_path, capsys):
    assert main(["install-splits", "--dest", str(tmp_path)]) == 0
    for name, counts in SHIPPED.items():
        m = np.load(tmp_path / f"{name}.npy")
        assert m.shape == (20210, len(counts)) and m.sum(0).astype(int).tolist() == counts
    main(["install-splits", "--dest", str(tmp_path)])
    assert "nothing written" in capsys.readouterr().out


# ----------------------------------------------------------------------------- mapper
def _instances(classes, h=4, w=4):
    from detectron2.structures import Instances

    inst = Instances((h, w))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    masks = torch.zeros(len(classes), h, w, dtype=torch.bool)
    for i in range(len(classes)):
        masks[i].view(-1)[i] = True  # instance i owns pixel i
    inst.gt_masks = masks
    return inst


def test_continual_mapper_drops_hidden_classes_and_remaps():
    sem = torch.tensor([[3, 1, 4, 2], [6, 5, 0, 255]], dtype=torch.uint8)

    def base_mapper(d):
        return {"instances": _instances([3, 4, 6, 2, 0, 1]), "sem_seg": sem.clone(), "image_id": d["id"]}

    mapper = ContinualMapper(base_mapper, small().label_lut(1, train=True))
    out = mapper({"id": 7})
    inst = out["instances"]
    assert out["image_id"] == 7
    assert inst.gt_classes.tolist() == [3, 4]  # classes 4 and 2 -> order positions 3, 4
    assert inst.gt_classes.dtype == torch.int64
    # masks follow their instances: original instances 1 and 3
    assert [int(m.view(-1).nonzero()[0]) for m in inst.gt_masks] == [1, 3]
    assert out["sem_seg"].dtype == torch.int64
    assert out["sem_seg"].tolist() == [[0, 0, 3, 4], [0, 0, 0, 255]]

    test = ContinualMapper(base_mapper, small().label_lut(1, train=False))({"id": 0})
    assert test["instances"].gt_classes.tolist() == [1, 3, 4, 2]
    assert test["sem_seg"].tolist() == [[1, 2, 3, 4], [0, 0, 0, 255]]

    assert ContinualMapper(lambda d: None, small().label_lut(0, True))({}) is None
    with pytest.raises(ValueError, match="shape \\(256,\\)"):
        ContinualMapper(base_mapper, np.zeros(10, dtype=np.int64))


# ----------------------------------------------------------------------------- COCO ids
def test_coco_default_reproduces_official_ids_and_corrected_lines_up():
    order = coco_order()
    default = Scenario(order, 83, 5, zero_based_ids=True)
    fixed = Scenario(order, 83, 5, zero_based_ids=True, correct_ids=True)
    assert default.id_offset == 0 and fixed.id_offset == 1

    lut = default.label_lut(0, train=True)
    assert lut[0] == 0  # person (contiguous 0) is never trained
    assert lut[1] == 1  # ORDER[0] = 1 is looked up as contiguous id 1 (bicycle)
    last = default.label_lut(10, train=False)
    assert 0 not in set(last[1:133]) and last[0] == 0
    assert default.order_position(133) not in set(last[:133])  # entry 133 never occurs

    lut = fixed.label_lut(0, train=True)
    assert lut[0] == 1 and lut[1] == fixed.order_position(2) == 28
    last = fixed.label_lut(10, train=False)
    assert sorted(last[:133].tolist()) == list(range(1, 134))
    assert last[255] == 255

    person_only = [pan(0)]
    assert default.membership(person_only, num_workers=0).sum() == 0
    assert fixed.membership(person_only, num_workers=0).tolist() == [[1.0] + [0.0] * 10]


def test_coco_ids_detected_from_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    s = Scenario.from_config(build_cfg(COCO_C, ["CONT.BASE_CLS", 83, "CONT.INC_CLS", 5]))
    assert s.zero_based_ids and not s.correct_ids and s.name == "coc-pan_83-5-ov-c"
    assert step_index_cache_path(s) == str(tmp_path / "coc-pan_83-5-ov-c.npy")
    fixed = Scenario.from_config(
        build_cfg(COCO_C, ["CONT.BASE_CLS", 83, "CONT.INC_CLS", 5, "CONT.COCO_CORRECT_IDS", True])
    )
    assert fixed.id_offset == 1
    assert step_index_cache_path(fixed) == str(tmp_path / "coc-pan_83-5-ov-c.correct-ids.npy")

    ade = Scenario.from_config(build_cfg(ADE_PS, ["CONT.BASE_CLS", 100, "CONT.INC_CLS", 10]))
    assert not ade.zero_based_ids and ade.name == "mya-pan_100-10-ov" and ade.num_steps == 6
    ss = Scenario.from_config(build_cfg(ADE_SS, ["CONT.BASE_CLS", 100, "CONT.INC_CLS", 10]))
    assert not ss.zero_based_ids and ss.name == "mya_100-10-ov"


def test_task_too_large_is_rejected():
    cfg = build_cfg(ADE_PS, ["CONT.BASE_CLS", 100, "CONT.INC_CLS", 10, "CONT.TASK", 6])
    with pytest.raises(ValueError, match=r"CONT.TASK=6.*BASE_CLS=100.*INC_CLS=10.*ORDER\)=150.*0\.\.5"):
        Scenario.from_config(cfg)


# ----------------------------------------------------------------------------- loaders
def _register_tiny(name, dicts):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
        MetadataCatalog.get(name).set(stuff_dataset_id_to_contiguous_id={i: i for i in range(7)})


def _tiny_mapper(d):
    classes = [s["category_id"] for s in d["segments_info"]]
    sem = torch.full((4, 4), 255, dtype=torch.int64)
    for i, c in enumerate(classes):
        sem.view(-1)[i] = c
    return {"width": 4, "height": 4, "instances": _instances(classes), "sem_seg": sem, "name": d["file_name"]}


def test_step_loaders(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    dicts = [pan(3), pan(3, 6), pan(4, 1), pan(2, 5), pan(4)]
    for d in dicts:
        d.update(width=4, height=4)
    _register_tiny("tiny_scenario_train", dicts)
    opts = [
        "DATASETS.TRAIN", ("tiny_scenario_train",), "DATASETS.TEST", ("tiny_scenario_train",),
        "CONT.ORDER", SMALL_ORDER, "CONT.BASE_CLS", 2, "CONT.INC_CLS", 2, "CONT.TASK", 1,
        "TASK_NAME", "tin_2-2-ov", "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 7,
        "MODEL.MASK_FORMER.TEST.MASK_BG", False,  # no background class (tests/test_baselines.py has it)
    ]
    cfg = build_cfg(None, opts)
    loader = build_step_train_loader(cfg, _tiny_mapper)
    assert (tmp_path / "tin_2-2-ov.npy").is_file()
    seen = set()
    for _, batch in zip(range(4), loader):
        for item in batch:
            seen.add(item["name"])
            assert set(item["instances"].gt_classes.tolist()) <= {3, 4}
            assert set(item["sem_seg"].unique().tolist()) <= {0, 3, 4, 255}
    assert seen <= {"img_4_1.jpg", "img_2_5.jpg", "img_4.jpg"}

    test_loader = build_step_test_loader(cfg, "tiny_scenario_train", _tiny_mapper)
    items = [b[0] for b in test_loader]
    assert len(items) == 5
    assert items[2]["instances"].gt_classes.tolist() == [3, 2]  # 4 -> 3 and old class 1 -> 2
    assert items[3]["instances"].gt_classes.tolist() == [4]  # future class 5 dropped

    # classes 8 and 7 of step 2 occur in no image
    empty = build_cfg(
        None, opts + ["CONT.ORDER", [3, 1, 4, 2, 8, 7], "CONT.TASK", 2, "TASK_NAME", "tin_2-2-ov-empty"]
    )
    with pytest.raises(ValueError, match="step 2 of scenario tin_2-2-ov-empty has no training images"):
        build_step_train_loader(empty, _tiny_mapper)
