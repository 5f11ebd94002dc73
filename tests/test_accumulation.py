"""Gradient accumulation (SOLVER.ACCUMULATE_STEPS / SOLVER.MAX_IMS_PER_DEVICE): the plan, the
loss normaliser, and one process reproducing the weights of a 2-process DDP run."""
import json

import pytest
import torch

from script_runner import dataset_env, generate_synthetic_root, run_command, train_command

# no random augmentation: 64x64 images, one scale, a crop of the whole image, no flip / colour
DETERMINISTIC = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.CROP.SIZE", "(64,64)",
                 "INPUT.SIZE_DIVISIBILITY", "64", "INPUT.COLOR_AUG_SSD", "False", "INPUT.RANDOM_FLIP", "none",
                 "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"]


class _Cfg:
    def __init__(self, batch, steps, limit):
        from detectron2.config import CfgNode

        self.SOLVER = CfgNode({"IMS_PER_BATCH": batch, "ACCUMULATE_STEPS": steps, "MAX_IMS_PER_DEVICE": limit})


@pytest.mark.parametrize("batch,world,steps,limit,plan", [
    (16, 1, 1, 4, (4, 4)),   # one GPU reproduces the official 4 x 4
    (16, 2, 1, 4, (2, 4)),
    (16, 4, 1, 4, (1, 4)),   # the official run
    (16, 8, 1, 4, (1, 2)),
    (16, 1, 2, 0, (2, 8)),   # an explicit ACCUMULATE_STEPS
    (2, 1, 1, 4, (1, 2)),    # small batches need no accumulation
    (16, 1, 1, 3, (8, 2)),   # the largest micro-batch within the limit that divides the batch
])
def test_accumulation_plan(batch, world, steps, limit, plan):
    from continual.accumulation import accumulation_plan

    assert accumulation_plan(_Cfg(batch, steps, limit), world) == plan


def test_accumulation_plan_errors_name_the_keys():
    from continual.accumulation import accumulation_plan

    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH=16 .*3 process.*ACCUMULATE_STEPS in \[\]"):
        accumulation_plan(_Cfg(16, 1, 0), 3)
    with pytest.raises(ValueError, match=r"ACCUMULATE_STEPS in \[1, 2, 4, 8, 16\]"):
        accumulation_plan(_Cfg(16, 3, 0), 1)
    with pytest.raises(ValueError, match="SOLVER.ACCUMULATE_STEPS must be >= 1"):
        accumulation_plan(_Cfg(16, 0, 0), 1)


def test_fixed_normaliser_and_the_check_of_the_counted_masks():
    from mask2former.modeling.criterion import SetCriterion, fixed_num_masks

    criterion = SetCriterion(3, matcher=None, weight_dict={}, eos_coef=0.1, losses=["labels"], num_points=4,
                             oversample_ratio=3.0, importance_sample_ratio=0.75)
    targets = [{"labels": torch.tensor([0, 1])}, {"labels": torch.tensor([2])}]
    assert criterion.get_num_masks(targets, "cpu") == 3.0
    with fixed_num_masks(2.5, 3):
        assert criterion.get_num_masks(targets, "cpu") == 2.5
    with fixed_num_masks(2.5, 4), pytest.raises(RuntimeError, match="counted 4 target masks .* received 3"):
        criterion.get_num_masks(targets, "cpu")
    assert criterion.get_num_masks(targets, "cpu") == 3.0  # restored


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_synthetic_root(tmp_path_factory.mktemp("d2data"), num_train=16, num_val=2)


def _train(data_root, out, name, processes, *opts):
    cmd = train_command(out, name, "SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "0.001", *DETERMINISTIC, *opts,
                        flags=["--num-gpus", str(processes)], entry="tests/accumulation_worker.py")
    res = run_command(cmd, dataset_env(data_root, OMP_NUM_THREADS="1"))
    step = out / "syn-pan_6-2-ov" / name / "step0"
    final = torch.load(step / "model_final.pth", map_location="cpu", weights_only=True)
    weights = final["model"]
    # AdamW's first moments: non-zero once the optimizer has stepped with real gradients
    assert final["iteration"] == 2
    optimizer = final["trainer"]["_trainer"]["optimizer"]
    assert sum(bool(state["exp_avg"].abs().sum() > 0) for state in optimizer["state"].values()) > 50
    losses = [json.loads(line) for line in (step / "metrics.json").read_text().splitlines()]
    losses = {m["iteration"]: m["total_loss"] for m in losses if "total_loss" in m}
    return weights, losses, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ddp_opts,single_opts", [
    # 2 processes x 1 image == 1 process x 2 micro-batches of 1 image
    (["SOLVER.IMS_PER_BATCH", "2"], ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.ACCUMULATE_STEPS", "2"]),
    # 2 processes x 2 micro-batches (no_sync, the all-reduced count) == 1 process x 4 micro-batches
    (["SOLVER.IMS_PER_BATCH", "4", "SOLVER.ACCUMULATE_STEPS", "2"],
     ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_IMS_PER_DEVICE", "1"]),
], ids=["ddp2-vs-acc2", "ddp2acc2-vs-acc4"])
def test_one_process_with_accumulation_reproduces_ddp(data_root, tmp_path, ddp_opts, single_opts):
    ddp, ddp_losses, _ = _train(data_root, tmp_path, "ddp", 2, *ddp_opts)
    single, single_losses, log = _train(data_root, tmp_path, "single", 1, *single_opts)
    assert "micro-batches" in log  # the trainer states the plan
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(single[key], ddp[key], rtol=1e-4, atol=2e-6, msg=key)
    # the logged losses (mean over processes / micro-batches) agree too
    assert abs(ddp_losses[2] - single_losses[2]) <= 1e-4 * abs(ddp_losses[2])
