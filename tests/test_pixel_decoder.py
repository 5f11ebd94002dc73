"""Tests of the pure-PyTorch deformable attention and of MSDeformAttnPixelDecoder.

The core function is checked against a loop-based bilinear sampler written here from the
align_corners=False definition; the pixel decoder against the reference fixtures produced by the
official implementation (tests/fixtures/README.md, sections 3 and 5(a)(b)).
"""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from mask2former.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from mask2former.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn, ms_deform_attn_core_pytorch
from mask2former.modeling.pixel_decoder.msdeformattn import DeformableEncoder
from mask2former.modeling.transformer_decoder.position_encoding import PositionEmbeddingSine

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_DIRS = sorted(p.parent for p in FIXTURES.glob("*/manifest.json"))
PREFIX = "sem_seg_head.pixel_decoder."
# Backbone of the fixtures (ResNet-18 with RES2_OUT_CHANNELS 64).
FIXTURE_INPUT_SHAPE = {
    "res2": ShapeSpec(channels=64, stride=4),
    "res3": ShapeSpec(channels=128, stride=8),
    "res4": ShapeSpec(channels=256, stride=16),
    "res5": ShapeSpec(channels=512, stride=32),
}


# --------------------------------------------------------------------------------------------
# naive reference
# --------------------------------------------------------------------------------------------
def _bilinear_zero_padded(img, x, y):
    """Sample ``img [C, H, W]`` at normalised (x, y) with align_corners=False and zero padding.

    Pixel (i, j) covers [j/W, (j+1)/W) x [i/H, (i+1)/H), its centre is at ((j+.5)/W, (i+.5)/H).
    """
    _, h, w = img.shape
    px = float(x) * w - 0.5
    py = float(y) * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    acc = torch.zeros(img.shape[0], dtype=img.dtype)
    for yy, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                acc = acc + wy * wx * img[:, yy, xx]
    return acc


def _naive_core(value, shapes, locations, weights):
    """value [B,S,M,D], locations [B,Q,M,L,P,2], weights [B,Q,M,L,P] -> [B,Q,M*D]."""
    b_sz, _, heads, dim = value.shape
    _, n_q, _, n_lvl, n_pts, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b_sz, n_q, heads, dim, dtype=value.dtype)
    for b in range(b_sz):
        for m in range(heads):
            for lvl, (h, w) in enumerate(shapes):
                # [D, H, W] image of this head and level
                img = value[b, starts[lvl] : starts[lvl + 1], m, :].T.reshape(dim, h, w)
                for p in range(n_pts):
                    for q in range(n_q):
                        x, y = locations[b, q, m, lvl, p]
                        out[b, q, m] += weights[b, q, m, lvl, p] * _bilinear_zero_padded(img, x, y)
    return out.reshape(b_sz, n_q, heads * dim)


def _random_problem(dtype, seed=0, batch=2, heads=2, dim=3, shapes=((3, 4), (2, 5), (1, 1)), queries=5, points=3):
    g = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, dim, generator=g, dtype=dtype)
    # Deliberately reaches outside [0, 1] so that zero padding is exercised.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.8 - 0.4
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=dtype)
    return value, torch.tensor(shapes, dtype=torch.long), locations, weights


# --------------------------------------------------------------------------------------------
# core function
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_core_matches_naive_bilinear(dtype, atol):
    value, shapes, locations, weights = _random_problem(dtype)
    assert ((locations < 0) | (locations > 1)).any(), "the problem must include out-of-range samples"
    out = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    ref = _naive_core(value, shapes.tolist(), locations, weights)
    assert out.shape == (2, 5, 6)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)


def test_core_accepts_shape_list_and_exact_pixel_centres():
    value, shapes, locations, weights = _random_problem(torch.float64, seed=1)
    out_tensor = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    out_list = ms_deform_attn_core_pytorch(value, [tuple(s) for s in shapes.tolist()], locations, weights)
    assert torch.equal(out_tensor, out_list)

    # At a pixel centre the sample is that pixel's value; far outside it is exactly zero.
    h, w = 3, 4
    val = torch.arange(h * w, dtype=torch.float64).view(1, h * w, 1, 1)
    loc = torch.tensor([[(2 + 0.5) / w, (1 + 0.5) / h], [5.0, 5.0]], dtype=torch.float64)
    loc = loc.view(1, 2, 1, 1, 1, 2)
    out = ms_deform_attn_core_pytorch(val, [(h, w)], loc, torch.ones(1, 2, 1, 1, 1, dtype=torch.float64))
    assert out.flatten().tolist() == [1 * w + 2, 0.0]


def test_core_gradients():
    value, shapes, locations, weights = _random_problem(torch.float64, seed=2, batch=1, queries=2, points=2)
    # Random locations almost surely avoid the kinks of bilinear interpolation (pixel-centre
    # lines), so finite differences with a tiny eps are valid.
    value.requires_grad_(True)
    weights.requires_grad_(True)
    locations.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn_core_pytorch(v, shapes, l, a), (value, locations, weights), eps=1e-7, atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# MSDeformAttn module
# --------------------------------------------------------------------------------------------
def _randomised_attn(seed=0, d_model=8, n_levels=2, n_heads=2, n_points=3):
    torch.manual_seed(seed)
    attn = MSDeformAttn(d_model, n_levels, n_heads, n_points).double()
    with torch.no_grad():
        # The official initialisation zeroes these; randomise so that the query matters.
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
        attn.attention_weights.bias.normal_()
        attn.output_proj.bias.normal_()
    return attn


def _module_inputs(seed=0, batch=2, d_model=8, shapes=((3, 4), (2, 3)), queries=4):
    g = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial.prod(1)
    start = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    total = int(sizes.sum())
    query = torch.randn(batch, queries, d_model, generator=g, dtype=torch.float64)
    ref = torch.rand(batch, queries, len(shapes), 2, generator=g, dtype=torch.float64)
    inp = torch.randn(batch, total, d_model, generator=g, dtype=torch.float64)
    return query, ref, inp, spatial, start


def test_msdeformattn_forward_matches_manual_composition():
    attn = _randomised_attn()
    query, ref, inp, spatial, start = _module_inputs()
    with torch.no_grad():
        _check_manual_composition(attn, query, ref, inp, spatial, start)


def _check_manual_composition(attn, query, ref, inp, spatial, start):
    out = attn(query, ref, inp, spatial, start)

    b, q, _ = query.shape
    m, l, p = attn.n_heads, attn.n_levels, attn.n_points
    value = attn.value_proj(inp).view(b, -1, m, attn.d_model // m)
    offsets = attn.sampling_offsets(query).view(b, q, m, l, p, 2)
    logits = attn.attention_weights(query).view(b, q, m, l * p)
    weights = torch.softmax(logits, -1).view(b, q, m, l, p)
    loc = torch.empty_like(offsets)
    for lvl, (h, w) in enumerate(spatial.tolist()):
        loc[..., lvl, :, 0] = ref[:, :, None, lvl, None, 0] + offsets[..., lvl, :, 0] / w
        loc[..., lvl, :, 1] = ref[:, :, None, lvl, None, 1] + offsets[..., lvl, :, 1] / h
    expected = attn.output_proj(_naive_core(value, spatial.tolist(), loc, weights))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_msdeformattn_padding_mask_excludes_values():
    attn = _randomised_attn(seed=1)
    query, ref, inp, spatial, start = _module_inputs(seed=1)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(inp.shape[:2], generator=g) < 0.4
    assert mask.any() and (~mask).any()

    garbage = inp.clone()
    garbage[mask] = 1e3 * torch.randn(int(mask.sum()), inp.shape[-1], generator=g, dtype=inp.dtype)

    with torch.no_grad():
        out = attn(query, ref, inp, spatial, start, mask)
        out_garbage = attn(query, ref, garbage, spatial, start, mask)
        unmasked = attn(query, ref, inp, spatial, start)
        unmasked_garbage = attn(query, ref, garbage, spatial, start)
        all_masked = attn(query, ref, garbage, spatial, start, torch.ones_like(mask))

    # Masked positions contribute nothing, whatever their content ...
    torch.testing.assert_close(out, out_garbage, atol=1e-10, rtol=0)
    # ... whereas without the mask they do, and the mask changes the result.
    assert (unmasked - unmasked_garbage).abs().max() > 1.0
    assert (out - unmasked).abs().max() > 1e-3
    # With everything masked, only the output projection's bias remains.
    torch.testing.assert_close(all_masked, attn.output_proj.bias.expand_as(all_masked), atol=1e-12, rtol=0)


def test_msdeformattn_initialisation():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0
    bias = attn.sampling_offsets.bias.detach().view(8, 3, 4, 2)
    # Head h points along angle 2*pi*h/8, normalised to unit max-norm; point k sits at k+1.
    unit = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    expected = unit[:, None, None, :] * torch.arange(1.0, 5.0)[None, None, :, None]
    # float32 sin/cos of multiples of pi/4 are off by a few ulp
    torch.testing.assert_close(bias, expected.expand(8, 3, 4, 2), atol=1e-5, rtol=0)
    # value/output projections are Xavier-uniform: bounded by sqrt(6 / (fan_in + fan_out)).
    bound = math.sqrt(6 / 64)
    assert attn.value_proj.weight.abs().max() <= bound and attn.value_proj.weight.std() > 0.1 * bound


# --------------------------------------------------------------------------------------------
# positional encoding and reference points
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_position_embedding_sine_closed_form(normalize):
    n, h, w = 6, 3, 5
    pe = PositionEmbeddingSine(n, temperature=100, normalize=normalize)
    out = pe(torch.zeros(2, 7, h, w))
    assert out.shape == (2, 2 * n, h, w)
    for i in range(h):
        for j in range(w):
            y, x = float(i + 1), float(j + 1)
            if normalize:
                y, x = y / (h + 1e-6) * 2 * math.pi, x / (w + 1e-6) * 2 * math.pi
            for k in range(n):
                freq = 100 ** (2 * (k // 2) / n)
                fn = math.sin if k % 2 == 0 else math.cos
                assert abs(out[1, k, i, j].item() - fn(y / freq)) < 1e-5
                assert abs(out[1, n + k, i, j].item() - fn(x / freq)) < 1e-5


def test_position_embedding_sine_mask_and_scale():
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[:, :, 3:] = True  # padded last column
    out = PositionEmbeddingSine(2, normalize=False)(torch.zeros(1, 1, 2, 4), mask)
    # x channel 0 = sin(cumulative valid count): the padded column repeats the count 3.
    expected = torch.sin(torch.tensor([1.0, 2.0, 3.0, 3.0]))
    torch.testing.assert_close(out[0, 2, 0], expected)
    with pytest.raises(ValueError):
        PositionEmbeddingSine(4, normalize=False, scale=1.0)


def test_reference_points_are_pixel_centres():
    shapes = torch.tensor([[2, 3], [4, 6]])
    ref = DeformableEncoder.get_reference_points(shapes, torch.ones(2, 2, 2))
    assert ref.shape == (2, 6 + 24, 2, 2)
    # position 4 of level 0 is row 1, column 1 of a 2x3 map
    torch.testing.assert_close(ref[0, 4, 1], torch.tensor([1.5 / 3, 1.5 / 2]))
    # position 6 + 13 is row 2, column 1 of the 4x6 map
    torch.testing.assert_close(ref[1, 6 + 13, 0], torch.tensor([1.5 / 6, 2.5 / 4]))


# --------------------------------------------------------------------------------------------
# pixel decoder against the official fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture
def single_thread():
    """One intra-op thread, as the fixtures were generated (bit-exact there); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load_cfg(fixture_dir):
    with open(fixture_dir / "config.yaml") as f:
        return yaml.safe_load(f)


def _build_from_fixture(fixture_dir):
    cfg = _load_cfg(fixture_dir)
    head = cfg["MODEL"]["SEM_SEG_HEAD"]
    mf = cfg["MODEL"]["MASK_FORMER"]
    return MSDeformAttnPixelDecoder(
        input_shape={k: v for k, v in FIXTURE_INPUT_SHAPE.items() if k in head["IN_FEATURES"]},
        transformer_dropout=mf["DROPOUT"],
        transformer_nheads=mf["NHEADS"],
        transformer_dim_feedforward=1024,
        transformer_enc_layers=head["TRANSFORMER_ENC_LAYERS"],
        conv_dim=head["CONVS_DIM"],
        mask_dim=head["MASK_DIM"],
        norm=head["NORM"],
        transformer_in_features=head["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"],
        common_stride=head["COMMON_STRIDE"],
    )


def _pixel_decoder_state(fixture_dir):
    sd = torch.load(fixture_dir / "model_head.pth", weights_only=True)["model"]
    return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}


def test_fixtures_present():
    assert FIXTURE_DIRS, f"no fixture with manifest.json under {FIXTURES}"


def test_registered_in_sem_seg_heads_registry():
    assert SEM_SEG_HEADS_REGISTRY.get("MSDeformAttnPixelDecoder") is MSDeformAttnPixelDecoder


@pytest.mark.parametrize("fixture_dir", FIXTURE_DIRS, ids=lambda p: p.name)
def test_state_dict_keys_and_shapes(fixture_dir):
    ref = _pixel_decoder_state(fixture_dir)
    assert len(ref) > 0
    ours = _build_from_fixture(fixture_dir).state_dict()
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert ours[k].shape == v.shape, k


@pytest.mark.parametrize("fixture_dir", FIXTURE_DIRS, ids=lambda p: p.name)
def test_from_config_matches_explicit_construction(fixture_dir):
    cfg = CfgNode(_load_cfg(fixture_dir))
    # Extra backbone outputs not in IN_FEATURES must be ignored by from_config.
    shapes = dict(FIXTURE_INPUT_SHAPE, stem=ShapeSpec(channels=64, stride=2))
    from_cfg = MSDeformAttnPixelDecoder(cfg, shapes)
    explicit = _build_from_fixture(fixture_dir)
    a, b = from_cfg.state_dict(), explicit.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert from_cfg.in_features == ["res2", "res3", "res4", "res5"]
    assert from_cfg.transformer.encoder.layers[0].linear1.out_features == 1024
    assert from_cfg.transformer.encoder.layers[0].self_attn.n_points == 4


@pytest.mark.parametrize("fixture_dir", FIXTURE_DIRS, ids=lambda p: p.name)
def test_forward_features_matches_official(fixture_dir, single_thread):
    model = _build_from_fixture(fixture_dir).eval()
    state = _pixel_decoder_state(fixture_dir)
    model.load_state_dict(state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k

    features = torch.load(fixture_dir / "backbone_features.pt", weights_only=True)["infer"]
    ref = torch.load(fixture_dir / "inference.pt", weights_only=True)["pixel_decoder"]
    with torch.no_grad():
        mask_features, enc_features, multi_scale = model.forward_features(features)

    assert len(multi_scale) == 3 == len(ref["multi_scale_features"])
    strides = []
    for ours, theirs in zip(multi_scale, ref["multi_scale_features"]):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        strides.append(features["res2"].shape[-1] * 4 // ours.shape[-1])
    assert strides == [32, 16, 8]
    assert mask_features.shape == ref["mask_features"].shape
    torch.testing.assert_close(mask_features, ref["mask_features"], atol=1e-5, rtol=0)
    assert torch.equal(enc_features, multi_scale[0])


def test_forward_features_runs_fp32_under_autocast():
    fixture_dir = FIXTURE_DIRS[0]
    model = _build_from_fixture(fixture_dir).eval()
    model.load_state_dict(_pixel_decoder_state(fixture_dir), strict=True)
    features = torch.load(fixture_dir / "backbone_features.pt", weights_only=True)["infer"]
    with torch.no_grad():
        plain = model.forward_features(features)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model.forward_features(features)[0]
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, atol=0, rtol=0)


KEY_FILES = sorted((FIXTURES / "keys").glob("*.json"))


@pytest.mark.parametrize("key_file", KEY_FILES, ids=lambda p: p.stem)
def test_real_size_state_dict_keys(key_file):
    """Pixel-decoder entries of the real-size official models (README section 9)."""
    with open(key_file) as f:
        listing = json.load(f)
    ref = [(k[len(PREFIX) :], list(s)) for k, s, _ in listing["state_dict"] if k.startswith(PREFIX)]
    c = listing["cfg"]
    # ResNet-50/101: res2..res5 have 256..2048 channels.
    shapes = {f"res{i}": ShapeSpec(channels=256 * 2 ** (i - 2), stride=2**i) for i in range(2, 6)}
    model = MSDeformAttnPixelDecoder(
        input_shape=shapes,
        transformer_dropout=0.0,
        transformer_nheads=c["NHEADS"],
        transformer_dim_feedforward=1024,
        transformer_enc_layers=c["TRANSFORMER_ENC_LAYERS"],
        conv_dim=c["CONVS_DIM"],
        mask_dim=c["MASK_DIM"],
        norm="GN",
        transformer_in_features=["res3", "res4", "res5"],
        common_stride=4,
    )
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert len(ref) > 0
    assert ours == ref
