"""The CPU fast paths of issue #11 against the straightforward computations they replace.

* :func:`deform_attn_cpu` (one weighted ``embedding_bag``, with its own backward) against the
  ``grid_sample`` core, values and gradients, sampling points inside, on the border of and
  outside the maps; a whole encoder layer against ``MSDeformAttn.forward``, and which path a
  trainable or frozen pixel decoder takes;
* the decoder's inference with low-resolution intermediate attention masks against the
  official per-layer full-resolution path (``full_intermediate_predictions``), on every
  reference fixture and on random weights;
* a prompt step that skips the unsupervised layers' predictions against one that computes
  them all.

Small, seeded, one thread; no timing here (speed is measured by ``tools/benchmark_*.py``).
"""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Instances

from conftest import FIXTURES, REFERENCE_FIXTURES, build_cfg
from continual.reference_check import _load, load_fixture_config
from mask2former.modeling.pixel_decoder import msdeformattn
from mask2former.modeling.pixel_decoder.ms_deform_attn import ENV_VAR, ms_deform_attn_core_pytorch
from mask2former.modeling.pixel_decoder.msdeformattn import deform_attn_cpu
from mask2former.modeling.postprocessing import PostProcessSettings, _best_query, inference_mask_input
from test_decoder import make_decoder, make_inputs


def build_fixture_model(fixture_dir: str):
    """(cfg, model) of a reference fixture with its head weights (the backbone keeps its random
    initialisation: fixtures are head-only)."""
    cfg = load_fixture_config(fixture_dir)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(_load(fixture_dir, "model_head.pth")["model"], strict=False)
    assert not unexpected and all(k.startswith("backbone.") for k in missing)
    return cfg, model


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _problem(seed, batch=2, heads=3, dim=4, shapes=((3, 4), (2, 5), (1, 1)), queries=7, points=3):
    g = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes)
    total = int(spatial.prod(1).sum())
    value = torch.randn(batch, total, heads, dim, generator=g, dtype=torch.float64)
    # [-0.3, 1.3]: many points fall partly or wholly outside the maps (zero padding)
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])  # exactly on the border
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=torch.float64)
    return value, spatial, loc, weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedding_bag_core_matches_grid_sample_core(seed):
    value, spatial, loc, weights = _problem(seed)
    ref = ms_deform_attn_core_pytorch(value, spatial, loc, weights)
    out = deform_attn_cpu(value, spatial, loc, weights)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_embedding_bag_core_gradients_match():
    value, spatial, loc, weights = _problem(3)
    value, loc, weights = (t.requires_grad_() for t in (value, loc, weights))
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64)
    ref = torch.autograd.grad(ms_deform_attn_core_pytorch(value, spatial, loc, weights), (value, loc, weights), grad_out)
    out = torch.autograd.grad(deform_attn_cpu(value, spatial, loc, weights), (value, loc, weights), grad_out)
    for name, a, b in zip(("value", "locations", "weights"), out, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_embedding_bag_core_float32_close():
    value, spatial, loc, weights = (t.float() if t.is_floating_point() else t for t in _problem(4))
    ref = ms_deform_attn_core_pytorch(value, spatial, loc, weights)
    torch.testing.assert_close(deform_attn_cpu(value, spatial, loc, weights), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", REFERENCE_FIXTURES, ids=lambda p: p.name)
def test_low_resolution_attention_masks_on_fixtures(fixture):
    """Only the last prediction is computed at inference; outputs equal to the per-layer path."""
    _, model = build_fixture_model(str(fixture))
    head = model.sem_seg_head.eval()
    feats = _load(str(fixture), "backbone_features.pt")["infer"]
    with torch.no_grad():
        fast = head(feats)
        head.predictor.full_intermediate_predictions = True
        full = head(feats)
    # identical on the fixtures (no attention-mask entry flips); the tolerance is for rounding
    torch.testing.assert_close(fast["pred_logits"], full["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast["pred_masks"], full["pred_masks"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("step", [0, 3])
def test_low_resolution_attention_masks_random_weights(step):
    dec = make_decoder(step=step, num_prompts=3 if step else 0).eval()
    feats, mf = make_inputs()
    with torch.no_grad():
        fast = dec(feats, mf)
        dec.full_intermediate_predictions = True
        full = dec(feats, mf)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(fast[key], full[key], atol=1e-5, rtol=0)


def test_prompt_step_skips_unsupervised_predictions():
    """Default prompt step (aux = pre-decoder prediction only) against all layers supervised:
    the returned predictions and the gradients of their losses agree."""
    feats, mf = make_inputs()
    outs, grads = [], []
    for supervise_all in (False, True):
        dec = make_decoder(step=3, supervise_all=supervise_all).train()
        out = dec(feats, mf)
        kept = [out] + out["aux_outputs"][:1]
        loss = sum(o["pred_logits"].square().sum() + o["pred_masks"].square().mean() for o in kept)
        params = [dec.prompt_feat[2].weight, dec.prompt_mask_embed[2].layers[0].weight]
        grads.append(torch.autograd.grad(loss, params))
        outs.append(kept)
    for a, b in zip(*outs):
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(a["pred_masks"], b["pred_masks"], atol=1e-5, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mask_input_without_crop_or_resize_is_unchanged():
    settings = PostProcessSettings(num_classes=3, sem_seg_postprocess_before_inference=True)
    masks = torch.randn(4, 12, 10, generator=torch.Generator().manual_seed(0)) * 20
    out = inference_mask_input(masks, (12, 10), (12, 10), settings)
    assert torch.equal(out, sem_seg_postprocess(masks, (12, 10), 12, 10))
    # a crop or a resize still goes through sem_seg_postprocess
    assert inference_mask_input(masks, (11, 10), (11, 10), settings).shape == (4, 11, 10)
    assert inference_mask_input(masks, (12, 10), (24, 20), settings).shape == (4, 24, 20)


def _bf16_pair(fixture_name="ade_ps_t3_deltas_pos"):
    """The fixture model in float32 and a copy with ``MODEL.CPU_BF16 True`` (same weights)."""
    cfg, model = build_fixture_model(str(FIXTURES / fixture_name))
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.CPU_BF16 = True
    bf16 = build_model(cfg)
    bf16.load_state_dict(model.state_dict())
    return model, bf16


def _image_batch(size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
             "height": size, "width": size}]


def test_cpu_bf16_is_off_by_default_and_switches_autocast_on():
    assert build_cfg().MODEL.CPU_BF16 is False
    model, bf16 = _bf16_pair()
    assert not model.cpu_bf16 and bf16.cpu_bf16
    dtypes = []
    for m in (bf16, model):
        layers = (m.sem_seg_head.predictor.transformer_ffn_layers[0].linear1,
                  m.sem_seg_head.pixel_decoder.transformer.encoder.layers[0].linear1)
        handles = [layer.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype) and None)
                   for layer in layers]
        try:
            with torch.no_grad():
                m.eval()(_image_batch())
        finally:
            for handle in handles:
                handle.remove()
    # pixel decoder first, then the transformer decoder
    assert dtypes == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_cpu_bf16_outputs_close_to_float32():
    model, bf16 = _bf16_pair()
    batch = _image_batch()
    with torch.no_grad():
        images = model.preprocess_images(batch)
        ref = model.eval().sem_seg_head(model.backbone(images.tensor))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = bf16.eval().sem_seg_head(bf16.backbone(images.tensor))
    # bf16 keeps 8 bits of mantissa: close, not equal
    for key in ("pred_logits", "pred_masks"):
        scale = ref[key].abs().max().item()
        assert (out[key].float() - ref[key]).abs().max().item() < 0.1 * scale, key
    # the post-processed outputs come back in float32
    with torch.no_grad():
        result = bf16(batch)[0]
    assert result["panoptic_seg"][0].shape == (64, 64)


def test_cpu_bf16_training_losses_are_float32_and_backpropagate():
    _, bf16 = _bf16_pair()
    bf16.train()
    batch = _image_batch()
    inst = Instances((64, 64))
    inst.gt_masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    inst.gt_masks[0, :32] = True
    inst.gt_masks[1, 32:] = True
    inst.gt_classes = torch.tensor([1, 2])
    batch[0]["instances"] = inst
    losses = bf16(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = bf16.sem_seg_head.predictor.class_embed
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in grad.parameters())


def test_pixel_decoder_uses_embedding_bag_with_and_without_gradients(monkeypatch):
    """Inference, a frozen and a trainable pixel decoder all take the embedding_bag core (the
    trainable one with its own backward); the features equal the grid_sample core's."""
    fixture = REFERENCE_FIXTURES[0]
    _, model = build_fixture_model(str(fixture))
    pixel_decoder = model.sem_seg_head.pixel_decoder.eval()
    feats = _load(str(fixture), "backbone_features.pt")["infer"]
    num_layers = len(pixel_decoder.transformer.encoder.layers)
    calls, backward_calls = [], []
    original, original_grad = msdeformattn._sample_bags, msdeformattn._value_gradient
    monkeypatch.setattr(msdeformattn, "_sample_bags", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(msdeformattn, "_value_gradient", lambda *a: backward_calls.append(1) or original_grad(*a))
    with torch.no_grad():
        fast = pixel_decoder.forward_features(feats)[0]
    assert len(calls) == num_layers
    calls.clear()
    trained = pixel_decoder.forward_features(feats)[0]
    assert len(calls) == num_layers and trained.requires_grad and not backward_calls
    trained.square().sum().backward()
    assert len(backward_calls) == num_layers
    monkeypatch.setattr(msdeformattn, "_deformable_attention", _module_forward)
    reference = pixel_decoder.forward_features(feats)[0]
    torch.testing.assert_close(fast, reference.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(trained.detach(), reference.detach(), atol=1e-5, rtol=0)


def _module_forward(attn, query, reference_points, src, shapes, starts, padding_mask):
    """What ``_deformable_attention`` did before the CPU paths: the module's own forward."""
    return attn(query, reference_points, src, shapes, starts, padding_mask)


@pytest.mark.parametrize("num_queries", [1, 2, 37])
def test_best_query_is_the_argmax_with_first_query_on_ties(num_queries):
    g = torch.Generator().manual_seed(num_queries)
    masks = torch.rand(num_queries, 9, 11, generator=g)
    masks[:, :3] = 0.5  # ties everywhere in these rows
    scores = torch.rand(num_queries, generator=g)
    scores[-1] = scores[0]
    expected = (scores.view(-1, 1, 1) * masks).argmax(0)
    assert torch.equal(_best_query(scores, masks), expected)
    # inference called with autograd on: the same map, no error from the out= steps
    assert torch.equal(_best_query(scores.requires_grad_(), masks.requires_grad_()), expected)


def _counted_pixel_decoder(monkeypatch, train: bool):
    """A fixture model's pixel decoder (train or eval mode), its input features, and the list
    that records each call of the embedding_bag core."""
    _, model = build_fixture_model(str(REFERENCE_FIXTURES[0]))
    pixel_decoder = model.sem_seg_head.pixel_decoder.train(train)
    feats = _load(str(REFERENCE_FIXTURES[0]), "backbone_features.pt")["infer"]
    calls = []
    original = msdeformattn._sample_bags
    monkeypatch.setattr(msdeformattn, "_sample_bags", lambda *a: calls.append(1) or original(*a))
    return pixel_decoder, feats, calls


def test_cpu_fast_path_only_for_the_pytorch_implementation(monkeypatch):
    """The embedding_bag core stands in for the ``pytorch`` implementation only: an explicitly
    selected kernel still decides for itself (here: ``cuda_ext`` refuses CPU inputs)."""
    pixel_decoder, feats, calls = _counted_pixel_decoder(monkeypatch, train=False)
    monkeypatch.setenv(ENV_VAR, "pytorch")
    with torch.no_grad():
        pixel_decoder.forward_features(feats)
    assert calls
    calls.clear()
    monkeypatch.setenv(ENV_VAR, "cuda_ext")
    with torch.no_grad(), pytest.raises(ValueError, match="cuda_ext"):
        pixel_decoder.forward_features(feats)
    assert not calls


# --------------------------------------------------------------------------------------------
# decoder and post-processing helpers of the second round
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(16, 12), (8, 6), (4, 3), (32, 6), (16, 24), (11, 12), (32, 24)])
def test_resize_bilinear_equals_interpolate(size):
    """Integer shrink factors (odd, even, mixed, 1) by slicing; other sizes by F.interpolate."""
    from mask2former.modeling.transformer_decoder.layers import resize_bilinear

    x = torch.randn(2, 5, 32, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    out = resize_bilinear(x, size)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn(ref.shape)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0],
                               atol=1e-6, rtol=1e-6)


def test_stacked_mlps_equal_per_group_mlps():
    from mask2former.modeling.transformer_decoder.layers import MLP, StackedMLPs

    torch.manual_seed(0)
    mlps = [MLP(8, 8, 6, 3) for _ in range(4)]
    x = torch.randn(2, 4 * 5, 8)
    ref = torch.cat([m(c) for m, c in zip(mlps, x.split(5, dim=1))], dim=1)
    torch.testing.assert_close(StackedMLPs(mlps, 5)(x), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        StackedMLPs(mlps, 4)(x)


@pytest.mark.parametrize("mask_mlp", [True, False])
def test_inference_with_stacked_prompt_heads_equals_per_group_heads(mask_mlp):
    """A step-3 model with per-step prompt mask heads (stacked: 2 heads) or the shared base
    head (1 head over all queries): inference gives the outputs of one call per group."""
    decoder = make_decoder(step=3, mask_mlp=mask_mlp).eval()
    x, mask_features = make_inputs()
    with torch.no_grad():
        heads, _ = decoder._inference_mask_heads(decoder.query_group_sizes)
        assert len(heads) == (2 if mask_mlp else 1)
        fast = decoder(x, mask_features)
        decoder._inference_mask_heads = lambda sizes: (decoder._mask_heads(), sizes)
        ref = decoder(x, mask_features)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(fast[key], ref[key], atol=1e-5, rtol=1e-5)


def test_instance_masks_and_scores_equal_the_straightforward_computation():
    from mask2former.modeling.postprocessing import _binary_masks_and_mean_prob

    g = torch.Generator().manual_seed(0)
    mask_pred = torch.randn(6, 9, 7, generator=g)
    mask_pred[2] = -1.0  # an empty mask: mean probability 0
    queries = torch.tensor([3, 0, 3, 2, 5])  # a query twice, as top-k pairs can give
    masks = mask_pred[queries]
    binary = (masks > 0).float()
    flat = binary.flatten(1)
    mean = (masks.sigmoid().flatten(1) * flat).sum(1) / (flat.sum(1) + 1e-6)
    out_binary, out_mean = _binary_masks_and_mean_prob(mask_pred, queries)
    assert torch.equal(out_binary, binary) and out_binary.dtype == torch.float32
    torch.testing.assert_close(out_mean, mean, atol=1e-7, rtol=1e-6)
    assert out_mean[3] == 0


def test_semantic_and_panoptic_share_one_pixel_assignment():
    """With both outputs on, postprocess_image assigns the pixels once; the results equal the
    separate routines'."""
    from mask2former.modeling import postprocessing as pp

    g = torch.Generator().manual_seed(1)
    mask_cls, mask_pred = torch.randn(7, 4, generator=g) * 3, torch.randn(7, 12, 10, generator=g)
    settings = PostProcessSettings(num_classes=3, semantic_on=True, panoptic_on=True, instance_on=False,
                                   thing_ids=frozenset({1}))
    calls = []
    original = pp._assign_pixels
    pp._assign_pixels = lambda *a: calls.append(1) or original(*a)
    try:
        out = pp.postprocess_image(mask_cls, mask_pred, (12, 10), (12, 10), settings)
    finally:
        pp._assign_pixels = original
    assert len(calls) == 1
    sem = pp.semantic_inference(mask_cls, mask_pred, 3)
    pan, info = pp.panoptic_inference(mask_cls, mask_pred, 3, frozenset({1}))
    assert torch.equal(out["sem_seg"], sem) and torch.equal(out["panoptic_seg"][0], pan)
    assert out["panoptic_seg"][1] == info


def test_trainable_path_only_for_the_pytorch_implementation(monkeypatch):
    """With gradients too, an explicitly selected kernel decides for itself."""
    pixel_decoder, feats, calls = _counted_pixel_decoder(monkeypatch, train=True)
    monkeypatch.setenv(ENV_VAR, "cuda_ext")
    with pytest.raises(ValueError, match="cuda_ext"):
        pixel_decoder.forward_features(feats)
    assert not calls
    monkeypatch.setenv(ENV_VAR, "pytorch")
    assert pixel_decoder.forward_features(feats)[0].requires_grad and calls


def _special_points(loc, spatial):
    """Sampling points exactly on pixel centres, on pixel edges, on the map border and one pixel
    or more outside it, for the first query of every batch element. The bilinear weights have a
    kink at pixel centres, where a derivative depends on which side the rounded coordinate
    falls: map sizes that are powers of two keep these coordinates exact in both cores."""
    for lvl, (h, w) in enumerate(spatial.tolist()):
        xs = torch.tensor([0.5 / w, 1.0 / w, 0.0, 1.0, -1.0 / w, 1 + 1.0 / w, -0.6, 1.7], dtype=loc.dtype)
        ys = torch.tensor([0.5 / h, 0.0, 1.0, 1.0 / h, 1.0, -2.0 / h, 0.5, 0.5], dtype=loc.dtype)
        n = min(len(xs), loc.shape[2] * loc.shape[4])
        flat = loc[:, 0, :, lvl].reshape(loc.shape[0], -1, 2)
        flat[:, :n, 0], flat[:, :n, 1] = xs[:n], ys[:n]
        loc[:, 0, :, lvl] = flat.view_as(loc[:, 0, :, lvl])
    return loc


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("wrt", ["all", "value", "locations", "weights"])
def test_bag_sampling_backward_matches_grid_sample(seed, wrt):
    """The hand-written backward of the embedding_bag core against autograd through the
    grid_sample core, float64, for every subset of inputs that needs a gradient."""
    value, spatial, loc, weights = _problem(seed, batch=2, heads=2, dim=3, shapes=((4, 8), (2, 2), (1, 4)),
                                            queries=5, points=4)
    loc = _special_points(loc, spatial)
    inputs = (value, loc, weights)
    names = ("value", "locations", "weights")
    needed = [wrt in ("all", name) for name in names]
    inputs = tuple(t.clone().requires_grad_(n) for t, n in zip(inputs, needed))
    grad_out = torch.randn(2, loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed))
    wanted = [t for t in inputs if t.requires_grad]
    out = deform_attn_cpu(inputs[0], spatial, inputs[1], inputs[2])
    assert type(out.grad_fn).__name__ == "_BagSamplingBackward"
    ref = ms_deform_attn_core_pytorch(*inputs[:1], spatial, *inputs[1:])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    got = torch.autograd.grad(out, wanted, grad_out)
    expected = torch.autograd.grad(ref, wanted, grad_out)
    for name, a, b in zip([n for n, k in zip(names, needed) if k], got, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_bag_sampling_backward_float32_close():
    value, spatial, loc, weights = (t.float().requires_grad_() if t.is_floating_point() else t
                                    for t in _problem(7, shapes=((8, 8), (4, 4), (2, 2)), queries=20))
    grad_out = torch.randn(2, 20, value.shape[2] * value.shape[3], generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad(deform_attn_cpu(value, spatial, loc, weights), (value, loc, weights), grad_out)
    ref = torch.autograd.grad(ms_deform_attn_core_pytorch(value, spatial, loc, weights), (value, loc, weights), grad_out)
    for name, a, b in zip(("value", "locations", "weights"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("with_padding", [False, True])
def test_encoder_layer_gradients_match_module_forward(monkeypatch, with_padding):
    """A whole deformable encoder layer, float64: the output and the gradients of every
    parameter and of the input equal those through ``MSDeformAttn.forward``."""
    torch.manual_seed(0)
    shapes = torch.tensor([[6, 5], [3, 3], [2, 2]])
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    total = int(shapes.prod(1).sum())
    layer = msdeformattn.DeformableEncoderLayer(d_model=16, dim_feedforward=24, dropout=0.0,
                                                n_levels=3, n_heads=4, n_points=3).double()
    with torch.no_grad():  # query-dependent offsets and weights, some points leave the maps
        layer.self_attn.sampling_offsets.weight.normal_(0, 0.5)
        layer.self_attn.attention_weights.weight.normal_(0, 0.5)
    src = torch.randn(2, total, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(2, total, 16, dtype=torch.float64)
    ratios = torch.ones(2, 3, 2, dtype=torch.float64)
    mask = None
    if with_padding:
        ratios[1] = 0.8
        mask = torch.zeros(2, total, dtype=torch.bool)
        mask[1, ::7] = True
    ref_points = msdeformattn.DeformableEncoder.get_reference_points(shapes, ratios)
    weight = torch.randn(2, total, 16, dtype=torch.float64)
    params = [src] + list(layer.parameters())

    def grads():
        out = layer(src, pos, ref_points, shapes, starts, mask)
        return [out.detach()] + list(torch.autograd.grad((out * weight).sum(), params))

    calls = []
    original = msdeformattn._value_gradient
    monkeypatch.setattr(msdeformattn, "_value_gradient", lambda *a: calls.append(1) or original(*a))
    new = grads()
    assert calls
    monkeypatch.setattr(msdeformattn, "_deformable_attention", _module_forward)
    ref = grads()
    names = ["output", "src"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, new, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)



@pytest.mark.parametrize("zero_rows", [(), (0, 2, 3), (0, 1, 2, 3, 4)])
def test_mask_logits_gradients_skip_zero_rows_exactly(zero_rows):
    """The mask product's backward over the queries with a gradient equals the full einsum's
    (float64), with some, none or all rows of an image's gradient zero."""
    from mask2former.modeling.transformer_decoder.layers import _MaskLogits, mask_logits

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    feats = torch.randn(2, 6, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 4, 3, dtype=torch.float64, generator=g)
    grad[0, list(zero_rows)] = 0
    out = mask_logits(emb, feats)
    assert out.grad_fn is not None and "_MaskLogits" in type(out.grad_fn).__name__
    ref = torch.einsum("bqc,bchw->bqhw", emb, feats)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (emb, feats), grad), torch.autograd.grad(ref, (emb, feats), grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # only the features need a gradient (a frozen mask head)
    out = _MaskLogits.apply(emb.detach(), feats)
    ref = torch.einsum("bqc,bchw->bqhw", emb.detach(), feats)
    torch.testing.assert_close(torch.autograd.grad(out, feats, grad)[0],
                               torch.autograd.grad(ref, feats, grad)[0], atol=1e-12, rtol=1e-12)


def test_one_hot_map_equals_one_hot():
    from mask2former.modeling.postprocessing import _one_hot_map

    labels = torch.randint(0, 5, (7, 9), generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.one_hot(labels, 6).permute(2, 0, 1).float()
    out = _one_hot_map(labels, 6)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_encoder_feed_forward_in_row_blocks_equals_whole(monkeypatch):
    """Without autograd, the encoder layer's feed-forward sublayer runs in blocks of rows; the
    output equals the one-pass computation (with autograd) for any block size."""
    from mask2former.modeling.pixel_decoder.msdeformattn import DeformableEncoderLayer

    torch.manual_seed(0)
    layer = DeformableEncoderLayer(d_model=16, dim_feedforward=24, dropout=0.0, n_levels=2, n_heads=2,
                                   n_points=2).eval()
    spatial = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    src, pos = torch.randn(2, 26, 16), torch.randn(2, 26, 16)
    ref = torch.rand(2, 26, 2, 2)
    whole = layer(src, pos, ref, spatial, starts)  # autograd on: one pass
    assert whole.requires_grad
    for rows in (7, 52, 1000):
        monkeypatch.setattr(DeformableEncoderLayer, "FFN_BLOCK_ROWS", rows)
        with torch.no_grad():
            torch.testing.assert_close(layer(src, pos, ref, spatial, starts), whole.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("outputs", [("panoptic",), ("semantic",), ("panoptic", "instance"),
                                     ("panoptic", "soft semantic")])
def test_scratch_mask_logits_overwritten_only_when_nothing_reads_them(outputs):
    """postprocess_batch lets the pixel assignment keep the mask probabilities in its own
    upsampled logits unless instance or soft semantic inference reads them afterwards; every
    output equals that of a call on a tensor the routine must not touch."""
    from mask2former.modeling import postprocessing as pp

    g = torch.Generator().manual_seed(2)
    mask_cls, mask_pred = torch.randn(9, 5, generator=g) * 3, torch.randn(9, 12, 10, generator=g)
    settings = PostProcessSettings(
        num_classes=4, thing_ids=frozenset({1, 2}), panoptic_on="panoptic" in outputs,
        semantic_on="semantic" in outputs or "soft semantic" in outputs, instance_on="instance" in outputs,
        semantic_mode="soft" if "soft semantic" in outputs else "hard")
    kept = pp.queries_needed(mask_cls, settings)
    assert kept.numel() > 0
    scratch = mask_pred[kept].clone()
    expected = pp.postprocess_image(mask_cls[kept], mask_pred[kept], (12, 10), (12, 10), settings)
    out = pp.postprocess_image(mask_cls[kept], scratch, (12, 10), (12, 10), settings, scratch=True)
    reads_logits = settings.instance_on or settings.semantic_mode == "soft"
    assert torch.equal(scratch, mask_pred[kept]) == reads_logits  # overwritten only when allowed
    if not reads_logits:
        assert torch.equal(scratch, mask_pred[kept].sigmoid())
    for key in expected:
        if key == "instances":
            for field in ("pred_masks", "scores", "pred_classes"):
                assert torch.equal(out[key].get(field), expected[key].get(field))
        elif key == "panoptic_seg":
            assert torch.equal(out[key][0], expected[key][0]) and out[key][1] == expected[key][1]
        else:
            assert torch.equal(out[key], expected[key])
