"""The YAML files under configs/ load, and resolve to the official configurations.

The reference fixtures (tests/fixtures/*/) store, next to their tensors, the configuration the
official implementation resolved from its own YAML file plus a list of command-line overrides
(``manifest.json["config_file"]`` and ``["opts"]``; ``config.yaml`` is the full dump). Applying the
same overrides to *our* file of the same name must give the same configuration, key by key.
"""
import json
from pathlib import Path

import pytest
import yaml

from continual.config import setup_cfg, setup_continual_names

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FIXTURES = REPO / "tests" / "fixtures"

ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml"))
FIXTURE_DIRS = sorted(
    d for d in FIXTURES.iterdir() if (d / "manifest.json").is_file() and (d / "config.yaml").is_file()
)
KEY_FILES = sorted((FIXTURES / "keys").glob("*.json"))

# Keys whose resolved value may legitimately differ from the official dump, and why.
ALLOWED_DIFFERENCES = {
    # The fixtures were generated on a CPU-only machine, which set MODEL.DEVICE to "cpu" outside
    # the YAML files and overrides; the config files keep detectron2's default ("cuda").
    "MODEL.DEVICE",
}
# Allowed only at steps > 0: the official trainer's set-up (not its YAML files) points
# MODEL.WEIGHTS at the previous step's model_final.pth; here the trainer does that when it runs.
ALLOWED_DIFFERENCES_AFTER_STEP0 = {"MODEL.WEIGHTS"}


def load_config(path, opts=()):
    """Build a config the way the entry points do (continual.config.setup_cfg)."""
    return setup_cfg(path, opts)


def resolved_official(manifest):
    """Our config file of the official name, with the official overrides and derived names."""
    path = REPO / manifest["config_file"]
    assert path.is_file(), f"missing config file {manifest['config_file']} (official name)"
    cfg = load_config(path, manifest["opts"])
    setup_continual_names(cfg)
    return cfg


def flatten(tree, prefix=""):
    """``{"A": {"B": 1}}`` -> ``{"A.B": 1}``; tuples become lists so YAML dumps compare equal."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def same_value(a, b):
    # bool is an int in Python: keep True from matching 1
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def default_values():
    """Every key this project defines, at its default value."""
    return flatten(yaml.safe_load(setup_cfg().dump()))


def differences(ours, official, allowed=ALLOWED_DIFFERENCES):
    """Human-readable list of keys that are missing on one side or have different values.

    A key that only this project defines (a switch for corrected behaviour, say) is accepted
    when it holds its default value, which must reproduce the official behaviour.
    """
    defaults = default_values()
    problems = []
    for key in sorted(set(ours) | set(official)):
        if key in allowed:
            continue
        if key not in official:
            if key not in defaults or not same_value(ours[key], defaults[key]):
                problems.append(f"{key}: only in ours ({ours[key]!r}) and not at its default")
        elif key not in ours:
            problems.append(f"{key}: missing in ours (official {official[key]!r})")
        elif not same_value(ours[key], official[key]):
            problems.append(f"{key}: ours {ours[key]!r} != official {official[key]!r}")
    return problems


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_loads(path):
    cfg = load_config(path)
    # every ECLIPSE config defines a class order and at least one training set
    assert len(cfg.CONT.ORDER) > 0
    assert len(cfg.DATASETS.TRAIN) > 0
    # a class order is a list of distinct dataset ids
    assert len(set(cfg.CONT.ORDER)) == len(cfg.CONT.ORDER)


def test_every_expected_config_exists():
    expected = [
        "ade20k/panoptic-segmentation/Base-ADE20K-PanopticSegmentation.yaml",
        "ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml",
        "ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml",
        "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml",
        "ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml",
        "coco/panoptic-segmentation/Base-COCO-PanopticSegmentation.yaml",
        "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml",
        "coco/panoptic-segmentation/continual_c.yaml",
        "synthetic/maskformer2_R18_tiny.yaml",
        # class orders (the official ECLIPSE file names)
        "ade20k/panoptic-segmentation/continual.yaml",
        *[f"ade20k/panoptic-segmentation/continual_{o}.yaml" for o in "bcdefghij"],
        "ade20k/semantic-segmentation/maskformer2_R101_bs16_90k_b.yaml",
        # other backbones
        "ade20k/panoptic-segmentation/maskformer2_R101_bs16_160k.yaml",
        "coco/panoptic-segmentation/maskformer2_R101_bs16_50ep.yaml",
        *[f"{d}/swin/maskformer2_swin_{s}.yaml" for d, names in [
            ("ade20k/panoptic-segmentation", ["tiny_bs16_160k", "small_bs16_160k", "base_384_bs16_160k",
                                              "base_IN21k_384_bs16_160k", "large_IN21k_384_bs16_160k"]),
            ("ade20k/semantic-segmentation", ["tiny_bs16_160k", "small_bs16_160k", "base_384_bs16_160k_res640",
                                              "base_IN21k_384_bs16_160k_res640",
                                              "large_IN21k_384_bs16_160k_res640"]),
            ("coco/panoptic-segmentation", ["tiny_bs16_50ep", "small_bs16_50ep", "base_384_bs16_50ep",
                                            "base_IN21k_384_bs16_50ep", "large_IN21k_384_bs16_100ep"]),
        ] for s in names],
    ]
    missing = [name for name in expected if not (CONFIGS / name).is_file()]
    assert not missing, missing


@pytest.mark.parametrize("fixture", FIXTURE_DIRS, ids=lambda d: d.name)
def test_resolves_to_official_config(fixture):
    manifest = json.loads((fixture / "manifest.json").read_text())
    ours = flatten(yaml.safe_load(resolved_official(manifest).dump()))
    official = flatten(yaml.safe_load((fixture / "config.yaml").read_text()))
    allowed = set(ALLOWED_DIFFERENCES)
    if official["CONT.TASK"] > 0:
        allowed |= ALLOWED_DIFFERENCES_AFTER_STEP0
    problems = differences(ours, official, allowed)
    assert not problems, f"{fixture.name}: {len(problems)} differences:\n" + "\n".join(problems)


# The "cfg" summaries in manifest.json and keys/*.json: summary name -> config key.
SUMMARY_KEYS = {
    "TASK_NAME": "TASK_NAME",
    "CONT_TASK": "CONT.TASK",
    **{k: f"CONT.{k}" for k in [
        "BASE_CLS", "INC_CLS", "NUM_PROMPTS", "PROMPT_DEEP", "PROMPT_MASK_MLP",
        "PROMPT_NO_OBJ_MLP", "DEEP_CLS", "SOFTCLS", "LOGIT_MANI_DELTAS", "BACKBONE_FREEZE",
        "CLS_HEAD_FREEZE", "MASK_HEAD_FREEZE", "PIXEL_DECODER_FREEZE", "QUERY_EMBED_FREEZE",
        "TRANS_DECODER_FREEZE",
    ]},
    "RESNETS_DEPTH": "MODEL.RESNETS.DEPTH",
    "RESNETS_NORM": "MODEL.RESNETS.NORM",
    **{k: f"MODEL.MASK_FORMER.{k}" for k in [
        "HIDDEN_DIM", "NUM_OBJECT_QUERIES", "NHEADS", "DIM_FEEDFORWARD", "DEC_LAYERS", "SOFTMASK",
        "FOCAL", "PER_PIXEL", "CLASS_WEIGHT", "MASK_WEIGHT", "DICE_WEIGHT", "NO_OBJECT_WEIGHT",
        "FOCAL_ALPHA", "FOCAL_GAMMA", "TRAIN_NUM_POINTS", "OVERSAMPLE_RATIO",
        "IMPORTANCE_SAMPLE_RATIO", "SIZE_DIVISIBILITY",
    ]},
    **{k: f"MODEL.SEM_SEG_HEAD.{k}" for k in ["CONVS_DIM", "MASK_DIM", "TRANSFORMER_ENC_LAYERS"]},
    **{k: f"MODEL.MASK_FORMER.TEST.{k}" for k in [
        "SEMANTIC_ON", "PANOPTIC_ON", "INSTANCE_ON", "MASK_BG", "OBJECT_MASK_THRESHOLD",
        "OVERLAP_THRESHOLD",
    ]},
    "PIXEL_MEAN": "MODEL.PIXEL_MEAN",
    "PIXEL_STD": "MODEL.PIXEL_STD",
    "DATASETS_TRAIN": "DATASETS.TRAIN",
    "DETECTIONS_PER_IMAGE": "TEST.DETECTIONS_PER_IMAGE",
}
# Summary entries that describe the built model rather than a config key (checked by model tests).
SUMMARY_DERIVED = {
    "classes", "decoder_num_layers(DEC_LAYERS-1)", "decoder_num_classes", "decoder_classes",
    "decoder_deltas_effective", "model_num_classes(sem_seg_head)",
}


@pytest.mark.parametrize(
    "path",
    KEY_FILES + [d / "manifest.json" for d in FIXTURE_DIRS],
    ids=lambda p: str(p.relative_to(FIXTURES)),
)
def test_matches_official_summary(path):
    record = json.loads(path.read_text())
    ours = flatten(yaml.safe_load(resolved_official(record).dump()))
    unknown = set(record["cfg"]) - set(SUMMARY_KEYS) - SUMMARY_DERIVED
    assert not unknown, f"summary entries this test does not know: {sorted(unknown)}"
    problems = []
    for name, key in SUMMARY_KEYS.items():
        if name not in record["cfg"]:
            continue
        expected = record["cfg"][name]
        if not same_value(ours[key], expected):
            problems.append(f"{name} ({key}): ours {ours[key]!r} != official {expected!r}")
    assert not problems, "\n".join(problems)


def test_coco_order_c_is_a_permutation():
    cfg = load_config(CONFIGS / "coco/panoptic-segmentation/continual_c.yaml")
    assert sorted(cfg.CONT.ORDER) == list(range(1, 134))
    assert list(cfg.CONT.ORDER[:10]) == [1, 3, 10, 47, 58, 9, 88, 16, 126, 120]
    assert cfg.CONT.ORDER_NAME == "c"


def test_synthetic_config_is_cpu_sized():
    cfg = load_config(CONFIGS / "synthetic/maskformer2_R18_tiny.yaml")
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.MODEL.WEIGHTS == ""  # nothing is downloaded
    assert cfg.MODEL.RESNETS.DEPTH == 18
    assert cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON
    assert cfg.CONT.NUM_PROMPTS == 0  # step 0 needs no prompts
    assert not cfg.WANDB
    assert cfg.DATALOADER.NUM_WORKERS == 0
    assert tuple(cfg.DATASETS.TRAIN) == ("synthetic_panoptic_train",)
    assert tuple(cfg.DATASETS.TEST) == ("synthetic_panoptic_val",)
    # the class order covers whole steps: BASE_CLS + k * INC_CLS classes
    extra = len(cfg.CONT.ORDER) - cfg.CONT.BASE_CLS
    assert extra > 0 and extra % cfg.CONT.INC_CLS == 0


# The first and last three ids of each official ADE20K class order (the full lists are in the files).
ADE_ORDER_ENDS = {
    "b": ([74, 19, 119], [15, 93, 103]), "c": ([5, 94, 118], [86, 93, 120]),
    "d": ([7, 51, 41], [32, 102, 115]), "e": ([143, 83, 26], [138, 140, 97]),
    "f": ([144, 97, 1], [111, 101, 120]), "g": ([58, 65, 28], [31, 133, 86]),
    "h": ([76, 133, 46], [27, 147, 49]), "i": ([51, 50, 81], [22, 78, 134]),
    "j": ([109, 6, 73], [46, 99, 60]),
}


@pytest.mark.parametrize("name", sorted(ADE_ORDER_ENDS))
def test_ade_panoptic_orders_are_permutations_with_their_name(name):
    cfg = load_config(CONFIGS / f"ade20k/panoptic-segmentation/continual_{name}.yaml")
    assert sorted(cfg.CONT.ORDER) == list(range(1, 151))
    head, tail = ADE_ORDER_ENDS[name]
    assert list(cfg.CONT.ORDER[:3]) == head and list(cfg.CONT.ORDER[-3:]) == tail
    assert cfg.CONT.ORDER_NAME == name
    # only the order differs from the R50 config
    plain = flatten(yaml.safe_load(load_config(CONFIGS / "ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml").dump()))
    ours = flatten(yaml.safe_load(cfg.dump()))
    assert {k for k in ours if ours[k] != plain[k]} == {"CONT.ORDER", "CONT.ORDER_NAME"}


def test_ade_identity_order_and_semantic_order_b():
    ident = load_config(CONFIGS / "ade20k/panoptic-segmentation/continual.yaml")
    assert list(ident.CONT.ORDER) == list(range(1, 151)) and ident.CONT.ORDER_NAME is None
    sem_b = load_config(CONFIGS / "ade20k/semantic-segmentation/maskformer2_R101_bs16_90k_b.yaml")
    pan_b = load_config(CONFIGS / "ade20k/panoptic-segmentation/continual_b.yaml")
    assert list(sem_b.CONT.ORDER) == list(pan_b.CONT.ORDER) and sem_b.CONT.ORDER_NAME == "b"
    assert sem_b.MODEL.RESNETS.DEPTH == 101 and sem_b.MODEL.RESNETS.NORM == "SyncBN"
    setup_continual_names(sem_b)
    assert sem_b.TASK_NAME.endswith("-b")
