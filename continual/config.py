"""``CONT.*`` config keys of the continual protocol and the run-name derivation.

Keys and defaults are those of the official ECLIPSE implementation (ECLIPSE_SPEC.md 2.1 and
2.3), including the CoMFormer options ECLIPSE does not use, so that official command lines are
accepted unchanged.
"""
import os
import sys

from detectron2.config import CfgNode as CN

__all__ = ["add_continual_config", "task_name", "step_output_dir", "setup_continual_names", "merge_config"]


def add_continual_config(cfg: CN) -> None:
    """Add ``CONT.*``, ``WANDB``, ``NAME``, ``TASK_NAME`` and ``OUTPUT_ROOT`` to ``cfg`` in place."""
    # Weights & Biases logging; off by default here (the official default is True, and every
    # official script passes WANDB False). Needs the optional `wandb` package.
    cfg.WANDB = False
    cfg.NAME = "Exp"
    # derived from the other keys by `setup_continual_names`; present so resolved configs load
    cfg.TASK_NAME = ""
    cfg.OUTPUT_ROOT = ""

    c = cfg.CONT = CN()
    c.BASE_CLS = 15
    c.INC_CLS = 5
    c.ORDER = list(range(1, 21))
    c.ORDER_NAME = None
    c.TASK = 0
    c.WEIGHTS = None
    c.MODE = "overlap"  # "overlap" | "disjoint" | "sequential"
    c.INC_QUERY = False
    c.COSINE = False
    c.USE_BIAS = True
    c.WA_STEP = 0

    # CoMFormer / MiB / PLOP distillation options; accepted but unused by ECLIPSE
    d = c.DIST = CN()
    d.POD_WEIGHT = 0.0
    d.KD_WEIGHT = 0.0
    d.ALPHA = 1.0
    d.UCE = False
    d.UKD = False
    d.L2 = False
    d.KD_REW = False
    d.KD_DEEP = False
    d.USE_NEW = False
    d.CE_NEW = False
    d.EOS_POW = 0.0
    d.PSEUDO = False
    d.PSEUDO_TYPE = 0
    d.IOU_THRESHOLD = 0.5
    d.PSEUDO_THRESHOLD = 0.0
    d.MASK_KD = 0.0

    # ECLIPSE
    c.NUM_PROMPTS = 10  # prompts per incremental step; must be 0 at step 0
    c.SOFTCLS = True  # softmax (True) or sigmoid (False) class scores; the scripts use False
    c.BACKBONE_FREEZE = False  # also the master switch of the step>0 freezing
    c.CLS_HEAD_FREEZE = False
    c.MASK_HEAD_FREEZE = False
    c.PIXEL_DECODER_FREEZE = False
    c.QUERY_EMBED_FREEZE = False
    c.TRANS_DECODER_FREEZE = False
    c.PROMPT_DEEP = False
    c.PROMPT_MASK_MLP = False
    c.PROMPT_NO_OBJ_MLP = False
    c.DEEP_CLS = False
    c.LOGIT_MANI_DELTAS = None  # None, a float, or a list with one delta per query group
    # not in the official code: supervise every decoder layer at steps > 0 (the official
    # code supervises only the pre-decoder prediction and the last layer)
    c.PROMPT_SUPERVISE_ALL_LAYERS = False
    # not in the official code: shift the 0-based contiguous ids of COCO by +1 so that they match
    # the 1-based CONT.ORDER (the official runs never train "person"; ECLIPSE_SPEC.md 1.10)
    c.COCO_CORRECT_IDS = False
    # not in the official code: train a step again although its model_final.pth exists
    c.OVERWRITE = False
    # folder of the official per-scenario CSV files (<RESULTS_DIR>/<TASK_NAME>.csv)
    c.RESULTS_DIR = "results"
    # not in the official code: the joint upper bound, all classes in one step (continual/joint.py)
    c.JOINT = False
    # not in the official code: gradient accumulation; IMS_PER_BATCH stays the global batch
    # (continual/accumulation.py)
    cfg.SOLVER.ACCUMULATE_STEPS = 1
    cfg.SOLVER.MAX_IMS_PER_DEVICE = 0  # 0: no limit
    # not in the official code: a dataset description file registered by merge_config
    # (mask2former/data/datasets/register_custom.py)
    cfg.DATASETS.CUSTOM_FILE = ""


def task_name(cfg: CN) -> str:
    """The official scenario name, e.g. ``mya-pan_100-5-ov`` or ``coc-pan_83-5-ov-c``.

    ``<first 3 letters of the train set><-pan|-ins|>_<BASE>-<INC>-<ov|dis|seq>[-<ORDER_NAME>]``.
    """
    test = cfg.MODEL.MASK_FORMER.TEST
    if test.PANOPTIC_ON:
        suffix = "-pan"
    elif test.INSTANCE_ON:
        suffix = "-ins"
    else:
        suffix = ""
    modes = {"overlap": "ov", "disjoint": "dis", "sequential": "seq"}
    if cfg.CONT.MODE not in modes:
        raise ValueError(
            f"CONT.MODE must be one of {sorted(modes)}, got {cfg.CONT.MODE!r}"
        )
    name = (
        f"{cfg.DATASETS.TRAIN[0][:3]}{suffix}_{cfg.CONT.BASE_CLS}-{cfg.CONT.INC_CLS}"
        f"-{modes[cfg.CONT.MODE]}"
    )
    if cfg.CONT.ORDER_NAME:
        name += f"-{cfg.CONT.ORDER_NAME}"
    return name


def step_output_dir(output_root: str, task: str, run_name: str, step: int) -> str:
    """``<output_root>/<task name>/<run name>/step<step>``: where one step's files live."""
    return os.path.join(output_root, task, run_name, f"step{step}")


def setup_continual_names(cfg: CN) -> None:
    """Derive ``TASK_NAME``, ``OUTPUT_ROOT`` and the per-step ``OUTPUT_DIR`` in place.

    ``OUTPUT_DIR`` given by the user is the root of all runs; it becomes
    ``OUTPUT_ROOT/TASK_NAME/NAME/step<CONT.TASK>``. Calling this twice is harmless.
    """
    cfg.TASK_NAME = task_name(cfg)
    if not cfg.OUTPUT_ROOT:
        cfg.OUTPUT_ROOT = cfg.OUTPUT_DIR
    cfg.OUTPUT_DIR = step_output_dir(cfg.OUTPUT_ROOT, cfg.TASK_NAME, cfg.NAME, cfg.CONT.TASK)


def _all_keys(node: CN, prefix: str = ""):
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, CN):
            yield from _all_keys(value, full + ".")
        else:
            yield full


def merge_config(cfg: CN, config_file: str, opts) -> CN:
    """Merge ``config_file`` and the ``KEY VALUE`` list ``opts`` into ``cfg``, then register the
    datasets of ``DATASETS.CUSTOM_FILE`` (if set).

    An unknown key stops with a ``KeyError`` that names the key, where it came from and the
    closest known keys (yacs only says "Non-existent key").
    """
    import difflib

    for source, merge in ((config_file, lambda: cfg.merge_from_file(config_file)),
                          ("the command line", lambda: cfg.merge_from_list(list(opts)))):
        try:
            merge()
        except (AssertionError, KeyError) as e:
            text = str(e).strip("'\"")
            if not text.startswith("Non-existent"):
                raise
            key = text.split(":", 1)[1].strip()
            close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown config key {key} in {source}.{hint} Known keys are defined in "
                           f"mask2former/config.py, continual/config.py and detectron2's defaults.") from None
    if cfg.DATASETS.get("CUSTOM_FILE"):
        # registered here, so that every process and every tool has the datasets it names
        from mask2former.data.datasets.register_custom import register_custom_dataset

        register_custom_dataset(cfg.DATASETS.CUSTOM_FILE)
    return cfg


def _main(argv=None) -> None:
    """``python -m continual.config output-dir --config-file F [KEY VALUE ...]`` prints the
    step folder ``OUTPUT_DIR`` a run with these arguments uses (for the scenario scripts)."""
    import argparse

    from detectron2.config import get_cfg

    from mask2former.config import add_maskformer2_config

    parser = argparse.ArgumentParser(prog="python -m continual.config output-dir")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "output-dir":
        parser.error("the only command is: output-dir --config-file FILE [KEY VALUE ...]")
    args = parser.parse_args(argv[1:])
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    add_continual_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    setup_continual_names(cfg)
    print(cfg.OUTPUT_DIR)


if __name__ == "__main__":
    _main()
