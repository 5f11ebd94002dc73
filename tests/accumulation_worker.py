"""``train_continual.py`` with fixed point sampling, for tests/test_accumulation.py.

The matcher and the mask losses draw random points from each process's torch generator, so a
2-process run and a 1-process run consume the random stream differently. Here every image gets
the same fixed points in both, which leaves the normaliser, the data order and the gradient
reduction as the only things that can differ. Usage: as ``train_continual.py``.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from detectron2.engine import default_argument_parser, launch  # noqa: E402

import train_continual  # noqa: E402


def _points(num_points: int) -> torch.Tensor:
    return torch.rand(num_points, 2, generator=torch.Generator().manual_seed(0))


def fix_point_sampling() -> None:
    from mask2former.modeling.criterion import SetCriterion
    from mask2former.modeling.matcher import HungarianMatcher

    loss_masks, match = SetCriterion.loss_masks, HungarianMatcher.forward

    def fixed_loss_masks(self, outputs, targets, indices, num_masks, point_coords=None):
        if point_coords is None:
            matched = sum(len(src) for src, _ in indices)
            point_coords = _points(self.num_points).expand(matched, -1, -1)
        return loss_masks(self, outputs, targets, indices, num_masks, point_coords)

    def fixed_match(self, outputs, targets, point_coords=None):
        if point_coords is None:
            point_coords = [_points(self.num_points)] * outputs["pred_logits"].shape[0]
        return match(self, outputs, targets, point_coords=point_coords)

    SetCriterion.loss_masks = fixed_loss_masks
    HungarianMatcher.forward = fixed_match


def main(args):
    fix_point_sampling()
    return train_continual.main(args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
