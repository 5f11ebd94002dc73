#!/usr/bin/env python
"""Convert a torchvision ResNet checkpoint into a Detectron2 ResNet weight file.

Works for resnet18/34/50/101/152 state dicts (e.g. resnet50-0676ba61.pth; download it yourself,
this script downloads nothing). Parameters are renamed to Detectron2's ResNet naming:

  conv1.weight                 -> stem.conv1.weight
  bn1.*                        -> stem.conv1.norm.*
  layer{N}.{B}.conv{K}.weight  -> res{N+1}.{B}.conv{K}.weight
  layer{N}.{B}.bn{K}.*         -> res{N+1}.{B}.conv{K}.norm.*
  layer{N}.{B}.downsample.0.*  -> res{N+1}.{B}.shortcut.*
  layer{N}.{B}.downsample.1.*  -> res{N+1}.{B}.shortcut.norm.*

The ImageNet classifier (fc.*) and the BatchNorm counters (num_batches_tracked) are dropped
unless --keep-fc / --keep-num-batches-tracked are given. The output is a pickle
{"model": {name: numpy array}, "__author__": "torchvision", "matching_heuristics": True} that
DetectionCheckpointer reads.

Use the result with:

  MODEL:
    WEIGHTS: "/path/to/r50.pkl"
    PIXEL_MEAN: [123.675, 116.280, 103.530]
    PIXEL_STD: [58.395, 57.120, 57.375]
    RESNETS:
      DEPTH: 50
      STRIDE_IN_1X1: False     # torchvision puts the stride on the 3x3 conv
      RES2_OUT_CHANNELS: 64    # only for DEPTH 18/34
  INPUT:
    FORMAT: "RGB"
"""
import argparse
import os
import pickle
import re
import sys

_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(.+)$")
_FC = re.compile(r"^fc\.(weight|bias)$")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def _describe(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def rename(key: str):
    """Detectron2 name of a torchvision ResNet key, or None if it is not a backbone key."""
    m = _STEM.match(key)
    if m:
        module, attr = m.groups()
        return f"stem.conv1.{attr}" if module == "conv1" else f"stem.conv1.norm.{attr}"
    m = _BLOCK.match(key)
    if m:
        stage, block, module, attr = m.groups()
        prefix = f"res{int(stage) + 1}.{block}"
        if module.startswith("conv"):
            return f"{prefix}.{module}.{attr}"
        if module.startswith("bn"):
            return f"{prefix}.conv{module[2:]}.norm.{attr}"
        if module == "downsample.0":
            return f"{prefix}.shortcut.{attr}"
        return f"{prefix}.shortcut.norm.{attr}"
    return None


def _state_dict_of(obj):
    import torch  # imported here so that --help works quickly

    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return _state_dict_of(obj[key])
    _fail(
        "expected a torchvision ResNet state dict (a dict of tensors, possibly under "
        f"'state_dict' or 'model'), got {type(obj).__name__}"
    )


def convert(obj, keep_fc: bool = False, keep_num_batches_tracked: bool = False, verbose: bool = True):
    """Return ``{detectron2 name: numpy array}`` for a torchvision ResNet state dict."""
    state = _state_dict_of(obj)
    out, unknown = {}, []
    for key, value in state.items():
        key_ = key[len("module.") :] if key.startswith("module.") else key
        if key_.endswith("num_batches_tracked") and not keep_num_batches_tracked:
            continue
        if _FC.match(key_):
            if keep_fc:
                out[key_] = value.detach().cpu().numpy()
            continue
        new = rename(key_)
        if new is None:
            unknown.append(key)
            continue
        if verbose:
            print(f"{key} -> {new}")
        out[new] = value.detach().cpu().numpy()
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        _fail(f"{len(unknown)} keys are not torchvision ResNet keys: {shown}")
    if "stem.conv1.weight" not in out:
        _fail("no 'conv1.weight' in the input; this does not look like a torchvision ResNet")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="torchvision ResNet checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 weight file to write (.pkl)")
    parser.add_argument("--keep-fc", action="store_true", help="also write the classifier fc.*")
    parser.add_argument(
        "--keep-num-batches-tracked",
        action="store_true",
        help="also write the BatchNorm num_batches_tracked counters",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the renaming")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        _fail("the output name must end with .pkl (Detectron2 reads .pkl files as converted weights)")
    if not os.path.isfile(args.input):
        _fail(f"input file '{args.input}' does not exist")
    try:
        import torch

        obj = torch.load(args.input, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        _fail(f"cannot read '{args.input}' as a torch state dict: {_describe(e)}")

    model = convert(obj, args.keep_fc, args.keep_num_batches_tracked, verbose=not args.quiet)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        _fail(f"output directory '{out_dir}' does not exist")
    with open(args.output, "wb") as f:
        pickle.dump({"model": model, "__author__": "torchvision", "matching_heuristics": True}, f)
    print(f"wrote {len(model)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
