"""The distillation baselines in the trainer and the other compatibility keys: every official
CONT key (and MASK_BG) either acts or stops the run; the teacher (built from the weights a step
starts from, frozen, never saved); weight aligning; the cosine classifier; the background class.
The end-to-end tests (train_continual.py and the scenario script with METHOD) are slow."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import mask2former  # noqa: F401
from conftest import REPO, build_cfg
from continual.compat import (DIST_INERT_KEYS, INERT_KEYS, UnsupportedKeyError, WeightAligningHook, align_weights,
                              check_continual_keys)
from continual.distillation import (DistillationStep, build_teacher, needs_teacher, setup_distillation,
                                    teacher_config, uses_distillation)
from mask2former.data.datasets.synthetic import render_sample, sample_to_model_input
from mask2former.modeling.transformer_decoder.classifier import COSINE_SCALE, IncrementalClassifier
from script_runner import generate_synthetic_root, run_command, script_env, train_command

TINY = REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml"
SMALL = ["MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"]
COMFORMER = ["CONT.DIST.PSEUDO", "True", "CONT.DIST.KD_WEIGHT", "10.0", "CONT.DIST.UKD", "True",
             "CONT.DIST.KD_REW", "True"]


def _cfg(*opts):
    return build_cfg(TINY, SMALL + list(opts))


def _baseline(step=1, *opts):
    return _cfg("CONT.TASK", str(step), "CONT.NUM_PROMPTS", "0", *opts)


def _batch(seed, classes, n=2, size=64):
    rng = np.random.default_rng(seed)
    return [sample_to_model_input(*render_sample(rng, size, size), classes=classes) for _ in range(n)]


# ------------------------------------------------------------------ every CONT key acts or stops
def _cont_keys(node, prefix="CONT."):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _cont_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


# How each CONT key acts when set to a non-default value (this table is the audit: a new key
# fails test_every_cont_key_is_accounted_for until it is listed here with its test).
ACTS = {
    # protocol and ECLIPSE keys, tested in their own test files
    "CONT.BASE_CLS": "scenario", "CONT.INC_CLS": "scenario", "CONT.ORDER": "scenario",
    "CONT.ORDER_NAME": "run name", "CONT.TASK": "scenario", "CONT.WEIGHTS": "start weights",
    "CONT.MODE": "scenario", "CONT.USE_BIAS": "class heads", "CONT.NUM_PROMPTS": "prompt banks",
    "CONT.SOFTCLS": "class scores", "CONT.BACKBONE_FREEZE": "freezing", "CONT.CLS_HEAD_FREEZE": "freezing",
    "CONT.MASK_HEAD_FREEZE": "freezing", "CONT.PIXEL_DECODER_FREEZE": "freezing",
    "CONT.QUERY_EMBED_FREEZE": "freezing", "CONT.TRANS_DECODER_FREEZE": "stops when False",
    "CONT.PROMPT_DEEP": "prompt banks", "CONT.PROMPT_MASK_MLP": "prompt banks",
    "CONT.PROMPT_NO_OBJ_MLP": "prompt banks", "CONT.DEEP_CLS": "class heads",
    "CONT.LOGIT_MANI_DELTAS": "inference", "CONT.PROMPT_SUPERVISE_ALL_LAYERS": "aux outputs",
    "CONT.COCO_CORRECT_IDS": "labels", "CONT.OVERWRITE": "finished steps", "CONT.RESULTS_DIR": "csv folder",
    "CONT.JOINT": "joint upper bound",
    # the compatibility keys, tested below
    "CONT.COSINE": "cosine classifier", "CONT.WA_STEP": "weight aligning", "CONT.INC_QUERY": "no effect",
    **{f"CONT.DIST.{k}": "distillation loss" for k in ("POD_WEIGHT", "KD_WEIGHT", "ALPHA", "UCE", "UKD", "L2",
                                                        "KD_REW", "KD_DEEP", "PSEUDO", "PSEUDO_THRESHOLD",
                                                        "MASK_KD")},
    **{f"CONT.DIST.{k}": "no effect" for k in DIST_INERT_KEYS},
}


def test_every_cont_key_is_accounted_for():
    keys = set(_cont_keys(_cfg().CONT))
    assert keys == set(ACTS), (sorted(keys - set(ACTS)), sorted(set(ACTS) - keys))
    assert {k for k, v in ACTS.items() if v == "no effect"} == set(INERT_KEYS)


@pytest.mark.parametrize("key, value", [
    ("CONT.DIST.KD_WEIGHT", "1.0"), ("CONT.DIST.UCE", "True"), ("CONT.DIST.PSEUDO", "True"),
    ("CONT.DIST.POD_WEIGHT", "0.01"), ("CONT.DIST.MASK_KD", "1.0"), ("CONT.DIST.ALPHA", "2.0"),
    ("CONT.DIST.UKD", "True"), ("CONT.DIST.L2", "True"), ("CONT.DIST.KD_REW", "True"), ("CONT.DIST.KD_DEEP", "True"),
    ("CONT.DIST.PSEUDO_THRESHOLD", "0.5"),
])
def test_distillation_keys_stop_at_step0_and_with_prompts(key, value):
    with pytest.raises(UnsupportedKeyError, match=key.replace(".", r"\.") + ".*step 0"):
        check_continual_keys(_cfg(key, value))
    with pytest.raises(UnsupportedKeyError, match=key.replace(".", r"\.") + ".*CONT.NUM_PROMPTS 0"):
        check_continual_keys(_cfg("CONT.TASK", "1", "CONT.NUM_PROMPTS", "4", key, value))
    assert check_continual_keys(_baseline(1, key, value)) == []


@pytest.mark.parametrize("key, value", [("CONT.INC_QUERY", "True")] + [
    (f"CONT.DIST.{k}", v) for k, v in zip(DIST_INERT_KEYS, ("1", "0.7", "True", "True", "1.5"))])
def test_keys_without_official_effect_are_accepted_with_a_warning(key, value):
    warnings = check_continual_keys(_baseline(1, key, value))
    assert len(warnings) == 1 and key in warnings[0] and "no effect" in warnings[0]
    # and they change nothing in the model
    a, b = build_model(_baseline(1)), build_model(_baseline(1, key, value))
    assert a.state_dict().keys() == b.state_dict().keys()


@pytest.mark.parametrize("opts, match", [
    (["CONT.WA_STEP", "1", "CONT.DEEP_CLS", "True"], "CONT.WA_STEP.*CONT.DEEP_CLS False"),
    (["CONT.WA_STEP", "1", "CONT.COSINE", "True", "CONT.DEEP_CLS", "False"], "CONT.WA_STEP.*CONT.COSINE"),
    (["CONT.COSINE", "True", "CONT.DEEP_CLS", "True"], "CONT.COSINE.*CONT.DEEP_CLS False"),
    (["MODEL.MASK_FORMER.TEST.MASK_BG", "True"], "MASK_BG True without SEMANTIC_ON.*MASK_BG False"),
    (["MODEL.MASK_FORMER.TEST.MASK_BG", "True", "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "True"],
     "MASK_BG True with SEMANTIC_ON.*panoptic"),
])
def test_unsupported_combinations_stop_with_the_key_and_the_fix(opts, match):
    with pytest.raises(UnsupportedKeyError, match=match):
        check_continual_keys(_baseline(1, *opts))


def test_the_trainer_and_train_continual_check_the_keys():
    res = subprocess.run([sys.executable, str(REPO / "train_continual.py"), "--config-file", str(TINY),
                          "CONT.TASK", "1", "CONT.NUM_PROMPTS", "4", "CONT.DIST.KD_WEIGHT", "1.0",
                          "OUTPUT_DIR", "/nonexistent/never-written"],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    # refused before anything is written, with the key and the fix
    assert res.returncode == 1 and "CONT.DIST.KD_WEIGHT" in res.stderr and "CONT.NUM_PROMPTS 0" in res.stderr
    assert not os.path.exists("/nonexistent/never-written")


# ------------------------------------------------------------------ cosine classifier
def test_cosine_classifier_is_bias_free_and_scaled():
    torch.manual_seed(0)
    head = IncrementalClassifier([1, 3, 2], 8, deep=False, cosine=True)
    assert [n for n, _ in head.named_parameters()] == ["cls.0.weight", "cls.1.weight", "cls.2.weight"]
    x = torch.randn(2, 5, 8)
    logits = head(x)
    xn = x / x.norm(dim=1, keepdim=True)  # the official normalisation axis: queries
    w = torch.cat([head.cls[1].weight, head.cls[2].weight, head.cls[0].weight])
    expected = COSINE_SCALE * xn @ (w / w.norm(dim=1, keepdim=True)).T
    assert logits.shape == (2, 5, 6) and torch.allclose(logits, expected, atol=1e-5)
    # the scale of a weight row changes nothing
    with torch.no_grad():
        head.cls[2].weight.mul_(7.0)
    assert torch.allclose(head(x), logits, atol=1e-5)


def test_cosine_key_builds_the_cosine_classifier_and_trains():
    model = build_model(_baseline(1, "CONT.COSINE", "True", "CONT.DEEP_CLS", "False"))
    heads = model.sem_seg_head.predictor.class_embed
    assert heads.cosine and all(h.bias is None for h in heads.cls)
    model.train()
    losses = model(_batch(0, classes={7, 8}))
    assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------ weight aligning
def test_weight_aligning_rescales_the_newest_head_every_100_iterations():
    torch.manual_seed(0)
    head = IncrementalClassifier([1, 4, 2, 2], 8, deep=False)
    with torch.no_grad():
        head.cls[3].weight.mul_(5.0)
    old_norm = torch.cat([head.cls[1].weight, head.cls[2].weight]).norm(dim=1).mean()
    before = {i: h.weight.detach().clone() for i, h in enumerate(head.cls)}
    bias = head.cls[3].bias.detach().clone()

    class FakeTrainer:
        iter = 0

        class storage:
            @staticmethod
            def put_scalar(*args, **kwargs):
                pass

    hook = WeightAligningHook(head)
    hook.trainer = FakeTrainer()
    for it in (1, 50, 99):
        FakeTrainer.iter = it
        hook.after_step()
    assert torch.equal(head.cls[3].weight, before[3])  # only multiples of 100
    FakeTrainer.iter = 100
    hook.after_step()
    assert torch.allclose(head.cls[3].weight.norm(dim=1).mean(), old_norm, atol=1e-5)
    for i in (0, 1, 2):
        assert torch.equal(head.cls[i].weight, before[i])
    assert torch.equal(head.cls[3].bias, bias)
    assert align_weights(IncrementalClassifier([1, 4], 8, deep=False)) == 1.0  # step 0: nothing to align


# ------------------------------------------------------------------ background class (MASK_BG)
def test_mask_bg_with_semantic_inference_adds_a_background_class():
    semantic = ["MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "True"]
    plain = build_model(_cfg(*semantic, "MODEL.MASK_FORMER.TEST.MASK_BG", "False"))
    bg = build_model(_cfg(*semantic, "MODEL.MASK_FORMER.TEST.MASK_BG", "True"))
    assert plain.sem_seg_head.predictor.class_embed.num_classes == 6
    assert bg.sem_seg_head.predictor.class_embed.num_classes == 7 and not bg.shift_labels
    assert bg.criterion.num_classes == 7
    bg.eval()
    with torch.no_grad():
        out = bg([{"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "height": 64, "width": 64}])
    assert out[0]["sem_seg"].shape[0] == 7  # background + 6 classes, as the evaluator expects


def test_background_target_from_the_remapped_semantic_map():
    from detectron2.structures import BitMasks, Instances

    from continual.data import ContinualMapper

    sem = torch.tensor([[0, 0, 3], [5, 255, 3]])
    inst = Instances((2, 3))
    inst.gt_classes = torch.tensor([3, 5])
    inst.gt_masks = BitMasks(torch.stack([sem == 3, sem == 5]))
    lut = np.zeros(256, dtype=np.int64)
    lut[3], lut[255] = 1, 255  # class 3 -> position 1; 5 is an old class -> 0
    out = ContinualMapper(lambda d: {"sem_seg": sem.clone(), "instances": inst}, lut, background=True)({})
    assert out["instances"].gt_classes.tolist() == [0, 1]
    assert out["instances"].gt_masks.tensor[0].tolist() == [[True, True, False], [True, False, False]]
    plain = ContinualMapper(lambda d: {"sem_seg": sem.clone(), "instances": inst}, lut)({})
    assert plain["instances"].gt_classes.tolist() == [1]


# ------------------------------------------------------------------ the teacher
@pytest.fixture(scope="module")
def step0_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(_cfg())
    path = tmp_path_factory.mktemp("w") / "step0.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_teacher_is_the_previous_step_frozen_and_returns_the_training_layout(step0_weights):
    cfg = _baseline(1, *COMFORMER, "CONT.DIST.POD_WEIGHT", "0.01", "CONT.DIST.KD_DEEP", "True")
    assert teacher_config(cfg).CONT.TASK == 0 and needs_teacher(cfg)
    teacher = build_teacher(cfg, step0_weights)
    state = torch.load(step0_weights, weights_only=True)["model"]
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    outputs, features = teacher(torch.zeros(2, 3, 64, 64))
    assert outputs["pred_logits"].shape == (2, 16, 7) and outputs["pred_masks"].shape == (2, 16, 16, 16)
    assert len(outputs["aux_outputs"]) == 3 and outputs["features"].shape[-2:] == (16, 16)
    assert set(features) >= {"res2", "res3", "res4", "res5"}


def test_teacher_keys_must_match_exactly(step0_weights, tmp_path):
    state = torch.load(step0_weights, weights_only=True)["model"]
    state.pop("sem_seg_head.predictor.query_feat.weight")
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="query_feat"):
        build_teacher(_baseline(1, *COMFORMER), str(tmp_path / "broken.pth"))


def test_baseline_step_trains_with_the_teacher_and_saves_no_teacher(step0_weights):
    cfg = _baseline(1, *COMFORMER, "CONT.DIST.POD_WEIGHT", "0.01")
    model = build_model(cfg)
    before = set(model.state_dict())
    step = setup_distillation(cfg, model, step0_weights)
    assert isinstance(step, DistillationStep) and step.teacher is not None
    assert set(model.state_dict()) == before  # the teacher is not part of the student
    model.train()
    losses = model(_batch(0, classes={7, 8}))
    assert {"loss_ce", "loss_kd", "loss_pod", "loss_kd_0"} - set(losses) == {"loss_kd_0"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert not any(p.grad is not None for p in step.teacher.model.parameters())
    # fine-tuning (every DIST key at its default) keeps the model's criterion
    assert not uses_distillation(_baseline(1)) and setup_distillation(_baseline(1), build_model(_baseline(1)), "") is None


# ------------------------------------------------------------------ end to end (slow)
E2E_SMALL = SMALL + ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
TASK = "syn-pan_6-2-ov"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_synthetic_root(tmp_path_factory.mktemp("d2data"))


def _train(data_root, out, name, *opts, resume=False):
    flags = ["--resume"] if resume else []
    return run_command(train_command(out, name, *E2E_SMALL, *opts, flags=flags, config=TINY), script_env(data_root))


@pytest.mark.slow
def test_baseline_step_end_to_end_with_resume(data_root, tmp_path):
    linear = ["CONT.DEEP_CLS", "False"]  # weight aligning needs Linear class heads
    _train(data_root, tmp_path, "base", "SOLVER.MAX_ITER", "3", *linear)
    step0 = str(tmp_path / TASK / "base" / "step0" / "model_final.pth")
    opts = ["CONT.TASK", "1", "CONT.NUM_PROMPTS", "0", "CONT.WEIGHTS", step0, *COMFORMER, *linear,
            "CONT.WA_STEP", "1", "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "2"]
    res = _train(data_root, tmp_path, "straight", *opts)
    assert "teacher of step 1: the step 0 model from " + step0 in res.stdout + res.stderr
    _train(data_root, tmp_path, "interrupted", *opts)
    step_dir = tmp_path / TASK / "interrupted" / "step1"
    os.remove(step_dir / "model_final.pth")
    (step_dir / "last_checkpoint").write_text("model_0000003.pth")
    res = _train(data_root, tmp_path, "interrupted", *opts, resume=True)
    text = res.stdout + res.stderr
    # resumed from the step's own checkpoint, teacher still the step-0 model
    assert "resumed step 1" in text and "teacher of step 1: the step 0 model from " + step0 in text
    a = torch.load(tmp_path / TASK / "straight" / "step1" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(step_dir / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the official layout: the step-1 model of a fine-tuning run, no teacher entries
    layout = build_model(_baseline(1, *linear)).state_dict()
    assert set(a) == set(layout) and all(a[k].shape == layout[k].shape for k in a)


@pytest.mark.slow
def test_scenario_script_runs_comformer(data_root, tmp_path):
    _train(data_root, tmp_path, "base", "SOLVER.MAX_ITER", "3")
    step0 = tmp_path / TASK / "base" / "step0" / "model_final.pth"
    extra = " ".join(E2E_SMALL + ["CONT.RESULTS_DIR", str(tmp_path / "results")])
    env = script_env(data_root, METHOD="comformer", RUN_STEP0=0, STEP0_WEIGHTS=step0, OUTPUT_ROOT=tmp_path,
               BASELINE_ITERS=2, EXTRA_ARGS=extra)
    settings = subprocess.run(["bash", str(REPO / "script" / "synthetic" / "6_2.sh")], cwd=REPO, capture_output=True,
                              text=True, env=dict(env, PRINT_SETTINGS="1"))
    assert "CONT.NUM_PROMPTS 0" in settings.stdout and "CONT.DIST.UKD True" in settings.stdout
    assert "NAME=syn_6_2_comformer" in settings.stdout
    run_command(["bash", str(REPO / "script" / "synthetic" / "6_2.sh")], env)
    run = tmp_path / TASK / "syn_6_2_comformer"
    for step in (1, 2):
        assert (run / f"step{step}" / "model_final.pth").is_file()
        config = (run / f"step{step}" / "config.yaml").read_text()
        assert "KD_WEIGHT: 10.0" in config and "NUM_PROMPTS: 0" in config
    bad = subprocess.run(["bash", str(REPO / "script" / "synthetic" / "6_2.sh")], cwd=REPO, capture_output=True,
                         text=True, env=dict(env, METHOD="icarl"))
    assert bad.returncode != 0 and "unknown METHOD=icarl" in bad.stderr


@pytest.mark.slow
def test_ade_panoptic_script_runs_a_baseline_on_the_official_layout(tmp_path):
    from script_runner import generate_official_layouts, run_script

    root = generate_official_layouts(tmp_path / "data")
    out = tmp_path / "out"
    res = run_script("ade_ps/100_50.sh", root, out, METHOD="comformer", RUN_STEP0=1, LAST_STEP=1, RUN_EVAL=0)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = out / "mya-pan_100-50-ov" / "adps_100_50_comformer"
    assert (run / "step0" / "model_final.pth").is_file() and (run / "step1" / "model_final.pth").is_file()
    config = (run / "step1" / "config.yaml").read_text()
    assert "NUM_PROMPTS: 0" in config and "UKD: true" in config and "BASE_LR: 5.0e-05" in config
    assert "teacher of step 1: the step 0 model" in (run / "step1" / "log.txt").read_text()
