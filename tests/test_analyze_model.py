"""tools/analyze_model.py on the tiny synthetic config: parameter counts per step and FLOPs."""
from pathlib import Path

import pytest

from conftest import REPO, load_script

TINY = str(REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml")
OVERRIDES = (REPO / "tests" / "tiny_model_overrides.txt").read_text().splitlines()[-1].split()


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    tool = load_script("tools/analyze_model.py")
    out = tmp_path_factory.mktemp("analysis") / "tiny.md"
    rows = tool.main(["--config-file", TINY, "--tasks", "0,1,2", "--output", str(out)]
                     + OVERRIDES + ["CONT.NUM_PROMPTS", "4"])
    return tool, rows, out


def test_parameter_counts_per_step(analysis):
    tool, rows, _ = analysis
    step0, step1, step2 = (r["params"] for r in rows)
    assert step0["trainable"] == step0["total"]  # FREEZE_AT 0 in the tiny config: all trainable
    # each step adds one prompt bank and its heads and trains only those (and the no-object
    # head): the trainable count is the same at every step, the total grows by the new bank
    assert step1["trainable"] == step2["trainable"] > 0
    added = step2["total"] - step1["total"]
    assert step1["total"] - step0["total"] == added > 0
    for part in ("backbone", "pixel decoder"):
        assert step1["parts"][part]["trainable"] == 0
        assert step1["parts"][part]["total"] == step0["parts"][part]["total"]
    assert sum(p["total"] for p in step1["parts"].values()) == step1["total"]
    assert sum(p["trainable"] for p in step1["parts"].values()) == step1["trainable"]


def test_trainable_parameters_are_the_prompt_modules(analysis):
    tool, rows, _ = analysis
    import torch

    from continual.prompt_tuning import get_predictor
    from continual.trainer import IncrementalTrainer

    cfg = tool.build_config(TINY, OVERRIDES + ["CONT.NUM_PROMPTS", "4", "CONT.TASK", "1"])
    torch.manual_seed(0)
    pred = get_predictor(IncrementalTrainer.build_model(cfg))
    prompt_modules = [pred.prompt_feat[-1], pred.prompt_embed[-1], pred.class_embed.cls[-1]]
    prompt_modules += [pred.prompt_mask_embed[-1]] if len(pred.prompt_mask_embed) else []
    prompt_modules += [pred.prompt_no_obj_embed[-1]] if len(pred.prompt_no_obj_embed) else [pred.class_embed.cls[0]]
    expected = sum(p.numel() for m in prompt_modules for p in m.parameters())
    assert rows[1]["params"]["trainable"] == expected


def test_flops_and_output_files(analysis):
    _, rows, out = analysis
    assert all(r["image_size"] == [64, 64] or r["image_size"] == (64, 64) for r in rows)
    assert 0 < rows[0]["flops"] <= rows[1]["flops"] <= rows[2]["flops"]  # more queries each step
    assert "aten::scaled_dot_product_attention" not in rows[0]["unsupported_ops"]  # handled here
    # the convolutions are counted (as F.conv2d, not as the CPU path's oneDNN call)
    assert not any("convolution" in op for op in rows[0]["unsupported_ops"])
    table = Path(out).read_text()
    assert table.count("\n| ") == 4 and "GFLOPs" in table
    assert Path(out).with_suffix(".json").is_file()
