"""The one place a config is assembled: protocol keys, the merge of files and overrides, run names.

:func:`setup_cfg` is the entry point every script uses. :func:`add_continual_config` adds the
``CONT.*`` keys of the continual protocol to those :func:`mask2former.config.add_maskformer2_config`
defines for the network. Keys and defaults are those of the official ECLIPSE implementation
(docs/design.md#configuration), including the CoMFormer options ECLIPSE does not use, so that
official command lines are accepted unchanged.
"""
import argparse
import ast
import difflib
import os
import sys
from typing import Optional, Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.config.compat import guess_version
from detectron2.utils.file_io import PathManager

from mask2former.config import add_maskformer2_config
from mask2former.data.datasets.register_custom import register_custom_dataset

__all__ = [
    "add_continual_config", "task_name", "step_output_dir", "setup_continual_names", "merge_config", "setup_cfg",
]


def add_continual_config(cfg: CN) -> None:
    """Add ``CONT.*``, ``WANDB``, ``NAME``, ``TASK_NAME`` and ``OUTPUT_ROOT`` to ``cfg`` in place."""
    # Weights & Biases logging; off by default here (the official default is True, and every
    # official script passes WANDB False). Needs the optional `wandb` package.
    cfg.WANDB = False
    cfg.NAME = "Exp"
    # derived from the other keys by `setup_continual_names`; present so resolved configs load
    cfg.TASK_NAME = ""
    cfg.OUTPUT_ROOT = ""

    if "CONT" not in cfg or "BASE_CLS" not in cfg.CONT:
        raise KeyError("add_continual_config needs the network's CONT keys: call "
                       "mask2former.config.add_maskformer2_config(cfg) first (or use setup_cfg)")
    c = cfg.CONT
    c.ORDER = list(range(1, 21))
    c.ORDER_NAME = None
    c.WEIGHTS = None
    c.MODE = "overlap"  # "overlap" | "disjoint" | "sequential"
    c.INC_QUERY = False
    c.WA_STEP = 0

    # CoMFormer / MiB / PLOP distillation options; accepted but unused by ECLIPSE
    c.DIST = CN({
        "POD_WEIGHT": 0.0, "KD_WEIGHT": 0.0, "ALPHA": 1.0, "UCE": False, "UKD": False, "L2": False,
        "KD_REW": False, "KD_DEEP": False, "USE_NEW": False, "CE_NEW": False, "EOS_POW": 0.0,
        "PSEUDO": False, "PSEUDO_TYPE": 0, "IOU_THRESHOLD": 0.5, "PSEUDO_THRESHOLD": 0.0, "MASK_KD": 0.0,
    })

    # ECLIPSE freezing rules of steps > 0; BACKBONE_FREEZE is also the master switch
    for key in ("BACKBONE_FREEZE", "CLS_HEAD_FREEZE", "MASK_HEAD_FREEZE", "PIXEL_DECODER_FREEZE",
                "QUERY_EMBED_FREEZE", "TRANS_DECODER_FREEZE"):
        c[key] = False
    # not in the official code: shift the 0-based contiguous ids of COCO by +1 so that they match
    # the 1-based CONT.ORDER (the official runs never train "person";
    # docs/official_behaviours.md#coco-ids)
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


def _literal(value):
    """A value as yacs reads it: a string that is a Python literal becomes that literal."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    return value


def _as_float_if_int(value, current):
    """``value`` (an integer given for the float key whose value is ``current``) as that float;
    any other value unchanged (yacs checks it)."""
    literal = _literal(value)
    if isinstance(current, float) and isinstance(literal, int) and not isinstance(literal, bool):
        return float(literal)
    return value


def _lookup(cfg: CN, full_key: str):
    """The value of the dotted key ``full_key`` in ``cfg``; None where it does not exist."""
    node = cfg
    for part in full_key.split("."):
        if not isinstance(node, CN) or part not in node:
            return None
        node = node[part]
    return node


def _ints_to_floats(loaded: dict, node: CN) -> dict:
    """The loaded config file ``loaded`` with an integer given for a float key of ``node`` as that
    float (nested sections too); everything else is left to yacs's checks."""
    out = {}
    for key, value in loaded.items():
        current = node.get(key) if isinstance(node, CN) else None
        if isinstance(value, dict):
            out[key] = _ints_to_floats(value, current)
        else:
            out[key] = _as_float_if_int(value, current)
    return out


def _merge_file(cfg: CN, config_file: str) -> None:
    """``cfg.merge_from_file`` (``_BASE_`` files included) with an integer accepted for a float key."""
    if not PathManager.isfile(config_file):
        cfg.merge_from_file(config_file)  # stops with detectron2's message
    loaded = type(cfg)(_ints_to_floats(cfg.load_yaml_with_base(config_file, allow_unsafe=True), cfg))
    version = loaded.get("VERSION", None)
    if version is None:
        version = guess_version(loaded, config_file)
    if version != cfg.VERSION:
        cfg.merge_from_file(config_file)  # an old config version: detectron2's upgrade path
        return
    cfg.merge_from_other_cfg(loaded)


def _merge_list(cfg: CN, opts) -> None:
    """``cfg.merge_from_list`` with an integer accepted for a float key."""
    opts = list(opts)
    if len(opts) % 2 == 0:  # an odd list is refused by yacs, with its message
        opts[1::2] = [_as_float_if_int(value, _lookup(cfg, key)) for key, value in zip(opts[0::2], opts[1::2])]
    cfg.merge_from_list(opts)


def merge_config(cfg: CN, config_file: Optional[str], opts) -> CN:
    """Merge ``config_file`` (None: none) and the ``KEY VALUE`` list ``opts`` into ``cfg``, then
    register the datasets of ``DATASETS.CUSTOM_FILE`` (if set).

    An unknown key stops with a ``KeyError`` that names the key, where it came from and the
    closest known keys (yacs only says "Non-existent key"). An integer is accepted for a float key.
    """
    steps = [("the command line", lambda: _merge_list(cfg, opts))]
    if config_file is not None:
        steps.insert(0, (config_file, lambda: _merge_file(cfg, config_file)))
    for source, merge in steps:
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
        register_custom_dataset(cfg.DATASETS.CUSTOM_FILE)
    return cfg


def setup_cfg(config_file: Optional[str] = None, opts: Sequence[str] = (), *, freeze: bool = False) -> CN:
    """A config with every key of the project, merged from ``config_file`` (if any) and the
    ``KEY VALUE`` list ``opts`` by :func:`merge_config` (unknown keys stop with suggestions).

    Run names are not derived here (see :func:`setup_continual_names`).
    """
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    add_continual_config(cfg)
    merge_config(cfg, str(config_file) if config_file else None, opts)
    if freeze:
        cfg.freeze()
    return cfg


def _main(argv=None) -> None:
    """``python -m continual.config output-dir --config-file F [KEY VALUE ...]`` prints the
    step folder ``OUTPUT_DIR`` a run with these arguments uses (for the scenario scripts)."""
    parser = argparse.ArgumentParser(prog="python -m continual.config output-dir")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "output-dir":
        parser.error("the only command is: output-dir --config-file FILE [KEY VALUE ...]")
    args = parser.parse_args(argv[1:])
    cfg = setup_cfg(args.config_file, args.opts)
    setup_continual_names(cfg)
    print(cfg.OUTPUT_DIR)


if __name__ == "__main__":
    _main()
