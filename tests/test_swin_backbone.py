"""Tests of the Swin Transformer backbone and of the two weight-conversion scripts.

* output names, shapes and strides (with internal padding) of ``D2SwinTransformer``;
* its state-dict keys equal the official Mask2Former Swin naming (list written out here);
* the relative position index equals one computed with explicit loops;
* the shifted-window attention lets a token see exactly the tokens of its window that were its
  neighbours before the cyclic shift (perturbation test, with and without padding);
* ``build_backbone`` builds it from ``MODEL.BACKBONE.NAME: D2SwinTransformer``;
* ``tools/convert-torchvision-to-d2.py``: a random torchvision ResNet-18 converts into weights
  that load into Detectron2's ResNet-18 with no missing/unexpected keys and give the same
  feature maps;
* ``tools/convert-pretrained-swin-model-to-d2.py``: a checkpoint in the official Swin
  classification layout converts and loads back into the backbone.
"""
import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_resnet_backbone

from mask2former.config import add_maskformer2_config
from mask2former.modeling.backbone.swin import (
    D2SwinTransformer,
    DropPath,
    SwinTransformerBlock,
    shifted_window_attention_mask,
    window_merge,
    window_partition,
)

ROOT = Path(__file__).resolve().parents[1]
SWIN_TOOL = ROOT / "tools" / "convert-pretrained-swin-model-to-d2.py"
TV_TOOL = ROOT / "tools" / "convert-torchvision-to-d2.py"

EMBED_DIM = 32
DEPTHS = [2, 2, 2, 2]
NUM_HEADS = [1, 2, 4, 8]
WINDOW = 7


def _load_tool(path):
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_cfg():
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.SWIN.EMBED_DIM = EMBED_DIM
    cfg.MODEL.SWIN.DEPTHS = DEPTHS
    cfg.MODEL.SWIN.NUM_HEADS = NUM_HEADS
    cfg.MODEL.SWIN.WINDOW_SIZE = WINDOW
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.1
    return cfg


def tiny_swin(seed=0):
    torch.manual_seed(seed)
    return D2SwinTransformer(tiny_cfg(), ShapeSpec(channels=3))


def expected_official_keys(depths=DEPTHS):
    """Key list of the official Mask2Former D2SwinTransformer (APE off, PATCH_NORM on)."""
    keys = [f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")]
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys += [
                p + "norm1.weight",
                p + "norm1.bias",
                p + "attn.relative_position_bias_table",
                p + "attn.relative_position_index",
                p + "attn.qkv.weight",
                p + "attn.qkv.bias",
                p + "attn.proj.weight",
                p + "attn.proj.bias",
                p + "norm2.weight",
                p + "norm2.bias",
                p + "mlp.fc1.weight",
                p + "mlp.fc1.bias",
                p + "mlp.fc2.weight",
                p + "mlp.fc2.bias",
            ]
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            keys += [p + "reduction.weight", p + "norm.weight", p + "norm.bias"]
    for i in range(len(depths)):
        keys += [f"norm{i}.weight", f"norm{i}.bias"]
    return keys


# --------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------
def test_output_names_shapes_and_strides_with_padding():
    model = tiny_swin().eval()
    assert model.size_divisibility == 32
    shapes = model.output_shape()
    assert list(shapes) == ["res2", "res3", "res4", "res5"]
    for i, name in enumerate(shapes):
        assert shapes[name].stride == 4 * 2**i
        assert shapes[name].channels == EMBED_DIM * 2**i

    h, w = 42, 58  # not multiples of 32; res2 (11x15) and res3 (6x8) are padded to windows
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        out = model(x)
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, feat in out.items():
        s = shapes[name].stride
        assert feat.shape == (2, shapes[name].channels, -(-h // s), -(-w // s)), name
        assert torch.isfinite(feat).all()
    # the two images are processed independently
    with torch.no_grad():
        single = model(x[1:])
    for name in out:
        torch.testing.assert_close(single[name][0], out[name][1], rtol=1e-4, atol=1e-5)


def test_out_features_subset_and_validation():
    cfg = tiny_cfg()
    cfg.MODEL.SWIN.OUT_FEATURES = ["res3", "res5"]
    model = D2SwinTransformer(cfg, ShapeSpec(channels=3)).eval()
    assert list(model.output_shape()) == ["res3", "res5"]
    with torch.no_grad():
        assert list(model(torch.randn(1, 3, 64, 64))) == ["res3", "res5"]
    # the four output norms exist whatever is selected (official checkpoint layout)
    assert {f"norm{i}.weight" for i in range(4)} <= set(model.state_dict())
    cfg.MODEL.SWIN.OUT_FEATURES = ["res6"]
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        D2SwinTransformer(cfg, ShapeSpec(channels=3))


def test_state_dict_keys_follow_official_naming():
    model = tiny_swin()
    sd = model.state_dict()
    assert sorted(sd) == sorted(expected_official_keys())
    # relative_position_index is a (persistent) buffer, not a parameter
    params = dict(model.named_parameters())
    assert "layers.0.blocks.0.attn.relative_position_index" not in params
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in params
    # a few shapes of the official layout
    c = EMBED_DIM
    assert sd["patch_embed.proj.weight"].shape == (c, 3, 4, 4)
    table = sd["layers.1.blocks.1.attn.relative_position_bias_table"]
    assert table.shape == ((2 * WINDOW - 1) ** 2, NUM_HEADS[1])
    assert sd["layers.1.blocks.1.attn.relative_position_index"].shape == (WINDOW**2, WINDOW**2)
    assert sd["layers.2.blocks.0.attn.qkv.weight"].shape == (3 * 4 * c, 4 * c)
    assert sd["layers.3.blocks.0.mlp.fc1.weight"].shape == (4 * 8 * c, 8 * c)
    assert sd["layers.0.downsample.reduction.weight"].shape == (2 * c, 4 * c)
    assert sd["layers.0.downsample.norm.weight"].shape == (4 * c,)
    assert sd["norm3.weight"].shape == (8 * c,)


def test_absolute_position_embedding_key():
    cfg = tiny_cfg()
    cfg.MODEL.SWIN.APE = True
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 64
    model = D2SwinTransformer(cfg, ShapeSpec(channels=3)).eval()
    assert model.state_dict()["absolute_pos_embed"].shape == (1, EMBED_DIM, 16, 16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 50, 38))
    assert out["res2"].shape == (1, EMBED_DIM, 13, 10)


def test_relative_position_index_matches_loops():
    model = tiny_swin()
    ws = WINDOW
    expected = torch.empty(ws * ws, ws * ws, dtype=torch.long)
    for i in range(ws * ws):
        for j in range(ws * ws):
            dy = i // ws - j // ws  # in [-(ws-1), ws-1]
            dx = i % ws - j % ws
            expected[i, j] = (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)
    for name, buf in model.named_buffers():
        assert name.endswith("relative_position_index")
        assert torch.equal(buf, expected), name
    # every table row is used and index pairs (i, j) / (j, i) mirror each other
    assert expected.unique().numel() == (2 * ws - 1) ** 2
    centre = (ws - 1) * (2 * ws - 1) + (ws - 1)  # index of the zero offset
    assert torch.equal(expected + expected.T, torch.full_like(expected, 2 * centre))


def test_window_partition_roundtrip():
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).reshape(2, 8, 12, 3)
    win = window_partition(x, 4)
    assert win.shape == (2 * 2 * 3, 16, 3)
    # window (b=1, row=1, col=2) holds rows 4..7 and columns 8..11 of image 1 in row-major order
    torch.testing.assert_close(win[1 * 6 + 1 * 3 + 2], x[1, 4:8, 8:12].reshape(16, 3))
    torch.testing.assert_close(window_merge(win, 4, 8, 12), x)


def test_attention_mask_values():
    mask = shifted_window_attention_mask(14, 21, 7, 3)
    assert mask.shape == (2 * 3, 49, 49)
    assert set(mask.unique().tolist()) <= {0.0, -100.0}
    torch.testing.assert_close(mask, mask.transpose(1, 2))
    assert (mask.diagonal(dim1=1, dim2=2) == 0).all()
    assert (mask[0] == 0).all()  # interior window: nothing masked
    assert (mask[-1] != 0).any()  # corner window: four regions


def _expected_neighbours(hp, wp, ws, shift, p):
    """Real-map tokens (h, w) that token p may attend to, from the definition.

    Regular windows: same window. Shifted windows: same window of the map rolled by -shift
    *and* no wrap-around between the two tokens (the roll keeps their offset).
    """
    ph, pw = p

    def rolled(h, w):
        return (h - shift) % hp, (w - shift) % wp

    rp = rolled(ph, pw)
    allowed = set()
    for h in range(hp):
        for w in range(wp):
            rq = rolled(h, w)
            if (rp[0] // ws, rp[1] // ws) != (rq[0] // ws, rq[1] // ws):
                continue
            if shift and (rp[0] - rq[0] != ph - h or rp[1] - rq[1] != pw - w):
                continue
            allowed.add((h, w))
    return allowed


@pytest.mark.parametrize("height,width", [(8, 8), (6, 7)])
@pytest.mark.parametrize("shift", [0, 2])
def test_shifted_window_attention_perturbation(height, width, shift):
    """A change of token p changes the block output exactly at the tokens allowed to see p."""
    torch.manual_seed(1)
    ws, dim = 4, 8
    block = SwinTransformerBlock(dim, num_heads=2, window_size=ws, shift_size=shift).double().eval()
    hp, wp = -(-height // ws) * ws, -(-width // ws) * ws
    mask = shifted_window_attention_mask(hp, wp, ws, ws // 2, dtype=torch.float64)
    n = height * width
    x = torch.randn(1, n, dim, dtype=torch.float64)
    # image k of the batch is x with token k perturbed
    xs = x.repeat(n, 1, 1)
    xs[torch.arange(n), torch.arange(n)] += 3.0 * torch.randn(n, dim, dtype=torch.float64)
    with torch.no_grad():
        diff = (block(xs, height, width, mask) - block(x, height, width, mask)).abs().amax(-1)
    changed_all = diff > 1e-9  # [perturbed token, output token]
    assert diff[~changed_all].max() < 1e-12
    wrapped_somewhere = False
    for k in range(n):
        p = (k // width, k % width)
        changed = {(i // width, i % width) for i in changed_all[k].nonzero().flatten().tolist()}
        allowed = _expected_neighbours(hp, wp, ws, shift, p)
        expected = {(h, w) for (h, w) in allowed if h < height and w < width}
        assert changed == expected, p
        if shift and len(allowed) < len(_expected_neighbours(hp, wp, ws, 0, p)):
            wrapped_somewhere = True
    if shift:
        assert wrapped_somewhere  # the mask did forbid some pairs in this case


def test_drop_path():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 5)
    dp.train()
    y = dp(x)
    per_sample = y.reshape(64, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    dp.eval()
    assert torch.equal(dp(x), x)


def test_build_backbone_from_registry():
    cfg = tiny_cfg()
    model = build_backbone(cfg)
    assert isinstance(model, D2SwinTransformer)
    assert {k: (v.channels, v.stride) for k, v in model.output_shape().items()} == {
        "res2": (32, 4),
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    # stochastic depth grows linearly to DROP_PATH_RATE over all blocks
    blocks = [b for layer in model.layers for b in layer.blocks]
    rates = [b.drop_path.p if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, sum(DEPTHS)))
    # training mode with drop path runs and back-propagates; activation checkpointing too
    cfg.MODEL.SWIN.USE_CHECKPOINT = True
    model = build_backbone(cfg).train()
    out = model(torch.randn(1, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert model.patch_embed.proj.weight.grad is not None


# --------------------------------------------------------------------------------------------
# conversion scripts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tool", [SWIN_TOOL, TV_TOOL])
def test_tools_help(tool):
    res = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout and ".pkl" in res.stdout


def _load_with_detectron2(model, path):
    """Load a converted .pkl like DetectionCheckpointer.load and return the incompatible keys."""
    ckpt = DetectionCheckpointer(model)
    data = ckpt._load_file(str(path))
    assert data.get("matching_heuristics") is True
    return ckpt._load_model(data)


# BatchNorm / LayerNorm scales (drawn positive, like trained ones)
_SCALE_SUFFIXES = ("norm.weight", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                elif name.endswith(_SCALE_SUFFIXES):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(0.1 * torch.randn(t.shape, generator=g))


def test_torchvision_resnet18_roundtrip(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    tool = _load_tool(TV_TOOL)
    tv = torchvision.models.resnet18(weights=None)
    _randomize(tv, seed=3)
    src, dst = tmp_path / "r18.pth", tmp_path / "r18.pkl"
    torch.save(tv.state_dict(), src)
    assert tool.main([str(src), str(dst), "--quiet"]) == 0

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    torch.manual_seed(0)
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    with open(dst, "rb") as f:
        converted = pickle.load(f)
    assert converted["__author__"] == "torchvision"
    assert set(converted["model"]) == set(d2.state_dict())  # exact names, nothing extra
    incompatible = _load_with_detectron2(d2, dst)
    assert not incompatible.missing_keys
    assert not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes

    tv.eval()
    d2.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = d2(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, layer in enumerate([tv.layer1, tv.layer2, tv.layer3, tv.layer4]):
            y = layer(y)
            torch.testing.assert_close(feats[f"res{i + 2}"], y, rtol=1e-4, atol=1e-4)


def test_torchvision_converter_errors(tmp_path, capsys):
    tool = _load_tool(TV_TOOL)
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "missing.pth"), str(tmp_path / "o.pkl")])
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1), "conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(SystemExit):
        tool.main([str(bad), str(tmp_path / "o.pkl"), "-q"])
    assert "features.0.weight" in capsys.readouterr().err
    good = tmp_path / "ok.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, good)
    with pytest.raises(SystemExit):
        tool.main([str(good), str(tmp_path / "o.pth"), "-q"])
    assert ".pkl" in capsys.readouterr().err
    assert tool.main([str(good), str(tmp_path / "o.pkl"), "-q", "--keep-fc"]) == 0
    with open(tmp_path / "o.pkl", "rb") as f:
        assert set(pickle.load(f)["model"]) == {"stem.conv1.weight", "fc.weight"}


def _classification_state_dict(model, with_stage_norms):
    """The state dict of ``model`` in the layout of an official Swin ImageNet checkpoint.

    The shared modules have the same names; the classifier adds a final ``norm``, a ``head`` and
    the ``attn_mask`` buffers of the shifted blocks, and has no per-stage ``norm{i}``.
    """
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if not with_stage_norms:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm")}
    c = model.num_features[-1]
    sd["norm.weight"], sd["norm.bias"] = torch.rand(c), torch.rand(c)
    sd["head.weight"], sd["head.bias"] = torch.rand(1000, c), torch.rand(1000)
    for i, layer in enumerate(model.layers):
        for j in range(1, len(layer.blocks), 2):
            n = (224 // 4 // 2**i // WINDOW) ** 2 or 1
            sd[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(n, WINDOW**2, WINDOW**2)
    return sd


def test_swin_converter_roundtrip(tmp_path):
    tool = _load_tool(SWIN_TOOL)
    source = tiny_swin(seed=5).eval()
    _randomize(source, seed=6)
    src, dst = tmp_path / "swin.pth", tmp_path / "swin.pkl"
    torch.save({"model": _classification_state_dict(source, with_stage_norms=True)}, src)
    assert tool.main([str(src), str(dst)]) == 0

    target = tiny_swin(seed=7).eval()
    incompatible = _load_with_detectron2(target, dst)
    assert not incompatible.missing_keys
    assert not incompatible.incorrect_shapes
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    x = torch.randn(1, 3, 60, 76)
    with torch.no_grad():
        a, b = source(x), target(x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_swin_converter_imagenet_layout_in_a_full_model(tmp_path):
    """A real ImageNet layout (no norm0..3) inside a model with a ``backbone.`` prefix."""
    tool = _load_tool(SWIN_TOOL)
    source = tiny_swin(seed=5)
    _randomize(source, seed=8)
    src, dst = tmp_path / "swin.pth", tmp_path / "swin.pkl"
    torch.save({"model": _classification_state_dict(source, with_stage_norms=False)}, src)
    assert tool.main([str(src), str(dst)]) == 0

    wrapper = nn.Module()
    wrapper.backbone = tiny_swin(seed=9)
    wrapper.head = nn.Linear(4, 4)
    incompatible = _load_with_detectron2(wrapper, dst)
    missing = set(incompatible.missing_keys)
    assert {k for k in missing if k.startswith("backbone.")} == {
        f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")
    }
    for k, v in source.state_dict().items():
        if not k.startswith("norm"):
            assert torch.equal(wrapper.backbone.state_dict()[k], v), k


def test_swin_converter_errors(tmp_path, capsys):
    tool = _load_tool(SWIN_TOOL)
    ck = tmp_path / "ck.pth"
    torch.save({"state_dict": {"patch_embed.proj.weight": torch.zeros(1)}}, ck)
    with pytest.raises(SystemExit):
        tool.main([str(ck), str(tmp_path / "o.pkl")])
    err = capsys.readouterr().err
    assert "no 'model' entry" in err and "state_dict" in err
    assert tool.main([str(ck), str(tmp_path / "o.pkl"), "--key", "state_dict"]) == 0
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, ck)
    with pytest.raises(SystemExit):
        tool.main([str(ck), str(tmp_path / "o.pkl")])
    assert "does not look like a Swin" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "nope.pth"), str(tmp_path / "o.pkl")])
    assert "does not exist" in capsys.readouterr().err


def test_patch_merging_concatenation_order():
    """The merging LayerNorm sees [x(2i,2j), x(2i+1,2j), x(2i,2j+1), x(2i+1,2j+1)] (official order)."""
    from mask2former.modeling.backbone.swin import PatchMerging

    merge = PatchMerging(dim=1)
    seen = []
    merge.norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    h, w = 3, 5  # odd: zero-padded to 4 x 6
    grid = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, h * w, 1)
    out = merge(grid, h, w)
    assert out.shape == (1, 2 * 3, 2)
    padded = torch.zeros(4, 6)
    padded[:h, :w] = grid.reshape(h, w)
    expected = torch.stack(
        [padded[0::2, 0::2], padded[1::2, 0::2], padded[0::2, 1::2], padded[1::2, 1::2]], dim=-1
    ).reshape(1, 6, 4)
    torch.testing.assert_close(seen[0], expected)
