"""Tests of the ECLIPSE transformer decoder, its class head, the logit manipulation and the
step initialisation / freezing rules (docs/design.md#method and #per-step-modules).

Most tests build a small decoder directly from its constructor; the freezing tests and the
end-to-end training checks build the tiny model of ``tests/fixtures/ade_ps_t3_deltas_pos``
(ResNet-18, hidden 64, 3 decoder layers, 16 queries, 4 prompts, step 3) with random weights.

The grouped inference (one self-attention call per layer with a block-diagonal mask) is checked
against a per-group reference written here, which runs the self-attention of each query group
separately, as the official implementation does.
"""
import math
import types
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from torch import nn

import mask2former  # noqa: F401  (registers the meta-architecture, head and decoders)
from continual.config import setup_cfg
from continual.prompt_tuning import (
    freeze_for_prompt_tuning,
    initialize_new_step,
    trainable_parameter_names,
)
from mask2former.modeling.transformer_decoder.classifier import IncrementalClassifier
from mask2former.modeling.transformer_decoder.logit_manipulation import (
    DEACTIVATED_LOGIT,
    clamped_logit,
    manipulate_logits,
    parse_logit_deltas,
)
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
    block_diagonal_mask,
    step_class_groups,
)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "fixtures" / "ade_ps_t3_deltas_pos" / "config.yaml"

# small decoder used by most tests
HID, HEADS, LAYERS, Q0, P, C0, CINC, BATCH = 32, 4, 3, 6, 3, 5, 2, 2
LOGIT_LIMIT = math.log(0.999 / 0.001)  # 6.906755...


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: one intra-op thread is faster and keeps results reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_decoder(step=3, num_prompts=P, deep=True, mask_mlp=True, no_obj_mlp=False, deep_cls=True,
                 cls_bias=True, deltas=None, supervise_all=False, seed=0):
    torch.manual_seed(seed)
    groups = step_class_groups(C0, CINC, step)
    return MultiScaleMaskedTransformerDecoder(
        HID,
        True,
        hidden_dim=HID,
        num_queries=Q0,
        nheads=HEADS,
        dim_feedforward=48,
        dec_layers=LAYERS,
        pre_norm=False,
        mask_dim=HID,
        enforce_input_project=False,
        class_groups=groups,
        num_prompts=num_prompts,
        prompt_deep=deep,
        prompt_mask_mlp=mask_mlp,
        prompt_no_obj_mlp=no_obj_mlp,
        deep_cls=deep_cls,
        cls_bias=cls_bias,
        logit_deltas=deltas if deltas is not None else [0.0] * len(groups),
        prompt_supervise_all_layers=supervise_all,
    )


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(BATCH, HID, s, s, generator=g) for s in (2, 4, 8)]
    mask_features = torch.randn(BATCH, HID, 16, 16, generator=g)
    return feats, mask_features


def as_model(decoder):
    """A stand-in with the attribute path ``sem_seg_head.predictor`` used by prompt_tuning."""
    return types.SimpleNamespace(sem_seg_head=types.SimpleNamespace(predictor=decoder))


def tiny_cfg(*opts):
    return setup_cfg(TINY_CONFIG, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])


def tiny_model(*opts, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_cfg(*opts)
    return cfg, build_model(cfg)


def train_inputs(num_classes, size=32, seed=0):
    """One training image with two segments whose labels are order positions 1 and C."""
    g = torch.Generator().manual_seed(seed)
    inst = Instances((size, size))
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, : size // 2] = True
    masks[1, size // 2:] = True
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.tensor([1, num_classes])
    image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    return [{"image": image, "instances": inst, "height": size, "width": size}]


def reference_manipulation(logits, query_sizes, class_sizes, deltas, no_obj=None):
    """Per-query restatement of the logit manipulation (docs/design.md#method) (written independently of the module)."""
    out = logits.clone()
    n_cls = sum(class_sizes)
    q_bounds = [sum(query_sizes[:g]) for g in range(len(query_sizes) + 1)]
    c_bounds = [sum(class_sizes[:g]) for g in range(len(class_sizes) + 1)]
    for g, delta in enumerate(deltas):
        own = set(range(c_bounds[g], c_bounds[g + 1]))
        others = [c for c in range(n_cls) if c not in own]
        for b in range(out.shape[0]):
            for q in range(q_bounds[g], q_bounds[g + 1]):
                z = out[b, q]
                if no_obj is not None and no_obj[g] is not None:
                    z[n_cls] = no_obj[g].reshape(out.shape[0], -1)[b, q - q_bounds[g]]
                if delta > 0:
                    s = min(max(sum(torch.sigmoid(z[c]).item() for c in others), 0.0), 1.0)
                    p = min(max(delta * s, 0.001), 0.999)
                    z[n_cls] = math.log(p / (1 - p))
                elif delta < 0:
                    p = min(max(abs(delta) * torch.sigmoid(z[n_cls]).item(), 0.001), 0.999)
                    z[n_cls] = math.log(p / (1 - p))
                for c in others:
                    z[c] = -10.0
    return out


@torch.no_grad()
def reference_inference(dec, feats, mask_features):
    """Inference with the self-attention of every query group run separately (official loop)."""
    bs = mask_features.shape[0]
    n_groups = 1 + len(dec.prompt_feat)
    sizes = [Q0] + [len(dec.prompt_feat[k].weight) for k in range(n_groups - 1)]
    bounds = [sum(sizes[:g]) for g in range(n_groups + 1)]

    memories = []
    for i, f in enumerate(feats):
        pos = dec.pe_layer(f, None).flatten(2).permute(2, 0, 1)
        src = (dec.input_proj[i](f).flatten(2) + dec.level_embed.weight[i][None, :, None]).permute(2, 0, 1)
        memories.append((src, pos, f.shape[-2:]))

    def pos_at(layer):
        rows = [dec.query_embed.weight]
        for k in range(n_groups - 1):
            bank = dec.prompt_embed[k]
            rows.append(bank[layer].weight if dec.prompt_deep else bank.weight)
        return torch.cat(rows)[:, None].expand(-1, bs, -1)

    mask_heads = [dec.mask_embed] + [
        dec.prompt_mask_embed[k] if len(dec.prompt_mask_embed) else dec.mask_embed for k in range(n_groups - 1)
    ]

    def heads(output, size):
        normed = dec.decoder_norm(output).transpose(0, 1)
        logits = dec.class_embed(normed)
        emb = torch.cat([mask_heads[g](normed[:, bounds[g]:bounds[g + 1]]) for g in range(n_groups)], 1)
        masks = torch.einsum("bqc,bchw->bqhw", emb, mask_features)
        attn = torch.nn.functional.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        attn = (attn.sigmoid() < 0.5).flatten(2)  # [B, Q, hw]
        attn = attn[:, None].expand(-1, HEADS, -1, -1).reshape(bs * HEADS, attn.shape[1], -1).clone()
        full = attn.all(-1)
        attn[full] = False
        return logits, masks, attn, normed

    content = torch.cat([dec.query_feat.weight] + [p.weight for p in dec.prompt_feat])
    output = content[:, None].expand(-1, bs, -1)
    logits, masks, attn, normed = heads(output, memories[0][2])
    for i in range(dec.num_layers):
        src, pos, _ = memories[i % 3]
        qpos = pos_at(i)
        output = dec.transformer_cross_attention_layers[i](output, src, memory_mask=attn, pos=pos, query_pos=qpos)
        output = torch.cat([
            dec.transformer_self_attention_layers[i](
                output[bounds[g]:bounds[g + 1]], tgt_mask=None, query_pos=qpos[bounds[g]:bounds[g + 1]]
            )
            for g in range(n_groups)
        ])
        output = dec.transformer_ffn_layers[i](output)
        logits, masks, attn, normed = heads(output, memories[(i + 1) % 3][2])
    no_obj = None
    if len(dec.prompt_no_obj_embed):
        no_obj = [None] + [dec.prompt_no_obj_embed[g - 1](normed[:, bounds[g]:bounds[g + 1]])
                           for g in range(1, n_groups)]
    if dec.num_prompts > 0:
        logits = reference_manipulation(logits, sizes, dec.class_groups, dec.logit_deltas, no_obj)
    return logits, masks


def group_rows(t, group, step, num_prompts=P):
    """Rows of ``t`` [B, Q, ...] that belong to query group ``group``."""
    sizes = [Q0] + [num_prompts] * step
    start = sum(sizes[:group])
    return t[:, start:start + sizes[group]]


# --------------------------------------------------------------------------------------------
# block-diagonal mask and grouped inference
# --------------------------------------------------------------------------------------------
def test_block_diagonal_mask_values():
    mask = block_diagonal_mask([2, 3, 1])
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 1],
        [1, 1, 0, 0, 0, 1],
        [1, 1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1, 0],
    ], dtype=torch.bool)
    assert mask.dtype == torch.bool and mask.shape == (6, 6)
    assert torch.equal(mask, expected)
    assert block_diagonal_mask([5]) is None
    assert block_diagonal_mask([]) is None
    big = block_diagonal_mask([100] + [10] * 10)
    assert big.shape == (200, 200)
    # allowed pairs: 100^2 + 10 * 10^2
    assert int((~big).sum()) == 100 * 100 + 10 * 100
    assert big.device.type == "cpu"


@pytest.mark.parametrize(
    "deep,mask_mlp,no_obj_mlp",
    [(True, True, False), (False, True, False), (True, False, False), (False, False, True)],
    ids=["deep-maskmlp", "shallow-maskmlp", "deep-sharedmask", "shallow-noobjmlp"],
)
def test_grouped_inference_equals_per_group_loop(deep, mask_mlp, no_obj_mlp):
    dec = make_decoder(step=3, deep=deep, mask_mlp=mask_mlp, no_obj_mlp=no_obj_mlp,
                       deltas=[0.4, 0.6, -0.5, 0.0]).eval()
    feats, mf = make_inputs()
    with torch.no_grad():
        out = dec(feats, mf)
    ref_logits, ref_masks = reference_inference(dec, feats, mf)
    n_q = Q0 + 3 * P
    assert out["pred_logits"].shape == (BATCH, n_q, C0 + 3 * CINC + 1)
    assert out["pred_masks"].shape == (BATCH, n_q, 16, 16)
    torch.testing.assert_close(out["pred_masks"], ref_masks, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pred_logits"], ref_logits, atol=1e-5, rtol=0)


def test_reference_loop_differs_from_unmasked_attention():
    """Sanity check of the reference: dropping the block-diagonal mask changes the outputs, so
    the equality above really tests the group restriction."""
    dec = make_decoder(step=3).eval()
    feats, mf = make_inputs()
    with torch.no_grad():
        grouped = dec(feats, mf)["pred_masks"]
        dec_sizes = dec.query_group_sizes
        import mask2former.modeling.transformer_decoder.mask2former_transformer_decoder as mod

        original = mod.block_diagonal_mask
        mod.block_diagonal_mask = lambda sizes, device=None: None
        try:
            full = dec(feats, mf)["pred_masks"]
        finally:
            mod.block_diagonal_mask = original
    assert dec_sizes == [Q0, P, P, P]
    assert (grouped - full).abs().max() > 1e-3


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_query_groups_are_independent(deep):
    """Perturbing the prompts of step 2 changes only group 2's outputs."""
    dec = make_decoder(step=3, deep=deep, deltas=[0.4, 0.6, -0.5, 0.0]).eval()
    feats, mf = make_inputs()
    with torch.no_grad():
        before = dec(feats, mf)
        k = 1  # prompt set of step 2 = query group 2
        dec.prompt_feat[k].weight.add_(torch.randn_like(dec.prompt_feat[k].weight))
        tables = dec.prompt_embed[k] if deep else [dec.prompt_embed[k]]
        for table in tables:
            table.weight.add_(torch.randn_like(table.weight))
        for p in dec.prompt_mask_embed[k].parameters():
            p.add_(0.1 * torch.randn_like(p))
        after = dec(feats, mf)
    for key in ("pred_logits", "pred_masks"):
        for g in (0, 1, 3):
            torch.testing.assert_close(group_rows(after[key], g, 3), group_rows(before[key], g, 3),
                                       atol=1e-6, rtol=0)
        assert (group_rows(after[key], 2, 3) - group_rows(before[key], 2, 3)).abs().max() > 1e-3


def test_base_group_is_independent_of_prompts_and_matches_step0_model():
    """Group 0 at inference = the step-0 model (no prompts) with the same shared weights."""
    dec3 = make_decoder(step=3, deltas=[0.0] * 4).eval()
    dec0 = make_decoder(step=0, num_prompts=0).eval()
    missing, unexpected = dec0.load_state_dict(dec3.state_dict(), strict=False)
    assert not missing
    assert unexpected and all(k.startswith(("prompt_", "class_embed.cls.2", "class_embed.cls.3",
                                            "class_embed.cls.4")) for k in unexpected)
    feats, mf = make_inputs()
    with torch.no_grad():
        out3, out0 = dec3(feats, mf), dec0(feats, mf)
    torch.testing.assert_close(group_rows(out3["pred_masks"], 0, 3), out0["pred_masks"], atol=1e-5, rtol=0)
    base_logits = group_rows(out3["pred_logits"], 0, 3)
    torch.testing.assert_close(base_logits[..., :C0], out0["pred_logits"][..., :C0], atol=1e-5, rtol=0)
    torch.testing.assert_close(base_logits[..., -1], out0["pred_logits"][..., -1], atol=1e-5, rtol=0)
    assert torch.all(base_logits[..., C0:-1] == DEACTIVATED_LOGIT)


def test_newest_group_at_inference_matches_its_training_forward():
    """Frozen shared weights: the newest prompts give the same masks/logits in training and at
    inference (logit manipulation with delta 0 only switches other groups' columns off)."""
    dec = make_decoder(step=3, deltas=[0.0] * 4)
    feats, mf = make_inputs()
    with torch.no_grad():
        train = dec.train()(feats, mf)
        infer = dec.eval()(feats, mf)
    torch.testing.assert_close(group_rows(infer["pred_masks"], 3, 3), train["pred_masks"], atol=1e-5, rtol=0)
    own = slice(C0 + 2 * CINC, C0 + 3 * CINC)
    inf_logits = group_rows(infer["pred_logits"], 3, 3)
    torch.testing.assert_close(inf_logits[..., own], train["pred_logits"][..., own], atol=1e-5, rtol=0)
    torch.testing.assert_close(inf_logits[..., -1], train["pred_logits"][..., -1], atol=1e-5, rtol=0)
    assert torch.all(inf_logits[..., : own.start] == DEACTIVATED_LOGIT)


# --------------------------------------------------------------------------------------------
# logit manipulation
# --------------------------------------------------------------------------------------------
def _logit(p):
    return math.log(p / (1 - p))


# group 0: 1 query, classes 0-1; group 1: 2 queries, class 2; group 2: 1 query, class 3
QS, CS = [1, 2, 1], [2, 1, 1]


def _tiny_logits():
    q = _logit(0.25)
    return torch.tensor([[
        # c0    c1    c2    c3    no-object
        [1.0, -1.0, q, q, 2.0],          # group 0: other sigmoids 0.25 + 0.25 = 0.5
        [0.3, 0.7, 1.5, 0.0, 0.0],       # group 1: sigma(no-obj) = 0.5
        [3.0, 3.0, -2.0, 3.0, 1.2],      # group 1: other sigmoids sum 2.86 -> clamped to 1
        [0.0, 0.0, 0.0, -4.0, -0.7],     # group 2
    ]])


def test_manipulation_by_hand():
    z = _tiny_logits()
    original = z.clone()
    out = manipulate_logits(z, QS, CS, [0.4, -0.5, 0.0])
    assert torch.equal(z, original), "the input must not be modified"
    expected = torch.tensor([[
        [1.0, -1.0, -10.0, -10.0, _logit(0.4 * 0.5)],            # delta > 0: logit(0.2) = -1.3863
        [-10.0, -10.0, 1.5, -10.0, _logit(0.5 * 0.5)],           # delta < 0: logit(0.25) = -1.0986
        [-10.0, -10.0, -2.0, -10.0, _logit(0.5 * 0.7685247834990175)],
        [-10.0, -10.0, -10.0, -4.0, -0.7],                       # delta = 0: unchanged
    ]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert abs(expected[0, 0, 4].item() - (-1.3862944)) < 1e-6


def test_manipulation_aggregation_sum_clamped_at_one():
    z = _tiny_logits()
    # group 1 with delta > 0: query 1 others = sigma(.3)+sigma(.7)+sigma(0) = 1.742 -> 1;
    # query 2 others = 2.857 -> 1: both give logit(0.6) (without the clamp: logit(>1) = nan)
    out = manipulate_logits(z, QS, CS, [0.0, 0.6, 0.0])
    torch.testing.assert_close(out[0, 1:3, 4], torch.full((2,), _logit(0.6)), atol=1e-5, rtol=0)
    # below 1 the sum is not clamped: group 0 others sum 0.5 -> logit(0.6 * 0.5)
    out = manipulate_logits(z, QS, CS, [0.6, 0.0, 0.0])
    assert out[0, 0, 4].item() == pytest.approx(_logit(0.3), abs=1e-5)
    # the sum uses other groups' logits *before* they are set to -10, older and newer groups
    z2 = torch.full((1, 4, 5), -30.0)
    z2[0, 3, 0] = 0.0  # an older group's class (group 0) for a query of group 2 -> sigma = 0.5
    out = manipulate_logits(z2, QS, CS, [0.0, 0.0, 1.0])
    assert out[0, 3, 4].item() == pytest.approx(_logit(0.5), abs=1e-5)
    z2[0, 0, 3] = _logit(0.3)  # a newer group's class for the base group
    out = manipulate_logits(z2, QS, CS, [1.0, 0.0, 0.0])
    assert out[0, 0, 4].item() == pytest.approx(_logit(0.3), abs=1e-5)


def test_manipulation_probability_clamp():
    z = torch.full((1, 4, 5), -40.0)
    z[0, 1, :] = 40.0
    # delta > 0 with no mass on other classes -> 0.001; large delta with mass 1 -> 0.999
    out = manipulate_logits(z, QS, CS, [0.5, 5.0, 0.0])
    assert out[0, 0, 4].item() == pytest.approx(-LOGIT_LIMIT, abs=1e-4)
    assert out[0, 1, 4].item() == pytest.approx(LOGIT_LIMIT, abs=1e-4)
    # delta < 0 on a tiny / huge no-object probability
    out = manipulate_logits(z, QS, CS, [-0.9, -1.0, 0.0])
    assert out[0, 0, 4].item() == pytest.approx(-LOGIT_LIMIT, abs=1e-4)
    assert out[0, 1, 4].item() == pytest.approx(LOGIT_LIMIT, abs=1e-4)
    # with delta = 0 the no-object logit is not clamped
    assert out[0, 3, 4].item() == -40.0
    # random logits and deltas: the manipulated no-object logits stay within +-6.9068
    g = torch.Generator().manual_seed(3)
    z = 20 * torch.randn(3, 4, 5, generator=g)
    out = manipulate_logits(z, QS, CS, [0.7, -2.0, 3.0])
    assert out[..., 4].abs().max().item() <= LOGIT_LIMIT + 1e-4
    assert clamped_logit(torch.tensor([0.0, 1.0, 0.5])).tolist() == pytest.approx([-LOGIT_LIMIT, LOGIT_LIMIT, 0.0], abs=1e-4)


@pytest.mark.parametrize("deltas", [[0.0, 0.0, 0.0], [0.4, -0.5, 0.0], [-0.3, 0.3, 0.9]])
def test_deactivation_of_other_groups_for_every_group(deltas):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 5, generator=g)
    out = manipulate_logits(z, QS, CS, deltas)
    own = {0: [0, 1], 1: [2], 2: [3]}
    rows = {0: [0], 1: [1, 2], 2: [3]}
    for grp in range(3):
        for q in rows[grp]:
            for c in range(4):
                if c in own[grp]:
                    assert torch.equal(out[:, q, c], z[:, q, c])
                else:
                    assert torch.all(out[:, q, c] == -10.0), (grp, q, c)


def test_manipulation_matches_reference_on_random_input():
    g = torch.Generator().manual_seed(5)
    qs, cs, deltas = [5, 3, 3, 3], [7, 2, 2, 2], [0.4, 0.6, -0.6, 0.0]
    z = 3 * torch.randn(2, 14, 14, generator=g)
    torch.testing.assert_close(manipulate_logits(z, qs, cs, deltas), reference_manipulation(z, qs, cs, deltas),
                               atol=1e-5, rtol=0)


def test_no_object_logits_replacement():
    z = _tiny_logits()
    repl = [None, torch.tensor([[[0.25], [-3.0]]]), torch.tensor([[1.5]])]  # [B,Q,1] and [B,Q]
    out = manipulate_logits(z, QS, CS, [0.0, 0.0, 0.0], no_object_logits=repl)
    assert out[0, 0, 4].item() == 2.0  # None keeps the class head's value
    assert out[0, 1:3, 4].tolist() == [0.25, -3.0]
    assert out[0, 3, 4].item() == 1.5
    # the replacement is what delta < 0 calibrates
    out = manipulate_logits(z, QS, CS, [0.0, -0.5, 0.0], no_object_logits=repl)
    expected = [_logit(0.5 / (1 + math.exp(-0.25))), _logit(0.5 / (1 + math.exp(3.0)))]
    assert out[0, 1:3, 4].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(z, _tiny_logits())


def test_manipulation_rejects_inconsistent_sizes():
    z = _tiny_logits()
    with pytest.raises(ValueError):
        manipulate_logits(z, QS, CS, [0.0, 0.0])
    with pytest.raises(ValueError):
        manipulate_logits(z, [1, 1, 1], CS, [0.0] * 3)
    with pytest.raises(ValueError):
        manipulate_logits(z, QS, [2, 1, 2], [0.0] * 3)


def test_parse_logit_deltas():
    assert parse_logit_deltas(None, 3) == [0.0, 0.0, 0.0]
    assert parse_logit_deltas(0.5, 4) == [0.5] * 4
    assert parse_logit_deltas(1, 2) == [1.0, 1.0] and all(type(v) is float for v in parse_logit_deltas(1, 2))
    assert parse_logit_deltas([0.4, 0.6, 0.7], 2) == [0.4, 0.6]
    assert parse_logit_deltas([0.4, 0.6], 5) == [0.4, 0.6, 0.6, 0.6, 0.6]
    assert parse_logit_deltas((-0.4, -0.6), 2) == [-0.4, -0.6]
    assert parse_logit_deltas([0.4], 1) == [0.4]


@pytest.mark.parametrize("bad", ["0.5", "[0.4,0.6]", [], (), True, False, [0.4, True], [[0.4, 0.6]],
                                 [0.4, "0.6"], {"a": 1}])
def test_parse_logit_deltas_errors(bad):
    with pytest.raises(ValueError, match="CONT.LOGIT_MANI_DELTAS"):
        parse_logit_deltas(bad, 3)


def test_decoder_deltas_from_config():
    cfg = tiny_cfg("CONT.LOGIT_MANI_DELTAS", "[0.4, 0.6]", "CONT.TASK", "5")
    pred = build_model(cfg).sem_seg_head.predictor
    assert pred.logit_deltas == [0.4] + [0.6] * 5
    for bad in ("abc", [], True):
        cfg = tiny_cfg()
        cfg.CONT.LOGIT_MANI_DELTAS = bad  # set directly: yacs would reject a type change
        with pytest.raises(ValueError, match="CONT.LOGIT_MANI_DELTAS"):
            build_model(cfg)


# --------------------------------------------------------------------------------------------
# IncrementalClassifier
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deep", [True, False])
def test_classifier_column_order(deep):
    sizes = [1, 3, 2, 2]  # no-object, C0 = 3, two steps of 2
    clf = IncrementalClassifier(sizes, 8, deep=deep, bias=True)
    # make each head output constants identifying its columns
    marks = {0: [99.0], 1: [1.0, 2.0, 3.0], 2: [4.0, 5.0], 3: [6.0, 7.0]}
    with torch.no_grad():
        for j, head in enumerate(clf.cls):
            last = head.layers[-1] if deep else head
            last.weight.zero_()
            last.bias.copy_(torch.tensor(marks[j]))
    out = clf(torch.randn(2, 5, 8))
    assert out.shape == (2, 5, 8)
    assert torch.equal(out[0, 0], torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 99.0]))
    assert clf.num_classes == 7


def test_classifier_heads_and_keys():
    deep = IncrementalClassifier([1, 3, 2], 8, deep=True, bias=False)
    keys = list(deep.state_dict())
    expected = [f"cls.{j}.layers.{i}.{w}" for j in range(3) for i in range(3) for w in ("weight", "bias")]
    assert keys == expected  # USE_BIAS is ignored by the MLP heads
    assert [deep.cls[j].layers[2].out_features for j in range(3)] == [1, 3, 2]
    assert all(deep.cls[0].layers[i].in_features == 8 for i in range(3))

    lin_b = IncrementalClassifier([1, 3, 2], 8, deep=False, bias=True)
    assert list(lin_b.state_dict()) == [f"cls.{j}.{w}" for j in range(3) for w in ("weight", "bias")]
    lin = IncrementalClassifier([1, 3, 2], 8, deep=False, bias=False)
    assert list(lin.state_dict()) == [f"cls.{j}.weight" for j in range(3)]
    assert all(isinstance(h, nn.Linear) and h.bias is None for h in lin.cls)
    x = torch.randn(4, 8)
    assert torch.allclose(lin(x)[:, -1], x @ lin.cls[0].weight[0])


def test_decoder_classifier_layout():
    dec = make_decoder(step=2)
    assert [h.layers[-1].out_features for h in dec.class_embed.cls] == [1, C0, CINC, CINC]
    dec = make_decoder(step=2, deep_cls=False, cls_bias=False)
    assert [h.out_features for h in dec.class_embed.cls] == [1, C0, CINC, CINC]
    assert all(h.bias is None for h in dec.class_embed.cls)


# --------------------------------------------------------------------------------------------
# forward paths
# --------------------------------------------------------------------------------------------
def _pre_decoder_prediction(dec, content, mask_head, mask_features):
    normed = dec.decoder_norm(content)
    logits = dec.class_embed(normed)[None].expand(BATCH, -1, -1)
    masks = torch.einsum("qc,bchw->bqhw", mask_head(normed), mask_features)
    return logits, masks


def test_step0_training_path():
    dec = make_decoder(step=0, num_prompts=0).train()
    feats, mf = make_inputs()
    out = dec(feats, mf)
    assert out["pred_logits"].shape == (BATCH, Q0, C0 + 1)
    assert out["pred_masks"].shape == (BATCH, Q0, 16, 16)
    assert len(out["aux_outputs"]) == LAYERS
    logits, masks = _pre_decoder_prediction(dec, dec.query_feat.weight, dec.mask_embed, mf)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_masks"], masks, atol=1e-4, rtol=0)
    # the aux outputs are the intermediate predictions, all distinct from the final one
    for aux in out["aux_outputs"]:
        assert (aux["pred_masks"] - out["pred_masks"]).abs().max() > 1e-4


def test_prompt_training_path_and_no_gradient_to_base_queries():
    dec = make_decoder(step=3).train()
    feats, mf = make_inputs()
    out = dec(feats, mf)
    assert out["pred_logits"].shape == (BATCH, P, C0 + 3 * CINC + 1)
    assert out["pred_masks"].shape == (BATCH, P, 16, 16)
    assert len(out["aux_outputs"]) == 1
    logits, masks = _pre_decoder_prediction(dec, dec.prompt_feat[2].weight, dec.prompt_mask_embed[2], mf)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_masks"], masks, atol=1e-4, rtol=0)

    loss = out["pred_logits"].sum() + out["pred_masks"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_masks"].sum() for a in out["aux_outputs"])
    loss.backward()
    grads = {n: p.grad for n, p in dec.named_parameters()}
    # only the newest prompt set runs: base queries, older prompt sets and the base mask head
    # are not part of the graph even though they require grad here
    for name in ("query_feat.weight", "query_embed.weight", "prompt_feat.0.weight", "prompt_feat.1.weight"):
        assert grads[name] is None, name
    for name, g in grads.items():
        if name.startswith(("prompt_embed.0.", "prompt_embed.1.", "prompt_mask_embed.0.",
                            "prompt_mask_embed.1.", "mask_embed.")):
            assert g is None, name
    assert grads["prompt_feat.2.weight"].abs().sum() > 0
    for l in range(LAYERS):
        assert grads[f"prompt_embed.2.{l}.weight"].abs().sum() > 0
    assert grads["prompt_mask_embed.2.layers.0.weight"].abs().sum() > 0


def test_prompt_training_supervise_all_layers():
    dec = make_decoder(step=2, supervise_all=True).train()
    feats, mf = make_inputs()
    out = dec(feats, mf)
    assert out["pred_logits"].shape[1] == P
    assert len(out["aux_outputs"]) == LAYERS
    logits, _ = _pre_decoder_prediction(dec, dec.prompt_feat[1].weight, dec.prompt_mask_embed[1], mf)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"], logits, atol=1e-5, rtol=0)
    # the default keeps only the pre-decoder prediction, which is the first of the full list
    dec.prompt_supervise_all_layers = False
    out1 = dec(feats, mf)
    assert len(out1["aux_outputs"]) == 1
    torch.testing.assert_close(out1["aux_outputs"][0]["pred_masks"], out["aux_outputs"][0]["pred_masks"])


@pytest.mark.parametrize("step", [1, 3])
def test_inference_path(step):
    dec = make_decoder(step=step).eval()
    feats, mf = make_inputs()
    with torch.no_grad():
        out = dec(feats, mf)
    assert set(out) == {"pred_logits", "pred_masks"}
    assert out["pred_logits"].shape == (BATCH, Q0 + step * P, C0 + step * CINC + 1)
    assert out["pred_masks"].shape == (BATCH, Q0 + step * P, 16, 16)


def test_num_prompts_at_step0_has_no_banks():
    dec = make_decoder(step=0, num_prompts=4)
    assert len(dec.prompt_feat) == len(dec.prompt_embed) == len(dec.prompt_mask_embed) == 0
    assert not dec.has_prompts
    feats, mf = make_inputs()
    out = dec.train()(feats, mf)
    assert out["pred_logits"].shape == (BATCH, Q0, C0 + 1) and len(out["aux_outputs"]) == LAYERS
    with torch.no_grad():
        out = dec.eval()(feats, mf)
    assert out["pred_logits"].shape == (BATCH, Q0, C0 + 1)


def test_num_prompts_at_step0_model_trains():
    cfg, model = tiny_model("CONT.TASK", "0", "CONT.NUM_PROMPTS", "4")
    pred = model.sem_seg_head.predictor
    assert not any(n.startswith("sem_seg_head.predictor.prompt") for n, _ in model.named_parameters())
    assert pred.class_groups == [100]
    model.train()
    losses = model(train_inputs(100))
    assert {"loss_ce", "loss_ce_0", f"loss_ce_{LAYERS - 1}"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert pred.query_feat.weight.grad is not None and pred.query_feat.weight.grad.abs().sum() > 0


def test_finetuning_baseline_uses_base_path():
    """NUM_PROMPTS 0 at step t > 0: all base queries, all C+1 columns, deep supervision."""
    dec = make_decoder(step=2, num_prompts=0)
    assert not dec.has_prompts and len(dec.prompt_feat) == 0
    feats, mf = make_inputs()
    out = dec.train()(feats, mf)
    assert out["pred_logits"].shape == (BATCH, Q0, C0 + 2 * CINC + 1)
    assert len(out["aux_outputs"]) == LAYERS
    with torch.no_grad():
        inf = dec.eval()(feats, mf)
    assert inf["pred_logits"].shape == (BATCH, Q0, C0 + 2 * CINC + 1)
    # no prompts -> no logit manipulation: no column is forced to -10
    assert not torch.any(inf["pred_logits"] == DEACTIVATED_LOGIT)


def test_finetuning_baseline_model_trains():
    cfg, model = tiny_model("CONT.NUM_PROMPTS", "0")
    pred = model.sem_seg_head.predictor
    model.train()
    losses = model(train_inputs(115))
    assert f"loss_ce_{LAYERS - 1}" in losses
    sum(losses.values()).backward()
    assert pred.query_feat.weight.grad.abs().sum() > 0
    # every class head, old steps included, is reached by the loss
    for j in range(len(pred.class_embed.cls)):
        assert pred.class_embed.cls[j].layers[2].weight.grad.abs().sum() > 0, j


def test_shallow_prompts_keys_and_paths():
    dec = make_decoder(step=2, deep=False)
    keys = [k for k in dec.state_dict() if k.startswith("prompt_embed")]
    assert keys == ["prompt_embed.0.weight", "prompt_embed.1.weight"]
    assert dec.prompt_embed[1].weight.shape == (P, HID)
    deep = make_decoder(step=2, deep=True)
    assert [k for k in deep.state_dict() if k.startswith("prompt_embed.1.")] == [
        f"prompt_embed.1.{l}.weight" for l in range(LAYERS)]
    feats, mf = make_inputs()
    out = dec.train()(feats, mf)
    assert out["pred_logits"].shape[1] == P and len(out["aux_outputs"]) == 1
    sum(v.sum() for v in (out["pred_logits"], out["pred_masks"])).backward()
    assert dec.prompt_embed[1].weight.grad.abs().sum() > 0
    assert dec.prompt_embed[0].weight.grad is None
    with torch.no_grad():
        inf = dec.eval()(feats, mf)
    assert inf["pred_logits"].shape[1] == Q0 + 2 * P


def test_shallow_prompts_full_model():
    cfg, model = tiny_model("CONT.PROMPT_DEEP", "False")
    keys = [k for k in model.state_dict() if k.startswith("sem_seg_head.predictor.prompt_embed")]
    assert keys == [f"sem_seg_head.predictor.prompt_embed.{k}.weight" for k in range(3)]
    initialize_new_step(model)
    freeze_for_prompt_tuning(model, cfg.CONT)
    assert "sem_seg_head.predictor.prompt_embed.2.weight" in trainable_parameter_names(model)
    model.train()
    losses = model(train_inputs(115))
    sum(losses.values()).backward()
    assert model.sem_seg_head.predictor.prompt_embed[2].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 32, 32, dtype=torch.uint8), "height": 32, "width": 32}])
    assert "panoptic_seg" in out[0]


def test_frozen_model_prompt_training_gradients():
    cfg, model = tiny_model()
    initialize_new_step(model)
    freeze_for_prompt_tuning(model, cfg.CONT)
    model.train()
    losses = model(train_inputs(115))
    assert len([k for k in losses if k.startswith("loss_ce")]) == 2  # final + pre-decoder only
    sum(losses.values()).backward()
    pred = model.sem_seg_head.predictor
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    for p in (pred.query_feat.weight, pred.query_embed.weight, *pred.mask_embed.parameters(),
              *pred.transformer_self_attention_layers.parameters()):
        assert p.grad is None
    assert pred.prompt_feat[2].weight.grad.abs().sum() > 0
    assert pred.class_embed.cls[4].layers[2].weight.grad.abs().sum() > 0
    assert pred.class_embed.cls[0].layers[2].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# prompt tuning: initialisation and freezing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("deep_cls", [True, False], ids=["mlp-cls", "linear-cls"])
def test_initialize_new_step(deep, deep_cls):
    dec = make_decoder(step=3, deep=deep, deep_cls=deep_cls)
    old = {k: v.clone() for k, v in dec.state_dict().items()}
    written = initialize_new_step(as_model(dec))
    sd = dec.state_dict()
    assert set(written) <= set(sd)

    mean_q = dec.query_feat.weight.mean(0)
    mean_pos = dec.query_embed.weight.mean(0)
    assert torch.allclose(dec.prompt_feat[2].weight, mean_q.expand(P, -1), atol=1e-6)
    tables = list(dec.prompt_embed[2]) if deep else [dec.prompt_embed[2]]
    assert len(tables) == (LAYERS if deep else 1)
    for t in tables:
        assert torch.allclose(t.weight, mean_pos.expand(P, -1), atol=1e-6)
    for k, v in dec.mask_embed.state_dict().items():
        assert torch.equal(dec.prompt_mask_embed[2].state_dict()[k], v)
    assert not any(k.startswith("prompt_mask_embed.2") and torch.equal(old[k], sd[k]) for k in sd
                   if k.endswith("weight")), "the newest mask head must have changed"

    # older prompt sets, the base model and older class heads are untouched
    for k, v in old.items():
        if k.startswith(("prompt_feat.2", "prompt_embed.2", "prompt_mask_embed.2", "class_embed.cls.4")):
            continue
        assert torch.equal(sd[k], v), k

    # every new-class logit equals the no-object logit, on random inputs
    x = 3 * torch.randn(50, HID)
    logits = dec.class_embed(x)
    new_cols = logits[:, C0 + 2 * CINC: C0 + 3 * CINC]
    torch.testing.assert_close(new_cols, logits[:, -1:].expand(-1, CINC), atol=1e-5, rtol=0)
    assert (logits[:, C0 + CINC] - logits[:, -1]).abs().max() > 1e-3  # older step: not tied


def test_initialize_new_step_needs_step_gt_0():
    with pytest.raises(ValueError):
        initialize_new_step(as_model(make_decoder(step=0, num_prompts=0)))


PRED = "sem_seg_head.predictor."


def _script_trainable(names, step=3, mask_mlp=True, no_obj=False):
    """The freezing rule (docs/design.md#per-step-modules): cls[0] + cls[t+1] + prompt_feat[t-1] + prompt_embed[t-1] + prompt_mask_embed[t-1]."""
    k = step - 1
    prefixes = [f"{PRED}class_embed.cls.{step + 1}.", f"{PRED}prompt_feat.{k}.", f"{PRED}prompt_embed.{k}."]
    prefixes.append(f"{PRED}class_embed.cls.0." if not no_obj else f"{PRED}prompt_no_obj_embed.{k}.")
    if mask_mlp:
        prefixes.append(f"{PRED}prompt_mask_embed.{k}.")
    return {n for n in names if n.startswith(tuple(prefixes))}


@pytest.fixture(scope="module")
def script_model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return cfg, build_model(cfg)


def _trainable_after(model, cfg, **flags):
    cont = cfg.CONT.clone()
    cont.defrost()
    for k, v in flags.items():
        setattr(cont, k, v)
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_for_prompt_tuning(model, cont)
    return set(trainable_parameter_names(model))


def test_freeze_script_flags(script_model):
    cfg, model = script_model
    names = [n for n, _ in model.named_parameters()]
    trainable = _trainable_after(model, cfg)
    expected = _script_trainable(names)
    assert trainable == expected
    # the hand-written list of the freezing rule for step 3 (3 decoder layers)
    listed = {f"{PRED}prompt_feat.2.weight"} | {f"{PRED}prompt_embed.2.{l}.weight" for l in range(3)}
    listed |= {f"{PRED}{h}.layers.{i}.{w}" for h in ("class_embed.cls.0", "class_embed.cls.4",
                                                     "prompt_mask_embed.2")
               for i in range(3) for w in ("weight", "bias")}
    assert trainable == listed
    # parameter count formula of 1.8 with D = 64, Cinc = 5, P = 4, L = 3
    D, cinc, p, L = 64, 5, 4, 3
    count = (2 * (D * D + D) + D + 1) + (2 * (D * D + D) + (D + 1) * cinc) + p * D + L * p * D + 3 * (D * D + D)
    assert sum(q.numel() for q in model.parameters() if q.requires_grad) == count


@pytest.mark.parametrize("flag,extra", [
    ("BACKBONE_FREEZE", "backbone."),
    ("PIXEL_DECODER_FREEZE", "sem_seg_head.pixel_decoder."),
    ("CLS_HEAD_FREEZE", PRED + "class_embed."),
    ("QUERY_EMBED_FREEZE", (PRED + "query_feat.", PRED + "query_embed.")),
    ("MASK_HEAD_FREEZE", None),  # re-frozen by PROMPT_MASK_MLP
])
def test_freeze_flag_false_adds_modules(script_model, flag, extra):
    cfg, model = script_model
    names = [n for n, _ in model.named_parameters()]
    base = _script_trainable(names)
    trainable = _trainable_after(model, cfg, **{flag: False})
    added = {n for n in names if extra and n.startswith(extra)}
    assert trainable == base | added
    if extra:
        assert added and not added <= base


def test_mask_head_unfrozen_without_prompt_mask_mlp():
    torch.manual_seed(0)
    cfg = tiny_cfg("CONT.PROMPT_MASK_MLP", "False")
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any(".prompt_mask_embed." in n for n in names)
    base = _script_trainable(names, mask_mlp=False)
    assert _trainable_after(model, cfg) == base
    mask = {n for n in names if n.startswith(PRED + "mask_embed.")}
    assert _trainable_after(model, cfg, MASK_HEAD_FREEZE=False) == base | mask


def test_prompt_no_obj_mlp_refreezes_shared_no_object_head():
    torch.manual_seed(0)
    cfg = tiny_cfg("CONT.PROMPT_NO_OBJ_MLP", "True")
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    trainable = _trainable_after(model, cfg)
    assert trainable == _script_trainable(names, no_obj=True)
    assert not any(n.startswith(PRED + "class_embed.cls.0.") for n in trainable)
    assert {f"{PRED}prompt_no_obj_embed.2.layers.2.weight"} <= trainable
    # CLS_HEAD_FREEZE False unfreezes all class heads, but cls[0] is then re-frozen
    trainable = _trainable_after(model, cfg, CLS_HEAD_FREEZE=False)
    assert f"{PRED}class_embed.cls.1.layers.0.weight" in trainable
    assert not any(n.startswith(PRED + "class_embed.cls.0.") for n in trainable)


def test_trans_decoder_freeze_false_raises(script_model):
    cfg, model = script_model
    with pytest.raises(ValueError, match="CONT.TRANS_DECODER_FREEZE"):
        _trainable_after(model, cfg, TRANS_DECODER_FREEZE=False)


def test_freeze_needs_prompts():
    torch.manual_seed(0)
    cfg = tiny_cfg("CONT.TASK", "0", "CONT.NUM_PROMPTS", "0")
    model = build_model(cfg)
    with pytest.raises(ValueError):
        freeze_for_prompt_tuning(model, cfg.CONT)
