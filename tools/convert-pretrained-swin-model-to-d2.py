#!/usr/bin/env python
"""Convert an official Swin Transformer ImageNet checkpoint into a Detectron2 weight file.

The official Swin classification checkpoints (e.g. swin_tiny_patch4_window7_224.pth from the
Swin-Transformer releases; download them yourself, this script downloads nothing) are a dict
whose "model" entry is the state dict. The parameter names of the classification model are the
names that D2SwinTransformer uses (patch_embed.*, layers.{i}.blocks.{j}.*,
layers.{i}.downsample.*), so the tensors are written unchanged, as numpy arrays, to a pickle
{"model": ..., "__author__": ..., "matching_heuristics": True} that DetectionCheckpointer reads.

Keys that only the classifier has (head.*, the final norm.*, the shifted-window attn_mask
buffers) are kept in the file and ignored when loading; the per-stage output norms norm0..norm3
of D2SwinTransformer are not in an ImageNet checkpoint and keep their initialisation (as with
the official Mask2Former code).

Use the result with:

  MODEL:
    BACKBONE: {NAME: "D2SwinTransformer"}
    WEIGHTS: "/path/to/swin_tiny_patch4_window7_224.pkl"
    PIXEL_MEAN: [123.675, 116.280, 103.530]
    PIXEL_STD: [58.395, 57.120, 57.375]
  INPUT:
    FORMAT: "RGB"

and the MODEL.SWIN.* values of the checkpoint (EMBED_DIM, DEPTHS, NUM_HEADS, WINDOW_SIZE,
PRETRAIN_IMG_SIZE).
"""
import argparse
import os
import pickle
import sys


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def _describe(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def load_checkpoint(path: str, unsafe: bool = False):
    """Read a torch checkpoint; by default only tensors and plain containers are unpickled."""
    import torch  # imported here so that --help works quickly

    if not os.path.isfile(path):
        _fail(f"input file '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError:
        _fail(
            f"'{path}' holds objects other than tensors and plain containers, which are not "
            "read by default. If you trust the file, rerun with --unsafe-load."
        )
    except Exception as e:  # noqa: BLE001 - report any reading problem the same way
        _fail(f"cannot read '{path}' as a torch checkpoint: {_describe(e)}")


def convert(obj, key: str = "model"):
    """Return ``{name: numpy array}`` from a Swin checkpoint object (see the module docstring)."""
    import torch

    if not isinstance(obj, dict):
        _fail(f"expected the checkpoint to be a dict, got {type(obj).__name__}")
    if key:
        if key not in obj:
            found = ", ".join(sorted(map(str, obj.keys()))[:10])
            _fail(f"the checkpoint has no '{key}' entry (top-level keys: {found}); see --key")
        obj = obj[key]
        if not isinstance(obj, dict):
            _fail(f"checkpoint['{key}'] is a {type(obj).__name__}, not a state dict")
    state = {}
    for name, value in obj.items():
        if not torch.is_tensor(value):
            _fail(f"entry '{name}' of the state dict is a {type(value).__name__}, not a tensor")
        if name.startswith("module."):
            name = name[len("module.") :]
        state[name] = value.detach().cpu().numpy()
    if "patch_embed.proj.weight" not in state:
        _fail(
            "the state dict has no 'patch_embed.proj.weight'; this does not look like a Swin "
            "Transformer checkpoint"
        )
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="official Swin checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 weight file to write (.pkl)")
    parser.add_argument(
        "--key",
        default="model",
        help="entry of the checkpoint that holds the state dict (default: model; '' = the whole file)",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow arbitrary pickled objects in the input (only for files you trust)",
    )
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        _fail("the output name must end with .pkl (Detectron2 reads .pkl files as converted weights)")

    state = convert(load_checkpoint(args.input, args.unsafe_load), args.key)
    res = {"model": state, "__author__": "third_party (Swin Transformer)", "matching_heuristics": True}
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        _fail(f"output directory '{out_dir}' does not exist")
    with open(args.output, "wb") as f:
        pickle.dump(res, f)
    print(f"wrote {len(state)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
