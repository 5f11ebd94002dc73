"""Every model config under configs/ (class orders, R101, Swin) builds, runs on a small input and has
the state-dict layout of the official models.

The rules are those of the real-size R50 layout recorded from the official implementation
(tests/fixtures/keys/ade_ps_100-5_task0.json): the head (``sem_seg_head.*``) has the same keys in
the same order, with the shapes the backbone's channels and the query count imply; a ResNet has
the R50 block layout with the depth's block counts (SyncBN adds ``num_batches_tracked``); a Swin
backbone has the official Mask2Former Swin key names (tests/test_swin_backbone.py), and a
checkpoint with those names loads with nothing missing or unexpected. Swin widths are divided by
4 (depths, heads and windows kept: the key layout does not depend on the width) to keep the test
fast; models with the same resolved MODEL section are built once.
"""
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

import mask2former  # noqa: F401  (registers the model)
from conftest import FIXTURES, REPO, build_cfg
from test_swin_backbone import expected_official_keys

CONFIGS = REPO / "configs"
REFERENCE = json.loads((FIXTURES / "keys" / "ade_ps_100-5_task0.json").read_text())
# step 0 of a scenario, as the scripts run it (NAME, OUTPUT_DIR and the solver do not matter here)
STEP0_OPTS = [o for o in REFERENCE["opts"]]
BASE_CLS = {"ade20k": 100, "coco": 83}
RESNET_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def model_yamls():
    """Every config that defines a model (not the Base-* files, not the synthetic CPU config)."""
    return sorted(p for p in CONFIGS.rglob("*.yaml")
                  if not p.name.startswith("Base-") and "synthetic" not in p.parts)


def variant_cfg(path):
    opts = list(STEP0_OPTS)
    opts[opts.index("CONT.BASE_CLS") + 1] = str(BASE_CLS[path.relative_to(CONFIGS).parts[0]])
    cfg = build_cfg(path, opts)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    if cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer":
        cfg.MODEL.SWIN.EMBED_DIM //= 4
    return cfg


def distinct_models():
    """One config per distinct MODEL section (e.g. the class-order files share the R50 model)."""
    seen = OrderedDict()
    for path in model_yamls():
        key = variant_cfg(path).MODEL.dump()
        seen.setdefault(key, path)
    return list(seen.values())


MODELS = distinct_models()


def test_every_model_config_is_covered():
    names = {str(p.relative_to(CONFIGS)) for p in MODELS}
    # 3 benchmarks x (R50, R101, Swin-T, -S, -B, -L): the two Swin-B files differ only in their
    # pretrained weights, the order files only in the class order
    assert len(MODELS) == 18, sorted(names)
    assert "ade20k/panoptic-segmentation/continual_b.yaml" not in names  # same model as R50


def expected_resnet_keys(depth, norm):
    """The reference R50 backbone keys re-blocked for ``depth`` (+ SyncBN's extra buffer)."""
    ref = [k for k, _, _ in REFERENCE["state_dict"] if k.startswith("backbone.")]
    keys = []
    for k in ref:
        parts = k.split(".")
        if parts[1].startswith("res") and parts[2] != "0":
            if parts[2] != "1":
                continue
            stage = int(parts[1][3:])
            template = [t for t in ref if t.startswith(f"backbone.res{stage}.1.")]
            if k != template[0]:
                continue
            # block 1 is the template of blocks 1..n-1 of the stage
            for block in range(1, RESNET_BLOCKS[depth][stage - 2]):
                keys += [t.replace(f".res{stage}.1.", f".res{stage}.{block}.") for t in template]
            continue
        keys.append(k)
    if norm == "SyncBN":
        keys = [x for k in keys for x in ([k, k[: -len("running_var")] + "num_batches_tracked"]
                                           if k.endswith("norm.running_var") else [k])]
    return keys


def check_head(cfg, model, state):
    ref = [(k, s) for k, s, _ in REFERENCE["state_dict"] if k.startswith("sem_seg_head.")]
    ours = [(k, list(v.shape)) for k, v in state.items() if k.startswith("sem_seg_head.")]
    assert [k for k, _ in ours] == [k for k, _ in ref]
    channels = {n: s.channels for n, s in model.backbone.output_shape().items()}
    q = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    expected = dict(ref)
    for i, feat in enumerate(["res5", "res4", "res3"]):
        expected[f"sem_seg_head.pixel_decoder.input_proj.{i}.0.weight"] = [256, channels[feat], 1, 1]
    expected["sem_seg_head.pixel_decoder.adapter_1.weight"] = [256, channels["res2"], 1, 1]
    expected["sem_seg_head.predictor.query_feat.weight"] = [q, 256]
    expected["sem_seg_head.predictor.query_embed.weight"] = [q, 256]
    base = cfg.CONT.BASE_CLS
    for k in expected:
        if k.startswith("sem_seg_head.predictor.class_embed.cls.1.layers.2."):
            expected[k] = [base] + expected[k][1:]
    assert dict(ours) == expected


@pytest.mark.parametrize("path", MODELS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_model_builds_with_the_official_layout(path, tmp_path):
    cfg = variant_cfg(path)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    state = model.state_dict()
    check_head(cfg, model, state)

    backbone = [k for k in state if k.startswith("backbone.")]
    if cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer":
        assert sorted(backbone) == sorted("backbone." + k for k in expected_official_keys(cfg.MODEL.SWIN.DEPTHS))
        # a checkpoint with the official names loads completely into a fresh model
        torch.save({"model": state}, tmp_path / "ckpt.pth")
        torch.manual_seed(1)
        fresh = build_model(cfg).eval()
        DetectionCheckpointer(fresh).load(str(tmp_path / "ckpt.pth"))
        # nothing missing or unexpected
        fresh.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True)["model"], strict=True)
        name = "backbone.layers.2.blocks.1.attn.qkv.weight"
        assert torch.equal(fresh.state_dict()[name], state[name])
    else:
        assert backbone == expected_resnet_keys(cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.NORM)

    # inference on one small image
    with torch.no_grad():
        (out,) = model([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), "height": 64, "width": 96}])
    result = out["panoptic_seg"][0] if cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON else out["sem_seg"]
    assert result.shape[-2:] == (64, 96)


def test_r50_rule_reproduces_the_recorded_layout():
    """The re-blocking rule gives the recorded R50 keys back (so it is the rule, not a copy)."""
    ref = [k for k, _, _ in REFERENCE["state_dict"] if k.startswith("backbone.")]
    assert expected_resnet_keys(50, "FrozenBN") == ref


# --------------------------------------------------------------------------------------------
# the scenario scripts pick these configs from BACKBONE / ORDER (PRINT_SETTINGS=1: nothing runs)
# --------------------------------------------------------------------------------------------
def script_settings(script, **env):
    import os
    import subprocess
    import sys

    run_env = {k: v for k, v in os.environ.items() if k not in ("BACKBONE", "ORDER", "CONFIG", "NUM_QUERIES")}
    run_env.update(PRINT_SETTINGS="1", PYTHON=sys.executable, **env)
    res = subprocess.run(["bash", str(REPO / "script" / script)], env=run_env, capture_output=True, text=True)
    if res.returncode:
        return None, res.stderr
    return dict(line.split("=", 1) for line in res.stdout.splitlines()), res.stderr


def rel(path):
    return str(Path(path).relative_to(CONFIGS))


@pytest.mark.parametrize("script,env,config,opts_order,name", [
    ("ade_ps/100_5.sh", {}, "ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml", None, "adps_100_5"),
    ("ade_ps/100_5.sh", {"ORDER": "b"}, "ade20k/panoptic-segmentation/continual_b.yaml", None, "adps_100_5"),
    ("ade_ps/50_10.sh", {"BACKBONE": "R101"}, "ade20k/panoptic-segmentation/maskformer2_R101_bs16_160k.yaml", None,
     "adps_50_10_R101"),
    ("ade_ps/100_10.sh", {"BACKBONE": "R101", "ORDER": "j"},
     "ade20k/panoptic-segmentation/maskformer2_R101_bs16_160k.yaml", "j", "adps_100_10_R101"),
    ("ade_ps/100_50.sh", {"BACKBONE": "swin_l"},
     "ade20k/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k.yaml", None, "adps_100_50_swin_l"),
    ("ade_ss/100_5.sh", {}, "ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml", None, "adss_100_5"),
    ("ade_ss/100_10.sh", {"ORDER": "b"}, "ade20k/semantic-segmentation/maskformer2_R101_bs16_90k_b.yaml", None,
     "adss_100_10"),
    ("ade_ss/100_50.sh", {"BACKBONE": "swin_b", "ORDER": "b"},
     "ade20k/semantic-segmentation/swin/maskformer2_swin_base_384_bs16_160k_res640.yaml", "b", "adss_100_50_swin_b"),
    ("coco_ps/83_5.sh", {}, "coco/panoptic-segmentation/continual_c.yaml", None, "coco-ps_83_5"),
    ("coco_ps/83_10.sh", {"BACKBONE": "swin_t"},
     "coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml", "c", "coco-ps_83_10_swin_t"),
])
def test_scripts_pick_the_variant_config(script, env, config, opts_order, name):
    settings, err = script_settings(script, **env)
    assert settings is not None, err
    assert rel(settings["CONFIG"]) == config
    assert settings["NAME"] == name
    if opts_order is None:
        assert settings["VARIANT_OPTS"] == ""
    else:  # the backbone's config plus the order of the order's official file
        key, order, key_name, order_name = settings["VARIANT_OPTS"].split(" ")
        assert (key, key_name, order_name) == ("CONT.ORDER", "CONT.ORDER_NAME", opts_order)
        files = {"j": "ade20k/panoptic-segmentation/continual_j.yaml",
                 "b": "ade20k/semantic-segmentation/maskformer2_R101_bs16_90k_b.yaml",
                 "c": "coco/panoptic-segmentation/continual_c.yaml"}
        cfg = build_cfg(CONFIGS / config, [key, order, key_name, order_name])
        assert list(cfg.CONT.ORDER) == list(build_cfg(CONFIGS / files[opts_order]).CONT.ORDER)
        assert cfg.CONT.ORDER_NAME == opts_order
    # only the scripts' own variant has a released step-0 checkpoint
    assert (settings["STEP0_CKPT"] != "") == (not env)


def test_swin_l_keeps_the_scenario_queries_unless_told():
    settings, err = script_settings("coco_ps/83_5.sh", BACKBONE="swin_l")
    assert settings["QUERIES"] == "100" and "NUM_QUERIES=200" in err
    settings, _ = script_settings("coco_ps/83_5.sh", BACKBONE="swin_l", NUM_QUERIES="200")
    assert settings["QUERIES"] == "200"


@pytest.mark.parametrize("script,env,message", [
    ("ade_ps/100_5.sh", {"BACKBONE": "swin_x"}, "unknown BACKBONE=swin_x for ade_ps: use one of R50 R101 swin_t"),
    ("ade_ps/100_5.sh", {"ORDER": "k"}, "unknown ORDER=k for ade_ps: the official orders are: b c d e f g h i j"),
    ("ade_ss/100_5.sh", {"ORDER": "c"}, "unknown ORDER=c for ade_ss: the official orders are: b"),
    ("coco_ps/83_5.sh", {"ORDER": "b"}, "unknown ORDER=b for coco_ps: the official orders are: c"),
    ("ade_ps/100_5.sh", {"CONFIG": "x.yaml", "BACKBONE": "R101"}, "set either CONFIG or BACKBONE / ORDER"),
    ("synthetic/6_2.sh", {"BACKBONE": "R101"}, "script/synthetic takes no BACKBONE / ORDER"),
])
def test_scripts_reject_unknown_variants(script, env, message):
    settings, err = script_settings(script, **env)
    assert settings is None and message in err
